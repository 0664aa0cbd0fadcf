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
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    RowRewards,
    certificate_reference,
    certify,
    check_rows,
    graph_parity,
    graph_scorer,
    on_cuda,
    pair_rows,
    pair_scores,
    torch_rewards,
)
from rmserve.training.export.graph import export_graph, wrapper_module
from rmserve.training.export.memory import preflight
from rmserve.training.export.options import ExportError, ExportOptions
from rmserve.training.export.plan import ExportPlan, make_plan
from rmserve.training.export.staging import move_into_place, staged
from rmserve.training.export.variants import (
    PackedTrace,
    check_packed,
    check_variant,
    trace_packed,
)
from rmserve.training.metadata import EnsembleInfo
from rmserve.training.pairs import EncodedExamples, PairScores, encode_examples, pair_metrics
from rmserve.training.scoring import reward_normalization
from rmserve.training.text_path import TextPathReference
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
    preflight(str(checkpoint_dir), options, step)  # refuses before the weights load
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


@dataclass(frozen=True)
class _TorchReferences:
    """What the checks need from torch, computed while the model is loaded."""

    parity: RowRewards  # the parity rows and torch's rewards for them
    text_path: TextPathReference  # the certificate's conversations and transformers' logits
    packed: PackedTrace | None  # the traced packed graph, when there is one
    packed_rows: RowRewards | None  # the packed check's items and their whole-item rewards


def _write_bundle(
    staging: Path, plan: ExportPlan, checks: Checks, step: Callable[[str], None]
) -> Manifest:
    """Write every file of the bundle into ``staging``, checking as it goes; the manifest last.

    Everything that needs torch runs first (tracing the graphs, torch's rewards of the check
    rows, transformers' logits of the text-path certificate); then the plan lets go of the
    torch model(s) and the ONNX Runtime checks run, one session at a time. Every check row is
    encoded at the check length and scored in batches under the token budget
    (:mod:`~rmserve.training.export.checks`)."""
    plan.tokenizer.backend_tokenizer.save(str(staging / TOKENIZER_NAME))
    bound = plan.check_length
    # The serving truncation at the check length: prompts cut from the left, the response kept.
    encoder = PairEncoder.from_file(str(staging / TOKENIZER_NAME), bound, plan.text_format)
    graph = staging / VARIANT_FILES[plan.dtype]
    encoded = (
        encode_examples(plan.eval_pairs, encoder, plan.text_format) if plan.eval_pairs else None
    )
    rows = check_rows(encoder, plan.text_format, encoded)
    references = _torch_references(staging, graph, plan, encoder, encoded, rows, step)
    plan.release_models()
    gc.collect()  # the torch weights go before the ONNX Runtime sessions load

    budget = plan.options.check_batch_tokens
    step(
        f"{plan.dtype} parity: torch against onnxruntime on {len(rows)} rows of mixed lengths "
        f"up to {bound} tokens, in batches of at most {budget} padded tokens"
    )
    scorer = graph_scorer(graph, plan.dtype)
    per_output = graph_parity(
        references.parity, scorer, plan.pad_token_id, checks.tolerance, plan.dtype
    )
    parity: dict[str, dict[str, float]] = {plan.dtype: {"max_abs_diff": max(per_output)}}
    text_path = references.text_path
    step(
        f"text-path parity: {len(text_path.ids)} conversations through the bundle against "
        f"transformers ({len(text_path.too_long)} longer than {bound} tokens skipped)"
    )
    parity[plan.dtype] |= certify(text_path, scorer, plan, checks.tolerance)
    if plan.dtype == "fp16":
        parity["fp16"]["checked_on_cuda"] = float(on_cuda("fp16"))
    evaluation = plan.info.evaluation if plan.info else None
    normalization = plan.info.normalization if plan.info else None
    members: MemberScores | None = None
    reference: PairScores | None = None
    if encoded is not None:
        step(f"evaluating on {len(encoded.winners)} eval pairs")
        if plan.ensemble is not None:
            members = score_members(
                encoded,
                scorer,
                plan.pad_token_id,
                plan.options.batch_size,
                max_tokens=budget,
            )
        reference = pair_scores(encoded, scorer, plan, members)
        evaluation = _evaluation(reference, plan.eval_data)
        normalization = normalization or _normalization(reference)
    del scorer  # the session closes before the next one loads
    gc.collect()
    if encoded is not None and reference is not None:
        for precision in plan.extra_variants:
            step(f"{precision} variant: converting and checking decisions against fp32")
            parity[precision] = check_variant(
                staging, graph, precision, encoded, reference, plan, checks
            )
    for numbers in parity.values():
        numbers["checked_up_to_tokens"] = float(bound)
    packed = None
    if references.packed is not None and references.packed_rows is not None:
        packed = check_packed(
            staging, plan, references.packed, references.packed_rows, checks.tolerance, step
        )
    step("hashing every file of the bundle")
    ensemble = _ensemble(plan.ensemble, per_output, members)
    manifest = _manifest(
        staging, plan, parity, evaluation, normalization or _UNMEASURED, ensemble, packed
    )
    manifest.write(staging)
    return manifest


def _torch_references(
    staging: Path,
    graph: Path,
    plan: ExportPlan,
    encoder: PairEncoder,
    encoded: EncodedExamples | None,
    rows: list[list[int]],
    step: Callable[[str], None],
) -> _TorchReferences:
    """Everything the export needs from the torch model(s): the plain graph (and the packed
    one) traced, and torch's side of every check, in batches under the token budget. The
    modules built here hold the model and go when this returns."""
    budget = plan.options.check_batch_tokens
    wrapper = wrapper_module(plan)
    export_graph(wrapper, graph, plan, step)
    step(f"torch references: {len(rows)} parity rows and the text-path conversations")
    parity = torch_rewards(wrapper, rows, plan.pad_token_id, budget)
    text_path = certificate_reference(encoder, plan)
    packed = trace_packed(staging, plan, step) if plan.options.packed else None
    packed_rows = None
    if packed is not None:
        # The parity rows, and both responses of eval pairs: items that really share a prompt.
        shared = pair_rows(encoded) if encoded is not None else []
        packed_rows = (
            parity + torch_rewards(wrapper, shared, plan.pad_token_id, budget) if shared else parity
        )
    return _TorchReferences(parity, text_path, packed, packed_rows)


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
    return Manifest(
        format_version=FORMAT_VERSION,
        model_name=plan.model_name,
        base_model=plan.info.base_model if plan.info else plan.source,
        architecture=Architecture(
            kind=plan.kind,
            model_type=plan.model_type,
            pooling=plan.pooling,
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
