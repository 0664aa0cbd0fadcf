"""A closed-loop HTTP load generator: ``concurrency`` workers, each sending its next request as
soon as the previous one is answered, over one fixed list of requests.

One continuous run: ``warmup_s`` of load that is not counted, then a measured window of
``duration_s``. The workers never stop between the two, so the window sees a server in steady
state (queue full, batches formed) rather than one filling from empty. Requests answered inside
the window count (throughput, latency percentiles, errors); requests still in flight when the
window closes are abandoned, so a run lasts exactly warmup + duration even when the server is
slow. Hooks run at the window's edges (the harness reads /metrics and the server's CPU time).

Why this and not ``hey``/``wrk``: the shapes need a different JSON body per request (real
prompts of real lengths), which ``hey`` cannot send and ``wrk`` needs Lua for. The client runs
in the harness process, apart from the server, on the same cores, so it must be light: each
worker holds one keep-alive HTTP/1.1 connection and writes request bytes built once up front
(``client="raw"``, the default; a minimal HTTP/1.1 exchange over asyncio streams). ``httpx``
(``client="httpx"``) is kept to cross-check; it costs several times more CPU per request. The
client's CPU time over the window is measured and reported (``client_cpu_s``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
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


class _RawConnection:
    """One keep-alive HTTP/1.1 connection: POST prepared bytes, read a Content-Length answer."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = -1
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length < 0:
                raise ConnectionError("answer without Content-Length (chunked?)")
            body = await self.reader.readexactly(length)
            if b"connection: close" in head.lower():
                self.close()
            return status, body
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Window:
    def __init__(self, start: float, end: float):
        self.start = start
        self.end = end

    def holds(self, t: float) -> bool:
        return self.start <= t <= self.end


Exchange = Callable[[int], Awaitable[tuple[int, bytes]]]  # body index -> (status, body)


async def _worker(
    exchange: Exchange,
    indices: itertools.cycle[int],
    counts: Sequence[int],
    window: _Window,
    result: LoadResult,
) -> None:
    while time.perf_counter() < window.end:
        index = next(indices)
        n_items = counts[index]
        sent = time.perf_counter()
        try:
            status, content = await exchange(index)
            ok = status == 200
            if ok:
                ok = _count_scores(content) == n_items
                problem = "wrong number of scores"
            else:
                problem = f"HTTP {status}: {content[:200].decode(errors='replace')}"
        except (OSError, asyncio.IncompleteReadError, httpx.HTTPError, ValueError) as e:
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
    client: str,
) -> LoadResult:
    result = LoadResult()
    parsed = httpx.URL(url)
    host, port, path = parsed.host, parsed.port or 80, parsed.raw_path.decode()
    counts = [n for _, n in bodies]
    indices = itertools.cycle(range(len(bodies)))
    now = time.perf_counter()
    window = _Window(now + warmup_s, now + warmup_s + duration_s)
    # A generous timeout for httpx: at high concurrency a request can wait seconds in the
    # queue, and a client-side timeout would turn a slow answer into a fake error.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0)) as http:
        exchanges: list[Exchange] = []
        if client == "raw":
            requests = [_request_bytes(host, port, path, body) for body, _ in bodies]
            connections = [_RawConnection(host, port) for _ in range(concurrency)]
            for connection in connections:

                async def exchange(index: int, c: _RawConnection = connection) -> tuple[int, bytes]:
                    return await c.post(requests[index])

                exchanges.append(exchange)
        else:
            headers = {"content-type": "application/json"}

            async def via_httpx(index: int) -> tuple[int, bytes]:
                response = await http.post(url, content=bodies[index][0], headers=headers)
                return response.status_code, response.content

            exchanges = [via_httpx] * concurrency
        workers = [
            asyncio.create_task(_worker(exchange, indices, counts, window, result))
            for exchange in exchanges
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
        if client == "raw":
            for connection in connections:
                connection.close()
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
    client: str = "raw",
) -> LoadResult:
    """Drive ``url`` with ``concurrency`` closed-loop workers: ``warmup_s`` uncounted, then
    ``duration_s`` measured. ``bodies`` are (JSON body, number of items) pairs, taken in order
    and cycled. ``on_start``/``on_end`` run (in a thread) when the measured window opens and
    closes."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    if client not in ("raw", "httpx"):
        raise ValueError(f"client must be raw or httpx, got {client!r}")
    if not bodies:
        raise ValueError("no requests to send; the workload is empty")
    main = _run(url, bodies, concurrency, warmup_s, duration_s, on_start, on_end, client)
    try:  # uvloop (uvicorn's loop too) spends less CPU per request than asyncio's own loop
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
