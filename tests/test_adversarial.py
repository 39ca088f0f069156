"""Hostile client input against a real in-process server: every client mistake is INVALID_ARGUMENT
naming the field, and none of it crashes the server, corrupts the index or loses acknowledged data."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rerankd.embedded import EmbeddedServer
from rerankd.v1 import rerankd_pb2 as pb
from rerankd.v1 import rerankd_pb2_grpc as pb_grpc

from util import assert_invalid, settings_for

DOCS = [
    pb.Document(id="asp", title="Aspirin", text="Regular aspirin use lowers the risk of colorectal cancer."),
    pb.Document(id="zeb", text="Zebrafish heart regeneration depends on cardiomyocyte proliferation."),
    pb.Document(id="sleep", text="Slow-wave sleep consolidates declarative memory."),
]


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data-adversarial")
    with EmbeddedServer(settings_for(models_dir, data)) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.RetrievalStub(ch)
        stub.Upsert(pb.UpsertRequest(documents=DOCS), timeout=120)
        yield ch


@pytest.fixture()
def stub(channel):
    return pb_grpc.RetrievalStub(channel)


def _raw_unary(channel, method: str):
    return channel.unary_unary(f"/rerankd.v1.Retrieval/{method}", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)


def _bad_utf8(msg, marker: bytes = b"ZZZ") -> bytes:
    """``msg`` serialized with the string ``marker`` swapped for bytes that are not UTF-8."""
    raw = msg.SerializeToString()
    assert raw.count(marker) == 1
    return raw.replace(marker, b"\xff\xfe\xfd")


def _live_ids(server) -> set[str]:
    p = server.app.pipeline
    return {d.id for d in p.store.fetch(sorted(p.dense.labels())).values()}


# -- requests that do not parse ---------------------------------------------------------------------------
@pytest.mark.parametrize("method,raw", [
    ("Search", _bad_utf8(pb.SearchRequest(query="ZZZ"))),
    ("Search", b"\xff\xff\xff\xff\xff"),  # not a protobuf message at all
    ("Score", _bad_utf8(pb.ScoreRequest(query="q", items=[pb.Item(id="ZZZ", text="t")]))),
    ("Upsert", _bad_utf8(pb.UpsertRequest(documents=[pb.Document(id="ZZZ", text="t")]))),
    ("Delete", _bad_utf8(pb.DeleteRequest(ids=["ZZZ"]))),
], ids=["search-utf8", "search-garbage", "score-utf8", "upsert-utf8", "delete-utf8"])
def test_malformed_request_is_invalid_argument(channel, stub, method, raw):
    # Was UNKNOWN ("Unexpected DecodeError") with a traceback logged by grpc for every such call.
    with pytest.raises(grpc.RpcError) as ei:
        _raw_unary(channel, method)(raw, timeout=30)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (ei.value.code(), ei.value.details())
    assert ei.value.details().startswith(f"request: malformed {method}Request"), ei.value.details()
    from rerankd.client import error_details

    assert [f for f, _ in error_details(ei.value)["field_violations"]] == ["request"]  # google.rpc.BadRequest
    assert stub.Stats(pb.StatsRequest(), timeout=30).documents >= len(DOCS)  # still serving


def test_malformed_health_and_reflection_requests_are_invalid_argument(channel, stub):
    # Were UNKNOWN ("Unexpected DecodeError") with an ERROR traceback: the interceptor only parsed
    # Retrieval requests itself.
    check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as ei:
        check(b"\xff\xff\xff", timeout=30)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (ei.value.code(), ei.value.details())
    assert ei.value.details().startswith("request: malformed HealthCheckRequest"), ei.value.details()
    info = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                 request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as ei:
        list(info(iter([b"\xff\xff\xff"]), timeout=30))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (ei.value.code(), ei.value.details())
    assert "malformed ServerReflectionRequest" in ei.value.details(), ei.value.details()
    # A well-formed health Watch (server streaming, through the same wrapper) still answers.
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    assert stub.Stats(pb.StatsRequest(), timeout=30).documents >= len(DOCS)


def test_abort_on_a_call_that_already_ended_is_a_cancel_not_an_error():
    """A client deadline that lands while the server answers made grpc's status send fail with
    ExecuteBatchError, logged by grpc as an ERROR with two tracebacks (about 1 in 300 short-deadline
    calls under load). ``server.abort`` turns that into a cancel; a real abort is untouched."""
    import asyncio

    from grpc._cython.cygrpc import ExecuteBatchError

    from rerankd import server as srv

    class Ended:
        async def abort(self, code, details):
            raise ExecuteBatchError("Failed execute_batch")

    class Live:
        async def abort(self, code, details):
            raise grpc.aio.AbortError()

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(srv.abort(Ended(), grpc.StatusCode.DEADLINE_EXCEEDED, "late"))
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(srv.abort(Live(), grpc.StatusCode.INVALID_ARGUMENT, "x"))


def test_upsert_stream_malformed_batch_midway_says_what_was_committed(server, channel, stub):
    good = pb.UpsertRequest(documents=[pb.Document(id="stream-ok", text="A valid first batch about enzymes.")])
    bad = _bad_utf8(pb.UpsertRequest(documents=[pb.Document(id="ZZZ", text="A batch that does not parse.")]))
    call = channel.stream_unary("/rerankd.v1.Retrieval/UpsertStream", request_serializer=lambda b: b,
                                response_deserializer=pb.UpsertResponse.FromString)
    # Was INTERNAL ("internal error ...: DecodeError"), without saying that batch 0 was committed.
    with pytest.raises(grpc.RpcError) as ei:
        call(iter([good.SerializeToString(), bad]), timeout=60)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (ei.value.code(), ei.value.details())
    assert "batch[1]" in ei.value.details() and "batches 0..0 with 1 documents were committed" in ei.value.details()
    assert "stream-ok" in _live_ids(server)


# -- metadata ----------------------------------------------------------------------------------------------
def test_upsert_stream_index_failure_midway_says_what_was_committed(server, stub):
    """A batch whose in-memory index update fails after its commit (BackendError): the stream
    stops there and the caller learns which batches are committed (was: only the error)."""
    p = server.app.pipeline
    broken = p.dense
    real = broken.replace
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("simulated: could not grow the HNSW graph")
        return real(*a, **kw)

    broken.replace = flaky
    try:
        reqs = [pb.UpsertRequest(documents=[pb.Document(id=f"flaky-{i}", text=f"Batch {i} about kinase signalling.")])
                for i in range(3)]
        with pytest.raises(grpc.RpcError) as ei:
            stub.UpsertStream(iter(reqs), timeout=60)
    finally:
        vars(broken).pop("replace", None)
    details = ei.value.details()
    assert ei.value.code() == grpc.StatusCode.INTERNAL, (ei.value.code(), details)
    # batch 1 is committed too (its commit came before the failed index update; was left out)
    assert details.startswith("batch[1]: the write was committed") and "batches 0..1 with 2 documents were committed" in details
    deadline = time.time() + 60
    while p._indexes_behind:  # the rebuild from the store
        assert time.time() < deadline, "index repair did not finish"
        time.sleep(0.05)
    assert {"flaky-0", "flaky-1"} <= _live_ids(server) and "flaky-2" not in _live_ids(server)


def test_oversized_metadata_is_refused(server, stub):
    # Was accepted up to the 16 MiB message size: stored, parsed on every Search that has the document
    # among its candidates, and a Search with include_metadata returning two such documents failed.
    big = pb.Document(id="meta-big", text="A document with a huge metadata map.",
                      metadata={f"k{i}": "v" * 1000 for i in range(100)})
    ok = pb.Document(id="meta-ok", text="fine")
    assert_invalid(lambda: stub.Upsert(pb.UpsertRequest(documents=[ok, big]), timeout=60), "documents[1].metadata")
    assert not {"meta-big", "meta-ok"} & _live_ids(server)  # a refused call commits nothing


def test_search_response_over_the_message_limit_is_a_clear_error(models_dir, tmp_path):
    # Was RESOURCE_EXHAUSTED "SERVER: Sent message larger than max (N vs. M)" from grpc core, after
    # the call was counted OK and with a traceback logged: nothing said which argument to change.
    limit = 64 * 1024
    with EmbeddedServer(settings_for(models_dir, tmp_path, server={"listen": "127.0.0.1:0", "max_message_bytes": limit})) as srv, \
            grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.RetrievalStub(ch)
        for i in range(3):  # one per call: each request stays under the limit
            stub.Upsert(pb.UpsertRequest(documents=[pb.Document(id=f"long-{i}", text="aspirin " + "x" * 30000)]), timeout=60)
        req = dict(query="aspirin", first_stage=pb.FIRST_STAGE_DENSE, rerank=False, top_n=3, candidates=3)
        details = assert_invalid(lambda: stub.Search(pb.SearchRequest(include_text=True, **req), timeout=60), "top_n")
        assert "include_text" in details and str(limit) in details
        assert len(stub.Search(pb.SearchRequest(include_text=True, **{**req, "top_n": 1}), timeout=60).hits) == 1
        assert len(stub.Search(pb.SearchRequest(**req), timeout=60).hits) == 3


def test_nul_bytes_in_ids_and_metadata_round_trip(server, stub):
    docs = [pb.Document(id="nul\x00a", text="first nul document", metadata={"k\x00": "v\x00v", "": ""}),
            pb.Document(id="nul\x00b", text="second nul document")]
    stub.Upsert(pb.UpsertRequest(documents=docs), timeout=60)
    hits = stub.Search(pb.SearchRequest(query="nul document", first_stage=pb.FIRST_STAGE_BM25, rerank=False,
                                        include_metadata=True), timeout=60).hits
    got = {h.id: dict(h.metadata) for h in hits}
    assert got["nul\x00a"] == {"k\x00": "v\x00v", "": ""} and got["nul\x00b"] == {}
    d = stub.Delete(pb.DeleteRequest(ids=["nul\x00a", "nul\x00c"]), timeout=60)
    assert d.deleted == 1 and list(d.not_found) == ["nul\x00c"]
    assert "nul\x00b" in _live_ids(server) and "nul\x00a" not in _live_ids(server)


# -- queries -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["\u200b", "\x00", "\ufeff\u0301"])
def test_query_without_tokens_is_invalid_argument_when_reranked(stub, query):
    assert_invalid(lambda: stub.Search(pb.SearchRequest(query=query), timeout=60), "query")
    assert_invalid(lambda: stub.Score(pb.ScoreRequest(query=query, items=[pb.Item(id="a", text="t")]), timeout=60), "query")
    # without the reranker there is nothing to refuse: the first stage copes with it
    stub.Search(pb.SearchRequest(query=query, rerank=False), timeout=60)


@pytest.mark.parametrize("text", ["\u200b", "\x00\x01", "\ufeff\u0301"])
def test_passage_without_tokens_is_invalid_argument(server, stub, text):
    """Not empty to str.strip, but nothing the reranker can read: a Score item scored like a real
    match (found by a review), and an Upsert stored a document no leg could find by its text."""
    items = [pb.Item(id="ok", text="Aspirin lowers colorectal cancer risk."), pb.Item(id="blank", text=text)]
    assert_invalid(lambda: stub.Score(pb.ScoreRequest(query="aspirin", items=items), timeout=60), "items[1].text")
    docs = [pb.Document(id="tok-ok", text="A fine document."), pb.Document(id="tok-blank", text=text)]
    assert_invalid(lambda: stub.Upsert(pb.UpsertRequest(documents=docs), timeout=60), "documents[1].text")
    assert not {"tok-ok", "tok-blank"} & _live_ids(server)  # the call is refused whole
    stub.Upsert(pb.UpsertRequest(documents=[pb.Document(id="tok-title", title="Aspirin", text=text)]), timeout=60)
    assert "tok-title" in _live_ids(server)  # the title gives it tokens
    title_only = [pb.Document(id="tok-t2", title="A title only."), pb.Document(id="tok-t3", title=text)]
    assert_invalid(lambda: stub.Upsert(pb.UpsertRequest(documents=title_only), timeout=60), "documents[1].title")


@pytest.mark.parametrize("field", ["top_n", "candidates"])
def test_uint32_max_counts_are_invalid_argument(stub, field):
    assert_invalid(lambda: stub.Search(pb.SearchRequest(query="aspirin", **{field: 2**32 - 1}), timeout=60), field)


def test_search_on_an_empty_index_returns_no_hits(models_dir, tmp_path):
    with EmbeddedServer(settings_for(models_dir, tmp_path)) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.RetrievalStub(ch)
        for stage in (pb.FIRST_STAGE_DENSE, pb.FIRST_STAGE_BM25, pb.FIRST_STAGE_HYBRID):
            for rerank in (True, False):
                r = stub.Search(pb.SearchRequest(query="aspirin", first_stage=stage, rerank=rerank,
                                                 top_n=1000, candidates=1000), timeout=60)
                assert list(r.hits) == [] and r.first_stage == stage


# -- concurrency -------------------------------------------------------------------------------------------
def test_concurrent_upsert_delete_search_of_one_id_keeps_the_indexes_consistent(server, stub):
    def worker(seed: int) -> list[str]:
        rnd, bad = random.Random(seed), []
        for _ in range(12):
            op = rnd.choice(["upsert", "upsert", "delete", "search"])
            try:
                if op == "upsert":
                    stub.Upsert(pb.UpsertRequest(documents=[
                        pb.Document(id="hot", text=f"hot document version {rnd.random()}"),
                        pb.Document(id=f"hot-{rnd.randint(0, 2)}", text="a hot sibling document")]), timeout=60)
                elif op == "delete":
                    stub.Delete(pb.DeleteRequest(ids=["hot", f"hot-{rnd.randint(0, 2)}"]), timeout=60)
                else:
                    ids = [h.id for h in stub.Search(pb.SearchRequest(query="hot document version", top_n=5, candidates=10,
                                                                      rerank=False), timeout=60).hits]
                    if len(ids) != len(set(ids)):
                        bad.append(f"duplicate hits {ids}")
            except grpc.RpcError as e:
                bad.append(f"{op}: {e.code().name} {e.details()}")
        return bad

    with ThreadPoolExecutor(4) as ex:
        problems = [p for ps in ex.map(worker, range(4)) for p in ps]
    assert problems == []
    p = server.app.pipeline
    stored = set(p.store.vectors(p.dim)[0].tolist())
    assert stored == p.dense.labels()
    server.call(p.flush)
    assert p.bm25.labels() == stored
    assert stub.Stats(pb.StatsRequest(), timeout=30).documents == len(stored)


def test_idle_upsert_stream_is_ended_and_says_what_was_committed(models_dir, tmp_path):
    """A client that opens an UpsertStream and stops sending must not hold the method's slot
    forever: the stream ends with DEADLINE_EXCEEDED, and what it had sent stays committed."""
    import time

    with EmbeddedServer(settings_for(models_dir, tmp_path, server={"listen": "127.0.0.1:0", "stream_idle_timeout_s": 0.5})) as srv:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.RetrievalStub(ch)

            def batches():
                yield pb.UpsertRequest(documents=[pb.Document(id="s1", text="Aspirin lowers the risk of stroke.")])
                time.sleep(3)  # stalls past the idle timeout
                yield pb.UpsertRequest(documents=[pb.Document(id="s2", text="never sent in time")])

            with pytest.raises(grpc.RpcError) as ei:
                stub.UpsertStream(batches(), timeout=60)
            assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ei.value.details()
            assert "stream-idle-timeout" in ei.value.details() and "batches 0..0 with 1 documents were committed" in ei.value.details()
            assert stub.Stats(pb.StatsRequest(), timeout=30).documents == 1
            # an active stream is not affected by the timeout
            r = stub.UpsertStream(iter([pb.UpsertRequest(documents=[pb.Document(id=f"a{i}", text=f"doc {i}")]) for i in range(3)]),
                                  timeout=60)
            assert r.upserted == 3
