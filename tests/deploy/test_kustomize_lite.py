"""kustomize_lite refuses what it does not implement instead of rendering it wrongly."""

from __future__ import annotations

from pathlib import Path

import pytest
from kustomize_lite import UnsupportedKustomizationError, render

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
spec:
  selector:
    matchLabels: {app: app}
  template:
    metadata:
      labels: {app: app}
    spec:
      containers:
        - name: app
          image: registry.local:5000/app:1.0
          args: ["a", "b"]
          env:
            - {name: A, value: "1"}
            - {name: B, value: "2"}
"""


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def test_merges_by_key_replaces_atomic_lists_and_sets_images(tmp_path: Path) -> None:
    patch = (
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\nspec:\n  template:\n"
        "    spec:\n      containers:\n        - name: app\n          args: [c]\n"
        "          env:\n            - {name: B, value: '3'}\n            - {name: C, value: '4'}\n"
    )
    kustomization = (
        "resources: [deployment.yaml]\npatches:\n  - path: patch.yaml\nimages:\n"
        "  - {name: 'registry.local:5000/app', newTag: '2.0'}\n"
    )
    directory = _write(
        tmp_path,
        {"deployment.yaml": DEPLOYMENT, "patch.yaml": patch, "kustomization.yaml": kustomization},
    )
    (deployment,) = render(directory)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["c"]
    # kustomize's order (checked with kubectl kustomize 5.5): patch items, then the rest.
    assert container["env"] == [
        {"name": "B", "value": "3"},
        {"name": "C", "value": "4"},
        {"name": "A", "value": "1"},
    ]
    assert container["image"] == "registry.local:5000/app:2.0"  # the port is not a tag


@pytest.mark.parametrize(
    ("kustomization", "message"),
    [
        ("resources: [deployment.yaml]\nnamePrefix: x-\n", "namePrefix"),
        (
            "resources: [deployment.yaml]\npatches:\n  - path: patch.yaml\n"
            "    target: {kind: Deployment}\n",
            "target",
        ),
        ("resources: [deployment.yaml]\npatches:\n  - path: volumes.yaml\n", "no known patch"),
    ],
)
def test_refuses_what_it_does_not_implement(
    tmp_path: Path, kustomization: str, message: str
) -> None:
    volumes = (
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\nspec:\n  template:\n"
        "    spec:\n      hostAliases: [{ip: 10.0.0.1}]\n"
    )
    _write(
        tmp_path,
        {
            "deployment.yaml": DEPLOYMENT.replace(
                "      containers:", "      hostAliases: []\n      containers:"
            ),
            "patch.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\n",
            "volumes.yaml": volumes,
            "kustomization.yaml": kustomization,
        },
    )
    with pytest.raises(UnsupportedKustomizationError, match=message):
        render(tmp_path)
