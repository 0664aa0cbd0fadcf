"""JSON logs carry the request id; CORS headers appear only when origins are configured."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx

from rmserve.service.logs import JsonFormatter, request_id_var
from tests.service.conftest import RunningServer, serve_app, settings_for


def test_json_log_lines_carry_the_request_id_and_extras() -> None:
    record = logging.LogRecord("rmserve.test", logging.INFO, __file__, 1, "scored", None, None)
    record.items = 3
    token = request_id_var.set("req-42")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["message"] == "scored"
    assert line["level"] == "info"
    assert line["request_id"] == "req-42"
    assert line["items"] == 3
    outside = json.loads(JsonFormatter().format(record))
    assert "request_id" not in outside


def test_no_cors_headers_by_default(encoder_server: RunningServer) -> None:
    r = httpx.options(
        encoder_server.url + "/v1/score",
        headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers


def test_cors_for_configured_origins(tiny_encoder_bundle: Path) -> None:
    settings = settings_for(tiny_encoder_bundle, cors_origins="https://a.example", warmup=False)
    with serve_app(settings) as server:
        preflight = httpx.options(
            server.url + "/v1/score",
            headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "https://a.example"
        other = httpx.options(
            server.url + "/v1/score",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers
        r = httpx.post(
            server.url + "/v1/score",
            json={"items": [{"text": "hi"}]},
            headers={"Origin": "https://a.example"},
        )
        assert r.status_code == 200
        assert "x-queue-time" in r.headers["access-control-expose-headers"]
