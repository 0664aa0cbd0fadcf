"""An ensemble's members on preference pairs: each one's accuracy, their mean's, how much they
disagree, and whether their disagreement predicts the mean's mistakes.

The uncertainty of a pair is the standard deviation over members of the margin
``r_k(chosen) - r_k(rejected)`` (population std, ``ddof=0``): the spread of the very quantity
whose sign is the decision. (The mean of the two responses' reward std, the per-item spread
a server can return, is recorded beside it as ``mean_std``; it also counts spread that every
member applies to both responses alike, a shift that cannot change a decision.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rmserve.training.pairs import (
    EncodedExamples,
    PairScores,
    by_pair,
    decision_credit,
    pair_metrics,
)
from rmserve.training.scoring import BatchScorer, score_ids

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "MemberScores",
    "agreement_split",
    "disagreement",
    "ensemble_metrics",
    "score_members",
    "uncertainty_bins",
]


@dataclass(frozen=True)
class MemberScores:
    """Every member's rewards for every pair."""

    chosen: npt.NDArray[np.float64]  # (P, K) each member's reward of the preferred response
    rejected: npt.NDArray[np.float64]  # (P, K)
    chosen_chars: npt.NDArray[np.int64]  # (P,) response lengths in characters
    rejected_chars: npt.NDArray[np.int64]  # (P,)

    @property
    def members(self) -> int:
        return int(self.chosen.shape[1])

    def member(self, k: int) -> PairScores:
        return PairScores(
            self.chosen[:, k], self.rejected[:, k], self.chosen_chars, self.rejected_chars
        )

    def mean(self) -> PairScores:
        """The ensemble: the members' mean reward (what the bundle's reward means)."""
        return PairScores(
            self.chosen.mean(axis=1),
            self.rejected.mean(axis=1),
            self.chosen_chars,
            self.rejected_chars,
        )

    def margin_std(self) -> npt.NDArray[np.float64]:
        """(P,) std over members of each pair's margin: the pair's uncertainty."""
        return np.asarray((self.chosen - self.rejected).std(axis=1), dtype=np.float64)


def score_members(
    encoded: EncodedExamples,
    scorer: BatchScorer,
    pad_token_id: int,
    batch_size: int = 32,
    max_tokens: int | None = None,
) -> MemberScores:
    """Scores of every pair by every member of a scorer that returns (B, K), in batches of at
    most ``batch_size`` rows and ``max_tokens`` padded tokens."""
    rewards = score_ids(scorer, encoded.ids, pad_token_id, batch_size, max_tokens)  # (N, K)
    if rewards.ndim != 2:
        raise ValueError(f"an ensemble scorer returns (batch, K) rewards, got {rewards.shape}")
    return MemberScores(**by_pair(rewards, encoded))


def _unanimous(margins: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """(P,) whether every member strictly prefers the same response (a tie is no vote)."""
    return np.asarray(np.all(margins > 0, axis=1) | np.all(margins < 0, axis=1))


def disagreement(scores: MemberScores) -> dict[str, float]:
    """How much the members disagree on the pairs.

    - ``mean_margin_std``: mean over pairs of the std over members of the margin;
    - ``mean_std``: mean over pairs of the two responses' reward std over members;
    - ``split_pairs``: fraction of pairs on which the members do not all strictly prefer the
      same response;
    - ``member_agreement``: fraction of (pair, two members) on which the two decide alike.
    """
    margins = scores.chosen - scores.rejected  # (P, K)
    decisions = margins > 0  # (P, K)
    k = scores.members
    unanimous = _unanimous(margins)  # (P,)
    agree = [
        float(np.mean(decisions[:, i] == decisions[:, j]))
        for i in range(k)
        for j in range(i + 1, k)
    ]
    response_std = (scores.chosen.std(axis=1) + scores.rejected.std(axis=1)) / 2  # (P,)
    return {
        "mean_margin_std": float(scores.margin_std().mean()),
        "mean_std": float(response_std.mean()),
        "split_pairs": float(np.mean(~unanimous)),
        "member_agreement": float(np.mean(agree)) if agree else 1.0,
    }


def uncertainty_bins(
    uncertainty: npt.NDArray[np.float64], scores: PairScores, bins: int = 4
) -> list[tuple[float, float, float, int]]:
    """(lowest, highest uncertainty, accuracy, pairs) per quantile bin of ``uncertainty``,
    least uncertain first; ties of the ensemble's margin count half, as in pair_metrics."""
    margin = scores.chosen - scores.rejected  # (P,)
    correct = decision_credit(margin)
    order = np.argsort(uncertainty, kind="stable")
    out = []
    for chunk in np.array_split(order, min(bins, len(order))):
        if len(chunk):
            out.append(
                (
                    float(uncertainty[chunk].min()),
                    float(uncertainty[chunk].max()),
                    float(correct[chunk].mean()),
                    len(chunk),
                )
            )
    return out


def agreement_split(scores: MemberScores) -> dict[str, dict[str, float]]:
    """The mean's accuracy on the pairs where every member decides alike, and on the others."""
    unanimous = _unanimous(scores.chosen - scores.rejected)  # (P,)
    mean = scores.mean()
    margin = mean.chosen - mean.rejected
    correct = decision_credit(margin)
    out = {}
    for name, mask in (("unanimous", unanimous), ("split", ~unanimous)):
        out[name] = {
            "accuracy": float(correct[mask].mean()) if mask.any() else float("nan"),
            "pairs": int(mask.sum()),
        }
    return out


def ensemble_metrics(scores: MemberScores, bins: int = 4) -> dict[str, Any]:
    """The ensemble's part of ``rmserve eval``: each member's accuracy, the disagreement, and
    whether the disagreement predicts the mean's mistakes.

    The mean's accuracy per quartile (least uncertain first) of three measures: the margin std
    (the members' plain disagreement), the margin std over the mean's |margin| (the spread
    relative to the decision's size), and, as the baseline that needs no ensemble, a small
    |margin| of the mean. On HH dev the raw std grows with |margin| (members scale their
    margins together), so its top quartile is the most often right: the relative std is the
    one that predicts mistakes (docs/training.md has the numbers). Then the mean's accuracy on
    the pairs the members decide unanimously against those they split on.
    """
    mean = scores.mean()
    spread = scores.margin_std()  # (P,)
    size = np.abs(mean.chosen - mean.rejected)  # (P,)

    def quartiles(uncertainty: npt.NDArray[np.float64]) -> list[dict[str, Any]]:
        return [
            {"min": lo, "max": hi, "accuracy": acc, "pairs": n}
            for lo, hi, acc, n in uncertainty_bins(uncertainty, mean, bins)
        ]

    return {
        "members": scores.members,
        "member_accuracy": [
            float(pair_metrics(scores.member(k))["accuracy"]) for k in range(scores.members)
        ],
        "disagreement": disagreement(scores),
        "accuracy_by_std_quartile": quartiles(spread),
        "accuracy_by_relative_std_quartile": quartiles(spread / (size + 1e-12)),
        "accuracy_by_small_margin_quartile": quartiles(-size),
        "accuracy_by_agreement": agreement_split(scores),
    }
