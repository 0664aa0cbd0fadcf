"""Preference data: readers for local files and Hugging Face datasets, and the example type.

Sources: ``.jsonl``, ``.jsonl.gz``, ``.json`` (a list of rows, or ``{"data": [...]}``),
``.parquet``, or a Hugging Face dataset id (``owner/name``, optionally ``owner/name:split``;
needs the ``hub`` extra). The row shape is detected once per file, from its first row:

- ``hh``: HH transcripts ``{"chosen", "rejected"}``, two whole conversations (the Anthropic
  HH-RLHF format), usually sharing everything up to the final assistant turn;
- ``explicit``: ``{"prompt", "chosen", "rejected"}`` strings;
- ``conversational``: the same keys holding chat message lists (``prompt`` may be omitted
  when ``chosen``/``rejected`` are whole conversations that share their prefix);
- ``ranked``: ``{"prompt", "responses": [...]}`` best first, or with ``"ranks"`` (lower is
  better, distinct): all K-choose-2 pairs stay together in one example;
- any shape may carry a per-row ``"margin"`` (a number).

The two transcripts of an ``hh`` row need not part at their final turn: a few HH rows (4 of
1835 in the shipped train file, 1 of 240 in dev) differ a turn or two earlier. Such a pair is
read as TRL's ``extract_prompt`` reads it: the prompt is the longest run of turns the two share,
and each response is the rest of its transcript. The run is cut back to the last shared turn
that both continue with an assistant turn, so the prompt ends at a turn boundary and each
response, rendered after the prompt, is byte for byte its original transcript (a later turn's
role prefix stays inside the response text). Such examples are marked ``parted`` and counted;
only a pair sharing no opening turn (no prompt at all) is malformed. Conversational rows (message
lists) that part early stay malformed (see ``_paired``).

A malformed row raises :class:`DataError` naming the file, the line and the problem, unless
``skip_malformed`` is set; the result then counts the skipped rows.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rmserve.formatting import (
    AnyTextFormat,
    FormattingError,
    Message,
    RenderedText,
    TextFormat,
    messages_from_pair,
    parse_transcript,
    render,
)

__all__ = [
    "DataError",
    "PreferenceExample",
    "ReadResult",
    "RowShape",
    "detect_shape",
    "parse_row",
    "read_examples",
]

RowShape = Literal["hh", "explicit", "conversational", "ranked"]


class DataError(ValueError):
    """A data source that cannot be read, or a malformed row (file, line and problem)."""


@dataclass(frozen=True)
class PreferenceExample:
    """One prompt with two or more responses, best first (a pair is the K=2 case).

    All K-choose-2 pairs of a ranked example stay together in one batch element, as in
    InstructGPT, so that the K forward passes are shared by the pairs.
    """

    prompt: tuple[Message, ...]  # the conversation before the response
    responses: tuple[str, ...]  # best first, at least two
    margin: float = 0.0  # subtracted inside the loss: -log sigmoid(r_w - r_l - margin)
    source: str = ""  # "file:line" for error messages
    # The two conversations parted before their final turn; the prompt is their shared turns
    # (see the module docstring) and a response may hold several turns.
    parted: bool = False

    def pairs(self) -> Iterator[tuple[int, int]]:
        """(winner index, loser index) for every K-choose-2 pair."""
        for i in range(len(self.responses)):
            for j in range(i + 1, len(self.responses)):
                yield i, j

    def rendered(self, text_format: AnyTextFormat | None = None) -> list[RenderedText]:
        """Each response rendered with the prompt, in the order of ``responses``."""
        return [
            render(messages_from_pair(list(self.prompt), response), text_format)
            for response in self.responses
        ]


@dataclass(frozen=True)
class ReadResult:
    examples: list[PreferenceExample]
    source: str  # what was read
    shape: RowShape | None  # None when the source had no valid row
    skipped: int = 0  # malformed rows skipped (only with skip_malformed)
    problems: list[str] = field(default_factory=list)  # one message per skipped row

    @property
    def num_pairs(self) -> int:
        return sum(len(e.responses) * (len(e.responses) - 1) // 2 for e in self.examples)

    @property
    def parted(self) -> int:
        """Examples whose two conversations parted before their final turn (read, not skipped:
        callers report the count so that nobody mistakes them for lost rows)."""
        return sum(e.parted for e in self.examples)


class _RowError(ValueError):
    """A problem with one row; the reader adds the file and line."""


# --- reading sources ------------------------------------------------------------------------


def read_examples(
    source: str | Path,
    *,
    skip_malformed: bool = False,
    text_format: TextFormat | None = None,
    split: str = "train",
    limit: int | None = None,
) -> ReadResult:
    """Read preference examples from a file or a Hugging Face dataset id.

    ``limit`` stops after that many valid examples (quick runs and tests). ``split`` is the
    dataset split for hub ids without ``:split``.
    """
    fmt = text_format or TextFormat()
    examples: list[PreferenceExample] = []
    problems: list[str] = []
    shape: RowShape | None = None
    for where, row in _rows(source, split):
        if limit is not None and len(examples) >= limit:
            break
        try:
            if isinstance(row, _RowError):
                raise row
            if shape is None:
                shape = detect_shape(row)
            examples.append(parse_row(row, shape, fmt, source=where))
        except _RowError as e:
            message = f"{where}: {e}"
            if not skip_malformed:
                raise DataError(
                    f"{message} (pass --skip-malformed to skip such rows and count them)"
                ) from None
            problems.append(message)
    return ReadResult(
        examples=examples,
        source=str(source),
        shape=shape,
        skipped=len(problems),
        problems=problems,
    )


def _rows(source: str | Path, split: str) -> Iterator[tuple[str, Any]]:
    """(where, row) pairs; a row that is not even JSON comes as a _RowError."""
    path = Path(source)
    name = path.name.lower()
    if path.is_file():
        if name.endswith((".jsonl", ".jsonl.gz")):
            yield from _jsonl_rows(path)
        elif name.endswith(".json"):
            yield from _json_rows(path)
        elif name.endswith(".parquet"):
            yield from _parquet_rows(path)
        else:
            raise DataError(
                f"{path}: unsupported file type; expected .jsonl, .jsonl.gz, .json or .parquet"
            )
        return
    if path.exists():
        raise DataError(f"{path} is not a file; pass a .jsonl, .jsonl.gz, .json or .parquet file")
    text = str(source)
    looks_local = text.startswith((".", "/", "~")) or name.endswith(
        (".jsonl", ".gz", ".json", ".parquet")
    )
    if looks_local or (text.count("/") != 1 and ":" not in text):
        raise DataError(
            f"no such data file: {text}; pass an existing .jsonl, .jsonl.gz, .json or .parquet "
            "file, or a Hugging Face dataset id such as owner/name or owner/name:split"
        )
    yield from _hub_rows(text, split)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, _RowError(f"not valid JSON ({e.msg} at column {e.colno})")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read JSON ({e})") from e
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list of rows (or {{"data": [...]}})')
    for index, row in enumerate(data):
        yield f"{path}[row {index}]", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read parquet ({e})") from e
    for index, row in enumerate(table.to_pylist()):
        yield f"{path}[row {index}]", row


def _hub_rows(dataset_id: str, split: str) -> Iterator[tuple[str, Any]]:
    # No hub access here: tests stand in for `datasets`; the code path is kept for users.
    name, _, explicit_split = dataset_id.partition(":")
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"{dataset_id} is not a local file; reading a Hugging Face dataset needs the "
            "`datasets` package: pip install 'rmserve[hub]'"
        ) from e
    try:
        dataset = datasets.load_dataset(name, split=explicit_split or split)
    except Exception as e:
        raise DataError(f"cannot load Hugging Face dataset {dataset_id}: {e}") from e
    for index, row in enumerate(dataset):
        yield f"{name}:{explicit_split or split}[row {index}]", row


# --- row shapes -----------------------------------------------------------------------------


def detect_shape(row: Any) -> RowShape:
    """The shape of a row (see the module docstring), from its keys and value types."""
    if not isinstance(row, Mapping):
        raise _RowError(f"a row must be a JSON object, got {type(row).__name__}")
    keys = set(row)
    if "responses" in keys:
        return "ranked"
    if {"chosen", "rejected"} <= keys:
        chosen = row["chosen"]
        if isinstance(chosen, list) or isinstance(row.get("prompt"), list):
            return "conversational"
        if "prompt" in keys:
            return "explicit"
        return "hh"
    raise _RowError(
        f"unrecognised row with keys {sorted(keys)}; expected chosen/rejected (HH transcripts), "
        "prompt/chosen/rejected (strings or message lists) or prompt/responses (ranked)"
    )


def parse_row(
    row: Any, shape: RowShape, text_format: TextFormat | None = None, source: str = ""
) -> PreferenceExample:
    """One row of a file of the given shape, as an example; raises _RowError when malformed."""
    fmt = text_format or TextFormat()
    if not isinstance(row, Mapping):
        raise _RowError(f"a row must be a JSON object, got {type(row).__name__}")
    row_shape = detect_shape(row)
    # explicit and conversational rows parse the same way (strings or message lists), so a
    # file may mix them; any other change of shape inside one file is a malformed row.
    paired = {"explicit", "conversational"}
    if row_shape != shape and not {row_shape, shape} <= paired:
        raise _RowError(f"this row looks {row_shape} but the file's first row was {shape}")
    margin = _margin(row)
    parted = False
    if shape == "hh":
        prompt, responses, parted = _hh(row, fmt)
    elif shape == "ranked":
        prompt, responses = _ranked(row)
    else:
        prompt, responses = _paired(row)
    return PreferenceExample(
        prompt=prompt, responses=responses, margin=margin, source=source, parted=parted
    )


def _margin(row: Mapping[str, Any]) -> float:
    if row.get("margin") is None:
        return 0.0
    value = row["margin"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _RowError(f"margin must be a finite number, got {value!r}")
    return float(value)


def _text(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise _RowError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


# (prompt, (chosen response, rejected response), parted before the final turn)
_Split = tuple[tuple[Message, ...], tuple[str, ...], bool]


def _hh(row: Mapping[str, Any], fmt: TextFormat) -> _Split:
    conversations = []
    for key in ("chosen", "rejected"):
        try:
            messages = parse_transcript(_text(row, key), fmt)
        except FormattingError as e:
            raise _RowError(f"{key!r} is not a transcript: {e}") from None
        if messages[-1].role != "assistant":
            raise _RowError(f"{key!r} does not end with an assistant turn")
        conversations.append(messages)
    chosen, rejected = conversations
    return _split_conversations(chosen, rejected, fmt)


def _split_conversations(chosen: list[Message], rejected: list[Message], fmt: TextFormat) -> _Split:
    """Prompt and responses of two conversations that both end with an assistant turn.

    TRL's ``extract_prompt`` on messages takes the longest common prefix as the prompt. A
    response here starts with an assistant turn (the renderer writes the assistant prefix
    before it), so the cut goes back to the last shared turn after which both conversations
    continue with an assistant turn; the turns after the cut become the response's text, each
    with its role prefix, so that rendering gives back the original conversation exactly.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1  # the longest common prefix, in turns
    cut = min(shared, len(chosen) - 1, len(rejected) - 1)
    while cut >= 0 and not (chosen[cut].role == rejected[cut].role == "assistant"):
        cut -= 1
    parted = cut != len(chosen) - 1 or cut != len(rejected) - 1
    if cut < 0 or (parted and cut == 0):
        raise _RowError(
            "chosen and rejected differ from their first turn; a pair must share its prompt "
            "(at least the opening turn) and differ in the responses after it"
        )
    responses = (_tail(chosen[cut:], fmt), _tail(rejected[cut:], fmt))
    return tuple(chosen[:cut]), responses, parted


def _tail(turns: list[Message], fmt: TextFormat) -> str:
    """Turns from an assistant turn on, as the text that follows its assistant prefix."""
    return turns[0].content + "".join(fmt.prefix(t.role) + t.content for t in turns[1:])


def _messages(value: Any, key: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _RowError(f"{key!r} must be a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise _RowError(f"{key}[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise _RowError(
                f"{key}[{i}] needs role system/user/assistant and string content, got role {role!r}"
            )
        out.append(Message(role=role, content=content))
    return out


def _prompt(row: Mapping[str, Any]) -> list[Message]:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return [Message("user", prompt)]
    return _messages(prompt, "prompt")


def _response(value: Any, key: str) -> tuple[list[Message], str]:
    """A response given as a string, or as messages whose last one is the assistant's."""
    if isinstance(value, str):
        return [], value
    if not isinstance(value, list):
        raise _RowError(
            f"{key!r} must be a string or a list of messages, got {type(value).__name__}"
        )
    messages = _messages(value, key)
    if messages[-1].role != "assistant":
        raise _RowError(f"the last message of {key!r} must have role 'assistant'")
    return messages[:-1], messages[-1].content


def _paired(row: Mapping[str, Any]) -> tuple[tuple[Message, ...], tuple[str, ...]]:
    # Unlike HH transcripts, message lists that part early stay malformed: a response is one
    # string, and writing later turns into it would need the text format of the bundle
    # (a chat template renders them differently from HH prefixes).
    prompt = _prompt(row) if "prompt" in row else []
    chosen_head, chosen = _response(row.get("chosen"), "chosen")
    rejected_head, rejected = _response(row.get("rejected"), "rejected")
    if chosen_head != rejected_head:
        raise _RowError(
            "the messages of chosen and rejected before their final assistant turn differ; "
            "they must share the conversation"
        )
    full = [*prompt, *chosen_head]
    if not full:
        raise _RowError("the row has no prompt (no 'prompt' key and no earlier messages)")
    return tuple(full), (chosen, rejected)


def _ranked(row: Mapping[str, Any]) -> tuple[tuple[Message, ...], tuple[str, ...]]:
    if "prompt" not in row:
        raise _RowError("a ranked row needs a 'prompt'")
    prompt = _prompt(row)
    raw = row.get("responses")
    if not isinstance(raw, list) or len(raw) < 2:
        raise _RowError("'responses' must be a list of at least two responses")
    responses = []
    for i, value in enumerate(raw):
        head, text = _response(value, f"responses[{i}]")
        if head:
            raise _RowError(f"responses[{i}] must be one response, not a conversation")
        responses.append(text)
    ranks = row.get("ranks")
    if ranks is not None:
        if not isinstance(ranks, list) or len(ranks) != len(responses):
            raise _RowError(
                f"'ranks' must be a list with one number per response ({len(responses)})"
            )
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ranks):
            raise _RowError("'ranks' must hold numbers (lower is better)")
        if len(set(ranks)) != len(ranks):
            raise _RowError("'ranks' must be distinct: a tie is not a preference")
        responses = [text for _, text in sorted(zip(ranks, responses, strict=True))]
    return tuple(prompt), tuple(responses)
