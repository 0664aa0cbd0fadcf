"""Merge the results of several harness runs (the GPU phases) into one results folder.

    python -m benchmarks.merge --out benchmarks/results/gpu DIR [DIR ...]

Each DIR holds a ``results.json`` and, from the GPU phases, ``limit.json`` (the pure-torch
ceiling) and ``parity.json`` (fp16 against fp32). The merged ``results.md`` adds how far each
served and offline system is from the ceiling, in tokens/s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks import report

__all__ = ["main", "merge"]


def _ceiling_lines(
    runs: list[dict[str, Any]], limit: dict[str, Any], mean_tokens: float
) -> list[str]:
    lines = [
        "",
        "## Against the GPU's ceiling",
        "",
        f"Ceiling: the model's forward alone in pure torch at {limit['tokens_per_sequence']} "
        "tokens per sequence (CUDA events, best batch):",
        "",
        "| dtype | best batch | tokens/s | pairs/s |",
        "|---|---:|---:|---:|",
    ]
    for key, best in sorted(limit.items()):
        if key.startswith("best_"):
            lines.append(
                f"| {best['dtype']} | {best['batch']} | {best['tokens_per_s']:,} "
                f"| {best['pairs_per_s']:,} |"
            )
    ceiling = limit.get("best_fp16") or limit.get("best_bf16")
    if ceiling:
        lines += [
            "",
            f"Each system's tokens/s (pairs/s x {mean_tokens:.0f} mean tokens per pair) as a "
            f"share of the fp16 ceiling ({ceiling['tokens_per_s']:,} tokens/s):",
            "",
            "| system | shape | conc. | tokens/s | share of ceiling |",
            "|---|---|---:|---:|---:|",
        ]
        for run in runs:
            tokens = run["pairs_per_s"] * mean_tokens
            lines.append(
                f"| {run['system']} | {run['shape']} | {run.get('concurrency') or '–'} "
                f"| {tokens:,.0f} | {tokens / ceiling['tokens_per_s']:.1%} |"
            )
    return lines


def merge(out: Path, sources: list[Path]) -> None:
    runs: list[dict[str, Any]] = []
    machine: dict[str, Any] = {}
    configs: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    for source in sources:
        data = json.loads((source / "results.json").read_text())
        runs += data["runs"]
        machine = machine or data["machine"]
        configs.append(data.get("config", {}))
        for name in ("limit", "parity"):
            path = source / f"{name}.json"
            if path.is_file():
                extra[name] = json.loads(path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    commands = " && ".join(c.get("command", "") for c in configs)
    report.write_json(out / "results.json", runs, machine, {"configs": configs, **extra})
    report.write_markdown(out / "results.md", runs, machine, commands)
    mean_tokens = float(next((c["mean_tokens"] for c in configs if "mean_tokens" in c), 0.0))
    lines: list[str] = []
    if "parity" in extra:
        p = extra["parity"]
        lines += [
            "",
            f"fp16 parity against fp32 on CUDA ({p['pairs']} HH dev pairs): max |diff| "
            f"{p['max_abs_diff']:.2e} (reward std {p['reward_std_fp32']:.2e}), pairwise "
            f"agreement {p['pairwise_agreement']:.1%}.",
        ]
    if "limit" in extra and mean_tokens:
        lines += _ceiling_lines(runs, extra["limit"], mean_tokens)
    with open(out / "results.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    report.write_plot(out / "throughput.png", runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.merge", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged results")
    parser.add_argument("sources", type=Path, nargs="+", help="result folders to merge")
    args = parser.parse_args(argv)
    merge(args.out, args.sources)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
