"""``create_app(settings)``: the FastAPI application of the scoring service.

The lifespan starts loading the bundle (unless the caller preloaded it) in the background, so
the port opens at once: ``/healthz`` answers 200 and ``/readyz`` 503 while the ONNX session is
created and warmed up, then ``/readyz`` turns 200 (docs/architecture.md). A model that fails to
load marks the state failed and calls ``state.on_fatal`` (the server exits non-zero); readiness
never turns 200. On shutdown it turns readiness to 503, finishes queued and in-flight work (up
to ``drain_timeout_s``) and stops the batcher.

Scoring routes (and ``/v1/models``) need the API key when keys are configured; health and
metrics routes too unless ``open_health`` / ``open_metrics``. The API docs (``/docs``,
``/redoc``, ``/openapi.json`` and the pages' assets, served from the app so that they work
offline: rmserve/service/api_docs.py) are open.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute

from rmserve import __version__
from rmserve.manifest import Manifest
from rmserve.service.api_docs import add_api_docs
from rmserve.service.auth import make_key_dependency
from rmserve.service.batcher import Batcher
from rmserve.service.errors import install_error_handlers
from rmserve.service.loading import LoadedModel, load_model
from rmserve.service.metrics import ServiceMetrics
from rmserve.service.middleware import (
    AdmissionMiddleware,
    BodyLimitMiddleware,
    ObservabilityMiddleware,
)
from rmserve.service.pipeline import Scorer
from rmserve.service.routes import compat, meta, v1
from rmserve.service.runtime import choose_batch_size
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

DESCRIPTION = """Scores (prompt, response) pairs with a reward model exported to ONNX (one
reward, or several heads such as a multi-objective model's), batching items of concurrent
requests together. Compatible with OpenRLHF's remote reward model (`/get_reward`), vLLM's
`/classify` as verl calls it, and slime's remote reward model (`/slime/reward`)."""


def create_app(
    settings: ServiceSettings,
    model: LoadedModel | None = None,
    *,
    manifest: Manifest | None = None,
) -> FastAPI:
    """The app for ``settings``; ``model`` is a bundle already loaded by the caller, if any,
    and ``manifest`` one already checked (so the files are not hashed twice)."""
    metrics = ServiceMetrics()
    state = ServiceState(settings=settings, metrics=metrics, model=model, created=int(time.time()))
    app = FastAPI(
        title="rmserve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=_lifespan(state, manifest),
        openapi_url="/openapi.json",
        # FastAPI's pages load their scripts from a CDN; add_api_docs serves them itself.
        docs_url=None,
        redoc_url=None,
    )
    app.state.rmserve = state
    install_error_handlers(app)
    add_api_docs(app)
    known_paths = _include_routers(app, settings)
    _add_middleware(app, settings, metrics, known_paths)
    return app


def _lifespan(
    state: ServiceState, manifest: Manifest | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start loading in the background as the server starts; drain and stop as it stops."""
    batchers: list[Batcher] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(_start_or_fail(state, manifest, batchers))
        try:
            yield
        finally:
            await _stop(state, starting, batchers)

    return lifespan


async def _start_or_fail(
    state: ServiceState, manifest: Manifest | None, batchers: list[Batcher]
) -> None:
    try:
        await _start(state, manifest, batchers)
    except Exception as e:  # any failure to load is fatal: never a half-ready server
        state.failed = True
        logger.error(f"cannot serve the bundle: {e}", extra={"bundle": str(state.settings.bundle)})
        if state.on_fatal is not None:
            state.on_fatal()


async def _start(state: ServiceState, manifest: Manifest | None, batchers: list[Batcher]) -> None:
    """Load the bundle (unless preloaded), start its batcher, warm up, then turn ready."""
    settings = state.settings
    if state.model is None:
        state.model = await asyncio.to_thread(load_model, settings, manifest)
    loaded = state.model
    info = loaded.runtime.info
    state.metrics.model_info.labels(
        model=info.model, precision=info.precision, provider=info.provider
    ).set(1)
    batcher = _build_batcher(loaded, settings, state.metrics)
    batcher.start()
    batchers.append(batcher)
    if settings.warmup:
        seconds = await asyncio.to_thread(
            loaded.runtime.warm_up, batcher.max_batch_size, loaded.max_length
        )
        logger.info("warm-up done", extra={"seconds": round(seconds, 3)})
    state.scorer = Scorer(loaded, batcher, settings, state.metrics)
    if state.draining:  # SIGTERM came while loading: never turn ready
        return
    state.ready = True
    _log_ready(loaded, batcher, settings)


def _build_batcher(
    loaded: LoadedModel, settings: ServiceSettings, metrics: ServiceMetrics
) -> Batcher:
    """One batcher over the runtime's instances, sized by the settings and the provider."""
    runtime = loaded.runtime
    instances = range(runtime.instances)
    packed = [functools.partial(runtime.run_sequences, instance=k) for k in instances]
    return Batcher(
        [functools.partial(runtime.run, instance=k) for k in instances],
        packed=packed if runtime.packed else None,
        pad_token_id=loaded.manifest.pad_token_id,
        max_batch_size=choose_batch_size(
            settings.max_batch_size, runtime.provider, settings.max_queue_items
        ),
        # A model the caller loaded was not checked against the settings: check it here.
        max_batch_tokens=settings.batch_token_budget(loaded.max_length),
        max_wait_s=settings.max_wait_ms / 1000.0,
        max_queue_items=settings.max_queue_items,
        max_padding_ratio=settings.max_padding_ratio,
        num_heads=loaded.manifest.num_heads,
        on_batch=metrics.observe_batch,
        on_queue_change=metrics.set_queue_items,
    )


def _log_ready(loaded: LoadedModel, batcher: Batcher, settings: ServiceSettings) -> None:
    info = loaded.runtime.info
    logger.info(
        "ready",
        extra={
            "model": info.model,
            "precision": info.precision,
            "provider": info.provider,
            "instances": info.instances,
            "intra_op_threads": info.intra_op_threads,
            "prefix_reuse": info.prefix_reuse,
            "max_batch_size": batcher.max_batch_size,
            "max_batch_tokens": batcher.max_batch_tokens,
            "max_length": loaded.max_length,
            "labels": list(loaded.manifest.labels),
            "max_wait_ms": settings.max_wait_ms,
            "max_padding_ratio": settings.max_padding_ratio,
        },
    )


async def _stop(state: ServiceState, starting: asyncio.Task[None], batchers: list[Batcher]) -> None:
    """Turn unready, let a load in progress end, finish queued work, stop, free the model."""
    state.draining = True
    state.ready = False
    await starting  # a load in a worker thread cannot be interrupted; let it end
    timeout = state.settings.drain_timeout_s
    if state.drain_deadline is not None:
        timeout = max(0.0, state.drain_deadline - time.monotonic())
    drained = True
    for batcher in batchers:
        drained = await batcher.drain(timeout)
        await batcher.close()
    if state.model is not None:
        state.model.close()
    logger.info("stopped", extra={"drained": drained})


def _include_routers(app: FastAPI, settings: ServiceSettings) -> list[str]:
    """Mount the routers behind the API key where it applies; the paths they serve."""
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
    return known_paths


def _add_middleware(
    app: FastAPI, settings: ServiceSettings, metrics: ServiceMetrics, known_paths: list[str]
) -> None:
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
