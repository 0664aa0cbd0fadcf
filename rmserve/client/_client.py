"""The synchronous client, :class:`RewardClient`.

Large score calls are split into chunks of at most ``max_items_per_request`` items and the
chunks are sent from a small thread pool (``max_concurrency`` threads), then reassembled in
input order. Threads, not one request after another, because the server batches *items*
across requests: with chunks in flight together the server packs them into full batches,
while a sequential loop would leave its batcher idle for a round trip between chunks. An
``httpx.Client`` is thread-safe and its connection pool is shared by the threads. The pool
lives only for the duration of one call, so a client holds no threads while idle, survives
``fork`` (dataloader workers) and needs no shutdown beyond ``close()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

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

__all__ = ["RewardClient"]


class RewardClient:
    """Blocking client for an rmserve server.

    Args:
        base_url: ``http://host:port`` of the server (a path prefix is kept); defaults to
            ``$RMSERVE_BASE_URL``.
        api_key: sent as ``Authorization: Bearer``; defaults to ``$RMSERVE_API_KEY``.
        timeout: seconds, or an ``httpx.Timeout``; ``None`` waits forever.
        max_retries: retries after the first attempt on connection errors, timeouts, 408,
            429 and 5xx (never on other 4xx).
        max_items_per_request: the most items one request carries; bigger calls are chunked.
        max_concurrency: the most chunks of one call in flight at once.
        transport: an ``httpx`` transport (tests use ``httpx.MockTransport``).
        http_client: an ``httpx.Client`` to use instead of creating one (it keeps its own
            timeout and limits); the caller closes it.
        headers: extra headers for every request.
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
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
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
        self._http = http_client or httpx.Client(
            transport=transport, timeout=self._config.timeout, limits=self._config.limits()
        )
        # Indirection so tests can record the waits instead of sleeping through them.
        self._sleep: Callable[[float], None] = time.sleep

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
        return f"RewardClient(base_url={self.base_url!r})"

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool (unless the ``http_client`` was passed in)."""
        if self._owns_http_client:
            self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- scoring ------------------------------------------------------------------------

    def score(
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
        options = scoring_options(
            normalize=normalize,
            truncate_response=truncate_response,
            aggregate=aggregate,
            uwo_lambda=uwo_lambda,
            return_members=return_members,
        )
        return self._score_items(pair_items(prompts, responses), options)

    def score_messages(
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
        return self._score_items(items, options)

    def score_texts(
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
        return self._score_items(text_items(texts), options)

    def rank(
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
        options = scoring_options(
            normalize=normalize,
            truncate_response=truncate_response,
            aggregate=aggregate,
            uwo_lambda=uwo_lambda,
            return_members=return_members,
        )
        body = rank_body(prompt, responses, top_k, options)
        if len(responses) <= self.max_items_per_request:
            return parse_rank(self._request("POST", "/v1/rank", body), len(responses))
        result = self._score_items(pair_items([prompt] * len(responses), responses), options)
        return rank_from_scores(result, top_k)

    def compare(
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
        return parse_compare(self._request("POST", "/v1/compare", body))

    # -- model and health ---------------------------------------------------------------

    def models(self) -> ModelInfo:
        """The served model's public manifest."""
        return parse_models(self._request("GET", "/v1/models"))

    def health(self) -> dict[str, Any]:
        """``GET /healthz``; raises if the process does not answer 200."""
        response = self._request("GET", "/healthz")
        try:
            body = response.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def ready(self) -> bool:
        """Whether the server has loaded its model and takes traffic (one try, no retries).

        False on 503 and when nothing listens; a 401 or 404 still raises, because those mean
        the client is misconfigured rather than the server not ready yet.
        """
        try:
            response = self._http.get(
                self._config.url("/readyz"), headers=self._config.headers, timeout=READY_TIMEOUT
            )
        except httpx.TransportError:
            return False
        if response.status_code == 200:
            return True
        if response.status_code == 503:
            return False
        raise error_for_response(response)

    def wait_until_ready(self, max_wait: float = 60.0, interval: float = 0.25) -> None:
        """Poll ``/readyz`` until it answers 200; raise APITimeoutError after ``max_wait`` s."""
        deadline = time.monotonic() + max_wait
        while not self.ready():
            if time.monotonic() >= deadline:
                raise APITimeoutError(
                    f"{self.base_url} was not ready after {max_wait:g} s; check the server log"
                )
            time.sleep(interval)

    # -- internals ----------------------------------------------------------------------

    def _score_items(self, items: list[JSON], options: JSON) -> ScoreResult:
        chunks = chunked(items, self.max_items_per_request)

        def send(chunk: Sequence[JSON], offset: int) -> ScoreChunk:
            body = score_body(chunk, options)
            try:
                response = self._request("POST", "/v1/score", body)
            except APIStatusError as e:
                shift_item_index(e, offset)
                raise
            return parse_score_chunk(response, len(chunk))

        if len(chunks) <= 1 or self.max_concurrency == 1:
            size = self.max_items_per_request
            return merge_score_chunks([send(chunk, i * size) for i, chunk in enumerate(chunks)])
        workers = min(self.max_concurrency, len(chunks))
        with ThreadPoolExecutor(workers, thread_name_prefix="rmserve-client") as pool:
            size = self.max_items_per_request
            futures: list[Future[ScoreChunk]] = [
                pool.submit(send, chunk, i * size) for i, chunk in enumerate(chunks)
            ]
            try:
                parts = [future.result() for future in futures]
            except BaseException:
                # One chunk failed: do not send the chunks still queued.
                for future in futures:
                    future.cancel()
                raise
        return merge_score_chunks(parts)

    def _request(self, method: str, path: str, body: JSON | None = None) -> httpx.Response:
        """Send with retries; return a 2xx response or raise from the exception tree."""
        policy = self._config.retry_policy
        url = self._config.url(path)
        retries_done = 0
        while True:
            retry_after: float | None = None
            error: RewardServerError
            try:
                response = self._http.request(method, url, json=body, headers=self._config.headers)
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
            self._sleep(delay)
            retries_done += 1
