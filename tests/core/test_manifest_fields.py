"""The manifest field by field, without exporting a model: every section survives the round
trip (to_dict, rmserve.json, load_bundle), and each refusal names its field and its problem,
at the edges of what is accepted (max_length 2, reward_head K-1, token_cost 0, a bool where a
number is expected)."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rmserve.formatting import ChatTemplateFormat
from rmserve.manifest import (
    MANIFEST_NAME,
    Architecture,
    BundleError,
    Evaluation,
    Manifest,
    Normalization,
    Packed,
    Variant,
    load_bundle,
    sha256_file,
)

CONTENTS = {
    "tokenizer.json": b'{"model": "tiny"}',
    "model.onnx": b"fp32 graph",
    "model.int8.onnx": b"int8 graph",
    "model.onnx.data": b"weights",
    "model.packed.onnx": b"packed graph",
}


def digest(name: str) -> str:
    return hashlib.sha256(CONTENTS[name]).hexdigest()


def full_manifest() -> Manifest:
    """A decoder bundle's manifest with every optional section set to a non-default value."""
    return Manifest(
        format_version=2,
        model_name="tiny-decoder",
        base_model="tiny-qwen2 (random)",
        architecture=Architecture(kind="decoder", model_type="qwen2", pooling="last"),
        max_length=2,
        pad_token_id=7,
        padding_side="right",
        truncation="prompt_left",
        text_format=ChatTemplateFormat(
            template="{{ bos_token }}{{ messages }}",
            special_tokens={"bos_token": "<s>"},
            bos_text="<s>",
        ),
        normalization=Normalization(mean=-0.25, std=1.5, n=40, reference="train pairs (40)"),
        evaluation=Evaluation(
            accuracy=0.625, n=20, data="dev", mean_margin=0.125, shorter_wins_accuracy=0.5
        ),
        variants={
            "fp32": Variant("model.onnx", digest("model.onnx"), "fp32", {"max_abs_diff": 3e-6}),
            "int8": Variant(
                "model.int8.onnx",
                digest("model.int8.onnx"),
                "int8",
                {"pairwise_agreement": 0.75, "accuracy_drop": 0.0},
            ),
        },
        tokenizer_sha256=digest("tokenizer.json"),
        created_at="2026-01-02T03:04:05Z",
        rmserve_version="0.1.0",
        labels=("helpfulness", "correctness"),
        reward_head=1,
        files={
            "model.onnx.data": digest("model.onnx.data"),
            "model.packed.onnx": digest("model.packed.onnx"),
        },
        packed=Packed(
            files={"fp32": "model.packed.onnx"},
            skip_token_id=7,
            max_abs_diff={"fp32": 2e-6},
            token_cost=0.0,
        ),
    )


def write_bundle(root: Path, manifest: Manifest) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in CONTENTS.items():
        (root / name).write_bytes(content)
    manifest.write(root)
    return root


def test_every_section_survives_the_round_trip(tmp_path: Path) -> None:
    manifest = full_manifest()
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    bundle = write_bundle(tmp_path / "bundle", manifest)
    assert load_bundle(bundle) == manifest
    assert load_bundle(str(bundle), verify_hashes=False) == manifest
    assert manifest.num_heads == 2
    assert not manifest.is_ensemble
    written = (bundle / MANIFEST_NAME).read_text()
    assert written.endswith("}\n")
    assert json.loads(written)["labels"] == ["helpfulness", "correctness"]


def test_to_dict_is_plain_json_and_the_file_is_written_for_reading(tmp_path: Path) -> None:
    """``to_dict`` holds only JSON types (lists, not tuples: it is what ``GET /v1/models``
    returns), and ``rmserve.json`` is indented by two spaces with the fields in the order of
    the dataclass, format_version first, so that a person reads it and a diff stays small."""
    manifest = full_manifest()
    data = manifest.to_dict()
    assert json.loads(json.dumps(data)) == data
    written = (write_bundle(tmp_path / "bundle", manifest) / MANIFEST_NAME).read_text()
    assert written == json.dumps(data, indent=2) + "\n"
    assert written.startswith('{\n  "format_version": 2,\n  "model_name": "tiny-decoder",\n')
    assert list(json.loads(written)) == list(data)


def test_a_packed_token_cost_survives_the_round_trip() -> None:
    data = full_manifest().to_dict()
    data["packed"]["token_cost"] = 0.375
    packed = Manifest.from_dict(data).packed
    assert packed is not None
    assert packed.token_cost == 0.375


def test_an_older_reader_s_defaults_apply_when_optional_fields_are_absent() -> None:
    data = full_manifest().to_dict()
    for key in ("labels", "reward_head", "files", "packed", "evaluation", "ensemble"):
        data.pop(key)
    data["variants"]["fp32"].pop("parity")
    data["format_version"] = 1
    manifest = Manifest.from_dict(data)
    assert (manifest.labels, manifest.reward_head, manifest.files) == (("reward",), 0, {})
    assert (manifest.packed, manifest.evaluation, manifest.ensemble) == (None, None, None)
    assert manifest.variants["fp32"].parity == {}
    assert manifest.format_version == 2  # read as the current version
    evaluation = full_manifest().to_dict()
    del evaluation["evaluation"]["mean_margin"], evaluation["evaluation"]["shorter_wins_accuracy"]
    parsed = Manifest.from_dict(evaluation).evaluation
    assert parsed == Evaluation(accuracy=0.625, n=20, data="dev")
    packed = full_manifest().to_dict()
    del packed["packed"]["skip_token_id"], packed["packed"]["max_abs_diff"]
    del packed["packed"]["token_cost"]
    assert Manifest.from_dict(packed).packed == Packed(
        files={"fp32": "model.packed.onnx"}, skip_token_id=None, max_abs_diff={}, token_cost=0.0
    )


def test_public_shows_file_names_without_hashes() -> None:
    public = full_manifest().public()
    assert "tokenizer_sha256" not in public
    assert public["files"] == ["model.onnx.data", "model.packed.onnx"]
    assert public["variants"]["fp32"] == {
        "file": "model.onnx",
        "precision": "fp32",
        "parity": {"max_abs_diff": 3e-6},
    }
    assert public["labels"] == ["helpfulness", "correctness"]


def test_sha256_file_reads_files_larger_than_one_chunk(tmp_path: Path) -> None:
    path = tmp_path / "big"
    content = bytes(range(256)) * 8193  # past the 1 MiB read size
    path.write_bytes(content)
    assert sha256_file(path) == hashlib.sha256(content).hexdigest()


def test_load_bundle_names_the_missing_or_changed_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(BundleError, match=rf"^bundle at {re.escape(str(missing))} is not a dir"):
        load_bundle(missing)
    bundle = write_bundle(tmp_path / "bundle", full_manifest())
    (bundle / "model.onnx.data").unlink()
    with pytest.raises(
        BundleError,
        match=rf"^bundle at {re.escape(str(bundle))} is missing model\.onnx\.data, which "
        r"rmserve\.json lists$",
    ):
        load_bundle(bundle, verify_hashes=False)
    (bundle / "model.onnx.data").write_bytes(b"weightz")
    expected, found = digest("model.onnx.data"), hashlib.sha256(b"weightz").hexdigest()
    with pytest.raises(
        BundleError,
        match=rf"model\.onnx\.data does not match its sha256 in rmserve\.json \(expected "
        rf"{expected[:12]}\.\.\., found {found[:12]}\.\.\.\); the file was changed or "
        r"corrupted after export; export the bundle again$",
    ):
        load_bundle(bundle)
    assert load_bundle(bundle, verify_hashes=False) == full_manifest()
    (bundle / "tokenizer.json").write_bytes(b"{}")
    with pytest.raises(BundleError, match=r"tokenizer\.json does not match its sha256"):
        load_bundle(bundle)


def test_a_manifest_that_is_not_json_or_not_an_object_is_refused(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", full_manifest())
    (bundle / MANIFEST_NAME).write_bytes(b"\xff\xfe not text")
    with pytest.raises(BundleError, match=r"rmserve\.json is not valid JSON"):
        load_bundle(bundle)
    (bundle / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(BundleError, match=r"rmserve\.json: the manifest must be a JSON object$"):
        load_bundle(bundle)


Edit = Callable[[dict[str, Any]], None]


def setter(*path_and_value: Any) -> Edit:
    """Set the field at the path (all but the last argument) to the last argument."""
    *path, value = path_and_value

    def edit(data: dict[str, Any]) -> None:
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value

    return edit


def remover(*path: str) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        for key in path[:-1]:
            data = data[key]
        del data[path[-1]]

    return edit


REFUSALS: list[tuple[Edit, str]] = [
    (
        setter("format_version", True),
        r"unknown format_version True; this rmserve reads "
        r"versions 1, 2\. Export the bundle again with this rmserve, or upgrade rmserve$",
    ),
    (setter("format_version", 3), r"unknown format_version 3;"),
    (remover("format_version"), r"unknown format_version None;"),
    (remover("architecture", "kind"), r"missing field architecture\.kind$"),
    (
        setter("architecture", "kind", 1),
        r"field architecture\.kind has the wrong type \(int\)$",
    ),
    (
        setter("architecture", "pooling", "mean"),
        r"architecture\.pooling must be 'first' or 'last', got 'mean'$",
    ),
    (
        setter("architecture", "kind", "seq2seq"),
        r"architecture\.kind must be 'encoder' or 'decoder', got 'seq2seq'$",
    ),
    (setter("architecture", []), r"field architecture has the wrong type \(list\)$"),
    (remover("architecture", "pooling"), r"missing field architecture\.pooling$"),
    (remover("architecture", "model_type"), r"missing field architecture\.model_type$"),
    (setter("max_length", 1), r"max_length must be at least 2, got 1$"),
    (setter("max_length", True), r"field max_length has the wrong type \(bool\)$"),
    (setter("padding_side", "left"), r"padding_side must be 'right', got 'left'$"),
    (
        setter("truncation", "middle"),
        r"unknown truncation policy 'middle'; expected 'prompt_left'$",
    ),
    (
        setter("text_format", {"kind": "text_pair", "separator": 1}),
        r"text_format\.separator must be a string$",
    ),
    (
        setter("labels", ["reward", 1]),
        r"labels must be a non-empty list of strings \(one per model output\)$",
    ),
    (setter("labels", "reward"), r"labels must be a non-empty list of strings"),
    (setter("reward_head", True), r"reward_head must be an integer, got True$"),
    (
        setter("reward_head", 2),
        r"reward_head 2 is not one of the 2 outputs \['helpfulness', 'correctness'\]$",
    ),
    (setter("reward_head", -1), r"reward_head -1 is not one of the 2 outputs"),
    (setter("files", {"": "0"}), r"files must map file names inside the bundle to sha256 hex"),
    (setter("files", {".": "0"}), r"files must map file names inside the bundle"),
    (setter("files", {"..": "0"}), r"files must map file names inside the bundle"),
    (setter("files", {"a/b": "0"}), r"files must map file names inside the bundle"),
    (setter("files", {"x": 1}), r"files must map file names inside the bundle"),
    (setter("files", ["x"]), r"files must map file names inside the bundle"),
    (
        setter("normalization", "std", -1.0),
        r"normalization\.std must be positive, got -1\.0$",
    ),
    (
        setter("normalization", "mean", True),
        r"field normalization\.mean has the wrong type \(bool\)$",
    ),
    (
        setter("normalization", "n", 1.5),
        r"field normalization\.n has the wrong type \(float\)$",
    ),
    (remover("normalization", "reference"), r"missing field normalization\.reference$"),
    (remover("normalization", "std"), r"missing field normalization\.std$"),
    (
        setter("evaluation", "accuracy", "high"),
        r"field evaluation\.accuracy has the wrong type \(str\)$",
    ),
    (
        setter("evaluation", "n", None),
        r"field evaluation\.n has the wrong type \(NoneType\)$",
    ),
    (remover("evaluation", "data"), r"missing field evaluation\.data$"),
    (
        setter("variants", "fp64", {}),
        r"unknown variant 'fp64'; expected one of "
        r"\['fp16', 'fp32', 'int8'\]$",
    ),
    (setter("variants", "fp32", "model.onnx"), r"variants\.fp32 must be an object$"),
    (
        setter("variants", {}),
        r"variants must list at least one model file \(fp32: model\.onnx\)$",
    ),
    (
        setter("variants", "fp32", "parity", {"x": True}),
        r"variants\.fp32\.parity must map names to numbers$",
    ),
    (setter("variants", "fp32", "parity", [1.0]), r"variants\.fp32\.parity must map names"),
    (remover("variants", "int8", "sha256"), r"missing field variants\.int8\.sha256$"),
    (setter("variants", "int8", "file", 3), r"field variants\.int8\.file has the wrong type"),
    (
        setter("architecture", "kind", "encoder"),
        r"packed graphs are for decoders \(the reward at the last token\) only$",
    ),
    (setter("packed", "files", {}), r"packed\.files must map precisions to file names$"),
    (setter("packed", "files", ["model.packed.onnx"]), r"packed\.files must map precisions"),
    (
        setter("packed", "files", {"fp64": "model.packed.onnx"}),
        r"packed\.files\.fp64 must name a file of a known precision$",
    ),
    (
        setter("packed", "files", {"fp32": 1}),
        r"packed\.files\.fp32 must name a file of a known precision$",
    ),
    (
        setter("packed", "files", {"fp32": "model.int8.onnx"}),
        r"packed\.files\.fp32 \(model\.int8\.onnx\) is not listed in files with its sha256$",
    ),
    (
        setter("packed", "skip_token_id", True),
        r"packed\.skip_token_id must be a token id or null, got True$",
    ),
    (setter("packed", "skip_token_id", "7"), r"packed\.skip_token_id must be a token id"),
    (
        setter("packed", "max_abs_diff", {"fp32": "small"}),
        r"packed\.max_abs_diff must map precisions to numbers$",
    ),
    (setter("packed", "max_abs_diff", [0.1]), r"packed\.max_abs_diff must map precisions"),
    (
        setter("packed", "token_cost", -0.5),
        r"packed\.token_cost must be a number >= 0, got -0\.5$",
    ),
    (setter("packed", "token_cost", False), r"packed\.token_cost must be a number >= 0"),
    (setter("packed", []), r"field packed has the wrong type \(list\)$"),
    (remover("model_name"), r"missing field model_name$"),
    (setter("base_model", None), r"field base_model has the wrong type \(NoneType\)$"),
    (setter("pad_token_id", 1.0), r"field pad_token_id has the wrong type \(float\)$"),
    (remover("tokenizer_sha256"), r"missing field tokenizer_sha256$"),
    (remover("created_at"), r"missing field created_at$"),
    (remover("rmserve_version"), r"missing field rmserve_version$"),
]


@pytest.mark.parametrize(("edit", "problem"), REFUSALS)
def test_each_refusal_names_its_field(edit: Edit, problem: str) -> None:
    data = copy.deepcopy(full_manifest().to_dict())
    edit(data)
    with pytest.raises(BundleError, match=r"^bundle/rmserve\.json: " + problem):
        Manifest.from_dict(data, source="bundle/rmserve.json")


def test_the_edges_that_are_accepted() -> None:
    data = full_manifest().to_dict()
    data["packed"]["token_cost"] = 0
    data["packed"]["skip_token_id"] = None
    data["normalization"]["mean"] = 0  # an int where a float is expected
    data["evaluation"] = None
    data["variants"]["fp32"]["parity"] = {"max_abs_diff": 0}
    manifest = Manifest.from_dict(data)
    assert manifest.packed is not None
    assert (manifest.packed.token_cost, manifest.packed.skip_token_id) == (0.0, None)
    assert isinstance(manifest.normalization.mean, float)
    assert isinstance(manifest.variants["fp32"].parity["max_abs_diff"], float)
    assert manifest.evaluation is None
    data["reward_head"] = 0
    assert Manifest.from_dict(data).reward_head == 0
