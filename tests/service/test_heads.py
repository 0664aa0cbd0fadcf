"""Models of several heads end to end, /classify's chat form, chat-template messages, lengths.

The bundles are synthetic (tests/service/synthetic.py): a few ONNX operators and a word
tokenizer, so these tests need neither torch nor ``rmserve export``. Expected values are
computed with onnxruntime directly on the ids the service's own tokenizer gives, one item per
run (so the server's batching is checked too).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from rmserve.manifest import load_bundle
from rmserve.service.tokenization import ItemInput, RequestTokenizer
from tests.service.conftest import RunningServer, serve_app, settings_for
from tests.service.synthetic import ARMO_LABELS, build_bundle, chat_template_format, with_heads

REWARD_HEAD = 1  # not the first column: the tests see that the right one is the reward
PROMPT = "how do I bake bread ?"
RESPONSES = ["mix flour water yeast and salt then knead and bake", "no", "please explain"]


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def heads_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three heads (helpfulness, correctness, coherence), reward head 1, HH transcript."""
    out = tmp_path_factory.mktemp("heads") / "bundle"
    return build_bundle(out, labels=ARMO_LABELS, reward_head=REWARD_HEAD, name="armo-like")


@pytest.fixture(scope="session")
def one_head_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("one-head") / "bundle", name="one-head")


@pytest.fixture(scope="session")
def chat_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three heads rendered with a chat template that refuses unknown roles."""
    out = tmp_path_factory.mktemp("chat") / "bundle"
    return build_bundle(
        out,
        labels=ARMO_LABELS,
        reward_head=REWARD_HEAD,
        text_format=chat_template_format(),
        name="chat-heads",
    )


@pytest.fixture(scope="module")
def heads_server(heads_bundle: Path) -> Iterator[RunningServer]:
    with serve_app(settings_for(heads_bundle, max_wait_ms=20.0)) as running:
        yield running


@pytest.fixture(scope="module")
def one_head_server(one_head_bundle: Path) -> Iterator[RunningServer]:
    with serve_app(settings_for(one_head_bundle, max_wait_ms=20.0)) as running:
        yield running


@pytest.fixture(scope="module")
def chat_server(chat_bundle: Path) -> Iterator[RunningServer]:
    with serve_app(settings_for(chat_bundle, max_wait_ms=20.0)) as running:
        yield running


Post = Callable[..., httpx.Response]


def poster(server: RunningServer) -> Post:
    def _post(path: str, body: Any) -> httpx.Response:
        return httpx.post(server.url + path, json=body, timeout=30)

    return _post


def reference(
    bundle: Path, items: Sequence[ItemInput], max_length: int | None = None
) -> npt.NDArray[np.float32]:
    """(n, K): each item alone through onnxruntime, on the ids of the service's tokenizer."""
    import onnxruntime as ort

    manifest = load_bundle(bundle)
    tokenizer = RequestTokenizer(
        bundle, manifest, max_item_chars=10**6, threads=1, max_length=max_length
    )
    try:
        encoded = tokenizer.encode_sync(items, truncate_response=False)
    finally:
        tokenizer.close()
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    rows = []
    for ids in encoded.ids:
        feed = {"input_ids": ids[None, :], "attention_mask": np.ones((1, ids.shape[0]), np.int64)}
        (out,) = session.run(["reward"], feed)
        rows.append(np.asarray(out, dtype=np.float32).reshape(1, -1)[0])
    return np.stack(rows)


def softmax(x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    z = np.exp(np.asarray(x, dtype=np.float64) - np.max(x, axis=-1, keepdims=True))
    out: npt.NDArray[np.float64] = z / z.sum(axis=-1, keepdims=True)
    return out


def conversation(response: str) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "be helpful"},
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": response},
    ]


# --- /v1 routes with three heads ----------------------------------------------------------


def test_score_returns_every_head_and_the_reward_head_as_scores(
    heads_server: RunningServer, heads_bundle: Path
) -> None:
    post = poster(heads_server)
    items: list[dict[str, Any]] = [{"prompt": PROMPT, "response": r} for r in RESPONSES]
    items += [{"messages": conversation(RESPONSES[0])}, {"text": "hello the bread"}]
    r = post("/v1/score", {"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = reference(
        heads_bundle,
        [ItemInput(prompt=PROMPT, response=x) for x in RESPONSES]
        + [ItemInput(messages=conversation(RESPONSES[0])), ItemInput(text="hello the bread")],
    )
    assert body["labels"] == list(ARMO_LABELS)
    heads = np.asarray(body["head_scores"])
    assert heads.shape == (5, 3)
    np.testing.assert_allclose(heads, expected, atol=1e-5)
    assert body["scores"] == heads[:, REWARD_HEAD].tolist()
    assert body["truncated"] == [False] * 5

    normalized = post("/v1/score", {"items": items, "normalize": True}).json()
    # normalize applies to the reward head (bundle mean 0.25, std 2.0), never to head_scores.
    assert normalized["scores"] == pytest.approx(((heads[:, REWARD_HEAD] - 0.25) / 2.0).tolist())
    assert normalized["head_scores"] == body["head_scores"]


def test_rank_and_compare_rank_by_the_reward_head_and_carry_every_head(
    heads_server: RunningServer,
) -> None:
    post = poster(heads_server)
    scored = post("/v1/score", {"items": [{"prompt": PROMPT, "response": r} for r in RESPONSES]})
    heads = np.asarray(scored.json()["head_scores"])
    reward = heads[:, REWARD_HEAD]

    ranked = post("/v1/rank", {"prompt": PROMPT, "responses": RESPONSES}).json()
    assert [e["index"] for e in ranked["ranking"]] == np.argsort(-reward, kind="stable").tolist()
    assert ranked["scores"] == pytest.approx(reward.tolist(), abs=1e-6)
    np.testing.assert_allclose(ranked["head_scores"], heads, atol=1e-6)
    assert ranked["labels"] == list(ARMO_LABELS)

    a, b = RESPONSES[0], RESPONSES[1]
    compared = post("/v1/compare", {"prompt": PROMPT, "a": a, "b": b}).json()
    np.testing.assert_allclose(compared["head_scores"], heads[:2], atol=1e-6)
    assert compared["scores"] == pytest.approx(reward[:2].tolist(), abs=1e-6)
    p = 1.0 / (1.0 + math.exp(-(reward[0] - reward[1])))
    assert compared["p_a_preferred"] == pytest.approx(p, abs=1e-6)


def test_get_reward_answers_the_reward_head(heads_server: RunningServer) -> None:
    post = poster(heads_server)
    texts = ["hello the bread", "no yes no"]
    direct = post("/v1/score", {"items": [{"text": t} for t in texts]}).json()
    rewards = post("/get_reward", {"query": texts}).json()["rewards"]
    assert rewards == pytest.approx(direct["scores"], abs=1e-6)


def test_models_show_labels_reward_head_and_the_max_length(heads_server: RunningServer) -> None:
    card = httpx.get(heads_server.url + "/v1/models").json()["data"][0]
    assert card["manifest"]["labels"] == list(ARMO_LABELS)
    assert card["manifest"]["reward_head"] == REWARD_HEAD
    assert card["max_length"] == card["manifest"]["max_length"] == 64


def test_the_client_reads_answers_of_three_heads(heads_server: RunningServer) -> None:
    from rmserve.client import RewardClient

    post = poster(heads_server)
    direct = post("/v1/score", {"items": [{"prompt": PROMPT, "response": r} for r in RESPONSES]})
    with RewardClient(heads_server.url) as client:
        result = client.score([PROMPT] * 3, RESPONSES)
        assert list(result.scores) == pytest.approx(direct.json()["scores"], abs=1e-6)
        assert client.rank(PROMPT, RESPONSES).best.index == int(np.argmax(direct.json()["scores"]))
        assert 0.0 <= client.compare(PROMPT, RESPONSES[0], RESPONSES[1]).p_a_preferred <= 1.0
        assert client.models().manifest["labels"] == list(ARMO_LABELS)


def test_one_head_answers_have_no_head_fields(one_head_server: RunningServer) -> None:
    # A single model is an ensemble of one: aggregate and std (0) are there, heads are not.
    post = poster(one_head_server)
    common = {"model", "scores", "aggregate", "std", "truncated", "usage"}
    score = post("/v1/score", {"items": [{"prompt": PROMPT, "response": "no"}]}).json()
    assert set(score) == common
    assert score["std"] == [0.0]
    rank = post("/v1/rank", {"prompt": PROMPT, "responses": RESPONSES}).json()
    assert set(rank) == common | {"ranking"}
    compare = post("/v1/compare", {"prompt": PROMPT, "a": "no", "b": "yes"}).json()
    assert set(compare) == common | {"p_a_preferred"}


# --- /classify ----------------------------------------------------------------------------


def test_classify_three_heads_softmax_raw_and_label(
    heads_server: RunningServer, heads_bundle: Path
) -> None:
    post = poster(heads_server)
    texts = ["hello the bread", "no yes no", "mix flour water"]
    logits = reference(heads_bundle, [ItemInput(text=t) for t in texts])

    activated = post("/classify", {"model": "m", "input": texts})
    assert activated.status_code == 200, activated.text
    data = activated.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    np.testing.assert_allclose([d["probs"] for d in data], softmax(logits), atol=1e-5)
    for d, row in zip(data, logits, strict=True):
        assert d["num_classes"] == 3
        assert d["label"] == ARMO_LABELS[int(np.argmax(row))]

    for flag in ("use_activation", "activation"):
        raw = post("/classify", {"input": texts, flag: False}).json()["data"]
        np.testing.assert_allclose([d["probs"] for d in raw], logits, atol=1e-5)
        assert [d["label"] for d in raw] == [d["label"] for d in data]


def test_classify_messages_scores_the_conversation_as_v1_score_does(
    heads_server: RunningServer, heads_bundle: Path
) -> None:
    post = poster(heads_server)
    messages = conversation(RESPONSES[0])
    direct = post("/v1/score", {"items": [{"messages": messages}]}).json()
    raw = post("/classify", {"messages": messages, "use_activation": False})
    assert raw.status_code == 200, raw.text
    (entry,) = raw.json()["data"]
    assert entry["probs"] == pytest.approx(direct["head_scores"][0], abs=1e-6)
    np.testing.assert_allclose(
        entry["probs"], reference(heads_bundle, [ItemInput(messages=messages)])[0], atol=1e-5
    )
    body = {
        "model": "m",
        "messages": messages,
        "add_generation_prompt": False,
        "continue_final_message": False,
        "add_special_tokens": False,
        "chat_template_kwargs": {"enable_thinking": False},  # accepted, ignored
        "truncate_prompt_tokens": -1,
    }
    activated = post("/classify", body).json()["data"][0]
    np.testing.assert_allclose(activated["probs"], softmax(direct["head_scores"][0]), atol=1e-6)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"input": "hello", "messages": conversation("no")}, "exactly one of input"),
        ({"model": "m"}, "exactly one of input"),
        ({"messages": []}, "messages"),
        (
            {"messages": conversation("no"), "add_generation_prompt": True},
            "finished one whose last message is the assistant response",
        ),
        ({"messages": conversation("no"), "continue_final_message": True}, "finished response"),
        ({"messages": conversation("no"), "chat_template": "{{ messages }}"}, "chat_template"),
        ({"messages": [{"role": "", "content": "x"}]}, "role"),
    ],
)
def test_classify_refuses_what_it_cannot_honour(
    heads_server: RunningServer, body: dict[str, Any], needle: str
) -> None:
    r = poster(heads_server)("/classify", body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request"
    assert needle in error["message"]


def test_classify_messages_must_end_with_the_response(heads_server: RunningServer) -> None:
    r = poster(heads_server)("/classify", {"messages": [{"role": "user", "content": PROMPT}]})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_item"
    assert error["index"] == 0
    assert "assistant" in error["message"]


def test_classify_one_head_stays_sigmoid_or_raw(one_head_server: RunningServer) -> None:
    post = poster(one_head_server)
    texts = ["hello the bread", "no yes no"]
    raw = post("/v1/score", {"items": [{"text": t} for t in texts]}).json()["scores"]
    out = post("/classify", {"input": texts}).json()["data"]
    assert [len(d["probs"]) for d in out] == [1, 1]
    assert [d["probs"][0] for d in out] == pytest.approx(
        [1 / (1 + math.exp(-x)) for x in raw], abs=1e-6
    )
    assert all(d["num_classes"] == 1 and d["label"] is None for d in out)
    plain = post("/classify", {"input": texts, "use_activation": False}).json()["data"]
    assert [d["probs"][-1] for d in plain] == pytest.approx(raw, abs=1e-7)


# --- messages: roles and contents are the text format's call -------------------------------


def test_a_chat_template_takes_its_own_roles_content_parts_and_names(
    chat_server: RunningServer, chat_bundle: Path
) -> None:
    post = poster(chat_server)
    tool_turn: list[dict[str, Any]] = [
        {"role": "user", "content": PROMPT},
        {"role": "tool", "content": "bake oven", "tool_call_id": "call-1"},
        {"role": "assistant", "content": [{"type": "text", "text": "mix flour"}]},
    ]
    named: list[dict[str, Any]] = [
        {"role": "user", "content": PROMPT, "name": "Human"},
        {"role": "assistant", "content": "mix flour"},
    ]
    unnamed = [{k: v for k, v in m.items() if k != "name"} for m in named]
    items = [{"messages": m} for m in (tool_turn, named, unnamed)]
    r = post("/v1/score", {"items": items})
    assert r.status_code == 200, r.text
    expected = reference(chat_bundle, [ItemInput(messages=m) for m in (tool_turn, named, unnamed)])
    heads = np.asarray(r.json()["head_scores"])
    np.testing.assert_allclose(heads, expected, atol=1e-5)
    # The name reached the template: it rendered "user Human", which changes the scores.
    assert not np.allclose(heads[1], heads[2])


def test_a_template_refusal_names_the_item_and_spares_the_others(
    chat_server: RunningServer,
) -> None:
    post = poster(chat_server)
    good = {"items": [{"messages": conversation(r)} for r in RESPONSES]}
    expected = post("/v1/score", good).json()["head_scores"]
    alone = post("/v1/score", {"items": [{"messages": conversation("no")}]}).json()
    robot = [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "no"}]
    bad = {"items": [{"messages": conversation("no")}, {"messages": robot}]}
    bodies = [good, bad] * 6
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post("/v1/score", b), bodies))
    for body, r in zip(bodies, answers, strict=True):
        assert r.status_code == 200, r.text
        if body is good:
            np.testing.assert_allclose(r.json()["head_scores"], expected, atol=1e-6)
            assert "errors" not in r.json()
            continue
        # The refused item gets null and a reason; the other keeps its score.
        answer = r.json()
        assert answer["scores"][1] is None
        assert answer["head_scores"][1] is None
        np.testing.assert_allclose(answer["scores"][0], alone["scores"][0], atol=1e-6)
        [error] = answer["errors"]
        assert error["type"] == "invalid_item"
        assert error["index"] == 1
        message = error["message"]
        assert "Conversation roles must be system/user/assistant/tool, got robot" in message
    only_bad = post("/v1/score", {"items": [{"messages": robot}]})
    assert only_bad.status_code == 422
    assert only_bad.json()["error"]["index"] == 0
    via_classify = post("/classify", {"messages": robot})
    assert via_classify.status_code == 422
    assert "got robot" in via_classify.json()["error"]["message"]


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "role"),
        ([{"role": "assistant", "content": [{"type": "text", "text": "y"}]}], "content"),
    ],
)
def test_the_transcript_format_refuses_what_it_cannot_render(
    heads_server: RunningServer, messages: list[dict[str, Any]], needle: str
) -> None:
    r = poster(heads_server)("/v1/score", {"items": [{"messages": messages}]})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_item"
    assert error["index"] == 0
    assert needle in error["message"]
    both = poster(heads_server)("/v1/score", {"items": [{"text": "ok"}, {"messages": messages}]})
    assert both.status_code == 200, both.text
    [item_error] = both.json()["errors"]
    assert item_error["index"] == 1
    assert needle in item_error["message"]


def test_v1_stays_strict_about_unknown_top_level_fields(heads_server: RunningServer) -> None:
    r = poster(heads_server)("/v1/score", {"items": [{"text": "ok"}], "add_generation_prompt": 1})
    assert r.status_code == 422
    assert "add_generation_prompt" in r.json()["error"]["message"]


# --- a real exported model given three heads ----------------------------------------------


@pytest.fixture(params=["synthetic", "tiny-decoder"])
def one_head_source(request: pytest.FixtureRequest, one_head_bundle: Path) -> Path:
    """A one-head bundle: the synthetic one, or the real tiny Qwen2 of ``rmserve export``."""
    if request.param == "synthetic":
        return one_head_bundle
    bundle: Path = request.getfixturevalue("tiny_decoder_bundle")
    return bundle


def test_an_exported_model_with_three_heads_serves_them(
    one_head_source: Path, tmp_path: Path
) -> None:
    bundle, weight, bias = with_heads(one_head_source, tmp_path / "heads", ARMO_LABELS, REWARD_HEAD)
    inputs = [ItemInput(prompt=PROMPT, response=r) for r in RESPONSES]
    inputs.append(ItemInput(messages=conversation(RESPONSES[1])))
    expected = reference(bundle, inputs)
    # The graph really is the one-head model followed by the heads.
    np.testing.assert_allclose(
        expected, reference(one_head_source, inputs) * weight + bias, atol=1e-5
    )
    with serve_app(settings_for(bundle, max_wait_ms=20.0)) as server:
        post = poster(server)
        items: list[dict[str, Any]] = [{"prompt": PROMPT, "response": r} for r in RESPONSES]
        items.append({"messages": conversation(RESPONSES[1])})
        body = post("/v1/score", {"items": items}).json()
        np.testing.assert_allclose(body["head_scores"], expected, atol=1e-5)
        assert body["scores"] == [row[REWARD_HEAD] for row in body["head_scores"]]
        raw = post("/classify", {"messages": conversation(RESPONSES[1]), "use_activation": False})
        np.testing.assert_allclose(raw.json()["data"][0]["probs"], expected[-1], atol=1e-5)


# --- lengths --------------------------------------------------------------------------------


def test_max_length_below_the_bundles_cuts_the_prompt(heads_bundle: Path) -> None:
    long_prompt = " ".join(["please explain how to bake bread"] * 8)  # 48 words
    item = {"prompt": long_prompt, "response": "mix flour water"}
    with serve_app(settings_for(heads_bundle, max_length=16)) as capped:
        card = httpx.get(capped.url + "/v1/models").json()["data"][0]
        assert card["max_length"] == 16
        assert card["manifest"]["max_length"] == 64
        r = httpx.post(capped.url + "/v1/score", json={"items": [item]}, timeout=30).json()
        assert r["truncated"] == [True]
        assert r["usage"]["tokens"] == 16
        expected = reference(
            heads_bundle, [ItemInput(prompt=long_prompt, response="mix flour water")], 16
        )
        np.testing.assert_allclose(r["head_scores"], expected, atol=1e-5)
        # A response longer than the cap alone is refused as with the bundle's length.
        too_long = {"prompt": "hi", "response": " ".join(["bread"] * 20)}
        refused = httpx.post(capped.url + "/v1/score", json={"items": [too_long]}, timeout=30)
        assert refused.status_code == 422
        assert refused.json()["error"]["type"] == "response_too_long"
        assert refused.json()["error"]["max_length"] == 16
    with serve_app(settings_for(heads_bundle)) as full:
        r = httpx.post(full.url + "/v1/score", json={"items": [item]}, timeout=30).json()
        assert r["truncated"] == [False]


def test_max_batch_tokens_follows_a_long_bundle(tmp_path: Path) -> None:
    bundle = build_bundle(tmp_path / "long", max_length=40_000, name="long")
    with serve_app(settings_for(bundle, warmup=False)) as server:
        assert server.state.scorer.batcher.max_batch_tokens == 40_000
        r = httpx.post(server.url + "/v1/score", json={"items": [{"text": "hello"}]}, timeout=30)
        assert r.status_code == 200
    with serve_app(settings_for(bundle, warmup=False, max_length=512)) as capped:
        assert capped.state.scorer.batcher.max_batch_tokens == 16384


def test_start_up_refuses_a_batch_budget_below_the_max_length(tmp_path: Path) -> None:
    from rmserve.service.loading import check_bundle

    bundle = build_bundle(tmp_path / "b", max_length=64)
    with pytest.raises(ValueError, match="RMSERVE_MAX_BATCH_TOKENS") as info:
        check_bundle(settings_for(bundle, max_batch_tokens=32))
    assert "RMSERVE_MAX_LENGTH" in str(info.value)
    assert check_bundle(settings_for(bundle, max_batch_tokens=32, max_length=32)).max_length == 64
    with pytest.raises(ValueError, match="above the bundle's max_length"):
        check_bundle(settings_for(bundle, max_length=65))


def test_length_settings_arithmetic() -> None:
    from rmserve.service.settings import ServiceSettings

    s = ServiceSettings()
    assert s.max_length == 0
    assert s.max_batch_tokens == 0
    assert s.item_max_length(512) == 512
    assert s.batch_token_budget(512) == 16384
    assert s.batch_token_budget(32768) == 32768
    assert ServiceSettings(max_length=100).item_max_length(512) == 100
    assert ServiceSettings(max_batch_tokens=4096).batch_token_budget(512) == 4096
    with pytest.raises(ValueError, match="lower RMSERVE_MAX_LENGTH"):
        ServiceSettings(max_batch_tokens=1000).batch_token_budget(2048)
    with pytest.raises(ValueError, match="at least 2"):
        ServiceSettings(max_length=1)


def test_max_length_is_a_flag_and_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from rmserve.cli import build_parser
    from rmserve.service.settings import ServiceSettings

    monkeypatch.setenv("RMSERVE_MAX_LENGTH", "300")
    assert ServiceSettings().max_length == 300
    args = build_parser().parse_args(["serve", "some-bundle", "--max-length", "200"])
    assert args.max_length == 200


# --- a model whose output does not fit the manifest ------------------------------------------


def test_a_model_that_disagrees_with_its_labels_is_refused_at_load(
    heads_bundle: Path, tmp_path: Path
) -> None:
    import shutil

    from rmserve.manifest import BundleError
    from rmserve.service.loading import load_model

    bundle = tmp_path / "bundle"
    shutil.copytree(heads_bundle, bundle)
    manifest = json.loads((bundle / "rmserve.json").read_text())
    manifest.update(labels=["a", "b"], reward_head=0)
    (bundle / "rmserve.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"lists 2 label\(s\) \['a', 'b'\]"):
        load_model(settings_for(bundle))


def test_a_model_answering_too_few_rows_fails_its_requests(heads_bundle: Path) -> None:
    from rmserve.service.loading import load_model

    settings = settings_for(heads_bundle, max_wait_ms=50.0, warmup=False)
    model = load_model(settings)
    real_run = model.runtime.run

    def short_run(input_ids: Any, attention_mask: Any, instance: int = 0) -> Any:
        out = real_run(input_ids, attention_mask, instance)
        return out[:-1] if input_ids.shape[0] > 1 else out

    model.runtime.run = short_run  # type: ignore[method-assign]
    with serve_app(settings, model) as server:
        two = {"items": [{"text": "hello"}, {"text": "no"}]}
        r = httpx.post(server.url + "/v1/score", json=two, timeout=30)
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "inference_error"
        # The service goes on: a batch of one is answered.
        one = httpx.post(server.url + "/v1/score", json={"items": [{"text": "hi"}]}, timeout=30)
        assert one.status_code == 200
