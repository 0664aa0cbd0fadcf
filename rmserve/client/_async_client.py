"""The asynchronous client, :class:`AsyncRewardClient`.

The twin of :class:`RewardClient`: the same arguments, methods, requests and results, with
``await``. A large score call is split into chunks of at most ``max_items_per_request``
items that are sent concurrently, at most ``max_concurrency`` at a time, and reassembled in
input order. It runs on asyncio or trio (through anyio, which httpx already depends on).

An ``httpx.AsyncClient`` belongs to the event loop that first used it; create the client
inside the loop that uses it (``async with AsyncRewardClient(...)``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import anyio
import httpx

from rmserve.client._base import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_ITEMS_PER_REQUEST,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    READY_TIMEOUT,
    BaseRewardClient,
    ClientConfig,
    ScoreCall,
)
from rmserve.client._errors import APIStatusError
from rmserve.client._payloads import (
    JSON,
    ScoreChunk,
    compare_body,
    conversation_items,
    merge_score_chunks,
    pair_items,
    parse_compare,
    parse_models,
    parse_rank,
    rank_from_scores,
    text_items,
)
from rmserve.client._types import (
    Aggregate,
    CompareResult,
    Conversation,
    ModelInfo,
    Prompt,
    RankResult,
    ScoreOptions,
    ScoreResult,
)

__all__ = ["AsyncRewardClient"]


class AsyncRewardClient(BaseRewardClient):
    """Asynchronous client for an rmserve server; arguments as for :class:`RewardClient`.

    ``transport`` is an ``httpx.AsyncBaseTransport`` and ``http_client`` an
    ``httpx.AsyncClient`` here. The scoring methods take the options of
    :class:`ScoreOptions` as keyword arguments.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._config = ClientConfig(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_items_per_request=max_items_per_request,
            max_concurrency=max_concurrency,
            headers=headers,
        )
        if http_client is not None and transport is not None:
            raise ValueError("pass either transport or http_client, not both")
        self._owns_http_client = http_client is None
        self._http = http_client or httpx.AsyncClient(
            transport=transport, timeout=self._config.timeout, limits=self._config.limits()
        )
        # Indirection so tests can record the waits instead of sleeping through them.
        self._sleep: Callable[[float], Awaitable[None]] = anyio.sleep

    # -- lifecycle ----------------------------------------------------------------------

    async def close(self) -> None:
        """Close the connection pool (unless the ``http_client`` was passed in)."""
        if self._owns_http_client:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- scoring ------------------------------------------------------------------------

    async def score(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        *,
        normalize: bool = False,
        truncate_response: bool | None = None,
        aggregate: Aggregate | None = None,
        uwo_lambda: float | None = None,
        return_members: bool = False,
    ) -> ScoreResult:
        """Reward of each (prompt, response) pair, in input order.

        A prompt is a string or a list of chat messages (the response then becomes the final
        assistant turn). ``normalize`` applies the bundle's reference mean/std;
        ``truncate_response`` True lets the server cut a response too long to fit
        (``result.truncated`` says which were cut), False refuses it: its score is nan and
        ``result.errors`` says why (a call with no item left raises the 422); None leaves it
        to the server's RMSERVE_TRUNCATE_RESPONSE (default: refuse).
        """
        options = ScoreOptions(normalize, truncate_response, aggregate, uwo_lambda, return_members)
        return await self._score_items(pair_items(prompts, responses), options)

    async def score_messages(
        self,
        conversations: Sequence[Conversation],
        *,
        normalize: bool = False,
        truncate_response: bool | None = None,
        aggregate: Aggregate | None = None,
        uwo_lambda: float | None = None,
        return_members: bool = False,
    ) -> ScoreResult:
        """Reward of each conversation's last message (the response)."""
        options = ScoreOptions(normalize, truncate_response, aggregate, uwo_lambda, return_members)
        return await self._score_items(conversation_items(conversations), options)

    async def score_texts(
        self,
        texts: Sequence[str],
        *,
        normalize: bool = False,
        truncate_response: bool | None = None,
        aggregate: Aggregate | None = None,
        uwo_lambda: float | None = None,
        return_members: bool = False,
    ) -> ScoreResult:
        """Reward of text already rendered in the bundle's text format."""
        options = ScoreOptions(normalize, truncate_response, aggregate, uwo_lambda, return_members)
        return await self._score_items(text_items(texts), options)

    async def score_items(
        self, items: Sequence[Mapping[str, Any]], options: ScoreOptions | None = None
    ) -> ScoreResult:
        """Reward of items already in ``/v1/score``'s item form (``{"prompt", "response"}``,
        ``{"messages"}`` or ``{"text"}``), as adapters build them; chunked like ``score``."""
        return await self._score_items(self._items(items), options or ScoreOptions())

    async def rank(
        self,
        prompt: Prompt,
        responses: Sequence[str],
        *,
        top_k: int | None = None,
        normalize: bool = False,
        truncate_response: bool | None = None,
        aggregate: Aggregate | None = None,
        uwo_lambda: float | None = None,
        return_members: bool = False,
    ) -> RankResult:
        """Responses to one prompt, best first, with every score in request order.

        Up to ``max_items_per_request`` responses go in one ``/v1/rank`` request; more are
        scored in chunks and ranked here the same way (highest first, ties by position).
        """
        options = ScoreOptions(normalize, truncate_response, aggregate, uwo_lambda, return_members)
        body = self._rank_request(prompt, responses, top_k, options)
        if body is not None:
            return parse_rank(await self._request("POST", "/v1/rank", body), len(responses))
        items = pair_items([prompt] * len(responses), responses)
        return rank_from_scores(await self._score_items(items, options), top_k)

    async def compare(
        self,
        prompt: Prompt,
        a: str,
        b: str,
        *,
        normalize: bool = False,
        truncate_response: bool | None = None,
        aggregate: Aggregate | None = None,
        uwo_lambda: float | None = None,
        return_members: bool = False,
    ) -> CompareResult:
        """Rewards of two responses and the probability that ``a`` is preferred.

        ``p_a_preferred`` is sigmoid(raw_a - raw_b), the model's Bradley-Terry probability,
        whether or not ``normalize`` rescales ``scores``.
        """
        options = ScoreOptions(normalize, truncate_response, aggregate, uwo_lambda, return_members)
        body = compare_body(prompt, a, b, options)
        return parse_compare(await self._request("POST", "/v1/compare", body))

    # -- model and health ---------------------------------------------------------------

    async def models(self) -> ModelInfo:
        """The served model's public manifest."""
        return parse_models(await self._request("GET", "/v1/models"))

    async def health(self) -> dict[str, Any]:
        """``GET /healthz``; raises if the process does not answer 200."""
        response = await self._request("GET", "/healthz")
        try:
            body = response.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    async def ready(self) -> bool:
        """Whether the server has loaded its model and takes traffic (one try, no retries).

        False on 503 and when nothing listens; a 401 or 404 still raises, because those mean
        the client is misconfigured rather than the server not ready yet.
        """
        url = self._config.url("/readyz")
        try:
            attempt = await self._http.get(url, headers=self._config.headers, timeout=READY_TIMEOUT)
        except httpx.TransportError as e:
            return self._ready_answer(e)
        return self._ready_answer(attempt)

    async def wait_until_ready(self, max_wait: float = 60.0, interval: float = 0.25) -> None:
        """Poll ``/readyz`` until it answers 200; raise APITimeoutError after ``max_wait`` s."""
        deadline = time.monotonic() + max_wait
        while not await self.ready():
            if time.monotonic() >= deadline:
                raise self._not_ready(max_wait)
            await self._sleep(interval)

    # -- I/O ----------------------------------------------------------------------------

    async def _score_items(self, items: list[JSON], options: ScoreOptions) -> ScoreResult:
        """Send the call's chunks, up to max_concurrency at once as tasks, in order."""
        calls = self._score_calls(items, options)
        if len(calls) <= 1:
            return merge_score_chunks([await self._send(call) for call in calls])
        parts: list[ScoreChunk | None] = [None] * len(calls)
        errors: list[Exception] = []
        limit = anyio.Semaphore(self.max_concurrency)

        async def run(index: int, call: ScoreCall, scope: anyio.CancelScope) -> None:
            # Errors are collected, not raised, so the caller gets the client's exception
            # itself rather than an ExceptionGroup; the first one cancels the other chunks.
            try:
                async with limit:
                    parts[index] = await self._send(call)
            except Exception as e:
                errors.append(e)
                scope.cancel()

        async with anyio.create_task_group() as group:
            for index, call in enumerate(calls):
                group.start_soon(run, index, call, group.cancel_scope)
        if errors:
            raise errors[0]
        return merge_score_chunks([part for part in parts if part is not None])

    async def _send(self, call: ScoreCall) -> ScoreChunk:
        try:
            return call.parse(await self._request("POST", "/v1/score", call.body))
        except APIStatusError as e:
            call.locate(e)
            raise

    async def _request(self, method: str, path: str, body: JSON | None = None) -> httpx.Response:
        """Send with retries; return a 2xx response or raise from the exception tree."""
        url = self._config.url(path)
        retries_done = 0
        while True:
            attempt: httpx.Response | httpx.TransportError
            try:
                attempt = await self._http.request(
                    method, url, json=body, headers=self._config.headers
                )
            except httpx.TransportError as e:
                attempt = e
            outcome = self._outcome(method, path, attempt, retries_done)
            if isinstance(outcome, httpx.Response):
                return outcome
            await self._sleep(outcome)
            retries_done += 1
