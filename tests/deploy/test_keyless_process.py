"""The cpu overlay with the keyless component, run as a real process with the pod's command
line and env: trainers that cannot send an Authorization header (OpenRLHF's /get_reward, verl's
/classify) are served.

As in test_pod_process.py, only the bundle path, the listen address and the port are mapped
to the test's; everything else is the rendered manifest, with no API key anywhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.kustomize import render

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keyless_cpu_objects(scratch: Path) -> list[dict[str, Any]]:
    tree = scratch / "k8s"
    shutil.copytree(REPO / "k8s", tree)
    overlay = tree / "overlays" / "cpu-keyless"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources:\n  - ../cpu\ncomponents:\n  - ../../components/keyless\n"
    )
    return render(overlay)


@pytest.mark.slow
def test_the_rendered_keyless_pod_scores_without_a_key(
    tiny_encoder_bundle: Path, tmp_path: Path
) -> None:
    objects = _keyless_cpu_objects(tmp_path / "render")
    by_kind = {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}
    pod = by_kind[("Deployment", "rmserve")]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "rmserve"]
    settings: dict[str, str] = by_kind[("ConfigMap", "rmserve-settings")]["data"]
    # The pod's whole environment: the ConfigMap and the container's own env, which keyless
    # mode leaves without a single entry (so without RMSERVE_API_KEYS).
    assert [item["name"] for item in container.get("env", [])] == []
    assert "RMSERVE_API_KEYS" not in settings

    bundle = tmp_path / "models" / "bundle"
    shutil.copytree(tiny_encoder_bundle, bundle)
    port = str(_free_port())
    mapping = {"/models/bundle": str(bundle), "0.0.0.0": "127.0.0.1", "8000": port}
    argv = [mapping.get(part, part) for part in container["command"] + container["args"]]
    argv[0] = str(Path(sys.executable).parent / "rmserve")  # the console script of this venv
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMSERVE_")}
    env.update({name: mapping.get(value, value) for name, value in settings.items()})
    env.update({"TMPDIR": str(scratch), "HOME": str(scratch)})

    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        startup = container["startupProbe"]
        deadline = time.monotonic() + startup["periodSeconds"] * startup["failureThreshold"]
        ready = False
        while not ready and time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(url + startup["httpGet"]["path"], timeout=2).status_code == 200
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready, "the keyless server did not turn ready"

        prompt, response = "How do I bake bread?", "Mix flour and water."
        scored = httpx.post(
            url + "/v1/score",
            json={"items": [{"prompt": prompt, "response": response}]},
            timeout=30,
        )
        assert scored.status_code == 200, scored.text
        # OpenRLHF's remote reward model request, as it sends it: no Authorization header.
        openrlhf = httpx.post(
            url + "/get_reward",
            json={"query": [prompt + " " + response], "prompts": [prompt], "labels": [""]},
            timeout=30,
        )
        assert openrlhf.status_code == 200, openrlhf.text
        assert len(openrlhf.json()["rewards"]) == 1
        # verl's reward loop: vLLM's classify request, no key either.
        verl = httpx.post(url + "/classify", json={"input": [prompt + " " + response]}, timeout=30)
        assert verl.status_code == 200, verl.text
    finally:
        process.terminate()
        try:
            process.wait(timeout=pod["terminationGracePeriodSeconds"])
        except subprocess.TimeoutExpired:
            process.kill()
    output, _ = process.communicate(timeout=30)  # reads, then closes the pipe
    assert process.returncode == 0, output
