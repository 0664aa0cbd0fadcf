"""Run the app under uvicorn, with a graceful shutdown.

On SIGTERM (or SIGINT): ``/readyz`` turns 503 at once, uvicorn stops accepting connections,
requests already accepted are answered (the batcher keeps running until they are), then the
lifespan drains the batcher and the process exits 0. ``drain_timeout_s`` bounds the wait.

Start-up: the bundle is checked (manifest, format version, file hashes, fit with the settings)
before the port opens; then the port is bound here, before the app starts (a port another
process holds is refused with one message naming it and the fix, exit status 3, before the
model is loaded), uvicorn serves on it, ``/healthz`` answers 200 and ``/readyz`` 503 while the
ONNX session is created and warmed up in the background, and ``/readyz`` turns 200 when it is
done. A bundle that cannot be served is refused with its message logged and exit status 2,
before the port opens or, for a model ONNX Runtime cannot load, as soon as the load fails:
``/readyz`` never answers 200 for it.
"""

from __future__ import annotations

import errno
import logging
import math
import signal
import socket
import time
from types import FrameType

import uvicorn

from rmserve.manifest import BundleError
from rmserve.service.app import create_app
from rmserve.service.loading import check_bundle
from rmserve.service.logs import setup_logging
from rmserve.service.runtime import RuntimeConfigError
from rmserve.service.settings import ServiceSettings
from rmserve.service.state import ServiceState

__all__ = ["EXIT_BAD_BUNDLE", "EXIT_START_FAILED", "serve"]

logger = logging.getLogger("rmserve.service.server")

EXIT_BAD_BUNDLE = 2
EXIT_START_FAILED = 3


class _DrainingServer(uvicorn.Server):
    """uvicorn's server that flips readiness before it stops, and exits 0 on SIGTERM."""

    def __init__(self, config: uvicorn.Config, state: ServiceState):
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._state.draining:
            logger.info("shutting down: draining", extra={"signal": signal.Signals(sig).name})
            self._state.drain_deadline = time.monotonic() + self._state.settings.drain_timeout_s
        self._state.draining = True
        self._state.ready = False
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C
        # uvicorn re-raises captured signals after shutdown, which would make a clean
        # drain end with "killed by SIGTERM"; not capturing them lets the process exit 0.
        self.should_exit = True


def _bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to ``host:port``, one per address the host resolves to, as asyncio's
    ``create_server(host=..., port=...)`` binds them (uvicorn's own way when given no sockets)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # A restart on the same port must not wait for the old connections' TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind_error(host: str, port: int, error: OSError) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {where}: address already in use (another process holds the "
            "port); pass another port with --port or RMSERVE_PORT, or stop the other server"
        )
    reason = error.strerror or str(error)
    return (
        f"cannot listen on {where}: {reason}; check --host and --port (RMSERVE_HOST, RMSERVE_PORT)"
    )


def serve(settings: ServiceSettings) -> int:
    """Serve until a signal; the process exit code."""
    setup_logging(settings.log_level, settings.log_json)
    if not settings.api_key_list() and settings.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "listening beyond loopback without API keys; set RMSERVE_API_KEYS unless a "
            "network policy protects the service",
            extra={"host": settings.host},
        )
    try:
        manifest = check_bundle(settings)
    except (BundleError, RuntimeConfigError, ValueError) as e:
        logger.error(f"cannot serve the bundle: {e}", extra={"bundle": str(settings.bundle)})
        return EXIT_BAD_BUNDLE
    # Bound before the app exists: a port in use is refused before the model loads, with the
    # fix; uvicorn's own bind would log the bare OSError and exit 1 after starting the load.
    try:
        sockets = _bind(settings.host, settings.port)
    except OSError as e:
        logger.error(_bind_error(settings.host, settings.port, e))
        return EXIT_START_FAILED
    app = create_app(settings, manifest=manifest)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, math.ceil(settings.drain_timeout_s)),
        server_header=False,
    )
    state: ServiceState = app.state.rmserve
    server = _DrainingServer(config, state)

    def stop_after_failed_load() -> None:
        server.should_exit = True

    state.on_fatal = stop_after_failed_load
    scheme_host = f"http://[{settings.host}]" if ":" in settings.host else f"http://{settings.host}"
    ports = sorted({sock.getsockname()[1] for sock in sockets})
    logger.info("listening", extra={"url": ", ".join(f"{scheme_host}:{port}" for port in ports)})
    try:
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
    if state.failed:
        return EXIT_BAD_BUNDLE
    return 0 if server.started else EXIT_START_FAILED
