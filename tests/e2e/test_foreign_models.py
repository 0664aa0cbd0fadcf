"""Reward models people already have: exported, served, and scored as transformers scores them.

For each template family of the model zoo (tiny models built from configs with the chat
templates of their families) and for an OpenAssistant-style pair encoder: ``export_bundle``
on the checkpoint folder, then a real server on loopback with an API key, then every door
(``/v1/score`` in its three forms, ``/v1/rank``, ``/v1/compare``, ``/classify`` with text with
and without BOS and with ``messages``, ``/get_reward``, the client and the TRL reward
function) against the model card's snippet run in transformers on the same conversation::

    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_tensors="pt")
    reward = model(ids).logits[0][0]
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from rmserve.client import RewardClient, trl_reward_func
from rmserve.formatting import ChatTemplateFormat, TextPairFormat
from rmserve.manifest import load_bundle
from tests import model_zoo
from tests.client.client_servers import start_service

pytestmark = pytest.mark.slow

KEY = "foreign-models-key-0123456789"
TOLERANCE = 1e-4
PROMPTS = ["How do I bake bread?", "Is raw dough safe to eat? 🍞", "Übersetze: Katze"]
RESPONSES = [
    "Mix flour, water, salt and yeast; knead; let it rise; bake.",
    "No: raw flour and eggs can carry bacteria.",
    "  Cat. {{ not a variable }} <|im_end|>\n",
]


def _conversation(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


class ModelCard:
    """The model card's snippet: transformers' tokenizer and model, nothing from rmserve."""

    def __init__(self, path: Path):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        self.model: Any = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def text(self, conversation: list[dict[str, str]]) -> str:
        return str(self.tokenizer.apply_chat_template(conversation, tokenize=False))

    def reward(self, conversation: list[dict[str, str]]) -> float:
        import torch

        if self.tokenizer.chat_template:
            inputs = self.tokenizer.apply_chat_template(
                conversation, tokenize=True, return_tensors="pt", return_dict=True
            )
        else:  # OpenAssistant's DeBERTa reward models: tokenizer(question, answer)
            inputs = self.tokenizer(
                conversation[0]["content"], conversation[1]["content"], return_tensors="pt"
            )
        with torch.no_grad():
            return float(self.model(**inputs).logits[0][0])


class Served:
    def __init__(self, url: str, card: ModelCard, bundle: Path):
        self.url = url
        self.card = card
        self.bundle = bundle

    def post(self, path: str, body: Any) -> Any:
        answer = httpx.post(
            self.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        return answer.json()


TEMPLATE_FAMILIES = [f for f in model_zoo.FAMILIES if f != "raising"]
FAMILIES = [*TEMPLATE_FAMILIES, "pair"]


@pytest.fixture(scope="module", params=FAMILIES)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    from rmserve.training.export import ExportOptions, export_bundle

    family = request.param
    root = tmp_path_factory.mktemp(f"foreign-{family}")
    if family == "pair":
        checkpoint = model_zoo.build_pair_encoder(root / "checkpoint")
    else:
        checkpoint = model_zoo.build_decoder(root / "checkpoint", family)
    export_bundle(checkpoint, root / "bundle", ExportOptions(max_length=512))
    service = start_service(root / "bundle", api_keys=KEY, log_level="warning")
    try:
        yield Served(service.url, ModelCard(checkpoint), root / "bundle")
    finally:
        service.stop()


def _expected(served: Served) -> np.ndarray:
    return np.array(
        [served.card.reward(_conversation(p, r)) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    )


def test_the_bundle_carries_the_models_format(served: Served) -> None:
    manifest = load_bundle(served.bundle)
    expected = TextPairFormat if served.card.tokenizer.chat_template is None else ChatTemplateFormat
    assert isinstance(manifest.text_format, expected)
    parity = manifest.variants["fp32"].parity
    assert parity["text_path_max_abs_diff"] <= TOLERANCE
    assert parity["text_path_conversations"] >= 4


def test_v1_doors_match_transformers(served: Served) -> None:
    expected = _expected(served)
    pairs = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    scored = served.post("/v1/score", {"items": pairs})["scores"]
    assert np.max(np.abs(np.array(scored) - expected)) <= TOLERANCE
    messages = [{"messages": _conversation(p, r)} for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    scored = served.post("/v1/score", {"items": messages})["scores"]
    assert np.max(np.abs(np.array(scored) - expected)) <= TOLERANCE
    as_messages = [
        {"prompt": [{"role": "user", "content": p}], "response": r}
        for p, r in zip(PROMPTS, RESPONSES, strict=True)
    ]
    scored = served.post("/v1/score", {"items": as_messages})["scores"]
    assert np.max(np.abs(np.array(scored) - expected)) <= TOLERANCE

    prompt = PROMPTS[0]
    want = [served.card.reward(_conversation(prompt, r)) for r in RESPONSES]
    ranked = served.post("/v1/rank", {"prompt": prompt, "responses": RESPONSES})
    assert np.max(np.abs(np.array(ranked["scores"]) - want)) <= TOLERANCE
    assert [r["index"] for r in ranked["ranking"]] == list(np.argsort(-np.array(want)))
    compared = served.post("/v1/compare", {"prompt": prompt, "a": RESPONSES[0], "b": RESPONSES[1]})
    assert np.max(np.abs(np.array(compared["scores"]) - want[:2])) <= TOLERANCE


# A pair encoder has no rendered-text form of a conversation: template families only.
@pytest.mark.parametrize("served", TEMPLATE_FAMILIES, indirect=True)
def test_rendered_text_doors_match_transformers(served: Served) -> None:
    expected = _expected(served)
    texts = [served.card.text(_conversation(p, r)) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    bos = served.card.tokenizer.bos_token or ""
    stripped = [t.removeprefix(bos) for t in texts]  # what verl sends (BOS stripped)
    for inputs in (texts, stripped):
        body = {"model": "rm", "input": inputs, "use_activation": False}
        probs = [d["probs"][0] for d in served.post("/classify", body)["data"]]
        assert np.max(np.abs(np.array(probs) - expected)) <= TOLERANCE
        scored = served.post("/v1/score", {"items": [{"text": t} for t in inputs]})["scores"]
        assert np.max(np.abs(np.array(scored) - expected)) <= TOLERANCE
    prompts = [
        str(
            served.card.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
        )
        for p in PROMPTS
    ]
    rewards = served.post("/get_reward", {"query": texts, "prompts": prompts})["rewards"]
    assert np.max(np.abs(np.array(rewards) - expected)) <= TOLERANCE
    for p, r, want in zip(PROMPTS, RESPONSES, expected, strict=True):
        body = {"model": "rm", "messages": _conversation(p, r), "use_activation": False}
        got = served.post("/classify", body)["data"][0]["probs"][0]
        assert abs(got - want) <= TOLERANCE


def test_client_and_trl_adapter_match_transformers(served: Served) -> None:
    expected = _expected(served)
    with RewardClient(served.url, api_key=KEY) as client:
        result = client.score(PROMPTS, RESPONSES)
        assert np.max(np.abs(np.array(result.scores) - expected)) <= TOLERANCE
        conversations = [_conversation(p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
        result = client.score_messages(conversations)
        assert np.max(np.abs(np.array(result.scores) - expected)) <= TOLERANCE
    reward = trl_reward_func(served.url, api_key=KEY)
    try:
        conversational = reward(
            prompts=[[{"role": "user", "content": p}] for p in PROMPTS],
            completions=[[{"role": "assistant", "content": r}] for r in RESPONSES],
        )
    finally:
        reward.close()
    assert np.max(np.abs(np.array(conversational) - expected)) <= TOLERANCE


@pytest.mark.parametrize("served", TEMPLATE_FAMILIES, indirect=True)
def test_slime_door_matches_transformers(served: Served) -> None:
    # slime's remote_rm (slime/rollout/rm_hub/__init__.py) posts one sample,
    # {"prompt": sample.prompt, "response": sample.response, "label": sample.label}, and keeps
    # the JSON answer as the reward (or its --reward-key field). sample.prompt is the policy's
    # chat template applied with add_generation_prompt=True (--apply-chat-template), else the
    # dataset's prompt as is: a string or messages.
    expected = _expected(served)
    tokenizer = served.card.tokenizer
    for prompt, response, want in zip(PROMPTS, RESPONSES, expected, strict=True):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        for sent in (rendered, prompt, [{"role": "user", "content": prompt}]):
            answer = served.post(
                "/slime/reward", {"prompt": sent, "response": response, "label": None}
            )
            assert set(answer) == {"reward", "score", "truncated"}
            assert abs(answer["reward"] - want) <= TOLERANCE, sent
            assert answer["truncated"] is False


@pytest.mark.parametrize("served", TEMPLATE_FAMILIES, indirect=True)
def test_long_responses_on_the_compat_doors_are_cut_and_flagged(served: Served) -> None:
    # The bundle's max_length is 512 tokens: this response alone does not fit.
    response = "bread and butter " * 400
    conversation = _conversation(PROMPTS[0], response)
    text = served.card.text(conversation)
    slime = served.post("/slime/reward", {"prompt": PROMPTS[0], "response": response})
    assert slime["truncated"] is True
    classify = served.post("/classify", {"input": [text], "use_activation": False})
    assert classify["data"][0]["truncated"] is True
    prompt = str(
        served.card.tokenizer.apply_chat_template(
            conversation[:1], tokenize=False, add_generation_prompt=True
        )
    )
    reward = served.post("/get_reward", {"query": [text], "prompts": [prompt]})
    assert reward["extra_logs"] == {"truncated": [1.0]}
    # The same cut as /v1/score's truncate_response: the response's start, after the prompt.
    v1 = served.post(
        "/v1/score",
        {"items": [{"prompt": PROMPTS[0], "response": response}], "truncate_response": True},
    )
    assert abs(slime["reward"] - v1["scores"][0]) <= 1e-5
    assert abs(reward["rewards"][0] - v1["scores"][0]) <= 1e-5
