"""Index consistency: the HNSW snapshot + replay against the SQLite store, auto-compaction, and a
failed commit (disk full). In-process and fast; only the auto-compaction test loads the models."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rerankd import snapshot
from rerankd.store import DocumentStore, NewDocument

from util import settings_for

DIM = 16
KW = {"m": 8, "ef_construction": 50, "ef_search": 50}


class Docs:
    """Writes random unit vectors under string ids straight into a store."""

    def __init__(self, store: DocumentStore, seed: int = 0) -> None:
        self.store = store
        self.rng = np.random.default_rng(seed)

    def upsert(self, *ids: str) -> None:
        v = self.rng.normal(size=(len(ids), DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        self.store.upsert([NewDocument(i, f"text {i}", "", {}, x, None) for i, x in zip(ids, v)])


def assert_graph_matches_store(index, store: DocumentStore) -> None:
    """Every live document in the graph with its stored vector, not marked deleted; nothing else live."""
    labels, vecs = store.vectors(DIM)
    live = set(labels.tolist())
    assert index.labels() == live, sorted(index.labels() ^ live)
    if len(labels):
        got = index._index.get_items(labels.tolist(), return_type="numpy")  # raises for a deleted mark
        assert [int(lb) for lb, a, b in zip(labels, got, vecs) if not np.array_equal(a, b)] == []
    for lb in index._index.get_ids_list():
        if lb not in live:
            with pytest.raises(RuntimeError):  # a deleted document is marked deleted
                index._index.get_items([lb])
    for lb, v in zip(labels, vecs):  # tiny graphs: every document is its own nearest neighbour
        assert index.search(v, 1)[0].tolist() == [lb]


def load(store: DocumentStore, d: Path):
    return snapshot.load_or_rebuild(store, d, DIM, **KW)


def test_snapshot_newer_than_restored_store_is_never_trusted_later(tmp_path):
    """documents.sqlite3 restored from an older backup: the snapshot on disk covers a later seq
    and is refused. It must not be loaded either once new writes carry the store past that seq
    (a crash before the next snapshot): its graph holds the vectors of the lost documents under
    the labels the restored store hands out again to new ones."""
    db = tmp_path / "documents.sqlite3"
    store = DocumentStore(db)
    Docs(store, 1).upsert(*[f"a{i}" for i in range(5)])
    store.close()
    shutil.copy(db, tmp_path / "backup.sqlite3")
    store = DocumentStore(db)
    Docs(store, 2).upsert(*[f"b{i}" for i in range(5)])
    idx, _, _ = load(store, tmp_path / "hnsw")
    snapshot.save(idx, tmp_path / "hnsw", store.last_seq())  # covers seq 10
    store.close()

    for p in tmp_path.glob("documents.sqlite3*"):
        p.unlink()
    shutil.copy(tmp_path / "backup.sqlite3", db)  # the restore: the store ends at seq 5
    store = DocumentStore(db)
    try:
        _, _, how = load(store, tmp_path / "hnsw")
        assert how == "rebuilt"
        Docs(store, 3).upsert(*[f"c{i}" for i in range(10)])  # seq 15, labels 6..15 reused
        idx, _, how = load(store, tmp_path / "hnsw")  # restart after a crash, no snapshot since
        assert how == "rebuilt"
        assert_graph_matches_store(idx, store)
    finally:
        store.close()


def test_snapshot_from_another_store_is_refused(tmp_path):
    """A documents.sqlite3 copied in from another server, whose sequence has passed the snapshot's:
    the sequence checks pass, but the snapshot's labels name other documents. The manifest's
    store id catches it (this was a documented known limit)."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    store_a = DocumentStore(a_dir / "documents.sqlite3")
    Docs(store_a, 1).upsert(*[f"a{i}" for i in range(4)])
    idx, _, _ = load(store_a, a_dir / "hnsw")
    snapshot.save(idx, a_dir / "hnsw", store_a.last_seq(), store_id=store_a.store_id)
    assert load(store_a, a_dir / "hnsw")[2] == "loaded"  # its own store: trusted
    store_a.close()
    store_b = DocumentStore(b_dir / "documents.sqlite3")
    Docs(store_b, 2).upsert(*[f"b{i}" for i in range(8)])  # seq 8 > the snapshot's 4
    assert store_b.store_id != store_a.store_id
    store_b.close()
    for p in a_dir.glob("documents.sqlite3*"):
        p.unlink()
    for p in b_dir.glob("documents.sqlite3*"):
        shutil.copy(p, a_dir / p.name)
    store = DocumentStore(a_dir / "documents.sqlite3")
    try:
        assert store.store_id != store_a.store_id
        idx, info, how = load(store, a_dir / "hnsw")
        assert how == "rebuilt" and info is None
        assert_graph_matches_store(idx, store)
        assert not (a_dir / "hnsw" / "manifest.json").exists()  # never trusted again
    finally:
        store.close()


def test_replay_across_snapshot_boundary_and_snapshot_ahead_of_its_sequence(tmp_path):
    """Pins the replay: an id upserted, snapshotted, deleted and upserted again; a document
    created and deleted after the snapshot; and a graph that already holds changes past the
    sequence its manifest records (a save racing writes) -- all load to exactly the store."""
    d = tmp_path / "hnsw"
    store = DocumentStore(tmp_path / "documents.sqlite3")
    docs = Docs(store)
    try:
        docs.upsert("x", "y", "z")
        idx, _, _ = load(store, d)
        snapshot.save(idx, d, store.last_seq())
        store.delete(["x"])
        docs.upsert("x", "w")  # x again (new label), w new
        store.delete(["w"])  # created and deleted after the snapshot: never in its graph
        docs.upsert("y")  # replaced after the snapshot
        idx, info, how = load(store, d)
        assert how == "loaded" and info is not None
        assert_graph_matches_store(idx, store)

        # Snapshot the up-to-date graph under an older sequence: the replay of the changes it
        # already holds (upserts re-applied, deletes re-marked) must be harmless.
        seq_mid = store.last_seq()
        docs.upsert("v")
        store.delete(["z"])
        idx, _, _ = load(store, d)
        snapshot.save(idx, d, seq_mid)
        idx, _, how = load(store, d)
        assert how == "loaded"
        assert_graph_matches_store(idx, store)
    finally:
        store.close()


def test_failed_commit_reports_its_own_error_and_store_stays_usable(tmp_path):
    """Disk full mid-transaction (a file-size limit): SQLite rolls the transaction back itself;
    the caller must get that I/O error (not "cannot rollback - no transaction is active"), the
    store must hold nothing of the failed call, and writes must work again once space is back."""
    script = textwrap.dedent(f"""
        import resource, signal, sqlite3, numpy as np
        from rerankd.store import DocumentStore, NewDocument
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        s = DocumentStore({str(tmp_path / "documents.sqlite3")!r})
        def docs(pfx, n, size):
            return [NewDocument(f"{{pfx}}{{i}}", "x" * size, "", {{}}, np.ones(8, np.float32), None) for i in range(n)]
        s.upsert(docs("a", 3, 10))
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
        try:
            s.upsert(docs("b", 50, 5000))
            raise SystemExit("the oversized upsert did not fail")
        except sqlite3.OperationalError as e:
            print("ERROR:", e)
        assert not s._w.in_transaction
        assert (s.count(), s.last_seq()) == (3, 3), (s.count(), s.last_seq())
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        labels, replaced, seq, _ = s.upsert(docs("c", 2, 10))
        assert (s.count(), seq) == (5, 5), (s.count(), seq)
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout, r.stdout
    err = r.stdout.split("ERROR:", 1)[1].splitlines()[0]
    assert "no transaction is active" not in err and ("disk" in err or "full" in err), err


def test_replacing_upserts_trigger_background_compaction(models_dir, tmp_path):
    """Re-upserting documents (re-running an ingest) retires their old graph entries exactly as
    Delete does; once those exceed --auto-compact-ratio x live documents the graph must be
    rebuilt in the background, not only after a Delete."""
    from rerankd.pipeline import Document, Pipeline

    async def run() -> None:
        s = settings_for(models_dir, tmp_path / "data", index={"data_dir": tmp_path / "data", "auto_compact_ratio": 1.0})
        p = Pipeline(s)
        await p.start()
        try:
            for r in range(4):  # 3 replacing rounds: 12 retired entries for 4 live documents
                # changed texts: identical documents are skipped (UpsertResponse.unchanged)
                docs = [Document(f"d{i}", f"document {i} about topic {i % 3}, version {r}") for i in range(4)]
                await p.upsert(docs)
                if p._compact_task is not None:
                    await p._compact_task
            assert p._compact_task is not None, "no background compaction was started"
            assert p.dense.deleted_count <= len(docs) and len(p.dense) == len(docs), (p.dense.deleted_count, len(p.dense))
            assert p.dense.labels() == set(p.store.labels_for([d.id for d in docs]).values())
            # the compaction saved its graph (snapshot_every is 10,000: nothing else saves one
            # here), so a restart loads it and replays the later writes instead of compacting again
            assert p.snapshot_info is not None
            g, info, how = snapshot.load_or_rebuild(p.store, p.snapshot_dir, p.dim, m=s.index.hnsw_m,
                                                    ef_construction=s.index.ef_construction, ef_search=s.index.ef_search)
            assert how == "loaded" and g.deleted_count == p.dense.deleted_count and g.labels() == p.dense.labels()
        finally:
            await p.close()

    asyncio.run(run())


def test_compaction_catch_up_keeps_writes_made_during_the_rebuild(models_dir, tmp_path, monkeypatch):
    """Compaction rebuilds from the store while writes go on: a write the rebuild already read
    and one it missed must both be in the swapped-in graph, a delete made meanwhile must not."""
    from rerankd.pipeline import Document, Pipeline

    real_rebuild = snapshot.rebuild

    async def run() -> None:
        s = settings_for(models_dir, tmp_path / "data", index={"data_dir": tmp_path / "data", "auto_compact_ratio": 0})
        p = Pipeline(s)
        await p.start()
        try:
            await p.upsert([Document(f"d{i}", f"document {i} about topic {i % 3}") for i in range(6)])
            await p.delete(["d0"])
            early = (await p.embedder.encode(["written before the rebuild reads"], is_query=False))[0]
            late = (await p.embedder.encode(["written after the rebuild read"], is_query=False))[0]
            tok = p.reranker.passage_ids(["x"])[0]
            from rerankd.store import NewDocument

            def rebuild_with_writes(*a, **kw):
                p._apply_upsert([NewDocument("early", "written before the rebuild reads", "", {}, early[0], tok)], early)
                g = real_rebuild(*a, **kw)
                p._apply_upsert([NewDocument("late", "written after the rebuild read", "", {}, late[0], tok)], late)
                p._apply_delete(["d1"])
                return g

            monkeypatch.setattr(snapshot, "rebuild", rebuild_with_writes)
            await p.compact()
            want = set(p.store.labels_for([f"d{i}" for i in range(2, 6)] + ["early", "late"]).values())
            assert p.dense.labels() == want and p.dense.deleted_count <= 1  # d1, marked after the rebuild
            labels, vecs = p.store.vectors(p.dim)
            for lb, v in zip(labels, vecs):
                assert p.dense.search(v, 1)[0].tolist() == [lb]
        finally:
            await p.close()

    asyncio.run(run())


def test_index_update_failing_after_commit_is_reported_and_repaired(models_dir, tmp_path):
    """Out of memory growing the graph (say) after the SQLite commit: the write is durable, the
    caller is told so (BackendError), the graph is not snapshotted while it misses the write, and
    the in-memory indexes are rebuilt from the store -- also when the call was cancelled (its
    worker thread failing on its own) and when another write fails during the rebuild."""
    from rerankd.errors import BackendError
    from rerankd.pipeline import Document, Pipeline, SearchParams, _IndexesBehind
    from rerankd.store import NewDocument

    def failing(*a, **kw):
        raise MemoryError("simulated: could not grow the HNSW graph")

    async def repaired(p) -> None:
        while p._repair_task is None:
            await asyncio.sleep(0.01)
        await p._repair_task
        assert not p._indexes_behind

    async def run() -> None:
        p = Pipeline(settings_for(models_dir, tmp_path / "data", index={"data_dir": tmp_path / "data"}))
        await p.start()
        try:
            await p.upsert([Document("a", "aspirin and stroke", metadata={"t": "x"})])
            broken = p.dense  # the repair swaps in a new graph; this one stays broken
            broken.replace = failing
            with pytest.raises(BackendError, match="committed .*Retrying is safe"):
                await p.upsert([Document("b", "aspirin and colon cancer", metadata={"t": "x"})])
            assert p.store.labels_for(["b"])  # durable (the rebuild may already be done: it runs concurrently)
            await repaired(p)
            assert p.dense is not broken
            want = set(p.store.labels_for(["a", "b"]).values())
            assert p.dense.labels() == want
            assert p.metadata_index.matching([("t", ["x"])]) == want
            assert p.snapshot_info is not None and p.snapshot_info.sequence == p.store.last_seq()  # saved when repaired
            hits = await p.search(SearchParams("aspirin colon cancer", rerank=False, filter=(("t", ("x",)),)))
            assert {h.id for h in hits.hits} == {"a", "b"}

            # A cancelled call: its worker thread fails on its own, with nobody awaiting it. The
            # rebuild is still requested, and no snapshot is written meanwhile.
            p._repair_task = None
            broken = p.dense
            broken.delete = failing

            def worker_of_cancelled_call() -> object:
                with p._compact_lock:  # the rebuild it requests cannot finish before the check below
                    with pytest.raises(_IndexesBehind):
                        p._apply_delete(["a"])
                    return p._save_snapshot(True)

            assert await asyncio.to_thread(worker_of_cancelled_call) is None  # snapshot refused while behind
            await repaired(p)
            assert p.dense.labels() == set(p.store.labels_for(["b"]).values())

            # Another write fails while a rebuild runs: the rebuild goes round again.
            p._repair_task = None
            real_rebuild = p._rebuild_dense
            tok = p.reranker.passage_ids(["x"])[0]
            vec = (await p.embedder.encode(["zinc and colds"], is_query=False))[0]
            calls = []

            def rebuild_then_fail_a_write():
                real_rebuild()
                if not calls:
                    calls.append(1)
                    p.dense.replace = failing  # the fresh graph, for this one write
                    with pytest.raises(_IndexesBehind):
                        p._apply_upsert([NewDocument("z", "zinc and colds", "", {"t": "x"}, vec[0], tok)], vec)
                return 0

            p._rebuild_dense = rebuild_then_fail_a_write
            p.dense.replace = failing
            with pytest.raises(BackendError):
                await p.upsert([Document("c", "coffee and liver", metadata={"t": "x"})])
            await repaired(p)
            assert len(calls) == 1
            assert p.dense.labels() == set(p.store.labels_for(["b", "c", "z"]).values())
            assert p.metadata_index.matching([("t", ["x"])]) == p.dense.labels()
        finally:
            await p.close()

    asyncio.run(run())


def test_compact_calls_during_a_rebuild_share_the_next_one():
    """A burst of Compact calls costs two rebuilds, not one each holding the write lock in turn
    (found by a review); each caller's rebuild starts after its call; a caller that goes away
    leaves the shared rebuild to the others."""
    from rerankd.pipeline import Pipeline

    p = Pipeline.__new__(Pipeline)  # only the coalescing is under test: no models, no store
    p._compact_now = p._compact_next = None
    started: list[int] = []
    gates: list[asyncio.Event] = []

    async def once():
        started.append(len(started))
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()
        return f"rebuild {len(started) - 1}", 0.0

    p._compact_once = once

    async def run() -> None:
        first = asyncio.create_task(p.compact())
        await asyncio.sleep(0.01)
        assert started == [0]
        later = [asyncio.create_task(p.compact()) for _ in range(3)]
        gone = asyncio.create_task(p.compact())
        await asyncio.sleep(0.01)
        assert started == [0]  # the later calls wait for the running rebuild to end
        gone.cancel()
        gates[0].set()
        assert (await first)[0] == "rebuild 0"
        await asyncio.sleep(0.01)
        assert started == [0, 1]  # one more rebuild for all four later calls, the cancelled one's too
        gates[1].set()
        assert {(await t)[0] for t in later} == {"rebuild 1"}
        with pytest.raises(asyncio.CancelledError):
            await gone
        third = asyncio.create_task(p.compact())  # nothing running: starts at once
        await asyncio.sleep(0.01)
        assert started == [0, 1, 2]
        gates[2].set()
        assert (await third)[0] == "rebuild 2"

    asyncio.run(run())


def test_searches_parked_on_a_bm25_refresh_do_not_hold_up_writes(models_dir, tmp_path):
    """BM25 searches wait on the index lock while a refresh runs (seconds after a large batch).
    They ran in asyncio's default pool (6 threads on 2 cores), where a dozen of them left no
    thread for an Upsert or Stats (found by a review); they now run in the pipeline's search pool."""
    from rerankd.pipeline import Document, Pipeline, SearchParams

    async def run() -> None:
        p = Pipeline(settings_for(models_dir, tmp_path / "data"))
        await p.start()
        try:
            await p.upsert([Document(f"d{i}", f"aspirin and colon cancer, study {i}") for i in range(3)])
            assert p.bm25._lock.acquire(timeout=5)  # a refresh that takes its time
            try:
                parked = [asyncio.create_task(p.search(SearchParams(query="aspirin", first_stage="bm25", rerank=False)))
                          for _ in range(16)]
                await asyncio.sleep(0.3)
                assert not any(t.done() for t in parked)  # they do wait for the refresh
                r = await asyncio.wait_for(p.upsert([Document("new", "a write during the refresh")]), 60)
                assert r.upserted == 1
                await asyncio.wait_for(asyncio.to_thread(p.stats), 60)
            finally:
                p.bm25._lock.release()
            hits = await asyncio.wait_for(asyncio.gather(*parked), 60)
            assert all(len(h.hits) == 3 for h in hits)
        finally:
            await p.close()

    asyncio.run(run())


def test_snapshot_graph_holds_exactly_its_sequence(models_dir, tmp_path, monkeypatch):
    """A snapshot covers the store sequence it records and nothing later. The sequence is read
    under the writers' apply lock; released before the graph's lock was taken (found by a review),
    a delete could commit in between and reach the serialized graph. A store restored from a
    backup taken before that delete then passed the sequence check with the document live in the
    store but marked deleted in the graph: invisible to the dense leg."""
    import threading
    import time

    from rerankd.pipeline import Document, Pipeline
    from rerankd.stages.dense_index import DenseIndex

    real_save = snapshot.save
    racer: list[threading.Thread] = []

    async def run() -> None:
        p = Pipeline(settings_for(models_dir, tmp_path / "data"))
        await p.start()
        try:
            await p.upsert([Document(i, f"aspirin and colon cancer, study {i}") for i in "xyz"])
            z = p.store.labels_for(["z"])["z"]

            def save_with_a_racing_delete(index, directory, sequence, **kw):
                # A write arriving right after the sequence was read: it must wait for the graph.
                t = threading.Thread(target=p._apply_delete, args=(["z"],))
                t.start()
                racer.append(t)
                time.sleep(0.3)
                return real_save(index, directory, sequence, **kw)

            monkeypatch.setattr(snapshot, "save", save_with_a_racing_delete)
            info = await asyncio.to_thread(p._save_snapshot, True, False)
            racer[0].join(10)
            assert not racer[0].is_alive() and z not in p.dense.labels()  # the delete went through after
            assert info.sequence < p.store.last_seq()
            saved = DenseIndex.load(info.path / "index.bin", p.dim, m=p.dense.m, ef_construction=p.dense.ef_construction,
                                    ef_search=p.dense.ef_search, live=set())
            assert saved._index.get_items([z]).shape == (1, p.dim)  # not marked deleted in the file (raises if so)
        finally:
            monkeypatch.setattr(snapshot, "save", real_save)
            await p.close()

    asyncio.run(run())


def test_embedder_max_length_is_recorded_and_a_store_cut_at_another_length_is_refused(models_dir, tmp_path):
    """Vectors cut at another --max-length are other vectors: an embedder re-exported with a new
    length must not be mixed into an index built with the old one (only name:sha was checked).
    The length has its own meta key, so the "embedder" value older versions check is unchanged
    (a rollback still opens the store), and a store without it is taken as the current length."""
    from rerankd.errors import NotReady
    from rerankd.pipeline import Document, Pipeline

    s = settings_for(models_dir, tmp_path / "data")

    async def run() -> None:
        p = Pipeline(s)
        await p.start()
        try:
            await p.upsert([Document("d1", "Zebrafish regenerate heart tissue after injury.")])
        finally:
            await p.close()

    asyncio.run(run())
    store = DocumentStore(tmp_path / "data" / "documents.sqlite3")
    key = store.get_meta("embedder")
    assert ":max_length" not in key and store.get_meta("embedder_max_length") == "256"
    store.set_meta("embedder_max_length", "128")  # indexed by the same model cut at 128 tokens
    store.close()
    with pytest.raises(NotReady, match="cutting documents at 128 tokens, not 256"):
        Pipeline(s)


def test_an_unchanged_upsert_waits_for_a_write_still_updating_the_indexes(models_dir, tmp_path):
    """Upsert B of the content Upsert A just committed returned "unchanged" while A was still
    updating HNSW: acknowledged, yet not found by the dense leg (the diff review). The check now
    runs under the write lock: B answers after A's index update."""
    import threading

    from rerankd.pipeline import Document, Pipeline

    async def run() -> None:
        p = Pipeline(settings_for(models_dir, tmp_path / "data"))
        await p.start()
        try:
            await p.upsert([Document("x", "kinase inhibitor trial, version 0")])
            gate, entered = threading.Event(), threading.Event()
            real = p.dense.replace

            def slow(*a, **kw):
                entered.set()
                gate.wait(30)
                return real(*a, **kw)

            p.dense.replace = slow
            new = [Document("x", "kinase inhibitor trial, version 1")]
            ta = asyncio.create_task(p.upsert(new))
            assert await asyncio.to_thread(entered.wait, 30)
            tb = asyncio.create_task(p.upsert(new))
            await asyncio.sleep(0.5)
            assert not tb.done()  # waits for A's index update
            gate.set()
            ra, rb = await asyncio.gather(ta, tb)
            assert (rb.unchanged, rb.sequence) == (1, ra.sequence) and ra.unchanged == 0
            assert p.store.labels_for(["x"])["x"] in p.dense.labels()
            # The same when A's call is cancelled while its worker thread applies the write: the
            # asyncio write lock is released then, the apply lock is not (the second review).
            gate.clear()
            entered.clear()
            newer = [Document("x", "kinase inhibitor trial, version 2")]
            ta = asyncio.create_task(p.upsert(newer))
            assert await asyncio.to_thread(entered.wait, 30)
            ta.cancel()
            await asyncio.gather(ta, return_exceptions=True)
            tb = asyncio.create_task(p.upsert(newer))
            await asyncio.sleep(0.5)
            assert not tb.done()
            gate.set()
            rb = await tb
            assert rb.unchanged == 1 and p.store.labels_for(["x"])["x"] in p.dense.labels()
        finally:
            await p.close()

    asyncio.run(run())


def test_a_failing_bm25_refresh_is_retried_in_the_background_and_searches_go_on(models_dir, tmp_path, monkeypatch):
    """The background BM25 refresh after a write fails (out of memory, say): BM25 Searches keep
    answering from the last good index (the new document is missing from that leg), Stats and
    /metrics say so, the retry waits for its backoff (on a frozen clock: no attempt at all), and
    then runs without another write or Search; a failure a Search's own refresh hit is retried
    the same way. close() is not held up by a pending retry."""
    from rerankd import pipeline as pipeline_mod
    from rerankd.metrics import Metrics
    from rerankd.pipeline import Document, Pipeline, SearchParams
    from rerankd.stages import bm25 as bm25_mod
    from rerankd.stages.bm25 import BM25Index

    now = [0.0]
    monkeypatch.setattr(bm25_mod, "_now", lambda: now[0])
    monkeypatch.setattr(pipeline_mod, "BM25_RETRY_NAP_S", 0.01)
    real_add = BM25Index._add
    failing = [False]
    attempts = []

    def add(self, labels, texts):
        if failing[0]:
            attempts.append(len(labels))
            raise MemoryError("simulated")
        return real_add(self, labels, texts)

    monkeypatch.setattr(BM25Index, "_add", add)

    async def until(cond, timeout=20.0) -> None:
        for _ in range(int(timeout / 0.01)):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    def ids(r) -> list[str]:
        return [h.id for h in r.hits]

    async def run() -> None:
        p = Pipeline(settings_for(models_dir, tmp_path / "data"))
        await p.start()
        m = Metrics()
        m.bind(p)
        gauge = lambda name: m.registry.get_sample_value(name)  # noqa: E731
        bm25 = SearchParams(query="aspirin", first_stage="bm25", rerank=False)
        try:
            await p.upsert([Document("a", "aspirin and colon cancer"), Document("c", "aspirin dosing")])
            await until(lambda: p.bm25.applied_seq == p.store.last_seq())
            assert gauge("rerankd_bm25_failed_refreshes") == 0 and gauge("rerankd_bm25_refresh_failures_total") == 0
            failing[0] = True
            await p.upsert([Document("b", "aspirin lowers the risk of stroke")])
            await p.delete(["c"])
            await until(lambda: p.bm25.failures >= 1)
            assert gauge("rerankd_bm25_failed_refreshes") == 1
            assert gauge("rerankd_bm25_applied_sequence") < p.store.last_seq()
            st = p.stats()  # Stats says so too, and why
            assert st["bm25_failed_refreshes"] == 1 and st["bm25_sequence"] < st["sequence"]
            assert st["bm25_last_error"] == "MemoryError: simulated"
            r = await p.search(bm25)
            assert ids(r) == ["a"] and r.bm25_stale  # stale, but answered (and says so); the deleted one masked
            assert not (await p.search(SearchParams(query="aspirin", first_stage="dense", rerank=False))).bm25_stale
            # the dense leg sees the new document, so a hybrid Search finds it
            assert "b" in ids(await p.search(SearchParams(query="aspirin stroke", rerank=False)))
            n = len(attempts)
            await asyncio.sleep(0.3)  # the clock stands still: the backoff never passes, no attempt
            assert len(attempts) == n and p.bm25.failures == 1
            now[0] += 1.0  # due: retried with no write or Search since
            await until(lambda: p.bm25.failures == 2)
            failing[0] = False
            now[0] += 2.0
            await until(lambda: p.bm25.failures == 0)  # ... until it succeeds
            assert p.bm25.applied_seq == p.store.last_seq() and gauge("rerankd_bm25_failed_refreshes") == 0
            assert gauge("rerankd_bm25_refresh_failures_total") == 2  # the run of two failures, mended, stays counted
            st = p.stats()
            assert (st["bm25_failed_refreshes"], st["bm25_sequence"], st["bm25_last_error"]) == (0, st["sequence"], "")
            r = await p.search(bm25)
            assert sorted(ids(r)) == ["a", "b"] and not r.bm25_stale

            # a failure that a Search's own refresh runs into is retried in the background too
            failing[0] = True
            await until(lambda: p._bm25_task is None or p._bm25_task.done())
            p.bm25.mark_dirty()  # as the index repair does: no write, so no background refresh starts
            assert sorted(ids(await p.search(bm25))) == ["a", "b"]  # its refresh fails: stale, answered
            assert p.bm25.failures == 1
            await until(lambda: p._bm25_task is not None and not p._bm25_task.done())  # on_stale started one
            failing[0] = False
            now[0] += 1.0
            await until(lambda: p.bm25.failures == 0)

            # while stale, documents deleted or replaced since are masked out of the BM25 leg, so
            # they do not take the candidates' places (with one candidate: the only one)
            await p.upsert([Document("e", "aspirin aspirin aspirin aspirin"), Document("f", "aspirin aspirin aspirin")])
            await until(lambda: p.bm25.applied_seq == p.store.last_seq())
            one = SearchParams(query="aspirin", first_stage="bm25", rerank=False, top_n=1, candidates=1)
            assert ids(await p.search(one)) == ["e"]
            failing[0] = True
            await p.delete(["e"])
            await until(lambda: p.bm25.failures == 1)
            assert ids(await p.search(one)) == ["f"]
            await p.upsert([Document("f", "a new text without the word")])  # replaced: f's old label goes
            assert ids(await p.search(one)) != ["f"] and len((await p.search(one)).hits) == 1
            # the loop naps between looks at a backoff that does not pass (a frozen clock)
            looks = []
            real_retry_in = p.bm25.retry_in
            p.bm25.retry_in = lambda: looks.append(1) or real_retry_in()
            await asyncio.sleep(0.3)
            assert 0 < len(looks) < 100  # ~30 naps of 10 ms, not a busy loop
            del p.bm25.retry_in
            # an explicit flush retries at once, backoff or not
            failing[0] = False
            await p.flush()
            assert p.bm25.failures == 0 and p.bm25.applied_seq == p.store.last_seq()

            # a retry pending at shutdown: close() ends the task instead of waiting for the backoff
            failing[0] = True
            await p.upsert([Document("d", "aspirin again")])
            await until(lambda: p.bm25.failures == 1)
            task = p._bm25_task
            assert task is not None and not task.done()
        finally:
            await p.close()
        assert task.done() and p.bm25._closing  # and a refresh still running would stop at its next chunk

    asyncio.run(run())


def test_a_failed_bm25_catch_up_at_start_serves_the_saved_index(models_dir, tmp_path, monkeypatch):
    """The start loads the saved BM25 index and catches up with the writes after it. That
    catch-up failing (out of memory) failed the whole start although a good index was loaded;
    the server now starts on it (stale) and retries in the background."""
    from rerankd.pipeline import Document, Pipeline, SearchParams
    from rerankd.stages import bm25 as bm25_mod
    from rerankd.stages.bm25 import BM25Index

    now = [0.0]
    monkeypatch.setattr(bm25_mod, "_now", lambda: now[0])
    bm25 = SearchParams(query="aspirin", first_stage="bm25", rerank=False)

    async def run() -> None:
        p = Pipeline(settings_for(models_dir, tmp_path / "data"))
        await p.start()
        await p.upsert([Document("a", "aspirin and colon cancer")])
        await p.flush()
        await asyncio.to_thread(p._save_bm25)
        await p.upsert([Document("b", "aspirin and stroke")])
        await p.close(save_snapshot=False)  # the saved BM25 index covers "a" only

        real_add = BM25Index._add
        monkeypatch.setattr(BM25Index, "_add", lambda *a: (_ for _ in ()).throw(MemoryError("simulated")))
        p = Pipeline(settings_for(models_dir, tmp_path / "data"))  # does not raise
        await p.start()
        try:
            assert p.bm25.failures == 1
            assert p._bm25_task is not None and not p._bm25_task.done()  # retrying before any Search
            r = await p.search(bm25)
            assert [h.id for h in r.hits] == ["a"] and r.bm25_stale
            monkeypatch.setattr(BM25Index, "_add", real_add)
            now[0] += 1.0
            for _ in range(2000):
                if not p.bm25.failures:
                    break
                await asyncio.sleep(0.01)
            assert p.bm25.failures == 0  # retried in the background, no write since
            assert sorted(h.id for h in (await p.search(bm25)).hits) == ["a", "b"]
        finally:
            await p.close()

    asyncio.run(run())
