"""int8 schemes for the default recipe's model: batch invariance, decisions, CPU speed (issue 16).

Every candidate is built from the same fp32 ``model.onnx`` of a bundle of the default recipe
(``rmserve train`` then ``rmserve export``), then measured on the 240 pairs (480 responses) of
HH-harmless dev, tokenized by the bundle's own encoder:

- ``invariance``: max |score alone - score in a batch| over 96 dev responses (every fifth),
  in shuffled batches of 8 of mixed lengths (3 shuffles, 1 and 2 threads), and over every
  length 2..max_length of one long response, alone and padded beside other rows;
- ``decisions``: pairwise agreement with fp32 (fp32 scored as export does: length-sorted
  batches of 32), accuracy, RMS and max score error, scored (a) as export scores and
  (b) through the service's own ``Batcher`` and ``ModelRuntime`` (2 instances of 1 thread,
  batches of up to 8, the default padding ratio, then a padding ratio of 100 for batches of
  mixed lengths), the 240 pairs sent as concurrent 2-item requests in random order;
- ``last_900_train_examples``: the same decisions on the pairs of the last 900 training
  examples (the model has seen them, but they hold more near-ties than dev: a second sample
  of the flip rate);
- ``speed``: responses ("pairs" of prompt and response) per second over a fixed sample of
  160 dev responses in length-sorted batches of 8 and of 32, one session of ``--threads``
  threads each; the candidates take turns batch by batch, so that load on the machine hits
  them alike, and the ratios are medians of per-round ratios.

Candidates: ``fp32``; ``dynamic`` (``quantize_dynamic``, per-channel int8 weights: the int8
variant of export before issue 16); ``static_qdq`` (``quantize_static``, QDQ, per-channel
weights, MatMuls with constant weights only, MinMax calibration on 128 training texts;
softmax, LayerNorm and attention in fp32); ``nbits8_b{16,32,128}`` (weight-only 8-bit
``MatMulNBits`` with ``accuracy_level`` 4: activations quantized per block of each row);
``per_token`` (rmserve.training.export.quantize with no outlier channels) and
``per_token_outliers`` (rmserve.training.export.quantize with its 16 outlier channels, chosen
on 128 training texts).
``per_token_outliers_calibration`` repeats that scheme's decision check over six samples of
training texts and over export's own choice, the first 128 eval responses (calibration only
decides which channels stay in fp32).

    rmserve train --output-dir /work/int8-ckpt        # the default recipe, if not done yet
    rmserve export /work/int8-ckpt --out /work/int8-bundle
    python -m benchmarks.int8 --bundle /work/int8-bundle   # ~15 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from rmserve.encoding import PairEncoder
from rmserve.manifest import TOKENIZER_NAME, Manifest, Variant, load_bundle
from rmserve.training.data import read_examples
from rmserve.training.evaluate import EncodedExamples, encode_examples
from rmserve.training.export.quantize import quantize_int8
from rmserve.training.scoring import pad_batch, score_ids

__all__ = ["main"]

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-harmless"
CALIBRATION_ROWS = 128  # training texts for the calibrated candidates
EXPORT_CALIBRATION = 128  # eval texts export calibrates int8 on
SPEED_SAMPLE = 160  # dev responses timed per pass
BATCH_SIZES = (8, 32)
MORE_EXAMPLES = 900  # training examples (seen in training) scored as a second sample of pairs

Builder = Callable[[Path, Path], None]  # (fp32 model, destination)


@dataclasses.dataclass
class Data:
    manifest: Manifest
    dev: EncodedExamples  # the 240 dev pairs: the decision check
    train_ids: list[list[int]]  # responses of the first 400 training examples: calibration
    more: EncodedExamples  # the last 900 training examples: more near-ties, a second sample

    @property
    def pad(self) -> int:
        return self.manifest.pad_token_id


# --- candidates ---------------------------------------------------------------------------


def build_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    """Calibration batches for quantize_static (right-padded, length-sorted)."""

    def __init__(self, rows: list[list[int]], pad: int, batch_size: int = 8):
        order = sorted(rows, key=len)
        self.batches = [
            pad_batch(order[i : i + batch_size], pad) for i in range(0, len(order), batch_size)
        ]
        self.index = 0

    def get_next(self) -> dict[str, Any] | None:
        if self.index >= len(self.batches):
            return None
        ids, mask = self.batches[self.index]
        self.index += 1
        return {"input_ids": ids, "attention_mask": mask}

    def rewind(self) -> None:
        self.index = 0


def static_qdq(data: Data) -> Builder:
    def build(src: Path, dst: Path) -> None:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        quantize_static(
            str(src),
            str(dst),
            _Reader(data.train_ids[:CALIBRATION_ROWS], data.pad),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"MatMulConstBOnly": True},
        )

    return build


def nbits8(block_size: int) -> Builder:
    def build(src: Path, dst: Path) -> None:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        config = DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=True, accuracy_level=4, bits=8
        )
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)),
            bits=8,
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=4,
            algo_config=config,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst))

    return build


def per_token(data: Data, outlier_channels: int, rows: list[list[int]] | None = None) -> Builder:
    def build(src: Path, dst: Path) -> None:
        calibration = rows if rows is not None else data.train_ids[:CALIBRATION_ROWS]
        quantize_int8(src, dst, calibration, data.pad, outlier_channels=outlier_channels)

    return build


# --- measurements ---------------------------------------------------------------------------


def session(path: Path, threads: int) -> Any:
    """Session settings of the service (rmserve.service.runtime)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _score(model: Any, rows: Sequence[Sequence[int]], pad: int) -> np.ndarray:
    ids, mask = pad_batch(rows, pad)
    (out,) = model.run(["reward"], {"input_ids": ids, "attention_mask": mask})
    return np.asarray(out, dtype=np.float64)  # (B,)


def invariance(path: Path, data: Data) -> dict[str, float]:
    texts = data.dev.ids[::5][:96]
    out: dict[str, float] = {}
    rng = random.Random(0)
    for threads in (1, 2):
        model = session(path, threads)
        alone = [float(_score(model, [row], data.pad)[0]) for row in texts]
        worst = 0.0
        for _ in range(3):
            order = list(range(len(texts)))
            rng.shuffle(order)
            for start in range(0, len(order), 8):
                chunk = order[start : start + 8]
                got = _score(model, [texts[i] for i in chunk], data.pad)
                worst = max(worst, *(abs(got[j] - alone[i]) for j, i in enumerate(chunk)))
        out[f"max_abs_alone_vs_batch8_threads{threads}"] = worst
    model = session(path, 1)
    longest = max(data.dev.ids, key=len)
    others = sorted(data.dev.ids, key=len)
    worst, lengths = 0.0, []
    for length in range(2, len(longest) + 1):
        row = longest[:length]
        alone_score = _score(model, [row], data.pad)[0]
        batched = [
            _score(model, [row, longest], data.pad)[0],
            _score(model, [others[5], row, others[-3], others[100]], data.pad)[1],
        ]
        diff = max(abs(b - alone_score) for b in batched)
        if diff > 0:
            lengths.append(length)
        worst = max(worst, float(diff))
    out["max_abs_alone_vs_padded_every_length"] = worst
    out["lengths_that_differ"] = len(lengths)
    out["max_abs"] = max(v for k, v in out.items() if k.startswith("max_abs"))
    return out


def _decisions(scores: np.ndarray, reference: np.ndarray, dev: EncodedExamples) -> dict[str, Any]:
    margin = scores[dev.winners] - scores[dev.losers]  # (P,)
    reference_margin = reference[dev.winners] - reference[dev.losers]  # (P,)
    flips = np.sign(margin) != np.sign(reference_margin)
    return {
        "agreement": float(np.mean(~flips)),
        "flips": int(flips.sum()),
        "accuracy": float(np.mean(margin > 0)),
        "accuracy_drop": float(np.mean(reference_margin > 0) - np.mean(margin > 0)),
        "rms_vs_fp32": float(np.sqrt(np.mean((scores - reference) ** 2))),
        "max_abs_vs_fp32": float(np.max(np.abs(scores - reference))),
    }


def export_scores(path: Path, data: Data, pairs: EncodedExamples | None = None) -> np.ndarray:
    """Scores of every response, in length-sorted batches of 32 as export scores them."""
    model = session(path, 2)

    def run(ids: Any, mask: Any) -> Any:
        return model.run(["reward"], {"input_ids": ids, "attention_mask": mask})[0]

    return score_ids(run, (pairs or data.dev).ids, data.pad, 32)


def server_scores(
    path: Path, data: Data, bundle: Path, max_padding_ratio: float
) -> tuple[np.ndarray, float]:
    """Scores through the service's Batcher and ModelRuntime, and the mean batch size."""
    from rmserve.service.batcher import Batcher, BatchStats
    from rmserve.service.runtime import ModelRuntime

    variant = Variant(file=str(path.resolve()), sha256="-", precision="int8")
    manifest = dataclasses.replace(data.manifest, variants={"int8": variant})
    runtime = ModelRuntime(
        bundle, manifest, precision="int8", provider="cpu", intra_op_threads=1, instances=2
    )
    sizes: list[int] = []

    def observe(stats: BatchStats) -> None:
        sizes.append(stats.size)

    async def run() -> np.ndarray:
        batcher = Batcher(
            [lambda ids, mask, k=k: runtime.run(ids, mask, k) for k in range(2)],
            pad_token_id=data.pad,
            max_batch_size=8,
            max_batch_tokens=16384,
            max_wait_s=0.005,
            max_queue_items=4096,
            max_padding_ratio=max_padding_ratio,
            on_batch=observe,
        )
        batcher.start()
        pairs = list(zip(data.dev.winners, data.dev.losers, strict=True))
        random.Random(1).shuffle(pairs)
        scores = np.zeros(len(data.dev.ids))

        async def one(w: int, lo: int) -> None:
            rows = [np.asarray(data.dev.ids[i], dtype=np.int64) for i in (w, lo)]
            result = await batcher.submit(rows)
            scores[[w, lo]] = result.scores

        await asyncio.gather(*(one(w, lo) for w, lo in pairs))
        await batcher.close()
        return scores

    scores = asyncio.run(run())
    return scores, float(np.mean(sizes))


def speed(paths: dict[str, Path], data: Data, threads: int, rounds: int) -> dict[str, Any]:
    """Responses per second at each batch size. The candidates take turns batch by batch
    (in a rotating order), so that a change of load on a shared machine hits them alike;
    the ratios are medians over rounds of per-round ratios."""
    sample = random.Random(2).sample(data.dev.ids, SPEED_SAMPLE)
    order = sorted(sample, key=len)
    names = list(paths)
    sessions = {name: session(path, threads) for name, path in paths.items()}
    out: dict[str, Any] = {}
    for size in BATCH_SIZES:
        batches = [pad_batch(order[i : i + size], data.pad) for i in range(0, len(order), size)]
        feeds = [{"input_ids": ids, "attention_mask": mask} for ids, mask in batches]
        for model in sessions.values():  # warm-up: allocations of every shape
            for feed in feeds:
                model.run(["reward"], feed)
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(rounds):
            spent = dict.fromkeys(names, 0.0)
            for b, feed in enumerate(feeds):
                for name in names[b % len(names) :] + names[: b % len(names)]:
                    started = time.perf_counter()
                    sessions[name].run(["reward"], feed)
                    spent[name] += time.perf_counter() - started
            for name in names:
                times[name].append(spent[name])
        out[f"batch{size}"] = {
            name: {
                "pairs_per_s": len(order) / statistics.median(t),
                "vs_fp32": statistics.median(f / s for f, s in zip(times["fp32"], t, strict=True)),
                "vs_dynamic": statistics.median(
                    d / s for d, s in zip(times["dynamic"], t, strict=True)
                ),
            }
            for name, t in times.items()
        }
    return out


# --- the run --------------------------------------------------------------------------------


def load_data(bundle: Path, dev_path: Path, train_path: Path) -> Data:
    manifest = load_bundle(bundle)
    encoder = PairEncoder.from_file(
        str(bundle / TOKENIZER_NAME), manifest.max_length, manifest.text_format
    )
    dev = encode_examples(read_examples(dev_path).examples, encoder, manifest.text_format)
    examples = read_examples(train_path).examples
    train = encode_examples(examples[:400], encoder, manifest.text_format)
    more = encode_examples(examples[-MORE_EXAMPLES:], encoder, manifest.text_format)
    train_ids = random.Random(0).sample(train.ids, len(train.ids))
    return Data(manifest=manifest, dev=dev, train_ids=train_ids, more=more)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="fp32 bundle, default recipe")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/int8.json"))
    parser.add_argument("--dev-data", type=Path, default=HH / "dev.jsonl.gz")
    parser.add_argument("--train-data", type=Path, default=HH / "train.jsonl.gz")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work", type=Path, default=None, help="folder for the candidates")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)  # onnxruntime.quantization logs every node

    data = load_data(args.bundle, args.dev_data, args.train_data)
    work = args.work or Path(tempfile.mkdtemp(prefix="rmserve-int8-"))
    work.mkdir(parents=True, exist_ok=True)
    src = args.bundle / data.manifest.variants["fp32"].file
    builders: dict[str, Builder | None] = {
        "fp32": None,
        "dynamic": build_dynamic,
        "static_qdq": static_qdq(data),
        "nbits8_b16": nbits8(16),
        "nbits8_b32": nbits8(32),
        "nbits8_b128": nbits8(128),
        "per_token": per_token(data, 0),
        "per_token_outliers": per_token(data, 16),
    }
    paths: dict[str, Path] = {}
    results: dict[str, dict[str, Any]] = {}
    reference = export_scores(src, data)
    more_reference = export_scores(src, data, data.more)
    for name, build in builders.items():
        path = src if build is None else work / f"{name}.onnx"
        entry: dict[str, Any] = {}
        if build is not None:
            started = time.perf_counter()
            build(src, path)
            entry["build_s"] = round(time.perf_counter() - started, 1)
        entry["file_mb"] = round(path.stat().st_size / 2**20, 1)
        entry["invariance"] = invariance(path, data)
        entry["export_batches"] = _decisions(export_scores(path, data), reference, data.dev)
        for label, ratio in (("server_batches", 1.15), ("server_mixed_batches", 100.0)):
            scores, mean_batch = server_scores(path, data, args.bundle, ratio)
            entry[label] = _decisions(scores, reference, data.dev) | {"mean_batch": mean_batch}
        more = export_scores(path, data, data.more)
        entry[f"last_{MORE_EXAMPLES}_train_examples"] = _decisions(more, more_reference, data.more)
        paths[name] = path
        results[name] = entry
        print(name, json.dumps(entry), flush=True)

    calibration = []
    sources = {f"train{n}_seed{seed}": (n, seed) for n in (32, 128) for seed in range(3)}
    for label, (n, seed) in sources.items():
        rows = random.Random(seed).sample(data.train_ids, n)
        path = work / "calibrated.onnx"
        per_token(data, 16, rows)(src, path)
        calibration.append(
            {"calibration": label} | _decisions(export_scores(path, data), reference, data.dev)
        )
    # What export passes (rmserve/training/export/variants.py, CALIBRATION_TEXTS): the first
    # 128 eval responses, encoded as the bundle encodes them.
    per_token(data, 16, data.dev.ids[:EXPORT_CALIBRATION])(src, work / "calibrated.onnx")
    calibration.append(
        {"calibration": f"first {EXPORT_CALIBRATION} dev responses (as export)"}
        | _decisions(export_scores(work / "calibrated.onnx", data), reference, data.dev)
    )
    for row in calibration:
        print(json.dumps(row), flush=True)

    result: dict[str, Any] = {
        "command": "python -m benchmarks.int8 --bundle BUNDLE",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "onnxruntime": __import__("onnxruntime").__version__,
        "bundle": {
            "model_name": data.manifest.model_name,
            "base_model": data.manifest.base_model,
            "max_length": data.manifest.max_length,
            "fp32_accuracy": float(
                np.mean(reference[data.dev.winners] > reference[data.dev.losers])
            ),
            "pairs": len(data.dev.winners),
            "responses": len(data.dev.ids),
            "more_pairs": len(data.more.winners),
        },
        "candidates": results,
        "per_token_outliers_calibration": calibration,
    }
    if not args.skip_speed:
        result["speed"] = {
            "threads": args.threads,
            "rounds": args.rounds,
            "responses_per_pass": SPEED_SAMPLE,
            **speed(paths, data, args.threads, args.rounds),
        }
        print(json.dumps(result["speed"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
