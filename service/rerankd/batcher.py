"""The batcher: owns every batching decision for one model.

* Coalesces sequences from concurrent calls into batches filled up to a token budget.
* Sorts by token length inside a window of queued sequences (longest first), so a batch holds
  sequences of similar length and padding waste stays small — or, with ``batch_order=arrival``,
  serves the oldest call's sequences first (longest first within it), trading some padding for
  calls finishing in arrival order under load.
* Pads each batch to a fixed shape from a small bucket set (``seq_buckets`` x ``batch_sizes``)
  when the backend compiles per shape (``static_shapes()``); every such shape is run once by
  ``warmup()`` before the service reports SERVING. Dynamic-shape backends (ONNX Runtime CPU)
  get batches padded only to a multiple of 8 — padding to a bucket would burn CPU for nothing.
* One batch in flight plus one prepared: the next batch is formed and padded while the
  current one runs in the model thread.
* Priority calls (query-side embeddings: a Search's query, Encode with ``is_query``) wait in a
  queue of their own that goes first, so a query is not queued behind a bulk Upsert's documents;
  a prepared non-priority batch is put back once for them (``URGENT_STREAK`` keeps a steady
  stream of queries from starving the documents).
* Drops work whose call was cancelled or whose deadline passed before it ran.
* Bounded queue: ``submit`` raises ``Overloaded`` at once when it is full.
* A failed batch fails every call waiting on it; no call is ever left hanging.

Model work runs on one dedicated thread per batcher, never on the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .config import BatchConfig, resolve_batch
from .errors import BackendError, DeadlineExceeded, Overloaded
from .tokenization import Encoded

log = logging.getLogger(__name__)

Forward = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# Length order: a call that stayed the oldest while this many batches took none of its rows goes next.
OVERDUE_AFTER_SKIPS = 2
# Priority queue: after this many priority batches in a row while other work waited, one batch of
# the other work goes next.
URGENT_STREAK = 4


@dataclass(eq=False)
class _Call:
    future: asyncio.Future
    results: list
    remaining: int
    deadline: float | None  # loop.time() based
    submitted: float
    started: float | None = None
    queued: int = 0  # this call's sequences still in the queue (counted in Batcher._queued)
    released: bool = False  # its queued sequences no longer count against max_queue
    skipped: int = 0  # length order: batches formed while it was the oldest call and took none of its rows
    priority: bool = False  # queued in the priority queue (query-side work)
    on_row: Callable[[int, object], None] | None = None  # told each row as its batch finishes


@dataclass(eq=False)
class _Item:
    call: _Call
    index: int
    seq: Encoded
    bounced: bool = False  # its prepared batch was put back once for priority work: not again


@dataclass
class BatchStats:
    batches: int = 0
    sequences: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    dropped: int = 0
    failed_batches: int = 0
    rejected_calls: int = 0
    shapes: dict = field(default_factory=dict)

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


@dataclass(frozen=True)
class Prepared:
    items: list[_Item]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    real_tokens: int


class Batcher:
    def __init__(
        self,
        name: str,
        forward: Forward,
        config: BatchConfig,
        *,
        max_length: int,
        static_shapes: bool,
        backend: str = "",
        pad_id: int = 0,
        on_batch: Callable[[str, Prepared, float], None] | None = None,
    ) -> None:
        self.name = name
        self._forward = forward
        config = resolve_batch(config, backend, max_length)  # --max-batch-tokens 0 (auto): per backend
        self.config = config
        self.max_length = max_length
        self.static = static_shapes
        self.pad_id = pad_id
        self._on_batch = on_batch
        self.seq_buckets = sorted({b for b in config.seq_buckets if b < max_length} | {max_length})
        self.batch_sizes = sorted(set(config.batch_sizes))
        if not self.batch_sizes or self.batch_sizes[0] < 1:
            raise ValueError("batch_sizes must be positive")
        if self.batch_sizes[0] != 1:
            # Without a bucket of 1 a lone sequence would need padding rows; keep it simple.
            self.batch_sizes = [1, *self.batch_sizes]
        if config.batch_order not in ("length", "arrival"):
            raise ValueError(f"batch_order must be length or arrival, got {config.batch_order!r}")
        if config.sort_window < 1:
            # A window of 0 never takes a batch: the former would spin on the event loop forever.
            raise ValueError(f"sort_window must be at least 1, got {config.sort_window}")
        if config.max_batch_tokens < max_length:
            raise ValueError(f"max_batch_tokens={config.max_batch_tokens} is below max_length={max_length}")
        self._queue: deque[_Item] = deque()
        self._urgent: deque[_Item] = deque()  # priority calls' sequences (counted in _queued too)
        self._urgent_streak = 0  # priority batches formed in a row while _queue had work
        self._urgent_ready = 0  # prepared batches holding priority rows, not yet taken by the runner
        self._queued = 0
        self._urgent_queued = 0  # live priority sequences queued (their own max_queue budget)
        self._seconds_per_seq = 0.0  # EWMA of batch time per row (the queue-full retry hint)
        # EWMA of model time per padded token over every batch (budgeted Searches plan with it),
        # the clock time of the last batch, and the padded tokens of the batches prepared or running.
        self.seconds_per_token: float | None = None
        self.last_batch_at: float | None = None
        self._batch_tokens = 0
        self.clock = time.perf_counter  # times batches (tests: a fake clock)
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._ready: asyncio.Queue[Prepared] | None = None
        self._tasks: list[asyncio.Task] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        self.stats = BatchStats()

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._tasks:
            return
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(2)  # one batch in flight + one prepared
        self._ready = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._former(), name=f"batcher-{self.name}-former"),
            asyncio.create_task(self._runner(), name=f"batcher-{self.name}-runner"),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks = []
        # Fail every call still waiting: queued, in a prepared batch (the runner fails the batch
        # it had in flight when it was cancelled).
        err = BackendError(f"{self.name}: shutting down")
        for q in (self._queue, self._urgent):
            for it in q:
                it.call.queued, it.call.released = 0, True
            self._fail(list(q), err)
            q.clear()
        while self._ready is not None and not self._ready.empty():
            self._fail(self._ready.get_nowait().items, err)
        self._queued = self._urgent_queued = 0
        self._batch_tokens = 0
        # Wait for a batch still running in the model thread without blocking the event loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        return self._queued

    def backlog_tokens(self, padded_len: int) -> int:
        """Padded tokens a call submitted now waits behind: the batches prepared or running, plus
        each queued sequence counted at ``padded_len`` (queued lengths are not tracked; the caller
        passes its own). Priority work that would go first is counted too."""
        return self._batch_tokens + self._queued * padded_len

    # -- shapes ---------------------------------------------------------------------------------
    def seq_bucket(self, length: int) -> int:
        if not self.static:
            return min(self.max_length, -(-length // 8) * 8)
        i = bisect.bisect_left(self.seq_buckets, length)
        return self.seq_buckets[min(i, len(self.seq_buckets) - 1)]

    def max_rows(self, padded_len: int) -> int:
        return max(1, min(self.batch_sizes[-1], self.config.max_batch_tokens // padded_len))

    def batch_bucket(self, n: int) -> int:
        """Largest batch size bucket <= n (dynamic backends take n itself)."""
        if not self.static:
            return n
        i = bisect.bisect_right(self.batch_sizes, n)
        return self.batch_sizes[max(i - 1, 0)]

    def warm_shapes(self) -> list[tuple[int, int]]:
        if self.static:
            return [(b, t) for t in self.seq_buckets for b in self.batch_sizes if b <= self.max_rows(t)]
        # Dynamic backends: one small and one full-size batch per bucket is enough to warm caches.
        return sorted({(1, t) for t in self.seq_buckets} | {(self.max_rows(t), t) for t in self.seq_buckets})

    def warmup(self) -> int:
        """Run every shape this batcher can produce once (blocking; call before SERVING)."""
        shapes = self.warm_shapes()
        for b, t in shapes:
            ids = np.full((b, t), self.pad_id, dtype=np.int64)
            ids[:, 0] = 101 if self.pad_id == 0 else self.pad_id
            self._forward(ids, np.ones((b, t), dtype=np.int64), np.zeros((b, t), dtype=np.int64))
        return len(shapes)

    # -- submit ---------------------------------------------------------------------------------
    async def submit(self, seqs: list[Encoded], deadline: float | None = None, *,
                     priority: bool = False, on_row: Callable[[int, object], None] | None = None) -> tuple[list, float]:
        """Run ``seqs`` through the model; returns (one result row per sequence, queue wait in s).

        ``deadline`` is an absolute ``loop.time()``; ``priority`` puts the call in the priority
        queue (interactive query-side work, see the module doc); raises ``Overloaded`` when the queue is full,
        ``DeadlineExceeded`` when the deadline passes first, ``BackendError`` when a batch fails.
        ``on_row(index, row)`` is called (on the event loop) for each sequence as soon as its batch
        has run, before the whole call is done (the reranker hands scores to calls waiting on
        them); an exception it raises is logged, never the batcher's.
        """
        if not seqs:
            return [], 0.0
        if not self._tasks:
            raise BackendError(f"{self.name}: batcher not started")
        n = len(seqs)
        # Priority calls have a budget of their own (their queue): a queue full of an ingest's
        # documents refused every Search's query, which would have run next (the diff review).
        queued = self._urgent_queued if priority else self._queued
        if queued + n > self.config.max_queue:
            self.stats.rejected_calls += 1
            # Retry once enough of the queue has run to make room (was a flat 50 ms, whatever
            # was queued: clients following the hint retried far too often; found by a review).
            wait = (queued + n - self.config.max_queue) * self._seconds_per_seq
            raise Overloaded(f"{self.name} queue full ({queued} queued, limit {self.config.max_queue}); retry later",
                             retry_after_s=max(0.05, wait))
        loop = asyncio.get_running_loop()
        now = loop.time()
        call = _Call(future=loop.create_future(), results=[None] * n, remaining=n, deadline=deadline, submitted=now,
                     queued=n, priority=priority, on_row=on_row)
        longest = max(len(s) for s in seqs)
        if longest > self.max_length:
            raise ValueError(f"sequence of {longest} tokens exceeds max_length {self.max_length}")
        (self._urgent if priority else self._queue).extend(_Item(call, i, s) for i, s in enumerate(seqs))
        self._queued += n
        if priority:
            self._urgent_queued += n
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            if deadline is None:
                results = await call.future
            else:
                results = await asyncio.wait_for(call.future, timeout=max(deadline - now, 0.0))
        except asyncio.TimeoutError:
            self._release(call)
            raise DeadlineExceeded(f"deadline exceeded waiting for {self.name}") from None
        except BaseException:
            # Cancelled (the awaited future is cancelled too) or failed: its queued sequences are
            # dropped when reached, and stop counting against max_queue now, so dead work can
            # never make the batcher refuse live calls.
            self._release(call)
            raise
        return results, (call.started or loop.time()) - call.submitted

    # -- internals -------------------------------------------------------------------------------
    def _release(self, call: _Call) -> None:
        if not call.released:
            self._queued -= call.queued
            if call.priority:
                self._urgent_queued -= call.queued
            call.queued = 0
            call.released = True

    def _alive(self, item: _Item, now: float) -> bool:
        call = item.call
        if call.future.done():
            return False
        if call.deadline is not None and now >= call.deadline:
            call.future.set_exception(DeadlineExceeded(f"deadline exceeded before {self.name} ran"))
            return False
        return True

    def _pick_queue(self) -> tuple[deque[_Item], bool]:
        """The queue the next batch comes from: the priority one while it has work, except that
        after URGENT_STREAK priority batches in a row one batch of the other work goes. Returns
        (queue, whether that batch was taken for fairness: it must not be put back)."""
        if self._urgent and not (self._queue and self._urgent_streak >= URGENT_STREAK):
            self._urgent_streak = self._urgent_streak + 1 if self._queue else 0
            return self._urgent, False
        fair = bool(self._urgent)
        self._urgent_streak = 0
        return (self._queue if self._queue else self._urgent), fair

    def _take_batch(self) -> list[_Item]:
        now = asyncio.get_running_loop().time()
        queue, fair = self._pick_queue()
        window: list[_Item] = []
        while queue and len(window) < self.config.sort_window:
            item = queue.popleft()
            if self._alive(item, now):
                window.append(item)
            else:
                if not item.call.released:
                    self._queued -= 1
                    self._urgent_queued -= item.call.priority
                    item.call.queued -= 1
                self.stats.dropped += 1
        if not window:
            return []
        if self.config.batch_order == "arrival":
            # Oldest call first (its pairs longest first): a call admitted later never delays the
            # remaining batches of one that is already running.
            window.sort(key=lambda it: (it.call.submitted, -len(it.seq), it.index))
            # Rows are taken in that order, so the longest of them need not come first: grow the
            # batch while every row taken so far still fits the rows allowed at the bucket of
            # the longest one (the token budget, and only shapes warmup() has run).
            n, longest = 0, 0
            for it in window:
                longest_if = max(longest, len(it.seq))
                if n + 1 > self.max_rows(self.seq_bucket(longest_if)):
                    break
                n, longest = n + 1, longest_if
            n = self.batch_bucket(max(n, 1))
        else:
            window, n = self._length_order(window)
        batch, rest = window[:n], window[n:]
        # Put the rest back at the head, in arrival order, so older work goes first next time.
        rest.sort(key=lambda it: (it.call.submitted, it.index))
        queue.extendleft(reversed(rest))
        self._queued -= len(batch)
        for it in batch:
            it.call.queued -= 1
            self._urgent_queued -= it.call.priority
            if fair:  # taken after URGENT_STREAK priority batches: runs even if priority work waits
                it.bounced = True
        return batch

    def _length_order(self, window: list[_Item]) -> tuple[list[_Item], int]:
        """Longest rows first (least padding), unless the oldest call is overdue. Returns the
        window reordered (the batch's rows first) and the batch's row count.

        Taking only the longest rows starved short ones for as long as longer work kept arriving:
        a 12-token Search query waited out its deadline behind a bulk Upsert's 200-token documents
        (found by a review). So a call that stayed the oldest while ``OVERDUE_AFTER_SKIPS``
        batches took none of its rows goes next: its rows longest first, the batch filled with
        other rows that fit its own length bucket. Its rows are never padded to longer ones, and
        no padding is added for it (giving it a share of every batch instead cost a third more
        padded tokens on a mixed load; found by a second review)."""
        oldest = min(window, key=lambda it: (it.call.submitted, it.index)).call
        if oldest.skipped >= OVERDUE_AFTER_SKIPS:
            mine = sorted((it for it in window if it.call is oldest), key=lambda it: len(it.seq), reverse=True)
            bucket = self.seq_bucket(len(mine[0].seq))
            fits = sorted((it for it in window if it.call is not oldest and len(it.seq) <= bucket),
                          key=lambda it: len(it.seq), reverse=True)
            chosen = mine + fits
            n = self.batch_bucket(min(len(chosen), self.max_rows(bucket)))
            taken = {id(it) for it in chosen[:n]}
            return chosen[:n] + [it for it in window if id(it) not in taken], n
        window.sort(key=lambda it: len(it.seq), reverse=True)
        n = self.batch_bucket(min(len(window), self.max_rows(self.seq_bucket(len(window[0].seq)))))
        if not any(it.call is oldest for it in window[:n]):
            oldest.skipped += 1
        return window, n

    def _bounce(self, prepared: Prepared) -> bool:
        """Put a prepared batch of non-priority rows back at the head of its queue, once per row,
        so priority work queued meanwhile runs before it (it waits for the batch in flight only,
        not for this one too). Returns whether it was put back."""
        items = prepared.items
        if any(it.bounced for it in items):
            return False
        for it in items:
            it.bounced = True
            if not it.call.released:
                it.call.queued += 1
                self._queued += 1
        self._queue.extendleft(reversed(items))
        assert self._wakeup is not None
        self._wakeup.set()
        return True

    def _prepare(self, batch: list[_Item]) -> Prepared:
        t = self.seq_bucket(max(len(it.seq) for it in batch))
        b = len(batch)
        ids = np.full((b, t), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, t), dtype=np.int64)
        types = np.zeros((b, t), dtype=np.int64)
        real = 0
        for r, it in enumerate(batch):
            n = len(it.seq)
            ids[r, :n] = it.seq.input_ids
            mask[r, :n] = 1
            types[r, :n] = it.seq.token_type_ids
            real += n
        return Prepared(batch, ids, mask, types, real)

    async def _former(self) -> None:
        assert self._wakeup is not None and self._slots is not None and self._ready is not None
        while True:
            await self._slots.acquire()
            batch: list[_Item] = []
            while not batch:
                if not (self._queue or self._urgent):
                    self._wakeup.clear()
                    await self._wakeup.wait()
                batch = self._take_batch()
            try:
                prepared = self._prepare(batch)
            except Exception as e:  # never leave a waiter hanging
                log.exception("%s: failed to prepare a batch", self.name)
                self._fail(batch, BackendError(f"{self.name}: failed to prepare batch: {e}"))
                self._slots.release()
                continue
            if any(it.call.priority for it in batch):
                self._urgent_ready += 1
            self._batch_tokens += int(prepared.input_ids.size)
            self._ready.put_nowait(prepared)

    async def _runner(self) -> None:
        assert self._slots is not None and self._ready is not None
        loop = asyncio.get_running_loop()
        while True:
            prepared = await self._ready.get()
            urgent = any(it.call.priority for it in prepared.items)
            if urgent:
                self._urgent_ready -= 1
            try:
                now = loop.time()
                if not any(self._alive(it, now) for it in prepared.items):
                    self.stats.dropped += len(prepared.items)
                    continue
                if not urgent and (self._urgent or self._urgent_ready) and self._bounce(prepared):
                    continue
                for it in prepared.items:
                    if it.call.started is None:
                        it.call.started = now
                t0 = self.clock()
                try:
                    out = await loop.run_in_executor(
                        self._executor, self._forward, prepared.input_ids, prepared.attention_mask, prepared.token_type_ids
                    )
                    if len(out) != len(prepared.items):
                        raise BackendError(f"{self.name}: backend returned {len(out)} rows for {len(prepared.items)}")
                except Exception as e:
                    log.error("%s: batch of shape %s failed: %s", self.name, prepared.input_ids.shape, e)
                    self.stats.failed_batches += 1
                    err = e if isinstance(e, BackendError) else BackendError(f"{self.name}: batch failed: {e}")
                    self._fail(prepared.items, err)
                    continue
                seconds = self.clock() - t0
                self._record(prepared, seconds)
                for row, it in zip(out, prepared.items):
                    call = it.call
                    if call.future.done():
                        continue
                    call.results[it.index] = row
                    call.remaining -= 1
                    if call.on_row is not None:
                        try:
                            call.on_row(it.index, row)
                        except Exception:
                            log.exception("%s: a row callback failed", self.name)
                    if call.remaining == 0:
                        call.future.set_result(call.results)
            except asyncio.CancelledError:  # close(): never leave this batch's callers hanging
                self._fail(prepared.items, BackendError(f"{self.name}: shutting down"))
                raise
            finally:
                self._batch_tokens -= int(prepared.input_ids.size)
                self._slots.release()

    def _record(self, p: Prepared, seconds: float) -> None:
        per_seq = seconds / max(1, len(p.items))
        self._seconds_per_seq = per_seq if self.stats.batches == 0 else 0.8 * self._seconds_per_seq + 0.2 * per_seq
        per_token = seconds / max(1, int(p.input_ids.size))
        old = self.seconds_per_token
        self.seconds_per_token = per_token if old is None else 0.8 * old + 0.2 * per_token
        self.last_batch_at = self.clock()
        s = self.stats
        s.batches += 1
        s.sequences += len(p.items)
        s.real_tokens += p.real_tokens
        s.padded_tokens += int(p.input_ids.size)
        shape = tuple(p.input_ids.shape)
        s.shapes[shape] = s.shapes.get(shape, 0) + 1
        if self._on_batch is not None:
            try:
                self._on_batch(self.name, p, seconds)
            except Exception:  # metrics must never break serving
                log.exception("on_batch hook failed")

    @staticmethod
    def _fail(items: list[_Item], err: Exception) -> None:
        for it in items:
            if not it.call.future.done():
                it.call.future.set_exception(err)
