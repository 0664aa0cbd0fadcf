"""Security: API keys on every route, constant-time comparison, no key in logs or errors,
no CORS unless configured, no server version or stack trace in answers.

The key test walks the app's route table, so a route added later is covered without
editing this file: everything but health, readiness, metrics and the API docs needs the key.
"""

from __future__ import annotations

import hmac
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from rmserve import __version__
from tests.reliability.conftest import (
    API_KEY,
    RunningServer,
    ServerProcess,
    auth_headers,
    raw_request,
    serve_app,
    settings_for,
)

OTHER_KEY = "second-key-abcdefghijklmnopqrstuv"
WRONG_KEY = "wrong-key-ZYXWVUTSRQPONMLKJIHGFED"
HEALTH = {"/healthz", "/readyz"}
METRICS = {"/metrics"}
DOCS = {"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/redoc/logo-mini.svg"}
DOCS_ASSETS = "/static/docs/"  # the pages' scripts, styles and favicon, open like the pages
BODIES: dict[str, Any] = {
    "/v1/score": {"items": [{"prompt": "Hi", "response": "Hello."}]},
    "/v1/rank": {"prompt": "Hi", "responses": ["Hello.", "Bye."]},
    "/v1/compare": {"prompt": "Hi", "a": "Hello.", "b": "Bye."},
    "/get_reward": {"query": ["Hi Hello."]},
    "/slime/reward": {"prompt": "Hi", "response": "Hello.", "label": None},
    "/classify": {"input": "Hi Hello."},
}


@pytest.fixture(scope="module", params=[True, False], ids=["open-probes", "closed-probes"])
def keyed_server(request: pytest.FixtureRequest, tiny_encoder_bundle: Path) -> Iterator[Any]:
    settings = settings_for(
        tiny_encoder_bundle,
        api_keys=f"{API_KEY},{OTHER_KEY}",
        open_health=request.param,
        open_metrics=request.param,
    )
    with serve_app(settings) as running:
        yield running, request.param


def _walk(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI >= 0.165: included routers
        if included is not None:
            yield from _walk(list(included.routes), prefix + getattr(included, "prefix", ""))
        elif isinstance(route, Route) and route.methods:
            for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
                yield method, prefix + route.path
        elif isinstance(route, Mount) and isinstance(route.app, StaticFiles):
            # Static files have no routes to walk: every file the mount serves.
            assert route.app.directory is not None
            directory = Path(route.app.directory)
            for file in sorted(directory.rglob("*")):
                if file.is_file():
                    yield "GET", f"{prefix}{route.path}/{file.relative_to(directory).as_posix()}"
        elif isinstance(route, Mount):
            yield from _walk(list(route.routes), prefix + route.path)
        else:
            raise AssertionError(f"a route of unknown kind {type(route)}: extend this walk")


def _routes(server: RunningServer) -> list[tuple[str, str]]:
    """(method, path) of every route of the app (API routes, docs, anything added later),
    checked against the OpenAPI schema so that the walk cannot silently miss a router."""
    found = sorted(set(_walk(list(server.app.routes))))
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    documented = {(m.upper(), p) for p, item in schema["paths"].items() for m in item}
    assert documented <= set(found), documented - set(found)
    return found


def _call(server: RunningServer, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    # An empty JSON object, not the valid body: a 401 must come before any validation.
    body = json.dumps({}) if method == "POST" else None
    headers = {**headers, "content-type": "application/json"} if body else headers
    return httpx.request(method, server.url + path, content=body, headers=headers, timeout=30)


def test_every_route_but_probes_and_docs_needs_a_key(keyed_server: Any) -> None:
    server, open_probes = keyed_server
    routes = _routes(server)
    paths = {path for _, path in routes}
    assert set(BODIES) | {"/v1/models"} <= paths, paths  # the walk sees the app
    open_paths = DOCS | (HEALTH | METRICS if open_probes else set())
    checked = 0
    for method, path in routes:
        without = _call(server, method, path, {})
        wrong = _call(server, method, path, {"authorization": f"Bearer {WRONG_KEY}"})
        if path in open_paths or path.startswith(DOCS_ASSETS):
            assert without.status_code == 200, (method, path, without.status_code)
            continue
        checked += 1
        for r in (without, wrong):
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.json()["error"]["type"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            assert WRONG_KEY not in r.text
            assert API_KEY not in r.text
        # Both configured keys open it (health and metrics: GET with no body needed).
        for key in (API_KEY, OTHER_KEY):
            headers = {"authorization": f"Bearer {key}"}
            if method == "POST":
                r = httpx.post(server.url + path, json=BODIES[path], headers=headers, timeout=30)
            else:
                r = httpx.request(method, server.url + path, headers=headers, timeout=30)
            assert r.status_code == 200, (method, path, r.status_code, r.text)
    print(f"\nroutes needing a key: {checked} of {len(routes)}")
    assert checked >= len(BODIES) + 1


def test_malformed_authorization_headers_are_401(keyed_server: Any) -> None:
    server, _ = keyed_server
    url = server.url + "/v1/score"
    for value in [
        API_KEY,  # no scheme
        f"Basic {API_KEY}",
        f"Bearer  {API_KEY}x",
        f"Bearer {API_KEY[:-1]}",  # a prefix of a valid key
        f"Bearer {API_KEY}{API_KEY}",
        "Bearer",
        f"Bearer {API_KEY},{OTHER_KEY}",  # the whole setting is not a key
    ]:
        r = httpx.post(url, json=BODIES["/v1/score"], headers={"authorization": value}, timeout=30)
        assert r.status_code == 401, (value, r.status_code)


def test_keys_are_compared_in_constant_time(
    keyed_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = keyed_server
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for key in (WRONG_KEY, API_KEY, OTHER_KEY):
        calls.clear()
        r = httpx.post(
            server.url + "/v1/score",
            json=BODIES["/v1/score"],
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert r.status_code == (401 if key == WRONG_KEY else 200)
        # compare_digest against every configured key, with no early exit on a match.
        assert sorted(b for _, b in calls) == sorted([API_KEY.encode(), OTHER_KEY.encode()])
        assert all(a == key.encode() for a, _ in calls)


def test_keys_never_reach_logs_or_error_messages(
    tiny_encoder_bundle: Path, spawn: Callable[..., ServerProcess]
) -> None:
    server = spawn(
        tiny_encoder_bundle,
        "--log-level",
        "debug",
        env={"RMSERVE_API_KEYS": f"{API_KEY},{OTHER_KEY}"},
    )
    server.wait_ready()
    answers = []
    for key in (API_KEY, OTHER_KEY, WRONG_KEY):
        headers = {"authorization": f"Bearer {key}"}
        for path, body in BODIES.items():
            answers.append(httpx.post(server.url + path, json=body, headers=headers, timeout=30))
            answers.append(httpx.post(server.url + path, json={}, headers=headers, timeout=30))
        answers.append(httpx.get(server.url + "/v1/models", headers=headers, timeout=30))
        answers.append(httpx.get(server.url + "/nowhere", headers=headers, timeout=30))
    assert {r.status_code for r in answers} >= {200, 401, 404, 422}
    assert server.stop() == 0
    log = server.log()
    assert '"path": "/v1/score"' in log  # debug logging was on and saw the requests
    for secret in (API_KEY, OTHER_KEY, WRONG_KEY):
        assert secret not in log
        for r in answers:
            assert secret not in r.text
            assert all(secret not in v for v in r.headers.values())


def test_the_api_keys_flag_warns_about_process_listings() -> None:
    import argparse

    from rmserve.service.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    action = next(a for a in serve._actions if a.dest == "api_keys")
    assert "RMSERVE_API_KEYS" in action.help
    assert "process list" in action.help


def test_no_cors_headers_unless_origins_are_configured(tiny_encoder_bundle: Path) -> None:
    origin = "https://trainer.example"
    preflight = {
        "origin": origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }

    def cors_headers(r: httpx.Response) -> dict[str, str]:
        return {k: v for k, v in r.headers.items() if k.startswith("access-control-")}

    with serve_app(settings_for(tiny_encoder_bundle)) as server:
        r = httpx.options(server.url + "/v1/score", headers=preflight)
        assert cors_headers(r) == {}, r.headers
        assert r.status_code in (404, 405)
        r = httpx.post(
            server.url + "/v1/score", json=BODIES["/v1/score"], headers={"origin": origin}
        )
        assert r.status_code == 200
        assert cors_headers(r) == {}
    with serve_app(settings_for(tiny_encoder_bundle, cors_origins=origin)) as server:
        r = httpx.options(server.url + "/v1/score", headers=preflight)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == origin
        r = httpx.post(
            server.url + "/v1/score", json=BODIES["/v1/score"], headers={"origin": origin}
        )
        assert r.headers["access-control-allow-origin"] == origin
        other = {**preflight, "origin": "https://evil.example"}
        r = httpx.options(server.url + "/v1/score", headers=other)
        assert "access-control-allow-origin" not in r.headers
        r = httpx.post(
            server.url + "/v1/score",
            json=BODIES["/v1/score"],
            headers={"origin": "https://evil.example"},
        )
        assert "access-control-allow-origin" not in r.headers


LEAKS = ["uvicorn", "starlette", "Traceback", 'File "', "Python/", sys.version.split()[0]]


def test_no_server_version_or_stack_trace_in_answers(
    tiny_encoder_bundle: Path, spawn: Callable[..., ServerProcess]
) -> None:
    server = spawn(tiny_encoder_bundle, "--max-request-bytes", "2048")
    server.wait_ready()
    url = server.url
    json_type = {"content-type": "application/json"}
    answers = {
        "200": httpx.post(url + "/v1/score", json=BODIES["/v1/score"]),
        "400": httpx.post(url + "/v1/score", content=b"{", headers=json_type),
        "404": httpx.get(url + "/nowhere"),
        "405": httpx.get(url + "/v1/score"),
        "413": httpx.post(url + "/v1/score", content=b" " * 4096, headers=json_type),
        "415": httpx.post(url + "/v1/score", content=b"{}", headers={"content-type": "text/plain"}),
        "422": httpx.post(url + "/v1/score", json={"items": 1}),
        "healthz": httpx.get(url + "/healthz"),
    }
    for name, r in answers.items():
        assert name in ("200", "healthz") or str(r.status_code) == name, (name, r.status_code)
        assert "server" not in r.headers, (name, r.headers)
        assert "x-powered-by" not in r.headers
        for leak in LEAKS:
            assert leak not in r.text, (name, leak, r.text[:300])
        if r.status_code >= 400:
            assert __version__ not in r.text
    # uvicorn's own answer to a broken request line carries no server header either.
    status, _ = raw_request(url, b"GARBAGE\r\n\r\n", timeout_s=10)
    assert status in (0, 400)
    head = raw_head(url, b"GET /nowhere HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert b"\r\nserver:" not in head.lower()
    assert server.stop() == 0


def raw_head(url: str, data: bytes) -> bytes:
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received and (chunk := sock.recv(4096)):
            received += chunk
    return b"\r\n" + received.partition(b"\r\n\r\n")[0] + b"\r\n"


def test_settings_never_show_the_keys(tiny_encoder_bundle: Path) -> None:
    settings = settings_for(tiny_encoder_bundle, api_keys=f"{API_KEY},{OTHER_KEY}")
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert API_KEY not in text
        assert OTHER_KEY not in text
    assert auth_headers()["Authorization"].endswith(API_KEY)  # the helper sends the right key
