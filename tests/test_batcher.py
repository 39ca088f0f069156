"""The Batcher with a deterministic fake forward: coalescing, shapes, sorting, budget, drops, failures.

No model, no timing thresholds: the fake forward records every batch (shape + the real rows it saw)
and returns, per row, the sum of its input ids, so each call's results can be checked exactly.
A ``threading.Event`` gate holds the fake forward so tests can queue work behind a running batch.
Every test runs under ``asyncio.wait_for`` so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading

import numpy as np
import pytest

from rerankd.batcher import Batcher
from rerankd.config import BatchConfig
from rerankd.errors import BackendError, DeadlineExceeded, Overloaded
from rerankd.tokenization import Encoded

TIMEOUT = 20.0  # generous: only a hang should ever get near it
FAIL_ID = 666_666  # a row with this id makes the fake forward raise
SHORT_ID = 777_777  # ... return one row too few
LONG_ID = 888_888  # ... return one row too many

_tags = itertools.count(1000)


def seq(length: int, tag: int | None = None) -> Encoded:
    """A sequence whose every id is ``tag`` (unique by default): row sum = tag * length."""
    tag = next(_tags) if tag is None else tag
    return Encoded(np.full(length, tag, dtype=np.int32), np.zeros(length, dtype=np.int8))


def expected(seqs: list[Encoded]) -> list[int]:
    return [int(s.input_ids.astype(np.int64).sum()) for s in seqs]


def tag(s: Encoded) -> int:
    return int(s.input_ids[0])


class FakeForward:
    """Deterministic model: per row, the sum of its input ids. Records everything it sees."""

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.lock = threading.Lock()
        self.shapes: list[tuple[int, int]] = []
        self.batches: list[list[tuple[int, ...]]] = []  # real (unpadded) ids of each row
        self.problems: list[str] = []

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    @property
    def seen_tags(self) -> set[int]:
        with self.lock:
            return {row[0] for b in self.batches for row in b if row}

    def batch_tags(self) -> list[set[int]]:
        with self.lock:
            return [{row[0] for row in b} for b in self.batches]

    def __call__(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        self.entered.set()
        if not self.gate.wait(TIMEOUT):
            raise RuntimeError("fake forward: gate never opened")
        rows = []
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            if not (mask[r, :n] == 1).all() or (mask[r, n:] != 0).any():
                self.problems.append(f"row {r}: mask is not a prefix of ones")
            if (ids[r, n:] != self.pad_id).any() or (types[r, n:] != 0).any():
                self.problems.append(f"row {r}: padding is not pad_id / type 0")
            rows.append(tuple(int(x) for x in ids[r, :n]))
        for a in (ids, mask, types):
            if a.shape != ids.shape or a.dtype != np.int64:
                self.problems.append(f"bad array {a.shape} {a.dtype}")
        with self.lock:
            self.shapes.append(tuple(ids.shape))
            self.batches.append(rows)
        if (ids == FAIL_ID).any():
            raise RuntimeError("boom")
        out = (ids.astype(np.int64) * mask).sum(axis=1)
        if (ids == SHORT_ID).any():
            return out[:-1]
        if (ids == LONG_ID).any():
            return np.concatenate([out, out[:1]])
        return out


def make(
    fake: FakeForward,
    *,
    static: bool = False,
    max_length: int = 128,
    batch_sizes=(1, 2, 4, 8),
    seq_buckets=(32, 64, 128),
    max_batch_tokens: int = 8192,
    max_queue: int = 4096,
    sort_window: int = 256,
    batch_order: str = "length",
) -> Batcher:
    cfg = BatchConfig(
        batch_order=batch_order,
        batch_sizes=tuple(batch_sizes),
        seq_buckets=tuple(seq_buckets),
        max_batch_tokens=max_batch_tokens,
        max_queue=max_queue,
        sort_window=sort_window,
        warmup=False,
    )
    return Batcher("test", fake, cfg, max_length=max_length, static_shapes=static, pad_id=fake.pad_id)


def run(coro_fn, timeout: float = TIMEOUT):
    """Run ``coro_fn()`` in a fresh loop; a hang becomes a test failure."""

    async def main():
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(main())


async def wait_until(pred, what: str = "condition") -> None:
    for _ in range(int(TIMEOUT / 0.002)):
        if pred():
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


async def plug(b: Batcher, fake: FakeForward) -> list[asyncio.Task]:
    """Occupy both pipeline slots (one batch held in the forward, one prepared) so that every call
    submitted afterwards waits in the queue until ``fake.release()``. Returns the plug calls."""
    fake.hold()
    p1 = asyncio.create_task(b.submit([seq(3)]))
    await wait_until(fake.entered.is_set, "first plug in forward")
    p2 = asyncio.create_task(b.submit([seq(3)]))
    await asyncio.sleep(0)  # p2 enqueues
    await wait_until(lambda: b.queue_depth == 0, "second plug prepared")
    return [p1, p2]


async def finish(b: Batcher, fake: FakeForward) -> None:
    fake.release()
    await b.close()


# -- coalescing and per-call results ---------------------------------------------------------------


def test_coalesces_concurrent_calls_into_one_batch():
    fake = FakeForward()

    async def body():
        b = make(fake)
        await b.start()
        try:
            plugs = await plug(b, fake)
            a = [seq(5), seq(6)]
            c = [seq(7), seq(8), seq(9)]
            ta = asyncio.create_task(b.submit(a))
            await asyncio.sleep(0.01)  # a second call arriving later still joins the same batch
            tc = asyncio.create_task(b.submit(c))
            await wait_until(lambda: b.queue_depth == 5, "both calls queued")
            fake.release()
            (ra, _), (rc, _) = await asyncio.gather(ta, tc)
            await asyncio.gather(*plugs)
            assert ra == expected(a)
            assert rc == expected(c)
            batches = fake.batch_tags()
            assert len(batches) == 3, batches  # two plugs + one coalesced batch
            assert batches[2] == {tag(s) for s in a + c}
            assert b.stats.batches == 3 and b.stats.sequences == 7
        finally:
            await finish(b, fake)

    run(body)
    assert not fake.problems


def test_on_row_reports_each_row_when_its_batch_ends_and_a_failing_callback_is_contained():
    fake = FakeForward()

    async def body():
        b = make(fake, batch_sizes=(1,))  # one row per batch
        await b.start()
        try:
            seqs = [seq(4), seq(5), seq(6)]
            seen: list[tuple[int, int]] = []
            fake.hold()
            t = asyncio.create_task(b.submit(seqs, on_row=lambda i, row: seen.append((i, int(row)))))
            await wait_until(fake.entered.is_set, "first batch in forward")
            fake.release()
            rows, _ = await t
            # every row reported once, with its own index and value
            assert sorted(seen) == list(enumerate(expected(seqs))) and len(seen) == 3

            def bad(i, row):
                raise RuntimeError("callback bug")

            rows2, _ = await b.submit(seqs, on_row=bad)  # the call still gets its rows
            assert rows2 == expected(seqs) and rows == expected(seqs)
        finally:
            await finish(b, fake)

    run(body)
    assert not fake.problems


def test_each_call_gets_its_own_results_in_order():
    fake = FakeForward()
    rng = random.Random(7)

    async def body():
        b = make(fake, max_batch_tokens=512, batch_sizes=(1, 2, 4, 8, 16))
        await b.start()
        try:
            calls = [[seq(rng.randint(1, 128)) for _ in range(rng.randint(1, 12))] for _ in range(25)]

            async def one(i, seqs):
                for _ in range(i % 4):
                    await asyncio.sleep(0)
                return await b.submit(seqs)

            outs = await asyncio.gather(*(one(i, s) for i, s in enumerate(calls)))
            for seqs, (rows, queued) in zip(calls, outs):
                assert [int(r) for r in rows] == expected(seqs)
                assert queued >= 0.0
            assert b.stats.sequences == sum(len(c) for c in calls)
            assert b.queue_depth == 0
            # Many calls were in flight together: some batch mixed rows of different calls.
            owner = {tag(s): i for i, c in enumerate(calls) for s in c}
            assert any(len({owner[t] for t in bt}) > 1 for bt in fake.batch_tags())
        finally:
            await finish(b, fake)

    run(body)
    assert not fake.problems


def test_empty_submit_and_not_started():
    fake = FakeForward()

    async def body():
        b = make(fake)
        with pytest.raises(BackendError, match="not started"):
            await b.submit([seq(4)])
        await b.start()
        try:
            assert await b.submit([]) == ([], 0.0)
            with pytest.raises(ValueError, match="max_length"):
                await b.submit([seq(129)])
            assert b.queue_depth == 0
        finally:
            await finish(b, fake)

    run(body)
    assert fake.shapes == []


# -- shapes -------------------------------------------------------------------------------------------


def test_static_pads_to_seq_bucket():
    fake = FakeForward()

    async def body():
        b = make(fake, static=True, seq_buckets=(32, 64, 128), batch_sizes=(1, 2, 4, 8))
        await b.start()
        try:
            seqs = [seq(10), seq(40)]
            rows, _ = await b.submit(seqs)
            assert [int(r) for r in rows] == expected(seqs)
        finally:
            await finish(b, fake)

    run(body)
    assert fake.shapes == [(2, 64)]
    assert sorted(len(r) for r in fake.batches[0]) == [10, 40]
    assert not fake.problems


@pytest.mark.parametrize(
    "n, sizes, want",
    [
        (7, (1, 2, 4), [4, 2, 1]),
        (15, (1, 2, 4, 8), [8, 4, 2, 1]),
        (9, (2, 4, 8), [8, 1]),  # a bucket of 1 is always added
        (20, (1, 2, 4, 8), [8, 8, 4]),
    ],
)
def test_static_batch_sizes_decompose_into_buckets(n, sizes, want):
    fake = FakeForward()

    async def body():
        b = make(fake, static=True, batch_sizes=sizes)
        await b.start()
        try:
            seqs = [seq(10) for _ in range(n)]
            rows, _ = await b.submit(seqs)
            assert [int(r) for r in rows] == expected(seqs)
        finally:
            await finish(b, fake)

    run(body)
    assert fake.shapes == [(w, 32) for w in want]
    assert not fake.problems


def test_dynamic_pads_to_multiple_of_8_capped_at_max_length():
    fake = FakeForward()

    async def body():
        b = make(fake, static=False, max_length=130, batch_sizes=(1, 2, 4, 8))
        await b.start()
        try:
            for lens in ([10, 13], [3], [16], [17], [129], [130], [5, 5, 5]):
                seqs = [seq(n) for n in lens]
                rows, _ = await b.submit(seqs)
                assert [int(r) for r in rows] == expected(seqs)
        finally:
            await finish(b, fake)

    run(body)
    # Dynamic backends take any batch size (3 rows stay 3 rows) and pad to a multiple of 8.
    assert fake.shapes == [(2, 16), (1, 8), (1, 16), (1, 24), (1, 130), (1, 130), (3, 8)]
    assert not fake.problems


def test_max_batch_tokens_below_max_length_is_rejected():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        make(FakeForward(), max_length=128, max_batch_tokens=100)
    with pytest.raises(ValueError, match="batch_sizes"):
        make(FakeForward(), batch_sizes=(0, 4))
    with pytest.raises(ValueError, match="sort_window"):
        make(FakeForward(), sort_window=0)  # would never take a batch (and spin the event loop)


# -- sorting and budget ----------------------------------------------------------------------------


def test_length_sorting_keeps_short_and_long_apart():
    fake = FakeForward()
    short = [seq(5) for _ in range(8)]
    long_ = [seq(100) for _ in range(8)]

    async def body():
        b = make(fake, batch_sizes=(1, 2, 4, 8))
        await b.start()
        try:
            # One call, interleaved: the window sort must separate them (longest first).
            mixed = [s for pair in zip(short, long_) for s in pair]
            rows, _ = await b.submit(mixed)
            assert [int(r) for r in rows] == expected(mixed)
        finally:
            await finish(b, fake)

    run(body)
    assert fake.batch_tags() == [{tag(s) for s in long_}, {tag(s) for s in short}]
    assert fake.shapes == [(8, 104), (8, 8)]


async def _two_calls(b: Batcher, fake: "FakeForward", a: list, c: list, *, in_turn: bool = False) -> None:
    """Queue calls a and c behind plug batches (c strictly after a when ``in_turn``), release,
    and check each call got its own rows back."""
    plugs = await plug(b, fake)
    ta = asyncio.create_task(b.submit(a))
    if in_turn:
        await wait_until(lambda: b.queue_depth == len(a), "first call queued")
    tc = asyncio.create_task(b.submit(c))
    await wait_until(lambda: b.queue_depth == len(a) + len(c), "both calls queued")
    fake.release()
    (ra, _), (rc, _) = await asyncio.gather(ta, tc)
    await asyncio.gather(*plugs)
    assert [int(r) for r in ra] == expected(a)
    assert [int(r) for r in rc] == expected(c)


def test_length_sorting_across_calls():
    fake = FakeForward()

    async def body():
        b = make(fake, batch_sizes=(1, 2, 4))
        await b.start()
        try:
            a = [seq(4), seq(120), seq(6), seq(110)]
            c = [seq(115), seq(3), seq(125), seq(5)]
            await _two_calls(b, fake, a, c)
            longs = {tag(s) for s in a + c if len(s) > 100}
            shorts = {tag(s) for s in a + c if len(s) < 10}
            assert fake.batch_tags()[2:] == [longs, shorts]
            assert fake.shapes[2:] == [(4, 128), (4, 8)]
        finally:
            await finish(b, fake)

    run(body)


def test_length_order_serves_an_overdue_oldest_call_next_without_padding_it():
    """Length order took the longest rows of the window: a short call (a Search's query) queued
    behind a stream of long ones (an ingest's documents) ran only once no longer work was left
    (found by a review: a Search hit its deadline during a bulk Upsert). A call that stays the
    oldest while OVERDUE_AFTER_SKIPS batches take none of its rows now goes next, in batches of
    its own length bucket (a share of every batch, tried first, padded short rows to long ones:
    a third more padded tokens on a mixed load, found by a second review)."""
    from rerankd.batcher import OVERDUE_AFTER_SKIPS

    assert OVERDUE_AFTER_SKIPS == 2  # the batch indices below follow from it
    fake = FakeForward()
    short_old = [seq(5) for _ in range(4)]
    query = [seq(6)]
    longs = [[seq(100) for _ in range(8)] for _ in range(4)]
    arrivals = (short_old, longs[0], query, *longs[1:])

    async def body():
        b = make(fake, batch_sizes=(1, 2, 4, 8))
        await b.start()
        try:
            plugs = await plug(b, fake)
            calls = []
            for k, work in enumerate(arrivals):  # in this order of arrival
                calls.append(asyncio.create_task(b.submit(work)))
                want = sum(len(w) for w in arrivals[: k + 1])
                await wait_until(lambda: b.queue_depth == want, "call queued")
            fake.release()
            results = await asyncio.gather(*calls)
            await asyncio.gather(*plugs)
            for work, (rows, _) in zip(arrivals, results):
                assert [int(r) for r in rows] == expected(work)
        finally:
            await finish(b, fake)

    run(body)
    batches = fake.batch_tags()[2:]  # after the plugs
    assert batches[:2] == [{tag(s) for s in longs[0]}, {tag(s) for s in longs[1]}]  # longest first, twice
    # then the overdue oldest call, with the query that fits its bucket, before the later long calls
    assert batches[2] == {tag(s) for s in short_old + query} and fake.shapes[2 + 2] == (5, 8)
    assert not fake.problems


def test_priority_call_goes_ahead_of_queued_documents_and_a_prepared_batch():
    """A Search's query embedding waited for every document of a concurrent bulk Upsert (a
    review: first-stage Searches hit 5 s deadlines behind a 128-document Upsert). Query-side
    calls now use the priority queue: they wait for the batch in flight only; the batch that was
    already prepared is put back (once) and runs after them."""
    fake = FakeForward()
    docs = [seq(100) for _ in range(32)]
    query = [seq(6)]

    async def body():
        b = make(fake, batch_sizes=(1, 2, 4, 8))
        await b.start()
        try:
            fake.hold()
            td = asyncio.create_task(b.submit(docs))
            await wait_until(fake.entered.is_set, "first document batch in forward")
            await wait_until(lambda: b.queue_depth == 16, "second document batch prepared")
            tq = asyncio.create_task(b.submit(query, priority=True))
            await wait_until(lambda: b.queue_depth == 17, "query queued")
            fake.release()
            (rd, _), (rq, _) = await asyncio.gather(td, tq)
            assert [int(r) for r in rd] == expected(docs) and [int(r) for r in rq] == expected(query)
            assert b.queue_depth == 0 and b.stats.sequences == 33
        finally:
            await finish(b, fake)

    run(body)
    batches = fake.batch_tags()
    assert batches[0] <= {tag(s) for s in docs} and len(batches[0]) == 8  # was in flight
    assert batches[1] == {tag(query[0])}  # next: the query, not the prepared documents
    assert set().union(*batches[2:]) | batches[0] == {tag(s) for s in docs}
    assert not fake.problems


def test_a_steady_stream_of_priority_calls_does_not_starve_other_work():
    """After URGENT_STREAK priority batches in a row, one batch of the waiting work goes; a
    prepared batch is put back for priority work at most once."""
    from rerankd.batcher import URGENT_STREAK

    fake = FakeForward()
    docs = [seq(100) for _ in range(8)]  # one batch
    queries = [[seq(6)] for _ in range(3 * URGENT_STREAK)]

    async def body():
        b = make(fake, batch_sizes=(1,))  # every row is a batch of its own
        await b.start()
        try:
            plugs = await plug(b, fake)
            td = asyncio.create_task(b.submit(docs))
            tq = [asyncio.create_task(b.submit(q, priority=True)) for q in queries]
            await wait_until(lambda: b.queue_depth == len(docs) + len(queries), "all queued")
            fake.release()
            await asyncio.gather(td, *tq, *plugs)
            assert b.queue_depth == 0
        finally:
            await finish(b, fake)

    run(body)
    order = [next(iter(t)) for t in fake.batch_tags()]  # the plugs too (the prepared one is put back)
    first_doc = min(order.index(tag(s)) for s in docs)
    last_query = max(order.index(tag(q[0])) for q in queries)
    # a document batch runs while queries are still waiting, after at most URGENT_STREAK query
    # batches (+ the plugs): the batch taken for fairness is not put back (it was: 8, a review)
    assert first_doc <= URGENT_STREAK + 2 < last_query, order
    assert not fake.problems


def test_priority_calls_have_their_own_queue_budget():
    """A queue full of an ingest's documents refused every Search's query with RESOURCE_EXHAUSTED,
    although the query would have run next (the diff review): priority calls are admitted
    against the priority queue's own depth."""
    fake = FakeForward()

    async def body():
        b = make(fake, max_queue=16)
        await b.start()
        try:
            plugs = await plug(b, fake)
            docs = asyncio.create_task(b.submit([seq(50) for _ in range(16)]))
            await wait_until(lambda: b.queue_depth == 16, "documents fill the queue")
            with pytest.raises(Overloaded):
                await b.submit([seq(50)])  # another document call: refused
            q = asyncio.create_task(b.submit([seq(6)], priority=True))  # a query: admitted
            await wait_until(lambda: b.queue_depth == 17, "query queued")
            with pytest.raises(Overloaded):
                await b.submit([seq(6) for _ in range(16)], priority=True)  # over its own budget
            fake.release()
            (rq, _), (rd, _) = await asyncio.gather(q, docs)
            await asyncio.gather(*plugs)
            assert len(rq) == 1 and len(rd) == 16 and b.queue_depth == 0
        finally:
            await finish(b, fake)

    run(body)
    assert not fake.problems


def test_cancelled_priority_calls_stop_counting_against_their_budget_at_once():
    """Dead query work (cancelled, or past its deadline) still counted against the priority
    budget until the former reached it, so live queries were refused (the second diff review)."""
    fake = FakeForward()

    async def body():
        b = make(fake, max_queue=8)
        await b.start()
        try:
            plugs = await plug(b, fake)
            dead = [asyncio.create_task(b.submit([seq(6)], priority=True)) for _ in range(8)]
            await wait_until(lambda: b.queue_depth == 8, "queries queued")
            for t in dead:
                t.cancel()
            await asyncio.gather(*dead, return_exceptions=True)
            live = asyncio.create_task(b.submit([seq(6)], priority=True))  # admitted, not refused
            await wait_until(lambda: b.queue_depth == 1, "live query queued")
            fake.release()
            rows, _ = await live
            await asyncio.gather(*plugs)
            assert len(rows) == 1 and b.queue_depth == 0 and b._urgent_queued == 0
        finally:
            await finish(b, fake)

    run(body)
    assert not fake.problems


def test_priority_work_cancelled_after_a_bounce_leaves_the_accounting_straight():
    """A put-back batch counts again in the queue; its rows are dropped if their call is gone."""
    fake = FakeForward()
    docs = [seq(100) for _ in range(24)]

    async def body():
        b = make(fake, batch_sizes=(1, 2, 4, 8))
        await b.start()
        try:
            fake.hold()
            td = asyncio.create_task(b.submit(docs))
            await wait_until(fake.entered.is_set, "first batch in forward")
            await wait_until(lambda: b.queue_depth == 8, "second batch prepared")
            tq = asyncio.create_task(b.submit([seq(6)], priority=True))
            await wait_until(lambda: b.queue_depth == 9, "query queued")
            fake.release()
            await tq
            td.cancel()
            with pytest.raises(asyncio.CancelledError):
                await td
            await wait_until(lambda: b.queue_depth == 0, "queue empty")
            s7 = seq(7)
            again, _ = await b.submit([s7])
            assert [int(r) for r in again] == expected([s7])  # still serving
        finally:
            await finish(b, fake)

    run(body)
    assert not fake.problems


def test_length_order_never_pads_an_overdue_call_to_longer_rows():
    """The padding the first fix cost: a short call ahead of a long one on a static backend."""
    fake = FakeForward()
    short, long_ = [seq(20) for _ in range(64)], [seq(250) for _ in range(64)]

    async def body():
        b = make(fake, static=True, max_length=256, seq_buckets=(32, 64, 128, 256), batch_sizes=(1, 2, 4, 8, 16, 32),
                 max_batch_tokens=8192)
        await b.start()
        try:
            await _two_calls(b, fake, short, long_, in_turn=True)
        finally:
            await finish(b, fake)

    run(body)
    shapes = fake.shapes[2:]
    short_tags = {tag(s) for s in short}
    for rows, shape in zip(fake.batch_tags()[2:], shapes):
        assert not (rows & short_tags) or shape[1] == 32, shape  # short rows only ever in 32-token batches
    assert sum(r * t for r, t in shapes) == 64 * 32 + 64 * 256  # no padded token beyond the buckets


@pytest.mark.parametrize("static", [False, True])
def test_token_budget_respected(static):
    fake = FakeForward()
    rng = random.Random(3)

    async def body():
        b = make(fake, static=static, max_length=128, max_batch_tokens=256, batch_sizes=(1, 2, 4, 8, 16, 32))
        await b.start()
        try:
            seqs = [seq(rng.randint(1, 128)) for _ in range(200)]
            rows, _ = await b.submit(seqs)
            assert [int(r) for r in rows] == expected(seqs)
        finally:
            await finish(b, fake)

    run(body)
    assert fake.shapes
    for rows, padded in fake.shapes:
        assert rows * padded <= 256, (rows, padded)
    assert sum(r for r, _ in fake.shapes) == 200
    assert not fake.problems


# -- drops ----------------------------------------------------------------------------------------


def test_cancelled_queued_call_never_runs():
    fake = FakeForward()

    async def body():
        b = make(fake)
        await b.start()
        try:
            plugs = await plug(b, fake)
            doomed = [seq(9) for _ in range(10)]
            t = asyncio.create_task(b.submit(doomed))
            await wait_until(lambda: b.queue_depth == 10, "call queued")
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            fake.release()
            await asyncio.gather(*plugs)
            later = [seq(4), seq(5)]
            rows, _ = await b.submit(later)
            assert [int(r) for r in rows] == expected(later)
            assert not {tag(s) for s in doomed} & fake.seen_tags
            assert b.stats.dropped == 10
            assert b.queue_depth == 0
        finally:
            await finish(b, fake)

    run(body)


def test_cancel_while_forward_runs_drops_the_rest_of_the_call():
    fake = FakeForward()

    async def body():
        b = make(fake, batch_sizes=(1, 2, 4))
        await b.start()
        try:
            fake.hold()
            seqs = [seq(8) for _ in range(40)]
            t = asyncio.create_task(b.submit(seqs))
            await wait_until(fake.entered.is_set, "first batch in forward")
            await wait_until(lambda: b.queue_depth == 32, "second batch prepared")
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            fake.release()
            # A later call is served; by then the batcher has dropped everything of the cancelled one.
            later = [seq(4)]
            rows, _ = await b.submit(later)
            assert [int(r) for r in rows] == expected(later)
            mine = {tag(s) for s in seqs}
            assert len(mine & fake.seen_tags) == 4  # only the batch already in the forward ran
            assert b.stats.dropped == 36
            assert b.queue_depth == 0
        finally:
            await finish(b, fake)

    run(body)


def test_deadline_expiring_while_queued():
    fake = FakeForward()

    async def body():
        b = make(fake)
        await b.start()
        try:
            loop = asyncio.get_running_loop()
            plugs = await plug(b, fake)
            late = [seq(7) for _ in range(3)]
            with pytest.raises(DeadlineExceeded):
                await b.submit(late, deadline=loop.time() + 0.05)
            fake.release()
            await asyncio.gather(*plugs)
            later = [seq(4)]
            rows, _ = await b.submit(later)
            assert [int(r) for r in rows] == expected(later)
            assert not {tag(s) for s in late} & fake.seen_tags
            assert b.stats.dropped == 3
            assert b.queue_depth == 0
        finally:
            await finish(b, fake)

    run(body)


def test_deadline_already_past():
    fake = FakeForward()

    async def body():
        b = make(fake)
        await b.start()
        try:
            loop = asyncio.get_running_loop()
            past = [seq(7), seq(8)]
            with pytest.raises(DeadlineExceeded):
                await b.submit(past, deadline=loop.time() - 1.0)
            later = [seq(4)]
            rows, _ = await b.submit(later, deadline=loop.time() + TIMEOUT)
            assert [int(r) for r in rows] == expected(later)
            assert not {tag(s) for s in past} & fake.seen_tags
            assert b.queue_depth == 0
        finally:
            await finish(b, fake)

    run(body)


def test_queue_full_is_rejected_at_once_without_enqueuing():
    fake = FakeForward()

    async def body():
        b = make(fake, max_queue=8)
        await b.start()
        try:
            plugs = await plug(b, fake)
            first = [seq(5) for _ in range(6)]
            t1 = asyncio.create_task(b.submit(first))
            await wait_until(lambda: b.queue_depth == 6, "first call queued")
            rejected = [seq(6) for _ in range(3)]
            # Raises while the forward is still held: nothing has to drain first.
            with pytest.raises(Overloaded) as ei:
                await asyncio.wait_for(b.submit(rejected), 5.0)
            assert b.queue_depth == 6
            assert b.stats.rejected_calls == 1
            assert ei.value.retry_after_s == 0.05  # no batch timed yet: the floor
            # the hint: time for the queue to make room, at the measured seconds per row (was a
            # flat 50 ms however much was queued)
            b._seconds_per_seq = 0.5
            with pytest.raises(Overloaded) as ei:
                await asyncio.wait_for(b.submit(rejected + [seq(6)] * 3), 5.0)
            assert ei.value.retry_after_s == pytest.approx((6 + 6 - 8) * 0.5)
            fits = [seq(4) for _ in range(2)]  # 6 + 2 == max_queue: still admitted
            t2 = asyncio.create_task(b.submit(fits))
            await wait_until(lambda: b.queue_depth == 8, "second call queued")
            fake.release()
            (r1, _), (r2, _) = await asyncio.gather(t1, t2)
            await asyncio.gather(*plugs)
            assert [int(r) for r in r1] == expected(first)
            assert [int(r) for r in r2] == expected(fits)
            assert not {tag(s) for s in rejected} & fake.seen_tags
            assert b.stats.rejected_calls == 2 and b._seconds_per_seq < 0.5  # moved by the batches run since
        finally:
            await finish(b, fake)

    run(body)


# -- failures ---------------------------------------------------------------------------------------


def test_failing_forward_fails_every_waiting_call_then_recovers():
    fake = FakeForward()

    async def body():
        b = make(fake)
        await b.start()
        try:
            plugs = await plug(b, fake)
            a = [seq(5), seq(5, tag=FAIL_ID)]
            c = [seq(6), seq(7)]
            ta = asyncio.create_task(b.submit(a))
            tc = asyncio.create_task(b.submit(c))
            await wait_until(lambda: b.queue_depth == 4, "both calls queued")
            fake.release()
            ra, rc = await asyncio.gather(ta, tc, return_exceptions=True)
            assert isinstance(ra, BackendError), ra
            assert isinstance(rc, BackendError), rc
            assert "boom" in str(ra)
            await asyncio.gather(*plugs)
            assert b.stats.failed_batches == 1
            later = [seq(4), seq(9)]
            rows, _ = await b.submit(later)
            assert [int(r) for r in rows] == expected(later)
        finally:
            await finish(b, fake)

    run(body)


@pytest.mark.parametrize("marker", [SHORT_ID, LONG_ID])
def test_wrong_row_count_fails_the_calls(marker):
    fake = FakeForward()

    async def body():
        b = make(fake)
        await b.start()
        try:
            bad = [seq(5), seq(6, tag=marker), seq(7)]
            with pytest.raises(BackendError, match="rows"):
                await asyncio.wait_for(b.submit(bad), 5.0)
            later = [seq(4)]
            rows, _ = await b.submit(later)
            assert [int(r) for r in rows] == expected(later)
            assert b.stats.failed_batches == 1
        finally:
            await finish(b, fake)

    run(body)


def test_forward_returning_garbage_fails_the_call():
    async def body():
        b = Batcher("test", lambda ids, mask, types: None, BatchConfig(), max_length=128, static_shapes=False)
        await b.start()
        try:
            with pytest.raises(BackendError):
                await asyncio.wait_for(b.submit([seq(5)]), 5.0)
        finally:
            await b.close()

    run(body)


# -- warm shapes ------------------------------------------------------------------------------------


def test_warmup_runs_exactly_the_warm_shapes():
    fake = FakeForward()
    b = make(fake, static=True, max_length=128, seq_buckets=(32, 64, 128, 256), batch_sizes=(1, 2, 4, 8), max_batch_tokens=256)
    want = {(bs, t) for t in (32, 64, 128) for bs in (1, 2, 4, 8) if bs * t <= 256}
    assert set(b.warm_shapes()) == want
    assert b.warmup() == len(want)
    assert sorted(fake.shapes) == sorted(want)
    asyncio.run(b.close())


@pytest.mark.parametrize("order", ["length", "arrival"])
@pytest.mark.parametrize("seed", range(24))
def test_random_workloads_stay_inside_warm_shapes(seed, order):
    rng = random.Random(seed)
    static = seed % 3 != 0
    max_length = rng.choice([64, 100, 128, 256])
    buckets = tuple(rng.sample([8, 16, 32, 48, 64, 96, 128, 192, 256, 512], rng.randint(1, 5)))
    sizes = tuple(rng.sample([1, 2, 3, 4, 6, 8, 16, 32], rng.randint(1, 4)))
    budget = rng.choice([max_length, max_length + 7, 2 * max_length, 1000, 8192])
    window = rng.choice([1, 3, 8, 64, 256])
    fake = FakeForward(pad_id=rng.choice([0, 1]))
    b = make(
        fake, static=static, max_length=max_length, seq_buckets=buckets, batch_sizes=sizes,
        max_batch_tokens=budget, sort_window=window, batch_order=order,
    )
    calls = [[seq(rng.randint(1, max_length)) for _ in range(rng.randint(1, 15))] for _ in range(rng.randint(1, 12))]
    delays = [rng.randint(0, 3) for _ in calls]

    async def body():
        await b.start()
        try:
            async def one(d, seqs):
                for _ in range(d):
                    await asyncio.sleep(0)
                return await b.submit(seqs)

            outs = await asyncio.gather(*(one(d, s) for d, s in zip(delays, calls)))
            for seqs, (rows, _) in zip(calls, outs):
                assert [int(r) for r in rows] == expected(seqs)
        finally:
            await finish(b, fake)

    run(body)
    assert not fake.problems
    assert sum(r for r, _ in fake.shapes) == sum(len(c) for c in calls)
    largest = max(b.batch_sizes)
    for rows, t in fake.shapes:
        assert 1 <= rows <= largest and t <= max_length
        assert rows * t <= budget, (rows, t, budget)
    if static:
        warm = set(b.warm_shapes())
        assert set(fake.shapes) <= warm, set(fake.shapes) - warm
    else:
        assert all(t % 8 == 0 or t == max_length for _, t in fake.shapes)


# -- close ------------------------------------------------------------------------------------------


def test_close_fails_queued_waiters():
    fake = FakeForward()

    async def body():
        b = make(fake)
        await b.start()
        plugs = await plug(b, fake)
        queued = asyncio.create_task(b.submit([seq(5), seq(6)]))
        await wait_until(lambda: b.queue_depth == 2, "call queued")
        closing = asyncio.create_task(b.close())
        # Every waiter fails -- queued, prepared and in flight -- while the forward is still held.
        results = await asyncio.wait_for(asyncio.gather(queued, *plugs, return_exceptions=True), 5.0)
        assert all(isinstance(r, BackendError) for r in results), results
        fake.release()
        await closing
        assert b.queue_depth == 0
        with pytest.raises(BackendError):
            await b.submit([seq(3)])

    run(body)


def test_cancelled_work_stops_counting_against_the_queue_at_once():
    """A cancelled call's queued sequences must not make the batcher refuse live calls."""
    import threading as _th

    from rerankd.batcher import Batcher
    from rerankd.config import BatchConfig
    from rerankd.errors import Overloaded
    from rerankd.tokenization import Encoded

    gate = _th.Event()

    def forward(ids, mask, types):
        gate.wait(10)
        return np.zeros((ids.shape[0],), dtype=np.float32)

    def seq(n):
        return Encoded(np.arange(1, n + 1, dtype=np.int32), np.zeros(n, dtype=np.int8))

    async def run():
        b = Batcher("t", forward, BatchConfig(batch_sizes=(1, 2, 4), seq_buckets=(32,), max_batch_tokens=128, max_queue=12, warmup=False),
                    max_length=32, static_shapes=False)
        await b.start()
        try:
            first = asyncio.create_task(b.submit([seq(8)] * 4))  # runs (blocked in forward)
            await asyncio.sleep(0.05)
            big = asyncio.create_task(b.submit([seq(8)] * 10))
            await asyncio.sleep(0.05)
            with pytest.raises(Overloaded):
                await b.submit([seq(8)] * 10)
            big.cancel()
            with pytest.raises(asyncio.CancelledError):
                await big
            assert b.queue_depth <= 4  # only prepared/queued live work remains counted
            live = asyncio.create_task(b.submit([seq(8)] * 8))  # admitted now
            gate.set()
            out, _ = await asyncio.wait_for(live, 10)
            assert len(out) == 8
            await asyncio.wait_for(first, 10)
            assert b.queue_depth == 0
        finally:
            gate.set()
            await b.close()

    asyncio.run(run())


def test_arrival_order_serves_the_oldest_call_first():
    fake = FakeForward()

    async def body():
        b = make(fake, batch_sizes=(1, 2, 4), batch_order="arrival")
        await b.start()
        try:
            a = [seq(4), seq(120), seq(6), seq(110)]
            c = [seq(115), seq(3), seq(125), seq(5)]
            await _two_calls(b, fake, a, c, in_turn=True)
            # the whole first call, then the second: never a batch mixing them
            assert fake.batch_tags()[2:] == [{tag(s) for s in a}, {tag(s) for s in c}]
        finally:
            await finish(b, fake)

    run(body)


def test_arrival_order_keeps_the_token_budget_when_a_later_call_is_longer():
    """A short call ahead of a long one: the batch that takes rows of both is padded to the long
    rows' bucket, so it may hold only the rows that bucket allows (found by a review: it took the
    short call's row count, twice the budget, in a shape warmup never ran)."""
    fake = FakeForward()

    async def body():
        b = make(fake, static=True, max_length=256, seq_buckets=(32, 256), batch_sizes=(1, 2, 4, 8, 16, 32),
                 max_batch_tokens=4096, batch_order="arrival")
        await b.start()
        try:
            await _two_calls(b, fake, [seq(20)] * 3, [seq(250)] * 40, in_turn=True)
        finally:
            await finish(b, fake)

    run(body)
    assert not fake.problems
    assert all(rows * t <= 4096 for rows, t in fake.shapes), fake.shapes
    assert set(fake.shapes) <= set(make(fake, static=True, max_length=256, seq_buckets=(32, 256),
                                        batch_sizes=(1, 2, 4, 8, 16, 32), max_batch_tokens=4096).warm_shapes())


def test_unknown_batch_order_is_rejected():
    with pytest.raises(ValueError, match="batch_order"):
        make(FakeForward(), batch_order="random")


def test_rate_and_backlog_for_budgeted_callers():
    """seconds_per_token: model time per padded token over every batch (an EWMA, timed with the
    batcher's clock); backlog_tokens: the batches prepared or running plus the queued sequences
    at the caller's padded length. Budgeted Searches plan their chunks with both."""
    fake = FakeForward()
    b = make(fake, batch_sizes=(1, 2), max_batch_tokens=128)
    ticks = iter([10.0, 12.0, 12.0, 20.0, 21.0, 21.0, 30.0, 30.0, 30.0])
    b.clock = lambda: next(ticks, 30.0)

    async def main():
        await b.start()
        try:
            assert b.seconds_per_token is None and b.backlog_tokens(64) == 0
            await b.submit([seq(30), seq(30)])  # one batch of 2 x 32 padded tokens, timed 10 -> 12 s
            assert b.seconds_per_token == pytest.approx(2.0 / 64) and b.last_batch_at == 12.0
            await b.submit([seq(16)])  # 1 x 16 tokens, 20 -> 21 s: 1/16 s per token, EWMA 0.2
            assert b.seconds_per_token == pytest.approx(0.8 * 2.0 / 64 + 0.2 / 16)
            fake.hold()
            first = asyncio.ensure_future(b.submit([seq(30), seq(30)]))  # runs, parked in the fake
            await wait_until(lambda: fake.entered.is_set(), "the first batch running")
            second = asyncio.ensure_future(b.submit([seq(60), seq(60)]))  # prepared: 2 x 64 padded
            third = asyncio.ensure_future(b.submit([seq(10)] * 3))  # queued (the two slots are taken)
            await wait_until(lambda: b.queue_depth == 3, "three sequences queued")
            assert b.backlog_tokens(40) == 2 * 32 + 2 * 64 + 3 * 40
            fake.release()
            await asyncio.gather(first, second, third)
            assert b.backlog_tokens(40) == 0
            # a failed batch and a batch dropped for its passed deadline leave no backlog behind
            with pytest.raises(BackendError):
                await b.submit([seq(8, FAIL_ID)])
            fake.hold()
            parked = asyncio.ensure_future(b.submit([seq(30)]))
            await wait_until(lambda: fake.entered.is_set(), "a batch running")
            late = asyncio.ensure_future(b.submit([seq(30)], asyncio.get_running_loop().time() + 0.05))
            await asyncio.sleep(0.1)
            fake.release()
            await parked
            with pytest.raises(DeadlineExceeded):
                await late
            await wait_until(lambda: b.backlog_tokens(40) == 0, "no backlog")
            assert b.stats.failed_batches == 1
        finally:
            await b.close()

    run(main)
