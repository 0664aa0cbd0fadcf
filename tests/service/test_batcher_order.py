"""The batcher's edges that test_batcher.py does not pin: what a batcher may be built with, what
QueueFullError carries, a drain that runs out of time, and the accounting a request gets back
(float32 rows, inference time summed over its batches, never counted twice).

No timing decides a result: a model that must stay busy is blocked on an event that the test
sets, and a drain meant to time out waits on that blocked model.
"""

from __future__ import annotations

import asyncio
import logging
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
from tests.waiting import HANG_GUARD_S, guarded, wait_until, wait_until_blocking

NEVER_S = 3600.0


def constant(
    input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    return np.asarray((input_ids * attention_mask).sum(axis=1), dtype=np.float32)


def make(infer: Any = constant, **overrides: Any) -> Batcher:
    """A batcher over ``infer`` with the smallest accepted limits, but for ``overrides`` (any
    other constructor argument too)."""
    arguments: dict[str, Any] = {
        "pad_token_id": 0,
        "max_batch_size": 1,
        "max_batch_tokens": 1,
        "max_wait_s": 0.0,
        "max_queue_items": 1,
    }
    return Batcher(infer, **(arguments | overrides))


def test_limits_of_one_are_the_smallest_accepted() -> None:
    batcher = make()
    assert (batcher.max_batch_size, batcher.max_batch_tokens, batcher.max_queue_items) == (1, 1, 1)
    make(num_heads=1)


@pytest.mark.parametrize("field", ["max_batch_size", "max_batch_tokens", "max_queue_items"])
def test_each_limit_below_one_alone_is_refused(field: str) -> None:
    with pytest.raises(
        ValueError,
        match=r"^max_batch_size, max_batch_tokens, max_queue_items and num_heads must be >= 1$",
    ):
        make(**{field: 0})


def test_no_heads_or_no_inference_function_is_refused() -> None:
    with pytest.raises(ValueError, match=r"num_heads must be >= 1$"):
        make(num_heads=0)
    with pytest.raises(ValueError, match=r"^a batcher needs at least one inference function$"):
        make([])


def test_packed_functions_must_match_the_instances() -> None:
    with pytest.raises(ValueError, match=r"^give one packed inference function per instance$"):
        make([constant, constant], packed=[])


def test_a_full_queue_says_how_full_and_when_to_retry() -> None:
    batcher = make(max_queue_items=3, max_batch_size=2)
    batcher.check_admission(3)  # exactly the capacity fits
    with pytest.raises(QueueFullError) as full:
        batcher.check_admission(4)
    assert (full.value.queued, full.value.capacity, full.value.retry_after_s) == (0, 3, 1)
    assert str(full.value) == (
        "the queue holds 0 of at most 3 items; retry after 1 s or send fewer items per request"
    )


@pytest.mark.anyio
async def test_a_request_gets_float32_rows_and_the_inference_time_of_its_batches() -> None:
    stats: list[BatchStats] = []
    queue_lengths: list[int] = []
    batcher = make(
        max_batch_size=2,
        max_batch_tokens=64,
        max_queue_items=16,
        on_batch=stats.append,
        on_queue_change=queue_lengths.append,
    )
    batcher.start()
    try:
        sequences = [np.arange(1, n + 1, dtype=np.int64) for n in (1, 2, 3, 4, 5)]
        submitted = time.perf_counter()
        scored = await asyncio.wait_for(batcher.submit(sequences), HANG_GUARD_S)
        answered = time.perf_counter()
    finally:
        await batcher.close()
    assert scored.head_scores.dtype == np.float32
    assert scored.scores.tolist() == [float(n * (n + 1) // 2) for n in (1, 2, 3, 4, 5)]
    assert sum(s.size for s in stats) == 5
    assert len(stats) >= 3  # at most two items per batch
    # Each batch's time once, although it held two of the request's items.
    assert scored.inference_s == pytest.approx(sum(s.inference_s for s in stats))
    # The wait in the queue and the model's time lie within the call (bounds taken around
    # it, not a timing check); the last batch started after the request came (a monotonic
    # clock of nanoseconds, and a thread handoff between the two readings).
    assert 0.0 < scored.queue_s <= answered - submitted
    assert 0.0 < scored.inference_s <= answered - submitted
    assert queue_lengths[0] == 5  # the request's items arrived together
    assert queue_lengths[-1] == 0  # and all left the queue


@pytest.mark.anyio
async def test_requests_that_share_a_batch_each_count_its_inference_time() -> None:
    stats: list[BatchStats] = []
    batcher = make(max_batch_size=4, max_batch_tokens=64, max_queue_items=4, on_batch=stats.append)
    batcher.start()
    try:
        # Queued before the scheduler runs: one batch holds both requests.
        first = asyncio.ensure_future(batcher.submit([np.ones(2, dtype=np.int64)]))
        second = asyncio.ensure_future(batcher.submit([np.ones(3, dtype=np.int64)]))
        results = await guarded(asyncio.gather(first, second))
    finally:
        await batcher.close()
    (batch,) = stats
    assert batch.size == 2
    assert [r.inference_s for r in results] == [batch.inference_s, batch.inference_s]


@pytest.mark.anyio
async def test_retry_after_grows_with_the_batches_queued_ahead() -> None:
    # Never started: what is submitted stays queued, and close() fails it.
    batcher = make(
        [constant, constant],
        max_batch_size=2,
        max_batch_tokens=64,
        max_wait_s=NEVER_S,
        max_queue_items=100,
    )
    waiting = asyncio.ensure_future(batcher.submit([np.ones(2, dtype=np.int64)] * 100))
    await asyncio.sleep(0)  # submit() queues its items before its first await
    assert batcher.queued_items == 100
    with pytest.raises(QueueFullError) as full:
        batcher.check_admission(1)
    # 100 items, 2 per batch on each of 2 instances: 25 batches ahead of 0.05 s (the first
    # estimate of a batch's time) each, rounded up.
    assert (full.value.queued, full.value.capacity, full.value.retry_after_s) == (100, 100, 2)
    await batcher.close()
    with pytest.raises(BatcherClosedError, match=r"^the service stopped$"):
        await guarded(waiting)
    with pytest.raises(
        BatcherClosedError, match=r"^the service is shutting down and takes no new requests$"
    ):
        batcher.check_admission(1)  # a closed batcher takes nothing new


@pytest.mark.anyio
async def test_a_drain_that_runs_out_of_time_says_so(caplog: pytest.LogCaptureFixture) -> None:
    started, release = threading.Event(), threading.Event()

    def blocked(
        input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        started.set()
        release.wait(HANG_GUARD_S)
        return constant(input_ids, attention_mask)

    batcher = make(blocked, max_batch_tokens=64, max_wait_s=NEVER_S, max_queue_items=4)
    batcher.start()
    request = asyncio.ensure_future(batcher.submit([np.ones(3, dtype=np.int64)]))
    try:
        assert await asyncio.to_thread(started.wait, HANG_GUARD_S)  # the batch is running
        # The model is blocked until released: the drain cannot finish in time.
        with caplog.at_level(logging.ERROR, logger="rmserve.service.batcher"):
            assert await batcher.drain(0.01) is False
        assert batcher.unfinished_items == 1
        # The operator's record: what was left and after how long.
        (record,) = [r for r in caplog.records if r.name == "rmserve.service.batcher"]
        assert record.getMessage() == "drain timed out"
        assert (record.__dict__["items_left"], record.__dict__["timeout_s"]) == (1, 0.01)
        release.set()
        assert await batcher.drain(HANG_GUARD_S) is True
        assert (await guarded(request)).scores.tolist() == [3.0]
    finally:
        release.set()
        await batcher.close()


@pytest.mark.anyio
async def test_close_does_not_wait_for_a_batch_stuck_in_the_model() -> None:
    """close() answers what waits and returns; the worker thread finishes on its own. (A close
    that joined the worker would block the event loop until the model returned.)"""
    started, release = threading.Event(), threading.Event()
    released: list[bool] = []

    def blocked(
        input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        started.set()
        released.append(release.wait(HANG_GUARD_S))
        return constant(input_ids, attention_mask)

    batcher = make(blocked, max_batch_tokens=64, max_wait_s=0.0, max_queue_items=4)
    batcher.start()
    request = asyncio.ensure_future(batcher.submit([np.ones(3, dtype=np.int64)]))
    try:
        assert await asyncio.to_thread(started.wait, HANG_GUARD_S)
        await guarded(batcher.close())
        with pytest.raises(BatcherClosedError, match=r"^the service stopped$"):
            await guarded(request)
    finally:
        release.set()
    await asyncio.to_thread(wait_until_blocking, lambda: bool(released), "the model returned")
    assert released == [True]  # released by the test after close(), not by its own timeout


@pytest.mark.anyio
async def test_a_bug_past_the_model_fails_its_batch_and_frees_the_instance(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class BrokenHandOut(Batcher):
        broken = True

        async def _run_on(self, batch: Any, instance: int) -> None:
            if self.broken:
                self.broken = False
                raise KeyError("bug")
            await super()._run_on(batch, instance)

    batcher = BrokenHandOut(
        constant, pad_token_id=0, max_batch_size=1, max_batch_tokens=64, max_wait_s=0.0,
        max_queue_items=4,
    )  # fmt: skip
    batcher.start()
    try:
        failure = r"^scoring the batch failed; the server log has details$"
        with (
            caplog.at_level(logging.ERROR, logger="rmserve.service.batcher"),
            pytest.raises(InferenceError, match=failure),
        ):
            await guarded(batcher.submit([np.ones(2, dtype=np.int64)]))
        ok = await guarded(batcher.submit([np.ones(3, dtype=np.int64)]))
        assert ok.scores.tolist() == [3.0]
        assert batcher.unfinished_items == 0
    finally:
        await batcher.close()
    (record,) = [r for r in caplog.records if r.name == "rmserve.service.batcher"]
    assert record.getMessage() == "handing out a batch's scores failed"
    assert record.__dict__["items"] == 1


@pytest.mark.anyio
async def test_each_instance_runs_its_batches_one_at_a_time_on_its_own_thread() -> None:
    """Instance k's batches run on its one worker thread, ``rmserve-infer-k_0``: a batch
    queued behind a running one on the same instance waits for it (one session per instance,
    never two calls into it at once), while another instance runs beside them. A pool of
    several threads per instance, or the event loop's default executor, would run the queued
    batch on another thread at once."""
    release = threading.Event()
    lock = threading.Lock()
    calls: list[tuple[int, int, str]] = []  # (instance, first id, thread)
    running = [0, 0]
    most = [0, 0]

    def instance(k: int) -> Any:
        def infer(
            input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
        ) -> npt.NDArray[np.float32]:
            with lock:
                running[k] += 1
                most[k] = max(most[k], running[k])
                calls.append((k, int(input_ids[0, 0]), threading.current_thread().name))
            try:
                assert release.wait(HANG_GUARD_S)
                return constant(input_ids, attention_mask)
            finally:
                with lock:
                    running[k] -= 1

        return infer

    batcher = make([instance(0), instance(1)], max_batch_tokens=64, max_queue_items=4)
    batcher.start()
    requests = []
    try:
        requests.append(asyncio.ensure_future(batcher.submit([np.full(2, 1, dtype=np.int64)])))
        await wait_until(lambda: len(calls) == 1, "the first batch running on instance 0")
        requests.append(asyncio.ensure_future(batcher.submit([np.full(2, 2, dtype=np.int64)])))
        await wait_until(lambda: len(calls) == 2, "the second batch running on instance 1")
        # Both instances are busy: the third batch goes to instance 0, behind its first.
        requests.append(asyncio.ensure_future(batcher.submit([np.full(2, 3, dtype=np.int64)])))
        await wait_until(lambda: batcher.queued_items == 0, "the third batch given out")
        for _ in range(3):  # the batch's task hands it to the instance's executor
            await asyncio.sleep(0)
        release.set()
        scored = await guarded(asyncio.gather(*requests))
    finally:
        release.set()
        await batcher.close()
    assert [s.scores.tolist() for s in scored] == [[2.0], [4.0], [6.0]]
    assert sorted(calls, key=lambda call: call[1]) == [
        (0, 1, "rmserve-infer-0_0"),
        (1, 2, "rmserve-infer-1_0"),
        (0, 3, "rmserve-infer-0_0"),
    ]
    assert most == [1, 1]
