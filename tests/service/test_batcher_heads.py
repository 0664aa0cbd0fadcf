"""The batcher with fake models of several heads, and models that answer the wrong shape."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from rmserve.service.batcher import Batcher, InferenceError
from tests.waiting import HANG_GUARD_S, guarded

IdArray = npt.NDArray[np.int64]


def heads_model(k: int) -> Callable[[IdArray, IdArray], npt.NDArray[np.float32]]:
    """Head j of an item = (j + 1) x the sum of its real ids: (B, k)."""

    def infer(ids: IdArray, mask: IdArray) -> npt.NDArray[np.float32]:
        total = (ids * mask).sum(axis=1).astype(np.float32)  # (B,)
        rows: npt.NDArray[np.float32] = total[:, None] * np.arange(1, k + 1, dtype=np.float32)
        return rows

    return infer


def make(infer: Callable[[IdArray, IdArray], npt.NDArray[np.float32]], heads: int) -> Batcher:
    return Batcher(
        infer,
        pad_token_id=0,
        max_batch_size=8,
        max_batch_tokens=1000,
        max_wait_s=0.02,
        max_queue_items=64,
        num_heads=heads,
    )


def seq(*ids: int) -> IdArray:
    return np.asarray(ids, dtype=np.int64)


@pytest.mark.anyio
async def test_every_item_gets_its_own_row_of_heads() -> None:
    batcher = make(heads_model(3), heads=3)
    batcher.start()
    requests = [[seq(*range(1, 2 + (i * 5) % 7)) for _ in range(1 + i % 3)] for i in range(8)]
    results = await guarded(asyncio.gather(*(batcher.submit(r) for r in requests)))
    await batcher.close()
    for request, result in zip(requests, results, strict=True):
        expected = [[float(s.sum()) * j for j in (1, 2, 3)] for s in request]
        assert result.head_scores.shape == (len(request), 3)
        np.testing.assert_allclose(result.head_scores, expected)
        with pytest.raises(ValueError, match="read head_scores"):
            _ = result.scores
    empty = await guarded(make(heads_model(3), heads=3).submit([]))
    assert empty.head_scores.shape == (0, 3)
    assert empty.head_scores.dtype == np.float32
    assert (empty.queue_s, empty.inference_s) == (0.0, 0.0)
    assert type(empty.queue_s) is type(empty.inference_s) is float


@pytest.mark.anyio
async def test_one_head_keeps_its_flat_scores() -> None:
    batcher = make(lambda ids, mask: (ids * mask).sum(axis=1).astype(np.float32), heads=1)
    batcher.start()
    result = await guarded(batcher.submit([seq(1, 2), seq(5)]))
    await batcher.close()
    assert result.scores.tolist() == [3.0, 5.0]
    assert result.head_scores.shape == (2, 1)


@pytest.mark.parametrize(
    ("heads", "answer"),
    [
        (1, lambda ids, mask: np.zeros(ids.shape[0] - 1, dtype=np.float32)),  # a row too few
        (3, lambda ids, mask: np.zeros((ids.shape[0] - 1, 3), dtype=np.float32)),
        (3, lambda ids, mask: np.zeros((ids.shape[0], 2), dtype=np.float32)),  # a head short
        (3, lambda ids, mask: np.zeros(ids.shape[0], dtype=np.float32)),  # flat for 3 heads
    ],
)
@pytest.mark.anyio
async def test_a_wrong_shape_fails_the_batch_instead_of_hanging(
    heads: int, answer: Callable[[IdArray, IdArray], npt.NDArray[np.float32]]
) -> None:
    batcher = make(answer, heads=heads)
    batcher.start()
    with pytest.raises(InferenceError, match="ModelOutputError"):
        await asyncio.wait_for(batcher.submit([seq(1, 2), seq(3, 4)]), HANG_GUARD_S)
    # The batcher goes on with the next batch (which fails the same way here, promptly).
    with pytest.raises(InferenceError):
        await asyncio.wait_for(batcher.submit([seq(5), seq(6)]), HANG_GUARD_S)
    await batcher.close()
