"""Fixtures of the client tests: scripted loopback servers and the real service."""

from __future__ import annotations

import functools
import inspect
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio.from_thread
import pytest

from rmserve.client import AsyncRewardClient, RewardClient
from tests.client.client_servers import API_KEY, Recorded, Reply, ScriptedServer, start_service


class BlockingAsyncClient:
    """An :class:`AsyncRewardClient` driven from blocking test code: its coroutine methods
    run on one event loop in a background thread (anyio's blocking portal), so its
    connection pool lives on one loop, as in real use, and a test body serves both clients."""

    def __init__(self, *args: Any, waits: list[float], **kwargs: Any) -> None:
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()

        async def make() -> AsyncRewardClient:
            client = AsyncRewardClient(*args, **kwargs)

            async def record(seconds: float) -> None:
                waits.append(seconds)

            client._sleep = record
            return client

        self._client = self._portal.call(make)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if inspect.iscoroutinefunction(attribute):
            return lambda *a, **k: self._portal.call(functools.partial(attribute, *a, **k))
        return attribute

    def close(self) -> None:
        self._portal.call(self._client.close)
        self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> BlockingAsyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


ClientFactory = Callable[..., tuple[Any, list[float]]]


@pytest.fixture(params=["sync", "async"])
def new_client(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Factory: ``new_client(url, **settings)``, a :class:`RewardClient` or a
    :class:`BlockingAsyncClient` (the test runs once with each)."""

    def make(*args: Any, **kwargs: Any) -> Any:
        if request.param == "async":
            return BlockingAsyncClient(*args, waits=[], **kwargs)
        return RewardClient(*args, **kwargs)

    return make


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest) -> ClientFactory:
    """Factory: ``make_client(url, **settings)`` gives ``(client, waits)``, a
    :class:`RewardClient` or a :class:`BlockingAsyncClient` (the test runs once with each),
    whose sleeps are recorded in ``waits`` instead of slept."""

    def make(*args: Any, **kwargs: Any) -> tuple[Any, list[float]]:
        waits: list[float] = []
        if request.param == "async":
            return BlockingAsyncClient(*args, waits=waits, **kwargs), waits
        client = RewardClient(*args, **kwargs)
        client._sleep = waits.append
        return client, waits

    return make


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    """Factory: ``scripted([Reply(...), ...], default=...)`` starts a server; all closed after."""
    servers: list[ScriptedServer] = []

    def make(
        script: list[Reply] | None = None, default: Callable[[Recorded], Reply] | None = None
    ) -> ScriptedServer:
        server = ScriptedServer(script, default)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def refused_url() -> str:
    """A loopback URL where nothing listens (the port was just freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def service_url(tiny_encoder_bundle: Path) -> Iterator[str]:
    """The real service over the tiny encoder bundle (max_length 128), without keys; it
    allows at most 40 items per request so that the 413 path can be reached."""
    service = start_service(tiny_encoder_bundle, max_items_per_request=40, warmup=False)
    yield service.url
    service.stop()


@pytest.fixture(scope="session")
def keyed_service_url(tiny_encoder_bundle: Path) -> Iterator[str]:
    """The real service with ``API_KEY`` required on scoring routes."""
    service = start_service(tiny_encoder_bundle, api_keys=API_KEY, warmup=False)
    yield service.url
    service.stop()
