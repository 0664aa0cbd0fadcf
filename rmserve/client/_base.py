"""Everything :class:`RewardClient` and :class:`AsyncRewardClient` share but I/O.

httpx's own layout: :class:`BaseRewardClient` holds the configuration and every decision that
does not wait on the network (request bodies, chunking, the retry decision and its delay,
reading answers); the two clients hold only their I/O loops (send, sleep, fan out chunks on
threads or tasks) and their public methods, which are one call each into the base. A change
to what the client sends or how it retries is made here, once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from rmserve import __version__
from rmserve.client._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    RewardServerError,
    error_for_response,
)
from rmserve.client._payloads import (
    JSON,
    ScoreChunk,
    check_sequence,
    chunked,
    parse_score_chunk,
    rank_body,
    score_body,
    shift_item_index,
)
from rmserve.client._retry import RetryPolicy, is_retryable_status
from rmserve.client._types import Prompt, ScoreOptions

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_MAX_ITEMS_PER_REQUEST",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "READY_TIMEOUT",
    "BaseRewardClient",
    "ClientConfig",
    "ScoreCall",
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


@dataclass(frozen=True)
class ScoreCall:
    """One ``/v1/score`` request of a call: its body, where its items start in the call, and
    how many it carries."""

    body: JSON
    offset: int
    size: int

    def parse(self, response: httpx.Response) -> ScoreChunk:
        return parse_score_chunk(response, self.size)

    def locate(self, error: APIStatusError) -> None:
        """Count ``error``'s item index in the whole call, not in this chunk."""
        shift_item_index(error, self.offset)


class BaseRewardClient:
    """The configuration and the decisions of a client (see the module docstring)."""

    _config: ClientConfig

    @property
    def base_url(self) -> str:
        return self._config.base_url

    @property
    def max_items_per_request(self) -> int:
        return self._config.max_items_per_request

    @property
    def max_concurrency(self) -> int:
        return self._config.max_concurrency

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- requests -------------------------------------------------------------------------

    def _score_calls(self, items: Sequence[JSON], options: ScoreOptions) -> list[ScoreCall]:
        """The ``/v1/score`` requests of a call: chunks of at most max_items_per_request."""
        size = self.max_items_per_request
        return [
            ScoreCall(score_body(chunk, options), i * size, len(chunk))
            for i, chunk in enumerate(chunked(items, size))
        ]

    def _rank_request(
        self, prompt: Prompt, responses: Sequence[str], top_k: int | None, options: ScoreOptions
    ) -> JSON | None:
        """The ``/v1/rank`` body, or None when the responses need more than one request
        (they are then scored in chunks and ranked here, the server's way)."""
        body = rank_body(prompt, responses, top_k, options)
        return body if len(responses) <= self.max_items_per_request else None

    @staticmethod
    def _items(items: Sequence[Any]) -> list[JSON]:
        """Items given in ``/v1/score``'s item form, checked to be objects."""
        checked = check_sequence(items, "items")
        for i, item in enumerate(checked):
            if not isinstance(item, Mapping):
                raise TypeError(
                    f"items[{i}] must be an object such as {{'prompt': ..., 'response': ...}}, "
                    f"{{'messages': [...]}} or {{'text': ...}}, got {type(item).__name__}"
                )
        return [dict(item) for item in checked]

    # -- retries --------------------------------------------------------------------------

    def _outcome(
        self,
        method: str,
        path: str,
        attempt: httpx.Response | httpx.TransportError,
        retries_done: int,
    ) -> httpx.Response | float:
        """What to do after one attempt: the 2xx response to return, or the seconds to wait
        before the next attempt; raises the error to give the caller when there is none."""
        url = self._config.url(path)
        cause: BaseException | None
        retry_after: float | None = None
        if isinstance(attempt, httpx.TimeoutException):
            error: RewardServerError = APITimeoutError(
                f"{method} {url} timed out ({type(attempt).__name__}: {attempt})"
            )
            cause = attempt
        elif isinstance(attempt, httpx.TransportError):
            error = APIConnectionError(
                f"{method} {url} failed: {type(attempt).__name__}: {attempt}; is the server "
                "running?"
            )
            cause = attempt
        elif attempt.is_success:
            return attempt
        else:
            error = error_for_response(attempt)
            if not is_retryable_status(attempt.status_code):
                raise error
            cause, retry_after = None, error.retry_after
        policy = self._config.retry_policy
        if retries_done >= policy.max_retries:
            raise error from cause
        delay = policy.delay(retries_done, retry_after)
        logger.info("retrying %s %s in %.2f s after: %s", method, path, delay, error)
        return delay

    def _ready_answer(self, attempt: httpx.Response | httpx.TransportError) -> bool:
        """``/readyz``'s answer read: True on 200, False on 503 or nothing listening; a 401 or
        404 raises, because those mean the client is misconfigured, not the server busy."""
        if isinstance(attempt, httpx.TransportError):
            return False
        if attempt.status_code == 200:
            return True
        if attempt.status_code == 503:
            return False
        raise error_for_response(attempt)

    def _not_ready(self, max_wait: float) -> APITimeoutError:
        return APITimeoutError(
            f"{self.base_url} was not ready after {max_wait:g} s; check the server log"
        )
