"""/docs and /redoc render with the network cut off but for loopback, as in an air-gapped cluster.

Real headless Chromium loads each page from a real server (with API keys configured: the docs
stay open) and dumps the DOM once the scripts ran. Only Swagger UI's or ReDoc's script can
write the API's paths there (the HTML the server sends names none of them), and Chromium's
network log shows that every request the page made went to the server and got a 200.

FastAPI's stock pages, which load their scripts from CDNs, are loaded the same way and must
stay blank while the log shows their CDN requests failing: the proof that the cut is real, so
the first test cannot pass by reaching a CDN.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

from rmserve.service.api_docs import ASSETS_URL
from tests.model_zoo import missing_setup
from tests.service.conftest import API_KEY, RunningServer, serve_app, settings_for

# The script each page runs, under the assets' mount.
SCRIPTS = {
    "/docs": "/swagger/swagger-ui-bundle.js",
    "/redoc": "/redoc/redoc.standalone.js",
}
URL = re.compile(r"https?://[^\s\"'<>)]+")


@dataclass
class Loaded:
    """What Chromium saw: the DOM after the scripts ran, and each request the page itself
    made (the top-level load excepted) with its outcome: the HTTP status or the net error."""

    dom: str
    requests: dict[str, str]
    stderr: str


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        missing_setup(
            "chromium (a headless browser renders /docs and /redoc)",
            "install it: apt-get install -y --no-install-recommends chromium (.ci/run does)",
        )
        raise AssertionError("unreachable")  # missing_setup fails or skips
    return found


def load(url: str, workdir: Path) -> Loaded:
    """Chromium opens ``url`` with every address but 127.0.0.1 cut off."""
    workdir.mkdir()
    netlog = workdir / "netlog.json"
    # Bound but never listening: a connection to this port is refused.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as dead:
        dead.bind(("127.0.0.1", 0))
        args = [
            chromium(),
            "--headless",
            "--no-sandbox",  # Chromium will not run as root (CI containers) with its sandbox
            "--disable-gpu",
            f"--user-data-dir={workdir / 'profile'}",
            # Every request but loopback goes to a proxy that refuses it, and no host name
            # but 127.0.0.1 resolves (for anything that would not use the proxy).
            f"--proxy-server=http://127.0.0.1:{dead.getsockname()[1]}",
            "--proxy-bypass-list=127.0.0.1",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--log-net-log={netlog}",
            # Dump the DOM once the page's loads are done and its timers have run.
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ]
        process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,  # its own process group: a timeout ends all of Chromium
        )
        try:
            dom, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    assert process.returncode == 0, stderr[-3000:]
    parts = urlsplit(url)
    return Loaded(dom, page_requests(netlog, f"{parts.scheme}://{parts.netloc}"), stderr)


def page_requests(netlog: Path, origin: str) -> dict[str, str]:
    """The requests of Chromium's network log that the page started (their initiator is the
    page's origin; Chromium's own background requests have none), with their outcome."""
    log = json.loads(netlog.read_text())
    constants = log["constants"]
    event_names = {number: name for name, number in constants["logEventTypes"].items()}
    error_names = {number: name for name, number in constants["netError"].items()}
    urls: dict[int, str] = {}
    outcomes: dict[int, str] = {}
    for event in log["events"]:
        name = event_names[event["type"]]
        params = event.get("params", {})
        source = event["source"]["id"]
        if name == "URL_REQUEST_START_JOB" and params.get("initiator") == origin:
            urls[source] = params["url"]
        elif name == "HTTP_TRANSACTION_READ_RESPONSE_HEADERS":
            outcomes[source] = params["headers"][0].split()[1]  # "HTTP/1.1 200 OK"
        elif params.get("net_error", 0) != 0:
            outcomes.setdefault(source, error_names.get(params["net_error"], "net error"))
    return {url: outcomes.get(source, "no answer") for source, url in urls.items()}


@pytest.fixture(scope="module")
def keyed_server(tiny_encoder_bundle: Path) -> Iterator[RunningServer]:
    with serve_app(settings_for(tiny_encoder_bundle, api_keys=API_KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def api_paths(keyed_server: RunningServer) -> list[str]:
    schema = httpx.get(keyed_server.url + "/openapi.json", timeout=10).json()
    paths = sorted(schema["paths"])
    assert {"/v1/score", "/get_reward", "/classify"} <= set(paths), paths
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_page_renders_from_the_server_alone(
    keyed_server: RunningServer, api_paths: list[str], page: str, tmp_path: Path
) -> None:
    server = keyed_server
    html = httpx.get(server.url + page, timeout=10).text
    assert [path for path in api_paths if path in html] == []  # only the script writes them
    assert [url for url in URL.findall(html) if not url.startswith(server.url)] == [], html

    loaded = load(server.url + page, tmp_path / "chromium")

    missing = [path for path in api_paths if path not in loaded.dom]
    assert missing == [], f"not rendered: {missing}\n{loaded.dom[:3000]}\n{loaded.stderr[-3000:]}"
    assert server.url + ASSETS_URL + SCRIPTS[page] in loaded.requests, loaded.requests
    assert server.url + "/openapi.json" in loaded.requests, loaded.requests
    elsewhere_or_failed = {
        url: outcome
        for url, outcome in loaded.requests.items()
        if not url.startswith(server.url + "/") or outcome != "200"
    }
    assert elsewhere_or_failed == {}


@contextlib.contextmanager
def static_site(folder: Path) -> Iterator[str]:
    """The files of ``folder`` over HTTP on loopback; yields the base URL."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}"
        finally:
            httpd.shutdown()
            thread.join(10)


@pytest.mark.slow
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_fastapi_stock_cdn_pages_stay_blank_in_the_same_browser(
    keyed_server: RunningServer, api_paths: list[str], page: str, tmp_path: Path
) -> None:
    """The pages FastAPI serves by default (scripts from cdn.jsdelivr.net), over the same
    schema from the same origin."""
    site = tmp_path / "site"
    site.mkdir()
    schema = httpx.get(keyed_server.url + "/openapi.json", timeout=10).content
    (site / "openapi.json").write_bytes(schema)
    stock = {
        "/docs": get_swagger_ui_html(openapi_url="/openapi.json", title="stock"),
        "/redoc": get_redoc_html(openapi_url="/openapi.json", title="stock"),
    }[page]
    (site / "page.html").write_bytes(bytes(stock.body))

    with static_site(site) as url:
        loaded = load(url + "/page.html", tmp_path / "chromium")

    assert [path for path in api_paths if path in loaded.dom] == [], loaded.dom[:3000]
    cdn = {u: outcome for u, outcome in loaded.requests.items() if "cdn.jsdelivr.net" in u}
    assert cdn, loaded.requests  # the page did try the CDN...
    assert all(outcome != "200" for outcome in cdn.values()), cdn  # ...and was cut off
