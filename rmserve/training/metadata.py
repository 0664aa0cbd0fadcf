"""``rmserve_training.json``: what training knows that export needs, saved beside the checkpoint.

The trainer writes it into ``--out``; ``rmserve export`` reads it to fill the manifest (max
length, text format, reward normalization measured on the training pairs, evaluation on the
eval set). A checkpoint without it (any transformers folder) can still be exported; the
missing numbers then come from ``--eval-data`` or are marked as not measured.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rmserve.formatting import TextFormat
from rmserve.manifest import Evaluation, Normalization

__all__ = ["TRAINING_INFO_NAME", "EnsembleInfo", "TrainingInfo"]

TRAINING_INFO_NAME = "rmserve_training.json"


@dataclass(frozen=True)
class EnsembleInfo:
    """Marks a checkpoint's K outputs as the members of one ensemble. A hub model with
    ``num_labels=K`` has no such record and stays a model of K objectives."""

    members: int  # K >= 2
    diversity: str  # "heads" or "independent" (RewardConfig.ensemble_diversity)
    description: str  # in words, for the manifest's ensemble.diversity
    member_seeds: tuple[int, ...]  # the seed each member's head and bootstrap came from
    # independent: the member checkpoints, folders relative to the checkpoint folder
    member_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingInfo:
    base_model: str  # what --base was (resolved), recorded in the manifest
    max_length: int  # tokens per (prompt, response), special tokens included
    text_format: TextFormat  # how conversations were rendered at training time
    normalization: Normalization | None = None  # reward mean/std on the training pairs
    evaluation: Evaluation | None = None  # final accuracy on --eval-data
    train_data: str | None = None  # where the training pairs came from
    eval_data: str | None = None  # the eval set; export reuses it for int8/fp16 parity
    ensemble: EnsembleInfo | None = None  # set when the outputs are ensemble members
    # The `rmserve train` preset whose recipe trained the checkpoint on the preset's own base
    # model (export names the model after it); None for --preset none or another --base.
    preset: str | None = None

    def write(self, checkpoint_dir: str | Path) -> Path:
        data = asdict(self)
        data["text_format"] = self.text_format.to_dict()
        path = Path(checkpoint_dir) / TRAINING_INFO_NAME
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def read(cls, checkpoint_dir: str | Path) -> TrainingInfo | None:
        """The info saved beside a checkpoint, or None when the folder has none."""
        path = Path(checkpoint_dir) / TRAINING_INFO_NAME
        if not path.is_file():
            return None
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            norm = data.get("normalization")
            ev = data.get("evaluation")
            ens = data.get("ensemble")
            ensemble = None
            if ens:
                ensemble = EnsembleInfo(
                    members=int(ens["members"]),
                    diversity=str(ens["diversity"]),
                    description=str(ens["description"]),
                    member_seeds=tuple(int(s) for s in ens["member_seeds"]),
                    member_dirs=tuple(str(d) for d in ens.get("member_dirs", ())),
                )
            return cls(
                base_model=str(data["base_model"]),
                max_length=int(data["max_length"]),
                text_format=TextFormat.from_dict(data["text_format"]),
                normalization=Normalization(**norm) if norm else None,
                evaluation=Evaluation(**ev) if ev else None,
                train_data=data.get("train_data"),
                eval_data=data.get("eval_data"),
                ensemble=ensemble,
                preset=_optional_str(data.get("preset"), "preset"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path} is malformed ({e}); delete it or train the checkpoint again"
            ) from e


def _optional_str(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{name} is {value!r}, not a string")
