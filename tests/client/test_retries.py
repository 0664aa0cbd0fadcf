"""Retries and errors over real sockets, against purpose-built loopback servers.

The clients' sleep is replaced by a recorder, so the tests check the waits the client asked
for (Retry-After honoured, backoff grown) without spending them, and no timing decides a
result. Every test runs with the blocking and the async client (``make_client``).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable

import pytest

from rmserve.client import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    OverloadedError,
    RequestTooLargeError,
    RewardClient,
)
from rmserve.client._retry import RetryPolicy, parse_retry_after
from tests.client.client_servers import Recorded, Reply, ScriptedServer, score_reply
from tests.client.conftest import ClientFactory

Factory = Callable[..., ScriptedServer]


def error(status: int, type_: str, message: str, **headers: str) -> Reply:
    return Reply(status, {"error": {"type": type_, "message": message}}, dict(headers))


def test_429_with_retry_after_then_200_is_retried_after_the_wait(
    make_client: ClientFactory, scripted: Factory
) -> None:
    server = scripted(
        [error(429, "queue_full", "queue full", **{"Retry-After": "2"})], default=score_reply
    )
    client, waits = make_client(server.url)
    with client:
        result = client.score(["p"], ["abc"])
    assert result.scores == (3.0,)
    assert len(server.requests) == 2
    assert server.requests[0].body == server.requests[1].body  # the same request again
    assert len(waits) == 1
    assert 2.0 <= waits[0] <= 2.5  # Retry-After honoured, padded by at most 25%


def test_retry_after_as_http_date_and_its_cap(
    make_client: ClientFactory, scripted: Factory
) -> None:
    in_30s = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28.0 <= (parse_retry_after({"Retry-After": in_30s}) or 0) <= 30.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    server = scripted(
        [error(503, "unavailable", "draining", **{"Retry-After": "3600"})], default=score_reply
    )
    client, waits = make_client(server.url)
    with client:
        client.score(["p"], ["x"])
    cap = RetryPolicy().max_retry_after
    assert cap <= waits[0] <= cap * 1.25  # an hour is capped to a minute


def test_5xx_backoff_grows_then_gives_up_with_the_last_error(
    make_client: ClientFactory, scripted: Factory
) -> None:
    server = scripted(default=lambda request: error(500, "internal_error", "model failed"))
    client, waits = make_client(server.url, max_retries=3)
    with client, pytest.raises(InternalServerError) as info:
        client.score(["p"], ["x"])
    assert len(server.requests) == 4  # 1 + 3 retries
    assert info.value.status_code == 500
    assert info.value.error_type == "internal_error"
    assert "model failed" in str(info.value)
    # No Retry-After: 0.5, 1, 2 s times a jitter in [0.75, 1].
    for wait, base in zip(waits, [0.5, 1.0, 2.0], strict=True):
        assert 0.75 * base <= wait <= base


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, AuthenticationError),
        (404, NotFoundError),
        (413, RequestTooLargeError),
        (422, BadRequestError),
        (415, APIStatusError),
    ],
)
def test_other_4xx_are_never_retried(
    make_client: ClientFactory, scripted: Factory, status: int, error_class: type[APIStatusError]
) -> None:
    server = scripted(default=lambda request: error(status, "some_type", f"says {status}"))
    client, waits = make_client(server.url, max_retries=5)
    with client, pytest.raises(error_class) as info:
        client.score(["p"], ["x"])
    assert type(info.value) is error_class
    assert len(server.requests) == 1
    assert waits == []
    assert info.value.status_code == status
    assert info.value.error_type == "some_type"
    assert f"says {status}" in info.value.message


def test_overloaded_until_the_end_carries_retry_after(
    make_client: ClientFactory, scripted: Factory
) -> None:
    server = scripted(
        default=lambda request: error(503, "unavailable", "loading", **{"Retry-After": "1"})
    )
    client, waits = make_client(server.url, max_retries=2)
    with client, pytest.raises(OverloadedError) as info:
        client.rank("p", ["a", "b"])
    assert len(server.requests) == 3
    assert len(waits) == 2
    assert info.value.retry_after == 1.0


def test_422_details_and_non_json_error_bodies(
    make_client: ClientFactory, scripted: Factory
) -> None:
    too_long = Reply(
        422,
        {
            "error": {
                "type": "response_too_long",
                "message": "response has 300 tokens, budget 126",
                "response_tokens": 300,
                "budget": 126,
            }
        },
    )
    proxy = Reply(502, b"<html>Bad Gateway</html>", {"Content-Type": "text/html"})
    server = scripted([too_long, proxy, proxy, proxy])
    client, _ = make_client(server.url)
    with client:
        with pytest.raises(BadRequestError) as info:
            client.score(["p"], ["x" * 1000])
        assert info.value.details == {"response_tokens": 300, "budget": 126}
        assert "budget 126" in str(info.value)
        with pytest.raises(InternalServerError, match="Bad Gateway"):
            client.score(["p"], ["x"])


def test_connection_refused_is_retried_then_raises(
    make_client: ClientFactory, refused_url: str
) -> None:
    client, waits = make_client(refused_url, max_retries=2)
    with client:
        with pytest.raises(APIConnectionError, match="is the server running"):
            client.score(["p"], ["x"])
        assert len(waits) == 2  # two retries were attempted
        assert client.ready() is False  # ready() reports, does not raise


def test_dropped_connection_is_retried(make_client: ClientFactory, scripted: Factory) -> None:
    server = scripted([Reply(drop=True)], default=score_reply)
    client, waits = make_client(server.url)
    with client:
        assert client.score(["p"], ["xy"]).scores == (2.0,)
    assert len(server.requests) == 2
    assert len(waits) == 1


def test_timeout_raises_api_timeout_error(make_client: ClientFactory, scripted: Factory) -> None:
    server = scripted([Reply(delay=1.0), Reply(delay=1.0)], default=score_reply)
    client, waits = make_client(server.url, timeout=0.2, max_retries=1)
    with client, pytest.raises(APITimeoutError) as info:
        client.score(["p"], ["x"])
    assert isinstance(info.value, APIConnectionError)  # a timeout is a connection problem
    assert len(waits) == 1


def test_2xx_with_a_broken_body_is_a_validation_error(
    make_client: ClientFactory, scripted: Factory
) -> None:
    server = scripted(
        [
            Reply(200, {"model": "m", "scores": [1.0]}),  # 1 score for 2 items
            Reply(200, b"not json", {"Content-Type": "text/plain"}),
        ]
    )
    client, _ = make_client(server.url)
    with client:
        with pytest.raises(APIResponseValidationError, match="1 entries for 2 items"):
            client.score(["p", "q"], ["x", "y"])
        with pytest.raises(APIResponseValidationError, match="not JSON"):
            client.score(["p"], ["x"])


def test_a_failing_chunk_fails_the_call_with_its_own_error(
    make_client: ClientFactory, scripted: Factory
) -> None:
    def reply(request: Recorded) -> Reply:
        items = request.body["items"]
        bad = [i for i, item in enumerate(items) if item["response"] == "bad"]
        if bad:  # the server names the item by its index in this request
            error = {"type": "response_too_long", "message": "item too long", "index": bad[0]}
            return Reply(422, {"error": error})
        return score_reply(request)

    server = scripted(default=reply)
    responses = ["ok"] * 9 + ["bad"] + ["ok"] * 10
    client, _ = make_client(server.url, max_items_per_request=4, max_concurrency=3)
    with client, pytest.raises(BadRequestError, match="item too long") as info:
        client.score(["p"] * len(responses), responses)
    # Item 9 of the call is item 1 of its chunk (items 8-11): the error says 9.
    assert info.value.details["index"] == 9
    assert "(item 9 of the call)" in str(info.value)


def test_headers_carry_the_key_and_the_user_agent(
    scripted: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = scripted(default=score_reply)
    monkeypatch.setenv("RMSERVE_API_KEY", "from-the-environment")
    with RewardClient(server.url) as client:
        client.score(["p"], ["x"])
    with RewardClient(server.url, api_key="explicit") as client:
        client.score(["p"], ["x"])
    first, second = server.requests
    assert first.headers["Authorization"] == "Bearer from-the-environment"
    assert second.headers["Authorization"] == "Bearer explicit"
    assert first.headers["User-Agent"].startswith("rmserve-client/")
    assert "explicit" not in repr(client)
    assert "explicit" not in repr(client._config)
