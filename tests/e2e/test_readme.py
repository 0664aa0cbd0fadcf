"""The curl examples of the README (and of docs/service.md), run as written against a real server.

Every ```bash block of README.md that calls curl is run by bash against `rmserve serve` on a
tiny HH-transcript encoder bundle (the text format of the default model), with only the
address (``localhost:8000`` or ``127.0.0.1:8000``) replaced by the test server's. The ```json
block right under it is the output the README shows: the answer must be JSON with exactly its
top-level keys. An answer of the error shape (``{"error": ...}``, what a 4xx carries) fails, so
a body that the server refuses when pasted (``"items": [...]``) fails here.

docs/service.md's examples run the same way, each after the block that sets ``URL`` and
``AUTH``, against a server that requires an API key (``KEY`` in bash's environment is that
key, as the doc says); a block there without a ```json block under it only has to succeed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.waiting import HANG_GUARD_S, wait_until_blocking

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SERVICE_DOC = REPO / "docs" / "service.md"
API_KEY = "readme-test-key-0123456789"

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[^\n]*$", re.M | re.S)
# The address the examples name: the default port of `rmserve serve` and scripts/main.sh.
ADDRESS = re.compile(r"\b(?:localhost|127\.0\.0\.1):8000\b")


@dataclass(frozen=True)
class Example:
    """A ```bash block that calls curl, and the JSON the doc shows under it (if any)."""

    doc: str
    line: int
    script: str
    shown: dict[str, object] | None

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(markdown: str) -> list[tuple[str, str, int, int, int]]:
    """(language, body, first line, start offset, end offset) of each fenced block."""
    return [
        (m.group(1), m.group(2), markdown.count("\n", 0, m.start()) + 1, m.start(), m.end())
        for m in FENCE.finditer(markdown)
    ]


def curl_examples(path: Path) -> list[Example]:
    """Every ```bash block of ``path`` with a curl command, with the ```json block that
    directly follows it (only blank lines between), parsed."""
    text = path.read_text(encoding="utf-8")
    found = blocks(text)
    examples = []
    for i, (language, body, line, _, end) in enumerate(found):
        if language != "bash" or not re.search(r"\bcurl\b", body):
            continue
        shown: dict[str, object] | None = None
        if i + 1 < len(found):
            next_language, next_body, _, next_start, _ = found[i + 1]
            if next_language == "json" and not text[end:next_start].strip():
                parsed = json.loads(next_body)
                assert isinstance(parsed, dict), (
                    f"{path.name}:{line}: the output shown is not an object"
                )
                shown = parsed
        examples.append(Example(path.relative_to(REPO).as_posix(), line, body, shown))
    return examples


def url_block(path: Path) -> str:
    """The block of ``path`` that sets ``URL=`` (the doc's preamble to its examples)."""
    setting = [body for language, body, *_ in blocks(path.read_text()) if language == "bash"]
    setting = [body for body in setting if re.search(r"^URL=", body, re.M)]
    assert len(setting) == 1, f"{path.name}: expected one block that sets URL, found {len(setting)}"
    return setting[0]


README_EXAMPLES = curl_examples(README)
SERVICE_EXAMPLES = curl_examples(SERVICE_DOC)


@dataclass(frozen=True)
class Server:
    port: int
    key: str | None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str, process: subprocess.Popen[str]) -> bool:
    if process.poll() is not None:
        _, errors = process.communicate()
        raise AssertionError(f"rmserve serve exited {process.returncode}: {errors}")
    try:
        return httpx.get(url + "/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def serve(bundle: Path, key: str | None) -> Iterator[Server]:
    """`rmserve serve BUNDLE --port P` as a child process on loopback, until /readyz is 200;
    stopped with SIGTERM (its pipes read to the end) when the block ends."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMSERVE_")}
    if key is not None:
        env["RMSERVE_API_KEYS"] = key
    process = subprocess.Popen(
        [sys.executable, "-m", "rmserve", "serve", str(bundle), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_blocking(lambda: _ready(url, process), "rmserve serve ready")
        yield Server(port, key)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def open_server(tiny_encoder_bundle: Path) -> Iterator[Server]:
    """As scripts/main.sh serves by default: no API keys."""
    with serve(tiny_encoder_bundle, None) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_server(tiny_encoder_bundle: Path) -> Iterator[Server]:
    with serve(tiny_encoder_bundle, API_KEY) as server:
        yield server


def run_example(example: Example, server: Server, preamble: str = "") -> None:
    """Run ``example`` with bash against ``server`` (address replaced, nothing else added)
    and check its exit status and its answer against the output shown."""
    script, replaced = ADDRESS.subn(f"127.0.0.1:{server.port}", preamble + example.script)
    assert replaced, f"{example.name}: no localhost:8000 or 127.0.0.1:8000 to point at the server"
    env = {k: v for k, v in os.environ.items() if k not in ("KEY", "URL", "AUTH")}
    if server.key is not None:
        env["KEY"] = server.key
    done = subprocess.run(
        ["bash", "-e", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_GUARD_S,
        check=False,
    )
    assert done.returncode == 0, f"{example.name}: exit {done.returncode}: {done.stderr}"
    if example.shown is None:
        return
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"{example.name}: the answer is not JSON: {done.stdout!r}") from None
    assert isinstance(answer, dict), f"{example.name}: {done.stdout}"
    assert "error" not in answer, f"{example.name}: the server refused it: {done.stdout}"
    assert sorted(answer) == sorted(example.shown), (
        f"{example.name}: the answer's keys {sorted(answer)} are not those shown "
        f"{sorted(example.shown)}"
    )


def test_the_readme_has_curl_examples_each_with_its_output() -> None:
    assert len(README_EXAMPLES) >= 2, [e.name for e in README_EXAMPLES]
    missing = [e.name for e in README_EXAMPLES if e.shown is None]
    assert not missing, f"curl blocks without a ```json output right under them: {missing}"


@pytest.mark.parametrize("example", README_EXAMPLES, ids=lambda e: e.name)
def test_readme_curl_example_runs_as_written(example: Example, open_server: Server) -> None:
    run_example(example, open_server)


@pytest.mark.parametrize("example", SERVICE_EXAMPLES, ids=lambda e: e.name)
def test_service_doc_curl_example_runs_as_written(example: Example, keyed_server: Server) -> None:
    run_example(example, keyed_server, preamble=url_block(SERVICE_DOC) + "\n")


def test_a_body_the_server_refuses_fails_the_check(open_server: Server) -> None:
    """The check catches what a reader pasting the old README got: a 400 for a literal [...]."""
    refused = Example(
        "README.md",
        0,
        "curl -s localhost:8000/v1/score -H 'Content-Type: application/json' "
        "-d '{\"items\": [...]}'",
        {"model": "", "scores": [], "truncated": [], "usage": {}},
    )
    with pytest.raises(AssertionError, match="the server refused it"):
        run_example(refused, open_server)
