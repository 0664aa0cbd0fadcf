"""Loss, collator, formatting equality with the bundle, and short real training runs."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from rmserve.encoding import PairEncoder
from rmserve.formatting import Message
from rmserve.manifest import load_bundle
from rmserve.training.config import RewardConfig
from rmserve.training.data import PreferenceExample
from rmserve.training.loss import bradley_terry_loss
from rmserve.training.metadata import TrainingInfo
from rmserve.training.modeling import load_tokenizer
from rmserve.training.trainer import PreferenceCollator, PreferenceDataset

PAIR = PreferenceExample(
    prompt=(Message("user", "How do I bake bread?"),),
    responses=("Mix flour, water and yeast, then bake.", "No."),
)
RANKED = PreferenceExample(
    prompt=(Message("user", "Name a fruit."),),
    responses=("Apple.", "A tomato, botanically.", "Rocks."),
    margin=0.5,
)


def test_bradley_terry_loss_values() -> None:
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([0.0, 1.0])
    expected = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    # A margin makes the same gap cost more.
    margin = torch.tensor([1.0, 1.0])
    assert bradley_terry_loss(chosen, rejected, margin).item() > expected
    # Centering adds c * mean(r^2) over the batch rewards.
    rewards = torch.tensor([2.0, 0.0, 0.0, 1.0])
    centered = bradley_terry_loss(chosen, rejected, rewards=rewards, center_coefficient=0.1)
    assert centered.item() == pytest.approx(expected + 0.1 * 5 / 4, rel=1e-6)
    # Pair weights: all weight on the first pair gives that pair's loss alone.
    weighted = bradley_terry_loss(chosen, rejected, pair_weight=torch.tensor([1.0, 0.0]))
    assert weighted.item() == pytest.approx(-math.log(1 / (1 + math.exp(-2.0))), rel=1e-6)


def test_collator_keeps_ranked_pairs_in_one_element(minilm_path: Path) -> None:
    tokenizer = load_tokenizer(str(minilm_path))
    encoder = PairEncoder(tokenizer.backend_tokenizer, 64)
    dataset = PreferenceDataset([PAIR, RANKED], encoder)
    batch = PreferenceCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 5  # 2 + 3 responses
    assert batch["winners"].tolist() == [0, 2, 2, 3]
    assert batch["losers"].tolist() == [1, 3, 4, 4]
    assert batch["margins"].tolist() == [0.0, 0.5, 0.5, 0.5]
    # Each example weighs 1/2; the ranked one's three pairs share its half.
    assert batch["pair_weights"].tolist() == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    # Right padding: the mask is a prefix of ones, and padded ids are the pad id.
    mask = batch["attention_mask"]
    for row, length in enumerate(mask.sum(dim=1).tolist()):
        assert mask[row, :length].all()
        assert not mask[row, length:].any()
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
    assert sorted(dataset.lengths) == dataset.lengths or len(dataset.lengths) == 2


@pytest.mark.parametrize("name", ["tiny_encoder", "tiny_decoder"])
def test_training_ids_equal_bundle_ids(
    name: str, request: pytest.FixtureRequest, hh_dev_examples: list[PreferenceExample]
) -> None:
    """The ids the trainer feeds for a pair == what the service computes from the bundle."""
    checkpoint: Path = request.getfixturevalue(f"{name}_checkpoint")
    bundle: Path = request.getfixturevalue(f"{name}_bundle")
    manifest = load_bundle(bundle)
    info = TrainingInfo.read(checkpoint)
    assert info is not None
    tokenizer = load_tokenizer(str(checkpoint))
    training_encoder = PairEncoder(tokenizer.backend_tokenizer, info.max_length)
    examples = [*hh_dev_examples[:20], PAIR, RANKED]
    dataset = PreferenceDataset(examples, training_encoder, info.text_format)
    batch = PreferenceCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])

    serving_encoder = PairEncoder.from_file(str(bundle / "tokenizer.json"), manifest.max_length)
    rendered = [r for example in examples for r in example.rendered(manifest.text_format)]
    serving = serving_encoder.encode_batch(rendered, truncate_response=True)
    for row, encoded in enumerate(serving):
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == encoded.ids
    assert manifest.pad_token_id == tokenizer.pad_token_id


def _fixed_batch_loss(checkpoint: Path, examples: list[PreferenceExample]) -> float:
    from rmserve.training.modeling import RewardModel, architecture_of, load_reward_model
    from rmserve.training.trainer import RewardTrainer

    tokenizer = load_tokenizer(str(checkpoint))
    model = load_reward_model(str(checkpoint), pad_token_id=tokenizer.pad_token_id)
    _, pooling = architecture_of(model)
    dataset = PreferenceDataset(examples, PairEncoder(tokenizer.backend_tokenizer, 128))
    batch = PreferenceCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    reward_model = RewardModel(model, pooling).eval()
    with torch.no_grad():
        loss = RewardTrainer.compute_loss(
            _LossOnly(),  # type: ignore[arg-type]
            reward_model,
            batch,
        )
    assert isinstance(loss, torch.Tensor)
    return float(loss)


class _LossOnly:
    """Stands in for a trainer's ``self`` in compute_loss (it reads args only)."""

    class args:  # noqa: N801 - mimics the attribute
        center_rewards_coefficient = None


@pytest.mark.parametrize("name", ["tiny_encoder", "tiny_decoder"])
def test_tiny_models_train_on_real_data(
    name: str, request: pytest.FixtureRequest, hh_data_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from rmserve.training.data import read_examples
    from rmserve.training.train import train_reward_model

    base: Path = request.getfixturevalue(f"{name}_checkpoint")
    train_file = hh_data_dir / "train.jsonl.gz"
    examples = read_examples(train_file, skip_malformed=True, limit=48).examples
    out = tmp_path / "out"
    config = RewardConfig(
        output_dir=str(out),
        max_length=128,
        max_steps=24,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=4,
        eval_strategy="steps",
        eval_steps=12,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        normalization_samples=64,
    )
    eval_file = tmp_path / "dev40.jsonl"  # a slice of dev keeps the periodic evals quick
    with gzip.open(hh_data_dir / "dev.jsonl.gz", "rt") as f:
        eval_file.write_text("".join(line for _, line in zip(range(40), f, strict=False)))
    result = train_reward_model(
        str(train_file),
        out,
        config,
        base=str(base),
        eval_data=str(eval_file),
        skip_malformed=True,
        limit=48,
    )
    assert (result.skipped, result.parted) == (0, 0)  # the 4 parted pairs come after row 48
    assert result.train_examples == 48
    # The loss on the training pairs goes down, and the weights changed.
    before = _fixed_batch_loss(base, examples)
    after = _fixed_batch_loss(out, examples)
    assert after < before - 0.01, (before, after)
    start = load_file(base / "model.safetensors")
    end = load_file(out / "model.safetensors")
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    assert len(changed) > len(start) // 2
    # The checkpoint carries what export needs.
    info = json.loads((out / "rmserve_training.json").read_text())
    assert info["max_length"] == 128
    assert info["normalization"]["n"] == 64
    assert info["normalization"]["std"] > 0
    assert info["evaluation"]["n"] == 40
    assert result.evaluation is not None
    assert 0.0 <= result.evaluation.accuracy <= 1.0
    assert len(result.losses) == 6
