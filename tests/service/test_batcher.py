"""The batcher with a fake model: batch formation, padding, routing of results, limits.

No test here depends on how fast anything runs: a test that needs the model busy blocks it
(``FakeModel.release``) and knows a batch started from ``FakeModel.started``; a test that needs
items to stay queued gives them a ``max_wait_s`` they never reach; conditions are waited for
(``tests.waiting``) with a timeout that only guards against a hang.
"""

from __future__ import annotations

import asyncio
import logging
import threading
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
from tests.waiting import HANG_GUARD_S, guarded, wait_until

PAD = 0
# Longer than any test runs: items given this wait leave the queue only as a full batch, or
# when the test drains the batcher.
NEVER_S = 3600.0


class FakeModel:
    """score = sum of (id * position weight) over real tokens: depends on every real token and
    on nothing past the mask, like a correct reward model.

    ``started`` is set when a batch reaches the model; each batch then waits for ``release``
    (set from the start; a test clears it to hold the model busy, and sets it to let go)."""

    def __init__(self) -> None:
        self.batches: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(
        self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        self.started.set()
        if not self.release.wait(HANG_GUARD_S):
            raise TimeoutError("the test never released the model")
        self.batches.append((input_ids.copy(), attention_mask.copy()))
        weights = 1.0 / (1.0 + np.arange(input_ids.shape[1]))  # (T,)
        scores = ((input_ids * attention_mask) * weights).sum(axis=1)  # (B,)
        return np.asarray(scores, dtype=np.float32)


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


@pytest.mark.anyio
async def test_items_of_concurrent_requests_share_batches_and_get_their_own_scores() -> None:
    model = FakeModel()
    batcher, _ = make(model, max_wait_s=0.05)
    batcher.start()
    requests = [[seq(*range(1, 2 + (i * 7) % 13)) for _ in range(1 + i % 3)] for i in range(10)]
    # gather starts every submission in one turn of the loop, before the scheduler runs.
    results = await guarded(asyncio.gather(*(batcher.submit(r) for r in requests)))
    await batcher.drain(HANG_GUARD_S)
    await batcher.close()
    for request, result in zip(requests, results, strict=True):
        assert result.scores.tolist() == pytest.approx([expected(s.tolist()) for s in request])
    # 20 items in requests of 1-3 items ran in fewer, larger batches.
    assert len(model.batches) < 10
    assert max(ids.shape[0] for ids, _ in model.batches) > 3


@pytest.mark.anyio
async def test_batches_are_right_padded_to_their_own_longest_item() -> None:
    model = FakeModel()
    batcher, stats = make(model, max_wait_s=0.05)
    batcher.start()
    await guarded(batcher.submit([seq(5, 6, 7), seq(8), seq(9, 10)]))
    await batcher.close()
    (batch,) = stats
    assert batch.size == 3
    assert batch.padded_tokens == 9
    assert batch.real_tokens == 6
    ((ids, mask),) = model.batches
    # Sorted by length, right-padded with PAD, mask 1 exactly on real tokens.
    assert ids.tolist() == [[8, PAD, PAD], [9, 10, PAD], [5, 6, 7]]
    assert mask.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


@pytest.mark.anyio
async def test_token_budget_and_size_limit_split_batches_by_length() -> None:
    model = FakeModel()
    batcher, stats = make(model, max_batch_size=4, max_batch_tokens=40, max_wait_s=0.05)
    batcher.start()
    short = [seq(*([1] * 2)) for _ in range(6)]
    long = [seq(*([2] * 20)) for _ in range(3)]
    await guarded(batcher.submit(short + long))
    await batcher.close()
    for s in stats:
        assert s.size <= 4
        assert s.padded_tokens <= 40
    # No batch mixes 2-token and 20-token items: sorting kept them apart.
    for _ids, mask in model.batches:
        lengths = set(mask.sum(axis=1).tolist())
        assert lengths in ({2}, {20})


@pytest.mark.anyio
async def test_a_full_batch_goes_without_waiting_for_max_wait() -> None:
    model = FakeModel()
    # Items that waited for max_wait would wait an hour: only a full batch can answer in time.
    batcher, _ = make(model, max_batch_size=4, max_wait_s=NEVER_S)
    batcher.start()
    result = await asyncio.wait_for(batcher.submit([seq(1, 2)] * 4), HANG_GUARD_S)
    assert result.scores.tolist() == pytest.approx([expected([1, 2])] * 4)
    await batcher.close()


@pytest.mark.anyio
async def test_full_queue_raises_queue_full_with_retry_after() -> None:
    model = FakeModel()
    # Six items are no full batch and never reach max_wait: they stay queued.
    batcher, _ = make(model, max_batch_size=8, max_queue_items=8, max_wait_s=NEVER_S)
    batcher.start()
    first = asyncio.create_task(batcher.submit([seq(1)] * 6))
    await wait_until(lambda: batcher.queued_items == 6, "the first 6 items queued")
    with pytest.raises(QueueFullError) as info:
        await guarded(batcher.submit([seq(1)] * 3))
    assert info.value.retry_after_s >= 1
    assert "8" in str(info.value)
    assert batcher.queued_items == 6  # the refused request left nothing behind
    # Two more still fit (and make a full batch of 8, which goes at once).
    second = asyncio.create_task(batcher.submit([seq(1)] * 2))
    results = await asyncio.wait_for(asyncio.gather(first, second), HANG_GUARD_S)
    assert [len(r.scores) for r in results] == [6, 2]
    await batcher.close()


@pytest.mark.anyio
async def test_drain_finishes_queued_work_then_refuses_new_work() -> None:
    model = FakeModel()
    batcher, _ = make(model, max_wait_s=NEVER_S)  # would wait an hour if not draining
    batcher.start()
    pending = asyncio.create_task(batcher.submit([seq(3, 4)]))
    await wait_until(lambda: batcher.queued_items == 1, "the item queued")
    assert await batcher.drain(HANG_GUARD_S)
    assert pending.done()
    assert pending.result().scores.tolist() == pytest.approx([expected([3, 4])])
    with pytest.raises(BatcherClosedError):
        await guarded(batcher.submit([seq(1)]))
    await batcher.close()


@pytest.mark.anyio
async def test_a_model_failure_fails_only_the_requests_in_that_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = {"n": 0}

    def flaky(ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return np.zeros(ids.shape[0], dtype=np.float32)

    batcher = Batcher(
        flaky,
        pad_token_id=PAD,
        max_batch_size=8,
        max_batch_tokens=100,
        max_wait_s=0.0,
        max_queue_items=8,
    )
    batcher.start()
    failure = (
        r"^the model failed on a batch of 1 items \(RuntimeError\); the server log has the "
        r"details$"
    )
    with (
        caplog.at_level(logging.ERROR, logger="rmserve.service.batcher"),
        pytest.raises(InferenceError, match=failure),
    ):
        await guarded(batcher.submit([seq(1)]))
    ok = await guarded(batcher.submit([seq(1)]))
    assert ok.scores.tolist() == [0.0]
    await batcher.close()
    # The exception's text goes to the log only, with the batch's size.
    (record,) = [r for r in caplog.records if r.name == "rmserve.service.batcher"]
    assert (record.getMessage(), record.__dict__["batch_size"]) == ("inference failed", 1)
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "boom"


@pytest.mark.anyio
async def test_oldest_item_is_not_starved_by_full_batches_of_others() -> None:
    """Once the oldest item has waited max_wait, its batch goes next, even while full
    batches of younger items wait: a scheduler that served full batches first would run all
    20 full batches below before it.

    The one instance is held busy by two blocked batches (one running, one queued behind
    it), so nothing leaves the queue while the test sets the scene: the lonely item (50
    tokens, alone in its length run), then 20 requests of 2 short items (20 full batches of
    the size limit 2). When the lonely item has waited max_wait, the model is let go; the
    batch the scheduler picks for the freed place must be the lonely one."""
    model = FakeModel()
    model.release.clear()
    max_wait_s = 0.05
    batcher, _ = make(model, max_batch_size=2, max_batch_tokens=1000, max_wait_s=max_wait_s)
    batcher.start()
    running = asyncio.create_task(batcher.submit([seq(3), seq(3)]))  # a full batch: goes
    await wait_until(model.started.is_set, "the first batch reached the model")
    queued_behind = asyncio.create_task(batcher.submit([seq(4), seq(4)]))
    await wait_until(lambda: batcher.queued_items == 0, "the second batch queued behind it")
    lonely = asyncio.create_task(batcher.submit([seq(*([7] * 50))]))
    await wait_until(lambda: batcher.queued_items == 1, "the lonely item queued")
    feeders = [asyncio.create_task(batcher.submit([seq(1), seq(2)])) for _ in range(20)]
    await wait_until(lambda: batcher.queued_items == 41, "the 40 feeder items queued")
    # Waiting out the lonely item's max_wait sets the scene; it is no timing check: the
    # model stays blocked, so however long this takes, nothing moves meanwhile.
    await asyncio.sleep(2 * max_wait_s)
    assert batcher.queued_items == 41
    assert not lonely.done()
    model.release.set()
    result = await asyncio.wait_for(lonely, HANG_GUARD_S)
    assert result.scores.tolist() == pytest.approx([expected([7] * 50)])
    await asyncio.wait_for(asyncio.gather(running, queued_behind, *feeders), HANG_GUARD_S)
    await batcher.close()
    # One worker thread ran the batches in the order the scheduler handed them out.
    sizes = [ids.shape[1] for ids, _ in model.batches]
    assert len(sizes) == 2 + 1 + 20
    assert sizes.index(50) == 2, f"the lonely item ran after {sizes.index(50) - 2} full batches"


@pytest.mark.anyio
async def test_padding_ratio_limit_keeps_different_lengths_apart() -> None:
    model = FakeModel()
    batcher, stats = make(model, max_batch_size=64, max_padding_ratio=1.15, max_wait_s=0.02)
    batcher.start()
    lengths = [3, 3, 10, 11, 11, 30, 31, 3, 10, 10]
    result = await guarded(batcher.submit([seq(*([5] * n)) for n in lengths]))
    await batcher.close()
    assert result.scores.tolist() == pytest.approx([expected([5] * n) for n in lengths])
    assert all(s.padded_tokens <= 1.15 * s.real_tokens for s in stats)
    assert sum(s.size for s in stats) == len(lengths)
    assert len(model.batches) == 3  # the 3, 10-11 and 30-31 token groups


@pytest.mark.anyio
async def test_a_scheduler_bug_fails_waiting_requests_instead_of_hanging_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = FakeModel()

    class BrokenOnce(Batcher):
        broken = True

        def select(self, now: float) -> Any:
            if self.broken:
                self.broken = False
                raise KeyError("bug")
            return super().select(now)

    batcher = BrokenOnce(
        model, pad_token_id=PAD, max_batch_size=4, max_batch_tokens=100, max_wait_s=0.0,
        max_queue_items=8,
    )  # fmt: skip
    batcher.start()
    with (
        caplog.at_level(logging.ERROR, logger="rmserve.service.batcher"),
        pytest.raises(
            InferenceError, match=r"^the batch scheduler failed; the server log has details$"
        ),
    ):
        await asyncio.wait_for(batcher.submit([seq(1)]), HANG_GUARD_S)
    ok = await asyncio.wait_for(batcher.submit([seq(2)]), HANG_GUARD_S)
    assert ok.scores.tolist() == pytest.approx([expected([2])])
    await batcher.close()
    (record,) = [r for r in caplog.records if r.name == "rmserve.service.batcher"]
    assert (record.getMessage(), record.__dict__["items"]) == ("batch scheduling failed", 1)


@pytest.mark.anyio
async def test_a_scheduler_bug_on_every_step_fails_each_request_and_does_not_spin() -> None:
    """A bug that recurs on every step, even with nothing queued: each request gets the error,
    the event loop keeps running other tasks, and the scheduler tries again only when there is
    something new (it spun at once, starving the loop, before)."""
    model = FakeModel()

    class AlwaysBroken(Batcher):
        steps = 0

        async def _schedule_once(self) -> None:
            self.steps += 1
            if self.steps > 1000:  # spinning: yield, so that the assertions below report it
                await asyncio.sleep(0.001)
            raise KeyError("bug")

    batcher = AlwaysBroken(
        model, pad_token_id=PAD, max_batch_size=4, max_batch_tokens=100, max_wait_s=0.0,
        max_queue_items=8,
    )  # fmt: skip
    batcher.start()
    for value in (1, 2, 3):
        with pytest.raises(InferenceError, match="scheduler failed"):
            await asyncio.wait_for(batcher.submit([seq(value)]), HANG_GUARD_S)
    assert batcher.steps <= 4  # one at the start, then one per submission
    assert await batcher.drain(HANG_GUARD_S)  # nothing queued or running: idle
    assert model.batches == []
    await batcher.close()


# --- several model instances ------------------------------------------------------------------


@pytest.mark.anyio
async def test_instances_run_batches_at_the_same_time() -> None:
    # Each instance's model waits until the other has started a batch: run one after the
    # other, the first would wait for ever (the hang guard) and the test would fail.
    started = [threading.Event(), threading.Event()]

    def instance(k: int) -> Any:
        def infer(ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> Any:
            started[k].set()
            assert started[1 - k].wait(HANG_GUARD_S), "the other instance never ran meanwhile"
            return np.full(ids.shape[0], float(k), dtype=np.float32)

        return infer

    batcher = Batcher(
        [instance(0), instance(1)], pad_token_id=PAD, max_batch_size=2,
        max_batch_tokens=1000, max_wait_s=0.0, max_queue_items=64,
    )  # fmt: skip
    batcher.start()
    results = await guarded(
        asyncio.gather(batcher.submit([seq(1), seq(2)]), batcher.submit([seq(3), seq(4)]))
    )
    await batcher.close()
    # Both instances scored a batch.
    assert {float(s) for r in results for s in r.scores} == {0.0, 1.0}


@pytest.mark.anyio
async def test_a_busy_instance_takes_its_next_batch_before_the_running_one_ends() -> None:
    model = FakeModel()
    model.release.clear()  # the first batch blocks until released
    batcher = Batcher(
        model, pad_token_id=PAD, max_batch_size=2, max_batch_tokens=1000, max_wait_s=0.0,
        max_queue_items=64,
    )  # fmt: skip
    batcher.start()
    first = asyncio.create_task(batcher.submit([seq(1), seq(2)]))
    await wait_until(model.started.is_set, "the first batch reached the model")
    second = asyncio.create_task(batcher.submit([seq(3), seq(4)]))
    third = asyncio.create_task(batcher.submit([seq(5), seq(6)]))
    # Both submissions queue their 4 items; the scheduler then hands out what it will in one
    # go (it does not yield between batches), so this sees the queue only after that.
    await wait_until(
        lambda: batcher.unfinished_items == 6 and batcher.queued_items <= 2,
        "both submissions queued and the scheduler took a batch",
    )
    # The second batch left the queue for the instance while the first still runs;
    # the third waits: one batch queued per instance at most.
    assert batcher.queued_items == 2
    assert not first.done()
    model.release.set()
    results = await asyncio.wait_for(asyncio.gather(first, second, third), HANG_GUARD_S)
    for result, ids in zip(results, ([1, 2], [3, 4], [5, 6]), strict=True):
        assert result.scores.tolist() == pytest.approx([expected([i]) for i in ids])
    await batcher.close()
    assert len(model.batches) == 3


@pytest.mark.anyio
async def test_close_fails_requests_whose_batches_are_still_running() -> None:
    model = FakeModel()
    model.release.clear()
    try:
        batcher, _ = make(model, max_wait_s=0.0)
        batcher.start()
        stuck = asyncio.create_task(batcher.submit([seq(1)]))
        await wait_until(model.started.is_set, "the batch reached the model")
        assert batcher.queued_items == 0
        assert batcher.unfinished_items == 1
        await batcher.close()
        with pytest.raises(BatcherClosedError):
            await asyncio.wait_for(stuck, HANG_GUARD_S)
    finally:
        model.release.set()
