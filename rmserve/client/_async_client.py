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
    ClientConfig,
    logger,
)
from rmserve.client._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    RewardServerError,
    error_for_response,
)
from rmserve.client._payloads import (
    JSON,
    ScoreChunk,
    chunked,
    compare_body,
    conversation_items,
    merge_score_chunks,
    pair_items,
    parse_compare,
    parse_models,
    parse_rank,
    parse_score_chunk,
    rank_body,
    rank_from_scores,
    score_body,
    scoring_options,
    shift_item_index,
    text_items,
)
from rmserve.client._retry import is_retryable_status
from rmserve.client._types import (
    Aggregate,
    CompareResult,
    Conversation,
    ModelInfo,
    Prompt,
    RankResult,
    ScoreResult,
)

__all__ = ["AsyncRewardClient"]


class AsyncRewardClient:
    """Async client for an rmserve server; arguments as for :class:`RewardClient`.

    ``transport`` is an ``httpx.AsyncBaseTransport`` and ``http_client`` an
    ``httpx.AsyncClient`` here.
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

    # -- configuration ------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self._config.base_url

    @property
    def max_items_per_request(self) -> int:
        return self._config.max_items_per_request

    @property
    def max_concurrency(self) -> int:
        return self._config.max_concurrency

    def __repr__(self) -> str:
        return f"AsyncRewardClient(base_url={self.base_url!r})"

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
        """Reward of each (prompt, response) pair, in input order (see RewardClient.score)."""
        items = pair_items(prompts, responses)
        options = scoring_options(
            normalize=normalize,
            truncate_response=truncate_response,
            aggregate=aggregate,
            uwo_lambda=uwo_lambda,
            return_members=return_members,
        )
        return await self._score_items(items, options)

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
        items = conversation_items(conversations)
        options = scoring_options(
            normalize=normalize,
            truncate_response=truncate_response,
            aggregate=aggregate,
            uwo_lambda=uwo_lambda,
            return_members=return_members,
        )
        return await self._score_items(items, options)

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
        options = scoring_options(
            normalize=normalize,
            truncate_response=truncate_response,
            aggregate=aggregate,
            uwo_lambda=uwo_lambda,
            return_members=return_members,
        )
        return await self._score_items(text_items(texts), options)

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
        """Responses to one prompt, best first (see RewardClient.rank)."""
        options = scoring_options(
            normalize=normalize,
            truncate_response=truncate_response,
            aggregate=aggregate,
            uwo_lambda=uwo_lambda,
            return_members=return_members,
        )
        body = rank_body(prompt, responses, top_k, options)
        if len(responses) <= self.max_items_per_request:
            return parse_rank(await self._request("POST", "/v1/rank", body), len(responses))
        result = await self._score_items(pair_items([prompt] * len(responses), responses), options)
        return rank_from_scores(result, top_k)

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
        options = scoring_options(
            normalize=normalize,
            truncate_response=truncate_response,
            aggregate=aggregate,
            uwo_lambda=uwo_lambda,
            return_members=return_members,
        )
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
        """Whether the server takes traffic (one try; False on 503 or nothing listening)."""
        try:
            response = await self._http.get(
                self._config.url("/readyz"), headers=self._config.headers, timeout=READY_TIMEOUT
            )
        except httpx.TransportError:
            return False
        if response.status_code == 200:
            return True
        if response.status_code == 503:
            return False
        raise error_for_response(response)

    async def wait_until_ready(self, max_wait: float = 60.0, interval: float = 0.25) -> None:
        """Poll ``/readyz`` until it answers 200; raise APITimeoutError after ``max_wait`` s."""
        deadline = time.monotonic() + max_wait
        while not await self.ready():
            if time.monotonic() >= deadline:
                raise APITimeoutError(
                    f"{self.base_url} was not ready after {max_wait:g} s; check the server log"
                )
            await anyio.sleep(interval)

    # -- internals ----------------------------------------------------------------------

    async def _score_items(self, items: list[JSON], options: JSON) -> ScoreResult:
        chunks = chunked(items, self.max_items_per_request)

        async def send(chunk: Sequence[JSON], offset: int) -> ScoreChunk:
            body = score_body(chunk, options)
            try:
                response = await self._request("POST", "/v1/score", body)
            except APIStatusError as e:
                shift_item_index(e, offset)
                raise
            return parse_score_chunk(response, len(chunk))

        if len(chunks) <= 1:
            return merge_score_chunks([await send(chunk, 0) for chunk in chunks])

        parts: list[ScoreChunk | None] = [None] * len(chunks)
        errors: list[Exception] = []
        limit = anyio.Semaphore(self.max_concurrency)

        async def run(index: int, chunk: Sequence[JSON], scope: anyio.CancelScope) -> None:
            # Errors are collected, not raised, so the caller gets the client's exception
            # itself rather than an ExceptionGroup; the first one cancels the other chunks.
            try:
                async with limit:
                    parts[index] = await send(chunk, index * self.max_items_per_request)
            except Exception as e:
                errors.append(e)
                scope.cancel()

        async with anyio.create_task_group() as group:
            for index, chunk in enumerate(chunks):
                group.start_soon(run, index, chunk, group.cancel_scope)
        if errors:
            raise errors[0]
        return merge_score_chunks([part for part in parts if part is not None])

    async def _request(self, method: str, path: str, body: JSON | None = None) -> httpx.Response:
        """Send with retries; return a 2xx response or raise from the exception tree."""
        policy = self._config.retry_policy
        url = self._config.url(path)
        retries_done = 0
        while True:
            retry_after: float | None = None
            error: RewardServerError
            try:
                response = await self._http.request(
                    method, url, json=body, headers=self._config.headers
                )
            except httpx.TimeoutException as e:
                error = APITimeoutError(f"{method} {url} timed out ({type(e).__name__}: {e})")
                cause: BaseException = e
            except httpx.TransportError as e:
                error = APIConnectionError(
                    f"{method} {url} failed: {type(e).__name__}: {e}; is the server running?"
                )
                cause = e
            else:
                if response.is_success:
                    return response
                status_error = error_for_response(response)
                if not is_retryable_status(response.status_code):
                    raise status_error
                error, cause, retry_after = status_error, status_error, status_error.retry_after
            if retries_done >= policy.max_retries:
                raise error from (cause if cause is not error else None)
            delay = policy.delay(retries_done, retry_after)
            logger.info("retrying %s %s in %.2f s after: %s", method, path, delay, error)
            await self._sleep(delay)
            retries_done += 1
