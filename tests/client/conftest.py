"""Fixtures of the client tests: scripted loopback servers and the real service."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from client_servers import API_KEY, Recorded, Reply, ScriptedServer, start_service


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
