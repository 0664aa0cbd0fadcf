"""A body over ``max_request_bytes`` is refused with 413 before it is read whole.

Raw sockets, so the test controls exactly what goes on the wire: a declared Content-Length
over the limit is refused with no body byte sent at all; a chunked body without
Content-Length is refused once its chunks pass the limit, with nothing more sent (no further
chunk, no end of body). Each test then waits for the answer; a server that needed more would
never answer, and the wait's timeout only guards against that hang.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import RunningServer, serve_app, settings_for
from tests.waiting import HANG_GUARD_S

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


def _send_until_answer(sock: socket.socket, chunks: Iterator[bytes]) -> tuple[int, bytes]:
    """Send ``chunks`` one by one, stopping early if the server has answered (and closed);
    then wait for the server's answer and read it. (bytes sent, answer)

    No pauses: what is sent does not depend on how fast the server is. The answer is waited
    for with a timeout that only guards against a hang (a server waiting for more body)."""
    sent = 0
    for chunk in chunks:
        answered, _, _ = select.select([sock], [], [], 0)
        if answered:
            break
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break  # the server answered and closed: read what it said
        sent += len(chunk)
    answer = b""
    sock.settimeout(HANG_GUARD_S)
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
    declared = 100 * 1024 * 1024  # announces 100 MB, then sends no body byte at all
    with _connect(small_body_server) as sock:
        sock.sendall(_head(small_body_server, f"content-length: {declared}\r\n"))
        # Answered from the header alone: a server that waited for the body would never
        # answer, and _assert_413 would fail on the empty answer after the hang guard.
        sent, answer = _send_until_answer(sock, iter([]))
    assert sent == 0
    _assert_413(answer)


def test_chunked_body_over_the_limit_is_refused_while_it_streams(
    small_body_server: RunningServer,
) -> None:
    # The body announces nothing; chunks of 512 bytes are sent until their payload passes the
    # 4 KB limit (9 chunks), and no more: neither the rest of the body nor its end.
    over_limit = LIMIT // CHUNK + 1

    def chunks() -> Iterator[bytes]:
        for _ in range(over_limit):
            yield f"{CHUNK:x}\r\n".encode() + b" " * CHUNK + b"\r\n"

    with _connect(small_body_server) as sock:
        sock.sendall(_head(small_body_server, "transfer-encoding: chunked\r\n"))
        sent, answer = _send_until_answer(sock, chunks())
    # Answered once the limit was passed: a server that read on to the body's end (or
    # needed more than the chunk that passed the limit) would never answer.
    _assert_413(answer)
    print(f"\n413 for a chunked body after {sent} bytes sent (limit {LIMIT})")
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
