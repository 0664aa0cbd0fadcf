"""What a training run returns (:func:`rmserve.training.train.train_reward_model`), in a module
of its own so that the ensemble trainers can name it without importing the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rmserve.manifest import Evaluation, Normalization
from rmserve.training.metadata import EnsembleInfo

__all__ = ["TrainResult"]


@dataclass(frozen=True)
class TrainResult:
    out: Path  # the checkpoint folder
    train_loss: float  # mean training loss over the run
    losses: list[float]  # the logged training losses, in order
    evaluation: Evaluation | None  # on the eval data, when given
    normalization: Normalization
    train_examples: int
    skipped: int  # malformed training rows skipped
    parted: int  # training pairs whose transcripts parted before their last turn (kept)
    max_length: int  # tokens per (prompt, response) used: the config's, or the model's limit
    ensemble: EnsembleInfo | None = None  # set for an ensemble (evaluation: the members' mean)
    member_accuracy: tuple[float, ...] = ()  # each member's accuracy on the eval data
