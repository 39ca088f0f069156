"""Operating rerankd: overload control, metrics endpoint, Unix socket, TLS/mTLS, bearer token, SIGTERM drain."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rerankd.client import Client
from rerankd.embedded import EmbeddedServer
from rerankd.v1 import rerankd_pb2 as pb
from rerankd.v1 import rerankd_pb2_grpc as pb_grpc

from util import settings_for

DOCS = [
    {"id": f"d{i}", "text": f"Document {i}: {t}"}
    for i, t in enumerate(
        [
            "Aspirin use lowers the incidence of colorectal adenomas.",
            "Statins reduce cardiovascular events in high-risk patients.",
            "Vitamin D supplementation does not prevent fractures in older adults.",
            "Exercise improves insulin sensitivity in type 2 diabetes.",
            "Smoking cessation reduces lung cancer mortality over a decade.",
            "Metformin is associated with lower cancer incidence in diabetics.",
            "Sleep deprivation impairs memory consolidation.",
            "Gut microbiota composition influences obesity risk.",
        ]
        * 4
    )
]


def _serve(models_dir, tmp_path, **server):
    s = settings_for(models_dir, tmp_path / "data", server=server) if server else settings_for(models_dir, tmp_path / "data")
    return EmbeddedServer(s)


def _concurrent_searches(target: str, n: int, **kw) -> list[tuple]:
    """n Searches at once from n threads: [(code or "ok", seconds, retry-after-ms, details)]."""
    results: list[tuple] = []
    lock = threading.Lock()

    def one():
        with Client(target, timeout=300) as c:
            t0 = time.perf_counter()
            try:
                c.search("aspirin colorectal cancer", **kw)
                out = ("ok", time.perf_counter() - t0, None, "")
            except grpc.RpcError as e:
                md = dict(e.trailing_metadata() or ())
                out = (e.code(), time.perf_counter() - t0, md.get("retry-after-ms"), e.details())
        with lock:
            results.append(out)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_overload_is_resource_exhausted_while_admitted_calls_succeed(models_dir, tmp_path):
    with _serve(models_dir, tmp_path, max_concurrent_search=1, early_deadline_reject=False) as srv:
        with Client(srv.target, timeout=300) as c:
            c.upsert(DOCS)
        results = _concurrent_searches(srv.target, 6, top_n=5, candidates=32)
        codes = [r[0] for r in results]
        assert "ok" in codes
        rejected = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert rejected, codes
        assert all(r[2] is not None and int(r[2]) > 0 for r in rejected)  # retry hint in trailing metadata
        assert set(codes) <= {"ok", grpc.StatusCode.RESOURCE_EXHAUSTED}
        # rejections do not wait for the admitted call
        slowest_ok = max(r[1] for r in results if r[0] == "ok")
        assert min(r[1] for r in rejected) < slowest_ok


def test_metrics_endpoint_changes_after_calls(models_dir, tmp_path):
    with _serve(models_dir, tmp_path, metrics_listen="127.0.0.1:0") as srv:
        url = f"http://127.0.0.1:{srv.app.metrics_port}/metrics"
        before = urllib.request.urlopen(url, timeout=10).read().decode()
        with Client(srv.target, timeout=300) as c:
            c.upsert(DOCS[:8])
            c.search("aspirin", top_n=3, candidates=8)
            with pytest.raises(grpc.RpcError):
                c.search("")
        # The server counts a call in its `finally`, which can run just after the client has the
        # status: scrape until the last call shows up (bounded), as a periodic scraper would.
        for _ in range(100):
            after = urllib.request.urlopen(url, timeout=10).read().decode()
            if 'method="Search"} 1.0' in after and 'code="INVALID_ARGUMENT",method="Search"' in after:
                break
            time.sleep(0.05)
    assert 'rerankd_calls_total{code="OK",method="Search"}' not in before
    assert 'rerankd_calls_total{code="OK",method="Search"} 1.0' in after
    assert 'rerankd_calls_total{code="INVALID_ARGUMENT",method="Search"} 1.0' in after
    assert 'rerankd_stage_seconds_count{stage="rerank"} 1.0' in after
    # Every call that ran is timed, failed ones too, split by whether it ran the cross-encoder.
    assert 'rerankd_call_seconds_count{method="Search",rerank="true"} 2.0' in after  # the OK one and the refused ""
    assert 'rerankd_call_seconds_bucket{le="1.25",method="Search",rerank="true"}' in after
    assert 'rerankd_stage_seconds_count{stage="embed"}' in after
    assert 'rerankd_batch_size_count{model="reranker"}' in after
    assert "rerankd_index_documents 8.0" in after
    eff = [l for l in after.splitlines() if l.startswith('rerankd_padding_efficiency{model="reranker"}')]
    assert eff and 0.0 < float(eff[0].split()[-1]) <= 1.0


def test_unix_socket_round_trip(models_dir, tmp_path):
    sock = Path("/tmp") / f"rerankd-test-{os.getpid()}.sock"
    sock.unlink(missing_ok=True)
    try:
        with _serve(models_dir, tmp_path, listen=f"127.0.0.1:0,unix://{sock}"):
            with Client(f"unix://{sock}", timeout=300) as c:
                c.upsert(DOCS[:3])
                assert c.stats().documents == 3
                assert c.score("aspirin", [{"id": "a", "text": "aspirin"}])[0]["item_id"] == "a"
    finally:
        sock.unlink(missing_ok=True)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture()
def certs(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    ext = d / "san.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "1", "-extfile", "san.cnf", "-out", f"{name}.pem", cwd=d)
    return d


def test_mtls_handshake_and_rejection_without_client_cert(models_dir, tmp_path, certs):
    d = certs
    with _serve(models_dir, tmp_path, tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"),
                tls_client_ca=str(d / "ca.pem")) as srv:
        target = f"localhost:{srv.port}"
        ca = (d / "ca.pem").read_bytes()
        good = grpc.ssl_channel_credentials(ca, (d / "client.key").read_bytes(), (d / "client.pem").read_bytes())
        with Client(target, credentials=good, timeout=60) as c:
            assert c.stats().documents == 0
        no_client_cert = grpc.ssl_channel_credentials(ca)
        with Client(target, credentials=no_client_cert, timeout=10) as c:
            with pytest.raises(grpc.RpcError) as ei:
                c.stats()
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        with Client(target, timeout=10) as c:  # plaintext against a TLS port
            with pytest.raises(grpc.RpcError) as ei:
                c.stats()
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bearer_token(models_dir, tmp_path):
    with _serve(models_dir, tmp_path, auth_token="s3cret") as srv:
        with Client(srv.target, timeout=60, metadata=[("authorization", "Bearer s3cret")]) as c:
            assert c.stats().documents == 0
            assert c.upsert_stream([DOCS[:2]]).upserted == 2  # client-streaming RPC passes too
        # the scheme is case-insensitive (RFC 7235): `bearer` was refused (a review)
        with Client(srv.target, timeout=60, metadata=[("authorization", "bearer s3cret")]) as c:
            assert c.stats().documents == 2
        for md in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")],
                   [("authorization", "Basic s3cret")], [("authorization", "Bearer s3cret ")]):
            with Client(srv.target, timeout=60, metadata=md) as c:
                with pytest.raises(grpc.RpcError) as ei:
                    c.stats()
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as ei:
                    c.upsert_stream([DOCS[:1]])
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # health checks stay open for probes
        with grpc.insecure_channel(srv.target) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        # Refusals were in no metric and no log line (a review): counted by method and reason.
        assert srv.app.metrics.rejected.labels("Stats", "auth")._value.get() == 5
        assert srv.app.metrics.rejected.labels("UpsertStream", "auth")._value.get() == 5


def test_refused_calls_are_summed_up_in_one_log_line_at_most_a_minute(caplog):
    import logging
    import types

    from rerankd.config import Settings
    from rerankd.metrics import Metrics
    from rerankd.server import App

    app = App(settings=Settings(), health=types.SimpleNamespace())
    app.metrics = Metrics()
    with caplog.at_level(logging.WARNING, logger="rerankd.server"):
        for _ in range(50):
            app.shed("Search", "concurrency")
        app.shed("Score", "queue_full")
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines == ["refused 1 calls since start (method/reason=count): Search/concurrency=1"]  # then quiet
    app.shed_logged_at -= 61  # a minute later, the next refusal sums up the ones in between
    with caplog.at_level(logging.WARNING, logger="rerankd.server"):
        app.shed("Score", "queue_full")
    assert "refused 51 calls in the last 61 s (method/reason=count): Score/queue_full=2, Search/concurrency=49" in caplog.text
    assert app.metrics.rejected.labels("Search", "concurrency")._value.get() == 50


def test_refusals_of_a_burst_are_logged_when_the_minute_is_up_without_another_refusal(caplog, monkeypatch):
    """The summary was written only by a refusal arriving after the minute: a burst of 160 left one
    line ("1 calls") and 159 unlogged (a review). A timer writes the rest."""
    import asyncio
    import logging
    import types

    from rerankd import server as srv
    from rerankd.config import Settings
    from rerankd.metrics import Metrics

    monkeypatch.setattr(srv, "SHED_LOG_S", 0.2)

    async def burst() -> None:
        app = srv.App(settings=Settings(), health=types.SimpleNamespace())
        app.metrics = Metrics()
        for _ in range(160):
            app.shed("Score", "concurrency")
        await asyncio.sleep(0.5)

    with caplog.at_level(logging.WARNING, logger="rerankd.server"):
        asyncio.run(burst())
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines[0].startswith("refused 1 calls since start")
    assert len(lines) == 2 and lines[1].startswith("refused 159 calls in the last"), lines


def test_a_signal_during_the_imports_is_caught_by_rerankd_serve(tmp_path, monkeypatch):
    """cli.main catches SIGTERM before it imports the server and hands it to serve()."""
    from rerankd import cli, server

    async def fake_serve(settings, early_signal=None):
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
            return 3  # main did not catch it: the kill below would have ended the process
        os.kill(os.getpid(), signal.SIGTERM)
        return 0 if early_signal is not None and early_signal() else 4

    monkeypatch.setattr(server, "serve", fake_serve)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["serve", "--models-dir", str(tmp_path), "--data-dir", str(tmp_path / "d"),
                     "--listen", "127.0.0.1:0"]) == 0
    assert signal.getsignal(signal.SIGTERM) == before  # handed back as found


def test_a_signal_before_the_loop_handlers_still_stops_the_server(models_dir, tmp_path):
    """As PID 1 in a container a signal with no handler is dropped: SIGTERM during the imports was
    lost and the pod waited out its grace period (a review). ``rerankd serve`` catches it from its
    first line and the server stops as soon as it can."""
    import asyncio

    from rerankd import cli
    from rerankd.server import serve

    previous = cli._catch_early_signals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert cli._EARLY_SIGNALS == [signal.SIGTERM]  # caught, not fatal
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        cli._EARLY_SIGNALS.clear()
    s = settings_for(models_dir, tmp_path / "data")
    t0 = time.monotonic()
    assert asyncio.run(asyncio.wait_for(serve(s, early_signal=lambda: True), 120)) == 0
    assert time.monotonic() - t0 < 60  # stopped without waiting for any other signal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_calls(models_dir, tmp_path):
    port = _free_port()
    env = {**os.environ, "RERANKD_LISTEN": f"127.0.0.1:{port}", "RERANKD_BACKEND": "onnxruntime", "RERANKD_PRECISION": "fp32"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rerankd.cli", "serve", "--models-dir", str(models_dir), "--data-dir", str(tmp_path / "d"),
         "--no-warmup", "--grace-period-s", "60"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        target = f"127.0.0.1:{port}"
        with grpc.insecure_channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            deadline = time.time() + 300
            while True:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.time() < deadline and proc.poll() is None, "server did not become SERVING"
                time.sleep(0.3)
            # A slow in-flight call: score many long passages.
            rerank = pb_grpc.RetrievalStub(ch)
            items = [pb.Item(id=str(i), text="protein folding kinetics " * 60) for i in range(48)]
            fut = rerank.Score.future(pb.ScoreRequest(query="protein folding", items=items), timeout=300)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            resp = fut.result()  # completes despite SIGTERM
            assert len(resp.scores) == 48
        assert proc.wait(timeout=120) == 0
        out = proc.stdout.read()
        assert "draining" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_reranked_searches_and_scores_count_against_the_search_limit(models_dir, tmp_path, monkeypatch):
    """--max-concurrent-search holds the calls that run the cross-encoder, reranked Searches and
    Scores; first-stage-only Searches (~100x cheaper) are in their own lane under
    --max-concurrent-calls. A limit of 0 makes it deterministic (patched in: the flag refuses 0 at
    start, as no reranked call could ever run). Score had the generic 64-call lane: a review's
    Score flood queued ~45 s of reranking ahead of a reranked Search."""
    from rerankd.server import RERANK_LANE, RetrievalServicer

    real_limit = RetrievalServicer._limit
    monkeypatch.setattr(RetrievalServicer, "_limit", lambda sv, lane: 0 if lane == RERANK_LANE else real_limit(sv, lane))
    with _serve(models_dir, tmp_path) as srv:
        with Client(srv.target, timeout=300) as c:
            c.upsert(DOCS)
            assert c.search("aspirin colorectal cancer", top_n=3, candidates=8, rerank=False)
            with pytest.raises(grpc.RpcError) as ei:
                c.search("aspirin colorectal cancer", top_n=3, candidates=8)
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "reranking (Search with rerank, Score): 0 calls already in flight" in ei.value.details()
            with pytest.raises(grpc.RpcError) as ei:
                c.score("aspirin", ["Aspirin lowers colorectal cancer risk."])
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.encode(["aspirin"]).shape == (1, 384)  # other methods: their own lanes


def test_estimated_wait_is_the_remaining_solo_time_of_calls_in_flight():
    import types

    from rerankd.config import Settings
    from rerankd.server import RERANK_LANE, RetrievalServicer

    sv = RetrievalServicer(types.SimpleNamespace(settings=Settings()))
    lane = RERANK_LANE
    sv._starts[lane] = {1: 100.0, 2: 100.1}
    sv._solo[lane] = (0.6, 2)
    assert sv.estimated_wait(lane, 100.2) is None  # not enough history: never reject on a guess
    sv._solo[lane] = (0.6, 3)
    assert sv.estimated_wait(lane, 100.2) == pytest.approx(0.4 + 0.5)  # both calls still to finish
    assert sv.estimated_wait(lane, 100.65) == pytest.approx(0.0 + 0.05)  # the first is past its typical time
    assert sv.estimated_wait(lane, 102.0) == 0.0
    # a budgeted call in flight (0.3 s budget) lasts about its budget, not the solo latency
    sv._budgets[2] = 0.3
    assert sv.estimated_wait(lane, 100.2) == pytest.approx(0.4 + 0.2)
    sv._budgets[2] = 5.0  # a budget above the typical latency does not lengthen the estimate
    assert sv.estimated_wait(lane, 100.2) == pytest.approx(0.4 + 0.5)
    assert Settings().server.max_queue_wait_ratio == 0.0  # off by default (measured: no p99 gain here)


def test_early_deadline_check_recovers_after_a_slow_spell():
    """Only successes move the estimate, and a refused call never succeeds: after a slow spell,
    clients with a fixed short deadline were refused for good although the server was fast
    again (a review measured 13,895 of 13,895 calls refused over 10 s). An estimate with no news
    for a second now lets the next call it would refuse through as a probe."""
    import types

    from rerankd.config import Settings
    from rerankd.server import PROBE_INTERVAL_S, RetrievalServicer

    sv = RetrievalServicer(types.SimpleNamespace(settings=Settings()))
    for _ in range(20):
        sv._observe("Score", "Score", 1, 0.5)  # the slow spell
    now = sv._fresh[("Score", 1)]
    assert sv._too_short("Score", 1, 0.2, now + 0.1) == pytest.approx(0.5)  # fresh: refused
    assert sv._too_short("Score", 1, 0.2, now + PROBE_INTERVAL_S) is None  # stale: one probe goes through
    assert sv._too_short("Score", 1, 0.2, now + PROBE_INTERVAL_S + 0.1) == pytest.approx(0.5)  # only one
    assert sv._too_short("Score", 2, 0.2, now + 5) is None  # no history for that size: never refused
    refused = through = 0
    t = now + PROBE_INTERVAL_S
    while sv._sized[("Score", 1)][0] >= 0.4:  # the server is fast again: 200 ms deadlines, 100 calls/s
        t += 0.01
        if sv._too_short("Score", 1, 0.2, t) is None:
            through += 1
            sv._observe("Score", "Score", 1, 0.007)
            sv._fresh[("Score", 1)] = t  # the probe's success, at the test's clock
        else:
            refused += 1
        assert t < now + 60
    assert through >= 1 and sv._too_short("Score", 1, 0.2, t + 0.01) is None  # recovered, calls go through


def test_early_deadline_check_compares_calls_of_about_the_same_size():
    """A review found one latency average per method: after a run of 512-document Upserts (or
    long ingest streams) a 1-document Upsert with a short deadline was refused at once. The check
    now reads calls of the same lane and size class only, and never judges a stream or Compact."""
    import dataclasses
    import types

    from rerankd.config import Settings
    from rerankd.server import RetrievalServicer

    sv = RetrievalServicer(types.SimpleNamespace(settings=Settings()))
    for _ in range(30):
        sv._observe("Upsert", "Upsert", 512, 4.0)
        sv._observe("UpsertStream", "UpsertStream", None, 600.0)
    assert sv._too_short("Upsert", 512, 1.0) == pytest.approx(4.0)  # same size: 1 s cannot cover ~4 s
    assert sv._too_short("Upsert", 600, 1.0) == pytest.approx(4.0)  # 512..1023: same class
    assert sv._too_short("Upsert", 1, 1.0) is None  # no history for 1-document calls: not refused
    assert sv._too_short("Upsert", 300, 1.0) is None  # 256..511: another class
    assert sv._too_short("UpsertStream", None, 1.0) is None  # a stream's length is the client's
    assert sv._too_short("Score", 512, 1.0) is None  # other lanes keep their own estimates
    for _ in range(19):
        sv._observe("Upsert", "Upsert", 1, 0.01)
    assert sv._too_short("Upsert", 1, 0.001) is None  # 19 calls: not enough history yet
    sv._observe("Upsert", "Upsert", 1, 0.01)
    assert sv._too_short("Upsert", 1, 0.001) == pytest.approx(0.01)
    assert sv._too_short("Upsert", 1, 0.006) is None  # more than half the typical latency left
    # a Search's size is its candidates with the default resolved: unset and explicit 50 are one size
    from rerankd.server import _search_size

    limits = Settings().limits
    assert _search_size(pb.SearchRequest(query="q"), limits) == _search_size(pb.SearchRequest(query="q", candidates=50), limits) == 50
    assert _search_size(pb.SearchRequest(query="q", top_n=80), limits) == 80
    assert _search_size(pb.SearchRequest(query="q", candidates=0), limits) == 0  # invalid: left to validation
    # A budgeted reranked Search is not judged (nor learnt from) by its candidates: its budget sets its latency.
    from rerankd.server import _admission_size

    budgeted = Settings().replace(index={"search_budget_ms": 300})
    assert _admission_size(pb.SearchRequest(query="q"), Settings()) == 50
    assert _admission_size(pb.SearchRequest(query="q", budget_ms=300), Settings()) is None
    assert _admission_size(pb.SearchRequest(query="q"), budgeted) is None  # the server's default budget
    assert _admission_size(pb.SearchRequest(query="q", budget_ms=0), budgeted) == 50  # 0: no budget for this call
    assert _admission_size(pb.SearchRequest(query="q", budget_ms=300, rerank=False), Settings()) == 50
    # Score and reranked Search share a lane (one limit) but not an estimate: a Score of 50 items
    # was judged by 50-candidate Searches, which add the first stage (README "Not done", session 13).
    from rerankd.server import RERANK_LANE

    for _ in range(30):
        sv._observe(RERANK_LANE, f"{RERANK_LANE}/Search", 50, 0.6)
    assert sv._too_short(f"{RERANK_LANE}/Search", 50, 0.2) == pytest.approx(0.6)
    assert sv._too_short(f"{RERANK_LANE}/Score", 50, 0.2) is None  # no Score history: not refused
    off = Settings()
    off = dataclasses.replace(off, server=dataclasses.replace(off.server, early_deadline_reject=False))
    sv.app = types.SimpleNamespace(settings=off)
    assert sv._too_short("Upsert", 512, 1.0) is None


def test_queue_wait_admission_sheds_only_with_resource_exhausted(models_dir, tmp_path):
    """With a tiny wait budget, a reranked Search that arrives while another runs is shed with
    RESOURCE_EXHAUSTED naming the estimated wait; the rest succeed and nothing else is returned."""
    with _serve(models_dir, tmp_path, max_concurrent_search=8, max_queue_wait_ratio=1e-6,
                early_deadline_reject=False) as srv:
        with Client(srv.target, timeout=300) as c:
            c.upsert(DOCS)
            for _ in range(3):  # solo history for the estimate
                c.search("aspirin colorectal cancer", top_n=3, candidates=16)
        results = _concurrent_searches(srv.target, 6, top_n=3, candidates=16)
    codes = [r[0] for r in results]
    assert "ok" in codes and set(codes) <= {"ok", grpc.StatusCode.RESOURCE_EXHAUSTED}, results
    assert all("estimated wait" in r[3] for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_shutdown_during_warmup_closes_the_half_started_pipeline(models_dir, tmp_path, monkeypatch):
    """A signal while the models warm up: the pipeline that was built is closed (shutdown() only
    closes a serving one), the server never reports SERVING, and shutdown does not wait for the
    warmup to end (found by a review)."""
    import asyncio
    import threading

    from rerankd import server as srv
    from rerankd.pipeline import Pipeline
    from util import settings_for

    closed: list[bool] = []
    real_close = Pipeline.close
    entered, gate = threading.Event(), threading.Event()

    async def close(self, save_snapshot=True):
        closed.append(save_snapshot)
        await real_close(self, save_snapshot)

    def warmup(self):
        entered.set()
        gate.wait(60)
        return 0

    monkeypatch.setattr(Pipeline, "close", close)
    monkeypatch.setattr(Pipeline, "warmup", warmup)

    async def run() -> None:
        server, _, app = await srv.create_server(settings_for(models_dir, tmp_path / "data"))
        try:
            assert await asyncio.to_thread(entered.wait, 120)
            await asyncio.wait_for(srv.shutdown(server, app, grace=0), 60)  # the warmup still runs
            assert closed == [False] and app.pipeline is None and isinstance(app.load_error, asyncio.CancelledError)
        finally:
            gate.set()

    asyncio.run(run())


def test_command_line_tools_reach_a_tls_server_with_a_token(models_dir, tmp_path, certs, monkeypatch, capsys):
    """`rerankd index` / `eval --target` took --auth-token and --tls-* (serve's flags) and ignored
    them, always connecting in plaintext without a token; `rerankd health` had no TLS at all, so
    a Docker HEALTHCHECK failed for good once TLS was on (found by a review)."""
    import json

    from rerankd.cli import main

    d = certs
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"aspirin study {i}"}) + "\n" for i in range(5)))
    tls = ["--tls-ca", str(d / "ca.pem"), "--tls-client-cert", str(d / "client.pem"), "--tls-client-key", str(d / "client.key")]
    with _serve(models_dir, tmp_path, tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"),
                tls_client_ca=str(d / "ca.pem"), auth_token="s3cret") as srv:
        target = f"localhost:{srv.port}"
        assert main(["health", "--target", target, *tls]) == 0  # health: TLS, no token needed
        assert main(["health", "--target", target]) == 1  # plaintext against TLS
        assert main(["index", str(corpus), "--target", target, "--no-progress", *tls, "--auth-token", "s3cret"]) == 0
        assert main(["index", str(corpus), "--target", target, "--no-progress", *tls, "--auth-token", "wrong"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        with Client(target, timeout=60, credentials=grpc.ssl_channel_credentials(
                (d / "ca.pem").read_bytes(), (d / "client.key").read_bytes(), (d / "client.pem").read_bytes()),
                metadata=[("authorization", "Bearer s3cret")]) as c:
            assert c.stats().documents == 5
    assert main(["health", "--target", "localhost:1", "--tls-client-cert", "x.pem"]) == 2  # needs its key and a CA
    # the embedded server of `rerankd index` is its own: a token meant for a real server (env) does not lock it out
    monkeypatch.setenv("RERANKD_AUTH_TOKEN", "s3cret")
    assert main(["index", str(corpus), "--models-dir", str(models_dir), "--data-dir", str(tmp_path / "emb"),
                 "--no-progress", "--no-warmup"]) == 0


def test_wait_serving_reports_why_a_server_cannot_be_reached(models_dir, tmp_path, certs):
    """wait_serving waited on channel_ready_future, which never resolves on a failed TLS
    handshake: 30 s, then "not reachable" without the reason (found by a review)."""
    from rerankd.client import wait_serving

    d = certs
    with _serve(models_dir, tmp_path, tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key")) as srv:
        target = f"localhost:{srv.port}"
        wait_serving(target, 30, credentials=grpc.ssl_channel_credentials((d / "ca.pem").read_bytes()))
        with pytest.raises(TimeoutError, match="UNAVAILABLE") as ei:  # plaintext against TLS: the handshake fails
            wait_serving(target, 30, connect_timeout=2)
        assert "no answer for 2 s" in str(ei.value)


def test_compact_leaves_every_commit_in_the_main_database_file(models_dir, tmp_path):
    """README "Backup": after Compact a copy of documents.sqlite3 alone holds every write (the
    write-ahead log was left holding them: a copy without the -wal file lost them)."""
    import sqlite3

    with _serve(models_dir, tmp_path) as srv:
        with Client(srv.target, timeout=300) as c:
            c.upsert(DOCS[:6])
            c.delete([DOCS[0]["id"]])
            c.compact()
            shutil.copy(tmp_path / "data" / "documents.sqlite3", tmp_path / "copy.sqlite3")
    con = sqlite3.connect(tmp_path / "copy.sqlite3")
    ids = {r[0] for r in con.execute("SELECT id FROM documents")}
    con.close()
    assert ids == {d["id"] for d in DOCS[1:6]}


def test_client_retries_overload_refusals_after_the_servers_pushback(models_dir, tmp_path, monkeypatch):
    """Every refusal carries grpc-retry-pushback-ms, which gRPC's own retry policy waits for:
    ``Client(retries=N)`` (or any gRPC client given ``retry_service_config``) rides out a
    transient overload; without it the first refusal is the answer."""
    from rerankd.client import error_details, retry_service_config
    from rerankd.server import RERANK_LANE, RetrievalServicer

    real_limit, refused = RetrievalServicer._limit, []

    def limit(sv, lane):
        if lane == RERANK_LANE and len(refused) < 2:
            refused.append(time.monotonic())
            return 0
        return real_limit(sv, lane)

    monkeypatch.setattr(RetrievalServicer, "_limit", limit)
    with _serve(models_dir, tmp_path) as srv:
        with Client(srv.target, timeout=300, retries=0) as c:
            c.upsert(DOCS[:8])
            with pytest.raises(grpc.RpcError) as ei:
                c.search("aspirin colorectal cancer", top_n=3, candidates=8)
            trailers = dict(ei.value.trailing_metadata())
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert trailers["grpc-retry-pushback-ms"] == trailers["retry-after-ms"]
            # the same hint in the rich error model (google.rpc.RetryInfo)
            assert error_details(ei.value)["retry_delay_s"] == int(trailers["retry-after-ms"]) / 1000
        with Client(srv.target, timeout=300, retries=3) as c:
            hits = c.search("aspirin colorectal cancer", top_n=3, candidates=8)  # refused once, then served
            assert len(hits) == 3 and len(refused) == 2
            # gRPC keeps only 256 KiB of a request to resend by default: a 300 KB Score was never
            # retried (a review). Score shares the lane, so it is refused (twice) as well.
            refused.clear()
            big = [{"id": str(i), "text": ("aspirin and colorectal cancer risk " * 900)[:30000]} for i in range(10)]
            assert len(c.score("aspirin", big)) == 10 and len(refused) == 2
            # A hint the deadline cannot cover says "do not retry": the refusal, at once.
            # (The hint is the lane's recent latency, by now that of a reranked call on this CPU,
            # hundreds of ms: a 50 ms deadline cannot cover it. Before, gRPC waited out the hint
            # and the caller got DEADLINE_EXCEEDED.)
            refused.clear()
            with pytest.raises(grpc.RpcError) as ei:
                c.search("aspirin colorectal cancer", top_n=3, candidates=8, timeout=0.05)
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value.code()
            assert dict(ei.value.trailing_metadata())["grpc-retry-pushback-ms"] == "-1" and len(refused) == 1
    with pytest.raises(ValueError):
        retry_service_config(1)
    assert json.loads(retry_service_config(9))["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 5


def test_live_counter_is_a_counter_with_no_sample_until_bound_or_when_its_read_fails():
    """rerankd_bm25_refresh_failures_total is registered once with the registry; before a pipeline
    is bound, and whenever reading it fails, the family is exposed without a sample (a counter
    has no NaN to report), and bound it reads the pipeline's own count."""
    import types

    from prometheus_client import generate_latest

    from rerankd.metrics import Metrics

    def samples():
        fam = [f for f in m.registry.collect() if f.name == "rerankd_bm25_refresh_failures"]
        assert len(fam) == 1 and fam[0].type == "counter"
        return [(s.name, s.value) for s in fam[0].samples]

    m = Metrics()
    assert samples() == []
    assert b"# TYPE rerankd_bm25_refresh_failures_total counter" in generate_latest(m.registry)
    bm25 = types.SimpleNamespace(failures=0, applied_seq=0, refresh_failures_total=3)
    batcher = types.SimpleNamespace(queue_depth=0, stats=types.SimpleNamespace(padding_efficiency=1.0))
    model = types.SimpleNamespace(batcher=batcher)
    pipeline = types.SimpleNamespace(embedder=model, reranker=model, dense=[], bm25=bm25)
    m.bind(pipeline)
    assert samples() == [("rerankd_bm25_refresh_failures_total", 3.0)]
    m.bind(pipeline)  # a second bind replaces the reader; nothing is registered twice
    del bm25.refresh_failures_total
    assert samples() == []
