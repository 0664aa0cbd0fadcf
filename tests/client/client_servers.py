"""Real servers on loopback for the client tests (the fixtures are in conftest.py).

- :class:`ScriptedServer`: a stdlib ``ThreadingHTTPServer`` that answers from a script (429
  with Retry-After then 200, a 400, a dropped connection, a slow answer...) and records every
  request, so retry and error tests run over real sockets without the service.
- ``service_url`` / ``keyed_service_url``: the real rmserve app (``create_app``) under uvicorn
  in a thread, serving the tiny encoder bundle from ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

API_KEY = "test-key-0123456789abcdef0123456789"  # long enough for the service's key check


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (timeout tests)
    drop: bool = False  # close the connection without answering


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out hangs up before the delayed answer: expected here.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class ScriptedServer:
    """Answers each request with the next scripted Reply, then with ``default``."""

    def __init__(
        self, script: list[Reply] | None = None, default: Callable[[Recorded], Reply] | None = None
    ):
        self.script = list(script or [])
        self.default = default or (lambda request: Reply(404, {"error": {"type": "x"}}))
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                recorded = Recorded(self.command, self.path, dict(self.headers.items()), body)
                with server._lock:
                    server.requests.append(recorded)
                    scripted = server.script.pop(0) if server.script else None
                # The default runs outside the lock so that concurrent requests overlap.
                reply = scripted or server.default(recorded)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    return
                payload = (
                    reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                )
                self.send_response(reply.status)
                headers = {"Content-Type": "application/json", **reply.headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = _handle  # noqa: N815 (http.server's names)
            do_POST = _handle  # noqa: N815

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def score_reply(request: Recorded) -> Reply:
    """A well-formed /v1/score answer: score = len(response or text) (easy to check)."""
    items = request.body["items"]
    scores = [float(len(item.get("response") or item.get("text") or "")) for item in items]
    return Reply(
        200,
        {
            "model": "scripted",
            "scores": scores,
            "truncated": [False] * len(items),
            "usage": {"tokens": 3 * len(items)},
        },
    )


class ServiceThread:
    """uvicorn serving ``app`` on a loopback socket from a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self, ready_timeout: float = 60.0) -> None:
        import httpx

        self._thread.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if not self._thread.is_alive():
                break
            time.sleep(0.05)
        raise RuntimeError(f"the service at {self.url} did not become ready")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


def start_service(bundle: Path, **settings: Any) -> ServiceThread:
    from rmserve.service.app import create_app
    from rmserve.service.settings import ServiceSettings

    service = ServiceThread(create_app(ServiceSettings(bundle=bundle, **settings)))
    service.start()
    return service
