"""``/v1/models``, ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from rmserve.service.metrics import CONTENT_TYPE_LATEST
from rmserve.service.schemas import HealthResponse, ModelCard, ModelsResponse
from rmserve.service.state import StateDep, still_loading

__all__ = ["health_router", "metrics_router", "models_router"]

models_router = APIRouter(tags=["models"])
health_router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["metrics"])


@models_router.get("/v1/models", summary="The model served")
async def models(state: StateDep) -> ModelsResponse:
    """OpenAI-style model list; each card carries the bundle manifest (without hashes: its
    ``labels`` and ``reward_head`` say what the scores are) and the max_length in force."""
    if state.model is None:
        raise still_loading()
    runtime = state.model.runtime
    return ModelsResponse(
        data=[
            ModelCard(
                id=state.model.manifest.model_name,
                created=state.created,
                precision=runtime.precision,
                provider=runtime.provider,
                max_length=state.model.max_length,
                manifest=state.model.manifest.public(),
            )
        ]
    )


@health_router.get("/healthz", summary="Liveness")
async def healthz() -> HealthResponse:
    """200 while the process serves HTTP."""
    return HealthResponse(status="ok")


@health_router.get(
    "/readyz",
    summary="Readiness",
    responses={503: {"model": HealthResponse, "description": "Loading or draining."}},
)
async def readyz(state: StateDep) -> JSONResponse:
    """200 once the bundle is loaded and warmed up; 503 before and while draining."""
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready"})


@metrics_router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus text exposition of the rmserve_* metrics."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
