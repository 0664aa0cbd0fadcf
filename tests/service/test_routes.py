"""Every route of the tiny-encoder server, its response shape and its error cases."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from rmserve.manifest import load_bundle
from tests.service.conftest import RunningServer

Post = Callable[..., httpx.Response]

PAIR = {"prompt": "How do I bake bread?", "response": "Mix flour, water, salt and yeast."}


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["type"], str)
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


# --- /v1/score ---------------------------------------------------------------------------


def test_score_accepts_the_three_input_forms(post: Post, tiny_encoder_bundle: Path) -> None:
    messages = [
        {"role": "user", "content": PAIR["prompt"]},
        {"role": "assistant", "content": PAIR["response"]},
    ]
    text = "\n\nHuman: " + PAIR["prompt"] + "\n\nAssistant: " + PAIR["response"]
    r = post("/v1/score", {"items": [PAIR, {"messages": messages}, {"text": text}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "scores", "aggregate", "std", "truncated", "usage"}
    assert body["model"] == load_bundle(tiny_encoder_bundle).model_name
    assert body["aggregate"] == "mean"
    assert body["std"] == [0.0, 0.0, 0.0]  # one model: an ensemble of one
    assert len(body["scores"]) == 3
    assert all(math.isfinite(s) for s in body["scores"])
    # The same pair in three forms renders to the same text, so the same score.
    assert body["scores"][0] == pytest.approx(body["scores"][1], abs=1e-6)
    assert body["scores"][0] == pytest.approx(body["scores"][2], abs=1e-6)
    assert body["truncated"] == [False, False, False]
    assert body["usage"]["tokens"] > 3 * 10


def test_score_prompt_as_conversation(post: Post) -> None:
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": PAIR["prompt"]},
    ]
    a = post("/v1/score", {"items": [{"prompt": convo, "response": PAIR["response"]}]})
    b = post(
        "/v1/score",
        {"items": [{"messages": [*convo, {"role": "assistant", "content": PAIR["response"]}]}]},
    )
    assert a.status_code == b.status_code == 200
    assert a.json()["scores"] == b.json()["scores"]


def test_score_normalize_uses_the_manifest_statistics(
    post: Post, tiny_encoder_bundle: Path
) -> None:
    norm = load_bundle(tiny_encoder_bundle).normalization
    # Measured at export on the fixture's eval pairs, not export's unmeasured 0 / 1: with
    # those, a server that never normalized would pass the check below.
    assert norm.n > 0
    assert norm.reference.startswith("eval pairs"), norm.reference
    assert norm.mean != 0.0
    assert abs(norm.std - 1.0) > 1e-3, norm.std
    raw = post("/v1/score", {"items": [PAIR]}).json()["scores"][0]
    normalized = post("/v1/score", {"items": [PAIR], "normalize": True}).json()["scores"][0]
    assert normalized == pytest.approx((raw - norm.mean) / norm.std, rel=1e-5, abs=1e-5)
    assert normalized != pytest.approx(raw, rel=1e-3, abs=1e-3)


TIMING_HEADERS = ("x-tokenization-time", "x-queue-time", "x-inference-time", "x-total-time")
GENERATED_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex


def timing_ms(response: httpx.Response) -> dict[str, float]:
    """The four timing headers in milliseconds, each present, finite and not negative."""
    times: dict[str, float] = {}
    for name in TIMING_HEADERS:
        assert name in response.headers, f"{name} missing from {dict(response.headers)}"
        value = float(response.headers[name])
        assert math.isfinite(value), (name, value)
        assert value >= 0.0, (name, value)
        times[name] = value
    return times


def test_score_timing_and_request_id_headers(post: Post) -> None:
    r = post("/v1/score", {"items": [PAIR]}, headers={"x-request-id": "trace-123"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "trace-123"  # a sane caller id is echoed
    ms = timing_ms(r)
    assert ms["x-inference-time"] > 0.0  # the model ran
    # One item is tokenized, then queued, then run in one batch, one after the other and
    # all inside the span of x-total-time, which itself ends before the client has the
    # answer. Each header is rounded to 0.001 ms.
    parts = ms["x-tokenization-time"] + ms["x-queue-time"] + ms["x-inference-time"]
    assert parts <= ms["x-total-time"] + 0.003, ms
    assert ms["x-total-time"] <= r.elapsed.total_seconds() * 1000 + 0.5, (ms, r.elapsed)
    # Without a sane id of the caller's (none, or one the server will not log), every
    # request gets a fresh one of its own.
    sent: list[str | None] = [None, "has spaces", "x" * 129, "semi;colon"]
    generated = [
        post("/v1/score", {"items": [PAIR]}, headers=None if i is None else {"x-request-id": i})
        for i in sent
    ]
    ids = [g.headers["x-request-id"] for g in generated]
    assert all(GENERATED_ID.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids), ids


def test_long_prompt_is_dropped_from_the_left_and_reported(post: Post) -> None:
    long_prompt = "tell me more " * 200
    r = post("/v1/score", {"items": [{"prompt": long_prompt, "response": "Sure."}, PAIR]})
    assert r.status_code == 200, r.text
    assert r.json()["truncated"] == [True, False]


def test_a_response_too_long_is_refused_with_lengths_unless_truncation_is_asked(
    post: Post,
) -> None:
    item = {"prompt": "hi", "response": "word " * 400}
    alone = post("/v1/score", {"items": [item]})
    assert alone.status_code == 422
    error = error_of(alone)
    assert error["type"] == "response_too_long"
    assert error["index"] == 0
    assert error["response_tokens"] > error["max_response_tokens"]
    assert "truncate_response" in error["message"]
    ok = post("/v1/score", {"items": [PAIR, item], "truncate_response": True})
    assert ok.status_code == 200
    assert ok.json()["truncated"] == [False, True]
    assert "errors" not in ok.json()


def test_one_item_that_cannot_fit_costs_a_multi_item_request_only_its_own_score(
    post: Post,
) -> None:
    item = {"prompt": "hi", "response": "word " * 400}
    expected = post("/v1/score", {"items": [PAIR]}).json()["scores"][0]
    r = post("/v1/score", {"items": [PAIR, item, PAIR]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scores"][1] is None
    assert body["scores"][0] == pytest.approx(expected, abs=1e-6)
    assert body["scores"][2] == pytest.approx(expected, abs=1e-6)
    assert body["truncated"] == [False, False, False]
    [error] = body["errors"]
    assert error["index"] == 1
    assert error["type"] == "response_too_long"
    assert error["details"]["response_tokens"] > error["details"]["max_response_tokens"]
    assert "item 1" in error["message"]
    # /v1/rank: the refused response has no score and no place in the ranking.
    ranked = post(
        "/v1/rank", {"prompt": "hi", "responses": ["short", "word " * 400, "also short"]}
    ).json()
    assert ranked["scores"][1] is None
    assert sorted(entry["index"] for entry in ranked["ranking"]) == [0, 2]
    assert [e["index"] for e in ranked["errors"]] == [1]
    # /v1/compare needs both responses: one that cannot fit refuses the comparison.
    compared = post("/v1/compare", {"prompt": "hi", "a": "short", "b": "word " * 400})
    assert compared.status_code == 422
    assert error_of(compared)["index"] == 1


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "items"),
        ({"items": []}, "items"),
        ({"items": [{"prompt": "x"}]}, "prompt and response"),
        ({"items": [{"prompt": "x", "response": "y", "text": "z"}]}, "exactly one"),
        ({"items": [{"messages": [{"role": "robot", "content": "x"}]}]}, "role"),
        ({"items": [PAIR], "normalise": True}, "normalise"),
        ({"items": [{"response": 3, "prompt": "x"}]}, "response"),
    ],
)
def test_invalid_score_requests_are_422_naming_the_problem(
    post: Post, body: dict[str, object], needle: str
) -> None:
    r = post("/v1/score", body)
    assert r.status_code == 422, r.text
    assert needle in error_of(r)["message"]


def test_last_message_must_be_the_response(post: Post) -> None:
    r = post("/v1/score", {"items": [{"messages": [{"role": "user", "content": "hi"}]}]})
    assert r.status_code == 422
    error = error_of(r)
    assert error["type"] == "invalid_item"
    assert "assistant" in error["message"]


def test_malformed_json_is_400(encoder_server: RunningServer) -> None:
    r = httpx.post(
        encoder_server.url + "/v1/score",
        content=b'{"items": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert error_of(r)["type"] == "invalid_json"


def test_wrong_content_type_is_415(encoder_server: RunningServer) -> None:
    r = httpx.post(
        encoder_server.url + "/v1/score",
        content=json.dumps({"items": [PAIR]}).encode(),
        headers={"content-type": "text/plain"},
    )
    assert r.status_code == 415
    assert "application/json" in error_of(r)["message"]


def test_unknown_route_and_wrong_method_use_the_error_shape(
    encoder_server: RunningServer,
) -> None:
    r = httpx.get(encoder_server.url + "/v1/nope")
    assert r.status_code == 404
    assert error_of(r)["type"] == "not_found"
    r = httpx.get(encoder_server.url + "/v1/score")
    assert r.status_code == 405
    error_of(r)


# --- /v1/rank and /v1/compare -------------------------------------------------------------


def test_rank_orders_best_first_and_agrees_with_score(post: Post) -> None:
    responses = ["No.", "Mix flour and water, knead, rise, bake.", "I like turtles.", "Bread."]
    r = post("/v1/rank", {"prompt": PAIR["prompt"], "responses": responses})
    assert r.status_code == 200, r.text
    body = r.json()
    ranking = body["ranking"]
    assert sorted(e["index"] for e in ranking) == [0, 1, 2, 3]
    assert [e["score"] for e in ranking] == sorted((e["score"] for e in ranking), reverse=True)
    direct = post(
        "/v1/score", {"items": [{"prompt": PAIR["prompt"], "response": x} for x in responses]}
    ).json()["scores"]
    assert body["scores"] == pytest.approx(direct, abs=1e-5)
    for entry in ranking:
        assert entry["score"] == pytest.approx(direct[entry["index"]], abs=1e-5)
    top = post("/v1/rank", {"prompt": PAIR["prompt"], "responses": responses, "top_k": 2}).json()
    assert top["ranking"] == ranking[:2]


def test_rank_with_messages_and_errors(post: Post) -> None:
    messages = [{"role": "user", "content": PAIR["prompt"]}]
    r = post("/v1/rank", {"messages": messages, "responses": ["a", "b"]})
    assert r.status_code == 200
    both = post("/v1/rank", {"prompt": "x", "messages": messages, "responses": ["a"]})
    assert both.status_code == 422
    assert "exactly one of prompt or messages" in error_of(both)["message"]
    assert post("/v1/rank", {"prompt": "x", "responses": []}).status_code == 422
    assert post("/v1/rank", {"prompt": "x", "responses": ["a"], "top_k": 0}).status_code == 422


def test_compare_gives_the_bradley_terry_probability(post: Post) -> None:
    r = post("/v1/compare", {"prompt": PAIR["prompt"], "a": PAIR["response"], "b": "No."})
    assert r.status_code == 200, r.text
    body = r.json()
    ra, rb = body["scores"]
    assert body["p_a_preferred"] == pytest.approx(1 / (1 + math.exp(-(ra - rb))), rel=1e-6)
    swapped = post("/v1/compare", {"prompt": PAIR["prompt"], "a": "No.", "b": PAIR["response"]})
    assert swapped.json()["p_a_preferred"] == pytest.approx(1 - body["p_a_preferred"], abs=1e-6)
    assert post("/v1/compare", {"prompt": "x", "a": "y"}).status_code == 422


# --- meta routes --------------------------------------------------------------------------


def test_models_lists_the_public_manifest(
    encoder_server: RunningServer, tiny_encoder_bundle: Path
) -> None:
    body = httpx.get(encoder_server.url + "/v1/models").json()
    (card,) = body["data"]
    manifest = load_bundle(tiny_encoder_bundle)
    assert body["object"] == "list"
    assert card["id"] == manifest.model_name
    assert card["precision"] == "fp32"
    assert card["provider"] == "cpu"
    assert card["manifest"] == json.loads(json.dumps(manifest.public()))
    assert "sha256" not in json.dumps(card)


def test_health_readiness_and_docs(encoder_server: RunningServer) -> None:
    assert httpx.get(encoder_server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(encoder_server.url + "/readyz").status_code == 200
    assert httpx.get(encoder_server.url + "/docs").status_code == 200
    spec = httpx.get(encoder_server.url + "/openapi.json").json()
    for path in ("/v1/score", "/v1/rank", "/v1/compare", "/get_reward", "/classify"):
        assert "post" in spec["paths"][path]
    for path in ("/v1/models", "/healthz", "/readyz", "/metrics"):
        assert "get" in spec["paths"][path]


def test_readyz_is_503_while_draining(encoder_server: RunningServer) -> None:
    state = encoder_server.state
    state.draining = True
    try:
        r = httpx.get(encoder_server.url + "/readyz")
        assert r.status_code == 503
        assert r.json() == {"status": "draining"}
    finally:
        state.draining = False
    assert httpx.get(encoder_server.url + "/readyz").status_code == 200


def test_metrics_expose_the_documented_names(post: Post, encoder_server: RunningServer) -> None:
    before = encoder_server.metric("rmserve_items_total")
    assert post("/v1/score", {"items": [PAIR, PAIR]}).status_code == 200
    assert post("/v1/score", {"items": []}).status_code == 422
    text = httpx.get(encoder_server.url + "/metrics").text
    for name in (
        "rmserve_requests_total",
        "rmserve_request_duration_seconds_bucket",
        "rmserve_items_total",
        "rmserve_tokens_total",
        "rmserve_queue_items",
        "rmserve_batch_size_bucket",
        "rmserve_batch_tokens_bucket",
        "rmserve_padding_ratio_bucket",
        "rmserve_inference_duration_seconds_bucket",
        "rmserve_model_info",
    ):
        assert name in text, name
    assert 'rmserve_requests_total{route="/v1/score",status="200"}' in text
    assert 'rmserve_requests_total{route="/v1/score",status="422"}' in text
    assert 'rmserve_model_info{model="tiny-encoder",precision="fp32",provider="cpu"} 1.0' in text
    assert encoder_server.metric("rmserve_items_total") == before + 2


def test_a_bad_item_fails_only_its_own_request_under_concurrency(post: Post) -> None:
    from concurrent.futures import ThreadPoolExecutor

    bad = {"items": [{"messages": [{"role": "user", "content": "no response"}]}]}
    good = {"items": [PAIR]}
    bodies = [bad if i % 4 == 0 else good for i in range(24)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(lambda b: post("/v1/score", b).status_code, bodies))
    assert statuses == [422 if i % 4 == 0 else 200 for i in range(24)]


@pytest.mark.anyio
async def test_routes_that_need_the_model_say_it_is_loading_with_retry_after(
    tiny_encoder_bundle: Path,
) -> None:
    # The app before its lifespan ran: nothing is loaded yet, as in the first seconds of a pod.
    from rmserve.service.app import create_app
    from tests.service.conftest import settings_for

    app = create_app(settings_for(tiny_encoder_bundle))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://rm") as client:
        item = {"items": [{"prompt": "p", "response": "r"}]}
        responses = [await client.get("/v1/models"), await client.post("/v1/score", json=item)]
    for response in responses:
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert "still loading" in response.json()["error"]["message"]


def test_every_documented_request_example_is_answered(encoder_server: RunningServer) -> None:
    """/docs shows a working body: each request schema's examples, posted to its route,
    answer 200 (and every request schema of a scoring route has one)."""
    spec = httpx.get(encoder_server.url + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    checked = 0
    for path, operations in spec["paths"].items():
        operation = operations.get("post")
        if operation is None or "requestBody" not in operation:
            continue
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = schemas[ref.rsplit("/", 1)[1]]
        assert schema.get("description"), f"{path}: the request schema has no description"
        examples = schema.get("examples") or [
            {name: p["examples"][0] for name, p in schema["properties"].items() if "examples" in p}
        ]
        assert examples[0], f"{path}: no example body for /docs"
        for example in examples:
            r = httpx.post(encoder_server.url + path, json=example, timeout=30)
            assert r.status_code == 200, (path, example, r.text)
            checked += 1
    assert checked >= 7  # score x2, rank x2, compare, get_reward, classify x2, slime
