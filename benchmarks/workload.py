"""The benchmark's requests: real prompts and responses from ../shared/data/hh-harmless.

Each HH line holds two transcripts (chosen, rejected) that share a prompt; both final
responses become scored items, so the length distribution is the data's own. Items whose
response alone does not fit the bundle's ``max_length`` are left out (the service would answer
422 for them, which is correct behaviour, not load), and the count of those is reported.

Shapes (issue 8):

- ``single``: one pair per request, the OpenRLHF / verl pattern;
- ``grpo8``: one prompt with 8 responses per request, the GRPO group pattern. HH has two
  responses per prompt, so the other six are responses to other prompts, drawn with a fixed
  seed (their lengths matter for the load, not their meaning).
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from rmserve.encoding import PairEncoder, ResponseTooLongError
from rmserve.formatting import (
    FormattingError,
    Message,
    TextFormat,
    messages_from_pair,
    parse_transcript,
    render,
)

__all__ = [
    "GROUP_SIZE",
    "SHAPES",
    "Item",
    "Request",
    "Workload",
    "build_workload",
    "default_data_dir",
    "load_items",
]

SHAPES = ("single", "grpo8")
GROUP_SIZE = 8  # responses per grpo8 request


@dataclass(frozen=True)
class Item:
    prompt: tuple[Message, ...]  # the conversation before the scored response
    response: str
    tokens: int  # encoded length with special tokens, after prompt truncation

    def as_json(self) -> dict[str, object]:
        """The ``{"messages": [...]}`` item form of /v1/score (docs/architecture.md: the
        wire API)."""
        turns = [*self.prompt, Message("assistant", self.response)]
        return {"messages": [{"role": m.role, "content": m.content} for m in turns]}


@dataclass(frozen=True)
class Request:
    items: tuple[Item, ...]

    def body(self) -> bytes:
        """The JSON body, serialised once up front so the load generator only sends bytes."""
        return json.dumps({"items": [item.as_json() for item in self.items]}).encode()


@dataclass(frozen=True)
class Workload:
    items: list[Item]  # every scoreable item, in a fixed shuffled order
    skipped_too_long: int  # items left out because the response alone exceeds max_length

    def requests(self, shape: str, seed: int = 0) -> list[Request]:
        """A fixed list of requests of one shape; the load generator cycles through it."""
        if shape == "single":
            return [Request((item,)) for item in self.items]
        if shape == "grpo8":
            rng = random.Random(seed)
            out: list[Request] = []
            for i in range(0, len(self.items), GROUP_SIZE):
                anchor = self.items[i]
                responses = [anchor, *rng.sample(self.items, GROUP_SIZE - 1)]
                # Each response fits alone (build_workload checked), so under this prompt it
                # fits too, at worst with the prompt cut from the left: no 422s. ``tokens``
                # is the anchor's, a label only; the load is what the server encodes.
                group = tuple(Item(anchor.prompt, r.response, anchor.tokens) for r in responses)
                out.append(Request(group))
            return out
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def default_data_dir(repo_root: Path) -> Path:
    """../shared/data/hh-harmless next to the repository (data/README.md)."""
    return repo_root.parent / "shared" / "data" / "hh-harmless"


def load_items(data_dir: Path, split: str = "train") -> list[tuple[tuple[Message, ...], str]]:
    """(prompt turns, final response) for both transcripts of every HH pair in a split."""
    path = data_dir / f"{split}.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"no preference data at {path}; pass --data DIR pointing at a folder with "
            f"{split}.jsonl.gz (the repository expects ../shared/data/hh-harmless)"
        )
    out: list[tuple[tuple[Message, ...], str]] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            row = json.loads(line)
            for key in ("chosen", "rejected"):
                try:
                    turns = parse_transcript(row[key])
                except FormattingError as e:
                    raise ValueError(f"{path}:{line_no} {key}: {e}") from e
                if len(turns) < 2 or turns[-1].role != "assistant":
                    continue  # no prompt, or a transcript that does not end on a response
                out.append((tuple(turns[:-1]), turns[-1].content))
    return out


def build_workload(
    data_dir: Path,
    encoder: PairEncoder,
    text_format: TextFormat,
    *,
    limit: int | None = None,
    seed: int = 0,
) -> Workload:
    """Shuffle the data's items with a fixed seed, keep the first ``limit`` that fit."""
    raw = load_items(data_dir)
    random.Random(seed).shuffle(raw)
    items: list[Item] = []
    skipped = 0
    for prompt, response in raw:
        if limit is not None and len(items) >= limit:
            break
        rendered = render(messages_from_pair(list(prompt), response), text_format)
        try:
            encoded = encoder.encode(rendered)
        except ResponseTooLongError:
            skipped += 1
            continue
        items.append(Item(prompt, response, len(encoded.ids)))
    if not items:
        raise ValueError(f"no scoreable items in {data_dir}; check the data and max_length")
    return Workload(items, skipped)
