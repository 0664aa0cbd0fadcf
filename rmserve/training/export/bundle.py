"""Export a checkpoint to a servable bundle (docs/architecture.md: The bundle contract):
:func:`export_bundle`, the top of the export package.

The bundle is written in this order: ``tokenizer.json``, ``model.onnx`` (and the requested
``model.int8.onnx`` / ``model.fp16.onnx``), then the parity checks, and only when they all pass,
``rmserve.json``. A bundle without a manifest is refused by the service, so a failed check
can never be served by mistake. It is built in a staging folder beside ``out_dir`` and moved
into place whole.

An ensemble checkpoint (``rmserve_training.json`` says its K outputs are members) exports as
one graph of output [batch, K]: the fp32 check is made per member (``ensemble.member_parity``),
the evaluation, the normalization fallback and the int8/fp16 decision checks use the members'
mean, and the manifest's ``ensemble`` section records each member's accuracy and how much the
members disagree on the eval pairs.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from rmserve import __version__
from rmserve.encoding import PairEncoder
from rmserve.manifest import (
    FORMAT_VERSION,
    TOKENIZER_NAME,
    VARIANT_FILES,
    Architecture,
    Ensemble,
    Evaluation,
    Manifest,
    Normalization,
    Packed,
    Variant,
    sha256_file,
)
from rmserve.training.data import PreferenceExample
from rmserve.training.export.checks import (
    FP16_TOLERANCE,
    Checks,
    certify,
    check_rows,
    graph_parity,
    graph_scorer,
    on_cuda,
    pair_rows,
    pair_scores,
)
from rmserve.training.export.graph import export_graph, wrapper_module
from rmserve.training.export.options import ExportError, ExportOptions
from rmserve.training.export.plan import ExportPlan, make_plan
from rmserve.training.export.staging import move_into_place, staged
from rmserve.training.export.variants import check_variant, packed_graphs
from rmserve.training.metadata import EnsembleInfo
from rmserve.training.modeling import architecture_of
from rmserve.training.pairs import PairScores, encode_examples, pair_metrics
from rmserve.training.scoring import reward_normalization
from rmserve.training.uncertainty import MemberScores, disagreement, score_members

__all__ = ["ExportError", "ExportOptions", "export_bundle"]


def export_bundle(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    *,
    eval_pairs: Sequence[PreferenceExample] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Export ``checkpoint_dir`` (a folder or a hub id) to a bundle in ``out_dir``, as
    ``options`` ask (:class:`ExportOptions`; its defaults are ``rmserve export``'s).

    ``eval_pairs`` (with ``options.eval_data`` naming where they came from) feed the
    evaluation section and the int8/fp16 decision checks; without them, int8/fp16 need the
    eval set that training recorded in ``rmserve_training.json``. ``max_length`` defaults to
    what training used, else what the model supports; the text format to what training used,
    else the model's chat template (:func:`choose_text_format`). ``dtype="fp16"`` loads the
    weights in half precision (never a full fp32 copy) and writes a bundle of one fp16
    variant, for CUDA. ``packed``: a decoder also gets its packed graph (shared-prompt reuse,
    :mod:`rmserve.packing`), checked against torch item by item. ``model_name`` defaults to
    the model's own (:func:`default_model_name`), not ``out_dir``'s. ``progress`` receives
    each step's line. Raises :class:`ExportError` with the numbers when a check fails, and
    then leaves ``out_dir`` as it was.
    """
    if options is None:
        options = ExportOptions()
    started = time.perf_counter()

    def step(message: str) -> None:
        (progress or _silent)(f"[{time.perf_counter() - started:7.1f} s] {message}")

    if options.dtype == "fp16" and (options.int8 or options.fp16):
        raise ExportError(
            "--dtype fp16 exports the fp16 graph itself; --int8 and --fp16 convert an fp32 "
            "graph: export with --dtype fp32 for those variants"
        )
    out = Path(out_dir)
    plan = make_plan(str(checkpoint_dir), options, step, eval_pairs)
    fp32_tolerance = options.fp32_tolerance
    tolerance = fp32_tolerance if options.dtype == "fp32" else max(fp32_tolerance, FP16_TOLERANCE)
    checks = Checks(tolerance, options.min_agreement, options.max_accuracy_drop)
    # Built in a locked staging folder beside ``out`` and moved into place whole: a failed
    # export leaves neither a half-written bundle nor a damaged old one, and what a killed
    # export left there is cleaned up (never a running export's folder).
    with staged(out) as staging:
        manifest = _write_bundle(staging, plan, checks, step)
        move_into_place(staging, out)
    step(f"bundle written to {out}")
    return manifest


def _silent(message: str) -> None:
    del message


def _write_bundle(
    staging: Path, plan: ExportPlan, checks: Checks, step: Callable[[str], None]
) -> Manifest:
    """Write every file of the bundle into ``staging``, checking as it goes; the manifest last."""
    plan.tokenizer.backend_tokenizer.save(str(staging / TOKENIZER_NAME))
    encoder = PairEncoder.from_file(
        str(staging / TOKENIZER_NAME), plan.max_length, plan.text_format
    )
    graph = staging / VARIANT_FILES[plan.dtype]
    wrapper = wrapper_module(plan)
    export_graph(wrapper, graph, plan, step)
    step(f"{plan.dtype} parity: torch against onnxruntime on a padded batch of mixed lengths")
    encoded = (
        encode_examples(plan.eval_pairs, encoder, plan.text_format) if plan.eval_pairs else None
    )
    rows = check_rows(encoder, plan.text_format, encoded)
    scorer = graph_scorer(graph, plan.dtype)
    per_output = graph_parity(
        wrapper, scorer, rows, plan.pad_token_id, checks.tolerance, plan.dtype
    )
    parity: dict[str, dict[str, float]] = {plan.dtype: {"max_abs_diff": max(per_output)}}
    step("text-path parity: conversations through the bundle against transformers")
    parity[plan.dtype] |= certify(encoder, scorer, plan, checks.tolerance)
    if plan.dtype == "fp16":
        parity["fp16"]["checked_on_cuda"] = float(on_cuda("fp16"))
    evaluation = plan.info.evaluation if plan.info else None
    normalization = plan.info.normalization if plan.info else None
    members: MemberScores | None = None
    if encoded is not None:
        step(f"evaluating on {len(encoded.winners)} eval pairs")
        if plan.ensemble is not None:
            members = score_members(encoded, scorer, plan.pad_token_id, plan.options.batch_size)
        reference = pair_scores(encoded, scorer, plan, members)
        evaluation = _evaluation(reference, plan.eval_data)
        normalization = normalization or _normalization(reference)
        for precision in plan.extra_variants:
            step(f"{precision} variant: converting and checking decisions against fp32")
            parity[precision] = check_variant(
                staging, graph, precision, encoded, reference, plan, checks
            )
    packed = None
    if plan.options.packed:
        shared_rows = [*rows, *pair_rows(encoded)] if encoded is not None else rows
        packed = packed_graphs(staging, plan, wrapper, shared_rows, checks.tolerance, step)
    step("hashing every file of the bundle")
    ensemble = _ensemble(plan.ensemble, per_output, members)
    manifest = _manifest(
        staging, plan, parity, evaluation, normalization or _UNMEASURED, ensemble, packed
    )
    manifest.write(staging)
    return manifest


_UNMEASURED = Normalization(
    mean=0.0, std=1.0, n=0, reference="not measured (no training info or eval pairs)"
)


def _ensemble(
    info: EnsembleInfo | None, member_parity: list[float], members: MemberScores | None
) -> Ensemble | None:
    """The manifest's ensemble section: per-member parity always, per-member accuracy and
    disagreement when there were eval pairs."""
    if info is None:
        return None
    accuracy: tuple[float, ...] = ()
    spread: dict[str, float] = {}
    if members is not None:
        accuracy = tuple(
            float(pair_metrics(members.member(k))["accuracy"]) for k in range(members.members)
        )
        spread = disagreement(members)
    return Ensemble(
        members=info.members,
        diversity=info.description,
        member_accuracy=accuracy,
        member_parity=tuple(member_parity),
        disagreement=spread,
    )


def _manifest(
    staging: Path,
    plan: ExportPlan,
    parity: dict[str, dict[str, float]],
    evaluation: Evaluation | None,
    normalization: Normalization,
    ensemble: Ensemble | None = None,
    packed: Packed | None = None,
) -> Manifest:
    variants = {
        precision: Variant(
            file=VARIANT_FILES[precision],
            sha256=sha256_file(staging / VARIANT_FILES[precision]),
            precision=precision,  # type: ignore[arg-type]
            parity=numbers,
        )
        for precision, numbers in parity.items()
    }
    named = {TOKENIZER_NAME, *(v.file for v in variants.values())}
    kind, pooling = architecture_of(plan.model)
    return Manifest(
        format_version=FORMAT_VERSION,
        model_name=plan.model_name,
        base_model=plan.info.base_model if plan.info else plan.source,
        architecture=Architecture(
            kind=kind, model_type=plan.model.config.model_type, pooling=pooling
        ),
        max_length=plan.max_length,
        pad_token_id=plan.pad_token_id,
        padding_side="right",
        truncation="prompt_left",
        text_format=plan.text_format,
        normalization=normalization,
        evaluation=evaluation,
        variants=variants,
        tokenizer_sha256=sha256_file(staging / TOKENIZER_NAME),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        rmserve_version=__version__,
        labels=plan.labels,
        reward_head=plan.reward_head,
        files={
            p.name: sha256_file(p)
            for p in sorted(staging.iterdir())
            if p.is_file() and p.name not in named
        },
        ensemble=ensemble,
        packed=packed,
    )


def _evaluation(scores: PairScores, eval_data: str | None) -> Evaluation:
    metrics = pair_metrics(scores)
    return Evaluation(
        accuracy=float(metrics["accuracy"]),
        n=int(metrics["n"]),
        data=eval_data or "eval pairs given to export",
        mean_margin=float(metrics["mean_margin"]),
        shorter_wins_accuracy=float(metrics["shorter_wins_accuracy"]),
    )


def _normalization(scores: PairScores) -> Normalization:
    rewards = np.concatenate([scores.chosen, scores.rejected])
    return reward_normalization(
        rewards, f"eval pairs ({rewards.size} responses), measured at export"
    )
