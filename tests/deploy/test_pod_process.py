"""The cpu overlay's container, run as a real process with the pod's command line and env.

What differs from the pod is only what a test on a shared machine must change: the bundle
mount (/models/bundle -> a copy of the tiny test bundle), the listen address (0.0.0.0 ->
127.0.0.1) and the port (8000 -> a free one). Everything else is the rendered manifest: the
ConfigMap's RMSERVE_* settings, an API key where the Secret would put it, the probes' routes,
the Dockerfile's HEALTHCHECK command, and SIGTERM with the pod's grace period.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.dockerfile_model import exec_form, parse_dockerfile
from tests.deploy.kustomize import render

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _pod(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(pod spec, rmserve container, ConfigMap data) of the rendered overlay."""
    by_kind = {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}
    pod = by_kind[("Deployment", "rmserve")]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "rmserve"]
    return pod, container, by_kind[("ConfigMap", "rmserve-settings")]["data"]


@pytest.mark.slow
def test_the_rendered_cpu_pod_serves_and_drains(
    tiny_encoder_bundle: Path,
    tmp_path: Path,
    rmserve_parser: argparse.ArgumentParser,
) -> None:
    pod, container, settings = _pod(render(REPO / "k8s" / "overlays" / "cpu"))
    bundle = tmp_path / "models" / "bundle"
    shutil.copytree(tiny_encoder_bundle, bundle)
    before = _tree_digest(bundle)
    port = str(_free_port())
    mapping = {"/models/bundle": str(bundle), "0.0.0.0": "127.0.0.1", "8000": port}
    argv = [mapping.get(part, part) for part in container["command"] + container["args"]]
    assert argv[0] == "rmserve"
    argv[0] = str(Path(sys.executable).parent / "rmserve")  # the console script of this venv
    rmserve_parser.parse_args(argv[1:])  # the same parser the process will use

    api_key = secrets.token_urlsafe(32)
    scratch = tmp_path / "tmp"  # the pod's emptyDir at /tmp
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMSERVE_")}
    env.update({name: mapping.get(value, value) for name, value in settings.items()})
    env.update({"RMSERVE_API_KEYS": api_key, "TMPDIR": str(scratch), "HOME": str(scratch)})

    url = f"http://127.0.0.1:{port}"
    startup = container["startupProbe"]
    startup_budget = startup["periodSeconds"] * startup["failureThreshold"]
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + startup_budget
        ready = False
        while not ready and time.monotonic() < deadline and process.poll() is None:
            try:
                path = container["startupProbe"]["httpGet"]["path"]
                ready = httpx.get(url + path, timeout=2).status_code == 200
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready, f"not ready within the startup probe's {startup_budget} s"

        for probe in ("readinessProbe", "livenessProbe"):
            path = container[probe]["httpGet"]["path"]
            assert httpx.get(url + path, timeout=5).status_code == 200, probe
        metrics = httpx.get(url + "/metrics", timeout=5)  # Prometheus scrapes without a key
        assert metrics.status_code == 200
        assert "rmserve_queue_items " in metrics.text
        assert 'provider="cpu"' in metrics.text

        body = {"items": [{"prompt": "How do I bake bread?", "response": "Mix flour and water."}]}
        assert httpx.post(url + "/v1/score", json=body, timeout=30).status_code == 401
        scored = httpx.post(
            url + "/v1/score",
            json=body,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=30,
        )
        assert scored.status_code == 200, scored.text
        assert len(scored.json()["scores"]) == 1

        _args, stages = parse_dockerfile(REPO / "Dockerfile")
        healthcheck = {stage.name: stage for stage in stages}["cpu"].last("HEALTHCHECK")
        assert healthcheck is not None
        check = [sys.executable, *exec_form(healthcheck)[1:]]
        assert subprocess.run(check, env={**env, "RMSERVE_PORT": port}, timeout=30).returncode == 0

        # The kubelet sends SIGTERM after the preStop sleep and SIGKILL at the grace period.
        process.send_signal(signal.SIGTERM)
        grace = pod["terminationGracePeriodSeconds"]
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        code = process.wait(timeout=grace - pre_stop)
    finally:
        if process.poll() is None:
            process.kill()
    output, _ = process.communicate(timeout=30)  # reads, then closes the pipe
    assert code == 0, output
    assert _tree_digest(bundle) == before, "the server wrote into its (read-only) bundle mount"
