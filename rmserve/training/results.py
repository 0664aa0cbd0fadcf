"""What a training run returns (:func:`rmserve.training.train.train_reward_model`), in a module
of its own so that the ensemble trainers can name it without importing the trainer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmserve.manifest import Evaluation, Normalization
from rmserve.training.metadata import EnsembleInfo

__all__ = ["TrainResult", "print_summary"]


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
    steps: int = 0  # optimizer steps (all members' for an ensemble of independent models)
    seconds: float | None = None  # the training loop's time (all members' together)


def print_summary(result: TrainResult) -> None:
    """One JSON line on stdout: what the run did, for scripts (``rmserve train``'s output)."""
    summary: dict[str, Any] = {
        "out": str(result.out),
        "train_loss": result.train_loss,
        "train_examples": result.train_examples,
        "skipped": result.skipped,
        "parted": result.parted,
        "max_length": result.max_length,
        "steps": result.steps,
        "seconds": result.seconds,
    }
    evaluation = result.evaluation
    if evaluation is not None:
        summary |= {
            "eval_accuracy": evaluation.accuracy,
            "eval_n": evaluation.n,
            "shorter_wins_accuracy": evaluation.shorter_wins_accuracy,
        }
    if result.ensemble is not None:
        summary |= {"ensemble": result.ensemble.members, "diversity": result.ensemble.diversity}
        if result.member_accuracy:
            summary["member_accuracy"] = list(result.member_accuracy)
    print(json.dumps(summary), flush=True)
