"""``create_app(settings)``: the FastAPI application of the scoring service.

The lifespan loads the bundle (unless the server preloaded it), starts the batcher, warms the
model up and only then turns ``/readyz`` to 200. On shutdown it turns readiness to 503,
finishes queued and in-flight work (up to ``drain_timeout_s``) and stops the batcher.

Scoring routes (and ``/v1/models``) need the API key when keys are configured; health and
metrics routes too unless ``open_health`` / ``open_metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute

from rmserve import __version__
from rmserve.service.auth import make_key_dependency
from rmserve.service.batcher import Batcher
from rmserve.service.errors import install_error_handlers
from rmserve.service.metrics import ServiceMetrics
from rmserve.service.middleware import (
    AdmissionMiddleware,
    BodyLimitMiddleware,
    ObservabilityMiddleware,
)
from rmserve.service.routes import compat, meta, v1
from rmserve.service.scoring import LoadedModel, Scorer, load_model
from rmserve.service.settings import ServiceSettings
from rmserve.service.state import ServiceState

__all__ = ["create_app"]

logger = logging.getLogger("rmserve.service.app")

TIMING_HEADERS = [
    "x-request-id",
    "x-total-time",
    "x-queue-time",
    "x-inference-time",
    "x-tokenization-time",
]

DESCRIPTION = """Scores (prompt, response) pairs with a Bradley-Terry reward model exported to
ONNX, batching items of concurrent requests together. Compatible with OpenRLHF's remote reward
model (`/get_reward`) and vLLM's `/classify` as verl calls it."""


def create_app(settings: ServiceSettings, model: LoadedModel | None = None) -> FastAPI:
    """The app for ``settings``; ``model`` is a bundle already loaded by the caller, if any."""
    metrics = ServiceMetrics()
    state = ServiceState(settings=settings, metrics=metrics, model=model, created=int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.model is None:
            state.model = await asyncio.to_thread(load_model, settings)
        loaded = state.model
        info = loaded.runtime.info
        metrics.model_info.labels(
            model=info.model, precision=info.precision, provider=info.provider
        ).set(1)
        batcher = Batcher(
            loaded.runtime.run,
            pad_token_id=loaded.manifest.pad_token_id,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue_items=settings.max_queue_items,
            max_padding_ratio=settings.max_padding_ratio,
            on_batch=metrics.observe_batch,
            on_queue_change=metrics.set_queue_items,
        )
        batcher.start()
        if settings.warmup:
            seconds = await asyncio.to_thread(loaded.runtime.warm_up, settings.max_batch_size)
            logger.info("warm-up done", extra={"seconds": round(seconds, 3)})
        state.scorer = Scorer(loaded, batcher, settings)
        state.ready = True
        logger.info(
            "ready",
            extra={
                "model": info.model,
                "precision": info.precision,
                "provider": info.provider,
                "max_batch_size": settings.max_batch_size,
                "max_batch_tokens": settings.max_batch_tokens,
                "max_wait_ms": settings.max_wait_ms,
                "max_padding_ratio": settings.max_padding_ratio,
            },
        )
        try:
            yield
        finally:
            state.draining = True
            state.ready = False
            drained = await batcher.drain(settings.drain_timeout_s)
            await batcher.close()
            loaded.close()
            logger.info("stopped", extra={"drained": drained})

    app = FastAPI(
        title="rmserve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.rmserve = state
    install_error_handlers(app)

    require_key = [Depends(make_key_dependency(settings.api_key_list()))]
    routers = [
        (v1.router, require_key),
        (compat.router, require_key),
        (meta.models_router, require_key),
        (meta.health_router, [] if settings.open_health else require_key),
        (meta.metrics_router, [] if settings.open_metrics else require_key),
    ]
    known_paths: list[str] = []
    for router, dependencies in routers:
        app.include_router(router, dependencies=dependencies)
        known_paths += [route.path for route in router.routes if isinstance(route, APIRoute)]
    # Added innermost first: Observability -> CORS -> Admission -> BodyLimit -> app.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(AdmissionMiddleware, max_in_flight=settings.max_concurrent_requests)
    origins = settings.cors_origin_list()
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=TIMING_HEADERS,
        )
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, known_paths=known_paths)
    return app
