"""``onnxruntime-offline``: the ceiling of this machine for this model, with no server at all.

The same fp32 ``model.onnx`` runs over all of the benchmark's pairs in length-sorted batches:
no HTTP, no JSON, no queue, no waiting for a batch to fill, and almost no padding (neighbours in
length order have nearly equal lengths). The batch size *and the thread layout* are the best of
a sweep on a sample of the pairs: on a CPU of ``threads`` cores, one session of ``threads``
intra-op threads, or 2 (4, ...) sessions sharing the cores and taking batches in turn from one
list (rmserve's own model instances; on 2 cores two 1-thread sessions beat one 2-thread
session). The timed pass includes tokenization (the service has to tokenize too) and is
reported alongside the model-only time; :meth:`Offline.timed_pass` can repeat it, for rounds
measured side by side with a server.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rmserve.encoding import PairEncoder
from rmserve.formatting import RenderedText

__all__ = ["Offline", "OfflineResult", "layouts", "make_session", "run_offline"]

SWEEP_SIZES = (1, 2, 4, 8, 16, 32, 64)


Layout = tuple[int, int]  # (sessions, intra-op threads each)


@dataclass
class OfflineResult:
    pairs: int
    batch_size: int  # the best of the sweep
    layout: Layout  # the best of the sweep
    sweep: dict[str, float]  # "SESSIONSxTHREADS/bBATCH" -> pairs/s on the sample
    elapsed_s: float  # tokenization + model over all pairs
    model_s: float  # model time alone
    padding_ratio: float  # padded tokens / real tokens of the timed pass

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.elapsed_s


def make_session(model_path: Path, threads: int, providers: Sequence[str] | None = None) -> Any:
    """An ORT session; exits with a message when CUDA was asked for and ORT cannot start it
    (ORT itself would fall back to the CPU without a word, and time the wrong thing)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    wanted = list(providers or ["CPUExecutionProvider"])
    session = ort.InferenceSession(str(model_path), options, providers=wanted)
    if "CUDAExecutionProvider" in wanted and "CUDAExecutionProvider" not in session.get_providers():
        raise SystemExit(
            f"{model_path}: onnxruntime could not start the CUDA provider (active: "
            f"{session.get_providers()}); install onnxruntime-gpu with its CUDA libraries"
        )
    return session


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


def layouts(threads: int, device: str) -> list[Layout]:
    """Thread layouts to sweep: one session of all ``threads``, and on CPU also 2, 4, ...
    sessions that split them evenly."""
    out: list[Layout] = [(1, threads)]
    if device == "cpu":
        sessions = 2
        while sessions <= threads:
            if threads % sessions == 0:
                out.append((sessions, threads // sessions))
            sessions *= 2
    return out


def _run_batches(sessions: Sequence[Any], batches: list[tuple[Any, Any]]) -> float:
    """Seconds to run every batch; several sessions take the next batch in turn, each in its
    own thread (ORT releases the GIL)."""
    if "CUDAExecutionProvider" in sessions[0].get_providers():
        return _run_batches_bound(sessions[0], batches)
    start = time.perf_counter()
    if len(sessions) == 1:
        for ids, mask in batches:
            sessions[0].run(None, {"input_ids": ids, "attention_mask": mask})
        return time.perf_counter() - start
    order = itertools.count()  # next() on a count is atomic under the GIL

    def work(session: Any) -> None:
        while (index := next(order)) < len(batches):
            ids, mask = batches[index]
            session.run(None, {"input_ids": ids, "attention_mask": mask})

    workers = [threading.Thread(target=work, args=(s,)) for s in sessions]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
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


@dataclass
class Offline:
    """Sessions in the best layout and the best batch size, ready to time passes."""

    sessions: list[Any]
    encoder: PairEncoder
    pad_token_id: int
    batch_size: int

    def timed_pass(self, rendered: list[RenderedText]) -> tuple[float, float, float]:
        """(seconds for tokenization + model, seconds for the model, padding ratio) over
        ``rendered``."""
        start = time.perf_counter()
        all_ids = [e.ids for e in self.encoder.encode_batch(rendered)]
        batches = _batches(all_ids, self.batch_size, self.pad_token_id)
        model_s = _run_batches(self.sessions, batches)
        elapsed = time.perf_counter() - start
        padded = sum(int(b[0].size) for b in batches)
        real = sum(len(i) for i in all_ids)
        return elapsed, model_s, padded / real


def run_offline(
    model_path: Path,
    encoder: PairEncoder,
    rendered: list[RenderedText],
    pad_token_id: int,
    *,
    threads: int,
    providers: Sequence[str] | None = None,
    sweep_sample: int = 128,
    sizes: Sequence[int] = SWEEP_SIZES,
    seed: int = 0,
) -> tuple[OfflineResult, Offline]:
    """Sweep layouts and batch sizes on a sample, then time tokenization + model over every
    pair in the best of them; also returns that setup for more timed passes."""
    providers = list(providers or ["CPUExecutionProvider"])
    device = "cuda" if "CUDAExecutionProvider" in providers else "cpu"
    ids = [e.ids for e in encoder.encode_batch(rendered)]
    sample = random.Random(seed).sample(ids, min(sweep_sample, len(ids)))
    sweep: dict[str, float] = {}
    best: tuple[float, Layout, int] | None = None
    best_sessions: list[Any] = []
    for layout in layouts(threads, device):
        count, each = layout
        sessions = [make_session(model_path, each, providers) for _ in range(count)]
        _run_batches(sessions, _batches(sample[:8], 8, pad_token_id))  # first-run allocations
        for size in sizes:
            if size > len(sample) and any(k.startswith(f"{count}x") for k in sweep):
                break
            rate = len(sample) / _run_batches(sessions, _batches(sample, size, pad_token_id))
            sweep[f"{count}x{each}/b{size}"] = rate
            if best is None or rate > best[0]:
                best, best_sessions = (rate, layout, size), sessions
    assert best is not None
    _, layout, size = best
    offline = Offline(best_sessions, encoder, pad_token_id, size)
    elapsed, model_s, padding = offline.timed_pass(rendered)
    result = OfflineResult(len(ids), size, layout, sweep, elapsed, model_s, padding)
    return result, offline
