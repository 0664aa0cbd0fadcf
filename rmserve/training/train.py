"""The training run behind ``rmserve train``: data -> RewardTrainer -> checkpoint folder.

The folder it writes is a transformers checkpoint (``AutoModelForSequenceClassification``
loads it, with its tokenizer) plus ``rmserve_training.json`` (max length, text format, reward
normalization on the training pairs, final evaluation) that ``rmserve export`` reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmserve.encoding import PairEncoder
from rmserve.formatting import TextFormat
from rmserve.manifest import Evaluation, Pooling
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
from rmserve.training.pairs import decision_credit
from rmserve.training.results import TrainResult, print_summary
from rmserve.training.trainer import PreferenceDataset, RewardTrainer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["TrainResult", "resolve_max_length", "shorter_wins_accuracy", "train_reward_model"]


def shorter_wins_accuracy(examples: list[PreferenceExample]) -> float:
    """Accuracy of "the shorter response wins" (in characters; ties count half)."""
    gaps = [
        len(example.responses[lo]) - len(example.responses[w])
        for example in examples
        for w, lo in example.pairs()
    ]
    return float(decision_credit(gaps).mean()) if gaps else 0.0


def _absolute(source: str | None) -> str | None:
    """A local path made absolute (export may run from another directory); ids unchanged."""
    if source and Path(source).exists():
        return str(Path(source).resolve())
    return source


logger = logging.getLogger("rmserve.training")


def _log(message: str) -> None:
    """Progress of a run, through ``logging`` (``rmserve train`` shows it on stderr;
    :func:`rmserve.training.commands.log_to_stderr`)."""
    logger.info(message)


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
    summary: bool = True,
    preset: str | None = None,
) -> TrainResult:
    """Train a Bradley-Terry reward model on ``data`` and save it to ``out``.

    The same call with the same ``config.seed`` gives the same weights on the same machine:
    the seed is set before the model (and its fresh reward head) is built.

    ``config.ensemble`` K > 1 trains an ensemble (:mod:`rmserve.training.ensemble`): K heads
    on one backbone, or K whole models (``ensemble_diversity="independent"``).
    ``bootstrap_seed`` weighs the training examples by a Poisson(1) bootstrap resample drawn
    from it (how each member of an independent ensemble is trained). ``summary``: print the
    run's JSON summary line on stdout (an independent ensemble prints one for itself, none per
    member). ``preset``: the name of the preset whose recipe ``config`` and ``base`` are,
    recorded in rmserve_training.json (export's default model name).
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
            train_member=partial(train_reward_model, preset=preset),
        )
    fmt = text_format or TextFormat()
    _seed_everything(config)
    built = _build_model(config, base)
    sets = _datasets(config, built, data, eval_data, fmt, skip_malformed, limit, bootstrap_seed)
    _describe(config, built, sets.train)

    trainer = RewardTrainer(
        RewardModel(built.model, built.pooling),
        config,
        train_dataset=sets.train,
        eval_dataset=sets.eval,
        pad_token_id=int(built.tokenizer.pad_token_id),
    )
    output = trainer.train()
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    evaluation, member_accuracy = _final_evaluation(trainer, sets, eval_data, built.ensemble)
    normalization = trainer.measure_normalization(sets.train, seed=config.seed)

    result = TrainResult(
        out=Path(out),
        train_loss=float(output.training_loss),
        losses=losses,
        evaluation=evaluation,
        normalization=normalization,
        train_examples=len(sets.train),
        skipped=sets.train_read.skipped,
        parted=sets.train_read.parted,
        max_length=built.max_length,
        ensemble=built.ensemble,
        member_accuracy=tuple(member_accuracy),
        steps=trainer.state.global_step,
        seconds=output.metrics.get("train_runtime"),
    )
    trainer.save_model(str(result.out))
    if trainer.is_world_process_zero():
        _save_training_info(result, built, fmt, base, data, eval_data, preset)
        if summary:
            print_summary(result)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank leaves before the checkpoint is complete
    return result


@dataclass(frozen=True)
class _Built:
    """The model to train and what was decided with it."""

    base_path: str
    tokenizer: Any
    model: Any
    ensemble: EnsembleInfo | None  # heads: one backbone, K heads (K = 1: None)
    kind: str
    pooling: Pooling
    trainable: int  # parameters left trainable after freezing
    max_length: int


def _build_model(config: RewardConfig, base: str) -> _Built:
    """The tokenizer and the sequence-classification model with one head, or K heads for an
    ensemble of heads (each drawn from its member's seed), frozen as the config says."""
    base_path = resolve_base(base)
    tokenizer = load_tokenizer(base_path)
    members = config.ensemble
    model = load_reward_model(base_path, pad_token_id=tokenizer.pad_token_id, num_labels=members)
    ensemble = None
    if members > 1:  # K = 1 stays exactly the single model
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
    return _Built(base_path, tokenizer, model, ensemble, kind, pooling, trainable, max_length)


@dataclass(frozen=True)
class _Sets:
    train_read: ReadResult
    eval_read: ReadResult | None
    train: PreferenceDataset
    eval: PreferenceDataset | None


def _datasets(
    config: RewardConfig,
    built: _Built,
    data: str,
    eval_data: str | None,
    fmt: TextFormat,
    skip_malformed: bool,
    limit: int | None,
    bootstrap_seed: int | None,
) -> _Sets:
    """The rows read (and reported) and encoded; the training set weighed by each member's
    bootstrap resample, or by ``bootstrap_seed``'s."""
    train_read = read_examples(data, skip_malformed=skip_malformed, text_format=fmt, limit=limit)
    _report(train_read, "train")
    eval_read = None
    if eval_data:
        eval_read = read_examples(eval_data, skip_malformed=skip_malformed, text_format=fmt)
        _report(eval_read, "eval")
    encoder = PairEncoder(built.tokenizer.backend_tokenizer, built.max_length)
    train_set = PreferenceDataset(
        train_read.examples, encoder, fmt, truncate_long_responses=config.truncate_long_responses
    )
    if built.ensemble is not None:
        train_set.resample(bootstrap_weights(len(train_set), built.ensemble.member_seeds))
    elif bootstrap_seed is not None:
        train_set.resample(bootstrap_weights(len(train_set), (bootstrap_seed,)))
    eval_set = None
    if eval_read is not None:
        eval_set = PreferenceDataset(eval_read.examples, encoder, fmt, truncate_long_responses=True)
    return _Sets(train_read, eval_read, train_set, eval_set)


def _describe(config: RewardConfig, built: _Built, train_set: PreferenceDataset) -> None:
    model = built.model
    ensemble = built.ensemble
    _log(
        f"{built.kind} {model.config.model_type} (pooling: {built.pooling}); {len(train_set)} "
        f"training examples, {train_set.truncated} truncated to {built.max_length} tokens, "
        f"{train_set.dropped} dropped (response too long); {built.trainable:,} trainable "
        f"parameters; processes: {config.world_size}"
        + (f"; an ensemble of {config.ensemble}: {ensemble.description}" if ensemble else "")
    )


def _final_evaluation(
    trainer: RewardTrainer, sets: _Sets, eval_data: str | None, ensemble: EnsembleInfo | None
) -> tuple[Evaluation | None, list[float]]:
    """The evaluation at the end of training (and each member's accuracy for an ensemble);
    none without eval data."""
    if sets.eval is None or sets.eval_read is None:
        return None, []
    # The periodic evaluation often just ran at the last step; do not score dev twice.
    last = [e for e in trainer.state.log_history if "eval_accuracy" in e]
    if last and last[-1].get("step") == trainer.state.global_step:
        metrics = last[-1]
    else:
        metrics = trainer.evaluate()
    examples = sets.eval_read.examples
    evaluation = Evaluation(
        accuracy=float(metrics["eval_accuracy"]),
        n=sum(len(e.responses) * (len(e.responses) - 1) // 2 for e in examples),
        data=str(eval_data),
        mean_margin=float(metrics["eval_mean_margin"]),
        shorter_wins_accuracy=shorter_wins_accuracy(examples),
    )
    members = ensemble.members if ensemble is not None else 0
    member_accuracy = [float(metrics[f"eval_member_{k}_accuracy"]) for k in range(members)]
    return evaluation, member_accuracy


def _save_training_info(
    result: TrainResult,
    built: _Built,
    fmt: TextFormat,
    base: str,
    data: str,
    eval_data: str | None,
    preset: str | None,
) -> None:
    """The tokenizer and rmserve_training.json beside the saved model (rank 0 only)."""
    built.tokenizer.save_pretrained(str(result.out))
    TrainingInfo(
        base_model=MINILM_NAME if base == MINILM_ALIAS else built.base_path,
        max_length=result.max_length,
        text_format=fmt,
        normalization=result.normalization,
        evaluation=result.evaluation,
        train_data=str(data),
        eval_data=_absolute(eval_data),
        ensemble=result.ensemble,
        preset=preset,
    ).write(result.out)
