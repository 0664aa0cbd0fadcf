"""The run's outputs: ``results.json``, ``results.md`` (a table) and ``throughput.png``."""

from __future__ import annotations

import json
import os
import platform
import statistics
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["check_targets", "machine_info", "write_json", "write_markdown", "write_plot"]

Run = dict[str, Any]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: processor, cores, memory, library versions, load, date."""
    import psutil

    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _find(runs: list[Run], system: str, shape: str, concurrency: int | None = None) -> Run | None:
    for run in runs:
        same = run["system"] == system and run["shape"] == shape
        if same and (concurrency is None or run.get("concurrency") == concurrency):
            return run
    return None


def check_targets(runs: list[Run], side_by_side: list[Run] | None = None) -> list[dict[str, Any]]:
    """Issue 8's targets, each with the measured value, the bound and whether it was met.
    A target whose runs are missing from this run is left out. With side-by-side rounds, the
    c=64 target is the median of their ratios."""
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, bound: float, higher_is_better: bool) -> None:
        if value is None:
            return
        met = value >= bound if higher_is_better else value <= bound
        op = ">=" if higher_is_better else "<="
        targets.append(
            {"target": f"{name} {op} {bound:g}", "value": round(value, 3), "met": bool(met)}
        )

    def pps(system: str, shape: str, concurrency: int | None) -> float | None:
        run = _find(runs, system, shape, concurrency)
        return float(run["pairs_per_s"]) if run and run["pairs_per_s"] else None

    offline = pps("onnxruntime-offline", "offline", None)
    fp32_64 = pps("rmserve-fp32", "single", 64)
    rounds = [r["ratio"] for r in side_by_side or [] if r["concurrency"] == 64]
    if rounds:
        name = f"rmserve-fp32 single c=64 / onnxruntime-offline, median of {len(rounds)} rounds"
        add(name, statistics.median(rounds), 0.9, True)
    elif offline and fp32_64:
        add("rmserve-fp32 single c=64 / onnxruntime-offline", fp32_64 / offline, 0.9, True)
    naive_16 = pps("naive-torch", "single", 16)
    for system, bound in (("rmserve-fp32", 1.5), ("rmserve-int8", 3.0)):
        mine = pps(system, "single", 16)
        if mine and naive_16:
            add(f"{system} / naive-torch, single c=16", mine / naive_16, bound, True)
    for system in ("rmserve-fp32", "rmserve-int8"):
        run = _find(runs, system, "single", 16)
        if run and run.get("p50_ms") and run.get("p99_ms"):
            add(f"{system} single c=16 p99/p50", run["p99_ms"] / run["p50_ms"], 3.0, False)
    for run in runs:
        if run["system"] == "rmserve-fp32" and run.get("padding_ratio") is not None:
            where = f"rmserve-fp32 {run['shape']} c={run['concurrency']} padding ratio"
            add(where, float(run["padding_ratio"]), 1.15, False)
    return targets


def write_json(
    path: Path,
    runs: list[Run],
    machine: dict[str, Any],
    extra: dict[str, Any],
    side_by_side: list[Run] | None = None,
) -> None:
    payload = {
        "runs": runs,
        "side_by_side": side_by_side or [],
        "machine": machine,
        "targets": check_targets(runs, side_by_side),
        **extra,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_markdown(
    path: Path,
    runs: list[Run],
    machine: dict[str, Any],
    command: str,
    side_by_side: list[Run] | None = None,
) -> None:
    lines = [
        "# rmserve benchmark results",
        "",
        f"`{command}` on {machine['cpu_model']} ({machine['cores']} cores, "
        f"{machine['memory_gib']} GiB), onnxruntime {machine['onnxruntime']}, "
        f"torch {machine['torch']}, {machine['date']}; load average at start "
        f"{machine['load_average']}.",
        "",
        "| system | shape | conc. | pairs/s | p50 ms | p95 ms | p99 ms | errors "
        "| mean batch | padding ratio | server CPU cores | server CPU ms/pair | client CPU cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        batch = run.get("mean_batch_size", run.get("batch_size"))
        lines.append(
            f"| {run['system']} | {run['shape']} | {_fmt(run.get('concurrency'))} "
            f"| {_fmt(run['pairs_per_s'])} | {_fmt(run.get('p50_ms'), 0)} "
            f"| {_fmt(run.get('p95_ms'), 0)} | {_fmt(run.get('p99_ms'), 0)} "
            f"| {_fmt(run.get('errors'))} | {_fmt(batch)} | {_fmt(run.get('padding_ratio'), 3)} "
            f"| {_fmt(run.get('server_cpu_cores'), 2)} "
            f"| {_fmt(run.get('server_cpu_ms_per_pair'))} "
            f"| {_fmt(run.get('client_cpu_cores'), 2)} |"
        )
    if side_by_side:
        lines += [
            "",
            "## Side by side",
            "",
            "An offline pass and a run of rmserve-fp32 in turn, in one server's lifetime.",
            "",
            "| round | conc. | onnxruntime-offline pairs/s | rmserve-fp32 pairs/s | ratio |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in side_by_side:
            lines.append(
                f"| {r['round']} | {r['concurrency']} | {r['offline_pairs_per_s']:.1f} "
                f"| {r['rmserve_pairs_per_s']:.1f} | {r['ratio']:.3f} |"
            )
    targets = check_targets(runs, side_by_side)
    if targets:
        lines += ["", "## Targets (issue 8)", "", "| target | measured | met |", "|---|---:|---|"]
        for t in targets:
            lines.append(f"| {t['target']} | {t['value']:.3f} | {'yes' if t['met'] else 'NO'} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, runs: list[Run]) -> None:
    """Grouped bars: pairs/s per system for each (shape, concurrency); offline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    served = [r for r in runs if r["shape"] != "offline"]
    groups = sorted(
        {(r["shape"], r["concurrency"]) for r in served},
        key=lambda g: (g[0] != "single", g[0], g[1]),
    )
    systems = sorted({r["system"] for r in served})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.5))
    width = 0.8 / max(1, len(systems))
    for s_index, system in enumerate(systems):
        xs, heights = [], []
        for g_index, (shape, conc) in enumerate(groups):
            run = _find(served, system, shape, conc)
            if run is not None:
                xs.append(g_index + (s_index - (len(systems) - 1) / 2) * width)
                heights.append(run["pairs_per_s"])
        ax.bar(xs, heights, width=width, label=system)
    for run in runs:
        if run["shape"] == "offline":
            ax.axhline(run["pairs_per_s"], linestyle="--", color="black", linewidth=1)
            ax.text(-0.45, run["pairs_per_s"], f" {run['system']}", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)), [f"{shape}\nc={conc}" for shape, conc in groups])
    ax.set_ylabel("pairs / s (higher is better)")
    ax.set_title("Reward scoring throughput")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
