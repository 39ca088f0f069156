"""The change log is pruned behind its slowest reader, and a reader from before the pruned
horizon (an old snapshot, a BM25 index that fell behind) rebuilds instead of missing deletes."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

from rerankd import snapshot, store as store_mod
from rerankd.stages.bm25 import BM25Index
from rerankd.store import ChangesPruned, DocumentStore, NewDocument

from util import settings_for

DIM = 16
KW = {"m": 8, "ef_construction": 50, "ef_search": 50}


def unmarked(g) -> set[int]:
    """Labels whose graph element is not marked deleted: read from hnswlib itself, not from the
    index's own bookkeeping (which a load takes from the store)."""
    out = set()
    for lb in g._index.get_ids_list():
        try:
            g._index.get_items([lb])
        except RuntimeError:  # marked deleted
            continue
        out.add(int(lb))
    return out


def _upsert(store: DocumentStore, ids, seed: int = 0, texts=None) -> None:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(len(ids), DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    texts = texts or [f"text about {i}" for i in ids]
    store.upsert([NewDocument(i, t, "", {}, x, None) for i, t, x in zip(ids, texts, v)])


def test_prune_keeps_what_readers_after_the_horizon_need(tmp_path):
    store = DocumentStore(tmp_path / "documents.sqlite3")
    _upsert(store, [f"a{i}" for i in range(6)])  # seq 1..6
    store.delete(["a0", "a1"])  # seq 7, 8
    mid = store.last_seq()
    store.delete(["a2"])  # seq 9
    _upsert(store, ["b0"], seed=1)  # seq 10
    last = store.last_seq()
    a2 = 3

    assert store.prune_changes(mid) == mid and store.pruned_through() == mid
    assert store.change_log_rows() == last - mid and store.last_seq() == last
    assert store.deletes_after(mid) == [a2]  # the reader at the horizon still gets its deletes
    assert store.deletes_after(0) == [a2]  # a reader with nothing needs none: always answered
    with pytest.raises(ChangesPruned, match=f"pruned through seq {mid}"):
        store.deletes_after(mid - 1)
    with pytest.raises(ChangesPruned):
        store.text_changes_after(2)
    assert store.text_changes_after(mid)[3] == [a2]
    assert store.prune_changes(mid) == 0  # idempotent
    # Pruning past the end keeps the newest row: last_seq never moves back.
    store.prune_changes(last + 100)
    assert store.change_log_rows() == 1 and store.last_seq() == last and store.pruned_through() == last - 1
    _upsert(store, ["b1"], seed=2)
    assert store.last_seq() == last + 1
    store.close()
    reopened = DocumentStore(tmp_path / "documents.sqlite3")  # the horizon is on disk
    assert reopened.pruned_through() == last - 1 and reopened.last_seq() == last + 1
    reopened.close()


def test_prune_in_batches_moves_the_horizon_with_the_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "PRUNE_BATCH", 3)
    store = DocumentStore(tmp_path / "documents.sqlite3")
    _upsert(store, [f"a{i}" for i in range(10)])
    store.delete([f"a{i}" for i in range(5)])
    seen = []
    real = store._pruned_through

    def spy(con):
        seen.append((real(con), int(con.execute("SELECT COALESCE(MIN(seq), 0) FROM changes").fetchone()[0])))
        return seen[-1][0]

    monkeypatch.setattr(store, "_pruned_through", spy)
    assert store.prune_changes(13) == 13
    # every transaction saw the horizon right below the oldest row it had left (3 rows a batch)
    assert [h for h, _ in seen] == [0, 3, 6, 9, 12, 13]
    assert all(oldest == h + 1 for h, oldest in seen)
    store.close()


def test_snapshot_from_before_the_horizon_is_rebuilt_not_loaded(tmp_path):
    """An older snapshot put back (a restored backup of the index dir): the deletes it would
    replay are pruned, so loading it would resurrect deleted documents. It must be rebuilt."""
    store = DocumentStore(tmp_path / "documents.sqlite3")
    _upsert(store, [f"a{i}" for i in range(8)])
    d = tmp_path / "hnsw"
    idx, _, _ = snapshot.load_or_rebuild(store, d, DIM, **KW)
    snapshot.save(idx, d, store.last_seq(), store_id=store.store_id)
    shutil.copytree(d, tmp_path / "old-hnsw")
    store.delete(["a0", "a1", "a2"])
    newer, _, _ = snapshot.load_or_rebuild(store, d, DIM, **KW)
    snapshot.save(newer, d, store.last_seq(), store_id=store.store_id)
    store.prune_changes(store.last_seq())

    shutil.rmtree(d)
    shutil.copytree(tmp_path / "old-hnsw", d)
    g, info, how = snapshot.load_or_rebuild(store, d, DIM, **KW)
    assert how == "rebuilt" and info is None
    live = set(store.vectors(DIM)[0].tolist())
    assert unmarked(g) == g.labels() == live and len(live) == 5

    # The snapshot at the horizon loads, and replays the deletes made after it.
    snapshot.save(g, d, store.last_seq(), store_id=store.store_id)
    store.delete(["a3"])
    g2, info2, how2 = snapshot.load_or_rebuild(store, d, DIM, **KW)
    now = set(store.vectors(DIM)[0].tolist())
    assert how2 == "loaded" and unmarked(g2) == g2.labels() == now and len(now) == 4
    store.close()


def test_a_snapshot_missing_documents_it_claims_to_cover_is_rebuilt(tmp_path):
    """A graph saved under a sequence it does not fully hold (a document upserted after the graph
    was taken) must not load: those documents would never be found by the dense leg (a mutation
    audit: the check could be dropped without a test failing)."""
    store = DocumentStore(tmp_path / "documents.sqlite3")
    _upsert(store, [f"a{i}" for i in range(7)])
    d = tmp_path / "hnsw"
    idx, _, _ = snapshot.load_or_rebuild(store, d, DIM, **KW)
    _upsert(store, ["a7"], seed=3)  # in the store, not in idx
    snapshot.save(idx, d, store.last_seq(), store_id=store.store_id)
    g, info, how = snapshot.load_or_rebuild(store, d, DIM, **KW)
    live = set(store.vectors(DIM)[0].tolist())
    assert how == "rebuilt" and info is None
    assert unmarked(g) == g.labels() == live and len(live) == 8
    store.close()


def test_bm25_index_behind_the_horizon_reconciles_without_rebuilding(tmp_path):
    """Writes since the last search, then a snapshot prunes past the index's position: the next
    refresh takes the new documents as usual and finds the deletes by the live labels, without
    starting over (no re-tokenizing); scores equal a fresh index over the store."""
    store = DocumentStore(tmp_path / "documents.sqlite3")
    _upsert(store, ["a", "b", "c", "e"], texts=["red apple", "red car", "blue sky", "green red tree"])
    idx = BM25Index(store, background_merge=False)
    idx.refresh()
    epoch, seq0 = idx._epoch, idx.applied_seq
    b = store.labels_for(["b"])["b"]
    store.delete(["b"])
    _upsert(store, ["d", "e"], seed=1, texts=["red wine", "green tree"])  # e replaced: old label deleted
    store.prune_changes(store.last_seq())
    with pytest.raises(ChangesPruned):
        store.text_changes_after(seq0)
    idx.mark_dirty()
    got_labels, got_scores = idx.search("red tree", 10)
    assert idx._epoch == epoch, "the index started over"
    assert b not in set(got_labels.tolist()) and idx.applied_seq == store.last_seq()
    fresh = BM25Index(store, background_merge=False)
    want_labels, want_scores = fresh.search("red tree", 10)
    assert got_labels.tolist() == want_labels.tolist()
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-6)
    store.close()


def test_server_keeps_its_change_log_bounded_and_restarts_intact(models_dir, tmp_path):
    """Snapshots every 8 changes prune the log behind them; after churn the log holds only what
    came after the last snapshot, Stats says so, and a restart from the data dir as a crash left
    it (snapshot older than the last deletes) replays them: the graph marks exactly the deleted
    documents, and both legs serve exactly the live ones."""
    from rerankd.pipeline import Document, Pipeline, SearchParams

    data = tmp_path / "data"
    s = settings_for(models_dir, data, index={"data_dir": data, "snapshot_every": 8, "auto_compact_ratio": 0})

    async def churn() -> dict:
        p = Pipeline(s)
        await p.start()
        try:
            for r in range(6):
                await p.upsert([Document(f"d{i}", f"round {r} document {i} about zebra topic {i % 3}") for i in range(6)])
                await p.delete([f"d{r}"])
                if p._snapshot_task is not None:
                    await p._snapshot_task
            if p._snapshot_task is not None:
                await p._snapshot_task
            await asyncio.to_thread(p._save_snapshot)  # then fewer than 8 changes: no snapshot
            await p.delete(["d4"])  # (round 5 deleted d5 already)
            assert p.snapshot_info.sequence < p.store.last_seq()
            # a crash now: the data dir as it is (the snapshot is older than the last deletes,
            # which a restart must replay from the pruned log)
            shutil.copytree(data, tmp_path / "crashed")
            # nothing is pruned while a graph rebuild holds the compaction lock (it reads the log
            # from where it started)
            before = p.store.pruned_through()
            with p._compact_lock:
                p._prune_change_log(p.store.last_seq())
            assert p.store.pruned_through() == before
            st = p.stats()
            # pruned through the last snapshot (a restart replays from there), less the newest
            # row where the snapshot was at the end of the log
            snap = p.snapshot_info.sequence
            assert snap - 1 <= st["change_log_pruned_through"] <= snap and snap > 8
            assert st["change_log_rows"] <= st["sequence"] - st["change_log_pruned_through"]
            assert st["change_log_rows"] < st["sequence"] / 3  # 6 rounds x 13 changes, ~8 kept
            return st
        finally:
            await p.close()

    st = asyncio.run(churn())
    s2 = settings_for(models_dir, tmp_path / "crashed", index={"data_dir": tmp_path / "crashed", "snapshot_every": 8, "auto_compact_ratio": 0})

    async def restart() -> None:
        p = Pipeline(s2)
        await p.start()
        try:
            live = {f"d{i}" for i in range(4)}  # round 5 re-created d0..d5 and deleted d5; then d4
            for mode in ("dense", "bm25", "hybrid"):
                hits = await p.search(SearchParams(query="zebra document", top_n=50, candidates=50, rerank=False, first_stage=mode))
                assert {h.id for h in hits.hits} == live, mode
            assert p.stats()["sequence"] == st["sequence"]
            assert p.snapshot_info.sequence < st["sequence"]  # loaded the old snapshot and replayed
            assert unmarked(p.dense) == p.dense.labels() == set(p.store.labels_for(sorted(live)).values())
        finally:
            await p.close()

    asyncio.run(restart())
