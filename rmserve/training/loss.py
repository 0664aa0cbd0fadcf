"""The Bradley-Terry pairwise loss, with the optional reward-centering term."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name

__all__ = ["bradley_terry_loss"]


def bradley_terry_loss(
    chosen: torch.Tensor,  # (P,) reward of each pair's preferred response
    rejected: torch.Tensor,  # (P,) reward of the other response
    margin: torch.Tensor | None = None,  # (P,) required gap, from the data's "margin"
    pair_weight: torch.Tensor | None = None,  # (P,) sums to 1 over the batch
    rewards: torch.Tensor | None = None,  # (N,) every reward of the batch, for centering
    center_coefficient: float | None = None,
) -> torch.Tensor:  # () scalar
    """``sum_p w_p * -log sigmoid(r_w - r_l - margin)`` (+ ``c * mean(r^2)``).

    ``pair_weight`` lets a ranked example with K responses count as one example, as in
    InstructGPT (each of its K-choose-2 pairs weighs 1 / (K choose 2)); by default all pairs
    weigh the same. The centering term (Eisenstein et al. 2023, TRL's
    ``center_rewards_coefficient``) pulls rewards toward zero mean so that they are comparable
    across prompts; it is computed over each response once.
    """
    gap = chosen - rejected  # (P,)
    if margin is not None:
        gap = gap - margin
    per_pair = -F.logsigmoid(gap)  # (P,)
    loss = per_pair.mean() if pair_weight is None else (per_pair * pair_weight).sum()
    if center_coefficient:
        centered = rewards if rewards is not None else torch.cat([chosen, rejected])
        loss = loss + center_coefficient * centered.pow(2).mean()
    return loss
