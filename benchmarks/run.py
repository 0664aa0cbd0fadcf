"""Run the benchmark: every system under the same load, then write the results.

    python -m benchmarks.run [--quick] [--bundle DIR] [--checkpoint DIR] --out DIR

Systems (names as in the results): ``rmserve-fp32``, ``rmserve-int8`` (the bundle's int8
variant), ``naive-torch`` (benchmarks/naive_torch_server.py) and ``onnxruntime-offline`` (no
server: the ceiling). Shapes: ``single`` (one pair per request) at each ``--concurrency``, and
``grpo8`` (one prompt, 8 responses per request) at each ``--grpo-concurrency``.
docs/performance.md says how to read the output.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.loadgen import LoadResult, percentile, run_load
from benchmarks.offline import Offline, run_offline
from benchmarks.prometheus import batch_stats
from benchmarks.servers import ServerProcess, free_port, start_server
from benchmarks.workload import SHAPES, Workload, build_workload, default_data_dir
from rmserve.formatting import RenderedText
from rmserve.service.runtime import choose_instances

__all__ = ["SYSTEMS", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = (
    "rmserve-fp32",
    "rmserve-int8",
    "rmserve-fp16",
    "naive-torch",
    "onnxruntime-offline",
    "onnxruntime-offline-fp16",
)
# int8 runs on CPU only, fp16 on CUDA only (rmserve.service.runtime).
CPU_SYSTEMS = ["rmserve-fp32", "rmserve-int8", "naive-torch", "onnxruntime-offline"]
GPU_SYSTEMS = [
    "rmserve-fp16",
    "rmserve-fp32",
    "naive-torch",
    "onnxruntime-offline",
    "onnxruntime-offline-fp16",
]
DEFAULT_BUNDLE = REPO_ROOT / "artifacts" / "bundle"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(allowed: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}"
            )
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Throughput and latency of rmserve next to naive-torch and onnxruntime-offline",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for results.json/.md/.png")
    p.add_argument(
        "--quick", action="store_true", help="short runs on fewer pairs (under 3 minutes)"
    )
    p.add_argument(
        "--bundle", type=Path, default=None, help=f"bundle to serve (default {DEFAULT_BUNDLE})"
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="transformers checkpoint for naive-torch (default: the one the bundle records)",
    )
    p.add_argument("--data", type=Path, default=None, help="hh-harmless folder (../shared/data)")
    p.add_argument(
        "--systems",
        type=_name_list(SYSTEMS),
        default=None,
        help=f"comma-separated (default on cpu: {','.join(CPU_SYSTEMS)}; on cuda: "
        f"{','.join(GPU_SYSTEMS)})",
    )
    p.add_argument("--shapes", type=_name_list(SHAPES), default=list(SHAPES), help="single,grpo8")
    p.add_argument(
        "--concurrency", type=_int_list, default=[1, 16, 64], help="single's concurrencies"
    )
    p.add_argument(
        "--grpo-concurrency",
        type=_int_list,
        default=None,
        help="grpo8's concurrencies (default 4 on cpu: 32 pairs in flight; 64 on cuda)",
    )
    p.add_argument("--duration", type=float, default=None, help="seconds per measured run")
    p.add_argument("--warmup", type=float, default=None, help="seconds of load before each run")
    p.add_argument("--limit", type=int, default=None, help="use at most this many pairs")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="cores every system may use: rmserve's instances x intra-op threads (as its auto "
        "setting splits them), torch's threads, the offline sessions' threads",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="side-by-side rounds of onnxruntime-offline and rmserve-fp32 at the highest single "
        "concurrency, alternating in the rmserve-fp32 server's lifetime; the c=64 target uses "
        "the median of their ratios (default 3 on cpu; 0 with --quick or on cuda)",
    )
    p.add_argument(
        "--rmserve-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the rmserve servers, e.g. RMSERVE_MAX_WAIT_MS=5",
    )
    p.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator's HTTP client: raw (light, keep-alive HTTP/1.1) or httpx",
    )
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU runs")
    p.add_argument(
        "--torch-dtype",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="naive-torch weights' dtype (default fp32 on cpu, bf16 on cuda)",
    )
    p.add_argument(
        "--gpu-precision",
        default="fp16",
        help="bundle variant for rmserve-<precision> on cuda (fp16 or fp32)",
    )
    return p


def _resolve_checkpoint(args: argparse.Namespace, bundle: Path) -> Path | None:
    """--checkpoint, else ``checkpoint/`` beside the bundle (where scripts/main.sh trains the
    default bundle's model: artifacts/checkpoint next to artifacts/bundle)."""
    if args.checkpoint is not None:
        return Path(args.checkpoint)
    beside = bundle.parent / "checkpoint"
    return beside if (beside / "config.json").is_file() else None


def _measure(
    server: ServerProcess,
    system: str,
    shape: str,
    concurrency: int,
    bodies: list[tuple[bytes, int]],
    duration: float,
    warmup: float,
    path: str,
    client: str = "raw",
) -> dict[str, Any]:
    url = server.base_url + path
    edges: dict[str, Any] = {}

    # naive-torch has no /metrics, and asking its blocked event loop would only wait.
    has_metrics = system.startswith("rmserve")

    def window_start() -> None:
        edges["cpu"] = server.cpu_seconds()
        edges["metrics"] = server.metrics_text() if has_metrics else None

    def window_end() -> None:
        edges["cpu"] = server.cpu_seconds() - edges["cpu"]
        edges["metrics_after"] = server.metrics_text() if has_metrics else None

    result: LoadResult = run_load(
        url, bodies, concurrency, duration, warmup_s=warmup, on_start=window_start,
        on_end=window_end, client=client,
    )  # fmt: skip
    before, after, server_cpu = edges["metrics"], edges["metrics_after"], edges["cpu"]
    lat = result.latencies_ms
    run: dict[str, Any] = {
        "system": system,
        "shape": shape,
        "concurrency": concurrency,
        "pairs_per_s": round(result.pairs_per_s, 2),
        "p50_ms": _round(percentile(lat, 50)),
        "p95_ms": _round(percentile(lat, 95)),
        "p99_ms": _round(percentile(lat, 99)),
        "errors": result.errors,
        "warmup_errors": result.warmup_errors,
        "requests": result.requests,
        "pairs": result.pairs,
        "duration_s": round(result.elapsed_s, 2),
        "server_cpu_cores": round(server_cpu / result.elapsed_s, 2) if result.elapsed_s else None,
        # CPU per pair moves less than pairs/s when other processes share the cores.
        "server_cpu_ms_per_pair": round(1000 * server_cpu / result.pairs, 1)
        if result.pairs
        else None,
        "client_cpu_cores": round(result.client_cpu_s / result.elapsed_s, 2)
        if result.elapsed_s
        else None,
    }
    if before is not None and after is not None:
        stats = batch_stats(before, after)
        run["mean_batch_size"] = _round(stats["mean_batch_size"], 2)
        run["mean_batch_tokens"] = _round(stats["mean_batch_tokens"], 1)
        run["padding_ratio"] = _round(stats["padding_ratio"], 3)
        run["batches"] = stats["batches"]
    if result.error_samples:
        run["error_samples"] = result.error_samples
    return run


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _server_argv(
    system: str, args: argparse.Namespace, bundle: Path, checkpoint: Path | None, port: int
) -> tuple[list[str], dict[str, str]]:
    if system.startswith("rmserve-"):
        precision = system.removeprefix("rmserve-")
        env = {"RMSERVE_PRECISION": precision}
        if args.device == "cpu":
            # The server's own auto layout for a machine of ``--threads`` cores.
            instances, threads = choose_instances(0, 0, "cpu", args.threads)
            env["RMSERVE_MODEL_INSTANCES"] = str(instances)
            env["RMSERVE_INTRA_OP_THREADS"] = str(threads)
        else:
            env["RMSERVE_PROVIDER"] = "cuda"
            env["RMSERVE_INTRA_OP_THREADS"] = str(args.threads)
        for pair in args.rmserve_env:
            key, _, value = pair.partition("=")
            env[key] = value
        argv = ["-m", "rmserve", "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
        return argv, env
    if checkpoint is None:
        raise SystemExit(
            f"naive-torch needs the transformers checkpoint the bundle was exported from, and "
            f"there is none at {bundle.parent / 'checkpoint'}; pass --checkpoint DIR or leave "
            "naive-torch out with --systems"
        )
    dtype = args.torch_dtype or ("fp32" if args.device == "cpu" else "bf16")
    argv = [
        "-m", "benchmarks.naive_torch_server", "--checkpoint", str(checkpoint),
        "--bundle", str(bundle), "--port", str(port), "--threads", str(args.threads),
        "--dtype", dtype, "--device", args.device,
    ]  # fmt: skip
    # libgomp's threads spin-wait between parallel regions; when anything else needs the cores
    # (here the client, or a teammate's job) a forward took 200-490 ms instead of 45. PASSIVE
    # keeps the baseline from being crippled by that; on an idle machine it changes little.
    return argv, {"OMP_WAIT_POLICY": "PASSIVE"}


# Pairs in each side-by-side offline pass: about 20 s on 2 cores, as long as the server's run.
PAIRED_OFFLINE_PAIRS = 1500


@dataclass
class Paired:
    """What the side-by-side rounds need: the offline setup and the pairs it times."""

    offline: Offline
    rendered: list[RenderedText]
    rounds: int
    results: list[dict[str, Any]] = field(default_factory=list)


def _run_servers(
    args: argparse.Namespace,
    bundle: Path,
    checkpoint: Path | None,
    workload: Workload,
    duration: float,
    warmup: float,
    paired: Paired | None = None,
) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    bodies = {
        shape: [(r.body(), len(r.items)) for r in workload.requests(shape)] for shape in args.shapes
    }
    manifest = json.loads((bundle / "rmserve.json").read_text())
    plan = [("single", c) for c in args.concurrency if "single" in args.shapes]
    plan += [("grpo8", c) for c in args.grpo_concurrency if "grpo8" in args.shapes]
    for system in args.systems:
        if system.startswith("onnxruntime-offline"):
            continue
        precision = system.removeprefix("rmserve-")
        if system.startswith("rmserve-") and precision not in manifest.get("variants", {}):
            _log(f"skipping {system}: the bundle has no {precision} variant")
            continue
        port = free_port()
        argv, env = _server_argv(system, args, bundle, checkpoint, port)
        _log(f"starting {system} on port {port}")
        with start_server(
            system, argv, port=port, log_dir=args.out / "logs", env=env, cwd=REPO_ROOT
        ) as server:
            for shape, concurrency in plan:
                run = _measure(
                    server, system, shape, concurrency, bodies[shape], duration, warmup,
                    "/v1/score", args.client,
                )  # fmt: skip
                _log(
                    f"{system} {shape} c={concurrency}: {run['pairs_per_s']} pairs/s, "
                    f"p50 {run['p50_ms']} ms, p99 {run['p99_ms']} ms, errors {run['errors']}"
                )
                runs.append(run)
            if system == "rmserve-fp32" and paired is not None and "single" in args.shapes:
                _paired_rounds(
                    server, paired, bodies["single"], max(args.concurrency), duration, warmup,
                    args.client,
                )  # fmt: skip
    return runs


def _paired_rounds(
    server: ServerProcess,
    paired: Paired,
    bodies: list[tuple[bytes, int]],
    concurrency: int,
    duration: float,
    warmup: float,
    client: str,
) -> None:
    """Alternate an offline pass and a run of the server, ``paired.rounds`` times: a ratio of
    two numbers measured a minute apart moves less with the machine's other load than one
    of numbers measured ten minutes apart."""
    for round_ in range(1, paired.rounds + 1):
        # The last run's abandoned requests would otherwise share the cores with this pass.
        server.wait_idle()
        elapsed, _, _ = paired.offline.timed_pass(paired.rendered)
        offline = len(paired.rendered) / elapsed
        run = _measure(
            server, "rmserve-fp32", "single", concurrency, bodies, duration, warmup,
            "/v1/score", client,
        )  # fmt: skip
        ratio = run["pairs_per_s"] / offline
        paired.results.append(
            {
                "round": round_,
                "concurrency": concurrency,
                "offline_pairs_per_s": round(offline, 2),
                "rmserve_pairs_per_s": run["pairs_per_s"],
                "ratio": round(ratio, 3),
                "errors": run["errors"],
            }
        )
        _log(
            f"side by side {round_}/{paired.rounds}: onnxruntime-offline {offline:.1f} pairs/s, "
            f"rmserve-fp32 c={concurrency} {run['pairs_per_s']} pairs/s, ratio {ratio:.3f}"
        )


def _run_offline(
    args: argparse.Namespace, bundle: Path, workload: Workload, quick: bool, system: str
) -> tuple[dict[str, Any], Offline, list[RenderedText]]:
    from rmserve.encoding import PairEncoder
    from rmserve.formatting import Message, TextFormat, render

    manifest = json.loads((bundle / "rmserve.json").read_text())
    text_format = TextFormat.from_dict(manifest["text_format"])
    encoder = PairEncoder.from_file(str(bundle / "tokenizer.json"), int(manifest["max_length"]))
    # --quick times fewer pairs: the pass over all of them alone would take a minute here.
    items = workload.items[:160] if quick and args.device == "cpu" else workload.items
    rendered = [
        render([*item.prompt, Message("assistant", item.response)], text_format) for item in items
    ]
    providers = ["CPUExecutionProvider"]
    if args.device != "cpu":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    precision = "fp16" if system.endswith("fp16") else "fp32"
    sizes: tuple[int, ...] = (1, 4, 8, 32) if quick else (1, 2, 4, 8, 16, 32, 64)
    if args.device != "cpu":
        sizes = (1, 8, 32, 64, 128, 256) if quick else (1, 8, 16, 32, 64, 128, 256, 512)
    result, offline = run_offline(
        bundle / manifest["variants"][precision]["file"], encoder, rendered,
        int(manifest["pad_token_id"]), threads=args.threads, providers=providers,
        sweep_sample=(32 if quick else 128) if args.device == "cpu" else 1024, sizes=sizes,
    )  # fmt: skip
    sessions, each = result.layout
    _log(
        f"{system}: {result.pairs_per_s:.1f} pairs/s at batch {result.batch_size}, "
        f"{sessions} session(s) x {each} thread(s)"
    )
    run = {
        "system": system,
        "shape": "offline",
        "concurrency": None,
        "pairs_per_s": round(result.pairs_per_s, 2),
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
        "errors": 0,
        "pairs": result.pairs,
        "duration_s": round(result.elapsed_s, 2),
        "batch_size": result.batch_size,
        "sessions": sessions,
        "threads_per_session": each,
        "model_only_pairs_per_s": round(result.pairs / result.model_s, 2),
        "padding_ratio": round(result.padding_ratio, 3),
        "sweep": {k: round(v, 2) for k, v in result.sweep.items()},
    }
    return run, offline, rendered


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.systems is None:
        args.systems = CPU_SYSTEMS if args.device == "cpu" else GPU_SYSTEMS
    if args.grpo_concurrency is None:
        args.grpo_concurrency = [4] if args.device == "cpu" else [64]
    started = time.monotonic()
    bundle = Path(args.bundle or DEFAULT_BUNDLE)
    if not (bundle / "rmserve.json").is_file():
        hint = "" if args.bundle else " (the default; make it with scripts/main.sh)"
        raise SystemExit(f"no bundle at {bundle}{hint}; pass --bundle DIR with an exported bundle")
    quick = bool(args.quick)
    duration = args.duration if args.duration is not None else (5.0 if quick else 20.0)
    warmup = args.warmup if args.warmup is not None else (2.0 if quick else 5.0)
    limit = args.limit if args.limit is not None else (400 if quick else None)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = report.machine_info()

    from rmserve.encoding import PairEncoder
    from rmserve.formatting import TextFormat

    manifest = json.loads((bundle / "rmserve.json").read_text())
    encoder = PairEncoder.from_file(str(bundle / "tokenizer.json"), int(manifest["max_length"]))
    data_dir = args.data or default_data_dir(REPO_ROOT)
    workload = build_workload(
        data_dir, encoder, TextFormat.from_dict(manifest["text_format"]), limit=limit
    )
    tokens = [item.tokens for item in workload.items]
    _log(
        f"{len(tokens)} pairs, mean {sum(tokens) / len(tokens):.0f} tokens, "
        f"{workload.skipped_too_long} skipped (response longer than max_length)"
    )
    checkpoint = _resolve_checkpoint(args, bundle) if "naive-torch" in args.systems else None

    # The offline ceiling first, on a quiet machine; its setup is kept for the side-by-side
    # rounds in the rmserve-fp32 server's lifetime.
    offline_runs: list[dict[str, Any]] = []
    paired: Paired | None = None
    rounds = args.rounds
    if rounds is None:  # the target they serve is a CPU one; GPU runs keep their device time
        rounds = 0 if quick or args.device != "cpu" else 3
    for system in args.systems:
        if system.startswith("onnxruntime-offline"):
            run, offline, rendered = _run_offline(args, bundle, workload, quick, system)
            offline_runs.append(run)
            if system == "onnxruntime-offline" and rounds > 0:
                paired = Paired(offline, rendered[:PAIRED_OFFLINE_PAIRS], rounds)
    runs = _run_servers(args, bundle, checkpoint, workload, duration, warmup, paired)
    runs += offline_runs
    side_by_side = paired.results if paired is not None else []

    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    command = "python -m benchmarks.run " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    extra = {
        "config": {
            "command": command,
            "bundle": str(bundle),
            "model_name": manifest.get("model_name"),
            "max_length": manifest.get("max_length"),
            "pairs": len(tokens),
            "mean_tokens": round(sum(tokens) / len(tokens), 1),
            "skipped_too_long": workload.skipped_too_long,
            "duration_s": duration,
            "warmup_s": warmup,
            "threads": args.threads,
            "rounds": rounds,
            "client": args.client,
            "device": args.device,
            "rmserve_env": args.rmserve_env,
            "wall_s": round(time.monotonic() - started, 1),
        }
    }
    report.write_json(args.out / "results.json", runs, machine, extra, side_by_side)
    report.write_markdown(args.out / "results.md", runs, machine, command, side_by_side)
    report.write_plot(args.out / "throughput.png", runs)
    _log(f"wrote results.json, results.md, throughput.png to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
