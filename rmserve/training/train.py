"""The training run behind ``rmserve train``: data -> RewardTrainer -> checkpoint folder.

The folder it writes is a transformers checkpoint (``AutoModelForSequenceClassification``
loads it, with its tokenizer) plus ``rmserve_training.json`` (max length, text format, reward
normalization on the training pairs, final evaluation) that ``rmserve export`` reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmserve.encoding import PairEncoder
from rmserve.formatting import TextFormat
from rmserve.manifest import Evaluation
from rmserve.training.config import RewardConfig
from rmserve.training.data import PreferenceExample, ReadResult, read_examples
from rmserve.training.ensemble import (
    DIVERSITY_DESCRIPTIONS,
    bootstrap_weights,
    init_member_heads,
    label_members,
    member_seeds,
)
from rmserve.training.metadata import EnsembleInfo, TrainingInfo
from rmserve.training.modeling import (
    MINILM_ALIAS,
    MINILM_NAME,
    RewardModel,
    architecture_of,
    default_max_length,
    freeze,
    load_reward_model,
    load_tokenizer,
    resolve_base,
)
from rmserve.training.results import TrainResult
from rmserve.training.trainer import PreferenceDataset, RewardTrainer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["TrainResult", "resolve_max_length", "shorter_wins_accuracy", "train_reward_model"]


def shorter_wins_accuracy(examples: list[PreferenceExample]) -> float:
    """Accuracy of "the shorter response wins" (in characters; ties count half)."""
    scores = []
    for example in examples:
        for w, lo in example.pairs():
            gap = len(example.responses[lo]) - len(example.responses[w])
            scores.append(1.0 if gap > 0 else 0.5 if gap == 0 else 0.0)
    return sum(scores) / max(1, len(scores))


def _absolute(source: str | None) -> str | None:
    """A local path made absolute (export may run from another directory); ids unchanged."""
    if source and Path(source).exists():
        return str(Path(source).resolve())
    return source


def _log(message: str) -> None:
    print(f"rmserve train: {message}", file=sys.stderr, flush=True)


def _report(result: ReadResult, what: str) -> None:
    _log(f"{what}: {len(result.examples)} examples ({result.shape}) from {result.source}")
    if result.parted:
        first = next(e.source for e in result.examples if e.parted)
        _log(
            f"{what}: {result.parted} of the pairs part before their last turn (e.g. {first}); "
            "read with their shared turns as the prompt and the rest of each as the response"
        )
    if result.skipped:
        _log(f"{what}: skipped {result.skipped} malformed rows, e.g. {result.problems[0]}")


def _seed_everything(config: RewardConfig) -> None:
    """Seed python, numpy and torch before anything random happens, the reward head's
    initialisation included, as Trainer does for a model_init (it seeds only in __init__,
    after our model exists). full_determinism also makes the kernels deterministic."""
    from transformers import enable_full_determinism, set_seed

    if config.full_determinism:
        enable_full_determinism(config.seed)
    else:
        set_seed(config.seed)


def resolve_max_length(
    config: RewardConfig, model: PreTrainedModel, tokenizer: Any, base: str
) -> int:
    """The config's max_length, checked against the model's positions; when it has none, the
    most the model supports (its positions, bounded by its tokenizer's model_max_length)."""
    if config.max_length is None:
        return default_max_length(model, tokenizer)
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if positions and config.max_length > positions:
        raise ValueError(
            f"--max-length {config.max_length} exceeds the {positions} positions of {base}; "
            f"pass --max-length {positions} or less (or leave it out to use the model's limit)"
        )
    return config.max_length


def train_reward_model(
    data: str,
    out: str | Path,
    config: RewardConfig,
    *,
    base: str = "minilm",
    eval_data: str | None = None,
    skip_malformed: bool = False,
    limit: int | None = None,
    text_format: TextFormat | None = None,
    bootstrap_seed: int | None = None,
) -> TrainResult:
    """Train a Bradley-Terry reward model on ``data`` and save it to ``out``.

    The same call with the same ``config.seed`` gives the same weights on the same machine:
    the seed is set before the model (and its fresh reward head) is built.

    ``config.ensemble`` K > 1 trains an ensemble (:mod:`rmserve.training.ensemble`): K heads
    on one backbone, or K whole models (``ensemble_diversity="independent"``).
    ``bootstrap_seed`` weighs the training examples by a Poisson(1) bootstrap resample drawn
    from it (how each member of an independent ensemble is trained).
    """
    import torch

    if config.ensemble > 1 and config.ensemble_diversity == "independent":
        from rmserve.training.independent import train_independent_ensemble

        return train_independent_ensemble(
            data,
            out,
            config,
            base=base,
            eval_data=eval_data,
            skip_malformed=skip_malformed,
            limit=limit,
            text_format=text_format,
            train_member=train_reward_model,
        )
    fmt = text_format or TextFormat()
    _seed_everything(config)
    base_path = resolve_base(base)
    tokenizer = load_tokenizer(base_path)
    members = config.ensemble
    model = load_reward_model(base_path, pad_token_id=tokenizer.pad_token_id, num_labels=members)
    ensemble = None
    if members > 1:  # heads: one backbone, K heads; K = 1 stays exactly the single model
        seeds = member_seeds(config.seed, members)
        init_member_heads(model, seeds)
        label_members(model, members)
        ensemble = EnsembleInfo(
            members=members,
            diversity="heads",
            description=DIVERSITY_DESCRIPTIONS["heads"],
            member_seeds=seeds,
        )
    kind, pooling = architecture_of(model)
    trainable = freeze(model, embeddings=config.freeze_embeddings, layers=config.freeze_layers)
    max_length = resolve_max_length(config, model, tokenizer, base)

    train_read = read_examples(data, skip_malformed=skip_malformed, text_format=fmt, limit=limit)
    _report(train_read, "train")
    eval_read = None
    if eval_data:
        eval_read = read_examples(eval_data, skip_malformed=skip_malformed, text_format=fmt)
        _report(eval_read, "eval")

    encoder = PairEncoder(tokenizer.backend_tokenizer, max_length)
    train_set = PreferenceDataset(
        train_read.examples,
        encoder,
        fmt,
        truncate_long_responses=config.truncate_long_responses,
    )
    if ensemble is not None:
        train_set.resample(bootstrap_weights(len(train_set), ensemble.member_seeds))
    elif bootstrap_seed is not None:
        train_set.resample(bootstrap_weights(len(train_set), (bootstrap_seed,)))
    eval_set = (
        PreferenceDataset(eval_read.examples, encoder, fmt, truncate_long_responses=True)
        if eval_read
        else None
    )
    _log(
        f"{kind} {model.config.model_type} (pooling: {pooling}); {len(train_set)} training "
        f"examples, {train_set.truncated} truncated to {max_length} tokens, "
        f"{train_set.dropped} dropped (response too long); {trainable:,} trainable parameters; "
        f"processes: {config.world_size}"
        + (f"; an ensemble of {members}: {ensemble.description}" if ensemble else "")
    )

    reward_model = RewardModel(model, pooling)
    trainer = RewardTrainer(
        reward_model,
        config,
        train_dataset=train_set,
        eval_dataset=eval_set,
        pad_token_id=int(tokenizer.pad_token_id),
    )
    output = trainer.train()
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]

    evaluation = None
    member_accuracy: list[float] = []
    if eval_set is not None and eval_read is not None:
        # The periodic evaluation often just ran at the last step; do not score dev twice.
        last = [e for e in trainer.state.log_history if "eval_accuracy" in e]
        if last and last[-1].get("step") == trainer.state.global_step:
            metrics = last[-1]
        else:
            metrics = trainer.evaluate()
        evaluation = Evaluation(
            accuracy=float(metrics["eval_accuracy"]),
            n=sum(len(e.responses) * (len(e.responses) - 1) // 2 for e in eval_read.examples),
            data=str(eval_data),
            mean_margin=float(metrics["eval_mean_margin"]),
            shorter_wins_accuracy=shorter_wins_accuracy(eval_read.examples),
        )
        if ensemble is not None:
            member_accuracy = [float(metrics[f"eval_member_{k}_accuracy"]) for k in range(members)]
    normalization = trainer.measure_normalization(train_set, seed=config.seed)

    out_path = Path(out)
    trainer.save_model(str(out_path))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out_path))
        TrainingInfo(
            base_model=MINILM_NAME if base == MINILM_ALIAS else base_path,
            max_length=max_length,
            text_format=fmt,
            normalization=normalization,
            evaluation=evaluation,
            train_data=str(data),
            eval_data=_absolute(eval_data),
            ensemble=ensemble,
        ).write(out_path)
        summary: dict[str, Any] = {
            "out": str(out_path),
            "train_loss": output.training_loss,
            "train_examples": len(train_set),
            "skipped": train_read.skipped,
            "parted": train_read.parted,
            "max_length": max_length,
            "steps": trainer.state.global_step,
            "seconds": output.metrics.get("train_runtime"),
        }
        if evaluation is not None:
            summary |= {
                "eval_accuracy": evaluation.accuracy,
                "eval_n": evaluation.n,
                "shorter_wins_accuracy": evaluation.shorter_wins_accuracy,
            }
        if ensemble is not None:
            summary |= {"ensemble": members, "diversity": ensemble.diversity}
            if member_accuracy:
                summary["member_accuracy"] = member_accuracy
        print(json.dumps(summary), flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank leaves before the checkpoint is complete
    return TrainResult(
        out=out_path,
        train_loss=float(output.training_loss),
        losses=losses,
        evaluation=evaluation,
        normalization=normalization,
        train_examples=len(train_set),
        skipped=train_read.skipped,
        parted=train_read.parted,
        max_length=max_length,
        ensemble=ensemble,
        member_accuracy=tuple(member_accuracy),
    )
