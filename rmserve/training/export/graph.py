"""How the model becomes an ONNX graph: the graphs' signatures, the wrapper modules that are
traced, and :func:`export_onnx`.

Exporter: the TorchScript exporter (``dynamo=False``) at opset 17 by default. It gives exact
dynamic axes for the wrapper below and exports in under a second; ``exporter="dynamo"`` uses
torch.export instead (slower, same numbers on BERT, GPT-2 and Qwen2), and ``"fused"`` then
rewrites its graph into ONNX Runtime's fused attention and RMS-norm operators
(:mod:`rmserve.training.export.fusion`; decoders gain most). The traps of issue 3:
the wrapper is put in ``.eval()`` (dropout off), decoders pool with ``attention_mask.sum - 1``
and a gather (no int64 ArgMax), and the fp32 check runs at lengths beyond the trace length.

Above the plan; below checks, variants and bundle (which it never imports).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rmserve.formatting import TextPairFormat
from rmserve.training.export.fusion import fuse_for_ort
from rmserve.training.export.onnx_files import gather_external_data
from rmserve.training.export.options import Exporter
from rmserve.training.export.packed import PACKED_INPUTS, trace_inputs
from rmserve.training.export.plan import ExportPlan
from rmserve.training.modeling import RewardModel, RewardStack

__all__ = [
    "GraphSignature",
    "certified_model",
    "export_graph",
    "export_onnx",
    "packed_signature",
    "plain_signature",
    "wrapper_module",
]


@dataclass(frozen=True)
class GraphSignature:
    """A graph's input names, placeholder inputs for tracing and dynamic axes (by name, for
    the inputs and the ``reward`` output)."""

    inputs: tuple[str, ...]
    example: tuple[torch.Tensor, ...]
    axes: dict[str, dict[int, str]]


def plain_signature(trace_length: int = 8) -> GraphSignature:
    """(input_ids, attention_mask) [batch, sequence] -> reward [batch] or [batch, K]."""
    ids = torch.full((2, trace_length), 1, dtype=torch.int64)  # (B, T) placeholder ids
    axes = {0: "batch", 1: "sequence"}
    return GraphSignature(
        inputs=("input_ids", "attention_mask"),
        example=(ids, torch.ones_like(ids)),
        axes={"input_ids": axes, "attention_mask": axes, "reward": {0: "batch"}},
    )


def packed_signature(pad_token_id: int) -> GraphSignature:
    """The packed graph of :mod:`rmserve.packing`: rows of items sharing prompts."""
    axes = {0: "rows", 1: "sequence"}
    items = {0: "rows", 1: "items"}
    return GraphSignature(
        inputs=PACKED_INPUTS,
        example=trace_inputs(pad_token_id),
        axes={**dict.fromkeys(PACKED_INPUTS[:3], axes), "reward_positions": items, "reward": items},
    )


def export_onnx(
    wrapper: torch.nn.Module,
    path: Path,
    *,
    exporter: Exporter = "torchscript",
    opset: int = 17,
    signature: GraphSignature | None = None,
) -> dict[str, int]:
    """Write the wrapper as an ONNX file with dynamic axes (``signature``: the plain graph's
    by default): self-contained, or for a model past protobuf's 2 GB, with its weights in one
    ``<path>.data`` beside it. Returns the fusions applied (``exporter="fused"``; empty
    otherwise)."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".trace-") as tmp:
        traced = Path(tmp) / "model.onnx"
        tracer = "dynamo" if exporter == "fused" else exporter
        _trace(wrapper, traced, tracer, opset, signature or plain_signature())
        fusions: dict[str, int] = {}
        if exporter == "fused":
            fused = Path(tmp) / "fused" / "model.onnx"
            fused.parent.mkdir()
            fusions = fuse_for_ort(traced, fused)
            traced = fused
        gather_external_data(traced, path)
    return fusions


def _trace(
    wrapper: torch.nn.Module,
    path: Path,
    exporter: Exporter,
    opset: int,
    signature: GraphSignature,
) -> None:
    wrapper.eval()  # the legacy exporter traces whatever mode the module is in
    names = {"input_names": list(signature.inputs), "output_names": ["reward"]}
    with warnings.catch_warnings():
        # Tracer warnings about python-level shape checks inside transformers are expected:
        # the fp32 parity check below is what proves the graph right at other shapes.
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                wrapper,
                signature.example,
                str(path),
                dynamo=False,
                opset_version=opset,
                dynamic_axes=signature.axes,
                do_constant_folding=True,
                **names,  # type: ignore[arg-type]
            )
        else:
            torch.onnx.export(
                wrapper,
                signature.example,
                str(path),
                dynamo=True,
                opset_version=max(opset, 18),
                dynamic_shapes={name: signature.axes[name] for name in signature.inputs},
                external_data=True,
                **names,  # type: ignore[arg-type]
            )


def export_graph(wrapper: Any, graph: Path, plan: ExportPlan, step: Callable[[str], None]) -> None:
    options = plan.options
    step(f"tracing the model to ONNX ({options.exporter} exporter, opset {options.opset})")
    fusions = export_onnx(wrapper, graph, exporter=options.exporter, opset=options.opset)
    if options.exporter == "fused":
        applied = ", ".join(f"{name} {count}" for name, count in sorted(fusions.items()))
        step(f"fused for onnxruntime: {applied or 'nothing matched (the graph is unchanged)'}")


def wrapper_module(plan: ExportPlan) -> torch.nn.Module:
    # An encoder scored on text pairs learnt segment ids (token_type_ids) for the answer:
    # the graph derives them from the separator, so the bundle keeps its two inputs.
    uses_segments = int(getattr(plan.model.config, "type_vocab_size", 0) or 0) > 1
    pairs = isinstance(plan.text_format, TextPairFormat) and uses_segments
    separator = plan.tokenizer.sep_token_id if pairs else None
    if plan.members:
        stack = [RewardModel(m, plan.pooling, pair_separator_id=separator) for m in plan.members]
        return RewardStack(stack).eval()
    return RewardModel(plan.model, plan.pooling, pair_separator_id=separator).eval()


def certified_model(plan: ExportPlan) -> Any:
    """What the text-path check runs through transformers: the model, or its members."""
    return _StackedLogits(list(plan.members)) if plan.members else plan.model


class _StackedLogits(torch.nn.Module):
    """The members of an independent ensemble as one transformers-like model whose logits are
    (B, K), for the text-path check, which compares ``model(**inputs).logits`` with the
    bundle's scores."""

    def __init__(self, models: list[Any]):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, **inputs: torch.Tensor) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.cat([m(**inputs).logits for m in self.models], -1))
