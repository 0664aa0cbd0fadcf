"""Request limits (413, 422), the bounded queue (429 + Retry-After) and API keys (401)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import API_KEY, RunningServer, auth_headers, serve_app, settings_for

PAIR = {"prompt": "Hi", "response": "Hello there."}


@pytest.fixture(scope="module")
def limited_server(tiny_encoder_bundle: Path) -> Iterator[RunningServer]:
    settings = settings_for(
        tiny_encoder_bundle,
        max_items_per_request=8,
        max_request_bytes=4096,
        max_item_chars=300,
        max_batch_size=8,
        max_queue_items=8,
        # Long enough that a non-full batch sits in the queue while the test fills it.
        max_wait_ms=1500.0,
        api_keys=API_KEY + "," + API_KEY[::-1],
        open_health=True,
        open_metrics=False,
    )
    with serve_app(settings) as running:
        yield running


def post(server: RunningServer, body: object, **kwargs: object) -> httpx.Response:
    headers = kwargs.pop("headers", auth_headers())
    return httpx.post(server.url + "/v1/score", json=body, headers=headers, timeout=30)  # type: ignore[arg-type]


def test_too_many_items_is_413(limited_server: RunningServer) -> None:
    r = post(limited_server, {"items": [{"text": "a"}] * 9})
    assert r.status_code == 413
    assert "limit is 8" in r.json()["error"]["message"]


def test_too_many_bytes_is_413_from_content_length(limited_server: RunningServer) -> None:
    body = json.dumps({"items": [{"text": "x" * 5000}]}).encode()
    r = httpx.post(
        limited_server.url + "/v1/score",
        content=body,
        headers={**auth_headers(), "content-type": "application/json"},
    )
    assert r.status_code == 413
    assert "4096 bytes" in r.json()["error"]["message"]


def test_too_many_bytes_is_413_while_streaming_without_length(
    limited_server: RunningServer,
) -> None:
    sent = {"chunks": 0}

    def chunks() -> Iterator[bytes]:
        # A chunked body (no Content-Length) far over the limit.
        for _ in range(1000):
            sent["chunks"] += 1
            yield b" " * 1024

    try:
        r = httpx.post(
            limited_server.url + "/v1/score",
            content=chunks(),
            headers={**auth_headers(), "content-type": "application/json"},
            timeout=30,
        )
    except httpx.TransportError:
        pytest.skip("the server closed the connection before the client read the 413")
    assert r.status_code == 413
    assert "limit is 4096 bytes" in r.json()["error"]["message"]


def test_item_over_the_character_limit_is_refused_naming_the_item(
    limited_server: RunningServer,
) -> None:
    r = post(limited_server, {"items": [{"text": "y" * 400}]})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["type"] == "item_too_long"
    assert error["index"] == 0
    assert "limit is 300" in error["message"]
    # Beside an item that fits, it costs only its own score.
    both = post(limited_server, {"items": [PAIR, {"text": "y" * 400}]})
    assert both.status_code == 200
    assert both.json()["scores"][1] is None
    [item_error] = both.json()["errors"]
    assert item_error["type"] == "item_too_long"
    assert item_error["index"] == 1
    assert item_error["details"]["limit"] == 300


def test_full_queue_is_429_with_retry_after(limited_server: RunningServer) -> None:
    results: dict[str, httpx.Response] = {}

    def first() -> None:
        results["first"] = post(limited_server, {"items": [PAIR] * 6})

    thread = threading.Thread(target=first)
    thread.start()
    # Wait until the six items sit in the queue (they wait 1.5 s for a batch to fill).
    deadline = time.monotonic() + 5
    while limited_server.state.scorer.batcher.queued_items < 6:
        assert time.monotonic() < deadline, "the first request never queued"
        time.sleep(0.01)
    second = post(limited_server, {"items": [PAIR] * 3})
    assert second.status_code == 429
    assert int(second.headers["retry-after"]) >= 1
    assert second.json()["error"]["type"] == "queue_full"
    thread.join(30)
    assert results["first"].status_code == 200
    assert len(results["first"].json()["scores"]) == 6


def test_every_protected_route_needs_a_valid_key(limited_server: RunningServer) -> None:
    open_paths = {"/healthz", "/readyz"}  # open_health=True, open_metrics=False
    # The app's own route table, as its OpenAPI document lists it (docs routes aside).
    table = limited_server.app.openapi()["paths"]
    routes = [
        (path, method.upper())
        for path, operations in table.items()
        for method in operations
        if path not in open_paths
    ]
    paths = {path for path, _ in routes}
    assert {"/v1/score", "/v1/rank", "/v1/compare", "/get_reward", "/classify"} <= paths
    assert {"/v1/models", "/metrics"} <= paths
    for path, method in routes:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key-0123456789abcdef"},
            {"Authorization": f"Basic {API_KEY}"},
            {"Authorization": f"Bearer {API_KEY}x"},
        ):
            r = httpx.request(
                method, limited_server.url + path, json={}, headers=headers, timeout=30
            )
            assert r.status_code == 401, (path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "unauthorized"
        # Both configured keys work.
        for key in (API_KEY, API_KEY[::-1]):
            r = httpx.request(
                method,
                limited_server.url + path,
                json={},
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            assert r.status_code != 401, path


def test_health_is_open_and_metrics_closed_as_configured(limited_server: RunningServer) -> None:
    assert httpx.get(limited_server.url + "/healthz").status_code == 200
    assert httpx.get(limited_server.url + "/readyz").status_code == 200
    assert httpx.get(limited_server.url + "/metrics").status_code == 401
    assert httpx.get(limited_server.url + "/metrics", headers=auth_headers()).status_code == 200


def test_the_key_is_never_logged(
    limited_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    post(limited_server, {"items": [PAIR]})
    post(limited_server, {"items": [PAIR]}, headers={"Authorization": "Bearer " + API_KEY + "z"})
    assert API_KEY not in caplog.text
