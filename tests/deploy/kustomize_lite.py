"""A small, exact subset of kustomize, to render k8s/ where no kustomize binary is installed.

It implements only what the manifests in k8s/ use, and refuses everything else by name
(``UnsupportedKustomizationError``) rather than guessing:

- ``resources``: YAML files and directories holding a kustomization;
- ``components`` (``kind: Component``): their resources are added, then their patches run on
  everything accumulated so far, as kustomize does;
- ``patches`` with ``path`` or inline ``patch``: strategic-merge patches, matched to the one
  object with the patch's kind and name. Maps merge recursively, ``null`` deletes a key, a
  top-level ``$patch: delete`` deletes the object, and lists follow the Kubernetes patch
  strategy of that field: merged by their patch merge key (containers by name, volumeMounts by
  mountPath, ...; the patch's items first, then the others, as kustomize orders them) or
  replaced whole when the field is atomic. A list field that is in neither
  table is refused, so the renderer cannot silently diverge from kustomize;
- ``images``: ``newName`` / ``newTag`` / ``digest`` for containers and init containers.

When kubectl (or kustomize) is installed, tests/deploy/test_k8s.py renders every overlay with
both and asserts that the objects are equal, which keeps this module honest.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

__all__ = ["UnsupportedKustomizationError", "object_id", "render"]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = frozenset({"apiVersion", "kind", "resources", "components", "patches", "images"})
SUPPORTED_PATCH_FIELDS = frozenset({"path", "patch"})

# Strategic-merge strategy of the list fields the overlays patch, from the Kubernetes API's
# patchMergeKey / listType markers. Paths are dotted from the object root; "[]" is a list item.
POD_SPEC_PATHS = ("spec.template.spec", "spec.jobTemplate.spec.template.spec", "spec")
_POD_LIST_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "imagePullSecrets": "name",
    "containers[].env": "name",
    "initContainers[].env": "name",
    "containers[].ports": "containerPort",
    "initContainers[].ports": "containerPort",
    "containers[].volumeMounts": "mountPath",
    "initContainers[].volumeMounts": "mountPath",
}
_POD_ATOMIC_LISTS = frozenset(
    {
        "tolerations",
        "containers[].command",
        "containers[].args",
        "containers[].envFrom",
        "containers[].securityContext.capabilities.drop",
        "containers[].securityContext.capabilities.add",
        "initContainers[].command",
        "initContainers[].args",
        "initContainers[].envFrom",
        "initContainers[].securityContext.capabilities.drop",
        "initContainers[].securityContext.capabilities.add",
    }
)
MERGE_KEYS: dict[str, str] = {
    f"spec.template.spec.{path}": key for path, key in _POD_LIST_MERGE_KEYS.items()
} | {"spec.ports": "port"}  # Service ports
ATOMIC_LISTS: frozenset[str] = frozenset(
    {f"spec.template.spec.{path}" for path in _POD_ATOMIC_LISTS}
    | {
        "spec.metrics",  # HorizontalPodAutoscaler: listType=atomic
        "spec.accessModes",  # PersistentVolumeClaim
        "spec.ingress",  # NetworkPolicy: atomic in the API
        "spec.egress",
    }
)


class UnsupportedKustomizationError(ValueError):
    """The kustomization uses a feature this renderer does not implement."""


def object_id(obj: dict[str, Any]) -> tuple[str, str, str]:
    """(apiVersion, kind, name): how the renderer and the tests tell objects apart."""
    return (str(obj["apiVersion"]), str(obj["kind"]), str(obj["metadata"]["name"]))


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build DIRECTORY`` would print, in resource order."""
    return _build(Path(directory), accumulated=[], as_component=False)


def _load_kustomization(directory: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            data = yaml.safe_load(path.read_text())
            break
    else:
        raise FileNotFoundError(f"{directory} holds no kustomization.yaml")
    if not isinstance(data, dict):
        raise UnsupportedKustomizationError(f"{path} is not a mapping")
    unknown = set(data) - SUPPORTED_FIELDS
    if unknown:
        raise UnsupportedKustomizationError(
            f"{path} uses {sorted(unknown)}; kustomize_lite supports only "
            f"{sorted(SUPPORTED_FIELDS)}: install kubectl or extend kustomize_lite"
        )
    return data


def _load_objects(path: Path) -> list[dict[str, Any]]:
    objects = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for obj in objects:
        if not isinstance(obj, dict) or "kind" not in obj or "metadata" not in obj:
            raise UnsupportedKustomizationError(f"{path} holds a document that is not an object")
    return objects


def _build(
    directory: Path, accumulated: list[dict[str, Any]], *, as_component: bool
) -> list[dict[str, Any]]:
    kustomization = _load_kustomization(directory)
    kind = kustomization.get("kind", "Kustomization")
    expected = "Component" if as_component else "Kustomization"
    if kind != expected:
        raise UnsupportedKustomizationError(f"{directory} is a {kind}, expected a {expected}")

    objects = list(accumulated)
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects.extend(
            _build(path, [], as_component=False) if path.is_dir() else _load_objects(path)
        )
    for entry in kustomization.get("components", []):
        objects = _build(directory / entry, objects, as_component=True)
    for patch in kustomization.get("patches", []):
        objects = _apply_patch_entry(directory, patch, objects)
    for image in kustomization.get("images", []):
        _apply_image(image, objects)

    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        if object_id(obj) in seen:
            raise UnsupportedKustomizationError(f"{directory}: {object_id(obj)} is defined twice")
        seen.add(object_id(obj))
    return objects


def _apply_patch_entry(
    directory: Path, entry: dict[str, Any], objects: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    unknown = set(entry) - SUPPORTED_PATCH_FIELDS
    if unknown:
        raise UnsupportedKustomizationError(
            f"patch entry in {directory} uses {sorted(unknown)} (e.g. target); kustomize_lite "
            "matches strategic-merge patches by their own kind and name only"
        )
    if "path" in entry:
        documents = _load_objects(directory / entry["path"])
    else:
        documents = [doc for doc in yaml.safe_load_all(entry["patch"]) if doc]
    for patch in documents:
        if not isinstance(patch, dict):
            raise UnsupportedKustomizationError(
                f"patch in {directory} is not a strategic-merge patch (JSON 6902 lists are "
                "not supported)"
            )
        objects = _apply_strategic_merge(patch, objects)
    return objects


def _apply_strategic_merge(
    patch: dict[str, Any], objects: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    kind, name = patch["kind"], patch["metadata"]["name"]
    matches = [
        i
        for i, obj in enumerate(objects)
        if obj["kind"] == kind and obj["metadata"]["name"] == name
    ]
    if len(matches) != 1:
        raise UnsupportedKustomizationError(
            f"patch for {kind}/{name} matches {len(matches)} objects"
        )
    index = matches[0]
    if patch.get("$patch") == "delete":
        return objects[:index] + objects[index + 1 :]
    body = {key: value for key, value in patch.items() if key not in ("apiVersion", "kind")}
    merged = copy.deepcopy(objects[index])
    _merge_map(merged, body, path="")
    return [*objects[:index], merged, *objects[index + 1 :]]


def _merge_map(target: dict[str, Any], patch: dict[str, Any], path: str) -> None:
    for key, value in patch.items():
        if key.startswith("$"):
            raise UnsupportedKustomizationError(
                f"directive {key} at {path or '<root>'} is not supported"
            )
        child = f"{path}.{key}" if path else key
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_map(target[key], value, child)
        elif isinstance(value, list) and isinstance(target.get(key), list):
            target[key] = _merge_list(target[key], value, child)
        else:
            target[key] = _strip_nulls(copy.deepcopy(value))


def _merge_list(target: list[Any], patch: list[Any], path: str) -> list[Any]:
    if path in ATOMIC_LISTS:
        return list(_strip_nulls(copy.deepcopy(patch)))
    if path not in MERGE_KEYS:
        raise UnsupportedKustomizationError(
            f"list {path} has no known patch strategy in kustomize_lite; add it to MERGE_KEYS "
            "or ATOMIC_LISTS after checking the Kubernetes API's patchMergeKey"
        )
    merge_key = MERGE_KEYS[path]
    # kustomize's order: the patch's items first, in patch order (merged into their base
    # item when one has the same key), then the base items the patch does not name.
    remaining = copy.deepcopy(target)
    merged: list[Any] = []
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise UnsupportedKustomizationError(f"item of {path} lacks its merge key {merge_key}")
        found = [existing for existing in remaining if existing.get(merge_key) == item[merge_key]]
        remaining = [
            existing for existing in remaining if existing.get(merge_key) != item[merge_key]
        ]
        directive = item.get("$patch")
        if directive == "delete":
            continue
        if directive is not None:
            raise UnsupportedKustomizationError(f"$patch: {directive} in {path} is not supported")
        if found:
            _merge_map(found[0], item, f"{path}[]")
            merged.append(found[0])
        else:
            merged.append(_strip_nulls(copy.deepcopy(item)))
    return merged + remaining


def _strip_nulls(value: Any) -> Any:
    """A new map or list item from a patch carries no ``null`` deletions into the output."""
    if isinstance(value, dict):
        return {key: _strip_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_strip_nulls(item) for item in value]
    return value


def _split_image(image: str) -> tuple[str, str, str]:
    """(name, ":tag" or "", "@digest" or ""); a registry port's colon is not a tag."""
    name, digest = ([*image.split("@", 1), ""])[:2]
    digest = f"@{digest}" if digest else ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon:], digest
    return name, "", digest


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    specs = []
    for path in POD_SPEC_PATHS:
        node: Any = obj
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and ("containers" in node or "initContainers" in node):
            specs.append(node)
    return specs


def _apply_image(entry: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    unknown = set(entry) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise UnsupportedKustomizationError(f"images entry uses {sorted(unknown)}")
    for obj in objects:
        for spec in _pod_specs(obj):
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                name, tag, digest = _split_image(container["image"])
                if name != entry["name"]:
                    continue
                name = entry.get("newName", name)
                if "newTag" in entry:
                    tag, digest = f":{entry['newTag']}", ""
                if "digest" in entry:
                    tag, digest = "", f"@{entry['digest']}"
                container["image"] = f"{name}{tag}{digest}"
