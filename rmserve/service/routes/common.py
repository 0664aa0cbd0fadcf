"""Pieces the route modules share: documented error answers."""

from __future__ import annotations

from typing import Any

from rmserve.service.schemas import ErrorResponse

__all__ = ["SCORING_ERRORS"]

SCORING_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
    413: {"model": ErrorResponse, "description": "Too many items or too many bytes."},
    415: {"model": ErrorResponse, "description": "The body is not application/json."},
    422: {"model": ErrorResponse, "description": "Invalid request, item or response too long."},
    429: {"model": ErrorResponse, "description": "The queue is full; see Retry-After."},
    503: {"model": ErrorResponse, "description": "Loading or shutting down."},
}
