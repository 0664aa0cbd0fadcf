"""RewardConfig: the generic defaults, the presets, the flag field lists, refused values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from transformers import TrainingArguments

from rmserve.training.config import (
    DEFAULT_PRESET,
    PRESETS,
    REWARD_FIELDS,
    TRAINING_FIELDS,
    RewardConfig,
)
from rmserve.training.modeling import load_reward_model, load_tokenizer
from rmserve.training.train import resolve_max_length

REPO = Path(__file__).resolve().parents[2]
ARGUMENT_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}


def test_every_reward_field_has_a_flag_and_help() -> None:
    """A field added to RewardConfig must be listed (and so get a flag) or it cannot be set
    from `rmserve train`; the curated TrainingArguments fields must exist."""
    own = {f.name for f in dataclasses.fields(RewardConfig)} - ARGUMENT_FIELDS
    assert own == set(REWARD_FIELDS)
    assert set(TRAINING_FIELDS) <= ARGUMENT_FIELDS
    fields = {f.name: f for f in dataclasses.fields(RewardConfig)}
    for name in (*REWARD_FIELDS, *TRAINING_FIELDS):
        assert fields[name].metadata.get("help"), name


def test_generic_defaults_freeze_nothing_and_fit_the_model() -> None:
    config = RewardConfig()
    assert config.learning_rate == 1e-5
    assert (config.freeze_embeddings, config.freeze_layers) == (False, 0)
    assert config.max_length is None  # the model's own limit, resolved at training
    assert config.center_rewards_coefficient is None
    assert config.num_train_epochs == 1.0
    assert config.output_dir == "artifacts/checkpoint"
    assert config.train_sampling_strategy == "group_by_length"


def test_minilm_preset_keeps_the_measured_recipe() -> None:
    """The recipe of the measured run (the README's Train your own, docs/training.md: The
    default recipe): change it only with a new measurement."""
    preset = PRESETS[DEFAULT_PRESET]
    assert (preset.name, preset.base) == ("minilm-hh", "minilm")
    config = preset.config()
    assert config.max_length == 128
    assert config.learning_rate == 2e-4
    assert config.per_device_train_batch_size == 32
    assert config.num_train_epochs == 1.0
    assert config.warmup_steps == 0.1
    assert config.weight_decay == 0.01
    assert config.center_rewards_coefficient == 0.01
    assert (config.freeze_embeddings, config.freeze_layers) == (True, 3)
    assert config.eval_steps == 25
    # Values given explicitly win; the rest stay the preset's.
    override = preset.config(learning_rate=1e-3, freeze_layers=0)
    assert (override.learning_rate, override.freeze_layers, override.max_length) == (1e-3, 0, 128)


def test_the_docs_state_the_preset_recipe() -> None:
    """The README (Train your own) and docs/training.md (the preset's bullet) give the
    preset's values: a change of the recipe must change what they say."""
    config = PRESETS[DEFAULT_PRESET].config()
    lr = f"{config.learning_rate:.0e}".replace("e-0", "e-")
    common = [
        f"max length {config.max_length}",
        f"lr {lr}",
        f"batch {config.per_device_train_batch_size}",
        f"reward centering {config.center_rewards_coefficient}",
        f"{config.freeze_layers} lowest",
    ]
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    training = " ".join((REPO / "docs" / "training.md").read_text(encoding="utf-8").split())
    for phrase in common:
        assert phrase in readme, f"README.md does not say {phrase!r}"
    for phrase in [
        *common,
        f"warm-up {config.warmup_steps} of the steps",
        f"weight decay {config.weight_decay}",
        f"evaluation every {config.eval_steps} steps",
    ]:
        assert phrase in training, f"docs/training.md does not say {phrase!r}"


def test_preset_values_are_fields() -> None:
    fields = {f.name for f in dataclasses.fields(RewardConfig)}
    for preset in PRESETS.values():
        assert set(preset.values) <= fields, preset.name


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"freeze_layers": -1}, "--freeze-layers N"),
        ({"max_length": 0}, "max_length must be at least 2"),
        ({"normalization_samples": 0}, "normalization_samples must be at least 1"),
    ],
)
def test_refused_values_say_what_to_pass(values: dict[str, int], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        RewardConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "limit"), [("tiny_encoder", 512), ("tiny_decoder", 1024)])
def test_max_length_defaults_to_what_the_model_supports(
    name: str, limit: int, request: pytest.FixtureRequest
) -> None:
    """No max_length: the model's positions, bounded by its tokenizer's model_max_length
    (the tiny BPE tokenizer sets none, so the decoder's 1024 positions apply)."""
    path: Path = request.getfixturevalue(f"{name}_checkpoint")
    tokenizer = load_tokenizer(str(path))
    model = load_reward_model(str(path), pad_token_id=tokenizer.pad_token_id)
    assert resolve_max_length(RewardConfig(), model, tokenizer, str(path)) == limit
    assert resolve_max_length(RewardConfig(max_length=64), model, tokenizer, str(path)) == 64
    with pytest.raises(ValueError, match=f"exceeds the {limit} positions"):
        resolve_max_length(RewardConfig(max_length=limit + 1), model, tokenizer, str(path))
