"""Waiting for a condition instead of sleeping for a while.

Tests on a shared, loaded machine must not assume that something else got scheduled within a
fixed time. They wait for the condition itself; the timeout only turns a hang into a failure
(``HANG_GUARD_S``, far beyond anything a working run needs) and is never a timing check.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["HANG_GUARD_S", "guarded", "wait_until", "wait_until_blocking"]

# A guard against a hang only (a failing test instead of a stuck run), never a timing check.
# RMSERVE_TEST_HANG_GUARD_S shortens it where hangs are expected: scripts/mutation.sh sets 10 s,
# so that a mutant that stops the batcher answering fails its test in seconds instead of
# running into mutmut's timeout.
HANG_GUARD_S = float(os.environ.get("RMSERVE_TEST_HANG_GUARD_S", "60"))


async def wait_until(
    condition: Callable[[], bool], what: str, timeout_s: float = HANG_GUARD_S
) -> None:
    """Poll ``condition`` on the running event loop (other tasks run in between) until it is
    true; AssertionError naming ``what`` if it is still false after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not reached in {timeout_s:.0f} s: {what}"
        await asyncio.sleep(0.005)


def wait_until_blocking(
    condition: Callable[[], bool], what: str, timeout_s: float = HANG_GUARD_S
) -> None:
    """``wait_until`` for blocking code (threads, processes): polls with ``time.sleep``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not reached in {timeout_s:.0f} s: {what}"
        time.sleep(0.01)


async def guarded(awaitable: Awaitable[T]) -> T:
    """``await awaitable``, failing with TimeoutError instead of hanging after the guard."""
    return await asyncio.wait_for(awaitable, HANG_GUARD_S)
