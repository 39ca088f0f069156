"""Metadata filters: the inverted index and the filtered first-stage legs (unit level)."""

from __future__ import annotations

import numpy as np
import pytest

from rerankd.stages.bm25 import BM25Index
from rerankd.stages.dense_index import WALK_VS_EXACT_COST, DenseIndex
from rerankd.stages.metadata_filter import MetadataIndex, matches
from util import ChangeLogSource


def test_index_and_or_semantics_and_updates():
    ix = MetadataIndex()
    ix.add([1, 2, 3, 4], [{"lang": "en", "src": "pubmed"}, {"lang": "de", "src": "pubmed"},
                          {"lang": "en", "src": "arxiv"}, {}])
    assert ix.matching([("lang", ["en"])]) == {1, 3}
    assert ix.matching([("lang", ["en", "de"]), ("src", ["pubmed"])]) == {1, 2}  # OR within, AND across
    assert ix.matching([("lang", ["fr"])]) == set()
    assert ix.matching([("missing", ["x"])]) == set()
    assert ix.matching([("lang", ["en"]), ("src", ["nope"])]) == set()
    ix.remove([1])
    assert ix.matching([("lang", ["en"])]) == {3}
    ix.add([3], [{"lang": "de"}])  # a label re-added replaces its entries, never accumulates them
    assert ix.matching([("lang", ["en"])]) == set() and ix.matching([("src", ["arxiv"])]) == set()
    assert ix.matching([("lang", ["de"])]) == {2, 3}
    ix.remove([2, 3, 99])  # unknown labels are ignored
    assert ix.matching([("lang", ["de"])]) == set() and len(ix) == 0
    got = ix.matching([("lang", ["de"])])
    got.add(5)  # the caller's copy: the index is not affected
    assert ix.matching([("lang", ["de"])]) == set()
    with pytest.raises(ValueError):
        ix.matching([])
    ix.add([7], [{"": "", "k": ""}])  # empty keys and values are values like any other
    assert ix.matching([("", [""])]) == {7} and ix.matching([("k", [""]), ("", ["", "x"])]) == {7}


def test_matches_predicate_agrees_with_index():
    rng = np.random.default_rng(3)
    mds = [{k: str(rng.integers(3)) for k in "abc" if rng.random() < 0.7} for _ in range(200)]
    ix = MetadataIndex()
    ix.add(range(200), mds)
    for conds in ([("a", ["0"])], [("a", ["0", "1"]), ("b", ["2"])], [("c", ["1"]), ("a", ["2"]), ("b", ["0", "2"])]):
        assert ix.matching(conds) == {i for i, md in enumerate(mds) if matches(md, conds)}


def _unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# the oversampled HNSW search (no exact scan allowed), the exact scan (forced), and the cost model
@pytest.mark.parametrize("exact_max,walk_vs_exact", [(0, WALK_VS_EXACT_COST), (1_000_000, float("inf")),
                                                      (1_000_000, WALK_VS_EXACT_COST)])
def test_dense_search_within_equals_exact_filtered_topk(exact_max, walk_vs_exact):
    v = _unit(3000, 16)
    d = DenseIndex(16, m=16, ef_construction=200, ef_search=200)
    d.upsert(np.arange(3000), v)
    d.delete([7, 14])
    allowed = set(range(0, 3000, 7))

    def load(labels):
        labels = np.asarray(labels, dtype=np.int64)
        return labels, v[labels]
    for qi in (5, 700, 2999):
        q = v[qi]
        exact = [i for i in np.argsort(-(v @ q)) if i in allowed and i not in (7, 14)][:20]
        labels, scores = d.search_within(q, 20, lambda: allowed, load, exact_max, walk_vs_exact)
        assert set(labels) <= allowed and 7 not in labels and 14 not in labels
        assert len(set(labels) & set(exact)) >= 19  # HNSW may swap a near-tie; exact is exact
        if walk_vs_exact == float("inf"):
            assert labels.tolist() == exact
        assert np.all(np.diff(scores) <= 1e-6)
    # k larger than the filtered set: every live allowed document comes back, once
    labels, _ = d.search_within(v[0], 5000, lambda: allowed, load, exact_max, walk_vs_exact)
    assert sorted(labels.tolist()) == sorted(allowed - {7, 14})
    assert d.search_within(v[0], 10, set, load, exact_max)[0].size == 0
    assert d.search_within(v[0], 10, lambda: {7, 14, 10_000}, load, exact_max)[0].size == 0  # deleted / unknown
    # a document deleted between the index lookup and the vector read is left out, not an error
    gone = {21}
    labels, _ = d.search_within(v[21], 5, lambda: allowed, lambda ls: load(np.asarray([x for x in ls if x not in gone])),
                                10**6, float("inf"))
    assert 21 not in labels and len(labels) == 5


def test_filtered_walk_asks_for_fewer_when_hnsw_cannot_reach_enough():
    """hnswlib raises when fewer live elements are reachable than asked for (heavy deletes). The
    filtered walk used to give up and, with the filter over the exact-scan limit, return nothing;
    it now halves its request like the unfiltered search (found by a review)."""
    v = _unit(500, 8, seed=1)
    d = DenseIndex(8, m=16, ef_construction=100, ef_search=50)
    d.upsert(np.arange(500), v)

    class Reachable:  # only `limit` elements reachable: any larger k raises, as hnswlib does
        def __init__(self, real, limit):
            self.real, self.limit, self.asked = real, limit, []

        def knn_query(self, q, k, num_threads=1):
            self.asked.append(k)
            if k > self.limit:
                raise RuntimeError("Cannot return the results in a contigious 2D array. Probably ef or M is too small")
            return self.real.knn_query(q, k=k, num_threads=num_threads)

        def __getattr__(self, name):
            return getattr(self.real, name)

    d._index = Reachable(d._index, 25)
    allowed = set(range(0, 500, 2))
    labels, scores = d.search_within(v[0], 10, lambda: allowed, lambda ls: (ls, v[ls]), exact_max=0)
    # the first walk asks for 33 (k * live / matching, oversampled), gets an error, then asks for 16
    assert d._index.asked == [33, 16]
    assert 0 < len(labels) <= 10 and set(labels.tolist()) <= allowed and np.all(np.diff(scores) <= 1e-6)
    assert labels[0] == 0  # the query's own vector
    d._index.limit = 0  # nothing reachable at all: an empty answer, not an endless loop
    assert d.search_within(v[0], 10, lambda: allowed, lambda ls: (ls, v[ls]), exact_max=0)[0].size == 0


def test_bm25_allowed_mask_returns_best_matching_not_leftovers():
    texts = ["aspirin colon cancer", "aspirin heart attack", "coffee liver", "aspirin aspirin stroke", "solar panels"]
    labels = [10, 11, 12, 13, 14]
    b = BM25Index(ChangeLogSource(labels, texts))
    top, _ = b.search("aspirin", 3)
    assert top[0] == 13 and set(top.tolist()) == {10, 11, 13}
    # Only 11 and 14 are allowed: 11 is found although an unfiltered top-1 would not include it.
    assert b.search("aspirin", 1, allowed=lambda: {11, 14})[0].tolist() == [11]
    assert b.search("aspirin", 3, allowed=lambda: {12, 14, 99})[0].size == 0  # allowed but no term match / unknown
    assert b.search("aspirin", 3, allowed=set)[0].size == 0


# -- through a real server -------------------------------------------------------------------------
TOPICS = {
    "cardio": "Aspirin therapy lowers the risk of myocardial infarction and stroke in adults.",
    "onco": "Regular aspirin use is associated with fewer colorectal adenomas and less colon cancer.",
    "hepato": "Coffee consumption is linked to reduced liver fibrosis and cirrhosis.",
    "energy": "Perovskite solar cells reach higher power conversion efficiency with passivation.",
}


def _corpus() -> list[dict]:
    docs = []
    for i in range(80):
        topic = list(TOPICS)[i % 4]
        docs.append({"id": f"d{i}", "title": f"{topic} study {i}", "text": f"{TOPICS[topic]} Cohort {i}, follow-up {i % 7} years.",
                     "metadata": {"topic": topic, "year": str(2000 + i % 5), **({"lang": "de"} if i % 10 == 0 else {})}})
    return docs


@pytest.fixture(scope="module")
def filtered_server(models_dir, tmp_path_factory):
    from rerankd.client import Client
    from rerankd.embedded import EmbeddedServer

    from util import settings_for

    data = tmp_path_factory.mktemp("filter-data")
    with EmbeddedServer(settings_for(models_dir, data)) as srv:
        with Client(srv.target, timeout=300) as c:
            c.upsert(_corpus())
        yield srv, data


def _meta(docs: dict[str, dict], hit_id: str) -> dict:
    return docs[hit_id]["metadata"]


@pytest.mark.parametrize("stage", ["dense", "bm25", "hybrid"])
@pytest.mark.parametrize("rerank", [False, True])
def test_search_filter_returns_only_matching_documents(filtered_server, stage, rerank):
    from rerankd.client import Client

    srv, _ = filtered_server
    docs = {d["id"]: d for d in _corpus()}
    with Client(srv.target, timeout=300) as c:
        # AND across keys, OR within one: topic in {cardio, onco} and year 2001
        hits = c.search("aspirin and cancer", first_stage=stage, rerank=rerank, candidates=40, top_n=40,
                        include_metadata=True, filter={"topic": ["cardio", "onco"], "year": "2001"})
        want = {i for i, d in docs.items() if d["metadata"]["topic"] in ("cardio", "onco") and d["metadata"]["year"] == "2001"}
        got = {h["id"] for h in hits}
        assert got and got <= want
        assert all(h["metadata"]["year"] == "2001" for h in hits)
        if stage != "bm25":  # the dense leg returns every matching document when k covers them
            assert got == want
        # A selective filter still fills k from the matching documents (no over-fetch-and-drop):
        # half of the 8 German documents are cardio ones, which an unfiltered top-8 for a coffee
        # query (20 hepatology documents compete) would not contain.
        de = c.search("coffee and liver fibrosis", first_stage=stage, rerank=rerank, candidates=8, top_n=8,
                      filter={"lang": "de"})
        want_de = {i for i, d in docs.items() if d["metadata"].get("lang") == "de"}
        if stage == "bm25":  # BM25 returns only documents sharing a term with the query
            assert {h["id"] for h in de} <= want_de
        else:
            assert {h["id"] for h in de} == want_de
        assert c.search("aspirin", first_stage=stage, rerank=rerank, filter={"topic": "nope"}) == []
        assert c.search("aspirin", first_stage=stage, rerank=rerank, filter={"no-such-key": "x"}) == []


def test_filter_follows_upserts_and_deletes_and_survives_restart(models_dir, tmp_path):
    from rerankd.client import Client
    from rerankd.embedded import EmbeddedServer

    from util import settings_for

    def ids(c, **kw):
        return {h["id"] for h in c.search("aspirin stroke", candidates=50, top_n=50, rerank=False, **kw)}

    with EmbeddedServer(settings_for(models_dir, tmp_path)) as srv:
        with Client(srv.target, timeout=300) as c:
            c.upsert(_corpus()[:20])
            cardio = {f"d{i}" for i in range(0, 20, 4)}
            assert ids(c, filter={"topic": "cardio"}) == cardio
            # re-upsert d0 with other metadata: it leaves the old filter and joins the new one
            c.upsert([{"id": "d0", "text": TOPICS["cardio"], "metadata": {"topic": "energy"}}])
            assert ids(c, filter={"topic": "cardio"}) == cardio - {"d0"}
            assert "d0" in ids(c, filter={"topic": "energy"})
            # metadata removed entirely: it matches no filter any more
            c.upsert([{"id": "d4", "text": TOPICS["cardio"]}])
            assert ids(c, filter={"topic": "cardio"}) == cardio - {"d0", "d4"}
            c.delete(["d8"])
            assert ids(c, filter={"topic": "cardio"}) == cardio - {"d0", "d4", "d8"}
    # the filter index is rebuilt from the store on start
    with EmbeddedServer(settings_for(models_dir, tmp_path)) as srv:
        with Client(srv.target, timeout=300) as c:
            assert ids(c, filter={"topic": "cardio"}) == cardio - {"d0", "d4", "d8"}
            assert "d0" in ids(c, filter={"topic": "energy"})


def test_filter_exact_scan_and_hnsw_walk_agree(models_dir, tmp_path):
    """filter_exact_max 0 forces hnswlib's filtered walk; its answer equals the exact scan's."""
    from rerankd.client import Client
    from rerankd.embedded import EmbeddedServer

    from util import settings_for

    runs = []
    for exact_max in (0, 10_000):
        with EmbeddedServer(settings_for(models_dir, tmp_path / str(exact_max), index={"filter_exact_max": exact_max})) as srv:
            with Client(srv.target, timeout=300) as c:
                c.upsert(_corpus())
                runs.append([h["id"] for h in c.search("solar cell efficiency", first_stage="dense", rerank=False,
                                                        candidates=20, top_n=20, filter={"year": ["2002", "2003"]})])
    assert len(runs[0]) == 20 and runs[0] == runs[1]


def test_filter_bad_input_names_the_field(filtered_server):
    from rerankd.client import Client
    from rerankd.v1 import rerankd_pb2 as pb

    from util import assert_invalid

    srv, _ = filtered_server
    with Client(srv.target, timeout=60) as c:
        stub = c._stub
        assert_invalid(lambda: stub.Search(pb.SearchRequest(query="q", filter=[pb.MetadataMatch(key="k" * 65537, values=["x"])])),
                       "filter[0].key")
        assert_invalid(lambda: stub.Search(pb.SearchRequest(query="q", filter=[pb.MetadataMatch(key="a", values=["x"]),
                                                                                pb.MetadataMatch(key="b")])),
                       "filter[1].values")
        assert_invalid(lambda: stub.Search(pb.SearchRequest(query="q", filter=[pb.MetadataMatch(key=f"k{i}", values=["x"])
                                                                                for i in range(33)])),
                       "filter")
        assert_invalid(lambda: stub.Search(pb.SearchRequest(query="q", filter=[pb.MetadataMatch(key="a", values=["v"] * 1025)])),
                       "filter[0].values")


def test_filtered_legs_see_a_document_re_upserted_after_the_filter_was_read(models_dir, tmp_path):
    """A Search reads its filter before embedding the query; a matching document re-upserted
    meanwhile (new label, old one retired) must still be found by both legs -- as an
    unfiltered search would find its old or new version."""
    import asyncio

    from rerankd.pipeline import Document, Pipeline
    from rerankd.stages.metadata_filter import FilterView
    from rerankd.validation import check_filter

    from util import settings_for

    async def run() -> None:
        p = Pipeline(settings_for(models_dir, tmp_path))
        await p.start()
        try:
            docs = [Document(f"d{i}", f"aspirin trial number {i} on stroke", metadata={"t": "x"}) for i in range(5)]
            await p.upsert(docs)
            view = FilterView(p.metadata_index, check_filter([("t", ["x"])], p.settings.limits))
            # same metadata, text changed (an identical document would be skipped): a new label for d0
            await p.upsert([Document("d0", "aspirin trial number 0 on stroke.", metadata={"t": "x"})])
            new = p.store.labels_for(["d0"])["d0"]
            assert new not in view._state[1]  # the view's first read predates the write
            vec = (await p.embedder.encode(["aspirin trial number 0 on stroke"], is_query=True))[0][0]
            for exact_max, ratio in ((10**6, float("inf")), (0, WALK_VS_EXACT_COST)):  # exact scan, HNSW search
                labels, _ = p.dense.search_within(vec, 10, view, p._load_vectors, exact_max, ratio)
                assert new in labels.tolist() and len(labels) == 5
            labels, _ = p.bm25.search("aspirin trial stroke", 10, view)
            assert new in labels.tolist() and len(labels) == 5
        finally:
            await p.close()

    asyncio.run(run())


def test_client_filter_values_must_be_strings():
    from rerankd.client import Client

    with Client("127.0.0.1:1") as c:  # never connects: refused before any RPC
        with pytest.raises(TypeError, match=r"filter\['year'\]"):
            c.search("q", filter={"year": 2001})
        with pytest.raises(TypeError, match=r"filter\['year'\]"):
            c.search("q", filter={"year": ["2001", 2002]})


def test_version_moves_only_when_postings_change_and_reset_is_one_step():
    import threading

    ix = MetadataIndex()
    ix.add([1, 2], [{"lang": "en"}, {"lang": "de"}])
    v = ix.version
    ix.add([3], [{}])  # a document without metadata: no filter answer changes
    ix.remove([3, 99])  # labels the index never held
    assert ix.version == v  # so searches' filter views do not re-read the matching set
    ix.remove([2])
    assert ix.version == v + 1 and ix.matching([("lang", ["de"])]) == set()

    # A rebuild from the store swaps the contents under one lock: a reader never sees the empty
    # index between (it did, and a filtered Search returned no hits during an index repair).
    seen_empty = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            if not ix.matching([("lang", ["en"])]):
                seen_empty.append(1)

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(3000):
        ix.reset([1, 4], [{"lang": "en"}, {"lang": "en"}])
    stop.set()
    t.join()
    assert seen_empty == [] and ix.matching([("lang", ["en"])]) == {1, 4}
