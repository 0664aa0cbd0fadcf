"""What the routes share: settings, metrics, the loaded model and the scorer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from rmserve.service.errors import ApiError
from rmserve.service.loading import LoadedModel
from rmserve.service.metrics import ServiceMetrics
from rmserve.service.pipeline import Scorer
from rmserve.service.settings import ServiceSettings

__all__ = ["ScorerDep", "ServiceState", "StateDep", "get_scorer", "get_state", "still_loading"]


@dataclass
class ServiceState:
    settings: ServiceSettings
    metrics: ServiceMetrics
    model: LoadedModel | None = None
    scorer: Scorer | None = None
    ready: bool = False  # bundle loaded and warmed up
    draining: bool = False  # SIGTERM received: finishing work, taking none
    failed: bool = False  # loading the bundle failed; the process is exiting
    # time.monotonic() by which draining must end: set on SIGTERM, so that uvicorn's wait for
    # open requests and the batcher's drain share one drain_timeout_s instead of taking two.
    drain_deadline: float | None = None
    created: int = field(default=0)
    # Called when the model cannot be loaded after the port opened; the server sets it to stop
    # itself with a non-zero exit code.
    on_fatal: Callable[[], None] | None = None


# Dependencies are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in a
# thread pool, a thread hop per dependency per request on the hot path.
async def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.rmserve
    return state


def still_loading() -> ApiError:
    """The 503 of a route that needs the model before it has loaded (with Retry-After, so
    that clients and load balancers retry instead of failing)."""
    return ApiError(
        503,
        "unavailable",
        "the model is still loading; retry shortly",
        headers={"Retry-After": "1"},
    )


async def get_scorer(request: Request) -> Scorer:
    state: ServiceState = request.app.state.rmserve
    if state.scorer is None:
        raise still_loading()
    return state.scorer


StateDep = Annotated[ServiceState, Depends(get_state)]
ScorerDep = Annotated[Scorer, Depends(get_scorer)]
