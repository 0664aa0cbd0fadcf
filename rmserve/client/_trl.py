"""Reward functions for TRL's ``GRPOTrainer`` (and anything with its calling convention).

TRL calls each reward function as ``func(prompts=..., completions=..., completion_ids=...,
**dataset_columns, trainer_state=..., log_extra=..., log_metric=...)`` and expects one float
(or None) per completion; it logs the function under ``func.__name__``. Prompts and
completions come in one of two shapes:

- standard: ``prompts[i]`` and ``completions[i]`` are strings;
- conversational: ``prompts[i]`` is a list of chat messages and ``completions[i]`` a list
  holding the assistant message(s) that were generated.

Both map onto ``POST /v1/score``. Conversations go as ``{"messages": prompt + completion}``
and the server renders them with the bundle's own text format, exactly as at training time.
Strings go, by default (``standard_format="pair"``), as ``{"prompt", "response"}``: right when
a prompt is a plain question. When the dataset's prompts are already rendered in the
model's text format (an HH transcript ending in ``"\n\nAssistant:"``), pass
``standard_format="concat"``: ``prompt + completion`` is then scored as caller-rendered text,
which is what TRL itself does with a local reward model.

Against an ensemble bundle, ``aggregate="uwo"`` (with ``uwo_lambda``) or ``"min"`` makes the
reward conservative where the members disagree (Coste et al. 2023), and the members' mean std
is logged as ``<name>/reward_std``.

The functions are callable objects rather than closures so that they pickle (TRL and
accelerate may pickle reward functions): the HTTP client is dropped on pickling and made
again on first use. An async function is detected by TRL through its ``async __call__`` and
run on TRL's background event loop, concurrently with other async reward functions.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import httpx

from rmserve.client._async_client import AsyncRewardClient
from rmserve.client._base import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_ITEMS_PER_REQUEST,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    ClientConfig,
)
from rmserve.client._client import RewardClient
from rmserve.client._payloads import JSON, pair_items, prompt_fields
from rmserve.client._types import Aggregate, ScoreOptions, ScoreResult

__all__ = [
    "AsyncTRLRewardFunction",
    "TRLRewardFunction",
    "async_trl_reward_func",
    "trl_items",
    "trl_reward_func",
]

DEFAULT_NAME = "rmserve_reward"


StandardFormat = Literal["pair", "concat"]


def trl_items(
    prompts: Sequence[Any], completions: Sequence[Any], standard_format: StandardFormat = "pair"
) -> list[JSON]:
    """Score items for TRL's (prompts, completions), standard or conversational."""
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("prompts and completions must be lists (one entry per completion)")
    if len(prompts) != len(completions):
        raise ValueError(
            f"got {len(prompts)} prompts and {len(completions)} completions; TRL passes one "
            "prompt per completion"
        )
    items: list[JSON] = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if isinstance(prompt, str) and isinstance(completion, str):
            if standard_format == "concat":
                items.append({"text": prompt + completion})
            else:
                items.extend(pair_items([prompt], [completion]))
            continue
        # Conversational: the prompt's messages, then the generated message(s).
        if isinstance(prompt, str):
            messages: list[Any] = [{"role": "user", "content": prompt}]
        else:
            messages = list(prompt_fields(prompt, f"prompts[{i}]")["messages"])
        if isinstance(completion, str):
            messages.append({"role": "assistant", "content": completion})
        elif isinstance(completion, Mapping):  # one message not wrapped in a list
            messages.extend(prompt_fields([completion], f"completions[{i}]")["messages"])
        else:
            messages.extend(prompt_fields(completion, f"completions[{i}]")["messages"])
        items.append({"messages": messages})
    return items


class _RewardFunctionBase:
    """Settings shared by the sync and async reward functions."""

    def __init__(
        self,
        base_url: str | None,
        *,
        name: str,
        options: ScoreOptions,
        standard_format: StandardFormat,
        client_settings: dict[str, Any],
    ) -> None:
        """``options``: how every call is scored (checked when made, so a bad aggregate
        fails at construction, not at the first step); ``client_settings``: the keyword
        arguments of the client made on first use."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name must be a non-empty string (TRL logs it), got {name!r}")
        self.__name__ = name  # what TRL logs: rewards/<name>/mean
        self.__qualname__ = name
        self.base_url = base_url
        if standard_format not in ("pair", "concat"):
            raise ValueError(f"standard_format must be 'pair' or 'concat', got {standard_format!r}")
        self.options = options
        self.standard_format: StandardFormat = standard_format
        self._client_kwargs = client_settings

    @property
    def normalize(self) -> bool:
        return self.options.normalize

    @property
    def truncate_response(self) -> bool | None:
        return self.options.truncate_response

    def _log(self, result: ScoreResult, kwargs: Mapping[str, Any]) -> None:
        # TRL passes log_metric(name, value); averaged per logging step next to the reward.
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and len(result):
            fraction = sum(result.truncated) / len(result)
            log_metric(f"{self.__name__}/truncated_fraction", fraction)
            spread = [s for s in result.std if not math.isnan(s)]
            if spread and any(spread):  # an ensemble: how much its members disagree
                log_metric(f"{self.__name__}/reward_std", sum(spread) / len(spread))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.__name__!r}, base_url={self.base_url!r})"


class TRLRewardFunction(_RewardFunctionBase):
    """A reward function for ``GRPOTrainer(reward_funcs=[...])`` that asks an rmserve server:
    ``(prompts, completions, **kwargs) -> list[float]``, backed by a :class:`RewardClient`
    (``trl_reward_func(...)`` makes one).

    ``truncate_response`` defaults to True here (unlike the client): a rollout longer than the
    model's ``max_length`` would otherwise stop training with a 422. The fraction of cut
    responses is logged through TRL's ``log_metric`` as ``<name>/truncated_fraction``.
    ``standard_format`` says how string prompts are sent (see the module docstring).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        name: str = DEFAULT_NAME,
        api_key: str | None = None,
        normalize: bool = False,
        truncate_response: bool = True,
        aggregate: Aggregate | None = None,
        uwo_lambda: float | None = None,
        standard_format: StandardFormat = "pair",
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        client: RewardClient | None = None,
    ) -> None:
        super().__init__(
            base_url if client is None else client.base_url,
            name=name,
            options=ScoreOptions(normalize, truncate_response, aggregate, uwo_lambda),
            standard_format=standard_format,
            client_settings=_client_settings(
                api_key, timeout, max_retries, max_items_per_request, max_concurrency
            ),
        )
        self._client = client
        self._owns_client = client is None
        if client is None:  # fail at construction on a bad URL, not at the first step
            self._client = RewardClient(self.base_url, **self._client_kwargs)
            self.base_url = self._client.base_url

    @property
    def client(self) -> RewardClient:
        if self._client is None:
            self._client = RewardClient(self.base_url, **self._client_kwargs)
        return self._client

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float]:
        items = trl_items(prompts, completions, self.standard_format)
        result = self.client.score_items(items, self.options)
        self._log(result, kwargs)
        return list(result.scores)

    def close(self) -> None:
        """Close the connections (a later call reconnects); a given client is left open."""
        if self._client is not None and self._owns_client:
            self._client.close()
            self._client = None

    def __getstate__(self) -> dict[str, Any]:
        if not self._owns_client:
            raise TypeError("a TRLRewardFunction built around a given client cannot be pickled")
        state = self.__dict__.copy()
        state["_client"] = None  # sockets do not pickle; reconnect on first use
        return state


class AsyncTRLRewardFunction(_RewardFunctionBase):
    """The async twin (``async_trl_reward_func(...)`` makes one), run by TRL on its own event
    loop: ``await func(prompts, completions, **kwargs) -> list[float]``."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        name: str = DEFAULT_NAME,
        api_key: str | None = None,
        normalize: bool = False,
        truncate_response: bool = True,
        aggregate: Aggregate | None = None,
        uwo_lambda: float | None = None,
        standard_format: StandardFormat = "pair",
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        super().__init__(
            base_url,
            name=name,
            options=ScoreOptions(normalize, truncate_response, aggregate, uwo_lambda),
            standard_format=standard_format,
            client_settings=_client_settings(
                api_key, timeout, max_retries, max_items_per_request, max_concurrency
            ),
        )
        # Validate the settings now; the real client is made inside the event loop.
        self.base_url = ClientConfig(self.base_url, headers=None, **self._client_kwargs).base_url
        self._client: AsyncRewardClient | None = None
        self._loop: object | None = None
        # TRL 0.27-1.13 tell async reward functions by inspect.iscoroutinefunction, which an
        # object with an async __call__ fails; Python 3.12+ lets the object say it is one. On
        # 3.10/3.11, wrap it in an `async def` (examples/trl_async_reward.py).
        mark = getattr(inspect, "markcoroutinefunction", None)
        if mark is not None:
            mark(self)

    def _client_for_this_loop(self) -> AsyncRewardClient:
        # An httpx.AsyncClient's pooled connections belong to one event loop. TRL keeps one
        # background loop, but a caller using asyncio.run() per step gets a new loop each
        # time; then the old client is dropped (its loop is gone) and a new one is made.
        try:
            loop: object | None = asyncio.get_running_loop()
        except RuntimeError:  # trio: one run per process in practice
            loop = None
        if self._client is None or loop is not self._loop:
            self._client = AsyncRewardClient(self.base_url, **self._client_kwargs)
            self._loop = loop
        return self._client

    async def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float]:
        items = trl_items(prompts, completions, self.standard_format)
        client = self._client_for_this_loop()
        result = await client.score_items(items, self.options)
        self._log(result, kwargs)
        return list(result.scores)

    async def aclose(self) -> None:
        """Close the connections of the current event loop's client (a later call reconnects)."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_loop"] = None
        return state


# The factories of the docs and examples: the classes themselves, so that a type checker sees
# every argument.
trl_reward_func = TRLRewardFunction
async_trl_reward_func = AsyncTRLRewardFunction


def _client_settings(
    api_key: str | None,
    timeout: float | httpx.Timeout | None,
    max_retries: int,
    max_items_per_request: int,
    max_concurrency: int,
) -> dict[str, Any]:
    return {
        "api_key": api_key,
        "timeout": timeout,
        "max_retries": max_retries,
        "max_items_per_request": max_items_per_request,
        "max_concurrency": max_concurrency,
    }
