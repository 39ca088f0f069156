"""A real server on 127.0.0.1:0 with real exported models: every RPC, health, reflection, bad input."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from rerankd.client import Client
from rerankd.embedded import EmbeddedServer
from rerankd.server import create_server, shutdown
from rerankd.v1 import rerankd_pb2 as pb
from rerankd.v1 import rerankd_pb2_grpc as pb_grpc

from util import assert_invalid, settings_for

N_DOCS = 1200


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory, scifact_docs):
    data = tmp_path_factory.mktemp("data")
    with EmbeddedServer(settings_for(models_dir, data)) as srv:
        with Client(srv.target, timeout=600) as c:
            docs = scifact_docs[:N_DOCS]
            for i in range(0, len(docs), 128):
                c.upsert([{"id": d["_id"], "title": d["title"], "text": d["text"]} for d in docs[i : i + 128]])
        yield srv


@pytest.fixture()
def client(server):
    with Client(server.target, timeout=120) as c:
        yield c


def test_health_goes_not_serving_then_serving(models_dir, tmp_path):
    async def run():
        server, port, app = await create_server(settings_for(models_dir, tmp_path), load=False)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                before = await stub.Check(health_pb2.HealthCheckRequest(service="rerankd.v1.Retrieval"))
                # Calls before the models are ready are refused with UNAVAILABLE, not queued forever.
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await pb_grpc.RetrievalStub(ch).Stats(pb.StatsRequest())
                assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
                app.start_loading()
                await app.wait_ready(300)
                after = await stub.Check(health_pb2.HealthCheckRequest(service=""))
                return before.status, after.status
        finally:
            await shutdown(server, app, 0)

    before, after = asyncio.run(run())
    assert before == health_pb2.HealthCheckResponse.NOT_SERVING
    assert after == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server):
    with grpc.insecure_channel(server.target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert "rerankd.v1.Retrieval" in services
        assert "grpc.health.v1.Health" in services
        desc = db.FindFileContainingSymbol("rerankd.v1.Retrieval")
        assert desc.package == "rerankd.v1"


def test_search_returns_ranked_hits_with_timings(client):
    resp = client.search("cerebral white matter development in newborns measured by diffusion MRI",
                         top_n=5, candidates=20, include_text=True, include_metadata=True, raw=True)
    assert len(resp.hits) == 5
    assert [h.rank for h in resp.hits] == [1, 2, 3, 4, 5]
    scores = [h.score for h in resp.hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h.HasField("text") and h.text for h in resp.hits)
    assert resp.reranked and resp.reranker_model == "rerankd-ce-MiniLM-L6"
    assert resp.embedder_model == "all-MiniLM-L6-v2"
    assert resp.first_stage == pb.FIRST_STAGE_HYBRID
    t = resp.timings
    assert t.embed_us > 0 and t.ann_us > 0 and t.bm25_us > 0 and t.rerank_us > 0
    assert t.total_us >= t.rerank_us
    # first-stage ranks are a permutation subset of 1..candidates
    assert all(1 <= h.first_stage_rank <= 20 for h in resp.hits)


@pytest.mark.parametrize("stage", ["dense", "bm25", "hybrid"])
def test_first_stage_without_rerank(client, stage):
    # "4983" is about white matter in newborns (diffusion tensor MRI); every leg finds it first.
    hits = client.search("Microstructural development of human newborn cerebral white matter assessed by diffusion tensor MRI",
                         top_n=3, candidates=10, rerank=False, first_stage=stage)
    assert hits[0]["id"] == "4983"
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert [h["score"] for h in hits] == [h["first_stage_score"] for h in hits]


def test_encode_query_and_document_side(client):
    v = client.encode([{"id": "a", "text": "aspirin and colorectal cancer"}, {"id": "b", "text": "stock markets"}], is_query=True)
    assert v.shape == (2, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    single = client.encode("aspirin and colorectal cancer", is_query=False)
    np.testing.assert_allclose(single, v[0], atol=1e-5)  # symmetric model: same vector either side


def test_score_sorted_and_matches_scoring_each_pair_alone(client, scifact_docs):
    items = [{"id": d["_id"], "text": d["title"] + " " + d["text"]} for d in scifact_docs[:12]]
    query = "diffusion tensor imaging of white matter in preterm infants"
    ranked = client.score(query, items)
    assert [r["rank"] for r in ranked] == list(range(1, 13))
    assert sorted(r["item_id"] for r in ranked) == sorted(it["id"] for it in items)
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True)
    alone = {it["id"]: client.score(query, [it])[0]["score"] for it in items}
    for r in ranked:
        assert r["score"] == pytest.approx(alone[r["item_id"]], abs=1e-4)
    assert [r["item_id"] for r in ranked] == sorted(alone, key=lambda i: -alone[i])


def test_score_items_carry_their_index_ids_may_repeat_or_be_empty_and_top_n_cuts(client):
    """Cohere/Jina-style callers map results back by position, and merged BM25 hits from two
    shards can repeat an id: both were INVALID_ARGUMENT (a review). Every entry now carries the
    item's index; ids are the caller's, echoed back as given; top_n returns the best n only."""
    texts = ["Aspirin use lowers colorectal adenoma incidence.", "Stock markets fell.",
             "Aspirin and colorectal cancer: a meta-analysis.", "Stock markets fell."]
    items = [{"id": "x", "text": texts[0]}, {"id": "", "text": texts[1]}, {"id": "x", "text": texts[2]},
             {"id": "", "text": texts[3]}]
    full = client.score("does aspirin prevent colorectal cancer", items)
    assert sorted(r["index"] for r in full) == [0, 1, 2, 3]
    assert all(r["item_id"] == items[r["index"]]["id"] for r in full)
    assert {full[0]["index"], full[1]["index"]} == {0, 2}  # the aspirin passages first
    by_index = {r["index"]: r["score"] for r in full}
    assert by_index[1] == pytest.approx(by_index[3], abs=1e-5)  # same text, same score
    top = client.score("does aspirin prevent colorectal cancer", items, top_n=2)
    assert [(r["index"], r["rank"]) for r in top] == [(r["index"], r["rank"]) for r in full[:2]]
    assert len(client.score("does aspirin prevent colorectal cancer", items, top_n=10)) == 4
    strings = client.score("does aspirin prevent colorectal cancer", [texts[1], texts[0]])
    assert [(r["item_id"], r["index"]) for r in strings] == [("1", 1), ("0", 0)]  # a string's id is its position


def test_client_checks_its_arguments_and_keeps_a_stream_source_error(client):
    """Client rules found by a review: metadata values are strings everywhere (upsert turned 2020
    and None into "2020" and "None" while a filter on 2020 raised TypeError); an unknown
    first_stage was a bare KeyError; an exception raised by an upsert_stream source came back as
    UNKNOWN "Exception iterating requests!" with the cause lost."""
    with pytest.raises(TypeError, match=r"metadata\['year'\]"):
        client.upsert([{"id": "m1", "text": "t", "metadata": {"year": 2020}}])
    with pytest.raises(ValueError, match="first_stage"):
        client.search("q", first_stage="BM25")

    class SourceBroke(Exception):
        pass

    def batches():
        yield [{"id": "src-1", "text": "Streaming source document about protein folding."}]
        raise SourceBroke("the source database went away")

    with pytest.raises(SourceBroke, match="went away") as ei:
        client.upsert_stream(batches())
    assert any("may have been committed" in n for n in getattr(ei.value, "__notes__", []))
    client.delete(["src-1"])  # committed or not: not_found is not an error


def test_async_client_makes_every_call_from_an_event_loop(server, client):
    """An asyncio RAG app had only the sync client, which blocks its event loop (a review).
    AsyncClient gives the same results as Client, on grpc.aio."""
    import asyncio

    from rerankd.client import AsyncClient, error_details

    query = "diffusion tensor imaging of white matter in preterm infants"
    items = ["Stock markets fell.", "White matter microstructure in preterm infants measured by DTI."]

    async def batches():
        yield [{"id": "aio-1", "text": "Async ingest of a document about ribosome profiling."}]
        yield [{"id": "aio-2", "text": "Another async document about ribosome stalling."}]

    async def broken():
        yield [{"id": "aio-3", "text": "A document before the source failed."}]
        raise KeyError("source cursor lost")

    async def run():
        async with AsyncClient(server.target, timeout=120) as c:
            await c.wait_ready(30)
            hits, ranked, vec = await asyncio.gather(c.search(query, top_n=3, candidates=10),
                                                     c.score(query, items), c.encode(query, is_query=True))
            assert [h["id"] for h in hits] == [h["id"] for h in client.search(query, top_n=3, candidates=10)]
            assert [(r["index"], r["rank"]) for r in ranked] == [(r["index"], r["rank"]) for r in client.score(query, items)]
            np.testing.assert_allclose(vec, client.encode(query, is_query=True), atol=1e-5)
            assert (await c.upsert_stream(batches())).upserted == 2
            assert (await c.upsert([{"id": "aio-1", "text": "Async ingest of a document about ribosome profiling."}])).unchanged == 1
            with pytest.raises(KeyError, match="cursor lost"):
                await c.upsert_stream(broken())
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.search("q", top_n=0)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_details(ei.value)["field_violations"][0][0] == "top_n"
            assert (await c.delete(["aio-1", "aio-2", "aio-3"])).deleted >= 2
            assert (await c.stats()).dimension == 384

    asyncio.run(run())


def test_client_item_shapes():
    """Plain strings get their position as id; dicts take "id" or SIE's "item_id"."""
    from rerankd.client import _items

    got = [(it.id, it.text) for it in _items(["a", {"item_id": "x", "text": "b"}, {"id": "y", "text": "c"}, {"text": "d"}])]
    assert got == [("0", "a"), ("x", "b"), ("y", "c"), ("3", "d")]


def test_client_upsert_deadline_grows_with_the_batch(monkeypatch):
    """A 30 s default deadline against 256 long documents (~14 s of embedding per 256 on this CPU,
    more under load) cancelled the call after the work and committed nothing (a review)."""
    from rerankd.client import Client

    seen = []
    c = Client("localhost:1", timeout=30)
    monkeypatch.setattr(c._stub, "Upsert", lambda req, **kw: seen.append(kw["timeout"]))
    c.upsert([{"id": str(i), "text": "t"} for i in range(256)])
    c.upsert([{"id": "a", "text": "t"}])
    c.upsert([{"id": "a", "text": "t"}], timeout=5)
    assert seen == [256.0, 30, 5]
    c.close()


def test_reupserting_identical_documents_writes_nothing(client):
    """A nightly full re-sync re-embedded every document and left a deleted entry in the graph
    per round (a review: deleted_not_compacted grew by 5 per round of 5). Identical documents
    (title, text, metadata) are now skipped and counted as unchanged; a changed one is written."""
    docs = [{"id": f"sync-{i}", "title": "T", "text": f"Resync document {i} about kinase inhibitors.",
             "metadata": {"src": "sync"}} for i in range(5)]
    first = client.upsert(docs)
    assert (first.upserted, first.replaced, first.unchanged) == (5, 0, 0)
    before = client.stats()
    again = client.upsert(docs)
    assert (again.upserted, again.replaced, again.unchanged) == (5, 0, 5)
    assert again.sequence == first.sequence  # nothing was written
    after = client.stats()
    assert after.deleted_not_compacted == before.deleted_not_compacted and after.documents == before.documents
    changed = [dict(d) for d in docs]
    changed[1]["text"] += " Updated."
    changed[3] = {**changed[3], "metadata": {"src": "sync", "v": "2"}}  # metadata alone counts too
    r = client.upsert(changed)
    assert (r.upserted, r.replaced, r.unchanged) == (5, 2, 3) and r.sequence > first.sequence
    hits = client.search("kinase inhibitors updated", top_n=5, rerank=False, include_metadata=True,
                         filter={"v": "2"})
    assert [h["id"] for h in hits] == ["sync-3"]
    assert client.search("kinase inhibitors", rerank=False, raw=True).bm25_stale is False  # healthy
    st = client.stats()  # that hybrid Search brought BM25 up to the write it follows
    assert st.bm25_sequence >= r.sequence and st.bm25_failed_refreshes == 0 and st.bm25_last_error == ""
    s = client.upsert_stream([docs[:2], changed[2:]])
    assert (s.upserted, s.replaced, s.unchanged) == (5, 1, 4)  # only sync-1 differs (back to its first text)
    # errors name the document's place in the request, not in the changed subset (the diff review)
    with pytest.raises(grpc.RpcError) as ei:
        client.upsert([docs[0], {"id": "sync-x", "text": "\u200b\u200b"}])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "documents[1].text" in ei.value.details()
    client.delete([d["id"] for d in docs])


def test_delete_reaches_every_index_at_once(server, client):
    """A mutation audit: dropping the Delete's HNSW update, its BM25 invalidation or its metadata
    filter update went unnoticed, since the store lookup hides deleted hits. Right after a
    Delete each index holds exactly the store's live labels, and k-candidate Searches still
    return k hits (deleted documents no longer take candidate slots)."""
    p = server.app.pipeline
    docs = [{"id": f"del-{i}", "title": "Xenotransplantation", "text": f"Porcine kidney xenotransplantation trial {i}.",
             "metadata": {"batch": "del"}} for i in range(30)]
    client.upsert(docs)
    top = client.search("porcine kidney xenotransplantation", top_n=20, candidates=20, rerank=False,
                        first_stage="bm25")  # refreshes BM25 with the documents in
    gone = [h["id"] for h in top][:20]
    assert len(gone) == 20 and all(g.startswith("del-") for g in gone)
    client.delete(gone)
    stored = set(p.store.vectors(p.dim)[0].tolist())
    assert p.dense.labels() == stored
    server.call(p.flush)
    assert p.bm25.labels() == stored
    left = {f"del-{i}" for i in range(30)} - set(gone)
    assert p.metadata_index.matching([("batch", frozenset({"del"}))]) == set(p.store.labels_for(sorted(left)).values())
    for stage in ("dense", "bm25"):
        hits = client.search("porcine kidney xenotransplantation trial", top_n=10, candidates=10, rerank=False,
                             first_stage=stage, filter={"batch": "del"})
        assert {h["id"] for h in hits} == left, stage
    client.delete(sorted(left))


def test_bm25_catches_up_after_a_write_without_waiting_for_a_search(server, client):
    """The next Search paid for tokenizing the last writes into BM25 (a profile: +23-35 ms after
    a 64-document Upsert; all of a bulk ingest for the first Search after it). A background
    refresh now follows each write."""
    import time

    p = server.app.pipeline
    r = client.upsert([{"id": f"bg-{i}", "text": f"Background refresh document {i} on cryo-EM."} for i in range(8)])
    for _ in range(400):  # no Search in between
        if p.bm25.applied_seq >= r.sequence:
            break
        time.sleep(0.05)
    assert p.bm25.applied_seq >= r.sequence
    d = client.delete([f"bg-{i}" for i in range(8)])
    for _ in range(400):
        if p.bm25.applied_seq >= d.sequence:
            break
        time.sleep(0.05)
    assert p.bm25.applied_seq >= d.sequence and not (p.bm25.labels() - set(p.store.vectors(p.dim)[0].tolist()))


def test_rerank_ties_keep_the_first_stage_order_and_metadata_only_when_asked(client):
    """A mutation audit: reversing the tie-break of equal rerank scores, or returning metadata
    without include_metadata, went unnoticed. Two identical documents score exactly alike: the
    better first-stage rank goes first. Score's ties keep the input order."""
    text = "Telomerase reactivation in somatic cells extends replicative lifespan."
    client.upsert([{"id": "tie-a", "text": text, "metadata": {"k": "v"}},
                   {"id": "tie-b", "text": text, "metadata": {"k": "v"}}])
    raw = client.search(text, top_n=5, candidates=5, raw=True, filter={"k": "v"})
    hits = [h for h in raw.hits if h.id.startswith("tie-")]
    assert len(hits) == 2 and hits[0].rerank_score == hits[1].rerank_score
    assert hits[0].first_stage_rank < hits[1].first_stage_rank
    assert all(not h.metadata for h in raw.hits)  # include_metadata was not asked for
    with_meta = client.search(text, top_n=2, candidates=5, raw=True, include_metadata=True, filter={"k": "v"})
    assert all(dict(h.metadata) == {"k": "v"} for h in with_meta.hits)
    ranked = client.score(text, [{"id": "second", "text": text}, {"id": "first", "text": text}])
    assert [r["index"] for r in ranked] == [0, 1]
    client.delete(["tie-a", "tie-b"])


def test_score_model_name_check(client):
    with pytest.raises(ValueError):
        client.score("q", [{"id": "a", "text": "t"}], model="some-other-model")


def test_upsert_replace_delete_stats(client):
    before = client.stats()
    r = client.upsert([{"id": "zz-1", "text": "Zebrafish fin regeneration requires osteoblast dedifferentiation.",
                        "metadata": {"source": "test"}}])
    assert r.upserted == 1 and r.replaced == 0
    r2 = client.upsert([{"id": "zz-1", "text": "Zebrafish heart regeneration depends on cardiomyocyte proliferation."}])
    assert r2.replaced == 1 and r2.sequence > r.sequence
    hits = client.search("zebrafish heart regeneration cardiomyocyte proliferation", top_n=1, candidates=5,
                         include_text=True, include_metadata=True, rerank=False)
    assert hits[0]["id"] == "zz-1" and "heart" in hits[0]["text"]
    assert hits[0]["metadata"] == {}  # the replacement carried no metadata
    assert client.stats().documents == before.documents + 1
    # A title-only document, as the server and `rerankd index` take it (the client raised KeyError).
    assert client.upsert([{"id": "zz-title", "title": "Zebrafish retina regeneration by Muller glia"}]).upserted == 1
    assert client.delete(["zz-title"]).deleted == 1
    d = client.delete(["zz-1", "never-existed"])
    assert d.deleted == 1 and list(d.not_found) == ["never-existed"]
    for stage in ("dense", "bm25", "hybrid"):
        ids = [h["id"] for h in client.search("zebrafish heart regeneration cardiomyocyte", top_n=10, candidates=10,
                                              rerank=False, first_stage=stage)]
        assert "zz-1" not in ids, stage
    s = client.stats()
    assert s.documents == before.documents
    assert s.dimension == 384 and s.embedder_model == "all-MiniLM-L6-v2"
    assert s.deleted_not_compacted >= 1


def test_upsert_stream(client):
    docs = [{"id": f"st-{i}", "text": f"Streaming document number {i} about protein folding."} for i in range(10)]
    r = client.upsert_stream([docs[:4], docs[4:]])
    assert r.upserted == 10
    assert client.delete([d["id"] for d in docs]).deleted == 10


LONG = "word " * 20000


@pytest.mark.parametrize(
    "call,field",
    [
        (lambda c: c.search(""), "query"),
        (lambda c: c.search("   \t\n"), "query"),
        (lambda c: c.search("q", top_n=0), "top_n"),
        (lambda c: c.search("q", top_n=20, candidates=10), "top_n"),
        (lambda c: c.search("q", candidates=1001), "candidates"),
        (lambda c: c.search("q", candidates=0), "candidates"),
        (lambda c: c.search("q " * 3000), "query"),
        (lambda c: c.search("protein " * 200, top_n=1, candidates=5), "query"),  # too many tokens for the reranker
        (lambda c: c.score("q", []), "items"),
        (lambda c: c.score("", [{"id": "a", "text": "t"}]), "query"),
        (lambda c: c.score("q", [{"id": "a", "text": "t"}], top_n=0), "top_n"),
        (lambda c: c.score("q", [{"id": "a" * 600, "text": "t"}]), "items[0].id"),  # ids stay bounded
        (lambda c: c.score("q", [{"id": "a", "text": " "}]), "items[0].text"),
        (lambda c: c.score("q", [{"id": str(i), "text": "t"} for i in range(513)]), "items"),
        (lambda c: c.score("q", [{"id": "a", "text": LONG}]), "items[0].text"),
        (lambda c: c.encode([]), "items"),
        (lambda c: c.encode([{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]), "items[1].id"),
        (lambda c: c.upsert([{"id": "d", "text": ""}]), "documents[0].text"),
        (lambda c: c.upsert([{"id": "d"}]), "documents[0].text"),  # no text, no title (was a client KeyError)
        (lambda c: c.score("q", [{"id": "a"}]), "items[0].text"),
        (lambda c: c.upsert([{"id": "", "text": "t"}]), "documents[0].id"),
        (lambda c: c.upsert([{"id": "d", "text": "t"}, {"id": "d", "text": "t"}]), "documents[1].id"),
        (lambda c: c.upsert([{"id": "d", "text": LONG}]), "documents[0].text"),
        (lambda c: c.delete([]), "ids"),
        (lambda c: c.delete(["a", "a"]), "ids[1]"),
        (lambda c: c.upsert_stream([[{"id": "ok-1", "text": "fine"}], [{"id": "bad", "text": ""}]]), "batch[1].documents[0].text"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(client, call, field):
    assert_invalid(lambda: call(client), field)


def test_unknown_first_stage_enum(server):
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.RetrievalStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.Search(pb.SearchRequest(query="q", first_stage=42))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first_stage" in ei.value.details()


def test_expired_deadline_is_deadline_exceeded(client):
    with pytest.raises(grpc.RpcError) as ei:
        client.search("white matter", candidates=200, top_n=5, timeout=0.001)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # and the server keeps serving
    assert client.stats().documents >= N_DOCS


def test_hnsw_recall_vs_brute_force(server):
    """First stage vs exact cosine over the same stored vectors, >= 1000 real documents."""
    p = server.app.pipeline
    labels, vecs = p.store.vectors(p.dim)
    assert len(labels) >= 1000
    rng = np.random.default_rng(0)
    queries = vecs[rng.choice(len(vecs), 100, replace=False)] + rng.normal(0, 0.02, (100, p.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
    hits = 0
    for q, ex in zip(queries, exact):
        got, _ = p.dense.search(q, 10)
        hits += len(set(got.tolist()) & set(labels[ex].tolist()))
    recall = hits / (10 * len(queries))
    assert recall >= 0.95, recall


def test_search_says_when_its_bm25_leg_is_stale(models_dir, tmp_path, monkeypatch):
    """A BM25 refresh that fails (out of memory, say): the Search is answered from the last good
    index and its response says so; Stats says why."""
    from rerankd.stages import bm25 as bm25_mod
    from rerankd.stages.bm25 import BM25Index

    monkeypatch.setattr(bm25_mod, "_now", lambda: 0.0)  # the backoff never passes: stays stale
    with EmbeddedServer(settings_for(models_dir, tmp_path)) as srv, Client(srv.target, timeout=120) as c:
        c.upsert([{"id": "a", "text": "aspirin and colon cancer"}])
        fresh = c.search("aspirin", first_stage="bm25", rerank=False, raw=True)
        assert [h.id for h in fresh.hits] == ["a"] and fresh.bm25_stale is False
        monkeypatch.setattr(BM25Index, "_add", lambda *a: (_ for _ in ()).throw(MemoryError("simulated")))
        c.upsert([{"id": "b", "text": "aspirin and stroke"}])
        r = c.search("aspirin", first_stage="bm25", rerank=False, raw=True)
        assert [h.id for h in r.hits] == ["a"] and r.bm25_stale is True
        assert c.search("aspirin", first_stage="dense", rerank=False, raw=True).bm25_stale is False
        st = c.stats()
        assert st.bm25_failed_refreshes >= 1 and st.bm25_last_error == "MemoryError: simulated"
        assert st.bm25_sequence < st.sequence
