"""``/v1/score``, ``/v1/rank``, ``/v1/compare``: rmserve's own scoring API.

``scores`` is the reward: the manifest's reward head (normalized when asked). A model of
several heads also answers ``head_scores`` (every head, raw) and ``labels``; for one head the
two are left out of the JSON (``response_model_exclude_none``), so one-head answers are as
before.

``/v1/score`` and ``/v1/rank`` answer per item: an item that cannot be scored (a response too
long under the refuse policy, a conversation the template refuses) gets a null score and an
entry in ``errors``, and the others are scored; only a request with no item left answers the
item's 422. ``/v1/compare`` needs both responses, so either one failing answers 422.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Response

from rmserve.activations import sigmoid
from rmserve.service.ensemble import Aggregate
from rmserve.service.pipeline import Rewards, ScoredItems, Scorer
from rmserve.service.routes.common import SCORING_ERRORS
from rmserve.service.schemas import (
    CompareRequest,
    CompareResponse,
    ItemError,
    RankedResponse,
    RankRequest,
    RankResponse,
    ScoreRequest,
    ScoreResponse,
    ScoringOptions,
    Usage,
)
from rmserve.service.state import ScorerDep
from rmserve.service.tokenization import ItemInput

__all__ = ["router"]

router = APIRouter(tags=["scoring"], responses=SCORING_ERRORS)


def _heads(
    result: ScoredItems, scorer: Scorer
) -> tuple[list[list[float]] | None, list[str] | None]:
    """(head_scores, labels) of a model of several heads; None (left out) for one head."""
    if not scorer.manifest.has_several_heads:
        return None, None
    return result.head_scores.tolist(), list(scorer.manifest.labels)


def _optional(values: npt.NDArray[np.floating[Any]]) -> list[float | None]:
    """JSON numbers, with null for the NaN of an item that was not scored."""
    return [None if math.isnan(v) else v for v in values.tolist()]


def _head_rows(result: ScoredItems, scorer: Scorer) -> list[list[float] | None] | None:
    rows, _ = _heads(result, scorer)
    if rows is None:
        return None
    return [None if i in result.refused else row for i, row in enumerate(rows)]


def _errors(result: ScoredItems) -> list[ItemError] | None:
    """One entry per refused item; None (left out of the JSON) when every item was scored."""
    if not result.refused:
        return None
    return [
        ItemError(index=i, type=e.type, message=e.message, details=e.details)
        for i, e in result.refused.items()
    ]


def _member_rows(
    body: ScoringOptions, result: ScoredItems, rewards: Rewards
) -> list[list[float] | None] | None:
    """The members' rewards when the request asked for them; None (left out) otherwise."""
    if not body.return_members:
        return None
    rows = rewards.members.tolist()
    return [None if i in result.refused else row for i, row in enumerate(rows)]


async def _score(
    body: ScoringOptions,
    items: list[ItemInput],
    scorer: Scorer,
    response: Response,
    *,
    partial: bool,
) -> tuple[ScoredItems, Aggregate, Rewards]:
    """The request's items scored with its aggregate and truncation policy: the result,
    the aggregate, and the rewards on the scale the request asked (raw or normalized); the
    timing headers set on ``response``."""
    aggregate = scorer.aggregate_for(body.aggregate, body.uwo_lambda)
    result = await scorer.score(
        items, truncate_response=body.truncate_response, partial=partial, aggregate=aggregate
    )
    response.headers.update(result.timing_headers())
    return result, aggregate, scorer.rewards(result, normalize=body.normalize)


def _per_item_fields(
    body: ScoringOptions,
    scorer: Scorer,
    result: ScoredItems,
    aggregate: Aggregate,
    rewards: Rewards,
) -> dict[str, Any]:
    """The answer fields /v1/score and /v1/rank share, a refused item's entries null."""
    _, labels = _heads(result, scorer)
    return {
        "model": scorer.manifest.model_name,
        "scores": _optional(rewards.scores),
        "aggregate": aggregate.name,
        "std": _optional(rewards.std),
        "members": _member_rows(body, result, rewards),
        "head_scores": _head_rows(result, scorer),
        "labels": labels,
        "truncated": result.truncated,
        "errors": _errors(result),
        "usage": Usage(tokens=result.tokens),
    }


@router.post("/v1/score", summary="Score items", response_model_exclude_none=True)
async def score(body: ScoreRequest, response: Response, scorer: ScorerDep) -> ScoreResponse:
    """Rewards of (prompt, response) pairs, conversations or rendered texts, in order."""
    items = [item.to_input() for item in body.items]
    result, aggregate, rewards = await _score(body, items, scorer, response, partial=True)
    return ScoreResponse(**_per_item_fields(body, scorer, result, aggregate, rewards))


@router.post("/v1/rank", summary="Rank responses to one prompt", response_model_exclude_none=True)
async def rank(body: RankRequest, response: Response, scorer: ScorerDep) -> RankResponse:
    """Responses to one prompt, best first (best-of-n, GRPO groups)."""
    items = [body.item(r) for r in body.responses]
    result, aggregate, rewards = await _score(body, items, scorer, response, partial=True)
    scores = rewards.scores
    # Stable: equal scores keep request order. Refused responses (NaN) are not ranked.
    order = [int(i) for i in np.argsort(-scores, kind="stable") if i not in result.refused]
    if body.top_k is not None:
        order = order[: body.top_k]
    return RankResponse(
        ranking=[RankedResponse(index=i, score=float(scores[i])) for i in order],
        **_per_item_fields(body, scorer, result, aggregate, rewards),
    )


@router.post("/v1/compare", summary="Compare two responses", response_model_exclude_none=True)
async def compare(body: CompareRequest, response: Response, scorer: ScorerDep) -> CompareResponse:
    """Both rewards and the Bradley-Terry probability that ``a`` is preferred."""
    items = [body.item(body.a), body.item(body.b)]
    result, aggregate, rewards = await _score(body, items, scorer, response, partial=False)
    raw_a, raw_b = float(result.scores[0]), float(result.scores[1])
    head_scores, labels = _heads(result, scorer)
    return CompareResponse(
        model=scorer.manifest.model_name,
        scores=rewards.scores.tolist(),
        # The model was trained with P(a > b) = sigmoid(r_a - r_b) on raw rewards.
        p_a_preferred=float(sigmoid(raw_a - raw_b)),
        aggregate=aggregate.name,
        std=rewards.std.tolist(),
        members=rewards.members.tolist() if body.return_members else None,
        head_scores=head_scores,
        labels=labels,
        truncated=result.truncated,
        usage=Usage(tokens=result.tokens),
    )
