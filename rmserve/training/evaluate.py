"""Pairwise evaluation of a reward model: accuracy, margin and the shorter-wins baseline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmserve.encoding import PairEncoder
from rmserve.formatting import AnyTextFormat, RenderedText, TextFormat
from rmserve.manifest import MANIFEST_NAME, TOKENIZER_NAME, load_bundle
from rmserve.training.data import PreferenceExample
from rmserve.training.scoring import BatchScorer, onnx_scorer, score_ids

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "EncodedExamples",
    "PairScores",
    "encode_examples",
    "evaluate_model",
    "pair_metrics",
    "score_pairs",
]


@dataclass(frozen=True)
class EncodedExamples:
    """Every response of every example as ids, and the (winner, loser) pairs between them."""

    ids: list[list[int]]  # one row per response
    winners: list[int]  # row index of each pair's preferred response
    losers: list[int]  # row index of each pair's other response
    response_chars: list[int]  # characters of each row's response (for the length baseline)
    truncated: int  # rows that lost tokens to max_length


@dataclass(frozen=True)
class PairScores:
    chosen: npt.NDArray[np.float64]  # (P,) reward of the preferred response
    rejected: npt.NDArray[np.float64]  # (P,) reward of the other one
    chosen_chars: npt.NDArray[np.int64]  # (P,) response lengths in characters
    rejected_chars: npt.NDArray[np.int64]  # (P,)


def encode_examples(
    examples: Sequence[PreferenceExample], encoder: PairEncoder, text_format: AnyTextFormat
) -> EncodedExamples:
    """Render and encode all responses; a response longer than max_length keeps its start
    (evaluation scores every pair rather than refusing some)."""
    rendered: list[RenderedText] = []
    winners: list[int] = []
    losers: list[int] = []
    chars: list[int] = []
    for example in examples:
        base = len(rendered)
        rendered.extend(example.rendered(text_format))
        chars.extend(len(r) for r in example.responses)
        for w, lo in example.pairs():
            winners.append(base + w)
            losers.append(base + lo)
    encoded = encoder.encode_batch(rendered, truncate_response=True)
    return EncodedExamples(
        ids=[e.ids for e in encoded],
        winners=winners,
        losers=losers,
        response_chars=chars,
        truncated=sum(e.truncated for e in encoded),
    )


def score_pairs(
    encoded: EncodedExamples,
    scorer: BatchScorer,
    pad_token_id: int,
    batch_size: int = 32,
    head: int = 0,
) -> PairScores:
    """Scores of every pair; for a model with several heads, those of ``head``."""
    import numpy as np

    rewards = score_ids(scorer, encoded.ids, pad_token_id, batch_size)
    if rewards.ndim == 2:  # (N, K) -> (N,)
        rewards = rewards[:, head]
    chars = np.asarray(encoded.response_chars, dtype=np.int64)
    return PairScores(
        chosen=rewards[encoded.winners],
        rejected=rewards[encoded.losers],
        chosen_chars=chars[encoded.winners],
        rejected_chars=chars[encoded.losers],
    )


def pair_metrics(scores: PairScores) -> dict[str, float | int]:
    """accuracy (ties count half), n, mean_margin, and the shorter-response-wins accuracy."""
    import numpy as np

    n = len(scores.chosen)
    if n == 0:
        raise ValueError("no pairs to evaluate")
    margin = scores.chosen - scores.rejected
    accuracy = float(np.mean(np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0))))
    length_gap = scores.rejected_chars - scores.chosen_chars  # > 0: the chosen one is shorter
    shorter = float(np.mean(np.where(length_gap > 0, 1.0, np.where(length_gap == 0, 0.5, 0.0))))
    return {
        "accuracy": accuracy,
        "n": n,
        "mean_margin": float(np.mean(margin)),
        "shorter_wins_accuracy": shorter,
    }


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
    shorter_wins_accuracy, plus where it came from and how many pairs were truncated.
    """
    from rmserve.training.data import read_examples

    root = Path(model)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass a checkpoint or bundle folder")
    if (root / MANIFEST_NAME).is_file():
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
        pad_token_id = manifest.pad_token_id
        encoder = PairEncoder.from_file(str(root / TOKENIZER_NAME), length, fmt)
        scorer = onnx_scorer(str(root / manifest.variants[precision].file))
        head = manifest.reward_head
        kind = "bundle"
    else:
        from rmserve.training.checkpoint import load_checkpoint
        from rmserve.training.metadata import TrainingInfo
        from rmserve.training.modeling import architecture_of, default_max_length, load_tokenizer
        from rmserve.training.scoring import torch_scorer
        from rmserve.training.text_path import choose_text_format

        if precision != "fp32":
            raise ValueError("--precision applies to bundles; a checkpoint is evaluated in fp32")
        info = TrainingInfo.read(root)
        tokenizer = load_tokenizer(str(root))
        net = load_checkpoint(str(root)).model  # refuses a head that did not load
        architecture, pooling = architecture_of(net)
        # What export would choose: training's format, else the model's own chat template.
        fmt, _ = choose_text_format(
            "auto", tokenizer, architecture, info.text_format if info else None
        )
        length = max_length or (info.max_length if info else default_max_length(net, tokenizer))
        pad_token_id = int(tokenizer.pad_token_id)
        encoder = PairEncoder(tokenizer.backend_tokenizer, length, fmt)
        scorer = torch_scorer(net, pooling)
        head = 0
        kind = "checkpoint"

    # The data's own transcripts are parsed in the HH format unless the bundle's format is
    # another transcript format; the bundle's format (maybe a chat template) renders them.
    data_format = fmt if isinstance(fmt, TextFormat) else None
    read = read_examples(data, skip_malformed=skip_malformed, text_format=data_format, limit=limit)
    encoded = encode_examples(read.examples, encoder, fmt)
    scores = score_pairs(encoded, scorer, pad_token_id, batch_size, head)
    result: dict[str, Any] = dict(pair_metrics(scores))
    result |= {
        "model": str(root),
        "kind": kind,
        "precision": precision,
        "data": str(data),
        "skipped": read.skipped,
        "truncated": encoded.truncated,
        "max_length": length,
    }
    if report_dir is not None:
        from rmserve.training.report import write_report

        result["report"] = str(write_report(Path(report_dir), scores, result))
    return result
