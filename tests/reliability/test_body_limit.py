"""A body over ``max_request_bytes`` is refused with 413 before it is read whole.

Raw sockets, so the test controls exactly what goes on the wire and counts the bytes it had
sent when the answer came: a declared Content-Length over the limit is refused before any
body byte is sent; a chunked body without Content-Length that trickles in is refused as soon
as it passes the limit, long before its (announced) end.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import RunningServer, serve_app, settings_for

LIMIT = 4096
CHUNK = 512


@pytest.fixture(scope="module")
def small_body_server(tiny_encoder_bundle: Path) -> Iterator[RunningServer]:
    with serve_app(settings_for(tiny_encoder_bundle, max_request_bytes=LIMIT)) as running:
        yield running


def _connect(server: RunningServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _head(server: RunningServer, extra: str) -> bytes:
    host = server.url.removeprefix("http://")
    return (
        f"POST /v1/score HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n{extra}\r\n"
    ).encode()


def _trickle_until_answer(
    sock: socket.socket, chunks: Iterator[bytes], pause_s: float, max_s: float
) -> tuple[int, bytes]:
    """Send chunks one by one with pauses until the server answers; (bytes sent, answer)."""
    sent = 0
    deadline = time.monotonic() + max_s
    for chunk in chunks:
        readable, _, _ = select.select([sock], [], [], pause_s)
        if readable:
            break
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break  # the server answered and closed: read what it said
        sent += len(chunk)
        assert time.monotonic() < deadline, f"no answer after {sent} bytes in {max_s} s"
    answer = b""
    sock.settimeout(10)
    try:
        while data := sock.recv(65536):
            answer += data
            if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                break
    except (ConnectionResetError, TimeoutError):
        pass
    return sent, answer


def _assert_413(answer: bytes) -> dict[str, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    error = json.loads(body)["error"]
    assert error["type"] == "request_too_large"
    assert str(LIMIT) in error["message"]
    return dict(error)


def test_declared_length_over_the_limit_is_refused_before_the_body(
    small_body_server: RunningServer,
) -> None:
    declared = 100 * 1024 * 1024  # announces 100 MB, then trickles
    with _connect(small_body_server) as sock:
        sock.sendall(_head(small_body_server, f"content-length: {declared}\r\n"))
        sent, answer = _trickle_until_answer(
            sock, iter([b" " * CHUNK] * 1000), pause_s=0.05, max_s=30
        )
    _assert_413(answer)
    print(f"\n413 for a declared {declared} bytes after {sent} body bytes sent")
    assert sent <= 2 * CHUNK  # answered from the header, not after reading the body


def test_chunked_body_over_the_limit_is_refused_while_it_streams(
    small_body_server: RunningServer,
) -> None:
    # 1000 chunks of 512 bytes would be 500 KB; the limit is 4 KB.
    def chunks() -> Iterator[bytes]:
        for _ in range(1000):
            yield f"{CHUNK:x}\r\n".encode() + b" " * CHUNK + b"\r\n"

    with _connect(small_body_server) as sock:
        sock.sendall(_head(small_body_server, "transfer-encoding: chunked\r\n"))
        sent, answer = _trickle_until_answer(sock, chunks(), pause_s=0.05, max_s=30)
    _assert_413(answer)
    print(f"\n413 for a chunked body after {sent} bytes sent (limit {LIMIT})")
    # Answered once the limit was passed: a few chunks in flight at most, not the 500 KB.
    assert sent <= LIMIT + 4 * (CHUNK + 16)
    # The server is fine afterwards.
    r = httpx.post(
        small_body_server.url + "/v1/score",
        json={"items": [{"prompt": "Hi", "response": "Hello."}]},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def test_body_at_the_limit_is_read_and_scored(small_body_server: RunningServer) -> None:
    # The limit refuses only what is over it: a body of exactly LIMIT bytes is served.
    body = json.dumps({"items": [{"prompt": "Hi", "response": "Hello."}]}).encode()
    body += b" " * (LIMIT - len(body))
    assert len(body) == LIMIT
    r = httpx.post(
        small_body_server.url + "/v1/score",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
