"""Real uvicorn servers on loopback for the service tests.

``serve_app(settings)`` runs ``create_app(settings)`` under uvicorn in a thread, on a socket
bound to 127.0.0.1 port 0, and yields its base URL once /readyz is 200.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rmserve.service.app import create_app
from rmserve.service.settings import ServiceSettings

API_KEY = "test-key-0123456789abcdef"


class RunningServer:
    def __init__(self, url: str, app: Any, server: Any):
        self.url = url
        self.app = app
        self.server = server

    @property
    def state(self) -> Any:
        return self.app.state.rmserve

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample of /metrics, e.g. metric("rmserve_batch_size_count")."""
        text = httpx.get(self.url + "/metrics", headers=auth_headers(), timeout=10).text
        total = 0.0
        found = False
        for line in text.splitlines():
            if line.startswith(name + (labels or "")) and (
                line[len(name)] in " {" if len(line) > len(name) else False
            ):
                if labels and labels not in line:
                    continue
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(f"{name}{labels} not in /metrics")
        return total


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@contextlib.contextmanager
def serve_app(settings: ServiceSettings, model: Any = None) -> Iterator[RunningServer]:
    """uvicorn in a thread over ``create_app(settings)``, or over a model the test loaded
    (and may have wrapped) itself; yields once /readyz answers 200."""
    import uvicorn

    app = create_app(settings, model)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the server thread died during start-up; see the log")
        try:
            if httpx.get(url + "/readyz", headers=auth_headers(), timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    else:
        raise TimeoutError("the server did not become ready in 60 s")
    try:
        yield RunningServer(url, app, server)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def settings_for(bundle: Path, **overrides: Any) -> ServiceSettings:
    # Explicit values everywhere a test depends on them, so RMSERVE_* in the environment of
    # whoever runs the tests cannot change the outcome.
    base: dict[str, Any] = {
        "bundle": bundle,
        "max_wait_ms": 2.0,
        "warmup": True,
        "log_json": True,
        "log_level": "warning",
        "provider": "cpu",
        "precision": "fp32",
        "intra_op_threads": 0,
        # Two instances on any machine: batch invariance and every route are tested with
        # batches running at once (the CPU default where there are 2 cores or more).
        "model_instances": 2,
        "api_keys": "",
    }
    base.update(overrides)
    return ServiceSettings(**base)


@pytest.fixture(scope="session")
def pooled_client() -> Iterator[httpx.Client]:
    """One pooled HTTP client for tests that send many requests (a new client per request
    costs an SSL context each); closed when the session ends."""
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
        yield client


@pytest.fixture(scope="module")
def encoder_server(tiny_encoder_bundle: Path) -> Iterator[RunningServer]:
    with serve_app(settings_for(tiny_encoder_bundle, max_wait_ms=20.0)) as running:
        yield running


@pytest.fixture(scope="module")
def decoder_server(tiny_decoder_bundle: Path) -> Iterator[RunningServer]:
    with serve_app(settings_for(tiny_decoder_bundle, max_wait_ms=20.0)) as running:
        yield running


@pytest.fixture
def post(encoder_server: RunningServer) -> Callable[..., httpx.Response]:
    def _post(path: str, body: Any, **kwargs: Any) -> httpx.Response:
        return httpx.post(encoder_server.url + path, json=body, timeout=30, **kwargs)

    return _post
