"""Ensemble bundles served: the aggregate as ``scores``, the members' ``std``, the members on
request, on every door; and a single model as an ensemble of one.

The bundle is synthetic (tests/service/synthetic.py): a graph of K output columns, whose
manifest says they are the K members of an ensemble. Every aggregate is checked against numpy
on the members the server itself returns, and the members against onnxruntime run on each
item alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest

from rmserve.manifest import ensemble_labels, load_bundle
from rmserve.service.tokenization import ItemInput
from tests.service.conftest import RunningServer, serve_app, settings_for
from tests.service.synthetic import build_bundle
from tests.service.test_heads import reference

MEMBERS = 4
PROMPT = "how do I bake bread ?"
RESPONSES = ["mix flour water yeast and salt then knead and bake", "no", "please explain", "yes"]


@pytest.fixture(scope="module")
def ensemble_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = build_bundle(
        tmp_path_factory.mktemp("ensemble") / "bundle",
        labels=ensemble_labels(MEMBERS),
        name="ensemble-of-4",
        seed=3,
    )
    path = out / "rmserve.json"
    manifest = json.loads(path.read_text())
    manifest["ensemble"] = {
        "members": MEMBERS,
        "diversity": "synthetic: one random column per member",
        "member_accuracy": [],
        "member_parity": [0.0] * MEMBERS,
        "disagreement": {},
    }
    path.write_text(json.dumps(manifest))
    assert load_bundle(out).ensemble is not None
    return out


@pytest.fixture(scope="module")
def server(ensemble_bundle: Path) -> Iterator[RunningServer]:
    with serve_app(settings_for(ensemble_bundle, max_wait_ms=20.0)) as running:
        yield running


def post(server: RunningServer, path: str, body: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


def pairs(responses: list[str] = RESPONSES) -> list[dict[str, str]]:
    return [{"prompt": PROMPT, "response": r} for r in responses]


def test_members_are_the_graph_columns_and_differ(
    server: RunningServer, ensemble_bundle: Path
) -> None:
    answer = post(server, "/v1/score", {"items": pairs(), "return_members": True}).json()
    members = np.asarray(answer["members"])
    assert members.shape == (len(RESPONSES), MEMBERS)
    alone = reference(ensemble_bundle, [ItemInput(prompt=PROMPT, response=r) for r in RESPONSES])
    np.testing.assert_allclose(members, alone, atol=1e-5)  # batch-invariant, per member
    assert np.ptp(members, axis=1).min() > 1e-3  # the members really disagree


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, lambda m: m.mean(axis=1)),
        ({"aggregate": "mean"}, lambda m: m.mean(axis=1)),
        ({"aggregate": "min"}, lambda m: m.min(axis=1)),
        ({"aggregate": "uwo"}, lambda m: m.mean(axis=1) - 1.0 * m.var(axis=1)),
        ({"aggregate": "uwo", "uwo_lambda": 2.5}, lambda m: m.mean(axis=1) - 2.5 * m.var(axis=1)),
        ({"aggregate": "uwo", "uwo_lambda": 0}, lambda m: m.mean(axis=1)),
    ],
)
def test_every_aggregate_equals_numpy_on_the_members(
    server: RunningServer, body: dict[str, Any], expected: Any
) -> None:
    answer = post(server, "/v1/score", {"items": pairs(), "return_members": True, **body})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    members = np.asarray(data["members"], dtype=np.float64)
    assert data["aggregate"] == body.get("aggregate", "mean")
    np.testing.assert_allclose(data["scores"], expected(members), atol=1e-5)
    np.testing.assert_allclose(data["std"], members.std(axis=1), atol=1e-5)


def test_rank_and_compare_use_the_aggregate(server: RunningServer) -> None:
    members = np.asarray(
        post(server, "/v1/score", {"items": pairs(), "return_members": True}).json()["members"]
    )
    worst = members.min(axis=1)
    ranked = post(
        server, "/v1/rank", {"prompt": PROMPT, "responses": RESPONSES, "aggregate": "min"}
    ).json()
    assert [e["index"] for e in ranked["ranking"]] == list(np.argsort(-worst, kind="stable"))
    np.testing.assert_allclose(ranked["std"], members.std(axis=1), atol=1e-5)
    compared = post(
        server,
        "/v1/compare",
        {"prompt": PROMPT, "a": RESPONSES[0], "b": RESPONSES[1], "aggregate": "min"},
    ).json()
    np.testing.assert_allclose(compared["scores"], worst[:2], atol=1e-5)
    diff = worst[0] - worst[1]
    assert compared["p_a_preferred"] == pytest.approx(1 / (1 + math.exp(-diff)), abs=1e-5)


def test_normalize_scales_scores_std_and_members_alike(
    server: RunningServer, ensemble_bundle: Path
) -> None:
    norm = load_bundle(ensemble_bundle).normalization
    raw = post(server, "/v1/score", {"items": pairs(), "return_members": True}).json()
    scaled = post(
        server, "/v1/score", {"items": pairs(), "return_members": True, "normalize": True}
    ).json()
    np.testing.assert_allclose(
        scaled["scores"], (np.asarray(raw["scores"]) - norm.mean) / norm.std, atol=1e-5
    )
    np.testing.assert_allclose(scaled["std"], np.asarray(raw["std"]) / norm.std, atol=1e-5)
    np.testing.assert_allclose(
        scaled["members"], (np.asarray(raw["members"]) - norm.mean) / norm.std, atol=1e-5
    )


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"aggregate": "median"}, "aggregate"),
        ({"aggregate": "uwo", "uwo_lambda": -1}, "uwo_lambda"),
        ({"aggregate": "uwo", "uwo_lambda": "a lot"}, "uwo_lambda"),
        ({"aggregate": "uwo", "uwo_lambda": float("nan")}, "uwo_lambda"),
        ({"aggregate": "uwo", "uwo_lambda": float("inf")}, "uwo_lambda"),
        ({"aggregate": "min", "uwo_lambda": 1.0}, "uwo_lambda applies to the uwo aggregate"),
        ({"uwo_lambda": 1.0}, "uwo_lambda applies to the uwo aggregate"),
        ({"return_members": "yes please"}, "return_members"),
    ],
)
def test_bad_ensemble_options_are_422_and_lose_nothing_else(
    server: RunningServer, extra: dict[str, Any], needle: str
) -> None:
    body = json.dumps({"items": pairs(), **extra})  # json.dumps writes NaN and Infinity
    r = httpx.post(
        server.url + "/v1/score",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]["message"]
    assert post(server, "/v1/score", {"items": pairs()}).status_code == 200


def test_return_members_past_the_limits_is_413_and_loses_nothing_else(
    ensemble_bundle: Path,
) -> None:
    """The members matrix grows with the request, so the request limits bound it: a request
    of more items or more bytes than the server takes is refused whole with the limit in the
    message, while a request at the limit, sent at the same time, gets its [n, K] members."""
    limits = {"max_items_per_request": 8, "max_request_bytes": 4096, "max_wait_ms": 20.0}
    with serve_app(settings_for(ensemble_bundle, **limits)) as running:
        at_limit = {"items": pairs(RESPONSES * 2), "return_members": True}
        too_many = {"items": pairs(RESPONSES * 3), "return_members": True}
        too_big = {"items": [{"text": "x" * 5000}], "return_members": True}
        with ThreadPoolExecutor(3) as pool:
            answers = list(
                pool.map(
                    lambda body: post(running, "/v1/score", body), [too_many, at_limit, too_big]
                )
            )
        assert answers[0].status_code == 413, answers[0].text
        assert "limit is 8" in answers[0].json()["error"]["message"]
        assert answers[2].status_code == 413, answers[2].text
        assert "4096 bytes" in answers[2].json()["error"]["message"]
        assert answers[1].status_code == 200, answers[1].text
        members = np.asarray(answers[1].json()["members"])
        assert members.shape == (8, MEMBERS)
        np.testing.assert_allclose(answers[1].json()["std"], members.std(axis=1), atol=1e-5)


def test_compat_doors_answer_the_server_aggregate_and_the_std(
    ensemble_bundle: Path,
) -> None:
    texts = [f"\n\nHuman: {PROMPT}\n\nAssistant: {r}" for r in RESPONSES]
    settings = settings_for(ensemble_bundle, ensemble_aggregate="uwo", uwo_lambda=0.5)
    with serve_app(settings) as running:
        data = post(running, "/v1/score", {"items": pairs(), "return_members": True}).json()
        members = np.asarray(data["members"], dtype=np.float64)
        uwo = members.mean(axis=1) - 0.5 * members.var(axis=1)
        assert data["aggregate"] == "uwo"
        np.testing.assert_allclose(data["scores"], uwo, atol=1e-5)
        # OpenRLHF: the aggregate, and the std in extra_logs so that it is logged.
        openrlhf = post(running, "/get_reward", {"query": texts}).json()
        np.testing.assert_allclose(openrlhf["rewards"], uwo, atol=1e-5)
        np.testing.assert_allclose(
            openrlhf["extra_logs"]["reward_std"], members.std(axis=1), atol=1e-5
        )
        # verl (/classify): one probability per text, the sigmoid of the aggregate.
        classify = post(running, "/classify", {"input": texts}).json()["data"]
        assert [d["num_classes"] for d in classify] == [1] * len(texts)
        np.testing.assert_allclose(
            [d["probs"][0] for d in classify], 1 / (1 + np.exp(-uwo)), atol=1e-5
        )
        # slime: reward is the aggregate; std and each member are keys --reward-key can pick.
        slime = post(running, "/slime/reward", {"prompt": PROMPT, "response": RESPONSES[0]})
        answer = slime.json()
        assert answer["reward"] == pytest.approx(uwo[0], abs=1e-5)
        assert answer["std"] == pytest.approx(members[0].std(), abs=1e-5)
        assert answer["member_3"] == pytest.approx(members[0, 3], abs=1e-5)
        # The mean std of scored items: rmserve_member_std_sum / _count.
        count = running.metric("rmserve_member_std_count")
        total = running.metric("rmserve_member_std_sum")
        assert count == 3 * len(RESPONSES) + 1
        expected = 3 * members.std(axis=1).sum() + members[0].std()
        assert total == pytest.approx(expected, rel=1e-4)


def test_a_single_model_is_an_ensemble_of_one(tmp_path: Path) -> None:
    bundle = build_bundle(tmp_path / "one", name="one")
    with serve_app(settings_for(bundle)) as running:
        answers = {
            name: post(
                running,
                "/v1/score",
                {"items": pairs(), "return_members": True, "aggregate": name}
                | ({"uwo_lambda": 3.0} if name == "uwo" else {}),
            ).json()
            for name in ("mean", "min", "uwo")
        }
        openrlhf = post(running, "/get_reward", {"query": ["\n\nHuman: hi\n\nAssistant: yo"]})
    mean = answers["mean"]
    assert mean["std"] == [0.0] * len(RESPONSES)
    assert mean["members"] == [[s] for s in mean["scores"]]
    for name in ("min", "uwo"):
        assert answers[name]["scores"] == pytest.approx(mean["scores"], abs=1e-6)
    assert "reward_std" not in openrlhf.json()["extra_logs"]


def test_the_client_carries_the_aggregate_std_and_members(server: RunningServer) -> None:
    from rmserve.client import RewardClient, trl_reward_func

    prompts = [PROMPT] * len(RESPONSES)
    with RewardClient(server.url) as client:
        whole = client.score(
            prompts, RESPONSES, aggregate="uwo", uwo_lambda=0.5, return_members=True
        )
        members = np.asarray(whole.members)
        assert members.shape == (len(RESPONSES), MEMBERS)
        assert whole.aggregate == "uwo"
        np.testing.assert_allclose(
            whole.scores, members.mean(axis=1) - 0.5 * members.var(axis=1), atol=1e-5
        )
        np.testing.assert_allclose(whole.std, members.std(axis=1), atol=1e-5)
        ranked = client.rank(PROMPT, RESPONSES, aggregate="min")
        assert list(ranked.indices) == list(np.argsort(-members.min(axis=1), kind="stable"))
        with pytest.raises(ValueError, match="aggregate must be one of"):
            client.score(prompts, RESPONSES, aggregate="median")  # type: ignore[arg-type]
    with RewardClient(server.url, max_items_per_request=3) as chunked:
        parts = chunked.score(
            prompts, RESPONSES, aggregate="uwo", uwo_lambda=0.5, return_members=True
        )
        assert parts.std == pytest.approx(whole.std, abs=1e-6)
        assert np.asarray(parts.members) == pytest.approx(members, abs=1e-6)
        # More responses than one request carries: ranked here, the same way.
        assert chunked.rank(PROMPT, RESPONSES, aggregate="min").indices == ranked.indices
    logged: dict[str, float] = {}
    reward = trl_reward_func(server.url, aggregate="min", standard_format="pair")
    try:
        rewards = reward(prompts, RESPONSES, log_metric=logged.__setitem__)
    finally:
        reward.close()
    np.testing.assert_allclose(rewards, members.min(axis=1), atol=1e-5)
    assert logged["rmserve_reward/reward_std"] == pytest.approx(members.std(axis=1).mean())


def _trl_example() -> ModuleType:
    """A fresh copy of examples/trl_async_reward.py, loaded by path."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "trl_async_reward.py"
    spec = importlib.util.spec_from_file_location("example_trl_uwo", path)
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.mark.anyio
async def test_the_trl_example_optimises_uwo_against_an_ensemble(server: RunningServer) -> None:
    example = _trl_example()
    example.configure(server.url, aggregate="uwo", uwo_lambda=0.5)
    prompts = [PROMPT] * len(RESPONSES)
    logged: dict[str, float] = {}
    # The server runs in its own thread with its own event loop (serve_app).
    try:
        rewards: list[float] = await example.rmserve_reward(
            prompts=prompts, completions=RESPONSES, log_metric=logged.__setitem__
        )
    finally:
        await example.aclose()
    members = np.asarray(
        post(server, "/v1/score", {"items": pairs(), "return_members": True}).json()["members"]
    )
    np.testing.assert_allclose(rewards, members.mean(axis=1) - 0.5 * members.var(axis=1), atol=1e-5)
    assert logged["rmserve_reward/reward_std"] > 0
