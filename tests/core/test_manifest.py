"""The bundle manifest: round trip, and refusals that name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rmserve.manifest import MANIFEST_NAME, BundleError, Manifest, load_bundle


@pytest.fixture
def bundle_copy(tiny_encoder_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_encoder_bundle, tmp_path / "bundle"))


def _edit(bundle: Path, **changes: object) -> None:
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_round_trip(tiny_encoder_bundle: Path) -> None:
    manifest = load_bundle(tiny_encoder_bundle)
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again == manifest
    public = manifest.public()
    assert "tokenizer_sha256" not in public
    assert all("sha256" not in v for v in public["variants"].values())


def test_missing_and_malformed(bundle_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(tmp_path / "nope")
    (bundle_copy / MANIFEST_NAME).write_text("{oops")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)
    (bundle_copy / MANIFEST_NAME).unlink()
    with pytest.raises(BundleError, match=r"has no rmserve\.json; run `rmserve export"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"format_version": 99}, "unknown format_version 99"),
        ({"max_length": 1}, "max_length must be at least 2"),
        ({"padding_side": "left"}, "padding_side must be 'right'"),
        ({"truncation": "middle"}, "unknown truncation policy"),
        ({"pad_token_id": "zero"}, "pad_token_id has the wrong type"),
        ({"architecture": {"kind": "both", "model_type": "x", "pooling": "first"}}, "kind"),
        ({"normalization": {"mean": 0, "std": 0, "n": 1, "reference": "x"}}, "std must be"),
        ({"variants": {}}, "must list at least one model file"),
        ({"text_format": {"speaker": "x"}}, "unknown text_format fields"),
        ({"text_format": {"kind": "jinja"}}, "unknown text_format kind 'jinja'"),
        ({"text_format": {"kind": "chat_template", "template": ""}}, "template must be"),
        (
            {"text_format": {"kind": "chat_template", "template": "x", "special_tokens": [1]}},
            "special_tokens must map names to strings",
        ),
        ({"labels": []}, "labels must be a non-empty list"),
        ({"reward_head": 2}, "reward_head 2 is not one of the 1 outputs"),
        ({"files": {"../escape": "0" * 64}}, "files must map file names inside the bundle"),
    ],
)
def test_bad_fields(bundle_copy: Path, changes: dict[str, object], problem: str) -> None:
    _edit(bundle_copy, **changes)
    with pytest.raises(BundleError, match=problem):
        load_bundle(bundle_copy)


def test_changed_model_file_is_refused(bundle_copy: Path) -> None:
    with open(bundle_copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match its sha256"):
        load_bundle(bundle_copy)
    load_bundle(bundle_copy, verify_hashes=False)  # the check can be skipped explicitly
    (bundle_copy / "model.int8.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing model\.int8\.onnx"):
        load_bundle(bundle_copy, verify_hashes=False)


def test_version_1_bundles_are_still_read(bundle_copy: Path) -> None:
    # What rmserve wrote before chat templates, heads and external data files existed.
    path = bundle_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    for key in ("labels", "reward_head", "files"):
        data.pop(key)
    data["format_version"] = 1
    data["text_format"].pop("kind")
    path.write_text(json.dumps(data))
    manifest = load_bundle(bundle_copy)
    assert manifest.labels == ("reward",)
    assert manifest.reward_head == 0
    assert manifest.text_format == load_bundle(bundle_copy).text_format


def test_every_listed_file_is_hashed(bundle_copy: Path) -> None:
    from rmserve.manifest import sha256_file

    extra = bundle_copy / "model.onnx.data"
    extra.write_bytes(b"weights")
    _edit(bundle_copy, files={"model.onnx.data": sha256_file(extra)})
    load_bundle(bundle_copy)
    extra.write_bytes(b"weightz")
    with pytest.raises(BundleError, match=r"model\.onnx\.data does not match its sha256"):
        load_bundle(bundle_copy)
    extra.unlink()
    with pytest.raises(BundleError, match=r"missing model\.onnx\.data"):
        load_bundle(bundle_copy)
