"""The rules every door shares: strict flags on /v1, lenient ones on the compatibility doors,
and ``normalize`` with the bundle's statistics wherever a door offers it.

The bundles are synthetic (tests/service/synthetic.py) with a normalization of their own,
mean 0.7 and std 0.3: a door that left its rewards raw, or normalized with 0 and 1, fails.
The raw values every expectation starts from are /v1/score's without ``normalize``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from rmserve.manifest import MANIFEST_NAME, ensemble_labels, load_bundle
from tests.service.conftest import RunningServer, serve_app, settings_for
from tests.service.synthetic import ARMO_LABELS, build_bundle

MEAN, STD = 0.7, 0.3  # neither 0 nor 1: normalizing with the wrong statistics shows
PROMPT = "how do I bake bread ?"
RESPONSES = ["mix flour water yeast and salt then knead and bake", "no", "please explain"]
TEXTS = [f"\n\nHuman: {PROMPT}\n\nAssistant: {r}" for r in RESPONSES]  # the transcript's
KINDS = ("one head", "three heads", "ensemble")

V1_BODIES: dict[str, dict[str, Any]] = {
    "/v1/score": {"items": [{"prompt": PROMPT, "response": r} for r in RESPONSES]},
    "/v1/rank": {"prompt": PROMPT, "responses": RESPONSES},
    "/v1/compare": {"prompt": PROMPT, "a": RESPONSES[0], "b": RESPONSES[1]},
}
V1_FLAGS = ("normalize", "truncate_response", "return_members")
# JSON values pydantic's lax mode would read as a boolean; none of them is one.
NOT_BOOLEANS: tuple[Any, ...] = ("yes", "true", 1, "1", 0, "false", "on", 1.0)


def _bundle(out: Path, kind: str) -> Path:
    """A synthetic bundle of ``kind`` whose normalization is MEAN and STD."""
    if kind == "three heads":
        build_bundle(out, labels=ARMO_LABELS, reward_head=1, name="heads", seed=6)
    elif kind == "ensemble":
        build_bundle(out, labels=ensemble_labels(3), name="ensemble", seed=7)
    else:
        build_bundle(out, name="one-head", seed=5)
    path = out / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["normalization"] = {"mean": MEAN, "std": STD, "n": 10, "reference": "made up"}
    if kind == "ensemble":
        manifest["ensemble"] = {
            "members": 3,
            "diversity": "synthetic: one random column per member",
            "member_accuracy": [],
            "member_parity": [0.0] * 3,
            "disagreement": {},
        }
    path.write_text(json.dumps(manifest))
    norm = load_bundle(out).normalization
    assert (norm.mean, norm.std) == (MEAN, STD)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One head, RMSERVE_COMPAT_NORMALIZE off (the default)."""
    bundle = _bundle(tmp_path_factory.mktemp("rules") / "bundle", "one head")
    with serve_app(settings_for(bundle, max_wait_ms=20.0)) as running:
        yield running


@pytest.fixture(scope="module", params=KINDS)
def normalizing(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, RunningServer]]:
    """A server of each kind with RMSERVE_COMPAT_NORMALIZE on."""
    kind: str = request.param
    bundle = _bundle(tmp_path_factory.mktemp("normalizing") / "bundle", kind)
    settings = settings_for(bundle, max_wait_ms=20.0, compat_normalize=True)
    with serve_app(settings) as running:
        yield kind, running


def _post(server: RunningServer, path: str, body: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


def _ok(server: RunningServer, path: str, body: Any) -> dict[str, Any]:
    r = _post(server, path, body)
    assert r.status_code == 200, (path, body, r.text)
    answer: dict[str, Any] = r.json()
    return answer


# --- strict flags on /v1 --------------------------------------------------------------------


@pytest.mark.parametrize("flag", V1_FLAGS)
@pytest.mark.parametrize("path", list(V1_BODIES))
def test_v1_flags_take_json_booleans_only(server: RunningServer, path: str, flag: str) -> None:
    for value in NOT_BOOLEANS:
        r = _post(server, path, {**V1_BODIES[path], flag: value})
        assert r.status_code == 422, (flag, value, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request"
        assert error["message"].startswith(f"{flag}: "), (value, error)
        assert "boolean" in error["message"], (value, error)
    for value in (True, False):
        _ok(server, path, {**V1_BODIES[path], flag: value})


def test_truncate_response_null_is_the_server_default(server: RunningServer) -> None:
    for path, body in V1_BODIES.items():
        _ok(server, path, {**body, "truncate_response": None})


def test_the_schema_shows_the_strict_flags_as_booleans(server: RunningServer) -> None:
    schemas = httpx.get(server.url + "/openapi.json", timeout=10).json()["components"]["schemas"]
    for name in ("ScoreRequest", "RankRequest", "CompareRequest"):
        properties = schemas[name]["properties"]
        assert properties["normalize"]["type"] == "boolean"
        assert properties["return_members"]["type"] == "boolean"
        assert properties["truncate_response"]["anyOf"] == [{"type": "boolean"}, {"type": "null"}]
        for flag in V1_FLAGS:
            assert properties[flag]["description"], (name, flag)


# --- lenient flags on the compatibility doors -----------------------------------------------


@pytest.mark.parametrize("flag", ["use_activation", "activation"])
def test_classify_reads_its_flags_leniently(server: RunningServer, flag: str) -> None:
    """verl and vLLM clients may send a flag as a string or a number: /classify reads them
    as pydantic's lax mode does, as it always has."""
    body = {"input": TEXTS}
    raw = _ok(server, "/classify", {**body, flag: False})["data"]
    activated = _ok(server, "/classify", {**body, flag: True})["data"]
    assert [d["probs"] for d in raw] != [d["probs"] for d in activated]
    for value in ("false", "False", "0", 0, "no", "off", 0.0):
        assert _ok(server, "/classify", {**body, flag: value})["data"] == raw, value
    for value in ("true", "True", "1", 1, "yes", "on", 1.0):
        assert _ok(server, "/classify", {**body, flag: value})["data"] == activated, value
    r = _post(server, "/classify", {**body, flag: "maybe"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith(f"{flag}: ")


@pytest.mark.parametrize("flag", ["add_generation_prompt", "continue_final_message"])
def test_classify_chat_flags_are_lenient_too(server: RunningServer, flag: str) -> None:
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "no"}]
    expected = _ok(server, "/classify", {"messages": messages})["data"][0]["probs"]
    for value in ("false", 0, "0", "off"):
        answer = _ok(server, "/classify", {"messages": messages, flag: value})
        assert answer["data"][0]["probs"] == expected, value
    for value in ("true", 1, "1", "on"):  # read as true: the chat form refuses it
        r = _post(server, "/classify", {"messages": messages, flag: value})
        assert r.status_code == 422, (value, r.text)
        assert f"{flag}=true" in r.json()["error"]["message"]


# --- normalize on every door ----------------------------------------------------------------


def _scaled(values: Any) -> npt.NDArray[np.float64]:
    return (np.asarray(values, dtype=np.float64) - MEAN) / STD


def _differs(normalized: npt.NDArray[np.float64], raw: Any) -> None:
    """The normalization must move the values: else the test would prove nothing."""
    assert not np.allclose(normalized, np.asarray(raw, dtype=np.float64), atol=1e-3)


def test_every_v1_door_normalizes_with_the_bundle_statistics(
    normalizing: tuple[str, RunningServer],
) -> None:
    kind, server = normalizing
    body = V1_BODIES["/v1/score"]
    raw = _ok(server, "/v1/score", {**body, "return_members": True})
    expected = _scaled(raw["scores"])
    _differs(expected, raw["scores"])
    members = _scaled(raw["members"])
    std = np.asarray(raw["std"]) / STD
    if kind == "ensemble":
        assert np.asarray(raw["std"]).min() > 1e-3  # the members disagree: std is checked
    else:
        np.testing.assert_allclose(members[:, 0], expected, atol=1e-5)  # one member: the reward

    asked = {"normalize": True, "return_members": True}
    score = _ok(server, "/v1/score", {**body, **asked})
    np.testing.assert_allclose(score["scores"], expected, atol=1e-5)
    np.testing.assert_allclose(score["std"], std, atol=1e-5)
    np.testing.assert_allclose(score["members"], members, atol=1e-5)
    assert score.get("head_scores") == raw.get("head_scores")  # every head stays raw

    rank = _ok(server, "/v1/rank", {**V1_BODIES["/v1/rank"], **asked})
    np.testing.assert_allclose(rank["scores"], expected, atol=1e-5)
    order = [int(i) for i in np.argsort(-expected, kind="stable")]
    assert [e["index"] for e in rank["ranking"]] == order
    np.testing.assert_allclose([e["score"] for e in rank["ranking"]], expected[order], atol=1e-5)
    np.testing.assert_allclose(rank["std"], std, atol=1e-5)
    np.testing.assert_allclose(rank["members"], members, atol=1e-5)

    compare = _ok(server, "/v1/compare", {**V1_BODIES["/v1/compare"], **asked})
    np.testing.assert_allclose(compare["scores"], expected[:2], atol=1e-5)
    np.testing.assert_allclose(compare["std"], std[:2], atol=1e-5)
    np.testing.assert_allclose(compare["members"], members[:2], atol=1e-5)
    # The preference stays the Bradley-Terry probability of the raw rewards.
    diff = raw["scores"][0] - raw["scores"][1]
    assert compare["p_a_preferred"] == pytest.approx(1 / (1 + math.exp(-diff)), abs=1e-5)

    plain = _ok(server, "/v1/score", body)  # normalize false: the raw rewards
    np.testing.assert_allclose(plain["scores"], raw["scores"], atol=1e-5)


def test_every_compat_door_normalizes_under_compat_normalize(
    normalizing: tuple[str, RunningServer],
) -> None:
    kind, server = normalizing
    raw = _ok(server, "/v1/score", V1_BODIES["/v1/score"])
    expected = _scaled(raw["scores"])
    _differs(expected, raw["scores"])

    openrlhf = _ok(server, "/get_reward", {"query": TEXTS})
    np.testing.assert_allclose(openrlhf["rewards"], expected, atol=1e-5)
    np.testing.assert_allclose(openrlhf["scores"], expected, atol=1e-5)
    if kind == "ensemble":  # the members' spread on the scale of the rewards
        np.testing.assert_allclose(
            openrlhf["extra_logs"]["reward_std"], np.asarray(raw["std"]) / STD, atol=1e-5
        )

    values = _ok(server, "/classify", {"input": TEXTS, "use_activation": False})["data"]
    probs = _ok(server, "/classify", {"input": TEXTS})["data"]
    if kind == "three heads":  # K classes: the logits a softmax compares are never normalized
        np.testing.assert_allclose([d["probs"] for d in values], raw["head_scores"], atol=1e-5)
        assert [d["num_classes"] for d in probs] == [3] * len(TEXTS)
    else:  # one reward (an ensemble's aggregate): normalized, then its sigmoid
        np.testing.assert_allclose([d["probs"] for d in values], expected[:, None], atol=1e-5)
        np.testing.assert_allclose(
            [d["probs"] for d in probs], 1 / (1 + np.exp(-expected[:, None])), atol=1e-5
        )
        assert [d["num_classes"] for d in probs] == [1] * len(TEXTS)

    slime = _ok(server, "/slime/reward", {"prompt": PROMPT, "response": RESPONSES[0]})
    assert slime["reward"] == pytest.approx(expected[0], abs=1e-5)
    assert slime["score"] == slime["reward"]
    if kind == "ensemble":
        assert slime["std"] == pytest.approx(raw["std"][0] / STD, abs=1e-5)
    if kind == "three heads":  # each head under its label, raw
        heads = dict(zip(ARMO_LABELS, raw["head_scores"][0], strict=True))
        assert {label: slime[label] for label in ARMO_LABELS} == pytest.approx(heads, abs=1e-5)


def test_compat_doors_answer_raw_rewards_by_default(server: RunningServer) -> None:
    raw = _ok(server, "/v1/score", V1_BODIES["/v1/score"])["scores"]
    _differs(_scaled(raw), raw)
    np.testing.assert_allclose(
        _ok(server, "/get_reward", {"query": TEXTS})["rewards"], raw, atol=1e-5
    )
    values = _ok(server, "/classify", {"input": TEXTS, "use_activation": False})["data"]
    np.testing.assert_allclose([d["probs"][0] for d in values], raw, atol=1e-5)
    slime = _ok(server, "/slime/reward", {"prompt": PROMPT, "response": RESPONSES[0]})
    assert slime["reward"] == pytest.approx(raw[0], abs=1e-5)
