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
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Response

from rmserve.activations import sigmoid
from rmserve.service.ensemble import Aggregate
from rmserve.service.pipeline import ScoredItems, Scorer
from rmserve.service.routes.common import SCORING_ERRORS
from rmserve.service.schemas import (
    CompareRequest,
    CompareResponse,
    EnsembleOptions,
    ItemError,
    RankedResponse,
    RankRequest,
    RankResponse,
    ScoreRequest,
    ScoreResponse,
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
    labels = scorer.manifest.labels
    if len(labels) == 1:
        return None, None
    return result.head_scores.tolist(), list(labels)


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


@dataclass(frozen=True)
class _Spread:
    """The members' std and (when asked) their rewards, on the scale of ``scores``."""

    std: npt.NDArray[np.float64]
    members: npt.NDArray[np.float64] | None

    @classmethod
    def of(cls, result: ScoredItems, scorer: Scorer, body: EnsembleOptions) -> _Spread:
        normalize = getattr(body, "normalize", False)
        std = result.std / scorer.manifest.normalization.std if normalize else result.std
        members = None
        if body.return_members:
            raw = result.members.astype(np.float64)
            members = scorer.normalize(raw) if normalize else raw
        return cls(std, members)

    def member_rows(self, result: ScoredItems) -> list[list[float] | None] | None:
        if self.members is None:
            return None
        rows = self.members.tolist()
        return [None if i in result.refused else row for i, row in enumerate(rows)]


# What every /v1 scoring request carries (ScoreRequest, RankRequest, CompareRequest).
ScoringRequest = ScoreRequest | RankRequest | CompareRequest


async def _score(
    body: ScoringRequest,
    items: list[ItemInput],
    scorer: Scorer,
    response: Response,
    *,
    partial: bool,
) -> tuple[ScoredItems, Aggregate, npt.NDArray[np.floating[Any]]]:
    """The request's items scored with its aggregate and truncation policy: the result,
    the aggregate, and the scores as the request asked (raw or normalized); the timing
    headers set on ``response``."""
    aggregate = scorer.aggregate_for(body.aggregate, body.uwo_lambda)
    result = await scorer.score(
        items, truncate_response=body.truncate_response, partial=partial, aggregate=aggregate
    )
    response.headers.update(result.timing_headers())
    scores = scorer.normalize(result.scores) if body.normalize else result.scores
    return result, aggregate, scores


def _per_item_fields(
    body: ScoringRequest,
    scorer: Scorer,
    result: ScoredItems,
    aggregate: Aggregate,
    scores: npt.NDArray[np.floating[Any]],
) -> dict[str, Any]:
    """The answer fields /v1/score and /v1/rank share, a refused item's entries null."""
    spread = _Spread.of(result, scorer, body)
    _, labels = _heads(result, scorer)
    return {
        "model": scorer.manifest.model_name,
        "scores": _optional(scores),
        "aggregate": aggregate.name,
        "std": _optional(spread.std),
        "members": spread.member_rows(result),
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
    result, aggregate, scores = await _score(body, items, scorer, response, partial=True)
    return ScoreResponse(**_per_item_fields(body, scorer, result, aggregate, scores))


@router.post("/v1/rank", summary="Rank responses to one prompt", response_model_exclude_none=True)
async def rank(body: RankRequest, response: Response, scorer: ScorerDep) -> RankResponse:
    """Responses to one prompt, best first (best-of-n, GRPO groups)."""
    items = [body.item(r) for r in body.responses]
    result, aggregate, scores = await _score(body, items, scorer, response, partial=True)
    # Stable: equal scores keep request order. Refused responses (NaN) are not ranked.
    order = [int(i) for i in np.argsort(-scores, kind="stable") if i not in result.refused]
    if body.top_k is not None:
        order = order[: body.top_k]
    return RankResponse(
        ranking=[RankedResponse(index=i, score=float(scores[i])) for i in order],
        **_per_item_fields(body, scorer, result, aggregate, scores),
    )


@router.post("/v1/compare", summary="Compare two responses", response_model_exclude_none=True)
async def compare(body: CompareRequest, response: Response, scorer: ScorerDep) -> CompareResponse:
    """Both rewards and the Bradley-Terry probability that ``a`` is preferred."""
    items = [body.item(body.a), body.item(body.b)]
    result, aggregate, scores = await _score(body, items, scorer, response, partial=False)
    raw_a, raw_b = float(result.scores[0]), float(result.scores[1])
    head_scores, labels = _heads(result, scorer)
    spread = _Spread.of(result, scorer, body)
    return CompareResponse(
        model=scorer.manifest.model_name,
        scores=scores.tolist(),
        # The model was trained with P(a > b) = sigmoid(r_a - r_b) on raw rewards.
        p_a_preferred=float(sigmoid(raw_a - raw_b)),
        aggregate=aggregate.name,
        std=spread.std.tolist(),
        members=spread.members.tolist() if spread.members is not None else None,
        head_scores=head_scores,
        labels=labels,
        truncated=result.truncated,
        usage=Usage(tokens=result.tokens),
    )
