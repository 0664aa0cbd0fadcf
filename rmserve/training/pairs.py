"""Preference pairs as the scorers see them: every response encoded once, the pairs as row
indices, and the pairwise metrics (accuracy, margin, the shorter-wins baseline).

The low layer of evaluation, shared by ``rmserve eval`` (:mod:`rmserve.training.evaluate`),
its report, the ensemble metrics and export's checks; it imports none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rmserve.encoding import PairEncoder
from rmserve.formatting import AnyTextFormat, RenderedText
from rmserve.training.data import PreferenceExample
from rmserve.training.scoring import BatchScorer, score_ids

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "EncodedExamples",
    "PairScores",
    "by_pair",
    "decision_credit",
    "encode_examples",
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
    max_tokens: int | None = None,
) -> PairScores:
    """Scores of every pair; for a model with several heads, those of ``head``. Batches of
    at most ``batch_size`` rows and ``max_tokens`` padded tokens."""
    rewards = score_ids(scorer, encoded.ids, pad_token_id, batch_size, max_tokens)
    if rewards.ndim == 2:  # (N, K) -> (N,)
        rewards = rewards[:, head]
    return PairScores(**by_pair(rewards, encoded))


def by_pair(rewards: Any, encoded: EncodedExamples) -> dict[str, Any]:
    """Per-row rewards ((N,) or (N, K)) and response lengths, picked per (winner, loser) pair:
    the fields of :class:`PairScores` and of an ensemble's member scores."""
    import numpy as np

    chars = np.asarray(encoded.response_chars, dtype=np.int64)
    return {
        "chosen": rewards[encoded.winners],
        "rejected": rewards[encoded.losers],
        "chosen_chars": chars[encoded.winners],
        "rejected_chars": chars[encoded.losers],
    }


def decision_credit(margin: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Per pair, 1 when the preferred response won (margin > 0), 0.5 for a tie, 0 when it
    lost: the mean is the accuracy with ties counted half, as everywhere in rmserve."""
    import numpy as np

    m = np.asarray(margin, dtype=np.float64)
    credit: npt.NDArray[np.float64] = np.where(m > 0, 1.0, np.where(m == 0, 0.5, 0.0))
    return credit


def pair_metrics(scores: PairScores) -> dict[str, float | int]:
    """accuracy (ties count half), n, mean_margin, and the shorter-response-wins accuracy."""
    import numpy as np

    n = len(scores.chosen)
    if n == 0:
        raise ValueError("no pairs to evaluate")
    margin = scores.chosen - scores.rejected
    accuracy = float(decision_credit(margin).mean())
    length_gap = scores.rejected_chars - scores.chosen_chars  # > 0: the chosen one is shorter
    shorter = float(decision_credit(length_gap).mean())
    return {
        "accuracy": accuracy,
        "n": n,
        "mean_margin": float(np.mean(margin)),
        "shorter_wins_accuracy": shorter,
    }
