"""``--ensemble K --ensemble-diversity independent``: K whole reward models, trained one after
the other, each with its own seed (head initialisation, dropout, data order) and its own
Poisson(1) bootstrap resample (:mod:`rmserve.training.ensemble`).

The most diverse ensemble rmserve trains, and the dearest: K times the training time of one
model, and a bundle that runs K backbones (K times the serving cost). The checkpoint is a
folder of members::

    OUT/rmserve_training.json   the ensemble (member folders, seeds), the evaluation and the
                                normalization of the members' mean reward
    OUT/tokenizer.json ...      the tokenizer, shared by all members
    OUT/member_0/ ...           each a complete rmserve checkpoint of one model

``rmserve export OUT`` writes one graph whose output is [batch, K], as for an ensemble of heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from rmserve.encoding import PairEncoder
from rmserve.formatting import TextFormat
from rmserve.manifest import Evaluation, Normalization
from rmserve.training.data import read_examples
from rmserve.training.ensemble import DIVERSITY_DESCRIPTIONS, member_seeds
from rmserve.training.metadata import EnsembleInfo, TrainingInfo
from rmserve.training.modeling import architecture_of, load_tokenizer
from rmserve.training.pairs import encode_examples, pair_metrics
from rmserve.training.results import TrainResult, print_summary
from rmserve.training.scoring import (
    BatchScorer,
    sampled_normalization,
    stacked_scorer,
    torch_scorer,
)
from rmserve.training.trainer import PreferenceDataset
from rmserve.training.uncertainty import score_members

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rmserve.training.config import RewardConfig

__all__ = ["member_scorer", "train_independent_ensemble"]


def member_scorer(checkpoint: Path, member_dirs: tuple[str, ...]) -> BatchScorer:
    """The members of an independent ensemble scored in torch: rewards (B, K)."""
    from rmserve.training.checkpoint import load_checkpoint

    scorers = []
    for name in member_dirs:
        model = load_checkpoint(str(checkpoint / name)).model  # refuses a head that did not load
        scorers.append(torch_scorer(model, architecture_of(model)[1]))
    return stacked_scorer(scorers)


def train_independent_ensemble(
    data: str,
    out: str | Path,
    config: RewardConfig,
    *,
    base: str,
    eval_data: str | None,
    skip_malformed: bool,
    limit: int | None,
    text_format: TextFormat | None,
    train_member: Callable[..., TrainResult],
) -> TrainResult:
    """Train K members into ``out/member_k`` with ``train_member`` (the trainer of one model,
    :func:`rmserve.training.train.train_reward_model`, passed in so that this module does not
    import the trainer that imports it) and describe them as one ensemble in ``out``."""
    root = Path(out)
    seeds = member_seeds(config.seed, config.ensemble)
    names = tuple(f"member_{k}" for k in range(config.ensemble))
    train_one = partial(
        train_member,
        data,
        base=base,
        eval_data=eval_data,
        skip_malformed=skip_malformed,
        limit=limit,
        text_format=text_format,
        summary=False,
    )
    results = [
        train_one(root / name, _member_config(config, seed, root / name), bootstrap_seed=seed)
        for name, seed in zip(names, seeds, strict=True)
    ]
    first, tokenizer = _first_member(root / names[0])
    members = _Members(
        scorer=member_scorer(root, names),
        encoder=PairEncoder(tokenizer.backend_tokenizer, first.max_length),
        text_format=first.text_format,
        pad_token_id=int(tokenizer.pad_token_id),
        batch_size=config.per_device_eval_batch_size,
    )
    evaluation, member_accuracy = (
        _evaluate(members, eval_data, skip_malformed) if eval_data else (None, ())
    )
    normalization = _normalization(members, data, config, skip_malformed, limit)
    info = replace(
        first,
        normalization=normalization,
        evaluation=evaluation,
        ensemble=EnsembleInfo(
            members=config.ensemble,
            diversity="independent",
            description=DIVERSITY_DESCRIPTIONS["independent"],
            member_seeds=seeds,
            member_dirs=names,
        ),
    )
    result = _ensemble_result(root, results, info, normalization, member_accuracy)
    if config.process_index == 0:
        tokenizer.save_pretrained(str(root))
        info.write(root)
        print_summary(result)
    return result


def _member_config(config: RewardConfig, seed: int, out: Path) -> RewardConfig:
    """One member's recipe: the ensemble's, as a single model with the member's seed."""
    return replace(config, ensemble=1, seed=seed, output_dir=str(out))


def _first_member(folder: Path) -> tuple[TrainingInfo, PreTrainedTokenizerBase]:
    """Member 0's training info (the ensemble's starts from it) and its tokenizer, which all
    members share."""
    info = TrainingInfo.read(folder)
    if info is None:  # pragma: no cover - train_reward_model always writes it
        raise RuntimeError(f"{folder} has no training info")
    return info, load_tokenizer(str(folder))


def _ensemble_result(
    root: Path,
    results: list[TrainResult],
    info: TrainingInfo,
    normalization: Normalization,
    member_accuracy: tuple[float, ...],
) -> TrainResult:
    """The members' results as the ensemble's: their mean loss, all their steps and time,
    the ensemble's evaluation and normalization."""
    return TrainResult(
        out=root,
        train_loss=sum(r.train_loss for r in results) / len(results),
        losses=[loss for r in results for loss in r.losses],
        evaluation=info.evaluation,
        normalization=normalization,
        train_examples=results[0].train_examples,
        skipped=results[0].skipped,
        parted=results[0].parted,
        max_length=info.max_length,
        ensemble=info.ensemble,
        member_accuracy=member_accuracy,
        steps=sum(r.steps for r in results),
        seconds=sum(r.seconds or 0.0 for r in results),
    )


@dataclass(frozen=True)
class _Members:
    """The trained members as one scorer, with how texts reach it."""

    scorer: BatchScorer  # (B, T) ids and mask -> (B, K)
    encoder: PairEncoder
    text_format: TextFormat
    pad_token_id: int
    batch_size: int


def _evaluate(
    members: _Members, eval_data: str, skip_malformed: bool
) -> tuple[Evaluation, tuple[float, ...]]:
    """The ensemble's evaluation (the members' mean reward) and each member's accuracy."""
    examples = read_examples(
        eval_data, skip_malformed=skip_malformed, text_format=members.text_format
    ).examples
    encoded = encode_examples(examples, members.encoder, members.text_format)
    scores = score_members(encoded, members.scorer, members.pad_token_id, members.batch_size)
    metrics = pair_metrics(scores.mean())
    member_accuracy = tuple(
        float(pair_metrics(scores.member(k))["accuracy"]) for k in range(scores.members)
    )
    evaluation = Evaluation(
        accuracy=float(metrics["accuracy"]),
        n=int(metrics["n"]),
        data=str(eval_data),
        mean_margin=float(metrics["mean_margin"]),
        shorter_wins_accuracy=float(metrics["shorter_wins_accuracy"]),
    )
    return evaluation, member_accuracy


def _normalization(
    members: _Members, data: str, config: RewardConfig, skip_malformed: bool, limit: int | None
) -> Normalization:
    """The bundle's reward is the members' mean: its mean and std on the training
    responses, sampled as the trainer samples them for one model."""
    train_read = read_examples(
        data, skip_malformed=skip_malformed, text_format=members.text_format, limit=limit
    )
    dataset = PreferenceDataset(
        train_read.examples,
        members.encoder,
        members.text_format,
        truncate_long_responses=config.truncate_long_responses,
    )
    normalization = sampled_normalization(
        members.scorer,
        [row for item in dataset.items for row in item.ids],
        members.pad_token_id,
        members.batch_size,
        samples=config.normalization_samples,
        seed=config.seed,
        what="training responses",
    )
    return replace(normalization, reference=f"{normalization.reference}, members' mean reward")
