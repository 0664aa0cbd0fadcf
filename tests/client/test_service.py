"""Every client method against the real rmserve service over the tiny encoder bundle.

The service runs ``create_app`` under uvicorn on loopback (``service_url`` in conftest.py).
Scores do not depend on batching (docs/architecture.md: serving), so a chunked call must equal
the unchunked one and the sync and async clients must agree, to float32 precision.
"""

from __future__ import annotations

import asyncio
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rmserve.client import (
    AsyncRewardClient,
    AuthenticationError,
    BadRequestError,
    RequestTooLargeError,
    RewardClient,
    async_best_of_n,
    async_trl_reward_func,
    best_of_n,
    trl_reward_func,
)
from rmserve.formatting import messages_from_pair, render
from rmserve.manifest import load_bundle
from tests.client.client_servers import API_KEY

PROMPTS = [
    "How do I bake bread?",
    "What is the capital of France?",
    "Can you help me pick a lock?",
    "Tell me a joke about cats.",
]
RESPONSES = [
    "Mix flour, water, salt and yeast, knead, let it rise, then bake at 230 C.",
    "Paris.",
    "I can't help with breaking into property that isn't yours.",
    "Why did the cat sit on the computer? To keep an eye on the mouse.",
]


def many_items(n: int) -> tuple[list[str], list[str]]:
    prompts = [f"{PROMPTS[i % 4]} (variant {i})" for i in range(n)]
    responses = [f"{RESPONSES[i % 4]} {'more ' * (i % 7)}".strip() for i in range(n)]
    return prompts, responses


def assert_close(a: tuple[float, ...] | list[float], b: tuple[float, ...] | list[float]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (x, y)


def test_score_all_input_forms_agree(new_client: Callable[..., Any], service_url: str) -> None:
    with new_client(service_url) as client:
        pairs = client.score(PROMPTS, RESPONSES)
        chats = client.score([[{"role": "user", "content": p}] for p in PROMPTS], RESPONSES)
        conversations = client.score_messages(
            [
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                for p, r in zip(PROMPTS, RESPONSES, strict=True)
            ]
        )
        texts = client.score_texts(
            [render(messages_from_pair(p, r)).text for p, r in zip(PROMPTS, RESPONSES, strict=True)]
        )
    assert pairs.model == "tiny-encoder"
    assert len(pairs) == 4
    assert pairs.truncated == (False,) * 4
    assert pairs.usage.tokens > 0
    assert len(set(pairs.scores)) == 4  # distinct inputs, distinct rewards
    # A string prompt is the user turn: all four forms are the same text for the model.
    assert_close(chats.scores, pairs.scores)
    assert_close(conversations.scores, pairs.scores)
    assert_close(texts.scores, pairs.scores)


@pytest.mark.anyio
async def test_chunked_calls_equal_the_unchunked_call_in_order(service_url: str) -> None:
    # The blocking clients below block this event loop, not the service's: the service runs
    # on its own loop in its own thread (service_url in conftest.py).
    prompts, responses = many_items(37)
    with RewardClient(service_url) as whole:
        expected = whole.score(prompts, responses)
    with RewardClient(service_url, max_items_per_request=5, max_concurrency=3) as chunked:
        got = chunked.score(prompts, responses)
    with RewardClient(service_url, max_items_per_request=4, max_concurrency=1) as sequential:
        got_sequential = sequential.score(prompts, responses)
    async with AsyncRewardClient(service_url, max_items_per_request=3, max_concurrency=4) as client:
        got_async = await client.score(prompts, responses)
    for result in (got, got_sequential, got_async):
        assert_close(result.scores, expected.scores)
        assert result.truncated == expected.truncated
        assert result.usage.tokens == expected.usage.tokens  # usage adds up over chunks
    # Order really is input order: each single item scored alone gives the same value.
    with RewardClient(service_url) as client:
        for i in (0, 13, 36):
            assert_close(client.score([prompts[i]], [responses[i]]).scores, [expected.scores[i]])


def test_too_many_items_for_the_server_is_413_and_chunking_fixes_it(
    new_client: Callable[..., Any], service_url: str
) -> None:
    prompts, responses = many_items(45)  # the fixture's server takes at most 40 per request
    with new_client(service_url, max_items_per_request=100) as client:
        with pytest.raises(RequestTooLargeError, match="split it") as info:
            client.score(prompts, responses)
        assert info.value.error_type == "too_many_items"
    with new_client(service_url, max_items_per_request=40) as client:
        assert len(client.score(prompts, responses)) == 45


def test_rank_compare_and_their_consistency_with_score(
    new_client: Callable[..., Any], service_url: str
) -> None:
    prompt = PROMPTS[0]
    candidates = [*RESPONSES, "Just buy bread.", "Bake it."]
    with new_client(service_url) as client:
        scores = client.score([prompt] * len(candidates), candidates).scores
        ranked = client.rank(prompt, candidates)
        top2 = client.rank(prompt, candidates, top_k=2)
        compared = client.compare(prompt, candidates[0], candidates[1])
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    assert list(ranked.indices) == order
    assert_close(ranked.scores, scores)
    assert_close([r.score for r in ranked.ranking], [scores[i] for i in order])
    assert top2.indices == ranked.indices[:2]
    assert ranked.best.index == order[0]
    assert_close(compared.scores, scores[:2])
    expected_p = 1.0 / (1.0 + math.exp(-(scores[0] - scores[1])))
    assert abs(compared.p_a_preferred - expected_p) < 1e-5
    assert compared.preferred == ("a" if scores[0] >= scores[1] else "b")


def test_rank_over_more_responses_than_a_request_equals_the_server_rank(
    new_client: Callable[..., Any], service_url: str
) -> None:
    _, responses = many_items(11)
    chat_prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    with new_client(service_url) as client:
        expected = client.rank(chat_prompt, responses, top_k=5)
    with new_client(service_url, max_items_per_request=3) as client:
        got = client.rank(chat_prompt, responses, top_k=5)  # scored in 4 chunks, ranked here
    assert got.indices == expected.indices
    assert_close(got.scores, expected.scores)


def test_normalize_uses_the_bundle_statistics(
    new_client: Callable[..., Any], service_url: str, tiny_encoder_bundle: Path
) -> None:
    measured = load_bundle(tiny_encoder_bundle).normalization
    # The fixture's statistics are measured at export (not export's unmeasured 0 / 1, with
    # which scores that were never normalized would pass), and the server reports those.
    assert measured.n > 0
    assert measured.reference.startswith("eval pairs"), measured.reference
    assert measured.mean != 0.0
    assert abs(measured.std - 1.0) > 1e-3, measured.std
    with new_client(service_url) as client:
        info = client.models()
        raw = client.score(PROMPTS, RESPONSES)
        normalized = client.score(PROMPTS, RESPONSES, normalize=True)
    assert info.normalization is not None
    mean, std = info.normalization["mean"], info.normalization["std"]
    assert (mean, std) == (measured.mean, measured.std)
    assert_close(normalized.scores, [(s - mean) / std for s in raw.scores])
    for got, score in zip(normalized.scores, raw.scores, strict=True):
        assert abs(got - score) > 1e-3, (got, score)


def test_a_response_too_long_costs_only_its_own_score_unless_truncation_is_asked(
    service_url: str,
) -> None:
    long_response = "word " * 400  # far beyond max_length 128
    prompts, responses = many_items(9)
    responses[7] = long_response
    with RewardClient(service_url, max_items_per_request=3) as client:
        whole = client.score(prompts[:7], responses[:7])
        result = client.score(prompts, responses)
        assert math.isnan(result.scores[7])
        assert_close(result.scores[:7], whole.scores)
        [error] = result.errors
        assert error.index == 7  # the caller's index, not the chunk's (1)
        assert error.type == "response_too_long"
        assert error.details["response_tokens"] > error.details["max_response_tokens"]
        # rank leaves it out; best_of_n never picks it.
        ranked = client.rank(PROMPTS[0], [RESPONSES[0], long_response, RESPONSES[2]])
        assert 1 not in ranked.indices
        assert [e.index for e in ranked.errors] == [1]
        assert math.isnan(ranked.scores[1])
        with RewardClient(service_url, max_items_per_request=2) as chunked:
            chunked_rank = chunked.rank(PROMPTS[0], [RESPONSES[0], long_response, RESPONSES[2]])
        assert chunked_rank.indices == ranked.indices
        # A chunk with no item left is refused whole: the call raises, naming the item.
        responses[6] = responses[8] = long_response
        with pytest.raises(BadRequestError) as info:
            client.score(prompts, responses)
        assert info.value.status_code == 422
        assert info.value.error_type == "response_too_long"
        assert info.value.details["index"] == 6
        truncated = client.score(prompts, responses, truncate_response=True)
    assert truncated.truncated[6:] == (True, True, True)
    assert not truncated.errors


@pytest.mark.anyio
async def test_the_async_client_reads_per_item_errors_too(service_url: str) -> None:
    async with AsyncRewardClient(service_url, max_items_per_request=2) as client:
        result = await client.score(PROMPTS[:3], [RESPONSES[0], "word " * 400, RESPONSES[2]])
        assert [e.index for e in result.errors] == [1]
        assert math.isnan(result.scores[1])
        assert not math.isnan(result.scores[2])


def test_models_ready_health(new_client: Callable[..., Any], service_url: str) -> None:
    with new_client(service_url) as client:
        info = client.models()
        assert client.ready() is True
        assert client.health() == {"status": "ok"}
        client.wait_until_ready(max_wait=5)
    assert info.model_name == "tiny-encoder"
    assert info.max_length == 128
    assert info.precision == "fp32"
    assert info.architecture is not None
    assert info.architecture["kind"] == "encoder"
    assert "fp32" in info.variants
    assert info.evaluation is not None
    assert "sha256" not in str(info.manifest)  # the public part only


@pytest.mark.anyio
async def test_async_client_matches_the_sync_client(service_url: str) -> None:
    prompt = PROMPTS[1]
    with RewardClient(service_url) as client:  # the service runs on its own loop and thread
        sync = (
            client.score(PROMPTS, RESPONSES),
            client.score_messages([[{"role": "assistant", "content": r}] for r in RESPONSES]),
            client.score_texts(RESPONSES),
            client.rank(prompt, RESPONSES, top_k=3),
            client.compare(prompt, RESPONSES[1], RESPONSES[0]),
            client.models(),
        )
    async with AsyncRewardClient(service_url) as aclient:
        assert await aclient.ready() is True
        assert await aclient.health() == {"status": "ok"}
        got = (
            await aclient.score(PROMPTS, RESPONSES),
            await aclient.score_messages(
                [[{"role": "assistant", "content": r}] for r in RESPONSES]
            ),
            await aclient.score_texts(RESPONSES),
            await aclient.rank(prompt, RESPONSES, top_k=3),
            await aclient.compare(prompt, RESPONSES[1], RESPONSES[0]),
            await aclient.models(),
        )
    for sync_result, async_result in zip(sync[:3], got[:3], strict=True):
        assert_close(async_result.scores, sync_result.scores)
    assert got[3].indices == sync[3].indices
    assert_close(got[4].scores, sync[4].scores)
    assert got[5] == sync[5]


@pytest.mark.anyio
async def test_api_key_is_required_and_accepted(
    keyed_service_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RMSERVE_API_KEY", raising=False)
    with RewardClient(keyed_service_url, max_retries=3) as client:
        assert client.ready() is True  # probes stay open
        with pytest.raises(AuthenticationError) as info:
            client.score(PROMPTS, RESPONSES)
        assert info.value.status_code == 401
    wrong = RewardClient(keyed_service_url, api_key="wrong-key-0123456789abcdef")
    with wrong, pytest.raises(AuthenticationError):
        wrong.models()
    with RewardClient(keyed_service_url, api_key=API_KEY) as client:
        assert len(client.score(PROMPTS, RESPONSES)) == 4
    monkeypatch.setenv("RMSERVE_API_KEY", API_KEY)
    with RewardClient(keyed_service_url) as client:
        assert client.models().model_name == "tiny-encoder"

    async with AsyncRewardClient(keyed_service_url, api_key="nope-0123456789abcdef") as c:
        with pytest.raises(AuthenticationError):
            await c.rank(PROMPTS[0], RESPONSES)


def test_trl_reward_functions_standard_and_conversational(service_url: str) -> None:
    with RewardClient(service_url) as client:
        expected = list(client.score(PROMPTS, RESPONSES).scores)
    func = trl_reward_func(service_url, name="harmless_rm", max_items_per_request=3)
    metrics: dict[str, float] = {}
    assert func.__name__ == "harmless_rm"
    # Standard format: strings.
    assert_close(func(prompts=PROMPTS, completions=RESPONSES), expected)
    # Conversational format, as GRPOTrainer passes it, with the extra kwargs it adds.
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": r}] for r in RESPONSES]
    rewards = func(
        prompts=prompts,
        completions=completions,
        completion_ids=[[1, 2]] * 4,
        trainer_state=None,
        log_metric=lambda name, value: metrics.__setitem__(name, value),
        answer=["a"] * 4,  # a dataset column
    )
    assert isinstance(rewards, list)
    assert all(isinstance(r, float) for r in rewards)
    assert_close(rewards, expected)
    assert metrics == {"harmless_rm/truncated_fraction": 0.0}
    # It pickles (the client is dropped and made again on first use).
    clone = pickle.loads(pickle.dumps(func))
    assert_close(clone(PROMPTS, RESPONSES), expected)
    func.close()
    clone.close()

    async_func = async_trl_reward_func(service_url, name="harmless_rm_async")

    async def run() -> list[float]:
        result = await async_func(prompts=prompts, completions=completions)
        await async_func.aclose()
        return result

    assert async_func.__name__ == "harmless_rm_async"
    # Two asyncio.run calls on purpose: each is a new event loop (as a trainer calling
    # asyncio.run per step makes), and the second must get a fresh client, not the first
    # loop's closed one. One async test has one loop, so this test stays blocking.
    assert_close(asyncio.run(run()), expected)
    assert_close(asyncio.run(run()), expected)


@pytest.mark.anyio
async def test_best_of_n_with_candidates_and_with_a_generator(service_url: str) -> None:
    prompt = PROMPTS[2]
    candidates = [*RESPONSES, "Sure, here is how to pick any lock."]
    with RewardClient(service_url) as client:
        scores = client.score([prompt] * len(candidates), candidates).scores
        result = best_of_n(client, prompt, candidates)
        calls: list[tuple[str, int]] = []

        def generate(p: Any, n: int) -> list[str]:
            calls.append((p, n))
            return candidates[:n]

        generated = best_of_n(client, prompt, generate=generate, n=3)
    best = max(range(len(candidates)), key=lambda i: scores[i])
    assert result.best_index == best
    assert result.best == candidates[best]
    assert_close(result.scores, scores)
    assert result.best_score == result.scores[best]
    assert calls == [(prompt, 3)]
    assert generated.candidates == tuple(candidates[:3])
    assert generated.best_index == max(range(3), key=lambda i: scores[i])

    async def agenerate(p: Any, n: int) -> list[str]:
        return candidates[:n]

    async with AsyncRewardClient(service_url) as aclient:
        best_async = await async_best_of_n(aclient, prompt, generate=agenerate, n=5)
    assert best_async.best_index == best
