"""Chunk fan-out over real sockets: bounded concurrency, input order, readiness polling."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tests.client.client_servers import Recorded, Reply, ScriptedServer, score_reply
from tests.client.conftest import ClientFactory

Factory = Callable[..., ScriptedServer]


class InFlight:
    """Counts requests being answered at once; each answer is held back a little so that
    concurrent chunks overlap on the server."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, request: Recorded) -> Reply:
        with self.lock:
            self.current += 1
            self.peak = max(self.peak, self.current)
        time.sleep(0.15)
        with self.lock:
            self.current -= 1
        return score_reply(request)


def test_chunks_run_concurrently_bounded_and_come_back_in_order(
    make_client: ClientFactory, scripted: Factory
) -> None:
    counter = InFlight()
    server = scripted(default=counter)
    responses = ["x" * (i % 11) for i in range(20)]
    client, _ = make_client(server.url, max_items_per_request=2, max_concurrency=3)
    with client:
        result = client.score(["p"] * 20, responses)
    assert result.scores == tuple(float(len(r)) for r in responses)
    assert result.usage.tokens == 3 * 20
    assert len(server.requests) == 10
    assert all(len(request.body["items"]) <= 2 for request in server.requests)
    assert 2 <= counter.peak <= 3


def test_wait_until_ready_polls_until_200(make_client: ClientFactory, scripted: Factory) -> None:
    loading = Reply(503, {"status": "loading"}, {"Retry-After": "1"})
    server = scripted([loading, loading], default=lambda r: Reply(200, {"status": "ready"}))
    client, waits = make_client(server.url)
    with client:
        assert client.ready() is False
        client.wait_until_ready(max_wait=30, interval=0.01)
        assert client.ready() is True
    assert [r.path for r in server.requests] == ["/readyz"] * 4
    assert waits == [0.01]  # one poll waited, through the client's sleep hook
