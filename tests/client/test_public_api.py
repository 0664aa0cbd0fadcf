"""The public surface of rmserve.client, pinned; the exception tree; argument checking.

Changing ``__all__`` is an API change: this test makes it a deliberate one.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import typing
from typing import Any

import httpx
import pytest

import rmserve.client as client_module
from rmserve.client import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AsyncRewardClient,
    AuthenticationError,
    BadRequestError,
    CompareResult,
    InternalServerError,
    ItemError,
    NotFoundError,
    OverloadedError,
    RankResult,
    RequestTooLargeError,
    RewardClient,
    RewardServerError,
    ScoreResult,
    Usage,
    best_of_n,
)
from rmserve.client._trl import trl_items

PUBLIC = {
    "Aggregate",
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncRewardClient",
    "AsyncTRLRewardFunction",
    "AuthenticationError",
    "BadRequestError",
    "BestOfN",
    "CompareResult",
    "InternalServerError",
    "ItemError",
    "Message",
    "ModelInfo",
    "NotFoundError",
    "OverloadedError",
    "RankResult",
    "RankedResponse",
    "RequestTooLargeError",
    "RewardClient",
    "RewardServerError",
    "ScoreOptions",
    "ScoreResult",
    "TRLRewardFunction",
    "Usage",
    "async_best_of_n",
    "async_trl_reward_func",
    "best_of_n",
    "trl_reward_func",
}


# The names of PUBLIC that are neither a class nor a function, with what each is bound to.
CONSTANTS = {"API_KEY_ENV": "RMSERVE_API_KEY", "BASE_URL_ENV": "RMSERVE_BASE_URL"}
TYPE_ALIASES = {"Aggregate": ("mean", "min", "uwo")}  # Literal aliases: their values
# Lower-case factory names bound to the class they make (``trl_reward_func(...)``).
FACTORIES = {
    "trl_reward_func": "TRLRewardFunction",
    "async_trl_reward_func": "AsyncTRLRewardFunction",
}


def test_all_is_pinned_and_importable() -> None:
    assert set(client_module.__all__) == PUBLIC
    assert len(client_module.__all__) == len(PUBLIC)  # no duplicates
    assert {*CONSTANTS, *TYPE_ALIASES, *FACTORIES} <= PUBLIC
    for name in client_module.__all__:
        value = getattr(client_module, name)
        assert value is not None, name
        assert not inspect.ismodule(value), name
        if name in CONSTANTS:
            assert type(value) is str, (name, value)
            assert value == CONSTANTS[name], (name, value)
        elif name in TYPE_ALIASES:
            assert typing.get_origin(value) is typing.Literal, (name, value)
            assert typing.get_args(value) == TYPE_ALIASES[name], (name, value)
        else:
            # A class or a function of the package itself, under its own name: not a stray
            # re-export, a value, or one public name bound to another's object.
            assert inspect.isclass(value) or inspect.isfunction(value), (name, value)
            assert value.__module__.startswith("rmserve.client."), (name, value.__module__)
            assert value.__name__ == FACTORIES.get(name, name), (name, value.__name__)


def test_exception_tree_matches_the_docstring() -> None:
    parents = {
        APIConnectionError: RewardServerError,
        APITimeoutError: APIConnectionError,
        APIResponseValidationError: RewardServerError,
        APIStatusError: RewardServerError,
        BadRequestError: APIStatusError,
        AuthenticationError: APIStatusError,
        NotFoundError: APIStatusError,
        RequestTooLargeError: APIStatusError,
        OverloadedError: APIStatusError,
        InternalServerError: APIStatusError,
    }
    doc = client_module.__doc__ or ""
    for cls, parent in parents.items():
        assert cls.__bases__ == (parent,), cls
        assert re.search(rf"\b{cls.__name__}\b", doc), f"{cls.__name__} missing from the tree"
    assert RewardServerError.__bases__ == (Exception,)


def test_the_sync_and_async_clients_have_the_same_methods_and_arguments() -> None:
    methods = [
        "score",
        "score_messages",
        "score_texts",
        "rank",
        "compare",
        "models",
        "health",
        "ready",
        "wait_until_ready",
        "close",
    ]
    for name in methods:
        sync_signature = inspect.signature(getattr(RewardClient, name))
        async_method = getattr(AsyncRewardClient, name)
        assert inspect.iscoroutinefunction(async_method), name
        assert list(inspect.signature(async_method).parameters) == list(
            sync_signature.parameters
        ), name
    assert list(inspect.signature(RewardClient).parameters) == list(
        inspect.signature(AsyncRewardClient).parameters
    )


def test_results_are_frozen() -> None:
    result = ScoreResult("m", (1.0,), (False,), Usage(3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.scores = (2.0,)  # type: ignore[misc]
    compare = CompareResult("m", (2.0, 1.0), 0.73, (False, False), Usage(4))
    assert compare.preferred == "a"
    assert RankResult("m", (), (), (), Usage(0)).indices == ()


def _offline_client(**kwargs: object) -> RewardClient:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"nothing should be sent, got {request.method} {request.url}")

    return RewardClient("http://127.0.0.1:9", transport=httpx.MockTransport(refuse), **kwargs)  # type: ignore[arg-type]


def test_bad_arguments_fail_before_anything_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _offline_client()
    with pytest.raises(TypeError, match="prompts must be a list"):
        client.score("one prompt", ["a", "b"])
    with pytest.raises(ValueError, match=r"2 prompts and 1 responses.*\[prompt\] \* len"):
        client.score(["p", "q"], ["a"])
    with pytest.raises(TypeError, match=r"responses\[1\] must be a str"):
        client.score(["p", "q"], ["a", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"prompts\[0\]\[0\] needs both 'role' and 'content'"):
        client.score([[{"role": "user"}]], ["a"])
    with pytest.raises(ValueError, match=r"conversations\[0\] is empty"):
        client.score_messages([[]])
    with pytest.raises(ValueError, match="top_k"):
        client.rank("p", ["a"], top_k=0)
    with pytest.raises(ValueError, match="responses is empty"):
        client.rank("p", [])
    with pytest.raises(ValueError, match="exactly one of candidates"):
        best_of_n(client, "p")
    with pytest.raises(ValueError, match="needs n"):
        best_of_n(client, "p", generate=lambda p, n: ["a"])
    with pytest.raises(ValueError, match="generate returned 1 candidates, expected n=2"):
        best_of_n(client, "p", generate=lambda p, n: ["a"], n=2)
    assert client.score([], []).scores == ()  # nothing to score, nothing sent
    monkeypatch.delenv("RMSERVE_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="RMSERVE_BASE_URL"):
        RewardClient()
    with pytest.raises(ValueError, match="has no scheme; use 'http://localhost:8000'"):
        RewardClient("localhost:8000")
    with pytest.raises(ValueError, match="max_items_per_request"):
        RewardClient("http://h:1", max_items_per_request=0)


def test_trl_items_maps_both_trl_formats() -> None:
    assert trl_items(["p"], ["r"]) == [{"prompt": "p", "response": "r"}]
    conversational = trl_items(
        [[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]],
        [[{"role": "assistant", "content": "a", "tool_calls": None}]],
    )
    assert conversational == [
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},  # extra keys dropped
            ]
        }
    ]
    assert trl_items(["u"], [[{"role": "assistant", "content": "a"}]]) == [
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    ]
    with pytest.raises(ValueError, match="2 prompts and 1 completions"):
        trl_items(["a", "b"], ["c"])


def test_mock_transport_round_trip_and_base_url_prefix() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={"model": "m", "scores": [0.5], "truncated": [False], "usage": {"tokens": 7}},
        )

    with RewardClient("http://gateway:8080/rm/", transport=httpx.MockTransport(handler)) as c:
        result = c.score([[{"role": "user", "content": "hi"}]], ["hello"])
    assert result == ScoreResult("m", (0.5,), (False,), Usage(7))
    assert str(seen[0].url) == "http://gateway:8080/rm/v1/score"  # a path prefix is kept
    assert json.loads(seen[0].content) == {
        "items": [
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        ],
        "normalize": False,
    }  # no truncate_response: the server's setting decides


def test_a_null_score_is_read_as_nan_only_when_errors_explain_it() -> None:
    explained = {
        "model": "m",
        "scores": [0.5, None],
        "truncated": [False, False],
        "errors": [{"index": 1, "type": "invalid_item", "message": "item 1: bad", "details": {}}],
        "usage": {"tokens": 7},
    }
    unexplained = {**explained, "errors": []}

    def handler(body: dict[str, Any]) -> httpx.MockTransport:
        return httpx.MockTransport(lambda request: httpx.Response(200, json=body))

    with RewardClient("http://rm", transport=handler(explained)) as c:
        result = c.score(["p", "p"], ["a", "b"])
    assert result.scores[0] == 0.5
    assert math.isnan(result.scores[1])
    assert result.errors == (ItemError(1, "invalid_item", "item 1: bad", {}),)
    with (
        RewardClient("http://rm", transport=handler(unexplained)) as c,
        pytest.raises(APIResponseValidationError, match="not a number"),
    ):
        c.score(["p", "p"], ["a", "b"])


@pytest.mark.slow  # importing trl imports torch and transformers (~15 s on 2 cores)
def test_trl_contract_as_trl_itself_checks_it() -> None:
    """TRL names and dispatches reward functions with these helpers (trl/trainer/utils.py)."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    sync_func = client_module.trl_reward_func("http://127.0.0.1:9", name="rm_sync")
    async_func = client_module.async_trl_reward_func("http://127.0.0.1:9", name="rm_async")
    assert trl_utils.get_callable_name(sync_func) == "rm_sync"
    assert trl_utils.get_callable_name(async_func) == "rm_async"
    assert not trl_utils.is_async_callable(sync_func)
    assert trl_utils.is_async_callable(async_func)
    sync_func.close()


def test_ordered_collections_are_accepted_and_sets_refused() -> None:
    np = pytest.importorskip("numpy")
    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        return httpx.Response(
            200, json={"model": "m", "scores": [1.0], "truncated": [False], "usage": {}}
        )

    with RewardClient("http://rm:1", transport=httpx.MockTransport(handler)) as client:
        # What a parquet-backed dataset (verl) hands over: numpy object arrays of messages.
        chat = np.array([{"role": "user", "content": "hi"}], dtype=object)
        assert client.score((chat,), np.array(["yo"])).scores == (1.0,)
        with pytest.raises(TypeError, match="prompts must be a list, got set"):
            client.score({"p"}, ["x"])  # type: ignore[arg-type]  # the wrong type, on purpose
    assert json.loads(sent[0])["items"] == [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
