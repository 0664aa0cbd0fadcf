"""Dynamic batching: items of many concurrent requests share model batches.

One queue holds *items* (token id sequences), not requests. A scheduler task on the event loop
forms a batch when one of these is reached:

- a padded-token budget: batch size x its longest item <= ``max_batch_tokens``;
- ``max_batch_size`` items;
- ``max_wait_s`` since the oldest waiting item arrived (or the service is draining).

Waiting items are sorted by length and cut into consecutive *candidates* (batches that could
be sent) under those limits and under ``max_padding_ratio`` (padded / real tokens), so each
batch holds items of similar length and little compute goes to padding. A "full" candidate is
sent at once; otherwise the candidate holding the oldest item is sent when that item's wait is
up, which also bounds how long a long item can be passed over.

Each model instance (an ORT session; :mod:`rmserve.service.runtime`) has one worker thread and
runs one batch at a time; a batch goes to the instance with the least work. ORT releases the
GIL, so the event loop keeps accepting requests meanwhile, and the next batch fills while
others run. When every instance is busy, a batch may also be queued behind an instance's
running batch (at most one per instance), so that the instance starts it as soon as it is done
instead of idling until the event loop notices and dispatches (docs/performance.md). The same
rules pick the batch either way.

Batches are right-padded with ``pad_token_id`` to their own longest item, with an attention
mask, so an item's score does not depend on its neighbours. With packed inference functions
(a decoder bundle's packed graph, :mod:`rmserve.packing`) the functions lay the batch out
themselves: items of the batch that share a prompt (one request's group, or concurrent
requests whose rendered prompts are identical) share a row and the prompt is computed once.
Batch selection then takes a prompt's items as one unit (:meth:`Batcher._units`), so that
responses of different lengths to one prompt are not cut apart by the padding ratio; a group
larger than a batch computes its prompt once per batch.

A model may have several heads (outputs per item, ``num_heads``): every item gets its row of
``num_heads`` values. The model's answer must have one row per item of the batch; any other
shape fails that batch's requests with :class:`InferenceError` (an item must never get its
neighbour's row, nor wait forever for a row that never came).

The queue is bounded: a request whose items do not fit raises :class:`QueueFullError` at once (the
routes answer 429 with Retry-After) instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from rmserve.packing import PackedBatch, pad_batch, prefix_groups, row_length
from rmserve.service.runtime import head_rows

__all__ = [
    "BatchStats",
    "Batcher",
    "BatcherClosedError",
    "InferenceError",
    "QueueFullError",
    "ScoredRequest",
]

logger = logging.getLogger("rmserve.service.batcher")

IdArray = npt.NDArray[np.int64]
ScoreRows = npt.NDArray[np.float32]  # (B, K): one row of K head values per item
# (B, T) ids and mask -> (B, K), or (B,) for a model of one head.
InferenceFn = Callable[[IdArray, IdArray], npt.NDArray[np.float32]]
# Sequences -> (B, K) and the packed batch that ran (ModelRuntime.run_sequences).
PackedInferenceFn = Callable[[list[IdArray]], tuple[ScoreRows, PackedBatch]]

# A running batch and one queued behind it: the instance never waits for the event loop.
_MAX_BATCHES_PER_INSTANCE = 2


class QueueFullError(Exception):
    """The queue cannot take the request's items now; retry after ``retry_after_s``."""

    def __init__(self, queued: int, capacity: int, retry_after_s: int):
        self.queued = queued
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the queue holds {queued} of at most {capacity} items; retry after "
            f"{retry_after_s} s or send fewer items per request"
        )


class BatcherClosedError(Exception):
    """The service is draining or stopped and takes no new work."""


class InferenceError(RuntimeError):
    """The model failed on a batch; every request with an item in it gets this."""


@dataclass(frozen=True)
class BatchStats:
    size: int  # items in the batch
    padded_tokens: int  # size x longest item
    real_tokens: int  # sum of item lengths
    inference_s: float  # model time, packing included
    started: float = 0.0  # time.perf_counter() when the worker thread took the batch
    shared_tokens: int = 0  # prompt tokens shared by items of a row, computed once


@dataclass(frozen=True)
class ScoredRequest:
    head_scores: ScoreRows  # (n, K) in the order the sequences were given
    queue_s: float  # from submission until its last item's batch started
    inference_s: float  # summed time of the batches its items ran in

    @property
    def scores(self) -> npt.NDArray[np.float32]:
        """(n,): the one head of a one-head model. A model of several heads has no single
        score here (which head is the reward is the manifest's business): read head_scores."""
        if self.head_scores.shape[1] != 1:
            raise ValueError(
                f"the model has {self.head_scores.shape[1]} heads; read head_scores, not scores"
            )
        return self.head_scores[:, 0]


class _Request:
    """The items of one ``submit`` call and where their scores go."""

    __slots__ = ("enqueued_at", "future", "inference_s", "last_start", "remaining", "scores")

    def __init__(self, n: int, num_heads: int, future: asyncio.Future[None]):
        self.scores: ScoreRows = np.zeros((n, num_heads), dtype=np.float32)  # (n, K)
        self.remaining = n
        self.future = future
        self.enqueued_at = time.perf_counter()
        self.last_start = self.enqueued_at
        self.inference_s = 0.0


class _Item:
    __slots__ = ("ids", "index", "length", "request")

    def __init__(self, ids: IdArray, request: _Request, index: int):
        self.ids = ids
        self.length = int(ids.shape[0])
        self.request = request
        self.index = index


class Batcher:
    """Collects items from concurrent requests into padded batches for ``infer``."""

    def __init__(
        self,
        infer: InferenceFn | Sequence[InferenceFn],
        *,
        packed: Sequence[PackedInferenceFn] | None = None,
        pad_token_id: int,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queue_items: int,
        max_padding_ratio: float = float("inf"),
        num_heads: int = 1,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_queue_change: Callable[[int], None] | None = None,
    ):
        if max_batch_size < 1 or max_batch_tokens < 1 or max_queue_items < 1 or num_heads < 1:
            raise ValueError(
                "max_batch_size, max_batch_tokens, max_queue_items and num_heads must be >= 1"
            )
        # One function per model instance, each called from its own worker thread only.
        self._infers = [infer] if callable(infer) else list(infer)
        if not self._infers:
            raise ValueError("a batcher needs at least one inference function")
        # Packed functions, one per instance, used instead of ``infer`` when given.
        self._packed = list(packed) if packed is not None else None
        if self._packed is not None and len(self._packed) != len(self._infers):
            raise ValueError("give one packed inference function per instance")
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_items = max_queue_items
        self.max_padding_ratio = max_padding_ratio
        self.num_heads = num_heads
        self._on_batch = on_batch
        self._on_queue_change = on_queue_change
        self._pending: list[_Item] = []  # arrival order; the oldest first
        self._load = [0] * len(self._infers)  # batches given to each instance, not yet done
        self._batches: dict[asyncio.Task[None], list[_Item]] = {}  # given to instances, not done
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self._draining = False
        self._task: asyncio.Task[None] | None = None
        # One worker thread per instance: an instance runs its batches one after another.
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rmserve-infer-{k}")
            for k in range(len(self._infers))
        ]
        self._recent_batch_s = 0.05  # moving estimate of one batch's duration, for Retry-After

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._schedule(), name="rmserve-batcher"
            )

    @property
    def queued_items(self) -> int:
        return len(self._pending)

    @property
    def unfinished_items(self) -> int:
        """Items queued or in a batch that has not finished (what a drain waits for)."""
        return len(self._pending) + sum(len(batch) for batch in self._batches.values())

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work, finish what is queued and running; False if it timed out."""
        self._accepting = False
        self._draining = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            logger.error(
                "drain timed out",
                extra={"items_left": self.unfinished_items, "timeout_s": timeout_s},
            )
            return False
        return True

    async def close(self) -> None:
        """Stop the scheduler; requests still waiting get BatcherClosedError."""
        self._accepting = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        stopped = BatcherClosedError("the service stopped")
        running = [item for batch in self._batches.values() for item in batch]
        for item in [*self._pending, *running]:
            if not item.request.future.done():
                item.request.future.set_exception(stopped)
        self._pending.clear()
        tasks = list(self._batches)
        for task in tasks:
            task.cancel()  # their worker threads finish the batch; the results are dropped
        await asyncio.gather(*tasks, return_exceptions=True)
        for executor in self._executors:
            executor.shutdown(wait=False)

    # --- submission -----------------------------------------------------------------------

    async def submit(self, sequences: Sequence[IdArray]) -> ScoredRequest:
        """Score token id sequences (each (T_i,) int64); waits until all are scored."""
        n = len(sequences)
        self.check_admission(n)
        if n == 0:
            return ScoredRequest(np.zeros((0, self.num_heads), dtype=np.float32), 0.0, 0.0)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        request = _Request(n, self.num_heads, future)
        self._pending.extend(_Item(ids, request, i) for i, ids in enumerate(sequences))
        self._idle.clear()
        self._queue_changed()
        self._wakeup.set()
        await future
        return ScoredRequest(
            request.scores, request.last_start - request.enqueued_at, request.inference_s
        )

    def check_admission(self, n: int) -> None:
        """Raise BatcherClosedError if the service takes no new work, QueueFullError if ``n``
        items would not fit in the queue (callers check before tokenizing, so a full or
        draining server refuses work before spending CPU on it)."""
        if not self._accepting:
            raise BatcherClosedError("the service is shutting down and takes no new requests")
        queued = len(self._pending)
        if queued + n > self.max_queue_items:
            raise QueueFullError(queued, self.max_queue_items, self._retry_after_s(queued))

    def _retry_after_s(self, queued: int) -> int:
        batches_ahead = math.ceil(queued / (self.max_batch_size * len(self._infers)))
        return max(1, math.ceil(batches_ahead * self._recent_batch_s))

    def _queue_changed(self) -> None:
        if self._on_queue_change is not None:
            self._on_queue_change(len(self._pending))

    # --- scheduling -----------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            try:
                await self._schedule_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug here must not leave every waiting request hanging: fail them and go on.
                logger.exception("batch scheduling failed", extra={"items": len(self._pending)})
                error = InferenceError("the batch scheduler failed; the server log has details")
                for item in self._pending:
                    if not item.request.future.done():
                        item.request.future.set_exception(error)
                self._pending.clear()
                self._queue_changed()
                if not self._batches:
                    self._idle.set()
                # Nothing waits now: go on at the next submission or finished batch. Trying
                # again at once would spin without ever yielding when the bug recurs on every
                # step, and the event loop, health checks included, would stop.
                self._wakeup.clear()
                await self._wakeup.wait()

    async def _schedule_once(self) -> None:
        """Wait for work and an instance to take it, or form one batch and give it there."""
        instance = min(range(len(self._load)), key=self._load.__getitem__)
        if not self._pending or self._load[instance] >= _MAX_BATCHES_PER_INSTANCE:
            if not self._pending and not self._batches:
                self._idle.set()
            # A submission or a finished batch sets the event.
            await self._wakeup.wait()
            self._wakeup.clear()
            return
        now = time.perf_counter()
        batch = self.select(now)
        if batch is None:
            deadline = self._pending[0].request.enqueued_at + self.max_wait_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.0, deadline - now))
            self._wakeup.clear()
            return
        taken = {id(item) for item in batch}
        self._pending = [item for item in self._pending if id(item) not in taken]
        self._queue_changed()
        self._load[instance] += 1
        task = asyncio.get_running_loop().create_task(self._run(batch, instance))
        self._batches[task] = batch

    def select(self, now: float) -> list[_Item] | None:
        """The batch to run now, or None to keep waiting for more items.

        Pending items are taken as *units* (:meth:`_units`: one item each, or with packed
        inference the items that share a prompt) sorted by length and cut into consecutive
        candidates: a candidate ends where the next (longer) unit would break the size limit
        or the token budget (the candidate is then "full") or would push its padded/real token
        ratio over ``max_padding_ratio`` (it may still fill with units of its own length). The
        candidate holding the oldest item goes once that item has waited ``max_wait_s`` (or
        when draining); before that only a full candidate goes, the one with the oldest item
        among full candidates.
        """
        pending = self._pending
        if not pending:
            return None
        oldest = pending[0]
        candidates: list[tuple[list[_Item], bool]] = []  # (items, full)
        candidate: list[_Item] = []
        rows = real = 0
        for unit, length in sorted(self._units(pending), key=lambda u: u[1]):
            # Sorted ascending: if added, the new unit is the longest row of the candidate.
            if candidate:
                count = len(candidate) + len(unit)
                full = count > self.max_batch_size or (rows + 1) * length > self.max_batch_tokens
                if full or (rows + 1) * length > self.max_padding_ratio * (real + length):
                    candidates.append((candidate, full))
                    candidate, rows, real = [], 0, 0
            candidate.extend(unit)
            rows += 1
            real += length
        candidates.append((candidate, len(candidate) >= self.max_batch_size))
        expired = self._draining or now - oldest.request.enqueued_at >= self.max_wait_s
        if expired:
            return next(c for c, _ in candidates if any(item is oldest for item in c))
        full_candidates = [c for c, full in candidates if full]
        if not full_candidates:
            return None
        age = {id(item): position for position, item in enumerate(pending)}
        return min(full_candidates, key=lambda c: min(age[id(item)] for item in c))

    def _units(self, pending: list[_Item]) -> list[tuple[list[_Item], int]]:
        """(items, row length) that batching keeps together: each item alone, or, with
        packed inference, the items whose common prefix is at least half of each of them
        (a prompt shared by short responses: a GRPO group, concurrent requests of one
        prompt), so that a group of responses of different lengths stays in one batch and
        its prompt is computed once; the row length is then the prefix once plus each own
        part. A unit holds at most ``max_batch_size`` items within ``max_batch_tokens``."""
        if self._packed is None or len(pending) < 2:
            return [([item], item.length) for item in pending]

        def joins(prefix: int, members: list[int]) -> bool:
            lengths = [pending[i].length for i in members]
            return (
                2 * prefix >= max(lengths)
                and len(members) <= self.max_batch_size
                and row_length(lengths, prefix) <= self.max_batch_tokens
            )

        units = []
        for shared, members in prefix_groups([item.ids for item in pending], joins):
            items = [pending[i] for i in members]
            units.append((items, row_length((item.length for item in items), shared)))
        return units

    async def _run(self, batch: list[_Item], instance: int) -> None:
        """Run ``batch`` on ``instance`` and hand out its scores; the instance is free again
        afterwards, whatever happened, and no request of the batch is left waiting."""
        try:
            await self._run_on(batch, instance)
        except Exception:
            # A bug past the model call must not leave the batch's requests hanging.
            logger.exception("handing out a batch's scores failed", extra={"items": len(batch)})
            _fail(batch, InferenceError("scoring the batch failed; the server log has details"))
        finally:
            self._load[instance] -= 1
            task = asyncio.current_task()
            if task is not None:
                self._batches.pop(task, None)
            self._wakeup.set()

    async def _run_on(self, batch: list[_Item], instance: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            # The shape check runs in there too: a wrong answer fails the batch like an error.
            scores, stats = await loop.run_in_executor(
                self._executors[instance],
                self._pack_and_infer,
                instance,
                [item.ids for item in batch],
            )
        except Exception as e:
            logger.exception("inference failed", extra={"batch_size": len(batch)})
            # The exception's text (ORT's carries node names and its source paths) goes to
            # the log only; the answer names the failure without the server's internals.
            _fail(
                batch,
                InferenceError(
                    f"the model failed on a batch of {len(batch)} items ({type(e).__name__}); "
                    "the server log has the details"
                ),
            )
            return
        self._recent_batch_s = 0.8 * self._recent_batch_s + 0.2 * stats.inference_s
        for item in batch:
            item.request.last_start = max(item.request.last_start, stats.started)
        # Inference time is summed once per request: its items may span several batches.
        for request in {id(item.request): item.request for item in batch}.values():
            request.inference_s += stats.inference_s
        for row, item in enumerate(batch):
            request = item.request
            request.scores[item.index] = scores[row]
            request.remaining -= 1
            if request.remaining == 0 and not request.future.done():
                request.future.set_result(None)
        if self._on_batch is not None:
            self._on_batch(stats)

    def _pack_and_infer(
        self, instance: int, sequences: list[IdArray]
    ) -> tuple[ScoreRows, BatchStats]:
        """Run the batch on ``instance`` (worker thread): packed when the batcher has packed
        functions, else right-padded to the batch's own longest item; (B, K) scores, or
        ModelOutputError when the model's answer has another shape."""
        started = time.perf_counter()
        real = sum(int(s.shape[0]) for s in sequences)
        if self._packed is not None:
            scores, packed = self._packed[instance](sequences)
            padded, shared = packed.padded_tokens, packed.shared_tokens
            scores = head_rows(scores, len(sequences), self.num_heads)
        else:
            input_ids, attention_mask = pad_batch(sequences, self.pad_token_id)
            padded, shared = int(input_ids.size), 0
            out = self._infers[instance](input_ids, attention_mask)
            scores = head_rows(out, len(sequences), self.num_heads)  # (B, K)
        stats = BatchStats(
            size=len(sequences),
            padded_tokens=padded,
            real_tokens=real,
            inference_s=time.perf_counter() - started,
            started=started,
            shared_tokens=shared,
        )
        return scores, stats


def _fail(batch: list[_Item], error: Exception) -> None:
    """Give ``error`` to every request of ``batch`` still waiting."""
    for item in batch:
        if not item.request.future.done():
            item.request.future.set_exception(error)
