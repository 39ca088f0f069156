"""The incremental BM25 index: scores equal a fresh bm25s build after any sequence of writes,
a write costs only its own documents, deletes are final, and searches read stable snapshots."""

from __future__ import annotations

import bm25s
import numpy as np
import pytest

from rerankd.stages import bm25 as bm25_mod
from rerankd.stages.bm25 import BM25Index, tokenize
from rerankd.store import DocumentStore, NewDocument
from util import ChangeLogSource

WORDS = [f"w{i}" for i in range(400)] + ["aspirin", "stroke", "cancer", "heart", "running", "runs", "the", "of"]


def _corpus(rng: np.random.Generator, n: int) -> list[str]:
    p = 1.0 / np.arange(1, len(WORDS) + 1)  # Zipf-like: some terms in most documents, most in few
    p /= p.sum()
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(0, 40)), p=p)) for _ in range(n)]


def _built_index(rng: np.random.Generator, n: int) -> tuple[ChangeLogSource, BM25Index]:
    """A source with ``n`` random documents and an index refreshed over them."""
    src = ChangeLogSource()
    idx = BM25Index(src)
    src.add(_corpus(rng, n))
    idx.mark_dirty()
    idx.refresh()
    return src, idx


def _assert_matches_bm25s(idx: BM25Index, src: ChangeLogSource, queries: list[str], k: int = 20) -> None:
    live = sorted(src.docs)
    ref = bm25s.BM25()
    ref.index(tokenize([src.docs[lb] for lb in live]), show_progress=False)
    idx.refresh()
    assert idx.labels() == set(live)
    for q in queries:
        labels, scores = idx.search(q, k)
        qt = tokenize([q])
        inv = {i: t for t, i in qt.vocab.items()}
        want = ref.get_scores([inv[i] for i in qt.ids[0]]) if qt.ids[0] else np.zeros(len(live))
        got = dict(zip(labels.tolist(), scores.tolist()))
        for lb, s in got.items():  # every returned score is bm25s's score of that document
            assert s == pytest.approx(float(want[live.index(lb)]), rel=1e-5, abs=1e-6), (q, lb)
        n_pos = int((want > 0).sum())
        assert len(labels) == min(k, n_pos), q
        if len(labels):  # nothing outside the returned set scores above its lowest (ties aside)
            best_left = max((float(want[i]) for i, lb in enumerate(live) if lb not in got), default=0.0)
            assert best_left <= min(got.values()) * (1 + 1e-5) + 1e-6, q
        assert list(scores) == sorted(scores, reverse=True)


@pytest.mark.parametrize("merge_min", [10**9, 300])  # tail only / many merges and compactions
def test_scores_equal_a_fresh_bm25s_build_after_writes(monkeypatch, merge_min):
    monkeypatch.setattr(bm25_mod, "MERGE_MIN_POSTINGS", merge_min)
    monkeypatch.setattr(bm25_mod, "COMPACT_MIN_DEAD", 20 if merge_min < 10**9 else 10**9)
    rng = np.random.default_rng(7)
    src = ChangeLogSource()
    idx = BM25Index(src, background_merge=False)
    queries = ["aspirin stroke", "w1 w3 w250", "w399 w398 heart", "running runs", "w0 w0 w7", "nothing here", "the of"]
    src.add(_corpus(rng, 300))
    for step in range(12):
        if step % 3 == 2:
            src.delete(rng.choice(sorted(src.docs), size=60, replace=False).tolist())
        src.add(_corpus(rng, 40))
        if step % 4 == 0:  # several writes folded into one refresh
            src.add(_corpus(rng, 10))
        idx.mark_dirty()
        _assert_matches_bm25s(idx, src, queries)
    if merge_min < 10**9:
        assert idx.merges >= 3  # the merge/compaction path was exercised
    else:
        assert idx.merges == 0


def test_a_write_reads_only_its_own_documents():
    src = ChangeLogSource()
    idx = BM25Index(src)
    src.add(_corpus(np.random.default_rng(1), 500))
    idx.mark_dirty()
    idx.refresh()
    assert src.calls[-1] == (0, 500)
    src.add(["aspirin prevents stroke"])
    idx.mark_dirty()
    top, _ = idx.search("aspirin stroke", 1)  # read-your-writes
    assert src.calls[-1] == (500, 1) and top.tolist() == [501]
    n_calls = len(src.calls)
    idx.search("aspirin", 1)  # no write since: the store is not asked again
    assert len(src.calls) == n_calls


def test_deleted_documents_are_never_returned_and_leave_no_frequencies():
    src = ChangeLogSource()
    idx = BM25Index(src)
    a, b, c = src.add(["zebra aspirin", "zebra stroke", "aspirin heart"])
    idx.mark_dirty()
    assert set(idx.search("zebra", 5)[0].tolist()) == {a, b}
    src.delete([a, b])
    idx.mark_dirty()
    assert idx.search("zebra", 5)[0].size == 0
    assert idx.search("aspirin", 5)[0].tolist() == [c]
    src.delete([c])
    idx.mark_dirty()
    assert idx.search("aspirin", 5)[0].size == 0 and len(idx) == 0
    (d,) = src.add(["aspirin"])
    idx.mark_dirty()
    labels, scores = idx.search("aspirin", 5)
    # one live document containing the term: idf = ln(1 + 0.5/1.5), the deleted ones no longer count
    assert labels.tolist() == [d] and scores[0] == pytest.approx(np.log(1 + 0.5 / 1.5) * 1 / (1 + 1.5), rel=1e-5)


def test_a_search_snapshot_is_not_changed_by_later_refreshes(monkeypatch):
    monkeypatch.setattr(bm25_mod, "MERGE_MIN_POSTINGS", 50)
    monkeypatch.setattr(bm25_mod, "COMPACT_MIN_DEAD", 5)
    rng = np.random.default_rng(3)
    src = ChangeLogSource()
    idx = BM25Index(src, background_merge=False)
    src.add(_corpus(rng, 100))
    idx.mark_dirty()
    idx.refresh()
    snap = idx._snap
    frozen = {f: np.array(getattr(snap, f), copy=True) for f in ("labels", "doc_len", "alive", "df", "fwd_ptr",
                                                                "fwd_term", "fwd_tf", "main_slot", "main_tf")}
    merges = idx.merges
    for _ in range(5):
        src.delete(rng.choice(sorted(src.docs), size=15, replace=False).tolist())
        src.add(_corpus(rng, 30))
        idx.mark_dirty()
        idx.refresh()
    assert idx.merges > merges
    for f, arr in frozen.items():
        assert np.array_equal(getattr(snap, f), arr), f


def test_store_change_log_feeds_the_index(tmp_path):
    store = DocumentStore(tmp_path / "docs.sqlite3")
    vec = np.zeros(4, dtype=np.float32)

    def doc(i, text):
        return NewDocument(id=i, title="", text=text, metadata={}, vector=vec, token_ids=None)

    idx = BM25Index(store)
    store.upsert([doc("a", "aspirin stroke"), doc("b", "heart attack"), doc("c", "aspirin colon")])
    idx.mark_dirty()
    assert idx.search("aspirin", 5)[0].size == 2
    seq0 = store.last_seq()
    store.upsert([doc("a", "coffee liver")])  # replace: the old label is gone, a new one is live
    store.delete(["c"])
    last, labels, texts, gone = store.text_changes_after(seq0)
    assert last == store.last_seq() and texts == ["coffee liver"] and len(gone) == 2
    idx.mark_dirty()
    assert idx.search("aspirin", 5)[0].size == 0
    assert idx.search("coffee", 5)[0].tolist() == labels.tolist()
    assert len(idx) == 2
    store.close()


def test_a_refresh_that_fails_part_way_is_rebuilt_from_the_source(monkeypatch):
    """Out of memory half-way through applying a batch left the arrays out of step with each
    other (and a failed merge broke every later search): the next refresh starts over."""
    rng = np.random.default_rng(5)
    src, idx = _built_index(rng, 200)
    real_extend = bm25_mod._Grow.extend
    calls = []

    def failing_extend(self, x):
        calls.append(1)
        if len(calls) == 2:  # after the forward pointers grew, before the terms and labels did
            raise MemoryError("simulated")
        return real_extend(self, x)

    monkeypatch.setattr(bm25_mod._Grow, "extend", failing_extend)
    src.add(_corpus(rng, 50))
    idx.mark_dirty()
    with pytest.raises(MemoryError):
        idx.refresh()
    assert idx.failures == 1 and idx.stale and "MemoryError" in idx.last_error
    monkeypatch.setattr(bm25_mod._Grow, "extend", real_extend)
    src.delete(sorted(src.docs)[:10])
    idx.mark_dirty()
    idx._retry_at = 0.0  # the backoff has passed
    _assert_matches_bm25s(idx, src, ["w1 w2", "aspirin stroke w5", "w399"])
    assert src.calls[-1][0] == 0  # rebuilt from the start of the log
    assert idx.failures == 0 and not idx.stale and idx.last_error is None and idx.refresh_failures_total == 1


def test_a_failing_refresh_leaves_searches_on_the_last_good_index_and_backs_off(monkeypatch):
    """A refresh that keeps failing (out of memory, say) made every Search fail and start a full
    rebuild of its own, and so did every write. Searches now read the last good snapshot and
    never retry themselves (they tell the owner, ``on_stale``); the owner's attempts wait for a
    doubling backoff (1, 2, 4 ... 60 s)."""
    rng = np.random.default_rng(6)
    src, idx = _built_index(rng, 200)
    before = idx.search("w1 w2", 10)
    seq_before = idx.applied_seq
    now = [1000.0]
    monkeypatch.setattr(bm25_mod, "_now", lambda: now[0])
    stale_calls = []
    idx.on_stale = lambda: stale_calls.append(1)
    real_add = BM25Index._add
    attempts = []

    def failing_add(self, labels, texts):
        attempts.append(len(labels))
        raise MemoryError("simulated")

    monkeypatch.setattr(BM25Index, "_add", failing_add)
    new = src.add(["w1 w2 w1 w2 w1 w2"])  # would be the best match for "w1 w2"
    idx.mark_dirty()
    got = idx.search("w1 w2", 10)  # the search's refresh fails: it reads the old snapshot
    assert [a.tolist() for a in got] == [a.tolist() for a in before] and new[0] not in got[0].tolist()
    assert idx.failures == 1 and idx.retry_in() == pytest.approx(1.0) and len(attempts) == 1
    assert len(stale_calls) == 1  # the owner is told, so that it retries
    now[0] += 100  # long past the backoff: searches still do not retry (the owner does)
    for _ in range(5):
        assert idx.search("w1 w2", 10)[0].tolist() == before[0].tolist()
    assert len(attempts) == 1 and len(stale_calls) == 6
    idx._retry_at = now[0] + 1.0
    assert idx.refresh() is False and len(attempts) == 1  # the owner's attempt waits for the backoff
    waits = []
    for _ in range(8):  # each failed retry doubles the wait, up to 60 s
        now[0] += idx.retry_in()
        with pytest.raises(MemoryError):
            idx.refresh()
        waits.append(idx.retry_in())
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0] and len(attempts) == 9
    assert idx.applied_seq == seq_before and idx.refresh_failures_total == 9
    assert idx.search("w1 w2", 10)[0].tolist() == before[0].tolist()
    monkeypatch.setattr(BM25Index, "_add", real_add)  # the cause went away
    now[0] += 30
    assert idx.refresh() is False  # still backing off
    assert idx.refresh(force=True) is True  # an explicit flush does not wait
    assert idx.search("w1 w2", 10)[0].tolist()[0] == new[0]  # up to date
    assert idx.failures == 0 and idx.retry_in() == 0.0 and idx.last_error is None
    _assert_matches_bm25s(idx, src, ["w1 w2", "w399"])


def test_the_backoff_does_not_overflow_after_many_failures(monkeypatch):
    """2 ** failures overflowed a float after 1,024 failures in a row (~17 hours of a persistent
    failure at one a minute): the error escaped the handler and the backoff was gone for good."""
    rng = np.random.default_rng(8)
    src, idx = _built_index(rng, 20)
    monkeypatch.setattr(bm25_mod, "_now", lambda: 50.0)
    monkeypatch.setattr(BM25Index, "_add", lambda *a: (_ for _ in ()).throw(MemoryError("simulated")))
    src.add(["w1"])
    idx.mark_dirty()
    idx.failures = 5000
    with pytest.raises(MemoryError):
        idx.refresh(force=True)
    assert idx.failures == 5001 and idx.retry_in() == 60.0 and idx.last_error == "MemoryError: simulated"


def test_searches_queued_behind_a_failing_refresh_do_not_each_retry_it(monkeypatch):
    """Searches wait for a refresh in progress (so they see acknowledged writes). When that
    refresh failed, each queued search ran its own attempt -- a full rebuild each, one after
    another (a review). They now find the failure once they hold the lock and read the old index."""
    import threading

    rng = np.random.default_rng(9)
    src, idx = _built_index(rng, 100)
    idx.on_stale = lambda: None  # owned (the pipeline retries): searches never retry
    # the clock reads 0 when the failure sets its backoff, and 1000 for everyone after: by the
    # time the queued searches hold the lock the retry is due, and still they must not run it
    reads = []
    monkeypatch.setattr(bm25_mod, "_now", lambda: reads.append(1) or (0.0 if len(reads) == 1 else 1000.0))
    expected = idx.search("w1", 5)[0].tolist()
    entered, release = threading.Event(), threading.Event()
    attempts = []

    def slow_failing_add(self, labels, texts):
        attempts.append(1)
        entered.set()
        assert release.wait(30)
        raise MemoryError("simulated")

    monkeypatch.setattr(BM25Index, "_add", slow_failing_add)
    src.add(["w1 w1 w1"])
    idx.mark_dirty()
    owner = threading.Thread(target=lambda: pytest.raises(MemoryError, idx.refresh) and None)
    owner.start()
    assert entered.wait(10)
    results = []
    searches = [threading.Thread(target=lambda: results.append(idx.search("w1", 5)[0].tolist())) for _ in range(5)]
    for t in searches:
        t.start()
    release.set()
    owner.join(10)
    for t in searches:
        t.join(10)
    assert not owner.is_alive() and not any(t.is_alive() for t in searches)
    assert len(attempts) == 1 and idx.failures == 1
    assert results == [expected] * 5


def test_a_stale_index_masks_documents_deleted_since(monkeypatch):
    """While a failed refresh is retried, documents deleted or replaced after the last good
    snapshot still sat in it and took top-k places that the caller then dropped: most of a
    small index replaced under new ids gave a BM25 Search no hits at all (a review)."""
    src = ChangeLogSource()
    idx = BM25Index(src)
    labels = src.add([f"w1 doc{i}" for i in range(10)])
    idx.mark_dirty()
    idx.refresh()
    monkeypatch.setattr(BM25Index, "_add", lambda *a: (_ for _ in ()).throw(MemoryError("simulated")))
    gone = labels[:8]
    src.delete(gone)  # replaced: the same texts under new labels, which the failing refresh misses
    src.add([f"w1 doc{i}" for i in range(8)])
    idx.mark_dirty(gone, len(src.log))
    hits = idx.search("w1", 5)[0].tolist()
    assert idx.failures == 1
    assert sorted(hits) == labels[8:]  # the live ones it holds; none of the deleted
    # a write the next refresh will not have read (a later sequence), then many writes while
    # stale: they are joined into one pair of arrays with it; still masked, the survivors found
    idx.mark_dirty([labels[8]], len(src.log) + 1000)
    for i in range(3 * bm25_mod.TOMBSTONE_ENTRIES):
        new = src.add([f"w1 extra{i}"])
        src.delete(new)
        idx.mark_dirty(new, len(src.log))
    assert len(idx._tombstones) <= bm25_mod.TOMBSTONE_ENTRIES
    assert idx.search("w1", 5)[0].tolist() == [labels[9]]
    monkeypatch.undo()
    idx.refresh(force=True)
    # covered ones are dropped label by label; the later one stays (and masks its label)
    assert [a.tolist() for _, a in idx._tombstones] == [[labels[8]]]
    assert sorted(idx.search("w1", 20)[0].tolist()) == sorted(set(idx.labels()) - {labels[8]})


def test_a_failure_before_the_arrays_change_does_not_discard_the_index(monkeypatch):
    """Any failure made the next refresh rebuild the whole index from the store: a failed
    64-document refresh became a full re-tokenization, needing more memory than the step that
    failed (a review). A failure before the writer's arrays change (tokenizing, reading the
    store) now leaves them as they were, and the next refresh goes on from the same sequence."""
    rng = np.random.default_rng(10)
    src, idx = _built_index(rng, 100)
    seq = idx.applied_seq
    real_tokenize = bm25_mod.tokenize
    monkeypatch.setattr(bm25_mod, "tokenize", lambda texts: (_ for _ in ()).throw(MemoryError("simulated")))
    src.add(["w1 w2", "w3"])
    src.delete(sorted(src.docs)[:5])
    idx.mark_dirty()
    with pytest.raises(MemoryError):
        idx.refresh()
    monkeypatch.setattr(bm25_mod, "tokenize", real_tokenize)
    assert idx.refresh(force=True)
    assert src.calls[-1][0] == seq  # incremental, not from 0
    _assert_matches_bm25s(idx, src, ["w1 w2", "w3", "w399"])


def test_a_retry_resumes_a_batch_that_failed_part_way(monkeypatch):
    """A refresh of several tokenizing chunks failed after the first (out of memory in the
    second): the retry read the batch again, found its first chunk indexed, took that for a
    broken label order and re-tokenized the whole store (a review). It now skips what is
    indexed and adds the rest."""
    monkeypatch.setattr(bm25_mod, "TOKENIZE_CHUNK", 5)
    rng = np.random.default_rng(11)
    src, idx = _built_index(rng, 100)
    seq = idx.applied_seq
    real_tokenize = bm25_mod.tokenize
    calls = []

    def tokenize(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise MemoryError("simulated")
        return real_tokenize(texts)

    monkeypatch.setattr(bm25_mod, "tokenize", tokenize)
    src.add(_corpus(rng, 10))
    idx.mark_dirty()
    with pytest.raises(MemoryError):
        idx.refresh()
    assert calls == [5, 5]  # the first chunk went in
    assert idx.refresh(force=True)
    assert calls == [5, 5, 5]  # only the second chunk again
    assert src.calls[-1] == (seq, 10)  # from the same sequence, not from 0
    monkeypatch.setattr(bm25_mod, "tokenize", real_tokenize)
    _assert_matches_bm25s(idx, src, ["w1 w2", "w3", "w399"])


def test_an_index_without_an_owner_is_retried_by_its_searches(monkeypatch):
    """Used on its own (no owner retrying in the background), the index would stay stale for
    good if searches never retried: they retry once the backoff has passed, never waiting."""
    rng = np.random.default_rng(12)
    src, idx = _built_index(rng, 50)
    now = [0.0]
    monkeypatch.setattr(bm25_mod, "_now", lambda: now[0])
    monkeypatch.setattr(BM25Index, "_add", lambda *a: (_ for _ in ()).throw(MemoryError("simulated")))
    new = src.add(["w1 w1 w1 w1"])
    idx.mark_dirty()
    assert new[0] not in idx.search("w1", 5)[0].tolist() and idx.failures == 1
    idx.search("w1", 5)
    assert idx.failures == 1  # within the backoff: no attempt
    monkeypatch.undo()
    monkeypatch.setattr(bm25_mod, "_now", lambda: now[0])
    now[0] += 1.0
    assert idx.search("w1", 5)[0].tolist()[0] == new[0] and idx.failures == 0


def test_close_refreshes_stops_a_long_refresh_between_chunks(monkeypatch):
    """Shutdown waited for a refresh in progress, a retry's full rebuild included (minutes at a
    million documents). It now stops at the next tokenizing chunk, and no new one starts."""
    monkeypatch.setattr(bm25_mod, "TOKENIZE_CHUNK", 2)
    src = ChangeLogSource()
    idx = BM25Index(src)
    src.add([f"w{i} w1" for i in range(10)])
    idx.mark_dirty()
    real_chunk = BM25Index._add_chunk
    chunks = []

    def chunk(self, labels, texts):
        chunks.append(len(labels))
        real_chunk(self, labels, texts)
        idx.close_refreshes()  # shutdown begins during the first chunk

    monkeypatch.setattr(BM25Index, "_add_chunk", chunk)
    with pytest.raises(bm25_mod.RefreshAborted):
        idx.refresh()
    assert chunks == [2] and idx.failures == 0 and idx.last_error is None  # shutting down is no failure
    assert idx.refresh(force=True) is False and chunks == [2]  # closing: nothing starts
    assert idx.search("w1", 5)[0].tolist() == []  # the published (empty) snapshot, untouched


def test_a_search_does_not_wait_for_a_retry_running_in_another_thread():
    """While recovering from a failed refresh (a full rebuild: minutes at a million documents),
    a search reads the old snapshot instead of queueing behind the rebuild. A search of a healthy
    index still waits for a refresh in progress, so it sees the writes acknowledged before it."""
    import threading

    rng = np.random.default_rng(7)
    src, idx = _built_index(rng, 50)
    expected = idx.search("w1", 5)[0].tolist()
    src.add(["w1 w1 w1"])
    idx.mark_dirty()
    idx.failures, idx._retry_at = 1, 0.0  # a failed refresh whose retry is due
    assert idx._lock.acquire(timeout=5)  # another thread is retrying
    try:
        out = []
        t = threading.Thread(target=lambda: out.append(idx.search("w1", 5)[0].tolist()))
        t.start()
        t.join(10)
        assert not t.is_alive() and out == [expected]
        idx.failures = 0  # healthy: a search waits for the refresh in progress
        t = threading.Thread(target=lambda: out.append(idx.search("w1", 5)[0].tolist()))
        t.start()
        t.join(0.3)
        assert t.is_alive()
    finally:
        idx._lock.release()
    t.join(10)
    assert not t.is_alive() and out[1][0] == max(src.docs)  # caught up once the lock was free


def _pause_merges(monkeypatch):
    """Make background merges wait (after they start) until ``release`` is set."""
    import threading

    started, release = threading.Event(), threading.Event()
    real_build = bm25_mod._build_merge

    def paused_build(job):
        started.set()
        assert release.wait(30)
        return real_build(job)

    monkeypatch.setattr(bm25_mod, "_build_merge", paused_build)
    return started, release, real_build


def test_a_background_merge_carries_the_writes_made_while_it_ran(monkeypatch):
    """The merge is built off the lock while searches and refreshes go on; at the switch-over the
    documents appended and deleted meanwhile are carried into the new layout."""
    monkeypatch.setattr(bm25_mod, "MERGE_MIN_POSTINGS", 400)
    monkeypatch.setattr(bm25_mod, "COMPACT_MIN_DEAD", 10)
    rng = np.random.default_rng(11)
    queries = ["w1 w2 w3", "aspirin stroke", "w120 w300", "running"]
    src, idx = _built_index(rng, 200)  # background merges; the first build merges in the foreground
    assert idx.merges == 1 and idx._merge_thread is None
    started, release, _ = _pause_merges(monkeypatch)
    src.delete(sorted(src.docs)[:80])  # past the compaction threshold
    src.add(_corpus(rng, 30))
    idx.mark_dirty()
    idx.refresh()
    try:
        assert started.wait(30) and idx._merge_thread is not None
        # While it builds: more writes and deletes (some of slots it is compacting, some of slots
        # appended after it began), all visible.
        appended = src.add(_corpus(rng, 25) + ["aspirin stroke running"])
        idx.mark_dirty()
        idx.refresh()
        src.delete(sorted(src.docs)[:15] + appended[:3])
        idx.mark_dirty()
        _assert_matches_bm25s(idx, src, queries)
        assert idx.merges == 1
    finally:
        release.set()
        idx.join_merge(30)
    assert idx.merges == 2 and idx._merge_thread is None
    snap = idx._snap
    assert snap.tail_slot0 > 0 and len(snap.labels) < 200 + 30 + 26  # compacted: deleted slots dropped
    _assert_matches_bm25s(idx, src, queries)
    src.delete(sorted(src.docs)[-5:])
    src.add(_corpus(rng, 5))
    idx.mark_dirty()
    _assert_matches_bm25s(idx, src, queries)


def test_merges_go_on_when_a_thread_cannot_start_or_the_index_started_over(monkeypatch):
    import threading

    monkeypatch.setattr(bm25_mod, "MERGE_MIN_POSTINGS", 300)
    rng = np.random.default_rng(13)
    src, idx = _built_index(rng, 100)
    assert idx.merges == 1

    # No thread can be started: the merge runs in the foreground (it used to stop for good).
    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    src.add(_corpus(rng, 100))
    idx.mark_dirty()
    idx.refresh()
    assert idx.merges == 2 and idx._merge_thread is None and idx._snap.tail_slot0 == len(idx._snap.labels)
    monkeypatch.undo()
    monkeypatch.setattr(bm25_mod, "MERGE_MIN_POSTINGS", 300)

    # A refresh fails while a background merge is building: that merge is dropped, and the
    # rebuilt index gets its main segment at once instead of scanning everything as tail.
    started, release, real_build = _pause_merges(monkeypatch)
    src.add(_corpus(rng, 100))
    idx.mark_dirty()
    idx.refresh()
    try:
        assert started.wait(30)
        monkeypatch.setattr(bm25_mod, "_build_merge", real_build)
        real_delete = BM25Index._delete
        def torn_delete(self, gone):  # out of memory part-way through changing the arrays
            self._torn = True
            raise MemoryError("simulated")

        monkeypatch.setattr(BM25Index, "_delete", torn_delete)
        src.delete(sorted(src.docs)[:5])
        idx.mark_dirty()
        with pytest.raises(MemoryError):
            idx.refresh()
        monkeypatch.setattr(BM25Index, "_delete", real_delete)
        idx.refresh(force=True)  # rebuilt from the start of the log, merged in the foreground
        snap = idx._snap
        assert len(snap.main_slot) > 0 and snap.tail_slot0 == len(snap.labels)
    finally:
        release.set()
        idx.join_merge(30)
    assert idx._snap.tail_slot0 == len(idx._snap.labels)  # the dropped merge did not install
    _assert_matches_bm25s(idx, src, ["w1 w2", "w3 aspirin", "w200"])
