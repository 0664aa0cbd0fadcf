"""One JSON error shape for every failure: ``{"error": {"type": ..., "message": ...}}``.

Bad input is always a 4xx that names what was wrong, never a 500: FastAPI's validation
errors (422), malformed JSON (400), a wrong content type (415), bodies that are too large
(413), items that do not fit (422), a full queue (429 with Retry-After), a draining server
(503). Only a real bug or a model failure answers 500.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["ApiError", "error_body", "error_content", "error_response", "install_error_handlers"]

logger = logging.getLogger("rmserve.service.errors")

# Short machine-readable type per status, for errors raised by the framework itself.
_STATUS_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "queue_full",
    503: "unavailable",
}


class ApiError(Exception):
    """An error with its HTTP status, type, message and extra headers (Retry-After)."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ):
        self.status = status
        self.type = type_
        self.message = message
        self.headers = dict(headers or {})
        self.details = dict(details or {})
        super().__init__(message)


def error_content(
    type_: str, message: str, details: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The error shape: ``{"error": {"type", "message", **details}}``."""
    return {"error": {"type": type_, "message": message, **(details or {})}}


def error_body(type_: str, message: str, details: Mapping[str, Any] | None = None) -> bytes:
    """:func:`error_content` as JSON bytes (for the raw ASGI middlewares)."""
    import json

    return json.dumps(error_content(type_, message, details)).encode()


def error_response(
    status: int,
    type_: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    details: Mapping[str, Any] | None = None,
) -> JSONResponse:
    content = error_content(type_, message, details)
    return JSONResponse(content, status_code=status, headers=dict(headers or {}))


def _describe_validation(errors: Sequence[Any]) -> tuple[int, str, str]:
    """Status, type and message for FastAPI's validation errors."""
    for error in errors:
        if error.get("type") == "json_invalid":
            ctx = error.get("ctx") or {}
            return 400, "invalid_json", f"the body is not valid JSON: {ctx.get('error', error)}"
    parts = []
    for error in list(errors)[:5]:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {error.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "invalid_request", "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.type, exc.message, exc.headers, exc.details)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        status, type_, message = _describe_validation(exc.errors())
        return error_response(status, type_, message)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the routes"
        type_ = _STATUS_TYPES.get(exc.status_code, "error")
        return error_response(exc.status_code, type_, message, exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error", exc_info=exc)
        return error_response(500, "internal_error", "internal error; see the server log")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
