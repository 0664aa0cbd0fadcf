"""A closed-loop HTTP load generator: ``concurrency`` workers, each sending its next request as
soon as the previous one is answered, over one fixed list of requests.

One continuous run: ``warmup_s`` of load that is not counted, then a measured window of
``duration_s``. The workers never stop between the two, so the window sees a server in steady
state (queue full, batches formed) rather than one filling from empty. Requests answered inside
the window count (throughput, latency percentiles, errors); requests still in flight when the
window closes are abandoned, so a run lasts exactly warmup + duration even when the server is
slow. Hooks run at the window's edges (the harness reads /metrics and the server's CPU time).

Why this and not ``hey``/``wrk``: the shapes need a different JSON body per request (real
prompts of real lengths), which ``hey`` cannot send and ``wrk`` needs Lua for; and the rates
here are tens to hundreds of requests per second against a model that takes tens of
milliseconds per pair, so a Python client costs little. It runs in the harness process, apart
from the server, with bodies serialised up front; its CPU time is measured (``client_cpu_s``),
so its share of the cores is reported, not guessed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

__all__ = ["LoadResult", "percentile", "run_load"]

Hook = Callable[[], None]


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)  # successful requests in the window
    pairs: int = 0  # items scored by successful requests answered in the window
    requests: int = 0  # successful requests answered in the window
    errors: int = 0  # in the window: non-200 answers, wrong score counts, connection errors
    warmup_errors: int = 0  # the same during warm-up
    error_samples: list[str] = field(default_factory=list)  # the first few, for the report
    elapsed_s: float = 0.0  # the measured window
    client_cpu_s: float = 0.0  # CPU time of this (client) process during the window

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.elapsed_s if self.elapsed_s > 0 else 0.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _count_scores(content: bytes) -> int:
    data = json.loads(content)
    scores = data.get("scores", data.get("rewards"))
    return len(scores) if isinstance(scores, list) else -1


class _Window:
    def __init__(self, start: float, end: float):
        self.start = start
        self.end = end

    def holds(self, t: float) -> bool:
        return self.start <= t <= self.end


async def _worker(
    client: httpx.AsyncClient,
    url: str,
    bodies: itertools.cycle[tuple[bytes, int]],
    window: _Window,
    result: LoadResult,
) -> None:
    headers = {"content-type": "application/json"}
    while time.perf_counter() < window.end:
        body, n_items = next(bodies)
        sent = time.perf_counter()
        try:
            response = await client.post(url, content=body, headers=headers)
            ok = response.status_code == 200
            if ok:
                ok = _count_scores(response.content) == n_items
                problem = "wrong number of scores"
            else:
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as e:
            ok, problem = False, f"{type(e).__name__}: {e}"
        done = time.perf_counter()
        if not window.holds(done):
            if not ok and done < window.start:
                result.warmup_errors += 1
            continue
        if ok:
            result.latencies_ms.append((done - sent) * 1000.0)
            result.pairs += n_items
            result.requests += 1
        else:
            result.errors += 1
            if len(result.error_samples) < 5:
                result.error_samples.append(problem)


async def _run(
    url: str,
    bodies: Sequence[tuple[bytes, int]],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    on_start: Hook | None,
    on_end: Hook | None,
) -> LoadResult:
    result = LoadResult()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # A generous timeout: at high concurrency a request can wait seconds in the queue, and a
    # client-side timeout would turn a slow answer into a fake error.
    timeout = httpx.Timeout(300.0)
    cycle = itertools.cycle(bodies)
    now = time.perf_counter()
    window = _Window(now + warmup_s, now + warmup_s + duration_s)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        workers = [
            asyncio.create_task(_worker(client, url, cycle, window, result))
            for _ in range(concurrency)
        ]
        # The window is fixed in time; the hooks may take a moment (a busy server answers
        # /metrics late) but never move it.
        await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
        cpu0 = time.process_time()
        if on_start is not None:
            await asyncio.to_thread(on_start)
        await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
        result.client_cpu_s = time.process_time() - cpu0
        result.elapsed_s = duration_s
        if on_end is not None:
            await asyncio.to_thread(on_end)
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return result


def run_load(
    url: str,
    bodies: Sequence[tuple[bytes, int]],
    concurrency: int,
    duration_s: float,
    *,
    warmup_s: float = 0.0,
    on_start: Hook | None = None,
    on_end: Hook | None = None,
) -> LoadResult:
    """Drive ``url`` with ``concurrency`` closed-loop workers: ``warmup_s`` uncounted, then
    ``duration_s`` measured. ``bodies`` are (JSON body, number of items) pairs, taken in order
    and cycled. ``on_start``/``on_end`` run (in a thread) when the measured window opens and
    closes."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    if not bodies:
        raise ValueError("no requests to send; the workload is empty")
    return asyncio.run(_run(url, bodies, concurrency, warmup_s, duration_s, on_start, on_end))
