"""Ensembles of reward models at training time: where each member's randomness comes from.

A member of an ensemble differs from the others by two things drawn from its own seed: the
initial weights of its head and the bootstrap resample of the training data it sees.

- Seeds: member k's seed is child k of ``numpy.random.SeedSequence(seed)``. Children are
  statistically independent streams, and child k does not depend on K, so member 2 of an
  ensemble of 4 is member 2 of an ensemble of 3. (``seed + k`` would make member 1 of seed 0
  the member 0 of seed 1, correlating runs that are meant to be independent.)
- Bootstrap: each member weighs training example i by ``w[i, k] ~ Poisson(1)``, drawn once
  before training. This is the "online"/Poisson bootstrap (Oza and Russell 2001; used for
  bootstrapped DQN): in the limit it is resampling N examples with replacement, but every
  member keeps the same batches, so K members cost one forward pass over a shared backbone.
  About 37% of the examples weigh 0 for a given member, as in a classic bootstrap.

The default diversity is ``heads``: one backbone shared by all members, one linear head per
member (``num_labels=K``). Serving it costs one backbone pass plus K dot products, about what
one model costs; the members differ only in their heads, so they disagree less than K whole
models would. ``independent`` trains K whole models (:mod:`rmserve.training.independent`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from rmserve.manifest import ensemble_labels

if TYPE_CHECKING:
    import numpy.typing as npt
    from transformers import PreTrainedModel

__all__ = [
    "DIVERSITY_DESCRIPTIONS",
    "bootstrap_weights",
    "init_member_heads",
    "label_members",
    "member_head",
    "member_seeds",
]

# What each RewardConfig.ensemble_diversity means, in the words the manifest records.
DIVERSITY_DESCRIPTIONS = {
    "heads": "shared backbone, one linear head per member, each head initialised from its own "
    "seed and trained on its own Poisson(1) bootstrap resample of the training pairs",
    "independent": "independent models, each with its own seed (head initialisation, dropout) "
    "and its own Poisson(1) bootstrap resample of the training pairs",
}


def member_seeds(seed: int, members: int) -> tuple[int, ...]:
    """One 31-bit seed per member, from child k of ``SeedSequence(seed)``."""
    children = np.random.SeedSequence(seed).spawn(members)
    return tuple(int(child.generate_state(1)[0] >> 1) for child in children)


def bootstrap_weights(examples: int, seeds: tuple[int, ...]) -> npt.NDArray[np.float32]:
    """(examples, K) Poisson(1) weights: column k is member k's resample, from its seed."""
    columns = [np.random.default_rng(s).poisson(1.0, size=examples) for s in seeds]
    return np.stack(columns, axis=1).astype(np.float32)  # (N, K)


def member_head(model: PreTrainedModel, members: int) -> torch.nn.Linear:
    """The layer whose K output rows are the members' heads: the last Linear of the model's
    classification head (``score`` for decoders, ``classifier`` for encoders; RoBERTa's
    ``classifier.out_proj``) with K outputs."""
    head = getattr(model, "score", None)
    if head is None:
        head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no classification head (score or classifier) to "
            "split into ensemble members; use --ensemble-diversity independent"
        )
    linears = [
        m for m in head.modules() if isinstance(m, torch.nn.Linear) and m.out_features == members
    ]
    if not linears:
        raise ValueError(
            f"the head of {type(model).__name__} has no linear layer with {members} outputs; "
            "use --ensemble-diversity independent"
        )
    return linears[-1]


def init_member_heads(model: PreTrainedModel, seeds: tuple[int, ...]) -> None:
    """Draw row k of the head from member k's seed, N(0, initializer_range) as transformers
    initialises a fresh head, bias 0. Without this every row would come from the one global
    generator, and member k's start would depend on K and on whatever was drawn before."""
    layer = member_head(model, len(seeds))
    std = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    with torch.no_grad():
        for k, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(seed)
            row = torch.randn(layer.in_features, generator=generator) * std  # (H,)
            layer.weight[k].copy_(row.to(layer.weight.dtype))
            if layer.bias is not None:
                layer.bias[k] = 0.0


def label_members(model: PreTrainedModel, members: int) -> None:
    """Name the outputs member_0 .. member_{K-1} in the config (export reads the labels)."""
    labels = ensemble_labels(members)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: k for k, label in enumerate(labels)}
