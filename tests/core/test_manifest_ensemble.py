"""The manifest's ensemble section (issue 13): round trip, and refusals that name the problem.

An ensemble bundle is one graph of K output columns; the service averages them, so the
manifest must say that the outputs are members, how many, and which column is which.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rmserve.manifest import BundleError, Ensemble, Manifest, ensemble_labels, load_bundle

MEMBERS = 3
SECTION: dict[str, Any] = {
    "members": MEMBERS,
    "diversity": "shared backbone, one linear head per member, each on its own bootstrap",
    "member_accuracy": [0.61, 0.6, 0.625],
    "member_parity": [1e-7, 2e-7, 1.5e-7],
    "disagreement": {"mean_std": 0.04, "split_pairs": 0.2},
}


@pytest.fixture
def ensemble_dict(tiny_encoder_bundle: Path) -> dict[str, Any]:
    """A real bundle's manifest turned into an ensemble of 3 (labels and section)."""
    data = load_bundle(tiny_encoder_bundle).to_dict()
    data["labels"] = list(ensemble_labels(MEMBERS))
    data["ensemble"] = json.loads(json.dumps(SECTION))
    return data


def test_round_trip(ensemble_dict: dict[str, Any]) -> None:
    manifest = Manifest.from_dict(ensemble_dict)
    assert manifest.is_ensemble
    assert manifest.ensemble == Ensemble(
        members=MEMBERS,
        diversity=SECTION["diversity"],
        member_accuracy=(0.61, 0.6, 0.625),
        member_parity=(1e-7, 2e-7, 1.5e-7),
        disagreement={"mean_std": 0.04, "split_pairs": 0.2},
    )
    assert manifest.num_heads == MEMBERS
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again == manifest
    assert manifest.to_dict()["ensemble"]["member_parity"] == SECTION["member_parity"]
    assert manifest.public()["ensemble"]["members"] == MEMBERS


def test_no_section_is_not_an_ensemble(ensemble_dict: dict[str, Any]) -> None:
    """Absent or null: a model of K heads (format version 2 bundles before issue 13)."""
    for absent in ({}, {"ensemble": None}):
        data = {k: v for k, v in ensemble_dict.items() if k != "ensemble"} | absent
        manifest = Manifest.from_dict(data)
        assert manifest.ensemble is None
        assert not manifest.is_ensemble
        assert manifest.num_heads == MEMBERS
        assert "ensemble" in manifest.to_dict()  # written as null
        assert manifest.format_version == 2


def test_no_eval_set_means_no_member_accuracy(ensemble_dict: dict[str, Any]) -> None:
    ensemble_dict["ensemble"] |= {"member_accuracy": [], "disagreement": {}}
    ensemble = Manifest.from_dict(ensemble_dict).ensemble
    assert ensemble is not None
    assert (ensemble.member_accuracy, ensemble.disagreement) == ((), {})


@pytest.mark.parametrize(
    ("section", "labels", "problem"),
    [
        ({"members": 1}, None, "members must be an integer of at least 2, got 1"),
        ({"members": True}, None, "members must be an integer of at least 2"),
        ({"members": "3"}, None, "members must be an integer of at least 2"),
        ({"members": 4}, None, "an ensemble of 4 members must have the labels"),
        ({}, ["a", "b", "c"], r"must have the labels \['member_0', 'member_1', 'member_2'\]"),
        ({}, ["member_0", "member_1"], "one output column per member"),
        ({"diversity": ""}, None, "diversity must say in words how the members differ$"),
        ({"diversity": 3}, None, "diversity must say in words"),
        ({"member_accuracy": [0.5, 0.5]}, None, "member_accuracy has 2 values; expected 0 or 3"),
        ({"member_accuracy": [0.5, "x", 0.5]}, None, "member_accuracy must be a list of numbers"),
        ({"member_accuracy": [0.5, True, 0.5]}, None, "must be a list of numbers"),
        ({"member_parity": []}, None, "member_parity has 0 values; expected 3"),
        ({"member_parity": None}, None, "member_parity must be a list of numbers"),
        ({"disagreement": {"mean_std": "high"}}, None, "disagreement must map names to numbers"),
        ({"disagreement": None}, None, "disagreement must map names to numbers$"),
    ],
)
def test_refusals_name_the_problem(
    ensemble_dict: dict[str, Any],
    section: dict[str, Any],
    labels: list[str] | None,
    problem: str,
) -> None:
    ensemble_dict["ensemble"] |= section
    if labels is not None:
        ensemble_dict["labels"] = labels
    with pytest.raises(BundleError, match=problem):
        Manifest.from_dict(ensemble_dict, source="b/rmserve.json")


def test_a_section_that_is_not_an_object_is_refused(ensemble_dict: dict[str, Any]) -> None:
    ensemble_dict["ensemble"] = [MEMBERS]
    with pytest.raises(BundleError, match="field ensemble has the wrong type"):
        Manifest.from_dict(ensemble_dict)


def test_two_members_is_the_smallest_ensemble(ensemble_dict: dict[str, Any]) -> None:
    ensemble_dict["labels"] = list(ensemble_labels(2))
    ensemble_dict["ensemble"] |= {
        "members": 2,
        "member_accuracy": [0.6, 0.625],
        "member_parity": [1e-7, 2e-7],
    }
    ensemble = Manifest.from_dict(ensemble_dict).ensemble
    assert ensemble is not None
    assert ensemble.members == 2


def test_to_dict_writes_the_section_as_plain_json(ensemble_dict: dict[str, Any]) -> None:
    """Lists, not tuples, under the section's own keys: what ``GET /v1/models`` returns."""
    section = Manifest.from_dict(ensemble_dict).to_dict()["ensemble"]
    assert section == SECTION
    assert json.loads(json.dumps(section)) == section
