"""API keys: ``Authorization: Bearer KEY`` against ``RMSERVE_API_KEYS``.

Keys are compared with :func:`hmac.compare_digest` against every configured key (no early
exit), so timing does not reveal how much of a key was right. Keys are never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from rmserve.service.errors import ApiError

__all__ = ["key_is_valid", "make_key_dependency"]

# auto_error=False: a missing header is our 401 in our error shape, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="An API key from RMSERVE_API_KEYS.")


def key_is_valid(candidate: str, keys: Sequence[bytes]) -> bool:
    given = candidate.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def make_key_dependency(keys: Sequence[str]) -> Callable[[Credentials], Awaitable[None]]:
    """A FastAPI dependency that refuses requests without a valid key (no-op if no keys)."""
    encoded = [key.encode() for key in keys]

    async def require_api_key(credentials: Credentials) -> None:
        if not encoded:
            return
        if credentials is None or not key_is_valid(credentials.credentials, encoded):
            raise ApiError(
                401,
                "unauthorized",
                "a valid API key is required: send `Authorization: Bearer KEY` with a key "
                "from RMSERVE_API_KEYS",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_api_key
