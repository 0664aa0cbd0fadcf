"""The client's exception tree (drawn in ``rmserve.client``'s docstring).

Every error the client raises about the server derives from :class:`RewardServerError`, so a
trainer that wants to survive a flaky reward server catches that one class. Status errors
carry the HTTP status, the server's error ``type`` and its ``message`` (rmserve answers
``{"error": {"type": ..., "message": ...}}``), so a log line says what the server said.
Bad arguments to a client method are caller bugs and raise ``TypeError``/``ValueError``
before anything is sent.
"""

from __future__ import annotations

from typing import Any

import httpx

from rmserve.client._retry import parse_retry_after

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "InternalServerError",
    "NotFoundError",
    "OverloadedError",
    "RequestTooLargeError",
    "RewardServerError",
    "error_for_response",
]


class RewardServerError(Exception):
    """Base of every error about talking to an rmserve server."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class APIConnectionError(RewardServerError):
    """The server could not be reached (refused, reset, DNS, TLS), after all retries."""


class APITimeoutError(APIConnectionError):
    """The request timed out (connect, read or write), after all retries."""


class APIResponseValidationError(RewardServerError):
    """The server answered 2xx with a body that is not what the API promises."""

    def __init__(self, message: str, *, response: httpx.Response) -> None:
        super().__init__(message, request=response.request)
        self.response = response
        self.status_code = response.status_code


class APIStatusError(RewardServerError):
    """The server answered 4xx or 5xx; also the class used for codes without a subclass."""

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        error_type: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, request=response.request)
        self.response = response
        self.status_code = response.status_code
        self.error_type = error_type  # the server's error.type, e.g. "response_too_long"
        # Other fields of the server's error object, e.g. response_tokens and budget on 422.
        self.details: dict[str, Any] = details or {}
        # Seconds the server asked us to wait (429/503), parsed from Retry-After; None if absent.
        self.retry_after = parse_retry_after(response.headers)


class BadRequestError(APIStatusError):
    """400 or 422: the request is invalid (e.g. a response too long to fit; see ``message``)."""


class AuthenticationError(APIStatusError):
    """401 or 403: missing or wrong API key; pass ``api_key=`` or set ``RMSERVE_API_KEY``."""


class NotFoundError(APIStatusError):
    """404: no such route; ``base_url`` probably points at something that is not rmserve."""


class RequestTooLargeError(APIStatusError):
    """413: the request has too many items or bytes; lower ``max_items_per_request``."""


class OverloadedError(APIStatusError):
    """429 or 503: the server's queue is full or it is not ready; retried before raising."""


class InternalServerError(APIStatusError):
    """5xx other than 503: the server failed; retried before raising."""


def _status_class(status_code: int) -> type[APIStatusError]:
    if status_code in (400, 422):
        return BadRequestError
    if status_code in (401, 403):
        return AuthenticationError
    if status_code == 404:
        return NotFoundError
    if status_code == 413:
        return RequestTooLargeError
    if status_code in (429, 503):
        return OverloadedError
    if status_code >= 500:
        return InternalServerError
    return APIStatusError


def error_for_response(response: httpx.Response) -> APIStatusError:
    """Build the exception for a 4xx/5xx response, keeping the server's type and message."""
    error_type: str | None = None
    detail: str | None = None
    details: dict[str, Any] = {}
    try:
        body = response.json()
    except ValueError:  # not JSON: a proxy's HTML page, an empty body
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            raw_type = error.get("type")
            raw_message = error.get("message")
            error_type = raw_type if isinstance(raw_type, str) else None
            detail = raw_message if isinstance(raw_message, str) else None
            details = {k: v for k, v in error.items() if k not in ("type", "message")}
        elif isinstance(body.get("detail"), str):  # a bare FastAPI/Starlette error
            detail = body["detail"]
    if detail is None:
        text = response.text.strip()
        detail = text[:500] if text else response.reason_phrase or "no message"
    request = response.request
    prefix = f"{request.method} {request.url.path} -> {response.status_code}"
    type_part = f" {error_type}" if error_type else ""
    message = f"{prefix}{type_part}: {detail}"
    cls = _status_class(response.status_code)
    return cls(message, response=response, error_type=error_type, details=details)
