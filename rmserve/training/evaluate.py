"""``rmserve eval``: pairwise evaluation of a checkpoint or bundle, of one model or an ensemble.

The pair primitives live in :mod:`rmserve.training.pairs` (re-exported here), the ensemble
metrics in :mod:`rmserve.training.uncertainty`, the plots in :mod:`rmserve.training.report`;
this module only puts them together, and none of them imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmserve.encoding import PairEncoder
from rmserve.formatting import AnyTextFormat, TextFormat
from rmserve.manifest import MANIFEST_NAME, TOKENIZER_NAME, load_bundle
from rmserve.training.pairs import (
    EncodedExamples,
    PairScores,
    encode_examples,
    pair_metrics,
    score_pairs,
)
from rmserve.training.report import write_report
from rmserve.training.scoring import BatchScorer, onnx_scorer
from rmserve.training.uncertainty import ensemble_metrics, score_members

__all__ = [
    "EncodedExamples",
    "PairScores",
    "encode_examples",
    "evaluate_model",
    "pair_metrics",
    "score_pairs",
]


@dataclass(frozen=True)
class _Scoring:
    """What evaluation needs from a bundle or a checkpoint."""

    kind: str  # "bundle" or "checkpoint"
    scorer: BatchScorer
    text_format: AnyTextFormat
    max_length: int
    pad_token_id: int
    encoder: PairEncoder
    head: int  # the output scored, for a model of several heads
    members: int  # K for an ensemble (the mean is scored), else 0


def _bundle_scoring(root: Path, precision: str, max_length: int | None) -> _Scoring:
    manifest = load_bundle(root)
    if precision not in manifest.variants:
        flag = "--dtype fp32" if precision == "fp32" else f"--{precision}"
        raise ValueError(
            f"bundle {root} has no {precision} variant (it has "
            f"{', '.join(sorted(manifest.variants))}); pass --precision with one of "
            f"those, or export it with {flag}"
        )
    fmt: AnyTextFormat = manifest.text_format
    length = max_length or manifest.max_length
    return _Scoring(
        kind="bundle",
        scorer=onnx_scorer(str(root / manifest.variants[precision].file)),
        text_format=fmt,
        max_length=length,
        pad_token_id=manifest.pad_token_id,
        encoder=PairEncoder.from_file(str(root / TOKENIZER_NAME), length, fmt),
        head=manifest.reward_head,
        members=manifest.ensemble.members if manifest.ensemble else 0,
    )


def _checkpoint_scoring(root: Path, precision: str, max_length: int | None) -> _Scoring:
    from rmserve.training.checkpoint import load_checkpoint
    from rmserve.training.independent import member_scorer
    from rmserve.training.metadata import TrainingInfo
    from rmserve.training.modeling import architecture_of, default_max_length, load_tokenizer
    from rmserve.training.scoring import torch_scorer
    from rmserve.training.text_path import choose_text_format

    if precision != "fp32":
        raise ValueError("--precision applies to bundles; a checkpoint is evaluated in fp32")
    info = TrainingInfo.read(root)
    member_dirs = info.ensemble.member_dirs if info and info.ensemble else ()
    tokenizer = load_tokenizer(str(root))
    # refuses a head that did not load; an independent ensemble: its first member
    net = load_checkpoint(str(root / member_dirs[0]) if member_dirs else str(root)).model
    architecture, pooling = architecture_of(net)
    # What export would choose: training's format, else the model's own chat template.
    fmt, _ = choose_text_format("auto", tokenizer, architecture, info.text_format if info else None)
    length = max_length or (info.max_length if info else default_max_length(net, tokenizer))
    return _Scoring(
        kind="checkpoint",
        scorer=member_scorer(root, member_dirs) if member_dirs else torch_scorer(net, pooling),
        text_format=fmt,
        max_length=length,
        pad_token_id=int(tokenizer.pad_token_id),
        encoder=PairEncoder(tokenizer.backend_tokenizer, length, fmt),
        head=0,
        members=info.ensemble.members if info and info.ensemble else 0,
    )


def evaluate_model(
    model: str | Path,
    data: str,
    *,
    precision: str = "fp32",
    max_length: int | None = None,
    batch_size: int = 32,
    skip_malformed: bool = False,
    limit: int | None = None,
    report_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a bundle (a folder with rmserve.json) or a checkpoint on ``data``.

    Returns the JSON line of ``rmserve eval``: accuracy, n, mean_margin,
    shorter_wins_accuracy, plus where it came from and how many pairs were truncated. For an
    ensemble, ``accuracy`` is the members' mean's and ``ensemble`` adds each member's
    accuracy, their disagreement and the accuracy per quartile of the pairs' uncertainty.
    """
    from rmserve.training.data import read_examples

    root = Path(model)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass a checkpoint or bundle folder")
    if (root / MANIFEST_NAME).is_file():
        scoring = _bundle_scoring(root, precision, max_length)
    else:
        scoring = _checkpoint_scoring(root, precision, max_length)
    fmt = scoring.text_format
    # The data's own transcripts are parsed in the HH format unless the bundle's format is
    # another transcript format; the bundle's format (maybe a chat template) renders them.
    data_format = fmt if isinstance(fmt, TextFormat) else None
    read = read_examples(data, skip_malformed=skip_malformed, text_format=data_format, limit=limit)
    encoded = encode_examples(read.examples, scoring.encoder, fmt)
    ensemble = None
    if scoring.members:
        members = score_members(encoded, scoring.scorer, scoring.pad_token_id, batch_size)
        scores = members.mean()
        ensemble = ensemble_metrics(members)
    else:
        scores = score_pairs(
            encoded, scoring.scorer, scoring.pad_token_id, batch_size, scoring.head
        )
    result: dict[str, Any] = dict(pair_metrics(scores))
    result |= {
        "model": str(root),
        "kind": scoring.kind,
        "precision": precision,
        "data": str(data),
        "skipped": read.skipped,
        "truncated": encoded.truncated,
        "max_length": scoring.max_length,
    }
    if ensemble is not None:
        result["ensemble"] = ensemble
    if report_dir is not None:
        result["report"] = str(write_report(Path(report_dir), scores, result))
    return result
