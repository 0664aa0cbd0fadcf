"""The reward of an ensemble: an aggregate of its members, and their spread.

An ensemble bundle's graph answers one column per member (the manifest's ``ensemble``). A
policy optimised against one reward model learns to exploit its errors; optimising a
conservative aggregate of several resists it (Coste et al. 2023, "Reward Model Ensembles Help
Mitigate Overoptimization"):

- ``mean``: the members' mean (the default; the bundle's evaluation and normalization are of it);
- ``min``: worst-case optimisation (WCO), the lowest member;
- ``uwo``: uncertainty-weighted optimisation, ``mean - lambda * variance`` over the members.

``std`` is the members' standard deviation (population, ddof 0: the variance in ``uwo`` is its
square). Any other model is an ensemble of one: its single member is the reward head, so every
aggregate is that reward and ``std`` is 0, and clients need no special case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from rmserve.manifest import Manifest

__all__ = ["AGGREGATES", "Aggregate", "AggregateName", "member_rewards"]

AggregateName = Literal["mean", "min", "uwo"]
AGGREGATES: tuple[AggregateName, ...] = ("mean", "min", "uwo")

Float64Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Aggregate:
    """How the members' rewards become one reward."""

    name: AggregateName = "mean"
    uwo_lambda: float = 1.0  # only for "uwo": the weight of the members' variance

    def __post_init__(self) -> None:
        if self.name not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, not {self.name!r}")
        if not (math.isfinite(self.uwo_lambda) and self.uwo_lambda >= 0):
            raise ValueError(f"uwo_lambda must be a finite number >= 0, got {self.uwo_lambda}")

    def __call__(self, members: npt.NDArray[np.floating]) -> Float64Array:
        """(n, K) members -> (n,) rewards, in float64; a NaN row (an item not scored) stays NaN."""
        values = members.astype(np.float64)
        if self.name == "min":
            out: Float64Array = values.min(axis=1)
        elif self.name == "uwo":
            out = values.mean(axis=1) - self.uwo_lambda * values.var(axis=1)
        else:
            out = values.mean(axis=1)
        return out


def member_rewards(
    head_scores: npt.NDArray[np.float32], manifest: Manifest
) -> npt.NDArray[np.float32]:
    """(n, K) members: every column of an ensemble, else the reward head alone (n, 1)."""
    if manifest.is_ensemble:
        return head_scores
    return head_scores[:, [manifest.reward_head]]
