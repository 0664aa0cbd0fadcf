"""The ONNX Runtime session that turns padded id batches into rewards.

Choice of execution provider and precision (logged and exposed in ``rmserve_model_info``):

- provider ``auto``: CUDA when onnxruntime offers ``CUDAExecutionProvider``, else CPU;
- precision ``auto``: the bundle's fp16 variant on CUDA when it has one, else fp32;
  ``int8`` (per-token quantization, :mod:`rmserve.training.export.quantize`) runs on CPU only,
  ``fp16`` on CUDA only, because the other provider would fall back to slow or unsupported
  kernels.

The runtime holds one or more *instances*: ORT sessions of the same model, each with its own
intra-op thread pool, so that several batches run at once (the batcher gives each instance
one worker thread). On a CPU, instances of fewer threads waste less time than one instance of
many: each operator of a small-batch forward pass is short, so its threads spend much of it
waiting for one another, and a thread the event loop or the tokenizer interrupts stalls them
all (docs/performance.md has the measurements). ORT releases the GIL while it runs.

A decoder bundle may carry a *packed* graph per precision (the manifest's ``packed``): items
that share a prompt are scored in one row, the prompt computed once (:mod:`rmserve.packing`).
With ``prefix_reuse`` (the default) the runtime loads that graph instead of the plain one and
scores every batch through it, lone items as rows of their own (no slower than the plain
graph for them; docs/performance.md); without it, or for a variant that has none (int8), the
plain graph. Only one of the two is ever loaded.

The model's output ``reward`` is [batch] for one head and [batch, K] for a model of K heads
(the manifest's ``labels``). ``run`` always answers (B, K), K = 1 included, and checks the
shape against the manifest: a model and manifest that disagree fail at load time, or fail the
batch, instead of handing an item its neighbour's reward.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rmserve.manifest import BundleError, Manifest
from rmserve.packing import PACKED_INPUTS, PackedBatch, ShareMode, pack

__all__ = [
    "AUTO_BATCH_SIZE",
    "ModelOutputError",
    "ModelRuntime",
    "RuntimeConfigError",
    "choose_batch_size",
    "choose_instances",
    "choose_precision",
    "choose_provider",
    "head_rows",
    "usable_cores",
]

logger = logging.getLogger("rmserve.service.runtime")

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "reward"
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class RuntimeConfigError(ValueError):
    """A provider/precision request that this machine or this bundle cannot satisfy."""


class ModelOutputError(RuntimeError):
    """The model answered a batch with an output whose shape is not (batch, heads)."""


def head_rows(output: Any, batch: int, num_heads: int) -> npt.NDArray[np.float32]:
    """A model's output for a batch of ``batch`` items as (batch, num_heads) float32.

    One head may come as (B,) (what rmserve exports) or (B, 1); K heads as (B, K). Anything
    else is refused here rather than mis-assigned: a row too few would give one item its
    neighbour's reward, or none at all."""
    rows: npt.NDArray[np.float32] = np.asarray(output, dtype=np.float32)
    if rows.ndim == 1 and num_heads == 1:
        rows = rows.reshape(-1, 1)
    if rows.shape != (batch, num_heads):
        raise ModelOutputError(
            f"the model returned an output of shape {tuple(rows.shape)} for a batch of {batch} "
            f"items; the manifest lists {num_heads} head(s), so ({batch}, {num_heads}) was "
            "expected. The bundle's model and its rmserve.json labels disagree; export the "
            "bundle again"
        )
    return rows


def check_output_shape(
    shape: Sequence[Any], manifest: Manifest, path: Path, *, packed: bool = False
) -> None:
    """Refuse at load time a model whose declared output cannot be the manifest's heads:
    [batch] or [batch, 1] for one head, [batch, K] for K (a packed graph: [rows, items] or
    [rows, items, K]). Symbolic dims pass (checked per batch by :func:`head_rows`)."""
    k = manifest.num_heads
    lead = 2 if packed else 1  # the axes before the heads' axis
    last = shape[-1] if len(shape) == lead + 1 else None
    fits = (len(shape) == lead and k == 1) or (
        len(shape) == lead + 1 and (not isinstance(last, int) or last == k)
    )
    if not fits:
        axes = "[rows, items" if packed else "[batch"
        expected = f"{axes}]" if k == 1 else f"{axes}, {k}]"
        raise BundleError(
            f"{path} outputs a tensor of shape {list(shape)}, but {manifest.model_name}'s "
            f"rmserve.json lists {k} label(s) {list(manifest.labels)}, which needs {expected}; "
            "export the bundle again so that the model and its labels agree"
        )


def choose_provider(requested: str, available: list[str]) -> str:
    """``cpu`` or ``cuda`` for a requested ``auto|cpu|cuda`` and ORT's available providers."""
    has_cuda = ORT_PROVIDERS["cuda"] in available
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    if requested == "cuda" and not has_cuda:
        raise RuntimeConfigError(
            f"provider cuda was asked for but onnxruntime offers only {available}; install "
            "the gpu extra (onnxruntime-gpu) on a machine with CUDA, or use --provider cpu"
        )
    if requested not in ORT_PROVIDERS:
        raise RuntimeConfigError(f"unknown provider {requested!r}; expected auto, cpu or cuda")
    return requested


def choose_precision(requested: str, provider: str, manifest: Manifest) -> str:
    """The bundle variant to run for a requested ``auto|fp32|int8|fp16`` on ``provider``."""
    have = sorted(manifest.variants)
    if requested == "auto":
        if provider == "cuda" and "fp16" in manifest.variants:
            return "fp16"
        if "fp32" not in manifest.variants:  # exported with --dtype fp16: a GPU bundle
            raise RuntimeConfigError(
                f"the bundle has only {have} (exported with --dtype fp16), which runs on CUDA; "
                "serve it on a GPU, or export the model with --dtype fp32 to serve it on CPU"
            )
        return "fp32"
    if requested not in manifest.variants:
        raise RuntimeConfigError(
            f"precision {requested} was asked for but the bundle has only {have}; export it "
            f"with that variant or pick one of {have}"
        )
    if requested == "int8" and provider != "cpu":
        raise RuntimeConfigError(
            "the int8 variant (per-token int8 kernels) runs on CPU only; use --provider cpu "
            "or --precision fp16/fp32 on CUDA"
        )
    if requested == "fp16" and provider != "cuda":
        raise RuntimeConfigError(
            "the fp16 variant runs on CUDA only (CPU kernels for fp16 are slow or missing); "
            "use --precision fp32 or int8 on CPU"
        )
    return requested


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers' cpusets narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def choose_instances(instances: int, threads: int, provider: str, cores: int) -> tuple[int, int]:
    """(instances, intra-op threads per instance) for the requested values, 0 meaning auto.

    On CPU, auto is two instances when there are two cores or more, and the cores shared
    out between them: ``cores // instances`` threads each. On CUDA, auto is one instance
    (the GPU runs one batch at a time anyway) with ORT's default threads (0)."""
    if instances < 0 or threads < 0:
        raise RuntimeConfigError("model instances and intra-op threads must be >= 0 (0 = auto)")
    if provider == "cuda":
        return instances or 1, threads
    chosen = instances or (2 if cores >= 2 else 1)
    return chosen, threads or max(1, cores // chosen)


# On a CPU a pair costs more in a large batch, whose activations outgrow the caches, so small
# batches; a GPU needs large batches to be busy (docs/performance.md has the batch-size sweep).
AUTO_BATCH_SIZE = {"cpu": 8, "cuda": 64}


def choose_batch_size(requested: int, provider: str, max_queue_items: int) -> int:
    """The most items per batch: ``requested``, or for 0 (auto) the provider's default,
    never above what the queue can hold."""
    if requested:
        return requested
    return min(AUTO_BATCH_SIZE[provider], max_queue_items)


@dataclass(frozen=True)
class RuntimeInfo:
    model: str
    precision: str
    provider: str
    file: str
    instances: int
    intra_op_threads: int  # per instance; 0 = ORT's default (CUDA)
    prefix_reuse: bool = False  # the packed graph is loaded: shared prompts computed once


class ModelRuntime:
    """ORT sessions (``instances`` of them) over one variant of a bundle."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        *,
        precision: str = "auto",
        provider: str = "auto",
        intra_op_threads: int = 0,
        instances: int = 0,
        prefix_reuse: bool = True,
    ):
        """``instances`` and ``intra_op_threads`` (per instance): 0 = auto, as
        :func:`choose_instances` decides for the provider and this process's cores;
        ``prefix_reuse``: load the variant's packed graph when the bundle has one."""
        import onnxruntime as ort

        self.manifest = manifest
        self.provider = choose_provider(provider, list(ort.get_available_providers()))
        self.precision = choose_precision(precision, self.provider, manifest)
        instances, intra_op_threads = choose_instances(
            instances, intra_op_threads, self.provider, usable_cores()
        )
        variant = manifest.variants[self.precision]
        packed_files = manifest.packed.files if manifest.packed and prefix_reuse else {}
        self.packed = self.precision in packed_files
        self.skip_token_id = manifest.packed.skip_token_id if manifest.packed else None
        self.token_cost = manifest.packed.token_cost if manifest.packed else 0.0
        self.path = Path(bundle_dir) / packed_files.get(self.precision, variant.file)

        self.sessions = _open_sessions(self.path, self.provider, instances, intra_op_threads)
        self.output_name = _checked_output(self.sessions[0], manifest, self.path, self.packed)
        self.num_heads = manifest.num_heads
        self.info = RuntimeInfo(
            model=manifest.model_name,
            precision=self.precision,
            provider=self.provider,
            file=self.path.name,
            instances=instances,
            intra_op_threads=intra_op_threads,
            prefix_reuse=self.packed,
        )
        logger.info(
            "model loaded",
            extra={
                "model": manifest.model_name,
                "precision": self.precision,
                "provider": self.provider,
                "file": str(self.path),
                "ort_providers": self.sessions[0].get_providers(),
                "instances": instances,
                "intra_op_threads": intra_op_threads,
                "prefix_reuse": self.packed,
            },
        )

    @property
    def instances(self) -> int:
        return len(self.sessions)

    def run(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64],
        instance: int = 0,
    ) -> npt.NDArray[np.float32]:
        """Rewards for one right-padded batch: (B, T) int64 ids and mask -> (B, K) float32
        (K = the manifest's heads, 1 included), computed by session ``instance``; raises
        ModelOutputError when the model's output is not (B, K). A packed runtime scores the
        rows whole, each as a row of its own."""
        if self.packed:
            lengths = attention_mask.sum(axis=1)
            rows = [input_ids[r, : int(n)] for r, n in enumerate(lengths)]
            scores, _ = self.run_sequences(rows, instance, share="never")
            return scores
        (out,) = self.sessions[instance].run(
            [self.output_name], {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        return head_rows(out, int(input_ids.shape[0]), self.num_heads)

    def run_sequences(
        self,
        sequences: list[npt.NDArray[np.int64]],
        instance: int = 0,
        *,
        share: ShareMode = "auto",
    ) -> tuple[npt.NDArray[np.float32], PackedBatch]:
        """Rewards (n, K) of token sequences through the packed graph, items that share a
        prompt in one row (:func:`rmserve.packing.pack`), and the batch as it ran; raises
        ModelOutputError when the output does not fit the rows."""
        batch = pack(
            sequences,
            self.manifest.pad_token_id,
            skip_token_id=self.skip_token_id,
            share=share,
            token_cost=self.token_cost,
        )
        (out,) = self.sessions[instance].run([self.output_name], batch.feeds())
        try:
            return batch.item_rows(out, self.num_heads), batch
        except ValueError as e:
            raise ModelOutputError(f"{e}; export the bundle again") from e

    def warm_up(self, max_batch_size: int, max_length: int | None = None) -> float:
        """Run a few shapes on every instance so the first real requests do not pay for
        allocations; seconds. ``max_length``: the tokens per item in force (default: the
        bundle's)."""
        started = time.perf_counter()
        length = min(max_length or self.manifest.max_length, 128)
        for instance in range(self.instances):
            for batch, seq in ((1, 8), (min(max_batch_size, 8), length), (1, length)):
                ids = np.full((batch, seq), self.manifest.pad_token_id, dtype=np.int64)
                ids[:, 0] = 1
                mask = np.ones((batch, seq), dtype=np.int64)
                self.run(ids, mask, instance)
        return time.perf_counter() - started


def _open_sessions(path: Path, provider: str, instances: int, intra_op_threads: int) -> list[Any]:
    """``instances`` ORT sessions of the graph at ``path``, each running one batch at a time
    with its own ``intra_op_threads``; refuses a CUDA provider that did not start."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # ORT's idle threads spin by default; here the event loop and the tokenizer threads
    # need the same cores between batches, so idle ORT threads sleep instead.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[Any] = [ORT_PROVIDERS["cpu"]]
    if provider == "cuda":
        providers = [(ORT_PROVIDERS["cuda"], {"device_id": 0}), ORT_PROVIDERS["cpu"]]
    try:
        sessions = [
            ort.InferenceSession(str(path), sess_options=options, providers=providers)
            for _ in range(instances)
        ]
    except Exception as e:  # ORT raises its own untyped errors for broken models
        raise BundleError(f"{path} cannot be loaded by onnxruntime: {e}") from e
    active = sessions[0].get_providers()
    if provider == "cuda" and ORT_PROVIDERS["cuda"] not in active:
        raise RuntimeConfigError(
            f"onnxruntime could not start the CUDA provider (active: {active}); check the "
            "CUDA/cuDNN libraries, or use --provider cpu"
        )
    return sessions


def _checked_output(session: Any, manifest: Manifest, path: Path, packed: bool) -> str:
    """The name of the graph's reward output, once its inputs and output shape are what the
    runtime feeds and reads."""
    names = [i.name for i in session.get_inputs()]
    expected = PACKED_INPUTS if packed else INPUT_NAMES
    if sorted(names) != sorted(expected):
        raise BundleError(
            f"{path} has inputs {names}; this graph must take exactly "
            f"{list(expected)}; export the bundle again"
        )
    outputs = {o.name: o for o in session.get_outputs()}
    output = outputs.get(OUTPUT_NAME, session.get_outputs()[0])
    check_output_shape(list(output.shape), manifest, path, packed=packed)
    return str(output.name)
