"""``onnxruntime-offline``: the ceiling of this machine for this model, with no server at all.

The same fp32 ``model.onnx`` runs over all of the benchmark's pairs in length-sorted batches:
no HTTP, no JSON, no queue, no waiting for a batch to fill, and almost no padding (neighbours in
length order have nearly equal lengths). The batch size is the best of a sweep on a sample of
the pairs. The timed pass includes tokenization (the service has to tokenize too) and is
reported alongside the model-only time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rmserve.encoding import PairEncoder
from rmserve.formatting import RenderedText

__all__ = ["OfflineResult", "make_session", "run_offline"]

SWEEP_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class OfflineResult:
    pairs: int
    batch_size: int  # the best of the sweep
    sweep: dict[int, float]  # batch size -> pairs/s on the sample
    elapsed_s: float  # tokenization + model over all pairs
    model_s: float  # model time alone
    padding_ratio: float  # padded tokens / real tokens of the timed pass

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.elapsed_s


def make_session(model_path: Path, threads: int, providers: Sequence[str] | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        str(model_path), options, providers=list(providers or ["CPUExecutionProvider"])
    )


def _batches(lengths: list[list[int]], size: int, pad: int) -> list[tuple[Any, Any]]:
    """Length-sorted, right-padded (input_ids, attention_mask) int64 batches."""
    order = sorted(range(len(lengths)), key=lambda i: len(lengths[i]))
    out = []
    for start in range(0, len(order), size):
        rows = [lengths[i] for i in order[start : start + size]]
        longest = max(len(r) for r in rows)
        ids = np.full((len(rows), longest), pad, dtype=np.int64)  # (B, T)
        mask = np.zeros((len(rows), longest), dtype=np.int64)  # (B, T)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        out.append((ids, mask))
    return out


def _run_batches(session: Any, batches: list[tuple[Any, Any]]) -> float:
    if "CUDAExecutionProvider" in session.get_providers():
        return _run_batches_bound(session, batches)
    start = time.perf_counter()
    for ids, mask in batches:
        session.run(None, {"input_ids": ids, "attention_mask": mask})
    return time.perf_counter() - start


def _run_batches_bound(session: Any, batches: list[tuple[Any, Any]]) -> float:
    """On CUDA, with I/O binding: inputs copied to the device once per batch, the output
    left there until the batch is done, so no implicit host round trips inside the run."""
    import onnxruntime as ort

    output = session.get_outputs()[0].name
    start = time.perf_counter()
    for ids, mask in batches:
        binding = session.io_binding()
        binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(ids, "cuda", 0))
        binding.bind_ortvalue_input(
            "attention_mask", ort.OrtValue.ortvalue_from_numpy(mask, "cuda", 0)
        )
        binding.bind_output(output, "cuda", 0)
        session.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()  # the rewards are needed on the host in the end
    return time.perf_counter() - start


def run_offline(
    session: Any,
    encoder: PairEncoder,
    rendered: list[RenderedText],
    pad_token_id: int,
    *,
    sweep_sample: int = 128,
    sizes: Sequence[int] = SWEEP_SIZES,
    seed: int = 0,
) -> OfflineResult:
    """Sweep batch sizes on a sample, then time tokenization + model over every pair."""
    ids = [e.ids for e in encoder.encode_batch(rendered)]
    sample = random.Random(seed).sample(ids, min(sweep_sample, len(ids)))
    _run_batches(session, _batches(sample[:8], 8, pad_token_id))  # first-run allocations
    sweep: dict[int, float] = {}
    for size in sizes:
        if size > len(sample) and sweep:
            break
        seconds = _run_batches(session, _batches(sample, size, pad_token_id))
        sweep[size] = len(sample) / seconds
    best = max(sweep, key=lambda s: sweep[s])

    start = time.perf_counter()
    all_ids = [e.ids for e in encoder.encode_batch(rendered)]
    batches = _batches(all_ids, best, pad_token_id)
    model_s = _run_batches(session, batches)
    elapsed = time.perf_counter() - start
    padded = sum(int(b[0].size) for b in batches)
    real = sum(len(i) for i in all_ids)
    return OfflineResult(len(all_ids), best, sweep, elapsed, model_s, padded / real)
