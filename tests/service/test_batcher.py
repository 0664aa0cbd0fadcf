"""The batcher with a fake model: batch formation, padding, routing of results, limits."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from rmserve.service.batcher import (
    Batcher,
    BatcherClosedError,
    BatchStats,
    InferenceError,
    QueueFullError,
)

PAD = 0


class FakeModel:
    """score = sum of (id * position weight) over real tokens: depends on every real token and
    on nothing past the mask, like a correct reward model."""

    def __init__(self, delay_s: float = 0.0):
        self.batches: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = []
        self.delay_s = delay_s
        self.release = threading.Event()
        self.release.set()

    def __call__(
        self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        self.release.wait(5)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.batches.append((input_ids.copy(), attention_mask.copy()))
        weights = 1.0 / (1.0 + np.arange(input_ids.shape[1]))  # (T,)
        return ((input_ids * attention_mask) * weights).sum(axis=1).astype(np.float32)  # (B,)


def expected(ids: list[int]) -> float:
    return float(sum(t / (1.0 + i) for i, t in enumerate(ids)))


def seq(*ids: int) -> npt.NDArray[np.int64]:
    return np.asarray(ids, dtype=np.int64)


def make(model: FakeModel, **kwargs: object) -> tuple[Batcher, list[BatchStats]]:
    stats: list[BatchStats] = []
    options: dict[str, object] = {
        "pad_token_id": PAD,
        "max_batch_size": 8,
        "max_batch_tokens": 1000,
        "max_wait_s": 0.02,
        "max_queue_items": 64,
    }
    options.update(kwargs)
    batcher = Batcher(model, on_batch=stats.append, **options)  # type: ignore[arg-type]
    return batcher, stats


def test_items_of_concurrent_requests_share_batches_and_get_their_own_scores() -> None:
    model = FakeModel()

    async def main() -> list[list[float]]:
        batcher, _ = make(model, max_wait_s=0.05)
        batcher.start()
        requests = [[seq(*range(1, 2 + (i * 7) % 13)) for _ in range(1 + i % 3)] for i in range(10)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.drain(1)
        await batcher.close()
        for request, result in zip(requests, results, strict=True):
            assert result.scores.tolist() == pytest.approx([expected(s.tolist()) for s in request])
        return [r.scores.tolist() for r in results]

    asyncio.run(main())
    # 20 items in requests of 1-3 items ran in fewer, larger batches.
    assert len(model.batches) < 10
    assert max(ids.shape[0] for ids, _ in model.batches) > 3


def test_batches_are_right_padded_to_their_own_longest_item() -> None:
    model = FakeModel()

    async def main() -> None:
        batcher, stats = make(model, max_wait_s=0.05)
        batcher.start()
        await batcher.submit([seq(5, 6, 7), seq(8), seq(9, 10)])
        await batcher.close()
        (batch,) = stats
        assert batch.size == 3
        assert batch.padded_tokens == 9
        assert batch.real_tokens == 6

    asyncio.run(main())
    ((ids, mask),) = model.batches
    # Sorted by length, right-padded with PAD, mask 1 exactly on real tokens.
    assert ids.tolist() == [[8, PAD, PAD], [9, 10, PAD], [5, 6, 7]]
    assert mask.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_token_budget_and_size_limit_split_batches_by_length() -> None:
    model = FakeModel()

    async def main() -> None:
        batcher, stats = make(model, max_batch_size=4, max_batch_tokens=40, max_wait_s=0.05)
        batcher.start()
        short = [seq(*([1] * 2)) for _ in range(6)]
        long = [seq(*([2] * 20)) for _ in range(3)]
        await asyncio.gather(batcher.submit(short + long))
        await batcher.close()
        for s in stats:
            assert s.size <= 4
            assert s.padded_tokens <= 40
        # No batch mixes 2-token and 20-token items: sorting kept them apart.
        for _ids, mask in model.batches:
            lengths = set(mask.sum(axis=1).tolist())
            assert lengths in ({2}, {20})

    asyncio.run(main())


def test_a_full_batch_goes_without_waiting_for_max_wait() -> None:
    model = FakeModel()

    async def main() -> float:
        batcher, _ = make(model, max_batch_size=4, max_wait_s=5.0)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit([seq(1, 2)] * 4)
        elapsed = time.perf_counter() - started
        await batcher.close()
        return elapsed

    # Not a timing assertion on speed: only that the 5 s wait was not taken.
    assert asyncio.run(main()) < 4.0


def test_full_queue_raises_queue_full_with_retry_after() -> None:
    model = FakeModel()

    async def main() -> None:
        batcher, _ = make(model, max_batch_size=8, max_queue_items=8, max_wait_s=0.5)
        batcher.start()
        first = asyncio.create_task(batcher.submit([seq(1)] * 6))
        await asyncio.sleep(0.05)
        assert batcher.queued_items == 6
        with pytest.raises(QueueFullError) as info:
            await batcher.submit([seq(1)] * 3)
        assert info.value.retry_after_s >= 1
        assert "8" in str(info.value)
        # Two more still fit.
        second = asyncio.create_task(batcher.submit([seq(1)] * 2))
        results = await asyncio.gather(first, second)
        assert [len(r.scores) for r in results] == [6, 2]
        await batcher.close()

    asyncio.run(main())


def test_drain_finishes_queued_work_then_refuses_new_work() -> None:
    model = FakeModel()

    async def main() -> None:
        batcher, _ = make(model, max_wait_s=10.0)  # would wait 10 s if not draining
        batcher.start()
        pending = asyncio.create_task(batcher.submit([seq(3, 4)]))
        await asyncio.sleep(0.05)
        assert await batcher.drain(5.0)
        assert pending.done()
        assert pending.result().scores.tolist() == pytest.approx([expected([3, 4])])
        with pytest.raises(BatcherClosedError):
            await batcher.submit([seq(1)])
        await batcher.close()

    asyncio.run(main())


def test_a_model_failure_fails_only_the_requests_in_that_batch() -> None:
    calls = {"n": 0}

    def flaky(ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return np.zeros(ids.shape[0], dtype=np.float32)

    async def main() -> None:
        batcher = Batcher(
            flaky,
            pad_token_id=PAD,
            max_batch_size=8,
            max_batch_tokens=100,
            max_wait_s=0.0,
            max_queue_items=8,
        )
        batcher.start()
        with pytest.raises(InferenceError, match="RuntimeError"):
            await batcher.submit([seq(1)])
        ok = await batcher.submit([seq(1)])
        assert ok.scores.tolist() == [0.0]
        await batcher.close()

    asyncio.run(main())


def test_oldest_item_is_not_starved_by_full_batches_of_others() -> None:
    model = FakeModel()

    async def main() -> None:
        batcher, _ = make(model, max_batch_size=2, max_batch_tokens=1000, max_wait_s=0.05)
        batcher.start()
        lonely = asyncio.create_task(batcher.submit([seq(*([7] * 50))]))
        await asyncio.sleep(0)
        feeders = [asyncio.create_task(batcher.submit([seq(1), seq(2)])) for _ in range(20)]
        result = await asyncio.wait_for(lonely, timeout=5)
        assert result.scores.tolist() == pytest.approx([expected([7] * 50)])
        await asyncio.gather(*feeders)
        await batcher.close()

    asyncio.run(main())


def test_padding_ratio_limit_keeps_different_lengths_apart() -> None:
    model = FakeModel()

    async def main() -> None:
        batcher, stats = make(model, max_batch_size=64, max_padding_ratio=1.15, max_wait_s=0.02)
        batcher.start()
        lengths = [3, 3, 10, 11, 11, 30, 31, 3, 10, 10]
        result = await batcher.submit([seq(*([5] * n)) for n in lengths])
        await batcher.close()
        assert result.scores.tolist() == pytest.approx([expected([5] * n) for n in lengths])
        assert all(s.padded_tokens <= 1.15 * s.real_tokens for s in stats)
        assert sum(s.size for s in stats) == len(lengths)

    asyncio.run(main())
    assert len(model.batches) == 3  # the 3, 10-11 and 30-31 token groups


def test_a_scheduler_bug_fails_waiting_requests_instead_of_hanging_them() -> None:
    model = FakeModel()

    class BrokenOnce(Batcher):
        broken = True

        def select(self, now: float) -> Any:
            if self.broken:
                self.broken = False
                raise KeyError("bug")
            return super().select(now)

    async def main() -> None:
        batcher = BrokenOnce(
            model, pad_token_id=PAD, max_batch_size=4, max_batch_tokens=100, max_wait_s=0.0,
            max_queue_items=8,
        )  # fmt: skip
        batcher.start()
        with pytest.raises(InferenceError, match="scheduler failed"):
            await asyncio.wait_for(batcher.submit([seq(1)]), timeout=5)
        ok = await asyncio.wait_for(batcher.submit([seq(2)]), timeout=5)
        assert ok.scores.tolist() == pytest.approx([expected([2])])
        await batcher.close()

    asyncio.run(main())


# --- several model instances ------------------------------------------------------------------


def test_instances_run_batches_at_the_same_time() -> None:
    # Each instance's model waits until the other has started a batch: run one after the
    # other, the first would wait for ever (5 s) and the test would fail.
    started = [threading.Event(), threading.Event()]

    def instance(k: int) -> Any:
        def infer(ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> Any:
            started[k].set()
            assert started[1 - k].wait(5), "the other instance never ran at the same time"
            return np.full(ids.shape[0], float(k), dtype=np.float32)

        return infer

    async def main() -> set[float]:
        batcher = Batcher(
            [instance(0), instance(1)], pad_token_id=PAD, max_batch_size=2,
            max_batch_tokens=1000, max_wait_s=0.0, max_queue_items=64,
        )  # fmt: skip
        batcher.start()
        results = await asyncio.gather(
            batcher.submit([seq(1), seq(2)]), batcher.submit([seq(3), seq(4)])
        )
        await batcher.close()
        return {float(s) for r in results for s in r.scores}

    assert asyncio.run(main()) == {0.0, 1.0}  # both instances scored a batch


def test_a_busy_instance_takes_its_next_batch_before_the_running_one_ends() -> None:
    model = FakeModel()
    model.release.clear()  # the first batch blocks until released
    queued: list[int] = []

    async def main() -> None:
        batcher = Batcher(
            model, pad_token_id=PAD, max_batch_size=2, max_batch_tokens=1000, max_wait_s=0.0,
            max_queue_items=64, on_queue_change=queued.append,
        )  # fmt: skip
        batcher.start()
        first = asyncio.create_task(batcher.submit([seq(1), seq(2)]))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit([seq(3), seq(4)]))
        third = asyncio.create_task(batcher.submit([seq(5), seq(6)]))
        await asyncio.sleep(0.05)
        # The second batch left the queue for the instance while the first still runs;
        # the third waits: one batch queued per instance at most.
        assert batcher.queued_items == 2
        assert not first.done()
        model.release.set()
        results = await asyncio.gather(first, second, third)
        for result, ids in zip(results, ([1, 2], [3, 4], [5, 6]), strict=True):
            assert result.scores.tolist() == pytest.approx([expected([i]) for i in ids])
        await batcher.close()

    asyncio.run(main())
    assert len(model.batches) == 3


def test_close_fails_requests_whose_batches_are_still_running() -> None:
    model = FakeModel()
    model.release.clear()

    async def main() -> None:
        batcher, _ = make(model, max_wait_s=0.0)
        batcher.start()
        stuck = asyncio.create_task(batcher.submit([seq(1)]))
        await asyncio.sleep(0.05)
        assert batcher.in_flight_items == 1
        await batcher.close()
        with pytest.raises(BatcherClosedError):
            await asyncio.wait_for(stuck, timeout=5)

    asyncio.run(main())
    model.release.set()
