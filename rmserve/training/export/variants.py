"""The graphs derived from the exported one, each behind its gate: the int8 and fp16
variants (decisions against fp32 on the eval pairs) and a decoder's packed graph(s) (item by
item against whole-item scoring).

Above plan, graph and checks; below bundle (which it never imports).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmserve.manifest import PACKED_FILES, VARIANT_FILES, Packed, Precision
from rmserve.training.export.checks import (
    FP16_TOLERANCE,
    Checks,
    RowRewards,
    check_session,
    decision_parity,
    graph_scorer,
    on_cuda,
    pair_scores,
)
from rmserve.training.export.graph import export_onnx, packed_signature
from rmserve.training.export.onnx_files import save_model, share_weights
from rmserve.training.export.options import ExportError
from rmserve.training.export.packed import (
    PackedRewardModel,
    PackedStack,
    packed_parity,
    token_cost,
    unpackable,
)
from rmserve.training.export.plan import ExportPlan
from rmserve.training.export.quantize import QuantizationError, quantize_int8
from rmserve.training.pairs import EncodedExamples, PairScores
from rmserve.training.scoring import score_ids

__all__ = [
    "CALIBRATION_TEXTS",
    "PackedTrace",
    "check_packed",
    "check_variant",
    "convert_fp16",
    "trace_packed",
]


# Eval texts that choose int8's fp32 outlier channels (32 were enough on MiniLM).
CALIBRATION_TEXTS = 128


def check_variant(
    staging: Path,
    graph: Path,
    precision: Precision,
    encoded: EncodedExamples,
    reference: PairScores,
    plan: ExportPlan,
    checks: Checks,
) -> dict[str, float]:
    """Convert the fp32 graph to ``precision`` and check its decisions on the eval pairs;
    the variant's session is closed before this returns."""
    path = staging / VARIANT_FILES[precision]
    if precision == "int8":
        # Per-token int8 (batch-invariant); the eval texts only choose which few input
        # channels stay in fp32 (rmserve.training.export.quantize), no scale is fitted to them.
        rows = max(1, min(8, plan.options.check_batch_tokens // plan.check_length))
        try:
            quantize_int8(
                graph, path, encoded.ids[:CALIBRATION_TEXTS], plan.pad_token_id, batch_size=rows
            )
        except QuantizationError as e:
            raise ExportError(str(e)) from e
    else:
        convert_fp16(graph, path)
    scorer = graph_scorer(path, precision)
    scores = pair_scores(encoded, scorer, plan)
    del scorer  # the session closes before the next one loads
    gc.collect()
    numbers = decision_parity(
        precision, reference, scores, checks.min_agreement, checks.max_accuracy_drop
    )
    if precision == "fp16":  # 1.0: measured on the GPU that will serve it
        numbers["checked_on_cuda"] = float(on_cuda(precision))
    return numbers


def convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: the inputs stay int64 and `reward` stays float32, as the contract says.
    save_model(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), dst)


@dataclass(frozen=True)
class PackedTrace:
    """The packed graph of the exported precision, traced while the torch model was loaded,
    and what its manifest section needs from the model."""

    base: Path
    skip_token_id: int | None
    token_cost: float


def trace_packed(
    staging: Path, plan: ExportPlan, step: Callable[[str], None]
) -> PackedTrace | None:
    """Trace the packed graph of the exported precision (torch's part of the packed graph;
    it shares the plain graph's weights in :func:`check_packed`); None when the model cannot
    be packed exactly (said in a step)."""
    why = unpackable(plan.model, plan.pooling, plan.max_length)
    if why is not None:
        step(f"no packed graph: {why}")
        return None
    module = PackedStack(plan.members) if plan.members else PackedRewardModel(plan.model)
    base = staging / PACKED_FILES[plan.dtype]
    step(f"packed graph (items sharing a prompt in one row): tracing {base.name}")
    export_onnx(
        module.eval(),
        base,
        exporter=plan.options.exporter,
        opset=plan.options.opset,
        signature=packed_signature(plan.pad_token_id),
    )
    return PackedTrace(base, plan.model.config.pad_token_id, token_cost(plan.model))


def check_packed(
    staging: Path,
    plan: ExportPlan,
    trace: PackedTrace,
    reference: RowRewards,
    tolerance: float,
    step: Callable[[str], None],
) -> Packed:
    """The packed graph of the exported precision (and of fp16 when asked), each checked
    item by item against whole-item scoring: torch's rewards (``reference``, computed before
    the torch model was freed) for the exported precision, the fp16 plain graph for fp16.
    Items sharing a prompt are packed in rows of at most the check length, in batches of at
    most ``--check-batch-tokens`` padded tokens; each session is closed before the next.

    The packed graph first shares the plain graph's weights (after the int8/fp16 variants
    were converted from the plain graph as it was written)."""
    shared = share_weights(staging / VARIANT_FILES[plan.dtype], trace.base)
    step(f"packed graph reads {shared / 1e6:.1f} MB of weights from the plain graph's data file")
    rows = reference.rows
    budget = plan.options.check_batch_tokens
    files: dict[str, str] = {}
    diffs: dict[str, float] = {}
    precisions = [plan.dtype, *(["fp16"] if "fp16" in plan.extra_variants else [])]
    for precision in precisions:
        path = staging / PACKED_FILES[precision]
        bound = tolerance
        whole: Any = reference.rewards
        if precision != plan.dtype:  # fp16 from the fp32 packed graph, against fp16 plain
            convert_fp16(trace.base, path)
            plain = staging / VARIANT_FILES[precision]
            share_weights(plain, path)
            scorer = graph_scorer(plain, precision)
            whole = score_ids(scorer, rows, plan.pad_token_id, max_tokens=budget)
            del scorer
            gc.collect()
            bound = max(tolerance, FP16_TOLERANCE)
        session = check_session(path, precision)
        diff = packed_parity(
            whole,
            lambda feeds, s=session: s.run(None, feeds)[0],
            rows,
            plan.pad_token_id,
            trace.skip_token_id,
            len(plan.labels),
            max_tokens=budget,
            max_row_length=plan.check_length,
        )
        del session
        gc.collect()
        if not diff <= bound:
            raise ExportError(
                f"{precision} packed graph parity failed: max |whole item - packed| = "
                f"{diff:.3g} > {bound:.1g} over {len(rows)} items sharing prompts; export "
                "with --no-packed to serve without shared-prompt reuse"
            )
        step(f"{precision} packed graph: max |whole item - packed| = {diff:.2g}")
        files[precision] = path.name
        diffs[precision] = diff
    return Packed(
        files=files,
        skip_token_id=trace.skip_token_id,
        max_abs_diff=diffs,
        token_cost=trace.token_cost,
    )
