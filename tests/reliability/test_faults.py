"""Faults: SIGTERM under load, a failing batch, broken bundles, a server that restarts.

- SIGTERM while load runs: each request carries its own ``x-request-id``; a request the client
  got no answer for must not appear in the server's access log (the app never saw it: refused
  at the socket), every request the app saw was answered, the process exits 0 and its log
  says the drain finished within ``drain_timeout_s``.
- One batch fails inside the model (the runtime's ``run`` wrapped to raise once): exactly that
  batch's requests get a 500 with the JSON error body (no stack trace, no internals); the
  next batches score as before.
- Broken bundles at start-up: a clear message naming the problem, exit code 2, and /readyz
  never answers 200 on the port while the process lives.
- RewardClient against a server that is killed (-9), restarted, stopped (SIGTERM) and restarted
  on the same port while it scores: every reward arrives, once, in order, equal to the
  rewards of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from rmserve.manifest import MANIFEST_NAME, sha256_file
from tests.reliability.conftest import ServerProcess, free_port, serve_model, settings_for
from tests.waiting import HANG_GUARD_S, wait_until_blocking

PAIR = {"items": [{"prompt": "How do I bake bread?", "response": "Mix flour, water, yeast."}]}


def _log_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
    return lines


# --- SIGTERM under load ---------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_under_load_answers_every_accepted_request(
    tiny_encoder_bundle: Path, spawn: Callable[..., ServerProcess]
) -> None:
    # The server's own bound on its drain; generous, so that it only catches a drain that
    # never ends (whether it drained in time is read from its log, not from a clock here).
    drain_timeout_s = 60.0
    server = spawn(
        tiny_encoder_bundle,
        "--max-wait-ms",
        "50",
        "--drain-timeout-s",
        str(drain_timeout_s),
        "--log-level",
        "info",
    )
    server.wait_ready()
    # (request id, worker, time its outcome was known, status or error)
    outcomes: list[tuple[str, int, float, str]] = []
    lock = threading.Lock()
    stop = threading.Event()
    sigterm_at: list[float] = []

    def load(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            request_id = f"rel-{worker}-{n}"
            try:
                # A new connection per request: each one is accepted, or refused, on its own.
                r = httpx.post(
                    server.url + "/v1/score",
                    json=PAIR,
                    headers={"x-request-id": request_id},
                    timeout=30,
                )
                outcome = str(r.status_code)
                if r.status_code == 503:
                    assert r.json()["error"]["type"] == "unavailable"
            except httpx.TransportError as e:
                outcome = type(e).__name__
            with lock:
                outcomes.append((request_id, worker, time.monotonic(), outcome))
            if outcome == "ConnectError":
                time.sleep(0.05)

    def answered_workers() -> set[int]:
        with lock:
            return {worker for _, worker, _, outcome in outcomes if outcome == "200"}

    def refused_after_exit(exited_at: float) -> bool:
        with lock:
            return any(o == "ConnectError" and at > exited_at for _, _, at, o in outcomes)

    with ThreadPoolExecutor(6) as pool:
        workers = [pool.submit(load, i) for i in range(6)]
        try:
            # Under load: every load thread has had answers, and goes on sending.
            wait_until_blocking(lambda: len(answered_workers()) == 6, "an answer for each thread")
            sigterm_at.append(time.monotonic())
            server.signal(signal.SIGTERM)
            code = server.wait(drain_timeout_s + 30)
            exited_at = time.monotonic()
            exited_after = exited_at - sigterm_at[0]
            # New requests meet a closed port.
            wait_until_blocking(
                lambda: refused_after_exit(exited_at), "a request refused after the exit"
            )
        finally:
            stop.set()
        for w in workers:
            w.result()
    log = server.log()
    seen_by_app = {line.get("request_id") for line in _log_lines(log) if "status" in line}
    counts: dict[str, int] = {}
    problems = []
    for request_id, _worker, known_at, outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
        # Its outcome was known before SIGTERM was sent: the port was open all along. (One
        # under way at SIGTERM may meet the closing port, however early it started.)
        before_sigterm = known_at < sigterm_at[0]
        if outcome == "200":
            continue
        if outcome == "503":
            continue  # refused while draining, with the JSON error
        if outcome == "ConnectError":
            if before_sigterm:
                problems.append(f"{request_id}: connection refused before SIGTERM")
            continue
        # No answer: acceptable only if the app never saw the request (reset in the
        # listening socket's backlog when it closed).
        if request_id in seen_by_app:
            problems.append(f"{request_id}: accepted by the app but not answered ({outcome})")
        elif before_sigterm:
            problems.append(f"{request_id}: {outcome} long before SIGTERM")
    print(f"\nSIGTERM under load: outcomes {counts}; exit {code} after {exited_after:.2f} s")
    assert not problems, problems[:10]
    assert counts.get("200", 0) >= 6, counts  # each load thread got answers before SIGTERM
    assert counts.get("ConnectError", 0) > 0, "no request met the closed port after exit"
    assert code == 0, log[-2000:]
    messages = [line["message"] for line in _log_lines(log)]
    assert "shutting down: draining" in messages
    # The server's own word that everything accepted was done within its drain deadline.
    (stopped,) = [line for line in _log_lines(log) if line["message"] == "stopped"]
    assert stopped["drained"] is True, stopped


# --- an inference error in one batch ----------------------------------------------------------


def test_an_inference_error_fails_only_its_batch(
    tiny_encoder_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from rmserve.service.loading import load_model

    # A 300 ms wait gathers the concurrent requests below into one batch.
    settings = settings_for(tiny_encoder_bundle, max_wait_ms=300.0, max_batch_size=64)
    model = load_model(settings)
    real_run = model.runtime.run
    armed = threading.Event()
    failed_batches: list[int] = []

    arming = threading.Lock()  # two instances may run batches at once: one fails, not both

    def flaky_run(input_ids: Any, attention_mask: Any, instance: int = 0) -> Any:
        with arming:
            fail = armed.is_set()
            armed.clear()
        if fail:
            failed_batches.append(int(input_ids.shape[0]))
            raise RuntimeError("injected fault /secret/path/model.py line 42")
        return real_run(input_ids, attention_mask, instance)

    model.runtime.run = flaky_run  # type: ignore[method-assign]
    bodies = [
        {"items": [{"prompt": f"question {i}", "response": "answer " * (i + 1)}]} for i in range(8)
    ]
    with serve_model(settings, model) as server:

        def call_all() -> list[httpx.Response]:
            with ThreadPoolExecutor(len(bodies)) as pool:
                calls = [
                    pool.submit(httpx.post, server.url + "/v1/score", json=b, timeout=30)
                    for b in bodies
                ]
                return [c.result() for c in calls]

        before = call_all()
        assert all(r.status_code == 200 for r in before), [r.text for r in before]
        armed.set()
        with caplog.at_level("ERROR", logger="rmserve.service.batcher"):
            during = call_all()
        after = call_all()

    assert len(failed_batches) == 1
    failed = [r for r in during if r.status_code != 200]
    assert len(failed) == failed_batches[0], [r.status_code for r in during]
    for r in failed:
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "inference_error"
        assert "the model failed on a batch" in error["message"]
        # Neither a stack trace nor the exception's internals reach the client.
        assert "Traceback" not in r.text
        assert "injected" not in r.text
        assert "/secret" not in r.text
    assert "injected fault" in caplog.text  # ...they are in the server log
    for r_before, r_during in zip(before, during, strict=True):
        if r_during.status_code == 200:
            assert r_during.json()["scores"] == pytest.approx(r_before.json()["scores"], abs=1e-5)
    for r_before, r_after in zip(before, after, strict=True):
        assert r_after.status_code == 200, r_after.text
        assert r_after.json()["scores"] == pytest.approx(r_before.json()["scores"], abs=1e-5)


# --- broken bundles at start-up ---------------------------------------------------------------


def _rewrite_manifest(bundle: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    change(data)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data, indent=2))


def _break(bundle: Path, how: str) -> None:
    model = bundle / "model.onnx"
    if how == "missing model file":
        model.unlink()
    elif how == "corrupt model, hash recomputed":
        data = bytearray(model.read_bytes())
        data[len(data) // 3 : len(data) // 3 + 4096] = b"\xde\xad\xbe\xef" * 1024
        model.write_bytes(bytes(data[: len(data) // 2]))
        digest = sha256_file(model)
        _rewrite_manifest(bundle, lambda d: d["variants"]["fp32"].update(sha256=digest))
    elif how == "hash mismatch":
        with open(model, "ab") as f:
            f.write(b"\0")
    elif how == "unknown format_version":
        _rewrite_manifest(bundle, lambda d: d.update(format_version=99))
    elif how == "missing manifest":
        (bundle / MANIFEST_NAME).unlink()
    elif how == "malformed manifest JSON":
        (bundle / MANIFEST_NAME).write_text('{"format_version": 1, "model_name": ')
    elif how == "corrupt tokenizer, hash recomputed":
        tokenizer = bundle / "tokenizer.json"
        tokenizer.write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
        digest = sha256_file(tokenizer)
        _rewrite_manifest(bundle, lambda d: d.update(tokenizer_sha256=digest))
    else:
        raise AssertionError(how)


BROKEN_BUNDLES = {
    "missing model file": "is missing model.onnx",
    "corrupt model, hash recomputed": "cannot be loaded by onnxruntime",
    "hash mismatch": "does not match its sha256",
    "unknown format_version": "unknown format_version 99",
    "missing manifest": "has no rmserve.json",
    "malformed manifest JSON": "is not valid JSON",
    "corrupt tokenizer, hash recomputed": "tokenizer.json",
}


@pytest.mark.parametrize("how", list(BROKEN_BUNDLES))
def test_a_broken_bundle_exits_2_with_a_clear_error_and_is_never_ready(
    tiny_encoder_bundle: Path, tmp_path: Path, spawn: Callable[..., ServerProcess], how: str
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_encoder_bundle, bundle)
    _break(bundle, how)
    server = spawn(bundle, "--log-level", "info")
    readyz: set[int] = set()
    deadline = time.monotonic() + 90
    while server.process.poll() is None:
        assert time.monotonic() < deadline, "the server neither failed nor exited in 90 s"
        with contextlib.suppress(httpx.TransportError):
            readyz.add(httpx.get(server.url + "/readyz", timeout=1).status_code)
        time.sleep(0.02)
    log = server.log()
    assert server.process.returncode == 2, log[-3000:]
    assert 200 not in readyz, f"/readyz answered 200 for a broken bundle ({how})"
    assert BROKEN_BUNDLES[how] in log, log[-3000:]
    assert "cannot serve the bundle" in log
    assert "Traceback" not in log, log[-3000:]  # a clear message, not a crash


@pytest.mark.slow
def test_healthz_answers_while_the_bundle_loads(
    minilm_bundle: Path, spawn: Callable[..., ServerProcess]
) -> None:
    # MiniLM, not a tiny model, in 8 instances: their 8 ONNX sessions and warm-ups keep the
    # server live-but-not-ready for seconds (not hundreds of ms), a window the polling below
    # sees on a loaded machine too.
    server = spawn(
        minilm_bundle, "--model-instances", "8", "--intra-op-threads", "1", "--log-level", "warning"
    )
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + 90
    while not seen or seen[-1][1] != 200:
        assert time.monotonic() < deadline, "the server was not ready in 90 s"
        assert server.process.poll() is None, server.log()
        try:
            health = httpx.get(server.url + "/healthz", timeout=1).status_code
            ready = httpx.get(server.url + "/readyz", timeout=1).status_code
            seen.append((health, ready))
        except httpx.TransportError:
            time.sleep(0.01)
    assert (200, 503) in seen, f"no moment of live-but-not-ready: {sorted(set(seen))}"


# --- the client through restarts ---------------------------------------------------------------


@pytest.mark.slow
def test_client_retries_carry_scoring_through_server_restarts(
    tiny_encoder_bundle: Path,
    spawn: Callable[..., ServerProcess],
    hh_dev_examples: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from rmserve.client import RewardClient

    prompts = [
        [{"role": m.role, "content": m.content} for m in example.prompt]
        for example in hh_dev_examples[:120]
    ]
    responses = [example.responses[0] for example in hh_dev_examples[:120]]
    port = free_port()
    flags = ("--max-wait-ms", "5", "--log-level", "warning")
    server = spawn(tiny_encoder_bundle, *flags, port=port)
    server.wait_ready()
    url = f"http://127.0.0.1:{port}"
    chunk = 6

    scored = threading.Event()  # set after each chunk scored

    def score_all(client: RewardClient) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(prompts), chunk):
            result = client.score(
                prompts[start : start + chunk],
                responses[start : start + chunk],
                truncate_response=True,  # some HH responses exceed the tiny max_length
            )
            scores += list(result.scores)
            scored.set()
        return scores

    with RewardClient(url, max_retries=10, timeout=10) as client:
        reference = score_all(client)  # the uninterrupted run
    assert len(reference) == len(prompts)

    passes: list[list[float]] = []
    disrupted = threading.Event()
    errors: list[BaseException] = []

    def trainer() -> None:
        try:
            with RewardClient(url, max_retries=10, timeout=10) as client:
                while not disrupted.is_set() or len(passes) < 2:
                    passes.append(score_all(client))
                    if len(passes) > 50:
                        raise AssertionError("the disruptions took too long")
        except BaseException as e:  # reported below
            errors.append(e)

    caplog.set_level("INFO", logger="rmserve.client")
    scored.clear()
    thread = threading.Thread(target=trainer)
    thread.start()
    # Each disruption comes while the trainer is scoring (it has just had a chunk scored).
    assert scored.wait(HANG_GUARD_S), "the trainer never scored"
    server.process.kill()  # kill -9: no drain, connections reset
    server.wait(30)
    server = spawn(tiny_encoder_bundle, *flags, port=port)
    server.wait_ready()
    scored.clear()
    assert scored.wait(HANG_GUARD_S), "the trainer never scored on the restarted server"
    server.signal(signal.SIGTERM)  # graceful: drains, then the port closes
    assert server.wait(60) == 0
    server = spawn(tiny_encoder_bundle, *flags, port=port)
    server.wait_ready()
    disrupted.set()
    thread.join(300)
    assert not thread.is_alive()
    assert not errors, errors
    retries = [r for r in caplog.records if r.getMessage().startswith("retrying")]
    print(
        f"\nclient through 2 restarts: {len(passes)} passes of {len(prompts)} rewards, "
        f"{len(retries)} retries"
    )
    assert retries, "the restarts never interrupted the client: nothing was tested"
    for scores in passes:
        assert len(scores) == len(reference)
        np.testing.assert_allclose(scores, reference, atol=1e-5)


# --- Kubernetes service links -----------------------------------------------------------------


def test_a_kubernetes_service_link_in_rmserve_port_is_ignored_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from rmserve.service.settings import ServiceSettings

    # What a pod gets from a Service named "rmserve" when service links are on.
    monkeypatch.setenv("RMSERVE_PORT", "tcp://10.0.0.1:8000")
    monkeypatch.setenv("RMSERVE_PORT_8000_TCP_ADDR", "10.0.0.1")
    monkeypatch.setenv("RMSERVE_SERVICE_HOST", "10.0.0.1")
    with caplog.at_level("WARNING", logger="rmserve.service.settings"):
        settings = ServiceSettings(bundle=tmp_path)
    assert settings.port == 8000
    assert "Kubernetes service link" in caplog.text
    # A --port flag (an init value) still wins, without the warning.
    caplog.clear()
    assert ServiceSettings(bundle=tmp_path, port=9123).port == 9123
    assert "service link" not in caplog.text
    monkeypatch.setenv("RMSERVE_PORT", "not-a-port")
    with pytest.raises(ValueError, match="port"):
        ServiceSettings(bundle=tmp_path)
