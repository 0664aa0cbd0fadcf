"""``rmserve serve`` as a real process: graceful SIGTERM, bad bundles, imports, CLI flags."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from rmserve.service.commands import register
from rmserve.service.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]


# `rmserve serve`: the real CLI entry point (rmserve/__main__.py -> rmserve.cli.main).
SERVE = [sys.executable, "-m", "rmserve", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(bundle: Path, *flags: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    command = [*SERVE, str(bundle), "--port", str(port)]
    process = subprocess.Popen(
        [*command, *flags],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _, stderr = process.communicate(timeout=30)
            raise AssertionError(f"server exited {process.returncode}: {stderr}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError("server not ready in 60 s")


@pytest.mark.slow
def test_sigterm_answers_every_accepted_request_then_exits_0(tiny_encoder_bundle: Path) -> None:
    # A 3 s batching wait keeps the requests queued when SIGTERM arrives.
    process, url = start(
        tiny_encoder_bundle,
        "--max-wait-ms",
        "3000",
        "--max-batch-size",
        "256",
        "--max-queue-items",
        "1024",
        "--log-level",
        "info",
    )
    try:
        wait_ready(process, url)
        results: list[httpx.Response | BaseException] = []
        lock = threading.Lock()

        def call(i: int) -> None:
            try:
                body = {"items": [{"prompt": f"question {i}", "response": "answer " * (i % 7 + 1)}]}
                r = httpx.post(url + "/v1/score", json=body, timeout=60)
            except BaseException as e:  # recorded: a dropped request must fail the test
                r = e  # type: ignore[assignment]
            with lock:
                results.append(r)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while True:
            metrics = httpx.get(url + "/metrics", timeout=5).text
            queued = next(
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("rmserve_queue_items ")
            )
            if queued >= 12:
                break
            assert time.monotonic() < deadline, f"only {queued} items queued"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
    _, stderr = process.communicate(timeout=30)  # reads, then closes the pipes
    assert len(results) == 12
    for r in results:
        assert isinstance(r, httpx.Response), f"request dropped: {r!r}\n{stderr}"
        assert r.status_code == 200, r.text
        assert len(r.json()["scores"]) == 1
    assert code == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert "shutting down: draining" in messages
    assert "stopped" in messages


def corrupt(bundle: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    if how == "missing manifest":
        (copy / "rmserve.json").unlink()
    elif how == "hash mismatch":
        with open(copy / "model.onnx", "ab") as f:
            f.write(b"\0")
    elif how == "unknown version":
        data = json.loads((copy / "rmserve.json").read_text())
        data["format_version"] = 99
        (copy / "rmserve.json").write_text(json.dumps(data))
    elif how == "missing model":
        (copy / "model.onnx").unlink()
    return copy


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing manifest", "has no rmserve.json"),
        ("hash mismatch", "does not match its sha256"),
        ("unknown version", "unknown format_version 99"),
        ("missing model", "is missing model.onnx"),
    ],
)
def test_a_bad_bundle_exits_non_zero_with_the_message(
    tiny_encoder_bundle: Path, tmp_path: Path, how: str, message: str
) -> None:
    bad = corrupt(tiny_encoder_bundle, tmp_path, how)
    result = subprocess.run(
        [*SERVE, str(bad), "--port", str(free_port())],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "cannot serve the bundle" in result.stderr


def test_unavailable_precision_and_unsafe_settings_are_refused(tiny_encoder_bundle: Path) -> None:
    result = subprocess.run(
        [*SERVE, str(tiny_encoder_bundle), "--precision", "fp16"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "fp16" in result.stderr
    assert "has only" in result.stderr
    env = {**clean_env(), "RMSERVE_API_KEYS": "short"}
    result = subprocess.run(
        [*SERVE, str(tiny_encoder_bundle)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "at least 16" in result.stderr
    assert "short" not in result.stderr.replace("shorter", "")


def test_the_service_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys\n"
        "import rmserve.service.app, rmserve.service.server, rmserve.service.commands\n"
        "import argparse; from rmserve.service.loading import load_model\n"
        "rmserve.service.commands.register(argparse.ArgumentParser().add_subparsers())\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_every_setting_is_a_flag_with_help() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    flags = {a.dest: a for a in serve._actions}
    for name, field in ServiceSettings.model_fields.items():
        assert name in flags, name
        assert flags[name].help, name
        assert field.description, name
    args = parser.parse_args(
        ["serve", "/b", "--max-wait-ms", "7.5", "--no-open-metrics", "--precision", "int8"]
    )
    assert (args.bundle, args.max_wait_ms, args.open_metrics, args.precision) == (
        "/b",
        7.5,
        False,
        "int8",
    )
    assert args.port is None  # not given: the environment or the default decides


def test_a_port_in_use_exits_3_naming_the_port_and_the_fix(tiny_encoder_bundle: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = int(holder.getsockname()[1])
        result = subprocess.run(
            [*SERVE, str(tiny_encoder_bundle), "--port", str(port)],
            cwd=REPO,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 3, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    errors = [line["message"] for line in lines if line["level"] == "error"]
    assert len(errors) == 1, result.stderr
    assert f"127.0.0.1:{port}" in errors[0]
    assert "address already in use" in errors[0]
    assert "--port" in errors[0]
    assert "RMSERVE_PORT" in errors[0]
    assert "stop the other server" in errors[0]
    # Refused before the app started: no uvicorn start-up, no model load.
    assert "Started server process" not in result.stderr
    assert "ready" not in [line["message"] for line in lines]
