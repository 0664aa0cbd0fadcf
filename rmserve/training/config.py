"""``RewardConfig``: transformers' ``TrainingArguments`` plus the reward-model options.

Paired with :mod:`rmserve.training.trainer` (TRL's config/trainer layout). Defaults differ from
``TrainingArguments`` where a reward model wants something else: batches grouped by length,
no intermediate checkpoints, no experiment tracker, the dataset's extra columns kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

__all__ = ["RewardConfig"]


@dataclass
class RewardConfig(TrainingArguments):
    max_length: int = field(
        default=256,
        metadata={
            "help": "Tokens per (prompt, response), special tokens included. Longer pairs lose "
            "prompt tokens from the left first (the serving policy)."
        },
    )
    truncate_long_responses: bool = field(
        default=True,
        metadata={
            "help": "When a response alone exceeds max_length, keep its start and train on it "
            "(True) or drop the example (False). Either way the count is reported."
        },
    )
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the reward-centering term c * mean(r^2) (Eisenstein et al. "
            "2023); 0.01 is the usual value. None disables it."
        },
    )
    freeze_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Freeze the input token embeddings (much faster steps on CPU; the "
            "embeddings of a pretrained backbone change little in fine-tuning)."
        },
    )
    freeze_layers: int = field(
        default=0,
        metadata={"help": "Freeze the first N transformer blocks (faster; less to fit)."},
    )
    normalization_samples: int = field(
        default=1024,
        metadata={
            "help": "Training responses scored after training to measure the reward mean and "
            "std recorded as the bundle's normalization (a random sample; all when fewer)."
        },
    )
    # Overridden defaults of TrainingArguments.
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "Group batches by length so that padding stays small."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep the collator's inputs; a reward model has no 'labels' column."},
    )
    save_strategy: str = field(
        default="no",
        metadata={"help": "Only the final model is saved (into output_dir) by default."},
    )
    report_to: str | list[str] | None = field(
        default="none", metadata={"help": "Experiment trackers to report to."}
    )
    logging_steps: float = field(
        default=10, metadata={"help": "Log the loss every this many steps."}
    )
