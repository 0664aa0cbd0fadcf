"""What export decides before it writes anything: the model (or an ensemble's members) and
its tokenizer loaded, the text format, the max length, the output labels and the reward head,
the eval pairs of the checks, all in one :class:`ExportPlan`.

The bottom of the export package with :mod:`~rmserve.training.export.options`: it imports no
other layer of it (graph, checks, variants, bundle).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rmserve.formatting import AnyTextFormat
from rmserve.manifest import ArchitectureKind, Pooling, Precision, ensemble_labels
from rmserve.training.checkpoint import HeadError, load_checkpoint
from rmserve.training.data import PreferenceExample
from rmserve.training.export.options import ExportError, ExportOptions, TextFormatChoice
from rmserve.training.metadata import EnsembleInfo, TrainingInfo
from rmserve.training.modeling import architecture_of, default_max_length, load_tokenizer
from rmserve.training.text_path import choose_text_format

__all__ = ["ExportPlan", "LoadedModels", "default_model_name", "make_plan"]


@dataclass
class LoadedModels:
    """The torch model(s) of a plan, in a holder that export empties
    (:meth:`ExportPlan.release_models`) once every torch reference is computed, so that the
    weights are freed before the ONNX Runtime checks load their sessions."""

    model: Any
    members: tuple[Any, ...]


@dataclass(frozen=True)
class ExportPlan:
    """Everything export decided before it writes: the model, its text path, the variants."""

    source: str
    tokenizer: Any
    loaded: LoadedModels = field(repr=False)
    kind: ArchitectureKind
    model_type: str  # config.model_type
    pooling: Pooling
    text_format: AnyTextFormat
    max_length: int
    pad_token_id: int
    labels: tuple[str, ...]
    reward_head: int
    ensemble: EnsembleInfo | None  # set when the outputs are the members of one ensemble
    info: TrainingInfo | None
    eval_pairs: Sequence[PreferenceExample] | None
    eval_data: str | None
    dtype: Precision  # the precision of the exported graph: fp32, or fp16 (--dtype fp16)
    extra_variants: tuple[Precision, ...]  # int8 / fp16 converted from the fp32 graph
    model_name: str
    # What was asked; the exporter, opset, batch size and packed switch are read from it.
    options: ExportOptions
    # The longest row of every check: min(max_length, options.check_length).
    check_length: int

    @property
    def model(self) -> Any:
        """The torch model (an ensemble's first member); None once released."""
        return self.loaded.model

    @property
    def members(self) -> tuple[Any, ...]:
        """An ensemble of independent models: every member's model (``model`` is the first);
        empty otherwise, and once released."""
        return self.loaded.members

    def release_models(self) -> None:
        """Drop the plan's references to the torch model(s) (then ``gc.collect()`` frees them
        when nothing else holds them)."""
        self.loaded.model = None
        self.loaded.members = ()


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


def make_plan(
    source: str,
    options: ExportOptions,
    step: Callable[[str], None],
    eval_pairs: Sequence[PreferenceExample] | None = None,
) -> ExportPlan:
    """Load the checkpoint and decide the text path, the length and the heads."""
    dtype = options.dtype
    trust_remote_code = options.trust_remote_code
    info = TrainingInfo.read(source) if Path(source).is_dir() else None
    ensemble = info.ensemble if info else None
    step(f"loading {source} ({dtype})")
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    models, mapped_from = _load_models(
        source, ensemble, dtype, options.head_name, trust_remote_code
    )
    model = models[0]
    members = models if ensemble and ensemble.member_dirs else ()
    kind, pooling = architecture_of(model)
    labels = _output_labels(source, model, members, ensemble)
    text_format, why = options.text_format, "given"
    if text_format is None:
        text_format, why = _choose_format(options.text_format_choice, tokenizer, kind, info)
    length = _max_length(
        source, model, tokenizer, options.max_length or (info.max_length if info else None)
    )
    head_note = f", head mapped from {mapped_from}" if mapped_from else ""
    step(
        f"{kind} {model.config.model_type}, {model.num_parameters():,} parameters, "
        f"{len(labels)} {'members' if ensemble else 'head(s)'}{head_note}; text format: {why}; "
        f"max_length {length}"
    )
    extra_variants = _extra_variants(int8=options.int8, fp16=options.fp16)
    for name in ("check_length", "check_batch_tokens"):
        if getattr(options, name) < 1:
            flag = name.replace("_", "-")
            raise ExportError(f"--{flag} must be at least 1, got {getattr(options, name)}")
    eval_data = options.eval_data
    if extra_variants:
        eval_pairs, eval_data = _pairs_for_checks(eval_pairs, eval_data, info)
    return ExportPlan(
        source=source,
        tokenizer=tokenizer,
        loaded=LoadedModels(model, members),
        kind=kind,
        model_type=str(model.config.model_type),
        pooling=pooling,
        text_format=text_format,
        max_length=length,
        pad_token_id=int(tokenizer.pad_token_id),
        labels=labels,
        reward_head=_reward_head(labels, options.reward_head),
        ensemble=ensemble,
        info=info,
        eval_pairs=eval_pairs,
        eval_data=eval_data,
        dtype=dtype,
        extra_variants=extra_variants,
        model_name=options.model_name or default_model_name(source),
        options=options,
        check_length=min(length, options.check_length),
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
