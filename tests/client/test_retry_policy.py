"""The retry policy's own rules, without a server: what RetryPolicy accepts, and how
parse_retry_after reads short waits and header names (test_retries.py covers the waits a
client asks for over real sockets)."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from rmserve.client._retry import RetryPolicy, parse_retry_after


def test_zero_retries_and_zero_delays_are_a_valid_policy() -> None:
    policy = RetryPolicy(max_retries=0, initial_delay=0.0, max_delay=0.0, max_retry_after=0.0)
    assert policy.max_retries == 0
    # Zero delays mean no wait at all, with or without Retry-After.
    assert policy.delay(0, None) == 0.0
    assert policy.delay(3, 10.0) == 0.0
    # Delays under a second are valid too (not only whole seconds).
    assert RetryPolicy(initial_delay=0.1, max_delay=0.5, max_retry_after=0.5).max_delay == 0.5


def test_negative_retries_are_refused() -> None:
    with pytest.raises(ValueError, match=r"max_retries must be >= 0, got -1"):
        RetryPolicy(max_retries=-1)


@pytest.mark.parametrize("field", ["initial_delay", "max_delay", "max_retry_after"])
def test_each_negative_delay_alone_is_refused(field: str) -> None:
    with pytest.raises(ValueError, match=r"^retry delays must be >= 0$"):
        RetryPolicy(**{field: -0.5})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "200"}, 0.2),
        ({"retry-after-ms": "0"}, 0.0),
        ({"retry-after-ms": "-300"}, 0.0),  # negative: no wait, never a negative one
        ({"Retry-After": "0.5"}, 0.5),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "-2"}, 0.0),
    ],
)
def test_sub_second_and_negative_waits_are_read_as_given(
    headers: dict[str, str], seconds: float
) -> None:
    assert parse_retry_after(headers) == pytest.approx(seconds)


def test_an_http_date_in_the_past_means_no_wait() -> None:
    past = email.utils.formatdate(time.time() - 3600, usegmt=True)
    assert parse_retry_after({"Retry-After": past}) == 0.0


def test_a_plain_dict_is_also_looked_up_in_lower_case() -> None:
    # A plain mapping is case-sensitive: "Retry-After" is looked up as written, then in lower
    # case (the form HTTP/2 and most proxies send).
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": " 7 "}) == 7.0
    assert parse_retry_after({"RETRY-AFTER": "2"}) is None


def test_httpx_headers_are_read_whatever_their_case() -> None:
    assert parse_retry_after(httpx.Headers({"RETRY-AFTER": "2"})) == 2.0
    assert parse_retry_after(httpx.Headers({"Retry-After-Ms": "250"})) == 0.25


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    # A garbled retry-after-ms falls back to Retry-After.
    assert parse_retry_after({"retry-after-ms": "soon", "Retry-After": "9"}) == 9.0
