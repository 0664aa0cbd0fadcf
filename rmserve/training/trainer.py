"""``RewardTrainer``: transformers' ``Trainer`` with the Bradley-Terry loss.

Because it is a ``Trainer`` (custom ``compute_loss``, collator and sampler, nothing else), it
runs unchanged on one CPU, one GPU, or several processes under ``torchrun``/``accelerate``
(DDP or DeepSpeed). The model it trains is :class:`rmserve.training.modeling.RewardModel`, so
the whole reward computation (backbone and pooling) sits inside the one forward that DDP
wraps; checkpoints are saved from the inner transformers model, in transformers' format.

The text for each (prompt, response) comes from :func:`rmserve.formatting.render` and the ids
from :class:`rmserve.encoding.PairEncoder` over the tokenizer's backend, exactly as the server
computes them from the bundle's ``tokenizer.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction, Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from rmserve.encoding import PairEncoder, ResponseTooLongError
from rmserve.formatting import TextFormat
from rmserve.manifest import Normalization
from rmserve.training.config import RewardConfig
from rmserve.training.data import PreferenceExample
from rmserve.training.loss import bradley_terry_loss
from rmserve.training.modeling import RewardModel
from rmserve.training.pairs import decision_credit
from rmserve.training.scoring import sampled_normalization, torch_scorer

__all__ = [
    "PreferenceCollator",
    "PreferenceDataset",
    "RewardTrainer",
    "compute_pair_metrics",
]


@dataclass(frozen=True)
class EncodedExample:
    ids: list[list[int]]  # one row per response, best first
    margin: float


class PreferenceDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Examples encoded once, up front (the tokenizer is Rust and batched: seconds for 10k)."""

    def __init__(
        self,
        examples: Sequence[PreferenceExample],
        encoder: PairEncoder,
        text_format: TextFormat | None = None,
        *,
        truncate_long_responses: bool = True,
    ):
        rendered = [example.rendered(text_format) for example in examples]
        flat = [r for group in rendered for r in group]
        self.items: list[EncodedExample] = []
        self.truncated = 0  # examples that lost tokens (prompt, or response start kept)
        self.dropped = 0  # examples left out: a response too long, and truncation not allowed
        if truncate_long_responses:
            encoded = encoder.encode_batch(flat, truncate_response=True)
        start = 0
        for example, group in zip(examples, rendered, strict=True):
            if truncate_long_responses:
                pairs = encoded[start : start + len(group)]
                start += len(group)
            else:
                try:
                    pairs = encoder.encode_batch(group)
                except ResponseTooLongError:
                    self.dropped += 1
                    continue
            self.truncated += any(p.truncated for p in pairs)
            self.items.append(EncodedExample([p.ids for p in pairs], example.margin))
        if not self.items:
            raise ValueError("no training examples left after encoding (all were too long)")
        # (N, K) weight of each example for each ensemble member (its bootstrap resample);
        # None: every example weighs 1, for a single model.
        self.bootstrap: np.ndarray | None = None

    def resample(self, weights: np.ndarray) -> None:
        """Give example i the weight ``weights[i, k]`` in member k's loss: (N, K)."""
        if weights.ndim != 2 or weights.shape[0] != len(self.items):
            raise ValueError(
                f"bootstrap weights of shape {weights.shape} do not fit {len(self.items)} examples"
            )
        self.bootstrap = weights

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        feature: dict[str, Any] = {"input_ids": item.ids, "margin": item.margin}
        if self.bootstrap is not None:
            feature["bootstrap"] = self.bootstrap[index].tolist()  # (K,)
        return feature

    @property
    def lengths(self) -> list[int]:
        """Padded tokens each example brings to a batch: K rows x its longest row."""
        return [len(item.ids) * max(len(row) for row in item.ids) for item in self.items]


@dataclass(frozen=True)
class PreferenceCollator:
    """Flattens the K responses of each example into rows and lists the pairs between them.

    Features with ``bootstrap`` weights (ensemble members' resamples) give one weight column
    per member, ``w[p, k] = bootstrap[example, k] / (pairs of the example x examples)``: the
    batch is normalised by its size, not by its weights' sum, so that a member whose resample
    left out a whole batch simply learns nothing from it (no division by zero), and the
    weights sum to 1 in expectation as a single model's do."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows: list[list[int]] = []
        winners: list[int] = []
        losers: list[int] = []
        margins: list[float] = []
        weights: list[float] | list[list[float]] = []
        for feature in features:
            base = len(rows)
            k = len(feature["input_ids"])
            rows.extend(feature["input_ids"])
            num_pairs = k * (k - 1) // 2
            # Each example weighs the same, whatever its K (InstructGPT).
            share = 1.0 / (num_pairs * len(features))
            resample = feature.get("bootstrap")
            weight: Any = share if resample is None else [share * b for b in resample]
            for i in range(k):
                for j in range(i + 1, k):
                    winners.append(base + i)
                    losers.append(base + j)
                    margins.append(float(feature["margin"]))
                    weights.append(weight)
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):  # right padding: first/last real positions stay exact
            input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[r, : len(row)] = 1
        return {
            "input_ids": input_ids,  # (N, T)
            "attention_mask": attention_mask,  # (N, T)
            "winners": torch.tensor(winners, dtype=torch.long),  # (P,) row of the preferred
            "losers": torch.tensor(losers, dtype=torch.long),  # (P,)
            "margins": torch.tensor(margins, dtype=torch.float32),  # (P,)
            # (P,) summing to 1, or (P, K) with one column per ensemble member
            "pair_weights": torch.tensor(weights, dtype=torch.float32),
        }


def _accuracy(margin: np.ndarray) -> float:
    """Fraction of pairs with a positive margin, ties counted half."""
    return float(decision_credit(margin).mean())


def compute_pair_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Eval metrics from the (P, 2) [chosen, rejected] rewards that prediction_step returns;
    for an ensemble, (P, 2, K): the accuracy of the members' mean, and each member's."""
    rewards = np.asarray(prediction.predictions, dtype=np.float64)  # (P, 2) or (P, 2, K)
    mean = rewards.mean(axis=-1) if rewards.ndim == 3 else rewards  # (P, 2)
    margin = mean[:, 0] - mean[:, 1]
    metrics = {"accuracy": _accuracy(margin), "mean_margin": float(margin.mean())}
    if rewards.ndim == 3:
        for k in range(rewards.shape[-1]):
            metrics[f"member_{k}_accuracy"] = _accuracy(rewards[:, 0, k] - rewards[:, 1, k])
    return metrics


class RewardTrainer(Trainer):
    """Trains a :class:`RewardModel` on a :class:`PreferenceDataset` with the BT loss."""

    args: RewardConfig

    def __init__(
        self,
        model: RewardModel,
        args: RewardConfig,
        train_dataset: PreferenceDataset,
        pad_token_id: int,
        eval_dataset: PreferenceDataset | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=PreferenceCollator(pad_token_id),
            compute_metrics=compute_pair_metrics,
            **kwargs,
        )
        self.pad_token_id = pad_token_id

    def _get_train_sampler(
        self, train_dataset: torch.utils.data.Dataset[Any] | None = None
    ) -> torch.utils.data.Sampler[int] | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(
            dataset, PreferenceDataset
        ):
            # Trainer would measure len(input_ids) = K; the padded size is what matters. The
            # order follows data_seed (else seed) through its own generator, as Trainer's
            # other samplers do, so that nothing else drawn from torch's global generator
            # (dropout, a fresh head) changes which examples are batched together.
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=dataset.lengths,
                generator=torch.Generator().manual_seed(seed),
            )
        return super()._get_train_sampler(train_dataset)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewards = model(inputs["input_ids"], inputs["attention_mask"])  # (N,) or (N, K)
        chosen = rewards[inputs["winners"]]  # (P,) or (P, K)
        rejected = rewards[inputs["losers"]]  # (P,) or (P, K)
        loss = bradley_terry_loss(
            chosen,
            rejected,
            margin=inputs["margins"],
            pair_weight=inputs["pair_weights"],
            rewards=rewards,
            center_coefficient=self.args.center_rewards_coefficient,
        )
        if return_outputs:
            return loss, {"chosen": chosen, "rejected": rejected}
        return loss

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        # One row per pair. With K = 2 that is one row per example, so the duplicate trimming
        # of distributed evaluation (which counts examples) is exact; with ranked examples
        # under several processes, the last batch's padding examples may count once more.
        pairs = torch.stack([outputs["chosen"], outputs["rejected"]], dim=1)  # (P, 2[, K])
        # Trainer calls compute_metrics only when labels exist; the pairs carry their own.
        labels = torch.zeros(pairs.size(0), device=pairs.device)
        return loss.detach(), pairs.detach(), labels

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        # Save the inner transformers model so that AutoModelForSequenceClassification loads
        # the folder; the RewardModel wrapper holds no weights of its own.
        target = output_dir or self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        unwrapped.model.save_pretrained(target, safe_serialization=True)

    def measure_normalization(self, dataset: PreferenceDataset, seed: int = 0) -> Normalization:
        """Reward mean and std over (a random sample of) the training responses; for an
        ensemble, of the members' mean reward (what the bundle serves)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        return sampled_normalization(
            torch_scorer(unwrapped.model, unwrapped.pooling),
            [row for item in dataset.items for row in item.ids],
            self.pad_token_id,
            self.args.per_device_eval_batch_size,
            samples=self.args.normalization_samples,
            seed=seed,
            what="training responses",
        )
