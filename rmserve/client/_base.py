"""Configuration shared by :class:`RewardClient` and :class:`AsyncRewardClient`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import httpx

from rmserve import __version__
from rmserve.client._retry import RetryPolicy

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_MAX_ITEMS_PER_REQUEST",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "READY_TIMEOUT",
    "ClientConfig",
]

logger = logging.getLogger("rmserve.client")

API_KEY_ENV = "RMSERVE_API_KEY"
BASE_URL_ENV = "RMSERVE_BASE_URL"
# Reads are long on purpose: a request waits in the server's queue behind a whole RL step's
# worth of items before its batch runs. Connecting should be quick or fail fast.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)
DEFAULT_MAX_RETRIES = 2
# Items per request. Big enough that the per-request overhead (JSON, HTTP, auth) is small
# next to the work, small enough that one request is far below the server's size limit and
# that several chunks are in flight together so the server's batcher can pack them.
DEFAULT_MAX_ITEMS_PER_REQUEST = 64
DEFAULT_MAX_CONCURRENCY = 8
# /readyz answers at once; a probe should not hang for the long scoring read timeout.
READY_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


class ClientConfig:
    """Validated settings; the clients hold one and differ only in how they do I/O."""

    def __init__(
        self,
        base_url: str | None,
        *,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        max_items_per_request: int,
        max_concurrency: int,
        headers: Mapping[str, str] | None,
    ) -> None:
        if base_url is None:
            base_url = os.environ.get(BASE_URL_ENV)
        if not base_url:
            raise ValueError(
                f"no server address: pass base_url='http://host:port' or set {BASE_URL_ENV}"
            )
        if "://" not in base_url:
            raise ValueError(f"base_url {base_url!r} has no scheme; use 'http://{base_url}'")
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must look like 'http://host:port', got {base_url!r}")
        self.base_url = str(url).rstrip("/")
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV) or None
        self.api_key = api_key
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if not isinstance(max_items_per_request, int) or max_items_per_request < 1:
            raise ValueError(
                f"max_items_per_request must be an int >= 1, got {max_items_per_request!r}"
            )
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
        self.retry_policy = RetryPolicy(max_retries=max_retries)
        self.max_items_per_request = max_items_per_request
        self.max_concurrency = max_concurrency
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.headers = {
            "Accept": "application/json",
            "User-Agent": f"rmserve-client/{__version__} httpx/{httpx.__version__}",
        }
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        if headers:
            self.headers.update(headers)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def limits(self) -> httpx.Limits:
        # Keep enough idle connections for a full fan-out so chunks reuse warm connections.
        keepalive = max(20, self.max_concurrency)
        return httpx.Limits(
            max_connections=max(100, keepalive), max_keepalive_connections=keepalive
        )

    def __repr__(self) -> str:  # never print the key
        key = "***" if self.api_key else None
        return f"ClientConfig(base_url={self.base_url!r}, api_key={key})"
