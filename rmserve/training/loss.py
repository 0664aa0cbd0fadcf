"""The Bradley-Terry pairwise loss, with the optional reward-centering term."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name

__all__ = ["bradley_terry_loss"]


def bradley_terry_loss(
    chosen: torch.Tensor,  # (P,) reward of each pair's preferred response, or (P, K) per member
    rejected: torch.Tensor,  # (P,) or (P, K): the other response
    margin: torch.Tensor | None = None,  # (P,) required gap, from the data's "margin"
    pair_weight: torch.Tensor | None = None,  # (P,) sums to 1 over the batch, or (P, K)
    rewards: torch.Tensor | None = None,  # (N,) or (N, K): every reward of the batch
    center_coefficient: float | None = None,
) -> torch.Tensor:  # () scalar
    """``sum_p w_p * -log sigmoid(r_w - r_l - margin)`` (+ ``c * mean(r^2)``).

    ``pair_weight`` lets a ranked example with K responses count as one example, as in
    InstructGPT (each of its K-choose-2 pairs weighs 1 / (K choose 2)); by default all pairs
    weigh the same. The centering term (Eisenstein et al. 2023, TRL's
    ``center_rewards_coefficient``) pulls rewards toward zero mean so that they are comparable
    across prompts; it is computed over each response once.

    Ensembles pass one column per member (``(P, K)`` rewards, and ``(P, K)`` weights for the
    members' bootstrap resamples): the loss is the mean over members of each member's loss.
    The mean, not the sum, so that the logged loss reads like a single model's and gradient
    clipping sees the same scale; under AdamW the two train alike.
    """
    gap = chosen - rejected  # (P,) or (P, K)
    if margin is not None:
        gap = gap - (margin if gap.dim() == 1 else margin.unsqueeze(-1))
    per_pair = -F.logsigmoid(gap)  # (P,) or (P, K)
    if pair_weight is None:
        loss = per_pair.mean()
    elif per_pair.dim() == 1:  # (P, 1) weights: one model on its bootstrap resample
        loss = (per_pair * pair_weight.reshape(per_pair.shape)).sum()
    else:
        if pair_weight.dim() == 1:
            pair_weight = pair_weight.unsqueeze(-1)  # (P, 1): the same weights for every member
        loss = (per_pair * pair_weight).sum(dim=0).mean()  # sum over pairs, mean over members
    if center_coefficient:
        centered = rewards if rewards is not None else torch.cat([chosen, rejected])
        loss = loss + center_coefficient * centered.pow(2).mean()
    return loss
