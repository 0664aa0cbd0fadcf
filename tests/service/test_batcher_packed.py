"""The batcher with packed inference functions (a decoder bundle's packed graph): items that
share a prompt travel as one unit, each request gets its own items' scores whatever row they
shared, and the batch's statistics count a shared prompt once. The packed function here is a
numpy stand-in over rmserve.packing.pack whose scores name their item."""

from __future__ import annotations

import asyncio

import numpy as np
import numpy.typing as npt
import pytest

from rmserve.packing import PackedBatch, pack
from rmserve.service.batcher import Batcher, BatchStats
from tests.waiting import guarded

pytestmark = pytest.mark.anyio

Ids = npt.NDArray[np.int64]


def seq(*ids: int) -> Ids:
    return np.asarray(ids, dtype=np.int64)


def by_sum(sequences: list[Ids], heads: int) -> npt.NDArray[np.float32]:
    """(n, heads): head k of item i scores sum(ids) + k, so that a score names its item."""
    sums = np.asarray([s.sum() for s in sequences], dtype=np.float32)
    return sums[:, None] + np.arange(heads, dtype=np.float32)[None, :]


def never(ids: Ids, mask: Ids) -> npt.NDArray[np.float32]:
    raise AssertionError("a batcher with packed functions must not call the plain one")


@pytest.mark.parametrize("heads", [1, 2])
async def test_each_request_gets_its_own_items_scores_from_shared_rows(heads: int) -> None:
    prompt = [3] * 8
    first = [seq(*prompt, 1), seq(*prompt, 2, 2)]
    second = [seq(*prompt, 5, 5, 5), seq(9, 9)]
    seen: list[PackedBatch] = []
    stats: list[BatchStats] = []

    def packed(sequences: list[Ids]) -> tuple[npt.NDArray[np.float32], PackedBatch]:
        batch = pack(sequences, 0, skip_token_id=None)
        seen.append(batch)
        return by_sum(sequences, heads), batch

    batcher = Batcher(
        never, packed=[packed], pad_token_id=0, max_batch_size=8, max_batch_tokens=1000,
        max_wait_s=0.05, max_queue_items=16, num_heads=heads, on_batch=stats.append,
    )  # fmt: skip
    batcher.start()
    try:
        results = await guarded(asyncio.gather(batcher.submit(first), batcher.submit(second)))
    finally:
        await batcher.close()
    for sequences, result in zip((first, second), results, strict=True):
        assert result.head_scores.dtype == np.float32
        assert result.head_scores.tolist() == by_sum(sequences, heads).tolist()
    # One batch; the three items of the prompt share a row, the lone item has its own.
    (batch,) = seen
    (stat,) = stats
    assert stat.size == 4
    assert stat.real_tokens == 9 + 10 + 11 + 2
    assert (stat.padded_tokens, stat.shared_tokens) == (batch.padded_tokens, batch.shared_tokens)
    assert stat.shared_tokens == 2 * len(prompt)  # computed once instead of 3 times


async def test_plain_batches_count_their_padding_and_share_nothing() -> None:
    stats: list[BatchStats] = []

    def plain(ids: Ids, mask: Ids) -> npt.NDArray[np.float32]:
        return np.asarray((ids * mask).sum(axis=1), dtype=np.float32)

    batcher = Batcher(
        plain, pad_token_id=0, max_batch_size=8, max_batch_tokens=1000, max_wait_s=0.0,
        max_queue_items=16, on_batch=stats.append,
    )  # fmt: skip
    batcher.start()
    try:
        result = await guarded(batcher.submit([seq(1, 2, 3), seq(4)]))
    finally:
        await batcher.close()
    assert result.scores.tolist() == [6.0, 4.0]
    assert [(s.size, s.padded_tokens, s.real_tokens, s.shared_tokens) for s in stats] == [
        (2, 6, 4, 0)
    ]


async def test_a_group_of_different_response_lengths_stays_in_one_batch() -> None:
    """Batching keeps a prompt's items together when they are packed: a 60-token prompt
    with responses of 2 to 40 tokens gives items of 62 to 100 tokens, which the padding ratio
    cuts into several batches when every item is a row of its own; packed, they are one row."""
    prompt = list(range(1, 61))
    group = [
        np.asarray(prompt + [100 + k] * n, dtype=np.int64)
        for k, n in enumerate([2, 10, 25, 40, 5, 33])
    ]
    lone = [np.asarray([7] * n, dtype=np.int64) for n in (20, 21)]
    sizes = {len(s) for s in group}

    async def batches_holding_the_group(packed: bool) -> int:
        batches: list[set[int]] = []

        def plain(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            batches.append({int(n) for n in mask.sum(axis=1)})
            return np.zeros(ids.shape[0], dtype=np.float32)

        def packed_fn(sequences: list[np.ndarray]) -> tuple[np.ndarray, PackedBatch]:
            batches.append({len(s) for s in sequences})
            batch = pack(sequences, 0, skip_token_id=None)
            return np.zeros((len(sequences), 1), dtype=np.float32), batch

        batcher = Batcher(
            plain,
            packed=[packed_fn] if packed else None,
            pad_token_id=0,
            max_batch_size=64,
            max_batch_tokens=10_000,
            max_wait_s=0.01,
            max_queue_items=100,
            max_padding_ratio=1.15,
        )
        batcher.start()
        await guarded(batcher.submit([*group, *lone]))
        await batcher.close()
        return sum(1 for b in batches if b & sizes)

    assert await batches_holding_the_group(packed=False) > 1
    assert await batches_holding_the_group(packed=True) == 1
