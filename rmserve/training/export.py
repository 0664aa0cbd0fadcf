"""Export a checkpoint to a servable bundle (docs/architecture.md: The bundle contract),
checking parity before the manifest.

The bundle is written in this order: ``tokenizer.json``, ``model.onnx`` (and the requested
``model.int8.onnx`` / ``model.fp16.onnx``), then the parity checks, and only when they all pass,
``rmserve.json``. A bundle without a manifest is refused by the service, so a failed check
can never be served by mistake.

Parity:
- fp32: max |torch - onnxruntime| <= ``fp32_tolerance`` (1e-4) on a right-padded batch of
  mixed lengths, longer than the trace shape (dynamic axes really work), synthetic pairs up
  to max_length plus a slice of the eval pairs;
- int8 / fp16: pairwise decisions agree with fp32 on >= ``min_agreement`` (99%) of the eval
  pairs and accuracy drops by <= ``max_accuracy_drop`` (1 point).

An ensemble checkpoint (``rmserve_training.json`` says its K outputs are members) exports as
one graph of output [batch, K]: the fp32 check is made per member (``ensemble.member_parity``),
the evaluation, the normalization fallback and the int8/fp16 decision checks use the members'
mean, and the manifest's ``ensemble`` section records each member's accuracy and how much the
members disagree on the eval pairs.

Exporter: the TorchScript exporter (``dynamo=False``) at opset 17 by default. It gives exact
dynamic axes for the wrapper below and exports in under a second; ``exporter="dynamo"`` uses
torch.export instead (slower, same numbers on BERT, GPT-2 and Qwen2), and ``"fused"`` then
rewrites its graph into ONNX Runtime's fused attention and RMS-norm operators
(:mod:`rmserve.training.fusion`; decoders gain most). The traps of issue 3:
the wrapper is put in ``.eval()`` (dropout off), decoders pool with ``attention_mask.sum - 1``
and a gather (no int64 ArgMax), and the fp32 check runs at lengths beyond the trace length.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from rmserve import __version__
from rmserve.encoding import PairEncoder
from rmserve.formatting import (
    AnyTextFormat,
    FormattingError,
    TextPairFormat,
    messages_from_pair,
    render,
    render_text,
)
from rmserve.manifest import (
    FORMAT_VERSION,
    PACKED_FILES,
    TOKENIZER_NAME,
    VARIANT_FILES,
    Architecture,
    Ensemble,
    Evaluation,
    Manifest,
    Normalization,
    Packed,
    Pooling,
    Precision,
    Variant,
    ensemble_labels,
    sha256_file,
)
from rmserve.training.checkpoint import HeadError, load_checkpoint
from rmserve.training.data import PreferenceExample
from rmserve.training.fusion import fuse_for_ort
from rmserve.training.metadata import EnsembleInfo, TrainingInfo
from rmserve.training.modeling import (
    RewardModel,
    RewardStack,
    architecture_of,
    default_max_length,
    load_tokenizer,
)
from rmserve.training.onnx_files import gather_external_data, save_model, share_weights
from rmserve.training.packed import (
    PACKED_INPUTS,
    PackedRewardModel,
    PackedStack,
    packed_parity,
    token_cost,
    trace_inputs,
    unpackable,
)
from rmserve.training.pairs import (
    EncodedExamples,
    PairScores,
    encode_examples,
    pair_metrics,
    score_pairs,
)
from rmserve.training.quantize import QuantizationError, quantize_int8
from rmserve.training.scoring import BatchScorer, onnx_scorer, pad_batch, reward_normalization
from rmserve.training.text_path import (
    TextFormatChoice,
    certificate_conversations,
    certify_text_path,
    choose_text_format,
)
from rmserve.training.uncertainty import MemberScores, disagreement, score_members

# "fused": torch.export (dynamo), then ONNX Runtime's fused transformer operators
# (rmserve.training.fusion): attention and RMS norms in one kernel each.
# Eval texts that choose int8's fp32 outlier channels (32 were enough on MiniLM).
CALIBRATION_TEXTS = 128
Exporter = Literal["torchscript", "dynamo", "fused"]

__all__ = ["ExportError", "default_model_name", "export_bundle", "export_onnx"]


class ExportError(RuntimeError):
    """The export failed a check; the message carries the measured numbers."""


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


def _parity_texts(
    encoder: PairEncoder, text_format: AnyTextFormat, count: int = 6
) -> list[list[int]]:
    """Ids of synthetic pairs from a few tokens to max_length, for the fp32 check."""
    sentence = "The quick brown fox jumps over the lazy dog, and then it rests. "
    rows: list[list[int]] = []
    for i in range(count):
        prompt = sentence * (1 + 6 * i)  # long prompts get cut from the left to max_length
        response = sentence * (1 + i)
        try:
            rendered = render(messages_from_pair(prompt, response), text_format)
        except FormattingError:  # a template that refuses this shape of conversation
            continue
        rows.append(encoder.encode(rendered, truncate_response=True).ids)
    rows.append(encoder.encode(render_text("ok", text_format)).ids)
    return rows


def _graph_parity(
    wrapper: torch.nn.Module,
    scorer: BatchScorer,
    rows: Sequence[Sequence[int]],
    pad_token_id: int,
    tolerance: float,
    precision: str,
) -> list[float]:
    """Max |torch - ORT| of each output (one per head or member) over one right-padded
    batch of all rows at once (mixed lengths)."""
    input_ids, mask, expected = _torch_rewards(wrapper, rows, pad_token_id)
    actual = scorer(input_ids, mask)
    gaps = np.abs(expected.astype(np.float64) - actual.astype(np.float64))  # (B,) or (B, K)
    per_output = [float(x) for x in gaps.reshape(len(rows), -1).max(axis=0)]  # (K,)
    diff = max(per_output)
    if not diff <= tolerance:
        raise ExportError(
            f"{precision} parity failed: max |torch - onnxruntime| = {diff:.3g} > "
            f"{tolerance:.1g} on a padded batch of {len(rows)} sequences of lengths "
            f"{sorted(len(r) for r in rows)}; the ONNX graph does not compute what the "
            "checkpoint does"
        )
    return per_output


def _torch_rewards(
    wrapper: torch.nn.Module, rows: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[Any]]:
    """One right-padded batch of ``rows`` (ids, mask) and the wrapper's rewards for it in
    torch: the reference the exported graphs are checked against."""
    input_ids, mask = pad_batch(rows, pad_token_id)
    with torch.no_grad():
        rewards = wrapper(torch.from_numpy(input_ids), torch.from_numpy(mask)).numpy()
    return input_ids, mask, rewards


def _convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: the inputs stay int64 and `reward` stays float32, as the contract says.
    save_model(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), dst)


def _decision_parity(
    precision: str,
    reference: PairScores,
    variant: PairScores,
    min_agreement: float,
    max_accuracy_drop: float,
) -> dict[str, float]:
    """Pairwise decisions of a reduced-precision variant against fp32 on the eval pairs."""
    variant_margin = variant.chosen - variant.rejected  # (P,)
    reference_margin = reference.chosen - reference.rejected  # (P,)
    agreement = float(np.mean(np.sign(variant_margin) == np.sign(reference_margin)))
    drop = float(pair_metrics(reference)["accuracy"]) - float(pair_metrics(variant)["accuracy"])
    if agreement < min_agreement or drop > max_accuracy_drop:
        raise ExportError(
            f"{precision} parity failed on {len(variant_margin)} eval pairs: decisions agree "
            f"with fp32 on {agreement:.2%} (need >= {min_agreement:.0%}) and accuracy drops by "
            f"{drop * 100:.2f} points (allowed <= {max_accuracy_drop * 100:.1f}); "
            f"export without --{precision}"
        )
    return {
        "pairwise_agreement": agreement,
        "accuracy_drop": drop,
        "max_abs_diff_vs_fp32": float(np.max(np.abs(variant.chosen - reference.chosen))),
    }


def _silent(message: str) -> None:
    del message


def _labels(config: Any) -> tuple[str, ...]:
    """One name per output: ``reward`` for one head, config.id2label for several."""
    count = int(getattr(config, "num_labels", 1) or 1)
    if count == 1:
        return ("reward",)
    names = getattr(config, "id2label", None) or {}
    return tuple(str(names.get(i, names.get(str(i), f"LABEL_{i}"))) for i in range(count))


def _reward_head(labels: tuple[str, ...], requested: int | str) -> int:
    """The index of the head ``/v1/score`` returns: a number or one of the labels."""
    if isinstance(requested, str) and not requested.lstrip("-").isdigit():
        if requested not in labels:
            raise ExportError(
                f"--reward-head {requested!r} is not one of the labels {list(labels)}"
            )
        return labels.index(requested)
    index = int(requested)
    if not 0 <= index < len(labels):
        raise ExportError(
            f"--reward-head {index} is out of range: the model has {len(labels)} outputs "
            f"{list(labels)}"
        )
    return index


def _staging_dir(out: Path) -> Path:
    """A fresh folder beside ``out``: the bundle is built there and moved into place whole,
    so a failed export leaves neither a half-written bundle nor a damaged old one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _move_into_place(staging: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


@dataclass(frozen=True)
class _Plan:
    """Everything export decided before it writes: the model, its text path, the variants."""

    source: str
    tokenizer: Any
    model: Any
    pooling: Pooling
    text_format: AnyTextFormat
    max_length: int
    pad_token_id: int
    labels: tuple[str, ...]
    reward_head: int
    ensemble: EnsembleInfo | None  # set when the outputs are the members of one ensemble
    # An ensemble of independent models: every member's model (``model`` is the first).
    members: tuple[Any, ...]
    info: TrainingInfo | None
    eval_pairs: Sequence[PreferenceExample] | None
    eval_data: str | None
    dtype: Precision  # the precision of the exported graph: fp32, or fp16 (--dtype fp16)
    extra_variants: tuple[Precision, ...]  # int8 / fp16 converted from the fp32 graph
    model_name: str
    exporter: Exporter
    opset: int
    batch_size: int
    packed: bool  # also write the packed graph(s), where the model allows it


@dataclass(frozen=True)
class _Checks:
    """The bounds of export's checks (the defaults of export_bundle and the CLI)."""

    tolerance: float  # max |torch - onnxruntime| of the exported graph
    min_agreement: float  # int8/fp16 variants: decisions equal to fp32's
    max_accuracy_drop: float  # int8/fp16 variants: accuracy lost against fp32


# torch's fp16 on CPU and onnxruntime's fp16 kernels round differently: a graph exported in
# half precision is checked against torch in half precision to this bound.
FP16_TOLERANCE = 2e-2


def export_bundle(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    int8: bool = False,
    fp16: bool = False,
    dtype: Literal["fp32", "fp16"] = "fp32",
    eval_pairs: Sequence[PreferenceExample] | None = None,
    eval_data: str | None = None,
    max_length: int | None = None,
    model_name: str | None = None,
    text_format: AnyTextFormat | None = None,
    text_format_choice: TextFormatChoice = "auto",
    head_name: str | None = None,
    reward_head: int | str = 0,
    trust_remote_code: bool = False,
    exporter: Exporter = "torchscript",
    opset: int = 17,
    fp32_tolerance: float = 1e-4,
    min_agreement: float = 0.99,
    max_accuracy_drop: float = 0.01,
    batch_size: int = 32,
    packed: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Export ``checkpoint_dir`` (a folder or a hub id) to a bundle in ``out_dir``.

    ``eval_pairs`` (with ``eval_data`` naming where they came from) feed the evaluation
    section and the int8/fp16 decision checks; without them, int8/fp16 need the eval set that
    training recorded in ``rmserve_training.json``. ``max_length`` defaults to what training
    used, else what the model supports; the text format to what training used, else the
    model's chat template (:func:`choose_text_format`). ``dtype="fp16"`` loads the weights in
    half precision (never a full fp32 copy) and writes a bundle of one fp16 variant, for
    CUDA. ``packed``: a decoder also gets its packed graph (shared-prompt reuse,
    :mod:`rmserve.packing`), checked against torch item by item. ``model_name`` defaults to
    the model's own (:func:`default_model_name`), not ``out_dir``'s. Raises
    :class:`ExportError` with the numbers when a check fails, and then leaves ``out_dir`` as
    it was.
    """
    started = time.perf_counter()

    def step(message: str) -> None:
        (progress or _silent)(f"[{time.perf_counter() - started:7.1f} s] {message}")

    if dtype == "fp16" and (int8 or fp16):
        raise ExportError(
            "--dtype fp16 exports the fp16 graph itself; --int8 and --fp16 convert an fp32 "
            "graph: export with --dtype fp32 for those variants"
        )
    out = Path(out_dir)
    plan = _plan(
        str(checkpoint_dir),
        step,
        dtype=dtype,
        extra_variants=_extra_variants(int8=int8, fp16=fp16),
        eval_pairs=eval_pairs,
        eval_data=eval_data,
        max_length=max_length,
        model_name=model_name or default_model_name(checkpoint_dir),
        text_format=text_format,
        text_format_choice=text_format_choice,
        head_name=head_name,
        reward_head=reward_head,
        trust_remote_code=trust_remote_code,
        exporter=exporter,
        opset=opset,
        batch_size=batch_size,
        packed=packed,
    )
    tolerance = fp32_tolerance if dtype == "fp32" else max(fp32_tolerance, FP16_TOLERANCE)
    checks = _Checks(tolerance, min_agreement, max_accuracy_drop)
    staging = _staging_dir(out)
    try:
        manifest = _write_bundle(staging, plan, checks, step)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    step(f"bundle written to {out}")
    return manifest


def default_model_name(source: str | Path) -> str:
    """The manifest's model name when none is given: the model's own, never the bundle folder's.
    A hub id as given; for a local folder, the preset rmserve trained it with (recorded in
    rmserve_training.json on its own base model), else the folder's name."""
    path = Path(source)
    if not path.is_dir():
        return str(source)
    info = TrainingInfo.read(path)
    if info is not None and info.preset:
        return info.preset
    return path.resolve().name


def _extra_variants(*, int8: bool, fp16: bool) -> tuple[Precision, ...]:
    wanted: list[Precision] = []
    if int8:
        wanted.append("int8")
    if fp16:
        wanted.append("fp16")
    return tuple(wanted)


def _plan(
    source: str,
    step: Callable[[str], None],
    *,
    dtype: Literal["fp32", "fp16"],
    extra_variants: tuple[Precision, ...],
    eval_pairs: Sequence[PreferenceExample] | None,
    eval_data: str | None,
    max_length: int | None,
    model_name: str,
    text_format: AnyTextFormat | None,
    text_format_choice: TextFormatChoice,
    head_name: str | None,
    reward_head: int | str,
    trust_remote_code: bool,
    exporter: Exporter,
    opset: int,
    batch_size: int,
    packed: bool,
) -> _Plan:
    """Load the checkpoint and decide the text path, the length and the heads."""
    info = TrainingInfo.read(source) if Path(source).is_dir() else None
    ensemble = info.ensemble if info else None
    step(f"loading {source} ({dtype})")
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    models, mapped_from = _load_models(source, ensemble, dtype, head_name, trust_remote_code)
    model = models[0]
    members = models if ensemble and ensemble.member_dirs else ()
    kind, pooling = architecture_of(model)
    labels = _output_labels(source, model, members, ensemble)
    why = "given"
    if text_format is None:
        text_format, why = _choose_format(text_format_choice, tokenizer, kind, info)
    length = _max_length(
        source, model, tokenizer, max_length or (info.max_length if info else None)
    )
    head_note = f", head mapped from {mapped_from}" if mapped_from else ""
    step(
        f"{kind} {model.config.model_type}, {model.num_parameters():,} parameters, "
        f"{len(labels)} {'members' if ensemble else 'head(s)'}{head_note}; text format: {why}; "
        f"max_length {length}"
    )
    if extra_variants:
        eval_pairs, eval_data = _pairs_for_checks(eval_pairs, eval_data, info)
    return _Plan(
        source=source,
        tokenizer=tokenizer,
        model=model,
        pooling=pooling,
        text_format=text_format,
        max_length=length,
        pad_token_id=int(tokenizer.pad_token_id),
        labels=labels,
        reward_head=_reward_head(labels, reward_head),
        ensemble=ensemble,
        members=members,
        info=info,
        eval_pairs=eval_pairs,
        eval_data=eval_data,
        dtype=dtype,
        extra_variants=extra_variants,
        model_name=model_name,
        exporter=exporter,
        opset=opset,
        batch_size=batch_size,
        packed=packed,
    )


def _load_models(
    source: str,
    ensemble: EnsembleInfo | None,
    dtype: Literal["fp32", "fp16"],
    head_name: str | None,
    trust_remote_code: bool,
) -> tuple[tuple[Any, ...], str | None]:
    """The model, or each member of an ensemble of independent models (one checkpoint per
    member, in folders of ``source``), in eval mode; and where the head was mapped from."""
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    member_dirs = ensemble.member_dirs if ensemble else ()
    models = []
    try:
        for where in [str(Path(source) / d) for d in member_dirs] or [source]:
            loaded = load_checkpoint(
                where, head_name=head_name, trust_remote_code=trust_remote_code, dtype=torch_dtype
            )
            # eval mode: dropout off (the traced graph keeps whatever mode it sees)
            loaded.model.train(False)
            models.append(loaded.model)
    except HeadError as e:
        raise ExportError(str(e)) from e
    return tuple(models), loaded.mapped_from


def _output_labels(
    source: str, model: Any, members: tuple[Any, ...], ensemble: EnsembleInfo | None
) -> tuple[str, ...]:
    labels = ensemble_labels(len(members)) if members else _labels(model.config)
    if ensemble is not None and labels != ensemble_labels(ensemble.members):
        raise ExportError(
            f"{source}/rmserve_training.json records an ensemble of {ensemble.members} members "
            f"but the model's outputs are {list(labels)}; train the ensemble again"
        )
    return labels


def _choose_format(
    choice: TextFormatChoice, tokenizer: Any, kind: str, info: TrainingInfo | None
) -> tuple[AnyTextFormat, str]:
    try:
        return choose_text_format(choice, tokenizer, kind, info.text_format if info else None)
    except ValueError as e:
        raise ExportError(str(e)) from e


def _max_length(source: str, model: Any, tokenizer: Any, asked: int | None) -> int:
    """``asked`` (the option, else what training used), else what the model supports; never
    more than the model's positions."""
    length = asked or default_max_length(model, tokenizer)
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        raise ExportError(
            f"--max-length {length} exceeds the {positions} positions of {source}; pass "
            f"--max-length {positions} or less"
        )
    return length


def _pairs_for_checks(
    eval_pairs: Sequence[PreferenceExample] | None,
    eval_data: str | None,
    info: TrainingInfo | None,
) -> tuple[Sequence[PreferenceExample], str | None]:
    """The eval pairs of the int8/fp16 decision checks: those given, else training's eval set."""
    if eval_pairs is None and info is not None and info.eval_data:
        from rmserve.training.data import read_examples

        eval_data = info.eval_data
        eval_pairs = read_examples(eval_data).examples
    if not eval_pairs:
        raise ExportError(
            "the int8/fp16 checks compare pairwise decisions with fp32 on eval pairs, and none "
            "were given; pass --eval-data FILE (or train with --eval-data so that the "
            "checkpoint records it)"
        )
    return eval_pairs, eval_data


def _write_bundle(
    staging: Path, plan: _Plan, checks: _Checks, step: Callable[[str], None]
) -> Manifest:
    """Write every file of the bundle into ``staging``, checking as it goes; the manifest last."""
    plan.tokenizer.backend_tokenizer.save(str(staging / TOKENIZER_NAME))
    encoder = PairEncoder.from_file(
        str(staging / TOKENIZER_NAME), plan.max_length, plan.text_format
    )
    graph = staging / VARIANT_FILES[plan.dtype]
    wrapper = _wrapper(plan)
    _export_graph(wrapper, graph, plan, step)
    step(f"{plan.dtype} parity: torch against onnxruntime on a padded batch of mixed lengths")
    encoded = (
        encode_examples(plan.eval_pairs, encoder, plan.text_format) if plan.eval_pairs else None
    )
    rows = _check_rows(encoder, plan.text_format, encoded)
    scorer = _graph_scorer(graph, plan.dtype)
    per_output = _graph_parity(
        wrapper, scorer, rows, plan.pad_token_id, checks.tolerance, plan.dtype
    )
    parity: dict[str, dict[str, float]] = {plan.dtype: {"max_abs_diff": max(per_output)}}
    step("text-path parity: conversations through the bundle against transformers")
    parity[plan.dtype] |= _certify(encoder, scorer, plan, checks.tolerance)
    if plan.dtype == "fp16":
        parity["fp16"]["checked_on_cuda"] = float(_on_cuda("fp16"))
    evaluation = plan.info.evaluation if plan.info else None
    normalization = plan.info.normalization if plan.info else None
    members: MemberScores | None = None
    if encoded is not None:
        step(f"evaluating on {len(encoded.winners)} eval pairs")
        if plan.ensemble is not None:
            members = score_members(encoded, scorer, plan.pad_token_id, plan.batch_size)
        reference = _pair_scores(encoded, scorer, plan, members)
        evaluation = _evaluation(reference, plan.eval_data)
        normalization = normalization or _normalization(reference)
        for precision in plan.extra_variants:
            step(f"{precision} variant: converting and checking decisions against fp32")
            parity[precision] = _variant(
                staging, graph, precision, encoded, reference, plan, checks
            )
    packed = None
    if plan.packed:
        shared_rows = [*rows, *_pair_rows(encoded)] if encoded is not None else rows
        packed = _packed_graphs(staging, plan, wrapper, shared_rows, checks.tolerance, step)
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


def _export_graph(wrapper: Any, graph: Path, plan: _Plan, step: Callable[[str], None]) -> None:
    step(f"tracing the model to ONNX ({plan.exporter} exporter, opset {plan.opset})")
    fusions = export_onnx(wrapper, graph, exporter=plan.exporter, opset=plan.opset)
    if plan.exporter == "fused":
        applied = ", ".join(f"{name} {count}" for name, count in sorted(fusions.items()))
        step(f"fused for onnxruntime: {applied or 'nothing matched (the graph is unchanged)'}")


def _check_rows(
    encoder: PairEncoder, text_format: AnyTextFormat, encoded: EncodedExamples | None
) -> list[list[int]]:
    """The rows of the parity check: synthetic texts of mixed lengths, and a slice of real
    eval texts (real lengths, real vocabulary) when there are eval pairs."""
    rows = _parity_texts(encoder, text_format)
    if encoded is not None:
        rows += encoded.ids[:: max(1, len(encoded.ids) // 16)]
    return rows


def _certify(
    encoder: PairEncoder, scorer: BatchScorer, plan: _Plan, tolerance: float
) -> dict[str, float]:
    """The text-path certificate's parity fields: conversations rendered and tokenized by the
    bundle against transformers' chat template, and their scores against torch."""
    conversations = certificate_conversations(
        [_conversation(e) for e in plan.eval_pairs] if plan.eval_pairs else []
    )
    try:
        certificate = certify_text_path(
            conversations,
            text_format=plan.text_format,
            encoder=encoder,
            tokenizer=plan.tokenizer,
            model=_certified_model(plan),
            scorer=scorer,
            pad_token_id=plan.pad_token_id,
            tolerance=tolerance,
        )
    except ValueError as e:
        raise ExportError(str(e)) from e
    return certificate.as_parity()


def _wrapper(plan: _Plan) -> torch.nn.Module:
    # An encoder scored on text pairs learnt segment ids (token_type_ids) for the answer:
    # the graph derives them from the separator, so the bundle keeps its two inputs.
    uses_segments = int(getattr(plan.model.config, "type_vocab_size", 0) or 0) > 1
    pairs = isinstance(plan.text_format, TextPairFormat) and uses_segments
    separator = plan.tokenizer.sep_token_id if pairs else None
    if plan.members:
        stack = [RewardModel(m, plan.pooling, pair_separator_id=separator) for m in plan.members]
        return RewardStack(stack).eval()
    return RewardModel(plan.model, plan.pooling, pair_separator_id=separator).eval()


def _certified_model(plan: _Plan) -> Any:
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


# Eval pairs whose two responses (one prompt) join the packed graph's check.
PACKED_CHECK_PAIRS = 16


def _pair_rows(encoded: EncodedExamples) -> list[list[int]]:
    """Both responses of the first eval pairs: rows that really share their prompt."""
    first = slice(PACKED_CHECK_PAIRS)
    pairs = zip(encoded.winners[first], encoded.losers[first], strict=True)
    return [encoded.ids[i] for pair in pairs for i in pair]


def _packed_graphs(
    staging: Path,
    plan: _Plan,
    wrapper: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    tolerance: float,
    step: Callable[[str], None],
) -> Packed | None:
    """The packed graph of the exported precision (and of fp16 when asked), each checked
    item by item against whole-item scoring: torch for the exported precision, the fp16
    plain graph for fp16. None when the model cannot be packed exactly (said in a step)."""
    why = unpackable(plan.model, plan.pooling, plan.max_length)
    if why is not None:
        step(f"no packed graph: {why}")
        return None
    import onnxruntime as ort

    module = PackedStack(plan.members) if plan.members else PackedRewardModel(plan.model)
    base = staging / PACKED_FILES[plan.dtype]
    step(f"packed graph (items sharing a prompt in one row): tracing {base.name}")
    export_onnx(
        module.eval(),
        base,
        exporter=plan.exporter,
        opset=plan.opset,
        signature=packed_signature(plan.pad_token_id),
    )
    shared = share_weights(staging / VARIANT_FILES[plan.dtype], base)
    step(f"packed graph reads {shared / 1e6:.1f} MB of weights from the plain graph's data file")
    skip = plan.model.config.pad_token_id
    input_ids, mask, whole = _torch_rewards(wrapper, rows, plan.pad_token_id)
    files: dict[str, str] = {}
    diffs: dict[str, float] = {}
    precisions = [plan.dtype, *(["fp16"] if "fp16" in plan.extra_variants else [])]
    for precision in precisions:
        path = staging / PACKED_FILES[precision]
        bound = tolerance
        if precision != plan.dtype:  # fp16 from the fp32 packed graph, against fp16 plain
            _convert_fp16(base, path)
            plain = staging / VARIANT_FILES[precision]
            share_weights(plain, path)
            whole = _graph_scorer(plain, precision)(input_ids, mask)
            bound = max(tolerance, FP16_TOLERANCE)
        session = ort.InferenceSession(str(path), providers=_providers_for(precision))
        diff = packed_parity(
            whole,
            lambda feeds, s=session: s.run(None, feeds)[0],
            rows,
            plan.pad_token_id,
            skip,
            len(plan.labels),
        )
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
        files=files, skip_token_id=skip, max_abs_diff=diffs, token_cost=token_cost(plan.model)
    )


def _graph_scorer(path: Path, precision: str) -> BatchScorer:
    if precision == "fp32":
        return onnx_scorer(str(path))
    return onnx_scorer(str(path), _providers_for(precision))


def _variant(
    staging: Path,
    graph: Path,
    precision: Precision,
    encoded: EncodedExamples,
    reference: PairScores,
    plan: _Plan,
    checks: _Checks,
) -> dict[str, float]:
    """Convert the fp32 graph to ``precision`` and check its decisions on the eval pairs."""
    path = staging / VARIANT_FILES[precision]
    if precision == "int8":
        # Per-token int8 (batch-invariant); the eval texts only choose which few input
        # channels stay in fp32 (rmserve.training.quantize), no scale is fitted to them.
        try:
            quantize_int8(graph, path, encoded.ids[:CALIBRATION_TEXTS], plan.pad_token_id)
        except QuantizationError as e:
            raise ExportError(str(e)) from e
    else:
        _convert_fp16(graph, path)
    scorer = _graph_scorer(path, precision)
    scores = _pair_scores(encoded, scorer, plan)
    numbers = _decision_parity(
        precision, reference, scores, checks.min_agreement, checks.max_accuracy_drop
    )
    if precision == "fp16":  # 1.0: measured on the GPU that will serve it
        numbers["checked_on_cuda"] = float(_on_cuda(precision))
    return numbers


def _pair_scores(
    encoded: EncodedExamples,
    scorer: BatchScorer,
    plan: _Plan,
    members: MemberScores | None = None,
) -> PairScores:
    """The scores export checks and evaluates: the reward head's, or for an ensemble the
    members' mean (``members`` when already scored)."""
    if plan.ensemble is None:
        return score_pairs(encoded, scorer, plan.pad_token_id, plan.batch_size, plan.reward_head)
    if members is None:
        members = score_members(encoded, scorer, plan.pad_token_id, plan.batch_size)
    return members.mean()


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
    plan: _Plan,
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


def _on_cuda(precision: str) -> bool:
    return "CUDAExecutionProvider" in _providers_for(precision)


def _providers_for(precision: str) -> list[str]:
    """fp16 is checked on CUDA, the provider that will serve it, when this machine has it."""
    import onnxruntime as ort

    if precision == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _conversation(example: PreferenceExample) -> list[dict[str, str]]:
    """An eval pair's prompt and preferred response, as chat messages."""
    turns = [{"role": m.role, "content": m.content} for m in example.prompt]
    return [*turns, {"role": "assistant", "content": example.responses[0]}]


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
