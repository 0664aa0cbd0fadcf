"""Peak memory and wall time of ``rmserve export`` with default flags, at a real size (issue 25).

``build``: a Qwen2-shaped reward model (sequence classifier, one label) of 547.6M parameters,
2.04 GiB in fp32: 28 layers, hidden 1024, 16 heads with 8 key/value heads, MLP 5152, 4096
positions, random weights from its config, saved in **fp32** by ``save_pretrained``. Its
tokenizer is tests/model_zoo.py's ``chatml`` family (Qwen2.5's byte-level BPE pipeline,
control tokens and ChatML template) trained by the ``tokenizers`` library on the shared
HH-harmless transcripts to one of two sizes, and the model's vocabulary is the tokenizer's:

``16k``  16,000 ids: 18 tokens for the export's check sentence ("The quick brown fox..."),
         as a real vocabulary gives; the longest synthetic check row is 672 tokens.
``400``  400 ids, mostly single bytes: 39 tokens for that sentence, and the longest check row
         becomes 1,440 tokens (the small vocabulary leaves 531.8M parameters).

Nothing is downloaded: the tokenizer is trained on ../shared/data/hh-harmless/train.jsonl.gz,
and the module imports tests.model_zoo, so run it from the repository root. ``--layers`` and
the other shape options shrink the model (the tests build a tiny one).

``run``: ``rmserve export CHECKPOINT --out BUNDLE`` with default flags under GNU time
(``/usr/bin/time -v``; where it is missing: ``apt-get install -y time``), ``--repeat`` times.
Each run records the peak resident memory (GiB, and as a multiple of the checkpoint's fp32
weight bytes), the wall and CPU time, the time from each progress line of the export to the
next (parsed from stderr), the exit status or signal, and the load average and available
memory at its start; the runs are merged into ``RESULT_DIR/export_memory.json`` under the
tokenizer and ``--label``. ``--cwd`` runs the export of another checkout (``python -m
rmserve.cli`` run there imports that checkout's package first), with ``--rmserve-python``'s
interpreter: a clone of the old code gives the "before" of a before/after comparison.

    python -m benchmarks.export_memory build --out /tmp/export_models/16k --tokenizer 16k
    python -m benchmarks.export_memory run --checkpoint /tmp/export_models/16k \\
        --out benchmarks/results/cpu --label after
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "SHAPE_547M",
    "TOKENIZER_SIZES",
    "Step",
    "TimeReport",
    "build",
    "main",
    "parse_gnu_time",
    "parse_steps",
    "record",
    "run_export",
    "tokenizer_name",
    "weight_count",
]

SHAPE_547M: dict[str, int] = {
    "hidden_size": 1024,
    "intermediate_size": 5152,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
}
# Vocabulary sizes, control tokens and tool tags included.
TOKENIZER_SIZES: dict[str, int] = {"16k": 16_000, "400": 400}
GNU_TIME = "/usr/bin/time"
RESULTS_NAME = "export_memory.json"
GIB = 2**30


# --------------------------------------------------------------------------- build


def build(
    out: Path,
    tokenizer: str,
    *,
    shape: dict[str, int] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the checkpoint into ``out`` (created if needed); returns what was built.
    ``shape`` overrides entries of :data:`SHAPE_547M` (``Qwen2Config`` field names)."""
    import torch

    from tests.model_zoo import chatml_config, hh_texts, reward_classifier, save_chatml_tokenizer

    if tokenizer not in TOKENIZER_SIZES:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {[*TOKENIZER_SIZES]}")
    dims = {**SHAPE_547M, **(shape or {})}
    out = Path(out)
    saved = save_chatml_tokenizer(
        out,
        vocab_size=TOKENIZER_SIZES[tokenizer],
        texts=hh_texts(limit=1_000_000),  # every row of the shared train file
        model_max_length=dims["max_position_embeddings"],
    )
    config = chatml_config(saved, **dims)
    torch.manual_seed(seed)
    model = reward_classifier(config)  # Qwen2ForSequenceClassification, one label
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)  # fp32, as built
    del model
    return {
        "checkpoint": str(out),
        "tokenizer": tokenizer,
        "vocab_size": len(saved),
        "shape": dims,
        "parameters": parameters,
        "fp32_bytes": 4 * parameters,
        "saved_dtype": "float32",
    }


def weight_count(checkpoint: Path) -> int:
    """Parameters in the checkpoint's safetensors files, read from their headers alone."""
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {checkpoint}; build it first")
    total = 0
    for path in files:
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count
    return total


def tokenizer_name(checkpoint: Path) -> str:
    """``16k`` or ``400`` when the checkpoint's vocabulary is one of build's, else ``vocabN``."""
    vocab = int(json.loads((Path(checkpoint) / "config.json").read_text())["vocab_size"])
    names = {size: name for name, size in TOKENIZER_SIZES.items()}
    return names.get(vocab, f"vocab{vocab}")


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class TimeReport:
    """What GNU ``time -v`` reports about the export process."""

    max_rss_kib: int
    exit_status: int | None  # None when a signal ended it
    signal: int | None
    user_s: float
    system_s: float


def parse_gnu_time(text: str) -> TimeReport:
    """Read ``/usr/bin/time -v``'s report (the file ``-o`` writes)."""

    def field(name: str) -> str | None:
        found = re.search(rf"^\s*{re.escape(name)}: (.+)$", text, re.MULTILINE)
        return found.group(1).strip() if found else None

    rss = field("Maximum resident set size (kbytes)")
    if rss is None:
        raise ValueError(f"no 'Maximum resident set size' in GNU time's report: {text[:300]!r}")
    signal = re.search(r"Command terminated by signal (\d+)", text)
    status = field("Exit status")
    return TimeReport(
        max_rss_kib=int(rss),
        exit_status=None if signal or status is None else int(status),
        signal=int(signal.group(1)) if signal else None,
        user_s=float(field("User time (seconds)") or 0.0),
        system_s=float(field("System time (seconds)") or 0.0),
    )


@dataclass(frozen=True)
class Step:
    """One progress line: ``at_s`` after the export began, lasting ``seconds`` until the next
    line (None for the last); ``name`` is a short label of the work that follows it."""

    at_s: float
    seconds: float | None
    name: str
    message: str


_PROGRESS = re.compile(r"^rmserve export: \[\s*(\d+(?:\.\d+)?) s\] (.*)$")
# What follows each progress line until the next one, by the line's wording (HEAD of issue 25).
_STEP_NAMES: tuple[tuple[str, str], ...] = (
    (r"^loading ", "load"),
    (r" parameters, ", "tokenizer and plan"),
    (r"^tracing the model", "trace"),
    (r"^fused for ", "fuse"),
    (r"^(\w+) parity: torch against onnxruntime", r"\1 check"),
    (r"^text-path parity", "text-path check"),
    (r"^evaluating on ", "evaluate"),
    (r"^(\w+) variant: converting", r"\1 variant"),
    (r"^no packed graph", "no packed graph"),
    (r"^packed graph \(items sharing", "packed trace"),
    (r"^packed graph reads ", "packed check"),
    (r"^(\w+) packed graph: max ", r"after \1 packed check"),
    (r"^hashing ", "hash and manifest"),
    (r"^bundle written", "done"),
)


def _step_name(message: str) -> str:
    for pattern, name in _STEP_NAMES:
        found = re.search(pattern, message)
        if found:
            return found.expand(name)
    return re.split(r"[:(\[]", message, maxsplit=1)[0].strip()[:40]


def parse_steps(stderr: str) -> list[Step]:
    """The export's progress lines (``rmserve export: [  12.3 s] message``), in order."""
    marks: list[tuple[float, str]] = []
    for line in stderr.splitlines():
        found = _PROGRESS.match(line.strip())
        if found:
            marks.append((float(found.group(1)), found.group(2)))
    steps = []
    for i, (at, message) in enumerate(marks):
        until = marks[i + 1][0] if i + 1 < len(marks) else None
        seconds = None if until is None else round(until - at, 1)
        steps.append(Step(at, seconds, _step_name(message), message))
    return steps


def _summary_line(stdout: str) -> dict[str, Any] | None:
    """The export's final JSON line on stdout, if it printed one."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                return parsed
    return None


# --------------------------------------------------------------------------- run


def _available_gib() -> float | None:
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.MULTILINE)
    return round(int(found.group(1)) / 2**20, 2) if found else None


def _code_of(cwd: Path, python: str) -> dict[str, Any]:
    """Which rmserve the export imports from ``cwd``, and that checkout's commit."""
    imported = subprocess.run(
        [python, "-c", "import rmserve; print(rmserve.__file__)"],
        cwd=cwd, capture_output=True, text=True, check=False,
    )  # fmt: skip
    commit = subprocess.run(
        ["git", "-C", str(cwd), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    dirty = subprocess.run(
        ["git", "-C", str(cwd), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return {
        "cwd": str(cwd),
        "rmserve_imported_from": imported.stdout.strip() or imported.stderr.strip()[-300:],
        "commit": commit.stdout.strip() or None,
        "uncommitted_changes": bool(dirty.stdout.strip()) if commit.returncode == 0 else None,
    }


def run_export(
    checkpoint: Path,
    bundle: Path,
    *,
    python: str = sys.executable,
    cwd: Path | None = None,
    export_args: list[str] | None = None,
    time_binary: str = GNU_TIME,
) -> dict[str, Any]:
    """One ``rmserve export`` under GNU time; the record of what it took."""
    if not Path(time_binary).is_file():
        raise FileNotFoundError(
            f"{time_binary} is missing: install GNU time (apt-get install -y time)"
        )
    cwd = Path(cwd or Path.cwd()).resolve()
    command = [python, "-m", "rmserve.cli", "export", str(checkpoint), "--out", str(bundle),
               *(export_args or [])]  # fmt: skip
    parameters = weight_count(checkpoint)
    load = os.getloadavg()
    available = _available_gib()
    started_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory() as scratch:
        report_file = Path(scratch) / "time.txt"
        started = time.perf_counter()
        done = subprocess.run(
            [time_binary, "-v", "-o", str(report_file), *command],
            cwd=cwd, capture_output=True, text=True, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - started
        report = parse_gnu_time(report_file.read_text())
    summary = _summary_line(done.stdout)
    peak_gib = report.max_rss_kib * 1024 / GIB
    return {
        "started_utc": started_utc,
        "command": shlex.join(command),
        "load_average_at_start": [round(x, 2) for x in load],
        "available_gib_at_start": available,
        "parameters": parameters,
        "fp32_weight_gib": round(4 * parameters / GIB, 3),
        "exit_status": report.exit_status,
        "signal": report.signal,
        "bundle_written": report.exit_status == 0 and (Path(bundle) / "rmserve.json").is_file(),
        "wall_s": round(wall, 1),
        "user_s": report.user_s,
        "system_s": report.system_s,
        "peak_rss_kib": report.max_rss_kib,
        "peak_rss_gib": round(peak_gib, 2),
        "peak_rss_x_fp32_weights": round(report.max_rss_kib * 1024 / (4 * parameters), 2),
        "peak_rss_mib_reported": None if summary is None else summary.get("peak_rss_mib"),
        "max_length": None if summary is None else summary.get("max_length"),
        "steps": [asdict(s) for s in parse_steps(done.stderr)],
        "stderr_tail": None if report.exit_status == 0 else done.stderr[-2000:],
    }


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["exit_status"] == 0]
    if not ok:
        return {"runs_ok": 0, "runs": len(runs)}
    return {
        "runs_ok": len(ok),
        "runs": len(runs),
        "median_wall_s": round(statistics.median(r["wall_s"] for r in ok), 1),
        "max_peak_rss_gib": max(r["peak_rss_gib"] for r in ok),
        "max_peak_rss_x_fp32_weights": max(r["peak_rss_x_fp32_weights"] for r in ok),
    }


def record(
    results_dir: Path,
    checkpoint: Path,
    label: str,
    *,
    repeat: int = 1,
    python: str = sys.executable,
    cwd: Path | None = None,
    export_args: list[str] | None = None,
    bundle: Path | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """Run the export ``repeat`` times and merge the runs into ``results_dir``'s JSON under
    the checkpoint's tokenizer and ``label``; returns that entry. ``bundle`` keeps the last
    bundle there; by default each goes to a temporary folder that is then removed."""
    checkpoint = Path(checkpoint).resolve()
    cwd = Path(cwd or Path.cwd()).resolve()
    runs = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="export_memory.", dir=checkpoint.parent) as tmp:
            out = Path(bundle).resolve() if bundle else Path(tmp) / "bundle"
            run = run_export(checkpoint, out, python=python, cwd=cwd, export_args=export_args)
        runs.append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "steps"}), flush=True)
    entry = {
        "checkpoint": str(checkpoint),
        "export_args": export_args or [],
        "code": _code_of(cwd, python),
        "note": note,
        **_aggregate(runs),
        "repeats": runs,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / RESULTS_NAME
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "memory_gib": _total_gib()}  # fmt: skip
    results.setdefault("results", {}).setdefault(tokenizer_name(checkpoint), {})[label] = entry
    path.write_text(json.dumps(results, indent=2) + "\n")
    return entry


def _total_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
    return round(pages * size / GIB, 1)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.export_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the 547M-parameter Qwen2-shaped checkpoint")
    b.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    b.add_argument("--tokenizer", choices=[*TOKENIZER_SIZES], required=True,
                   help="vocabulary size of the trained BPE tokenizer")  # fmt: skip
    for flag, key in (("--layers", "num_hidden_layers"), ("--hidden", "hidden_size"),
                      ("--intermediate", "intermediate_size"), ("--heads", "num_attention_heads"),
                      ("--kv-heads", "num_key_value_heads"),
                      ("--positions", "max_position_embeddings")):  # fmt: skip
        b.add_argument(flag, type=int, dest=key, default=None,
                       help=f"override {key} (default {SHAPE_547M[key]})")  # fmt: skip
    r = sub.add_parser("run", help="measure `rmserve export CHECKPOINT` with default flags")
    r.add_argument("--checkpoint", type=Path, required=True, help="a folder build wrote")
    r.add_argument("--out", type=Path, required=True, help=f"folder of {RESULTS_NAME}")
    r.add_argument("--label", default="current", help="name of this code in the results")
    r.add_argument("--repeat", type=int, default=1, help="exports to run")
    r.add_argument("--rmserve-python", default=sys.executable, help="interpreter of the export")
    r.add_argument("--cwd", type=Path, default=None,
                   help="checkout whose rmserve package exports (default: this one)")  # fmt: skip
    r.add_argument("--export-args", default="",
                   help="extra export flags, as in --export-args=--no-packed")  # fmt: skip
    r.add_argument("--bundle", type=Path, default=None, help="keep the last bundle here")
    r.add_argument("--note", default=None, help="a remark stored with the runs")
    args = parser.parse_args(argv)
    if args.command == "build":
        shape = {k: getattr(args, k) for k in SHAPE_547M if getattr(args, k) is not None}
        print(json.dumps(build(args.out, args.tokenizer, shape=shape)), flush=True)
        return 0
    if shutil.which(GNU_TIME) is None:
        print(f"{GNU_TIME} is missing: apt-get install -y time", file=sys.stderr)
        return 2
    entry = record(
        args.out, args.checkpoint, args.label, repeat=args.repeat, python=args.rmserve_python,
        cwd=args.cwd, export_args=shlex.split(args.export_args), bundle=args.bundle,
        note=args.note,
    )  # fmt: skip
    print(json.dumps({k: v for k, v in entry.items() if k != "repeats"}), flush=True)
    return 0 if entry["runs_ok"] == entry["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
