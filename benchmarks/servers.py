"""Start a system under test as a real server process on loopback, and stop it.

Each server runs in its own process (real uvicorn), so that its CPU time can be measured apart
from the load generator's, and so that a crash or a leak in one system cannot touch the next.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

__all__ = ["ServerProcess", "free_port", "start_server"]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server and its children so far."""
        try:
            proc = psutil.Process(self.process.pid)
            total = sum(proc.cpu_times()[:2])
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += sum(child.cpu_times()[:2])
            return float(total)
        except psutil.NoSuchProcess:
            return 0.0

    def wait_idle(self, timeout_s: float = 60.0, interval_s: float = 0.25) -> bool:
        """Wait until the server uses (almost) no CPU: the requests a load run abandoned at the
        end of its window are done. False if it is still busy after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        before = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(interval_s)
            now = self.cpu_seconds()
            if now - before < 0.05 * interval_s:
                return True
            before = now
        return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def metrics_text(self) -> str | None:
        """The Prometheus text of /metrics, or None where the server has none."""
        try:
            response = httpx.get(self.base_url + "/metrics", timeout=10.0)
        except httpx.HTTPError:
            return None
        return response.text if response.status_code == 200 else None


def _wait_ready(server: ServerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with code {server.process.returncode} before it was "
                f"ready; its log ({server.log_path}) ends with:\n{server.log_tail()}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.base_url + "/readyz", timeout=2.0).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(
        f"{server.name} was not ready within {timeout_s:.0f} s; its log ({server.log_path}) "
        f"ends with:\n{server.log_tail()}"
    )


def _stop(server: ServerProcess) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)


@contextlib.contextmanager
def start_server(
    name: str,
    argv: Sequence[str],
    *,
    port: int,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 300.0,
    cwd: Path | None = None,
) -> Iterator[ServerProcess]:
    """Run ``python argv...`` (which must listen on ``port``), wait for /readyz, yield, stop.

    ``cwd`` is the repository root for ``-m benchmarks...`` servers."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd
        )
        server = ServerProcess(name, process, f"http://127.0.0.1:{port}", log_path)
        try:
            _wait_ready(server, ready_timeout_s)
            yield server
        finally:
            _stop(server)
