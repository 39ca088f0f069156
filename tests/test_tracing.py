"""OpenTelemetry tracing: a SERVER span per call continuing the caller's W3C trace context, a
child span per stage, the status code rerankd decided, parent-based sampling, and the client
propagating its caller's context. Spans go to the SDK's in-memory exporter."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from rerankd.client import Client
from rerankd.errors import ConfigError
from rerankd.embedded import EmbeddedServer
from rerankd.tracing import tracer_provider

from util import settings_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
DOCS = [{"id": f"t-{i}", "text": t} for i, t in enumerate([
    "Aspirin use lowers the incidence of colorectal adenomas.",
    "Zebrafish fin regeneration requires osteoblast dedifferentiation.",
    "Statins reduce cardiovascular events in high-risk patients.",
])]


def _serve(models_dir, tmp_path, exporter, **server):
    settings = settings_for(models_dir, tmp_path, server={"listen": "127.0.0.1:0", **server})
    return EmbeddedServer(settings, span_processor=SimpleSpanProcessor(exporter))


def _by_name(spans):
    return {s.name: s for s in spans}


def _settled(exporter, n_server, timeout=10.0):
    """The finished spans once ``n_server`` SERVER spans are in: a call that fails reaches the
    client (at the abort) just before its handler ends the span."""
    import time

    end = time.monotonic() + timeout
    while True:
        spans = exporter.get_finished_spans()
        if sum(s.kind == SpanKind.SERVER for s in spans) >= n_server or time.monotonic() > end:
            return spans
        time.sleep(0.01)


def test_a_search_continues_the_callers_trace_with_a_span_per_stage(models_dir, tmp_path):
    exporter = InMemorySpanExporter()
    with _serve(models_dir, tmp_path, exporter) as srv:
        traceparent = [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")]
        with Client(srv.target, timeout=120, metadata=traceparent) as c:
            c.upsert(DOCS)
            exporter.clear()
            c.search("does aspirin prevent colorectal cancer?", top_n=2, candidates=3, budget_ms=60_000)
            spans = exporter.get_finished_spans()
    server = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(server) == 1
    root = server[0]
    assert root.name == "rerankd.v1.Retrieval/Search"
    assert format(root.context.trace_id, "032x") == TRACE_ID and format(root.parent.span_id, "016x") == PARENT_ID
    assert root.attributes["rpc.method"] == "Search" and root.attributes["rpc.grpc.status_code"] == 0
    assert root.status.status_code == StatusCode.UNSET
    stages = _by_name(s for s in spans if s is not root)
    assert {"embed query", "ann", "bm25", "fusion", "fetch documents", "rerank"} <= set(stages)
    for s in stages.values():  # every stage is a child of the server span, in the caller's trace
        assert s.parent.span_id == root.context.span_id and s.context.trace_id == root.context.trace_id
        assert root.start_time <= s.start_time <= s.end_time <= root.end_time
    rr = stages["rerank"].attributes
    assert rr["rerankd.candidates"] == 3 and rr["rerankd.reranked"] == 3 and rr["rerankd.budget_stop"] == "done"
    assert rr["rerankd.budget_ms"] == 60_000


def test_an_error_and_every_rpc_get_a_server_span_with_their_status(models_dir, tmp_path):
    exporter = InMemorySpanExporter()
    with _serve(models_dir, tmp_path, exporter) as srv, Client(srv.target, timeout=120) as c:
        c.upsert(DOCS)
        c.score("aspirin", ["aspirin trial", "fish fins"])
        c.encode(["aspirin"], is_query=True)
        c.get(["t-0"])
        c.delete(["t-2"])
        c.stats()
        with pytest.raises(grpc.RpcError):
            c.search("", top_n=1)
        spans = _settled(exporter, 7)
    server = {s.attributes["rpc.method"]: s for s in spans if s.kind == SpanKind.SERVER}
    assert set(server) == {"Upsert", "Score", "Encode", "Get", "Delete", "Stats", "Search"}, [
        s.name for s in spans if s.kind == SpanKind.SERVER]
    bad = server["Search"]
    assert bad.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.status.status_code == StatusCode.ERROR and "INVALID_ARGUMENT: query" in bad.status.description
    assert server["Score"].status.status_code == StatusCode.UNSET
    # without a caller context, each call starts its own trace
    assert len({s.context.trace_id for s in server.values()}) == len(server)
    names = {(s.name, s.parent.span_id) for s in spans if s.parent is not None}
    assert ("rerank", server["Score"].context.span_id) in names
    assert ("embed", server["Encode"].context.span_id) in names
    assert ("embed documents", server["Upsert"].context.span_id) in names and ("write", server["Upsert"].context.span_id) in names


def test_sampling_follows_the_caller_and_the_ratio(models_dir, tmp_path):
    exporter = InMemorySpanExporter()
    with _serve(models_dir, tmp_path, exporter, trace_sample_ratio=0.0) as srv, Client(srv.target, timeout=120) as c:
        c.stats()  # no caller context: a root span, sampled at ratio 0
        assert exporter.get_finished_spans() == ()
        with Client(srv.target, timeout=60, metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")]) as sampled:
            sampled.stats()  # the caller sampled its trace: it is followed whatever the ratio
        with Client(srv.target, timeout=60, metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00")]) as unsampled:
            unsampled.stats()
        spans = exporter.get_finished_spans()
    assert len(spans) == 1 and format(spans[0].context.trace_id, "032x") == TRACE_ID


def test_the_client_propagates_its_callers_active_span(models_dir, tmp_path):
    exporter = InMemorySpanExporter()
    caller = TracerProvider()  # the calling application's own tracing
    caller_spans = InMemorySpanExporter()
    caller.add_span_processor(SimpleSpanProcessor(caller_spans))
    with _serve(models_dir, tmp_path, exporter) as srv, Client(srv.target, timeout=120) as c:
        with caller.get_tracer("app").start_as_current_span("handle request") as outer:
            c.stats()
        c.stats()  # no active span: nothing is propagated, a new trace starts
        spans = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert len(spans) == 2
    assert spans[0].context.trace_id == outer.get_span_context().trace_id
    assert spans[0].parent.span_id == outer.get_span_context().span_id
    assert spans[1].context.trace_id != outer.get_span_context().trace_id and spans[1].parent is None


def test_tracing_is_off_by_default_and_the_ratio_is_checked(models_dir, tmp_path):
    assert tracer_provider(settings_for(models_dir, tmp_path)) is None
    on = tracer_provider(settings_for(models_dir, tmp_path, server={"otlp_endpoint": "http://127.0.0.1:4317"}))
    assert on is not None
    on.shutdown()
    from rerankd.config import check_settings

    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="trace-sample-ratio"):
            check_settings(settings_for(models_dir, tmp_path, server={"trace_sample_ratio": bad}))


def test_closing_is_bounded_when_the_exporter_hangs():
    """Shutdown flushes buffered spans for at most its timeout, whatever the exporter does (the
    SDK's force_flush timeout did not bound a refused collector); a healthy exporter gets every
    span, and nothing after the close."""
    import threading

    from rerankd.tracing import close

    release = threading.Event()
    try:
        stuck = TracerProvider(shutdown_on_exit=False)
        stuck_flush = []  # a processor whose flush never ends (a collector that never answers)

        class Blocking(SimpleSpanProcessor):
            def force_flush(self, timeout_millis: int = 30000) -> bool:
                stuck_flush.append(timeout_millis)
                release.wait(60)
                return False

        stuck.add_span_processor(Blocking(InMemorySpanExporter()))
        assert close(stuck, 0.2) is False
        assert len(stuck_flush) == 1 and 0 < stuck_flush[0] <= 200  # the SDK passes what is left of it
    finally:
        release.set()

    exporter = InMemorySpanExporter()
    ok = TracerProvider(shutdown_on_exit=False)
    ok.add_span_processor(SimpleSpanProcessor(exporter))
    ok.get_tracer("t").start_span("kept").end()
    assert close(ok, 5.0) is True
    ok.get_tracer("t").start_span("after").end()  # a provider shut down exports nothing more
    assert [s.name for s in exporter.get_finished_spans()] == ["kept"]
