"""Render and tokenize request items off the event loop, the way training did.

Items come in three forms: a (prompt, response) pair, a conversation whose last message is
the response, or text already rendered by the caller. Each is rendered with the bundle's
``text_format`` by :mod:`rmserve.formatting` (the HH transcript of rmserve-trained models, or
the model's own chat template, as transformers renders it) and encoded by
:class:`rmserve.encoding.PairEncoder` over the bundle's ``tokenizer.json``: the same two
functions training and export used, so the ids are the ones the model was trained and
certified on. A template that refuses a conversation (``raise_exception``) fails that
request's item with the template's own message, and nothing else.

A request's items are rendered and encoded together in one call to the tokenizer (Rust,
parallel across items) inside a small thread pool, so the event loop never tokenizes.
Requests that arrive while the pool is busy are handed over together, one thread hop for
many small requests.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rmserve.encoding import EncodedPair, PairEncoder, ResponseTooLongError
from rmserve.formatting import (
    AnyTextFormat,
    ChatTemplateFormat,
    FormattingError,
    RenderedText,
    messages_from_pair,
    render,
    render_completion,
    render_text,
)
from rmserve.manifest import TOKENIZER_NAME, BundleError, Manifest

__all__ = [
    "EncodedItems",
    "InvalidItemError",
    "ItemInput",
    "ItemRefusedError",
    "ItemTooLongError",
    "RequestTokenizer",
    "ResponseTooLongAtError",
]


# Lone surrogates: code points that are not characters and that UTF-8 cannot encode.
_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidItemError(ValueError):
    """An item that cannot be rendered (bad roles, empty conversation)."""

    def __init__(self, index: int, message: str):
        self.index = index
        super().__init__(f"item {index}: {message}")


class ItemTooLongError(ValueError):
    """An item whose rendered text exceeds ``max_item_chars``."""

    def __init__(self, index: int, chars: int, limit: int):
        self.index, self.chars, self.limit = index, chars, limit
        super().__init__(
            f"item {index} has {chars} characters once rendered; the limit is {limit} "
            "(RMSERVE_MAX_ITEM_CHARS); shorten it"
        )


class ResponseTooLongAtError(ValueError):
    """:class:`ResponseTooLongError` for one item of a request, with its index and lengths."""

    def __init__(self, index: int, error: ResponseTooLongError):
        self.index = index
        self.response_tokens = error.response_tokens
        self.prompt_tokens = error.prompt_tokens
        self.budget = error.budget
        self.max_length = error.max_length
        super().__init__(f"item {index}: {error}")


@dataclass(frozen=True)
class ItemInput:
    """One item to score, in one of the three input forms."""

    prompt: str | Sequence[Mapping[str, Any]] | None = None
    response: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    text: str | None = None
    # For caller-rendered text whose prompt is known to be its first characters (OpenRLHF
    # sends both); lets truncation drop prompt tokens first instead of cutting blindly.
    response_start: int | None = None
    # The string prompt may be the model's own template already rendered with its generation
    # prompt (slime with --apply-chat-template): then it is completed, not rendered again.
    prompt_may_be_rendered: bool = False

    def render(self, text_format: AnyTextFormat) -> RenderedText:
        if self.text is not None:
            return render_text(self.text, text_format, self.response_start)
        if self.messages is not None:
            return render(self.messages, text_format)
        if (
            self.prompt_may_be_rendered
            and isinstance(self.prompt, str)
            and self.response is not None
            and isinstance(text_format, ChatTemplateFormat)
        ):
            completed = render_completion(self.prompt, self.response, text_format)
            if completed is not None:
                return completed
        if self.prompt is not None and self.response is not None:
            return render(messages_from_pair(self.prompt, self.response), text_format)
        raise FormattingError("an item needs prompt and response, messages, or text")


# What can go wrong with one item: each names the item and says what to change.
ItemRefusedError = InvalidItemError | ItemTooLongError | ResponseTooLongAtError
_NO_IDS: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class EncodedItems:
    ids: list[npt.NDArray[np.int64]]  # one (T_i,) array per item; empty for a refused item
    truncated: list[bool]
    tokens: int  # sum of T_i
    # The items that cannot be scored, by index (ascending), with why.
    refused: dict[int, ItemRefusedError] = field(default_factory=dict)


@dataclass(frozen=True)
class _Job:
    items: Sequence[ItemInput]
    truncate_response: bool
    future: asyncio.Future[EncodedItems]


class RequestTokenizer:
    """Renders and encodes items with the bundle's format and tokenizer."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        *,
        max_item_chars: int,
        threads: int,
        max_length: int | None = None,
    ):
        """``max_length``: tokens per item, at most the bundle's (default: the bundle's)."""
        self.manifest = manifest
        self.text_format = manifest.text_format
        self.max_item_chars = max_item_chars
        self.max_length = min(max_length or manifest.max_length, manifest.max_length)
        path = Path(bundle_dir) / TOKENIZER_NAME
        try:
            self.encoder = PairEncoder.from_file(str(path), self.max_length, self.text_format)
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise BundleError(
                f"{path} cannot be loaded by the tokenizers library: {e}; export the bundle again"
            ) from e
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rmserve-tok")
        self._threads = threads
        self._waiting: list[_Job] = []  # requests not yet handed to the pool
        self._waves_in_flight = 0

    async def encode(self, items: Sequence[ItemInput], *, truncate_response: bool) -> EncodedItems:
        """Encode one request's items in the thread pool; items that cannot be scored are
        listed in the result's ``refused``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[EncodedItems] = loop.create_future()
        self._waiting.append(_Job(items, truncate_response, future))
        if self._waves_in_flight < self._threads:
            self._start_wave(loop)
        return await future

    # Many small concurrent requests (one sample each, as RL trainers send) would cost a
    # thread hop each; instead, requests that arrive while the pool is busy wait and go
    # together in the next "wave": one hop for all of them. Each keeps its own errors.

    def _start_wave(self, loop: asyncio.AbstractEventLoop) -> None:
        wave, self._waiting = self._waiting, []
        self._waves_in_flight += 1
        job = loop.run_in_executor(self._executor, self._encode_wave, wave)
        job.add_done_callback(lambda done: self._finish_wave(loop, wave, done))

    def _encode_wave(self, wave: list[_Job]) -> list[EncodedItems | Exception]:
        results: list[EncodedItems | Exception] = []
        for job in wave:
            try:
                results.append(self.encode_sync(job.items, job.truncate_response))
            except Exception as e:  # delivered to that request only
                results.append(e)
        return results

    def _finish_wave(
        self,
        loop: asyncio.AbstractEventLoop,
        wave: list[_Job],
        done: asyncio.Future[list[EncodedItems | Exception]],
    ) -> None:
        self._waves_in_flight -= 1
        try:
            results = done.result()
        except Exception as e:  # the pool itself failed (shut down)
            results = [e] * len(wave)
        for job, result in zip(wave, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        if self._waiting:
            self._start_wave(loop)

    def encode_sync(self, items: Sequence[ItemInput], truncate_response: bool) -> EncodedItems:
        """Encode every item; an item that cannot be scored is recorded in ``refused`` (its
        ids left empty), so the caller decides whether the others still count."""
        refused: dict[int, ItemRefusedError] = {}
        rendered: dict[int, RenderedText] = {}
        for index, item in enumerate(items):
            try:
                rendered[index] = self._render(index, item)
            except (InvalidItemError, ItemTooLongError) as e:
                refused[index] = e
        encoded = self._encode_rendered(rendered, truncate_response, refused)
        ids: list[npt.NDArray[np.int64]] = []
        truncated: list[bool] = []
        for index in range(len(items)):
            pair = encoded.get(index)
            item_ids = np.asarray(pair.ids if pair else [], dtype=np.int64)
            # A decoder's tokenizer adds no special tokens: an empty text is zero tokens, with
            # no position to read a reward at, and ORT fails on a (B, 0) batch with a 500.
            if pair is not None and item_ids.shape[0] == 0:
                refused[index] = InvalidItemError(
                    index, "the text is empty once tokenized; send some text"
                )
            ids.append(item_ids if index not in refused else _NO_IDS)
            truncated.append(bool(pair and pair.truncated) and index not in refused)
        return EncodedItems(
            ids=ids,
            truncated=truncated,
            tokens=sum(int(a.shape[0]) for a in ids),
            refused=dict(sorted(refused.items())),
        )

    def _render(self, index: int, item: ItemInput) -> RenderedText:
        try:
            text = item.render(self.text_format)
        except FormattingError as e:
            raise InvalidItemError(index, str(e)) from e
        chars = len(text.text) + len(text.pair or "")
        if chars > self.max_item_chars:
            raise ItemTooLongError(index, chars, self.max_item_chars)
        # JSON may carry "\ud800" (and Python decodes raw surrogate bytes with surrogatepass);
        # the Rust tokenizer cannot take such a str and would fail with a 500
        # (tests/reliability/test_bad_input.py sends such text).
        if _SURROGATE.search(text.text) or (text.pair and _SURROGATE.search(text.pair)):
            raise InvalidItemError(
                index,
                "the text holds a lone UTF-16 surrogate (e.g. \\ud800), which is not a "
                "Unicode character; send valid UTF-8 text",
            )
        return text

    def _encode_rendered(
        self,
        rendered: dict[int, RenderedText],
        truncate_response: bool,
        refused: dict[int, ItemRefusedError],
    ) -> dict[int, EncodedPair]:
        """All rendered items in one batch call; if a response cannot fit (rare), item by
        item, so that each one that cannot is named and the others keep their ids."""
        indices = list(rendered)
        try:
            pairs = self.encoder.encode_batch(
                [rendered[i] for i in indices], truncate_response=truncate_response
            )
            return dict(zip(indices, pairs, strict=True))
        except ResponseTooLongError:
            pass
        out: dict[int, EncodedPair] = {}
        for index in indices:
            try:
                out[index] = self.encoder.encode(
                    rendered[index], truncate_response=truncate_response
                )
            except ResponseTooLongError as e:
                refused[index] = ResponseTooLongAtError(index, e)
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=False)
