"""Best-of-n sampling with an rmserve reward server.

Start a server first (``rmserve serve BUNDLE``), then one of:

    # Real preference pairs: does the reward model pick the response people preferred?
    python examples/best_of_n.py --url http://127.0.0.1:8000 --limit 20

    # Your own candidates for one prompt
    python examples/best_of_n.py --url http://127.0.0.1:8000 \\
        --prompt "How do I keep basil alive?" --candidate "Water it." --candidate "Ignore it."

    # Sample n candidates from an OpenAI-compatible server (vLLM, TGI, ...) and keep the best
    python examples/best_of_n.py --url http://127.0.0.1:8000 --prompt "Write a haiku" \\
        --generator-url http://127.0.0.1:8001 --generator-model my-policy --n 8

Needs only the base install (httpx): ``pip install rmserve``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from rmserve.client import BestOfN, RewardClient, RewardServerError, best_of_n
from rmserve.formatting import parse_transcript

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/hh-harmless/dev.jsonl.gz"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pick the best of n candidate responses with an rmserve reward server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="rmserve server URL")
    parser.add_argument(
        "--api-key", default=None, help="API key of the server (default: $RMSERVE_API_KEY)"
    )
    parser.add_argument("--prompt", default=None, help="one prompt to answer (user turn)")
    parser.add_argument(
        "--candidate",
        action="append",
        default=[],
        help="a candidate response for --prompt; repeat for each candidate",
    )
    parser.add_argument(
        "--generator-url",
        default=None,
        help="OpenAI-compatible server to sample candidates from (/v1/chat/completions)",
    )
    parser.add_argument("--generator-model", default=None, help="model name on that server")
    parser.add_argument("--n", type=int, default=4, help="candidates to sample per prompt")
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="HH-format preference pairs (JSONL, .gz ok) for the demo without --prompt",
    )
    parser.add_argument("--limit", type=int, default=20, help="pairs to use from --data")
    return parser.parse_args(argv)


def openai_generator(url: str, model: str | None) -> Any:
    """``generate(prompt, n)`` that samples n chat completions from an OpenAI-style server."""
    http = httpx.Client(base_url=url, timeout=120.0)

    def generate(prompt: Any, n: int) -> list[str]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        body: dict[str, Any] = {"messages": messages, "n": n, "temperature": 1.0}
        if model:
            body["model"] = model
        response = http.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return [choice["message"]["content"] for choice in response.json()["choices"]]

    return generate


def show(result: BestOfN) -> None:
    for i, (candidate, score) in enumerate(zip(result.candidates, result.scores, strict=True)):
        mark = "*" if i == result.best_index else " "
        print(f" {mark} {score:+.6f}  {candidate[:100]!r}")


def demo_on_pairs(client: RewardClient, path: Path, limit: int) -> None:
    """Best-of-2 over (chosen, rejected): how often is the human-preferred response picked?"""
    if not path.is_file():
        sys.exit(f"no preference data at {path}; pass --data or --prompt")
    opener = gzip.open if path.suffix == ".gz" else open
    picked_chosen = total = 0
    with opener(path, "rt") as f:
        for line in f:
            if total >= limit:
                break
            row = json.loads(line)
            try:
                chosen = parse_transcript(row["chosen"])
                rejected = parse_transcript(row["rejected"])
            except ValueError:
                continue  # a malformed transcript
            if len(chosen) < 2 or chosen[-1].role != "assistant":
                continue
            prompt = [{"role": m.role, "content": m.content} for m in chosen[:-1]]
            candidates = [chosen[-1].content, rejected[-1].content]
            result = best_of_n(client, prompt, candidates, truncate_response=True)
            picked_chosen += result.best_index == 0
            total += 1
    print(f"picked the human-preferred response in {picked_chosen}/{total} pairs")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with RewardClient(args.url, api_key=args.api_key) as client:
            info = client.models()
            print(f"reward model {info.model_name} (max_length {info.max_length})")
            if args.prompt is None:
                demo_on_pairs(client, args.data, args.limit)
            elif args.generator_url:
                generate = openai_generator(args.generator_url, args.generator_model)
                show(best_of_n(client, args.prompt, generate=generate, n=args.n))
            elif args.candidate:
                show(best_of_n(client, args.prompt, args.candidate))
            else:
                sys.exit("--prompt needs --candidate (repeated) or --generator-url")
    except RewardServerError as e:
        print(f"reward server error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
