"""The request pipeline shared by all routes: items -> tokens -> batcher -> rewards (the model
it scores with is loaded by :mod:`rmserve.service.loading`).

It maps every way an item can fail to its HTTP answer (:class:`ApiError`) so the routes stay
small: too many items 413, an item too long, a response that cannot fit or an item the text
format refuses (a chat template's ``raise_exception``) 422 naming the item, a full queue 429
with Retry-After, a draining server 503. Such a failure is the request's own: items are checked
before they are queued, so other requests in flight never see it. A route that can answer per
item (``partial``) keeps the other items' scores and reports the refused ones instead.

A model may have several heads (the manifest's ``labels``): a result carries every head, and
``scores`` is the manifest's ``reward_head``, the number the routes call the reward.

A result is raw; :meth:`Scorer.rewards` puts it on the scale a door was asked for (raw, or
normalized with the bundle's statistics), the one place that rule lives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from rmserve.service.batcher import Batcher, BatcherClosedError, InferenceError, QueueFullError
from rmserve.service.ensemble import Aggregate, AggregateName, member_rewards
from rmserve.service.errors import ApiError
from rmserve.service.loading import LoadedModel
from rmserve.service.metrics import ServiceMetrics
from rmserve.service.settings import ServiceSettings
from rmserve.service.tokenization import (
    ItemInput,
    ItemRefusedError,
    ItemTooLongError,
    ResponseTooLongAtError,
)

__all__ = ["Rewards", "ScoredItems", "Scorer", "item_error"]

logger = logging.getLogger("rmserve.service.pipeline")


def item_error(e: ItemRefusedError) -> ApiError:
    """The 422 for one item that cannot be scored, naming it and saying what to change."""
    if isinstance(e, ResponseTooLongAtError):
        details = {
            "index": e.index,
            "response_tokens": e.response_tokens,
            "prompt_tokens": e.prompt_tokens,
            "max_response_tokens": e.budget,
            "max_length": e.max_length,
        }
        return ApiError(422, "response_too_long", str(e), details=details)
    if isinstance(e, ItemTooLongError):
        details = {"index": e.index, "limit": e.limit}
        return ApiError(422, "item_too_long", str(e), details=details)
    return ApiError(422, "invalid_item", str(e), details={"index": e.index})


def _refusal(e: QueueFullError | BatcherClosedError) -> ApiError:
    """The answer to work the batcher refused: 429 when full, 503 when draining."""
    if isinstance(e, QueueFullError):
        return ApiError(429, "queue_full", str(e), headers={"Retry-After": str(e.retry_after_s)})
    return ApiError(503, "unavailable", str(e), headers={"Retry-After": "1"})


@dataclass(frozen=True)
class ScoredItems:
    """What :meth:`Scorer.score` gives for the items of one request."""

    # (n,) raw rewards, request order: the reward head, or an ensemble's aggregate
    scores: npt.NDArray[np.floating]
    head_scores: npt.NDArray[np.float32]  # (n, K) raw values of every head, request order
    members: npt.NDArray[np.float32]  # (n, M) an ensemble's members; (n, 1) for one model
    std: npt.NDArray[np.float64]  # (n,) the members' standard deviation (0 for one model)
    truncated: list[bool]
    tokens: int
    tokenize_s: float
    queue_s: float
    inference_s: float
    # Items left out of a partial request, by index, with the 4xx each would have answered.
    refused: dict[int, ApiError] = field(default_factory=dict)

    def timing_headers(self) -> dict[str, str]:
        """TEI-style timing headers, in milliseconds."""
        return {
            "x-tokenization-time": f"{self.tokenize_s * 1000:.3f}",
            "x-queue-time": f"{self.queue_s * 1000:.3f}",
            "x-inference-time": f"{self.inference_s * 1000:.3f}",
        }


@dataclass(frozen=True)
class Rewards:
    """A result on the scale its caller asked for: raw, or normalized, (value - mean) / std
    with the bundle's statistics (those of the reward: the reward head, or an ensemble's
    aggregate, whose members share its scale). A refused item's rows stay NaN."""

    scores: npt.NDArray[np.float64]  # (n,) the reward of each item
    std: npt.NDArray[np.float64]  # (n,) the members' std: a spread scales, it does not shift
    members: npt.NDArray[np.float64]  # (n, M) each member's reward, as scores


class Scorer:
    """Scores items through the tokenizer and the batcher, with the request limits."""

    def __init__(
        self,
        model: LoadedModel,
        batcher: Batcher,
        settings: ServiceSettings,
        metrics: ServiceMetrics | None = None,
    ):
        self.model = model
        self.manifest = model.manifest
        self.batcher = batcher
        self.max_items = settings.max_items_per_request
        self.truncate_response = settings.truncate_response  # when the request does not say
        self.aggregate = Aggregate(settings.ensemble_aggregate, settings.uwo_lambda)
        self.metrics = metrics

    async def score(
        self,
        items: Sequence[ItemInput],
        *,
        truncate_response: bool | None,
        partial: bool = False,
        aggregate: Aggregate | None = None,
    ) -> ScoredItems:
        """Score ``items``; ``truncate_response`` and ``aggregate`` None mean the server's
        settings (the aggregate of an ensemble's members; any other model is one member).

        An item that cannot be scored fails the request (its 4xx), unless ``partial`` and
        some other item can be scored: then it is left out, its row NaN, and ``refused`` says
        why (one item never costs a multi-item request every score)."""
        if len(items) > self.max_items:
            raise ApiError(
                413,
                "too_many_items",
                f"the request has {len(items)} items; the limit is {self.max_items} "
                "(RMSERVE_MAX_ITEMS_PER_REQUEST); split it",
            )
        try:
            self.batcher.check_admission(len(items))
        except (QueueFullError, BatcherClosedError) as e:
            raise _refusal(e) from e
        if truncate_response is None:
            truncate_response = self.truncate_response
        started = time.perf_counter()
        encoded = await self.model.tokenizer.encode(items, truncate_response=truncate_response)
        tokenize_s = time.perf_counter() - started
        refused = {index: item_error(e) for index, e in encoded.refused.items()}
        if self.metrics is not None:
            self.metrics.truncated_items.inc(sum(encoded.truncated))
            for error in refused.values():
                self.metrics.refused_items.labels(error.type).inc()
        if refused and (not partial or len(refused) == len(items)):
            raise next(iter(refused.values()))
        accepted = [i for i in range(len(items)) if i not in refused]
        try:
            scored = await self.batcher.submit([encoded.ids[i] for i in accepted])
        except (QueueFullError, BatcherClosedError) as e:
            raise _refusal(e) from e
        except InferenceError as e:
            raise ApiError(500, "inference_error", str(e)) from e
        heads = np.full((len(items), self.manifest.num_heads), np.nan, dtype=np.float32)
        heads[accepted] = scored.head_scores  # (n, K); refused rows stay NaN
        members = member_rewards(heads, self.manifest)
        std = members.astype(np.float64).std(axis=1)
        if self.metrics is not None and accepted:
            self.metrics.observe_std(std[accepted])
        return ScoredItems(
            scores=(aggregate or self.aggregate)(members),
            head_scores=heads,
            members=members,
            std=std,
            truncated=encoded.truncated,
            tokens=encoded.tokens,
            tokenize_s=tokenize_s,
            queue_s=scored.queue_s,
            inference_s=scored.inference_s,
            refused=refused,
        )

    def aggregate_for(self, name: AggregateName | None, uwo_lambda: float | None) -> Aggregate:
        """A request's aggregate over the server's defaults; 422 when uwo_lambda is given for
        an aggregate other than uwo (it would be ignored, which hides a mistake)."""
        chosen = Aggregate(
            name or self.aggregate.name,
            self.aggregate.uwo_lambda if uwo_lambda is None else uwo_lambda,
        )
        if uwo_lambda is not None and chosen.name != "uwo":
            raise ApiError(
                422,
                "invalid_request",
                f"uwo_lambda applies to the uwo aggregate only, and this request's aggregate "
                f"is {chosen.name}; send aggregate 'uwo' or leave uwo_lambda out",
            )
        return chosen

    def rewards(self, result: ScoredItems, *, normalize: bool) -> Rewards:
        """``result``'s rewards, members and std, raw or (``normalize``) normalized with the
        bundle's statistics: every door that normalizes (a /v1 request's ``normalize``, the
        compatibility doors' RMSERVE_COMPAT_NORMALIZE) asks here."""
        # In float64: a small std would amplify float32 rounding of the difference.
        scores = result.scores.astype(np.float64)
        members = result.members.astype(np.float64)
        if not normalize:
            return Rewards(scores, result.std, members)
        norm = self.manifest.normalization
        return Rewards(
            scores=(scores - norm.mean) / norm.std,
            std=result.std / norm.std,
            members=(members - norm.mean) / norm.std,
        )
