"""The service's three ASGI middlewares (plain ASGI: no per-request task overhead).

- :class:`AdmissionMiddleware` answers a POST 429 with Retry-After, before its body is
  parsed, while ``max_in_flight`` POSTs are already in progress, so that an overload costs a
  header parse per refused request.
- :class:`BodyLimitMiddleware` refuses a POST whose body is not JSON (415) or is larger than
  ``max_request_bytes`` (413), from Content-Length when the client sends one and while reading
  otherwise, so a huge body is never read whole into memory.
- :class:`ObservabilityMiddleware` gives each request an id (``x-request-id``, the caller's
  if it sent a sane one), adds ``x-total-time``, counts requests by route and status, times
  them, and writes one access log line carrying the id.

``create_app`` stacks them outermost first: observability (so that the other two's refusals
are counted and logged as well), Starlette's CORS when origins are set, admission, then the
body limit.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Collection

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rmserve.service.errors import error_body
from rmserve.service.logs import request_id_var
from rmserve.service.metrics import ServiceMetrics

__all__ = ["AdmissionMiddleware", "BodyLimitMiddleware", "ObservabilityMiddleware"]

access_logger = logging.getLogger("rmserve.service.access")

_BODY_METHODS = {"POST", "PUT", "PATCH"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Probes and scrapes are frequent and dull: logged at debug, not info.
_QUIET_PATHS = {"/healthz", "/readyz", "/metrics"}


async def _send_error(
    send: Send,
    status: int,
    type_: str,
    message: str,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    close: bool = True,
) -> None:
    body = error_body(type_, message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": headers + (extra_headers or []),
        }
    )
    await send({"type": "http.response.body", "body": body})


class AdmissionMiddleware:
    """Refuses a POST with 429 + Retry-After, before parsing its body, while
    ``max_in_flight`` POSTs are already being parsed, tokenized, queued or scored.

    Why: a full queue refuses requests only after FastAPI has parsed and validated their
    JSON, on the event loop that also runs the batcher. Under a flood of large requests,
    refusing there costs about as much as scoring, and goodput collapses (docs/reliability.md,
    "Overload"; tests/reliability/test_overload.py). This refusal costs a header parse: the
    body is read and dropped unparsed, so the connection stays usable (closing it with unread
    data would reset it, and the client would see a connection error instead of the 429).
    """

    def __init__(self, app: ASGIApp, max_in_flight: int):
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            while True:  # drop the body: bounded by what the client sends, never parsed
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body"):
                    break
            await _send_error(
                send,
                429,
                "overloaded",
                f"the server is handling {self.in_flight} requests, its limit "
                "(RMSERVE_MAX_CONCURRENT_REQUESTS); retry after Retry-After seconds",
                extra_headers=[(b"retry-after", b"1")],
                close=False,
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type != b"application/json" and not content_type.endswith(b"+json"):
            shown = content_type.decode("latin-1") or "none"
            await _send_error(
                send,
                415,
                "unsupported_media_type",
                f"the body must be JSON with `Content-Type: application/json` (got {shown})",
            )
            return
        limit = self.max_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _send_error(send, 400, "bad_request", "Content-Length is not a number")
                return
            if length > limit:
                await _send_error(send, 413, "request_too_large", _too_large(length, limit))
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nothing to answer
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                await _send_error(send, 413, "request_too_large", _too_large(None, limit))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(length: int | None, limit: int) -> str:
    size = f"{length} bytes" if length is not None else "more than that"
    return (
        f"the body is {size}; the limit is {limit} bytes (RMSERVE_MAX_REQUEST_BYTES); "
        "send fewer items per request"
    )


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, known_paths: Collection[str]):
        self.app = app
        self.metrics = metrics
        self.known_paths = set(known_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                headers["x-total-time"] = f"{(time.perf_counter() - started) * 1000:.3f}"
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            duration = time.perf_counter() - started
            path = scope["path"]
            route = scope.get("route")
            template = getattr(route, "path", None)
            if template is None:
                template = path if path in self.known_paths else "unmatched"
            self.metrics.observe_request(template, status, duration)
            level = logging.DEBUG if path in _QUIET_PATHS and status < 400 else logging.INFO
            if access_logger.isEnabledFor(level):
                access_logger.log(
                    level,
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": path,
                        "status": status,
                        "duration_ms": round(duration * 1000, 3),
                        "client": (scope.get("client") or ("", 0))[0],
                    },
                )
            request_id_var.reset(token)
