"""Shared-prompt reuse against whole-item scoring, side by side on this machine's CPU.

The decoder reward model of benchmarks/fusion.py (Qwen2-shaped, about 40M parameters, random
weights, the MiniLM WordPiece tokenizer) is exported once by the project's ``export_bundle``
(which writes both the plain and the packed graph and checks the packed one item by item).
Then:

1. **Server**: ``rmserve serve`` of that bundle, as a real process on loopback, with
   ``RMSERVE_PREFIX_REUSE=true`` and ``=false`` in turn (alternating rounds, so load on the
   machine hits both alike), driven by the project's load generator with requests built from
   the real HH dev data: ``group8`` (one /v1/score request = one prompt of about 600 tokens and
   8 responses of about 50) and ``single`` (one pair per request, the 8 responses of each
   prompt sent one after another by concurrent workers, so that identical prompts meet in the
   batcher). The scores of both servers are compared on the same requests.
2. **Break-even**: the runtime alone, whole items (the plain graph, padded) against the packed
   graph with the automatic sharing rule and with sharing forced, over prompt lengths, group
   sizes and response lengths, with random token ids (speed does not depend on them).

    python -m benchmarks.prefix_reuse --out benchmarks/results/cpu/prefix_reuse.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.fusion import SHAPE_40M, build_checkpoint
from benchmarks.run import REPO_ROOT, _measure
from benchmarks.servers import free_port, start_server

__all__ = ["main"]

PROMPT_TOKENS = 600
RESPONSE_TOKENS = 50
GROUP = 8
SWEEP_PROMPTS = (32, 128, 600, 1500)
SWEEP_RESPONSES = (50, 400)
SWEEP_GROUPS = (2, 8)


def _cut(tokenizer: Any, text: str, tokens: int) -> str:
    """``text`` cut to its first ``tokens`` tokens (at a token boundary)."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    if len(encoding.ids) <= tokens:
        return text
    return text[: encoding.offsets[tokens - 1][1]]


def build_groups(
    bundle: Path,
    data_dir: Path,
    groups: int,
    response_tokens: tuple[int, int] = (RESPONSE_TOKENS, RESPONSE_TOKENS),
) -> list[dict[str, Any]]:
    """``groups`` of (prompt of about PROMPT_TOKENS tokens, GROUP responses of a length drawn
    from ``response_tokens``, fixed seed), from the real dev data: each prompt joins the texts
    of consecutive dev records, each response is a dev response cut to length (or whole,
    where it is shorter)."""
    import random

    from tokenizers import Tokenizer

    from rmserve.training.data import read_examples

    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokenizer.no_truncation()  # MiniLM's tokenizer.json cuts at 128 tokens
    examples = read_examples(data_dir / "hh-harmless" / "dev.jsonl.gz").examples
    texts = ["\n".join(m.content for m in e.prompt) for e in examples]
    responses = [r for e in examples for r in e.responses]
    out: list[dict[str, Any]] = []
    cursor = 0
    rng = random.Random(0)
    for g in range(groups):
        prompt = ""
        while len(tokenizer.encode(prompt, add_special_tokens=False).ids) < PROMPT_TOKENS:
            prompt += texts[cursor % len(texts)] + "\n"
            cursor += 1
        prompt = _cut(tokenizer, prompt, PROMPT_TOKENS)
        chosen = [responses[(g * GROUP + k) % len(responses)] for k in range(GROUP)]
        cut = [_cut(tokenizer, r, rng.randint(*response_tokens)) for r in chosen]
        out.append({"prompt": prompt, "responses": cut})
    return out


# Shapes of the server part: (name, concurrency, responses' token range, request form).
SHAPES = {
    "group8": (2, (RESPONSE_TOKENS, RESPONSE_TOKENS)),
    "single": (GROUP, (RESPONSE_TOKENS, RESPONSE_TOKENS)),
    # GRPO's responses differ in length: 20 to 300 tokens (dev responses are 1 to ~400).
    "group8-varied": (2, (20, 300)),
}


def _bodies(groups: list[dict[str, Any]], shape: str) -> list[tuple[bytes, int]]:
    if shape.startswith("group8"):
        return [
            (
                json.dumps(
                    {"items": [{"prompt": g["prompt"], "response": r} for r in g["responses"]]}
                ).encode(),
                GROUP,
            )
            for g in groups
        ]
    return [
        (json.dumps({"items": [{"prompt": g["prompt"], "response": r}]}).encode(), 1)
        for g in groups
        for r in g["responses"]
    ]


def _shared_fraction(before: str | None, after: str | None) -> float | None:
    """Of the tokens scored in a window, the fraction not computed (shared prompts)."""
    from benchmarks.prometheus import parse_metrics

    if before is None or after is None:
        return None
    first, last = parse_metrics(before), parse_metrics(after)
    tokens = last.get("rmserve_tokens_total", 0.0) - first.get("rmserve_tokens_total", 0.0)
    shared = last.get("rmserve_shared_prefix_tokens_total", 0.0) - first.get(
        "rmserve_shared_prefix_tokens_total", 0.0
    )
    return round(shared / tokens, 3) if tokens else None


def serve_side_by_side(
    bundle: Path,
    groups: dict[str, list[dict[str, Any]]],
    rounds: int,
    duration: float,
    work: Path,
) -> dict[str, Any]:
    """``groups``: the workload of each shape to run (see SHAPES)."""
    plan = [(shape, SHAPES[shape][0]) for shape in groups]
    first = groups[next(iter(groups))]
    runs: list[dict[str, Any]] = []
    scores: dict[str, list[float]] = {}
    prompt = first[0]["prompt"]
    check = {"items": [{"prompt": prompt, "response": r} for r in first[0]["responses"]]}
    for round_ in range(rounds):
        for system, reuse in (("prefix-reuse", "true"), ("whole-items", "false")):
            port = free_port()
            argv = ["-m", "rmserve", "serve", str(bundle), "--port", str(port)]
            env = {"RMSERVE_PREFIX_REUSE": reuse, "RMSERVE_LOG_LEVEL": "warning"}
            with start_server(
                f"{system}-{round_}", argv, port=port, log_dir=work / "logs", env=env, cwd=REPO_ROOT
            ) as server:
                answer = httpx.post(server.base_url + "/v1/score", json=check, timeout=120).json()
                scores[system] = answer["scores"]
                for shape, concurrency in plan:
                    before = server.metrics_text()
                    run = _measure(
                        server, system, shape, concurrency, _bodies(groups[shape], shape),
                        duration, 5.0, "/v1/score",
                    )  # fmt: skip
                    run["shared_token_fraction"] = _shared_fraction(before, server.metrics_text())
                    run["round"] = round_
                    print(json.dumps(run), flush=True)
                    runs.append(run)
    summary: dict[str, Any] = {}
    for shape, _ in plan:
        rates = {
            system: statistics.median(
                r["pairs_per_s"] for r in runs if r["system"] == system and r["shape"] == shape
            )
            for system in ("prefix-reuse", "whole-items")
        }
        summary[shape] = {
            "median_pairs_per_s": rates,
            "speedup": round(rates["prefix-reuse"] / rates["whole-items"], 2),
        }
    diff = float(np.max(np.abs(np.subtract(scores["prefix-reuse"], scores["whole-items"]))))
    return {"runs": runs, "summary": summary, "max_abs_diff_reuse_vs_whole": diff}


def sweep(bundle: Path, threads: int, repeats: int) -> list[dict[str, Any]]:
    from rmserve.manifest import load_bundle
    from rmserve.service.runtime import ModelRuntime

    manifest = load_bundle(bundle)
    common: dict[str, Any] = {"provider": "cpu", "instances": 1, "intra_op_threads": threads}
    plain = ModelRuntime(bundle, manifest, prefix_reuse=False, **common)
    packed = ModelRuntime(bundle, manifest, **common)
    rng = np.random.default_rng(0)
    out: list[dict[str, Any]] = []
    for prompt_len in SWEEP_PROMPTS:
        for response_len in SWEEP_RESPONSES:
            for group in SWEEP_GROUPS:
                prompt = rng.integers(1000, 30000, prompt_len)
                responses = rng.integers(1000, 30000, (group, response_len))
                items = [np.concatenate([prompt, r]).astype(np.int64) for r in responses]
                ids = np.stack(items)
                runs: dict[str, Callable[[], Any]] = {
                    "whole": functools.partial(plain.run, ids, np.ones_like(ids)),
                    "auto": functools.partial(packed.run_sequences, items, share="auto"),
                    "always": functools.partial(packed.run_sequences, items, share="always"),
                }
                times: dict[str, list[float]] = {name: [] for name in runs}
                for fn in runs.values():
                    fn()  # warm-up
                for _ in range(repeats):
                    for name, fn in runs.items():
                        started = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - started)
                medians = {name: statistics.median(t) for name, t in times.items()}
                _, batch = packed.run_sequences(items, share="auto")
                row = {
                    "prompt_tokens": prompt_len,
                    "response_tokens": response_len,
                    "group": group,
                    "median_s": {k: round(v, 4) for k, v in medians.items()},
                    "speedup_auto": round(medians["whole"] / medians["auto"], 2),
                    "speedup_always": round(medians["whole"] / medians["always"], 2),
                    "auto_shared": batch.shared_tokens > 0,
                }
                print(json.dumps(row), flush=True)
                out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/cpu/prefix_reuse.json")
    )
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=None, help="folder for the bundle and logs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per load run")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, sweep")
    parser.add_argument("--repeats", type=int, default=3, help="sweep repeats per case")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=sorted(SHAPES),
        default=["group8", "single", "group8-varied"],
        help="server shapes to run; results of other shapes already in --out are kept",
    )
    args = parser.parse_args(argv)

    from rmserve.training.export import export_bundle

    work = args.work or Path(tempfile.mkdtemp(prefix="rmserve-prefix-"))
    bundle = work / "bundle"
    export: dict[str, Any] = {}
    if not (bundle / "rmserve.json").exists():
        checkpoint = build_checkpoint(work / "checkpoint", max_length=2048)
        started = time.perf_counter()
        manifest = export_bundle(checkpoint, bundle, progress=print)
        assert manifest.packed is not None
        export = {
            "export_s": round(time.perf_counter() - started, 1),
            "packed_max_abs_diff_vs_torch": manifest.packed.max_abs_diff,
            "bundle_mb": round(sum(p.stat().st_size for p in bundle.iterdir()) / 1e6, 1),
        }
    previous: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    command = " ".join(["python -m benchmarks.prefix_reuse", *(argv or sys.argv[1:])])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result: dict[str, Any] = {
        "command": "python -m benchmarks.prefix_reuse",
        # Every run that wrote into this file, oldest first (a run may redo only some parts).
        "commands": [*previous.get("commands", []), f"{when}: {command}"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": {"shape": SHAPE_40M, "vocab_size": 32000, "params_about_m": 39},
        "export": export,
        "workload": {
            "prompt_tokens": PROMPT_TOKENS,
            "response_tokens": RESPONSE_TOKENS,
            "group": GROUP,
        },
    }
    result["export"] = export or previous.get("export", {})
    if not args.skip_server:
        groups = {
            shape: build_groups(bundle, args.data_dir, 24, SHAPES[shape][1])
            for shape in args.shapes
        }
        server = serve_side_by_side(bundle, groups, args.rounds, args.duration, work)
        kept = previous.get("server", {})
        server["runs"] = [
            *[r for r in kept.get("runs", []) if r["shape"] not in groups],
            *server["runs"],
        ]
        server["summary"] = {
            **{k: v for k, v in kept.get("summary", {}).items() if k not in groups},
            **server["summary"],
        }
        result["server"] = server
    elif "server" in previous:
        result["server"] = previous["server"]
    if not args.skip_sweep:
        result["break_even"] = sweep(bundle, args.threads, args.repeats)
    elif "break_even" in previous:
        result["break_even"] = previous["break_even"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("server", {}).get("summary"), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
