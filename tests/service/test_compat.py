"""The OpenRLHF and vLLM/verl request shapes, sent exactly as those projects send them."""

from __future__ import annotations

import math
import time

import httpx
import pytest
import requests

from tests.service.conftest import RunningServer

PROMPT = "\n\nHuman: Is it safe to eat raw cookie dough?\n\nAssistant: "
RESPONSES = ["It can carry salmonella from raw eggs; heat-treated dough is safer.", "Yes."]


def openrlhf_request_api_wrapper(url: str, data: dict[str, object], score_key: str = "rewards"):  # type: ignore[no-untyped-def]
    """What openrlhf/utils/remote_rm_utils.py does: requests.post(json=...) with a JSON
    content type, raise_for_status, then read the score key (here without the retry loop,
    so a failure fails the test)."""
    headers = {"Content-Type": "application/json"}
    response = requests.post(url=url, json=data, headers=headers, timeout=180)
    response.raise_for_status()
    body = response.json()
    assert score_key in body, f"{score_key} not in {body}"
    return body.get(score_key), body


def direct_scores(server: RunningServer, texts: list[str]) -> list[float]:
    r = httpx.post(server.url + "/v1/score", json={"items": [{"text": t} for t in texts]})
    assert r.status_code == 200, r.text
    return r.json()["scores"]  # type: ignore[no-any-return]


def test_openrlhf_remote_rm(encoder_server: RunningServer) -> None:
    queries = [PROMPT + r for r in RESPONSES]
    # remote_rm_fn_ray(api_url, queries, prompts, labels) posts exactly these three keys.
    data = {"query": queries, "prompts": [PROMPT, PROMPT], "labels": ["", ""]}
    rewards, body = openrlhf_request_api_wrapper(encoder_server.url + "/get_reward", data)
    assert set(body) == {"rewards", "scores", "extra_logs"}
    assert body["extra_logs"] == {}
    assert body["scores"] == rewards
    assert rewards == pytest.approx(direct_scores(encoder_server, queries), abs=1e-6)
    # Older OpenRLHF posts only {"query": [...]}.
    old, _ = openrlhf_request_api_wrapper(encoder_server.url + "/get_reward", {"query": queries})
    assert old == pytest.approx(rewards, abs=1e-6)


def test_openrlhf_extra_fields_are_ignored_and_mismatch_is_422(
    encoder_server: RunningServer,
) -> None:
    url = encoder_server.url + "/get_reward"
    data = {"query": [PROMPT + "x"], "prompts": [PROMPT], "labels": [None], "datasources": ["a"]}
    assert requests.post(url, json=data, timeout=30).status_code == 200
    bad = requests.post(url, json={"query": ["a", "b"], "prompts": ["a"]}, timeout=30)
    assert bad.status_code == 422
    assert "prompts has 1 entries but query has 2" in bad.json()["error"]["message"]


def test_openrlhf_prompt_boundary_drops_the_prompt_first(encoder_server: RunningServer) -> None:
    url = encoder_server.url + "/get_reward"
    prompt = "\n\nHuman: " + "please explain " * 300 + "\n\nAssistant: "
    too_long_response = prompt + "word " * 400
    # With the boundary known, a response that alone does not fit is refused, not cut.
    r = requests.post(url, json={"query": [too_long_response], "prompts": [prompt]}, timeout=30)
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "response_too_long"
    ok = requests.post(url, json={"query": [prompt + "Short."], "prompts": [prompt]}, timeout=30)
    assert ok.status_code == 200


def test_verl_classify_without_activation_reads_the_raw_reward(
    encoder_server: RunningServer,
) -> None:
    text = PROMPT + RESPONSES[0]
    # verl's RewardLoopWorker.compute_score_disrm (vLLM engine) payload and parsing.
    payloads = {"model": "/models/some-reward-model", "input": text, "activation": False}
    output = httpx.post(encoder_server.url + "/classify", json=payloads, timeout=30).json()
    rm_score = output["data"][-1]["probs"][-1]
    assert rm_score == pytest.approx(direct_scores(encoder_server, [text])[0], abs=1e-6)
    assert output["object"] == "list"
    assert output["model"] == "tiny-encoder"
    assert output["id"].startswith("classify-")
    assert abs(output["created"] - time.time()) < 600
    assert output["data"][0]["num_classes"] == 1
    assert output["data"][0]["index"] == 0
    assert output["usage"]["prompt_tokens"] == output["usage"]["total_tokens"] > 0


def test_vllm_classify_newer_flag_list_input_and_default_activation(
    encoder_server: RunningServer,
) -> None:
    texts = [PROMPT + r for r in RESPONSES]
    raw = direct_scores(encoder_server, texts)
    url = encoder_server.url + "/classify"
    body = {"model": "m", "input": texts, "use_activation": False, "add_special_tokens": False}
    out = httpx.post(url, json=body).json()
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert [d["probs"][0] for d in out["data"]] == pytest.approx(raw, abs=1e-6)
    # vLLM applies the activation by default: sigmoid for one class.
    activated = httpx.post(url, json={"input": texts}).json()
    expected = [1 / (1 + math.exp(-x)) for x in raw]
    assert [d["probs"][0] for d in activated["data"]] == pytest.approx(expected, abs=1e-6)
    bad = httpx.post(url, json={"input": [1, 2, 3]})
    assert bad.status_code == 422
