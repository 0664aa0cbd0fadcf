"""Servers for the reliability tests: in-process (uvicorn in a thread) and real processes.

- In-process servers come from ``tests/service/conftest.py`` (``serve_app``, ``settings_for``)
  so that a test can reach into the app (wrap the runtime, walk the route table).
- :class:`ServerProcess` runs ``rmserve serve`` as a child process on a free loopback port, with
  its stderr in a file (a pipe would fill up under load and block the server), so a test can
  measure its resident memory with psutil, send it signals and read its log afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import httpx
import psutil
import pytest

from rmserve.service.settings import ServiceSettings
from tests.service.conftest import API_KEY, RunningServer, auth_headers, serve_app, settings_for

__all__ = [
    "API_KEY",
    "REPO",
    "RunningServer",
    "ServerProcess",
    "auth_headers",
    "clean_env",
    "free_port",
    "raw_request",
    "scrape",
    "serve_app",
    "serve_model",
    "settings_for",
]

REPO = Path(__file__).resolve().parents[2]
SERVE = [sys.executable, "-m", "rmserve.service", "serve"]


def serve_model(
    settings: ServiceSettings, model: Any
) -> contextlib.AbstractContextManager[RunningServer]:
    """Like ``serve_app``, over a model the test loaded (and may have wrapped) itself."""
    return serve_app(settings, model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without RMSERVE_* (a tester's settings must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def scrape(
    url: str, name: str, labels: str = "", headers: Mapping[str, str] | None = None
) -> float:
    """The sum of the samples of metric ``name`` in ``url``/metrics whose line contains
    ``labels`` (e.g. ``route="/v1/score"``)."""
    text = httpx.get(url + "/metrics", headers=dict(headers or {}), timeout=10).text
    total, found = 0.0, False
    for line in text.splitlines():
        if labels not in line:
            continue
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(f"{name} not in {url}/metrics")
    return total


def raw_request(url: str, data: bytes, timeout_s: float = 30.0) -> tuple[int, bytes]:
    """Send ``data`` as is on a new connection to ``url``'s host and port (for requests an
    HTTP client refuses to send); the status and body of the answer (status 0: no answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return status, body


class ServerProcess:
    """``rmserve serve BUNDLE`` as a child process on 127.0.0.1."""

    def __init__(
        self,
        bundle: Path,
        log_path: Path,
        *flags: str,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ):
        self.bundle = bundle
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log: IO[str] = open(log_path, "a")  # noqa: SIM115 (closed in wait/stop)
        self.process = subprocess.Popen(
            [*SERVE, str(bundle), "--port", str(self.port), "--provider", "cpu", *flags],
            cwd=REPO,
            env=clean_env(**dict(env or {})),
            stdout=self._log,
            stderr=self._log,
            text=True,
        )
        self.ps = psutil.Process(self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss(self) -> int:
        """Resident memory of the server process, bytes."""
        return int(self.ps.memory_info().rss)

    def wait_ready(self, timeout_s: float = 90.0, headers: Mapping[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"server exited {self.process.returncode} during start-up:\n{self.log()}"
                )
            try:
                r = httpx.get(self.url + "/readyz", headers=dict(headers or {}), timeout=2)
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"server not ready in {timeout_s} s:\n{self.log()}")

    def metric(self, name: str, labels: str = "") -> float:
        return scrape(self.url, name, labels)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            if self.process.poll() is not None:
                self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._log.close()

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 30 s; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self._log.close()
        return int(self.process.returncode)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """``spawn(bundle, *flags, port=None, env=None)`` -> a started ServerProcess; every one
    still running at the end of the test is killed."""
    started: list[ServerProcess] = []

    def _spawn(bundle: Path, *flags: str, **kwargs: Any) -> ServerProcess:
        log = tmp_path / f"server-{len(started)}.log"
        server = ServerProcess(bundle, log, *flags, **kwargs)
        started.append(server)
        return server

    yield _spawn
    for server in started:
        server.kill()
