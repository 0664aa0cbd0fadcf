"""Overload, soak and disconnects against ``rmserve serve`` as a real process.

Each test first measures the server's capacity on this machine (a closed loop of concurrent
requests), then drives it with an open-loop load (requests sent on a schedule whatever the
answers) while sampling the queue (``rmserve_queue_items`` from /metrics) and the process's
resident memory (psutil). Request bodies are encoded once up front, so the load generator
spends its CPU on sending, and the server (heavier per request: 48 items of ~100 tokens)
saturates before the client does.

Durations are environment-configurable: RMSERVE_OVERLOAD_S (default 20), RMSERVE_SOAK_S
(default 120). The figures are printed and recorded in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.reliability.conftest import ServerProcess
from tests.waiting import HANG_GUARD_S, wait_until

OVERLOAD_S = float(os.environ.get("RMSERVE_OVERLOAD_S", "20"))
SOAK_S = float(os.environ.get("RMSERVE_SOAK_S", "120"))
ITEMS_PER_REQUEST = 48
MAX_QUEUE_ITEMS = 480
MIB = 1024 * 1024
# The overload bound: RSS under 3x load stays within the idle RSS plus this much.
OVERLOAD_RSS_HEADROOM = 256 * MIB
SERVER_FLAGS = (
    "--max-batch-size",
    "64",
    "--max-queue-items",
    str(MAX_QUEUE_ITEMS),
    "--max-items-per-request",
    "64",
    "--max-wait-ms",
    "5",
    # Twice the requests the queue holds: beyond it, refused before the body is parsed.
    "--max-concurrent-requests",
    str(2 * MAX_QUEUE_ITEMS // ITEMS_PER_REQUEST),
    "--intra-op-threads",
    "1",
    "--tokenizer-threads",
    "1",
    "--log-level",
    "warning",
)
JSON_TYPE = {"content-type": "application/json"}
# Requests kept in flight by the closed loop: the queue's bound in requests, so all are admitted.
CLOSED_CONCURRENCY = MAX_QUEUE_ITEMS // ITEMS_PER_REQUEST


def _bodies(n: int) -> list[bytes]:
    """n distinct request bodies of ITEMS_PER_REQUEST items (~100 tokens each), as bytes."""
    words = [
        "the",
        "reward",
        "model",
        "reads",
        "every",
        "word",
        "of",
        "this",
        "response",
        "before",
        "it",
        "decides",
    ]
    bodies = []
    for i in range(n):
        items = [
            {
                "prompt": f"Question {i}.{j}: how should I answer a curious user?",
                "response": " ".join(words[(i + j + k) % len(words)] for k in range(80)),
            }
            for j in range(ITEMS_PER_REQUEST)
        ]
        bodies.append(json.dumps({"items": items}).encode())
    return bodies


BODIES = _bodies(64)


@dataclass
class LoadResult:
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    missing_retry_after: int = 0
    bad_error_bodies: int = 0
    queue_samples: list[float] = field(default_factory=list)
    rss_samples: list[int] = field(default_factory=list)
    seconds: float = 0.0  # sending
    drain_s: float = 0.0  # from the last request sent to the last answer
    recovery_s: float = float("inf")  # from the last request sent to a new request's 200

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)


class RawPool:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, for the load generator.

    httpx spends about a millisecond of CPU per request, as much as the server's work for a
    small request: on 2 shared cores it could not offer 3x the server's capacity. This pool
    writes pre-encoded requests and parses only the status line, headers and body it needs.
    Idle connections are dropped after 2 s, before the server's 5 s keep-alive timeout, so
    the generator never races the server closing a connection it is about to reuse.
    """

    IDLE_S = 2.0

    def __init__(self, url: str):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self._idle: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        now = time.monotonic()
        while self._idle:
            used, reader, writer = self._idle.pop()
            if now - used < self.IDLE_S:
                break
            writer.close()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            writer.write(head + body)
            raw_head = await reader.readuntil(b"\r\n\r\n")
            lines = raw_head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            payload = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append((time.monotonic(), reader, writer))
        return status, headers, payload

    def close(self) -> None:
        for _, _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _post(pool: RawPool, body: bytes, result: LoadResult) -> None:
    try:
        status, headers, payload = await pool.post("/v1/score", body)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        result.statuses[type(e).__name__] += 1
        return
    result.statuses[str(status)] += 1
    if status in (429, 503) and "retry-after" not in headers:
        result.missing_retry_after += 1
    if status != 200:
        try:
            error = json.loads(payload)["error"]
            assert error["type"]
            assert error["message"]
        except (ValueError, KeyError, TypeError, AssertionError):
            result.bad_error_bodies += 1


async def _sample(
    server: ServerProcess, result: LoadResult, stop: asyncio.Event, every_s: float
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        while not stop.is_set():
            try:
                text = (await client.get(server.url + "/metrics")).text
                for line in text.splitlines():
                    if line.startswith("rmserve_queue_items "):
                        result.queue_samples.append(float(line.split()[-1]))
            except httpx.TransportError:
                pass
            result.rss_samples.append(server.rss())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every_s)


async def closed_loop(server: ServerProcess, seconds: float, concurrency: int = 8) -> float:
    """Successful requests per second with ``concurrency`` requests always in flight."""
    result = LoadResult()
    deadline = time.monotonic() + seconds
    pool = RawPool(server.url)

    async def worker(k: int) -> None:
        i = k
        while time.monotonic() < deadline:
            await _post(pool, BODIES[i % len(BODIES)], result)
            i += concurrency

    started = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    pool.close()
    return result.ok / (time.monotonic() - started)


async def open_loop(
    server: ServerProcess, rate: float, seconds: float, sample_every_s: float = 0.2
) -> LoadResult:
    """Send ``rate`` requests per second for ``seconds``, whatever the answers."""
    result = LoadResult()
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample(server, result, stop, sample_every_s))
    tasks: list[asyncio.Task[None]] = []
    pool = RawPool(server.url)
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate) + 1
        while result.sent < due:
            body = BODIES[result.sent % len(BODIES)]
            tasks.append(asyncio.create_task(_post(pool, body, result)))
            result.sent += 1
        await asyncio.sleep(0.002)
    result.seconds = time.monotonic() - started
    stopped = time.monotonic()
    # The load has stopped; its requests may still be in flight. A new client's first
    # request (retried after Retry-After, like RewardClient) measures the recovery.
    probe = asyncio.create_task(_first_success(server, deadline_s=HANG_GUARD_S))
    await asyncio.gather(*tasks)
    result.drain_s = time.monotonic() - stopped
    result.recovery_s = await probe - stopped
    pool.close()
    stop.set()
    await sampler
    return result


async def _first_success(server: ServerProcess, deadline_s: float) -> float:
    """The time (monotonic) at which a request first gets a 200; inf if not in deadline_s."""
    pool = RawPool(server.url)
    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline:
            try:
                status, headers, _ = await pool.post("/v1/score", BODIES[0])
            except (OSError, asyncio.IncompleteReadError):
                status, headers = 0, {}
            if status == 200:
                return time.monotonic()
            await asyncio.sleep(min(float(headers.get("retry-after", "0.1")), 1.0))
        return float("inf")
    finally:
        pool.close()


async def saturated_rate(server: ServerProcess, seconds: float = 3.0) -> float:
    """The server's capacity: requests per second it serves (200) while offered far more.

    A closed loop underestimates it (the client waits a round trip between requests, and
    shares the cores); so does this, when the offered load drowns the server in requests to
    parse and refuse (the tiny model makes refusing nearly as costly as scoring).
    """
    result = await open_loop(server, 400.0, seconds, sample_every_s=1.0)
    return result.ok / result.seconds


def _start(spawn: Callable[..., ServerProcess], bundle: Path) -> ServerProcess:
    server = spawn(bundle, *SERVER_FLAGS)
    server.wait_ready()
    return server


@pytest.mark.slow
@pytest.mark.anyio
async def test_overload_at_3x_capacity_sheds_load_and_recovers(
    tiny_encoder_bundle: Path, spawn: Callable[..., ServerProcess]
) -> None:
    # The server is another process: the blocking calls here (start-up, /metrics, RSS) hold
    # up only the load generator, between its phases.
    server = _start(spawn, tiny_encoder_bundle)
    await closed_loop(server, 2.0)  # warm-up: allocator pools, connections
    # Both estimates fall short of the true capacity on shared cores (see saturated_rate);
    # the larger is the base of "3x". The 429s asserted below show the load was an overload.
    closed_before = await closed_loop(server, 3.0, concurrency=CLOSED_CONCURRENCY)
    capacity = max(closed_before, await saturated_rate(server))
    idle_rss = server.rss()
    rate = 3.0 * capacity
    result = await open_loop(server, rate, OVERLOAD_S)
    after = await closed_loop(server, 3.0, concurrency=CLOSED_CONCURRENCY)
    queue_after = server.metric("rmserve_queue_items")
    peak_rss = max(result.rss_samples)
    print(
        f"\noverload: capacity {capacity:.1f} req/s ({capacity * ITEMS_PER_REQUEST:.0f} items/s); "
        f"offered {result.sent / result.seconds:.1f} req/s for {result.seconds:.1f} s; "
        f"answers {dict(result.statuses)}; served {result.ok / result.seconds:.1f} req/s; "
        f"last answer {result.drain_s:.1f} s after the load stopped; "
        f"queue max {max(result.queue_samples):.0f} of {MAX_QUEUE_ITEMS} "
        f"({len(result.queue_samples)} samples); RSS idle {idle_rss / MIB:.1f} MiB, "
        f"peak {peak_rss / MIB:.1f} MiB (bound {(idle_rss + OVERLOAD_RSS_HEADROOM) / MIB:.0f}); "
        f"first 200 for a new request {result.recovery_s:.2f} s after the load stopped; "
        f"closed-loop throughput before {closed_before:.1f} req/s, after {after:.1f} req/s"
    )
    assert set(result.statuses) <= {"200", "429", "503"}, result.statuses
    assert result.statuses.get("429", 0) > 0, "the load never filled the queue: not an overload"
    assert result.ok > 0
    assert result.missing_retry_after == 0
    assert result.bad_error_bodies == 0
    assert max(result.queue_samples) <= MAX_QUEUE_ITEMS
    assert peak_rss <= idle_rss + OVERLOAD_RSS_HEADROOM
    # It recovers: a new request gets a 200 once the load stops (how soon is printed above,
    # measured well under a second; a speed is not a pass/fail matter on shared cores), the
    # queue empties, and closed-loop requests are served again.
    assert math.isfinite(result.recovery_s), "no 200 for a new request after the load stopped"
    assert queue_after == 0
    assert after > 0
    assert server.stop() == 0


@pytest.mark.slow
@pytest.mark.anyio
async def test_soak_at_steady_load_has_no_errors_and_flat_memory(
    tiny_encoder_bundle: Path, spawn: Callable[..., ServerProcess]
) -> None:
    server = _start(spawn, tiny_encoder_bundle)
    await closed_loop(server, 2.0)
    capacity = await saturated_rate(server)
    # Well below capacity: the cores are shared, and a soak must see no 429.
    rate = 0.3 * capacity
    result = await open_loop(server, rate, SOAK_S, sample_every_s=1.0)
    rss = result.rss_samples
    # Warm-up: the first 20% of the run (allocator pools, ORT arenas, connection buffers).
    warm = len(rss) // 5
    window = max(3, len(rss) // 10)
    after_warmup = statistics.median(rss[warm : warm + window])
    at_end = statistics.median(rss[-window:])
    growth = (at_end - after_warmup) / after_warmup
    print(
        f"\nsoak: {result.seconds:.0f} s at {result.sent / result.seconds:.1f} req/s "
        f"({rate / capacity:.0%} of capacity {capacity:.1f} req/s); answers "
        f"{dict(result.statuses)}; RSS after warm-up {after_warmup / MIB:.1f} MiB, at end "
        f"{at_end / MIB:.1f} MiB, growth {growth:+.2%}; queue max "
        f"{max(result.queue_samples):.0f}"
    )
    # No failure of any kind. A 429 (with Retry-After) is backpressure, not a failure: on
    # 2 cores shared with other jobs the server's capacity can dip below the steady rate for
    # a moment. How many there were is printed above (none, when measured), not asserted: it
    # depends on the machine's other load, not on the server.
    assert set(result.statuses) <= {"200", "429"}, result.statuses
    assert result.ok > 0
    assert result.missing_retry_after == 0
    assert result.bad_error_bodies == 0
    assert growth < 0.05
    assert server.stop() == 0


async def _hang_up(url: str, body: bytes, wait_s: float) -> None:
    """Send a whole request on a raw connection, then close it before the answer."""
    host, port = url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST /v1/score HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body)
    await writer.drain()
    await asyncio.sleep(wait_s)
    writer.transport.abort()  # RST, as a killed trainer process would


@pytest.mark.slow
@pytest.mark.anyio
async def test_many_clients_hanging_up_mid_request_leak_nothing(
    tiny_encoder_bundle: Path, spawn: Callable[..., ServerProcess]
) -> None:
    # A 300 ms batching wait: the abandoned requests are still queued when their clients go.
    flags = [*SERVER_FLAGS]
    flags[flags.index("--max-queue-items") + 1] = "4096"
    flags[flags.index("--max-wait-ms") + 1] = "300"
    flags[flags.index("--max-concurrent-requests") + 1] = "1024"
    server = spawn(tiny_encoder_bundle, *flags)
    server.wait_ready()
    small = [json.dumps({"items": json.loads(b)["items"][:4]}).encode() for b in BODIES]
    rss_after_round: list[int] = []
    requests_seen: list[float] = []

    def requests_counted() -> float:
        return server.metric("rmserve_requests_total", 'route="/v1/score"')

    for round_ in range(3):
        async with httpx.AsyncClient(timeout=60) as client:
            hang_ups = [_hang_up(server.url, small[i % len(small)], 0.05) for i in range(200)]
            others = [
                client.post(server.url + "/v1/score", content=small[i], headers=JSON_TYPE)
                for i in range(20)
            ]
            await asyncio.gather(*hang_ups)
            statuses = [r.status_code for r in await asyncio.gather(*others)]
        assert statuses == [200] * 20, statuses  # the clients that stayed got their answers
        # The server is another process; these blocking scrapes hold up only this test.
        await wait_until(
            lambda: server.metric("rmserve_queue_items") == 0,
            "the queue drained after the hang-ups",
        )
        # An abandoned request is counted when the app is done with it: wait for all of
        # this round's (asserted exactly below: none lost, none counted twice).
        expected = 220 * (round_ + 1)
        await wait_until(
            lambda: requests_counted() >= expected,  # noqa: B023 (called before the next round)
            f"{expected} requests counted",
        )
        requests_seen.append(requests_counted())
        rss_after_round.append(server.rss())
    assert server.process.poll() is None
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(server.url + "/readyz")).status_code == 200
    log = server.log()
    print(
        f"\ndisconnects: 3 rounds of 200 hang-ups + 20 normal requests; requests counted "
        f"{requests_seen}; RSS after each round {[round(r / MIB, 1) for r in rss_after_round]} MiB"
    )
    # Every abandoned request reached the app (so the test tested something).
    assert requests_seen[0] == 220
    assert requests_seen[2] == 3 * 220
    assert rss_after_round[2] <= rss_after_round[0] * 1.05
    assert "Traceback" not in log, log[-3000:]
    assert "Exception in ASGI application" not in log, log[-3000:]
    assert server.stop() == 0


@pytest.mark.anyio
async def test_beyond_max_concurrent_requests_a_post_is_refused_before_its_body_is_parsed(
    tiny_encoder_bundle: Path,
) -> None:
    from rmserve.service.loading import load_model
    from tests.reliability.conftest import serve_model, settings_for

    settings = settings_for(tiny_encoder_bundle, max_concurrent_requests=2)
    # The model holds the first two requests until the test lets go (warm-up runs freely).
    model = load_model(settings)
    real_run = model.runtime.run
    hold = threading.Event()
    release = threading.Event()

    def held_run(input_ids: Any, attention_mask: Any, instance: int = 0) -> Any:
        if hold.is_set() and not release.wait(HANG_GUARD_S):
            raise TimeoutError("the test never released the model")
        return real_run(input_ids, attention_mask, instance)

    model.runtime.run = held_run  # type: ignore[method-assign]
    one = {"items": [{"prompt": "Hi", "response": "Hello."}]}
    # The server runs on its own event loop in its own thread (serve_app).
    with serve_model(settings, model) as server, httpx.Client(timeout=30) as client:
        batcher = server.state.scorer.batcher
        hold.set()
        try:
            async with httpx.AsyncClient(timeout=HANG_GUARD_S) as held:
                first = [
                    asyncio.create_task(held.post(server.url + "/v1/score", json=one))
                    for _ in range(2)
                ]
                await wait_until(
                    lambda: batcher.unfinished_items == 2, "the two requests reached the batcher"
                )
                # Not JSON at all: a parsed body would be a 400; refused unparsed, a 429.
                refused = await asyncio.to_thread(
                    client.post, server.url + "/v1/score", content=b"{not json", headers=JSON_TYPE
                )
                release.set()
                statuses = [r.status_code for r in await asyncio.gather(*first)]
        finally:
            release.set()
        assert statuses == [200, 200]
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "overloaded"
        assert refused.headers["retry-after"] == "1"
        assert refused.headers.get("connection") != "close"
        # The same keep-alive connection serves the next request.
        again = await asyncio.to_thread(client.post, server.url + "/v1/score", json=one)
        assert again.status_code == 200, again.text
        assert server.metric("rmserve_requests_total", '{route="/v1/score",status="429"}') == 1
