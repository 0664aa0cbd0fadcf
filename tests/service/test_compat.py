"""The OpenRLHF and vLLM/verl request shapes, sent exactly as those projects send them."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

from tests.service.conftest import RunningServer, serve_app, settings_for

PROMPT = "\n\nHuman: Is it safe to eat raw cookie dough?\n\nAssistant: "
RESPONSES = ["It can carry salmonella from raw eggs; heat-treated dough is safer.", "Yes."]


def openrlhf_request_api_wrapper(
    url: str, data: dict[str, Any], score_key: str = "rewards"
) -> tuple[Any, dict[str, Any]]:
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
    assert body["extra_logs"] == {"truncated": [0.0, 0.0]}
    assert body["scores"] == rewards
    assert rewards == pytest.approx(direct_scores(encoder_server, queries), abs=1e-6)
    # Older OpenRLHF posts only {"query": [...]}.
    old, _ = openrlhf_request_api_wrapper(encoder_server.url + "/get_reward", {"query": queries})
    assert old == pytest.approx(rewards, abs=1e-6)


def test_openrlhf_extra_fields_are_ignored_and_mismatch_is_422(
    encoder_server: RunningServer,
) -> None:
    url = encoder_server.url + "/get_reward"
    data: dict[str, Any] = {
        "query": [PROMPT + "x"],
        "prompts": [PROMPT],
        "labels": [None],
        "datasources": ["a"],
    }
    assert requests.post(url, json=data, timeout=30).status_code == 200
    bad = requests.post(url, json={"query": ["a", "b"], "prompts": ["a"]}, timeout=30)
    assert bad.status_code == 422
    assert "prompts has 1 entries but query has 2" in bad.json()["error"]["message"]


def test_openrlhf_long_responses_are_cut_and_flagged_not_refused(
    encoder_server: RunningServer, tiny_encoder_bundle: Path
) -> None:
    # OpenRLHF cannot act on a 422 (it retries, then the sample gets no reward): with the
    # boundary known, the prompt goes first, then the response's end, and extra_logs says so.
    url = encoder_server.url + "/get_reward"
    prompt = "\n\nHuman: " + "please explain " * 300 + "\n\nAssistant: "
    response = "word " * 400
    queries = [prompt + response, prompt + "Short.", PROMPT + RESPONSES[0]]
    r = requests.post(url, json={"query": queries, "prompts": [prompt, prompt, PROMPT]})
    assert r.status_code == 200, r.text
    assert r.json()["extra_logs"] == {"truncated": [1.0, 1.0, 0.0]}
    assert encoder_server.metric("rmserve_truncated_items_total") >= 2
    # The cut keeps the response's start: the reward of the pair with truncate_response.
    pair = {"prompt": prompt.split("\n\nHuman: ")[1].split("\n\nAssistant: ")[0]}
    direct = httpx.post(
        encoder_server.url + "/v1/score",
        json={"items": [{**pair, "response": response}], "truncate_response": True},
    ).json()
    assert r.json()["rewards"][0] == pytest.approx(direct["scores"][0], abs=1e-6)
    # /v1 still refuses unless asked; the server setting makes the OpenRLHF door refuse too.
    refused = httpx.post(
        encoder_server.url + "/v1/score", json={"items": [{**pair, "response": response}]}
    )
    assert refused.status_code == 422
    strict = settings_for(tiny_encoder_bundle, compat_truncate_response=False)
    with serve_app(strict) as server:
        body = {"query": queries[:1], "prompts": [prompt]}
        r = requests.post(server.url + "/get_reward", json=body, timeout=30)
        assert r.status_code == 422
        assert r.json()["error"]["type"] == "response_too_long"
    # The other policy for /v1: RMSERVE_TRUNCATE_RESPONSE=true cuts unless the request says no.
    lenient = settings_for(tiny_encoder_bundle, truncate_response=True)
    long_item = {**pair, "response": response}
    with serve_app(lenient) as server:
        cut = requests.post(server.url + "/v1/score", json={"items": [long_item]}, timeout=30)
        assert cut.status_code == 200
        assert cut.json()["truncated"] == [True]
        assert cut.json()["scores"][0] == pytest.approx(direct["scores"][0], abs=1e-6)
        mixed: dict[str, Any] = {"items": [long_item, {**pair, "response": "Short."}]}
        mixed["truncate_response"] = False
        asked = requests.post(server.url + "/v1/score", json=mixed, timeout=30)
        assert asked.status_code == 200
        assert asked.json()["scores"][0] is None
        assert server.metric("rmserve_refused_items_total", '{reason="response_too_long"}') == 1
        # The first answer cut a response; the second cut the long prompt of "Short.".
        assert server.metric("rmserve_truncated_items_total") == 2


def openrlhf_fetch_rewards(urls: list[str], queries: list[str], prompts: list[str]) -> list[Any]:
    """OpenRLHF's SingleTurnAgentExecutor._fetch_rewards_via_http (agent.py): shard the
    queries over the --reward.remote_url servers, batch_size = ceil(n / servers), so servers
    past the number of queries get empty lists; raise_for_status on each (written from
    reading its code; the retry loop left out so a failure fails the test)."""
    batch_size = (len(queries) + len(urls) - 1) // len(urls)
    answers = []
    for i, url in enumerate(urls):
        start, end = i * batch_size, min((i + 1) * batch_size, len(queries))
        payload: dict[str, Any] = {
            "query": queries[start:end],
            "prompts": prompts[start:end],
            "labels": [None] * max(0, end - start),
        }
        response = requests.post(url, json=payload, timeout=180)
        response.raise_for_status()
        answers.append(response.json())
    return answers


@pytest.mark.parametrize("servers", [1, 3])
def test_openrlhf_with_one_and_three_urls(encoder_server: RunningServer, servers: int) -> None:
    # Today's OpenRLHF sends one sample per call; with 3 URLs, two servers get [] each.
    url = encoder_server.url + "/get_reward"
    query = PROMPT + RESPONSES[0]
    answers = openrlhf_fetch_rewards([url] * servers, [query], [PROMPT])
    assert len(answers) == servers
    assert answers[0]["rewards"] == pytest.approx(direct_scores(encoder_server, [query]), abs=1e-6)
    for empty in answers[1:]:
        assert empty == {"rewards": [], "scores": [], "extra_logs": {}}


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
