"""``Batcher.select`` at the edges of its rules, called directly on queued items: no scheduler
runs, and the batcher's clock is a fixed number, so that "the oldest item has waited exactly
``max_wait_s``" is an equality and not a race.

Each test sits on one edge: a candidate exactly at the token budget, a padding ratio exactly at
``max_padding_ratio``, a second candidate after a cut (its counts start again from zero), the
moment of expiry, and packed inference with the smallest group (two items sharing a prompt).
The last test counts the scheduler's steps while an item waits out ``max_wait_s``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import rmserve.service.batcher as batcher_module
from rmserve.packing import PackedBatch, pack
from rmserve.service.batcher import Batcher
from tests.waiting import guarded

CLOCK_S = 100.0


def zeros(ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    return np.zeros(ids.shape[0], dtype=np.float32)


def seq(*ids: int) -> npt.NDArray[np.int64]:
    return np.asarray(ids, dtype=np.int64)


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batcher module's clock (enqueued_at) reads CLOCK_S; nothing else's does."""
    monkeypatch.setattr(batcher_module, "time", SimpleNamespace(perf_counter=lambda: CLOCK_S))


@asynccontextmanager
async def queued(sequences: list[npt.NDArray[np.int64]], **limits: Any) -> AsyncIterator[Batcher]:
    """A batcher, never started, holding ``sequences`` as one request per sequence, in order."""
    arguments: dict[str, Any] = {
        "pad_token_id": 0,
        "max_batch_size": 2,
        "max_batch_tokens": 1000,
        "max_wait_s": 3600.0,
        "max_queue_items": 64,
    }
    batcher = Batcher(zeros, **(arguments | limits))
    requests = []
    for sequence in sequences:
        requests.append(asyncio.create_task(batcher.submit([sequence])))
        await asyncio.sleep(0)  # submit() queues its items before its first await
    assert batcher.queued_items == len(sequences)
    try:
        yield batcher
    finally:
        await batcher.close()
        await asyncio.gather(*requests, return_exceptions=True)


def lengths(batch: list[Any] | None) -> list[int] | None:
    return None if batch is None else sorted(item.length for item in batch)


pytestmark = pytest.mark.anyio
clocked = pytest.mark.usefixtures("fixed_clock")


@clocked
async def test_a_candidate_exactly_at_the_token_budget_is_one_batch() -> None:
    # Two rows of 3 tokens: 6 padded tokens, the budget exactly; the candidate is full (2 items).
    async with queued([seq(1, 1, 1), seq(2, 2, 2)], max_batch_tokens=6) as batcher:
        assert lengths(batcher.select(CLOCK_S)) == [3, 3]
    async with queued([seq(1, 1, 1), seq(2, 2, 2)], max_batch_tokens=5) as batcher:
        assert lengths(batcher.select(CLOCK_S)) == [3]  # one token over: cut, the first is full


@clocked
async def test_a_padding_ratio_exactly_at_the_limit_joins() -> None:
    # Rows of 1 and 3 tokens padded to 3: 6 padded for 4 real, a ratio of 1.5.
    async with queued([seq(1), seq(2, 2, 2)], max_padding_ratio=1.5) as batcher:
        assert lengths(batcher.select(CLOCK_S)) == [1, 3]
    async with queued([seq(1), seq(2, 2, 2)], max_padding_ratio=1.49) as batcher:
        assert batcher.select(CLOCK_S) is None  # cut in two, neither full, none expired


@clocked
async def test_a_candidate_after_a_cut_counts_its_rows_from_zero() -> None:
    # 1 | 4 4: the ratio cuts after the 1-token row; the two 4-token rows then make 8 padded
    # tokens, the budget exactly, and a full batch.
    async with queued(
        [seq(1), seq(*[2] * 4), seq(*[3] * 4)], max_batch_tokens=8, max_padding_ratio=1.0
    ) as batcher:
        assert lengths(batcher.select(CLOCK_S)) == [4, 4]


@clocked
async def test_a_candidate_after_a_cut_counts_its_real_tokens_from_zero() -> None:
    # 1 | 2 | 3: rows of 2 and 3 tokens pad to 6 for 5 real, a ratio of 1.2 over the 1.1
    # allowed, so every row stays alone and no candidate is full.
    async with queued([seq(1), seq(2, 2), seq(3, 3, 3)], max_padding_ratio=1.1) as batcher:
        assert batcher.select(CLOCK_S) is None


@clocked
async def test_the_oldest_item_goes_the_moment_it_has_waited_max_wait() -> None:
    async with queued([seq(1), seq(2, 2, 2)], max_wait_s=0.0, max_padding_ratio=1.0) as batcher:
        assert lengths(batcher.select(CLOCK_S)) == [1]  # waited 0 s of 0 s
    async with queued([seq(1), seq(2, 2, 2)], max_wait_s=1.0, max_padding_ratio=1.0) as batcher:
        assert batcher.select(CLOCK_S + 0.5) is None
        assert lengths(batcher.select(CLOCK_S + 1.0)) == [1]


def packed_zeros(
    sequences: list[npt.NDArray[np.int64]],
) -> tuple[npt.NDArray[np.float32], PackedBatch]:
    return np.zeros((len(sequences), 1), dtype=np.float32), pack(sequences, 0, skip_token_id=None)


@clocked
async def test_two_items_that_share_a_prompt_are_one_unit_when_packed() -> None:
    # A 6-token prompt with responses of 1 and 2 tokens: 7 and 8 tokens as rows of their own,
    # a padding ratio of 16/15 over the 1.0 allowed; packed, one row of 6 + 1 + 2 tokens.
    prompt = [5] * 6
    group = [seq(*prompt, 1), seq(*prompt, 2, 2)]
    async with queued(group, max_padding_ratio=1.0) as batcher:
        assert batcher.select(CLOCK_S) is None  # two lone rows, neither full
    async with queued(group, max_padding_ratio=1.0, packed=[packed_zeros]) as batcher:
        assert lengths(batcher.select(CLOCK_S)) == [7, 8]


@clocked
@pytest.mark.parametrize(
    ("responses", "limits", "expected"),
    [
        # A 4-token prompt and responses of 3 and 4: the longest item (8) is exactly twice the
        # prompt, so the two are one unit (a row of 4 + 3 + 4 = 11 tokens).
        ([[1, 1, 1], [2, 2, 2, 2]], {}, [7, 8]),
        # A row of exactly the token budget is still one unit.
        ([[1, 1, 1], [2, 2, 2, 2]], {"max_batch_tokens": 11}, [7, 8]),
        # Responses of 3 and 5: 9 tokens, more than twice the prompt; two rows, not full.
        ([[1, 1, 1], [2, 2, 2, 2, 2]], {}, None),
        # Three items but at most two per batch: a unit of two, full.
        ([[1], [2], [3]], {}, [5, 5]),
    ],
)
async def test_a_shared_prompt_makes_one_unit_up_to_the_limits(
    responses: list[list[int]], limits: dict[str, Any], expected: list[int] | None
) -> None:
    prompt = [9] * 4
    group = [seq(*prompt, *response) for response in responses]
    arguments = {"max_padding_ratio": 1.0, "packed": [packed_zeros]} | limits
    async with queued(group, **arguments) as batcher:
        assert lengths(batcher.select(CLOCK_S)) == expected


async def test_a_waiting_item_does_not_make_the_scheduler_spin() -> None:
    """While the only item waits out max_wait_s, the scheduler sleeps until its deadline: a
    handful of steps (a scheduler that computed the deadline wrong would loop on a timeout of
    zero until the item expired, thousands of steps)."""
    steps = 0
    select: Callable[[Batcher, float], Any] = Batcher.select

    class Counting(Batcher):
        def select(self, now: float) -> Any:
            nonlocal steps
            steps += 1
            return select(self, now)

    batcher = Counting(
        zeros, pad_token_id=0, max_batch_size=8, max_batch_tokens=1000, max_wait_s=0.2,
        max_queue_items=8,
    )  # fmt: skip
    batcher.start()
    result = await guarded(batcher.submit([seq(1, 2)]))
    await batcher.close()
    assert result.scores.tolist() == [0.0]
    assert steps <= 5
