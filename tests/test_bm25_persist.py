"""The BM25 index saved beside the HNSW snapshot: a start loads it and tokenizes only what came
after, the result equals an index built from the store, and anything that does not match the
store (another store, an older store, another tokenizer, a damaged file) is refused and rebuilt."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from rerankd.stages import bm25 as bm25_mod
from rerankd.stages.bm25 import BM25Index
from rerankd.store import DocumentStore, NewDocument

from test_bm25 import _assert_matches_bm25s, _corpus
from util import ChangeLogSource, settings_for

QUERIES = ["aspirin stroke", "w1 w3 w250", "w399 w398 heart", "running runs", "w0 w0 w7", "the of"]


class CountingSource(ChangeLogSource):
    """Records how many documents each refresh was handed (i.e. had to tokenize)."""

    def __init__(self) -> None:
        super().__init__()
        self.handed = 0

    def text_changes_after(self, seq: int):
        out = super().text_changes_after(seq)
        self.handed += len(out[1])
        return out


def _write(src: ChangeLogSource, idx: BM25Index, texts) -> None:
    """Add documents to the source and bring the index up to date, as a write then a search does."""
    src.add(texts)
    idx.mark_dirty()
    idx.refresh()


@pytest.mark.parametrize("merge_min", [10**9, 300])  # tail only / saved with a main segment
def test_saved_index_loads_catches_up_and_equals_a_fresh_build(tmp_path, monkeypatch, merge_min):
    monkeypatch.setattr(bm25_mod, "MERGE_MIN_POSTINGS", merge_min)
    rng = np.random.default_rng(3)
    src = CountingSource()
    idx = BM25Index(src, background_merge=False)
    _write(src, idx, _corpus(rng, 300))
    src.delete(sorted(src.docs)[:40])
    _write(src, idx, _corpus(rng, 30))
    assert (idx.merges > 0) == (merge_min < 10**9)
    seq = idx.save(tmp_path / "bm25", "store-a")
    assert seq == idx.applied_seq
    # after the save: more writes and deletes, which the loaded index must catch up on
    src.delete(sorted(src.docs)[50:70])
    src.add(_corpus(rng, 25))

    src.handed = 0
    monkeypatch.undo()  # load under the default merge threshold: the saved segments are used as they are
    loaded = BM25Index(src, background_merge=False)
    assert loaded.load(tmp_path / "bm25", "store-a", last_seq=len(src.log)) is None
    assert loaded.applied_seq == seq
    _assert_matches_bm25s(loaded, src, QUERIES)
    assert src.handed == 25  # only the documents written after the save were tokenized


def test_refused_saves_say_why_are_deleted_and_leave_the_index_to_build(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    src = ChangeLogSource()
    idx = BM25Index(src)
    _write(src, idx, _corpus(rng, 50))
    d = tmp_path / "bm25"
    last = len(src.log)

    def why(store_id="store-a", last_seq=last, damage=None) -> str | None:
        idx.save(d, "store-a")
        if damage:
            damage()
        fresh = BM25Index(src)
        r = fresh.load(d, store_id, last_seq)
        if r is not None:
            assert fresh.applied_seq == 0 and len(fresh) == 0  # untouched: it builds from the store
            assert not list(d.iterdir()), "a refused save was kept (it would be trusted later)"
        return r

    assert why() is None
    assert "another document store" in why(store_id="store-b")
    assert "store ends at seq" in why(last_seq=last - 1)  # an older documents.sqlite3 restored
    # saved under one tokenizer, loaded under another
    assert "tokenizer changed" in why(damage=lambda: monkeypatch.setattr(bm25_mod, "tokenizer_fingerprint", lambda: "other"))
    monkeypatch.undo()

    def flip_a_byte():
        state = d / "state.npz"
        raw = bytearray(state.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        state.write_bytes(bytes(raw))

    assert why(damage=flip_a_byte) == "checksum mismatch"
    assert why(damage=lambda: (d / "manifest.json").write_text("{not json")).startswith("unreadable manifest")
    assert why(damage=lambda: (d / "manifest.json").write_text("[]")).startswith("unreadable manifest")
    assert BM25Index(src).load(tmp_path / "nothing", "store-a", last) == "missing"


def test_inconsistent_arrays_are_refused(tmp_path):
    src = ChangeLogSource()
    idx = BM25Index(src)
    _write(src, idx, ["red apple", "red car", "blue sky"])
    d = tmp_path / "bm25"
    idx.save(d, None)
    mf = json.loads((d / "manifest.json").read_text())
    mf["sequence"] -= 1  # a manifest that does not describe its state file
    (d / "manifest.json").write_text(json.dumps(mf))
    assert BM25Index(src).load(d, None, len(src.log)) == "inconsistent arrays"


def test_a_save_killed_between_its_renames_is_rolled_forward(tmp_path, monkeypatch):
    src = ChangeLogSource()
    idx = BM25Index(src)
    _write(src, idx, ["red apple", "red car"])
    d = tmp_path / "bm25"
    idx.save(d, None)
    _write(src, idx, ["red wine"])
    real = bm25_mod.os.replace

    def die_on_manifest(a, b):
        if str(b).endswith("manifest.json"):
            raise KeyboardInterrupt("killed")
        return real(a, b)

    monkeypatch.setattr(bm25_mod.os, "replace", die_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        idx.save(d, None)
    monkeypatch.undo()
    assert (d / "manifest.json.tmp").is_file()  # the new state is in place under the old manifest
    loaded = BM25Index(src)
    assert loaded.load(d, None, len(src.log)) is None and loaded.applied_seq == 3
    assert not (d / "manifest.json.tmp").exists()


def test_a_save_after_a_failed_refresh_records_what_it_holds(tmp_path, monkeypatch):
    """A refresh fails part-way (out of memory): the index starts over but searches keep the
    last good snapshot. A save then must record that snapshot's sequence, not the writer's 0,
    or a restart would take its labels as live with no deletes to replay."""
    store = DocumentStore(tmp_path / "documents.sqlite3")
    vec = np.zeros(4, dtype=np.float32)
    store.upsert([NewDocument(f"d{i}", t, "", {}, vec, None) for i, t in enumerate(["red apple", "red car", "blue sky"])])
    idx = BM25Index(store, background_merge=False)
    idx.refresh()
    good = idx.applied_seq
    # a full re-ingest: every document replaced (new labels), and the refresh runs out of memory
    store.upsert([NewDocument(f"d{i}", t, "", {}, vec, None) for i, t in enumerate(["green pear", "green bus", "grey sky"])])
    monkeypatch.setattr(BM25Index, "_add", lambda *a: (_ for _ in ()).throw(MemoryError()))
    idx.mark_dirty()
    with pytest.raises(MemoryError):
        idx.refresh()
    monkeypatch.undo()
    store.prune_changes(store.last_seq())
    assert idx.save(tmp_path / "bm25", store.store_id) == good
    loaded = BM25Index(store)
    assert loaded.load(tmp_path / "bm25", store.store_id, store.last_seq()) is None
    assert loaded.search("red", 10)[0].tolist() == []
    assert sorted(loaded.search("green", 10)[0].tolist()) == sorted(store.labels_for(["d0", "d1"]).values())
    store.close()


def test_server_start_loads_the_saved_index(models_dir, tmp_path, monkeypatch):
    """A restart loads the BM25 index saved at shutdown and tokenizes nothing; writes made by a
    crashed process after the save are caught up; results equal a build from the store."""
    from rerankd.pipeline import Document, Pipeline, SearchParams

    data = tmp_path / "data"
    s = settings_for(models_dir, data, index={"data_dir": data})

    async def session(writes) -> list[str]:
        p = Pipeline(s)
        await p.start()
        try:
            await writes(p)
            hits = await p.search(SearchParams(query="zebra topic", top_n=20, candidates=20, rerank=False, first_stage="bm25"))
            return [h.id for h in hits.hits]
        finally:
            await p.close()

    async def first(p):
        await p.upsert([Document(f"d{i}", f"document {i} about zebra topic {i % 3}") for i in range(12)])
        await p.delete(["d3"])
        await p.flush()
        await p.compact()  # saves the BM25 index too (after releasing the write lock)
        assert json.loads((data / "bm25" / "manifest.json").read_text())["sequence"] == p.store.last_seq()

    asyncio.run(session(first))
    assert (data / "bm25" / "manifest.json").is_file()

    tokenized = []
    real_add = BM25Index._add
    monkeypatch.setattr(BM25Index, "_add", lambda self, labels, texts: (tokenized.extend(texts), real_add(self, labels, texts)))

    async def nothing(p):
        assert p.bm25.applied_seq == p.store.last_seq()

    got = asyncio.run(session(nothing))
    assert tokenized == []  # loaded, not rebuilt
    store = DocumentStore(data / "documents.sqlite3")
    try:
        fresh = BM25Index(store)
        want = [lb for lb in fresh.search("zebra topic", 20)[0].tolist()]
        by_label = {v: k for k, v in store.labels_for([f"d{i}" for i in range(12)]).items()}
        assert got == [by_label[lb] for lb in want] and "d3" not in got
        # a write the saved index never saw (made by a process that crashed before saving)
        rng = np.random.default_rng(0)
        store.upsert([NewDocument("late", "zebra zebra late document", "", {}, rng.normal(size=384).astype(np.float32), None)])
    finally:
        store.close()
    tokenized.clear()
    got = asyncio.run(session(nothing))
    assert tokenized == ["zebra zebra late document"] and "late" in got


def test_saved_index_behind_the_pruned_log_reconciles(tmp_path):
    """The common case after a restart: the BM25 save lags the snapshot that pruned the log (it
    is saved as of its last search). Loading it then meets ChangesPruned: the deletes are found
    from the live labels, the new documents tokenized, and nothing is rebuilt."""
    store = DocumentStore(tmp_path / "documents.sqlite3")
    rng = np.random.default_rng(5)
    texts = _corpus(rng, 60)
    vec = np.zeros(4, dtype=np.float32)
    store.upsert([NewDocument(f"d{i}", t, "", {}, vec, None) for i, t in enumerate(texts)])
    idx = BM25Index(store)
    idx.refresh()
    idx.save(tmp_path / "bm25", store.store_id)
    store.delete([f"d{i}" for i in range(0, 60, 3)])
    store.upsert([NewDocument(f"e{i}", t, "", {}, vec, None) for i, t in enumerate(_corpus(rng, 10))])
    store.prune_changes(store.last_seq())
    loaded = BM25Index(store)
    assert loaded.load(tmp_path / "bm25", store.store_id, store.last_seq()) is None
    epoch = loaded._epoch
    fresh = BM25Index(store)
    for q in QUERIES:
        got, want = loaded.search(q, 30), fresh.search(q, 30)
        assert got[0].tolist() == want[0].tolist(), q
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    assert loaded._epoch == epoch and loaded.applied_seq == store.last_seq()
    store.close()
