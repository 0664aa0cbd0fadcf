"""When to retry a request and how long to wait: openai-python's policy, adapted.

- Retry only what can succeed on a second try: connection errors, timeouts, 408, 429 and 5xx.
  Never another 4xx: a bad request stays bad, and a wrong key stays wrong. 409 is left out
  on purpose: rmserve never sends it, so one would come from a proxy reporting a real conflict.
- Honour ``Retry-After`` (seconds or an HTTP date; ``retry-after-ms`` too), capped so that a
  confused proxy cannot park a trainer for an hour, and padded with up to 25% positive jitter
  so that the hundreds of requests an RL step sends do not all come back in the same
  millisecond. Waiting longer than asked is always allowed; waiting less is not.
- Without ``Retry-After``, back off exponentially (0.5 s, 1 s, 2 s, ... up to 8 s) times a
  jitter factor in [0.75, 1].

Every scoring route is a pure function of its input, so repeating a POST is safe.
This module imports nothing from the rest of the client, so ``_errors`` can use it.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "RETRYABLE_STATUS_CODES",
    "RetryPolicy",
    "is_retryable_status",
    "parse_retry_after",
]

RETRYABLE_STATUS_CODES = frozenset({408, 429})


def is_retryable_status(status_code: int) -> bool:
    """408, 429 and every 5xx may succeed later; other statuses will not."""
    return status_code in RETRYABLE_STATUS_CODES or status_code >= 500


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After``; None when absent or garbled.

    ``Retry-After`` may be a number of seconds or an HTTP date (RFC 9110, section 10.2.3).
    A date in the past gives 0.
    """

    # httpx.Headers is case-insensitive; a plain dict (tests) is looked up as given and lower.
    def header(name: str) -> str | None:
        value = headers.get(name)
        if value is None:
            value = headers.get(name.lower())
        return value

    retry_after_ms = header("retry-after-ms")
    if retry_after_ms is not None:
        try:
            return max(0.0, float(retry_after_ms) / 1000.0)
        except ValueError:
            pass
    retry_after = header("Retry-After")
    if retry_after is None:
        return None
    retry_after = retry_after.strip()
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(retry_after)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryPolicy:
    """How many times to retry and how long to wait between attempts."""

    max_retries: int = 2  # retries after the first attempt (so 3 attempts in all)
    initial_delay: float = 0.5  # seconds before the first retry without Retry-After
    max_delay: float = 8.0  # ceiling of the exponential backoff, in seconds
    max_retry_after: float = 60.0  # ceiling on a server's Retry-After, in seconds

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.initial_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("retry delays must be >= 0")

    def delay(self, retries_done: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``retries_done + 1``."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after) * (1.0 + 0.25 * random.random())
        backoff = min(self.initial_delay * 2.0**retries_done, self.max_delay)
        return backoff * (1.0 - 0.25 * random.random())
