"""Budgeted Searches (SearchRequest.budget_ms, --search-budget-ms): the cross-encoder scores a
first-stage prefix of the candidates, a batch at a time, within a soft latency budget.

Time is a fake clock that only the reranker's backend moves (one second per pair scored; the
pipeline and the batcher read it), so the expected prefixes are exact and nothing here depends
on the machine's speed."""

from __future__ import annotations

import asyncio
import time

import pytest

from rerankd.client import Client
from rerankd.config import Settings
from rerankd.embedded import EmbeddedServer
from rerankd.errors import ConfigError, Overloaded
from rerankd.metrics import Metrics
from rerankd.pipeline import Document, Pipeline, SearchParams
from rerankd.stages.fusion import rerank_fusion
from rerankd.tracing import NOOP
from util import assert_invalid, settings_for

# Twelve passages of one shape, so every (query, passage) pair has the same length: a chunk of r
# pairs then costs r fake seconds, and the estimate per padded token predicts exactly that.
DOCS = [Document(f"d{c}", f"aspirin trial {c} reduced colon cancer risk") for c in "abcdefghijkl"]
QUERY = "aspirin colon cancer risk"
# batch_sizes (1, 2): a budgeted chunk is at most two pairs
BATCH = {"warmup": False, "batch_sizes": (1, 2)}


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _rig(p: Pipeline, monkeypatch) -> FakeClock:
    """The pipeline's and the reranker batcher's clocks become fake; each reranker batch advances
    it by one second per pair. The rate estimate starts cold."""
    clock = FakeClock()
    p.clock = p.reranker.batcher.clock = clock
    real = p.reranker.backend.run

    def run(ids, mask, types):
        clock.t += ids.shape[0]
        return real(ids, mask, types)

    monkeypatch.setattr(p.reranker.backend, "run", run)
    b = p.reranker.batcher
    b.seconds_per_token, b.last_batch_at, p.reranker._probed_at = None, None, None
    return clock


def _check_order(r, m: int) -> None:
    """The first m hits are the reranked first-stage prefix in the reranker's order; the rest
    follow in first-stage order without a rerank score."""
    head, tail = r.hits[:m], r.hits[m:]
    assert sorted(h.first_stage_rank for h in head) == list(range(1, m + 1))
    assert all(h.rerank_score is not None for h in head)
    assert [h.rerank_score for h in head] == sorted((h.rerank_score for h in head), reverse=True)
    assert [h.score for h in head] == [h.rerank_score for h in head]
    assert [h.first_stage_rank for h in tail] == list(range(m + 1, m + 1 + len(tail)))
    assert all(h.rerank_score is None and h.score == h.first_stage_score for h in tail)
    assert [h.rank for h in r.hits] == list(range(1, len(r.hits) + 1))


def test_budget_reranks_the_prefix_that_fits(models_dir, tmp_path, monkeypatch):
    async def run() -> None:
        p = Pipeline(settings_for(models_dir, tmp_path, batch=BATCH, index={"data_dir": tmp_path, "search_budget_ms": 4500}))
        await p.start()
        try:
            await p.upsert(DOCS)
            clock = _rig(p, monkeypatch)
            # No estimate yet and the reranker busy (sequences queued): nothing is sent; the busy
            # reranker's batches will give the estimate, and a pair would wait behind them.
            p.reranker.batcher._queued = 3
            r = await p.search(SearchParams(query=QUERY, candidates=12, top_n=12))
            assert (r.reranked_candidates, r.budget_stop) == (0, "budget") and clock.t == 0.0
            p.reranker.batcher._queued = 0
            # The server's budget (4.5 s), no estimate yet: a one-pair chunk (t=1) whose batch
            # measures the rate, then a full chunk of two (t=3), then one (t=4); 0.5 s is left,
            # too little for one more pair.
            r = await p.search(SearchParams(query=QUERY, candidates=12, top_n=12))
            assert (r.reranked_candidates, r.budget_stop, r.reranked) == (4, "budget", True)
            assert clock.t == 4.0
            _check_order(r, 4)
            assert r.reranker == p.reranker.name and len(r.hits) == 12
            # The same four candidates score as in an unbudgeted Search (budget_ms 0 overrides the server's).
            full = SearchParams(query=QUERY, candidates=12, top_n=12, budget_ms=0)
            whole = await p.search(full)
            assert whole.reranked and whole.reranked_candidates == 12 and whole.budget_stop == ""
            scores = {h.id: h.rerank_score for h in whole.hits}
            assert all(h.rerank_score == pytest.approx(scores[h.id], abs=1e-4) for h in r.hits[:4])
            # Warm estimate (every batch, the unbudgeted ones too, feeds it): two chunks of two.
            clock.t = 100.0
            r = await p.search(SearchParams(query=QUERY, candidates=12, top_n=12))
            assert r.reranked_candidates == 4 and clock.t == 104.0
            # Work ahead in the batcher counts: with two pairs' worth of backlog, 2.5 s remain for
            # this call, one chunk of two.
            pair = p.reranker.batcher.seconds_per_token
            monkeypatch.setattr(p.reranker.batcher, "backlog_tokens", lambda padded: int(round(2 / pair)))
            clock.t = 200.0
            r = await p.search(SearchParams(query=QUERY, candidates=12, top_n=12))
            assert r.reranked_candidates == 2 and clock.t == 202.0
            monkeypatch.undo()
            clock = _rig(p, monkeypatch)
            clock.t = 300.0
            await p.search(full)  # warm again
            # top_n below the reranked prefix: only reranked hits come back
            r = await p.search(SearchParams(query=QUERY, candidates=12, top_n=3))
            assert len(r.hits) == 3 and all(h.rerank_score is not None for h in r.hits)
            # A per-call budget that covers everything: stop "done"
            r = await p.search(SearchParams(query=QUERY, candidates=12, top_n=12, budget_ms=60_000))
            assert (r.reranked_candidates, r.budget_stop) == (12, "done")
            _check_order(r, 12)
            # no candidate at all (a filter nothing matches): "done", so the budget metrics count it
            r = await p.search(SearchParams(query=QUERY, budget_ms=500, filter=(("lang", ("xx",)),)))
            assert (r.hits, r.reranked_candidates, r.budget_stop) == ([], 0, "done")
            # Rerank fusion over a partial prefix: fused over the reranked candidates' own ranks.
            r = await p.search(SearchParams(query=QUERY, candidates=12, top_n=12, fusion_weight=1.0))
            head = r.hits[:r.reranked_candidates]
            assert r.reranked_candidates == 4
            fused = rerank_fusion([h.rerank_score for h in head], [h.first_stage_rank for h in head], 1.0)
            assert [h.score for h in head] == pytest.approx(sorted(fused.tolist(), reverse=True), abs=1e-5)
            assert sorted(h.first_stage_rank for h in head) == [1, 2, 3, 4]
            # The call's gRPC deadline caps the budget: 3 s (real) left, so one chunk of two
            # plans to end by then, and the next would not; nothing is lost to DeadlineExceeded.
            loop = asyncio.get_running_loop()
            t0 = clock.t
            r = await p.search(SearchParams(query=QUERY, candidates=12, top_n=12, budget_ms=60_000),
                               deadline=loop.time() + 3.0)
            assert (r.reranked_candidates, r.budget_stop) == (2, "budget") and clock.t == t0 + 2
        finally:
            await p.close()

    asyncio.run(run())


def test_spent_budget_gives_first_stage_order_and_a_stale_estimate_is_probed(models_dir, tmp_path, monkeypatch):
    async def run() -> None:
        p = Pipeline(settings_for(models_dir, tmp_path, batch=BATCH))
        await p.start()
        try:
            await p.upsert(DOCS)
            clock = _rig(p, monkeypatch)
            await p.search(SearchParams(query=QUERY, candidates=12, budget_ms=3000))  # warms the estimate
            assert p.reranker.batcher.seconds_per_token is not None
            # 0.5 s cannot hold one pair (1 s) and a batch just ran: nothing is reranked
            t0 = clock.t
            small = SearchParams(query=QUERY, candidates=12, top_n=12, budget_ms=500)
            r = await p.search(small)
            assert (r.reranked_candidates, r.budget_stop, r.reranked, r.reranker) == (0, "budget", False, "")
            assert clock.t == t0
            _check_order(r, 0)
            plain = await p.search(SearchParams(query=QUERY, candidates=12, top_n=12, rerank=False))
            assert [h.id for h in r.hits] == [h.id for h in plain.hits]
            # With no batch for a second, one pair is probed, so an estimate left high by CPU
            # contention cannot keep every later call from reranking.
            clock.t += 1.5
            r = await p.search(small)
            assert (r.reranked_candidates, r.reranked) == (1, True)
            # ... once a second at most: the next call within it does not probe
            r = await p.search(small)
            assert r.reranked_candidates == 0
            # No probe while the reranker is busy: its batches keep the estimate current, and a
            # probe would wait behind all of them (a review: 11 s for a 0.5 s budget behind a Score).
            clock.t += 1.5
            p.reranker.batcher._queued = 3  # another call's pairs queued
            r = await p.search(small)
            assert (r.reranked_candidates, r.budget_stop) == (0, "budget") and p.reranker._probed_at != clock.t
            p.reranker.batcher._queued = 0
            r = await p.search(small)
            assert r.reranked_candidates == 1  # idle again: the probe goes
            # A budget the first stage already spent reranks nothing, and no probe overruns it.
            clock.t += 5.0
            real_embed = p.embedder.backend.run

            def slow_embed(*a):
                clock.t += 2.0  # the query's embedding takes 2 s
                return real_embed(*a)

            monkeypatch.setattr(p.embedder.backend, "run", slow_embed)
            r = await p.search(SearchParams(query=QUERY, candidates=12, top_n=12, budget_ms=1500))
            assert (r.reranked_candidates, r.budget_stop) == (0, "budget")
            r = await p.search(SearchParams(query=QUERY, candidates=12, top_n=12, budget_ms=3500))
            assert r.reranked_candidates == 1  # 1.5 s left after the first stage: one pair
        finally:
            await p.close()

    asyncio.run(run())


def test_a_full_queue_ends_a_budgeted_rerank_with_its_prefix(models_dir, tmp_path, monkeypatch):
    async def run() -> None:
        p = Pipeline(settings_for(models_dir, tmp_path, batch=BATCH))
        await p.start()
        m = Metrics()
        try:
            await p.upsert(DOCS)
            _rig(p, monkeypatch)
            real = p.reranker.batcher.submit
            calls = []

            async def submit(seqs, deadline=None, **kw):
                calls.append(len(seqs))
                if len(calls) in fail:
                    raise Overloaded("queue full", retry_after_s=0.1)
                return await real(seqs, deadline, **kw)

            monkeypatch.setattr(p.reranker.batcher, "submit", submit)
            fail = {3}
            r = await p.search(SearchParams(query=QUERY, candidates=12, top_n=12, budget_ms=60_000))
            assert calls == [1, 2, 2] and (r.reranked_candidates, r.budget_stop) == (3, "overloaded")
            _check_order(r, 3)
            m.on_budget(r.budget_stop, r.reranked_candidates)
            assert m.registry.get_sample_value("rerankd_budgeted_searches_total", {"stop": "overloaded"}) == 1
            # refused on its first chunk: a budgeted Search answers in first-stage order
            calls.clear()
            fail = {1}
            r = await p.search(SearchParams(query=QUERY, candidates=12, top_n=12, budget_ms=60_000))
            assert (r.reranked_candidates, r.budget_stop, r.reranked) == (0, "overloaded", False)
            _check_order(r, 0)
            # an unbudgeted Search is all or nothing, as before
            calls.clear()
            with pytest.raises(Overloaded):
                await p.search(SearchParams(query=QUERY, candidates=12, budget_ms=0))
        finally:
            await p.close()

    asyncio.run(run())


def test_chunk_planner(models_dir, tmp_path):
    p = Pipeline(settings_for(models_dir, tmp_path, batch={"warmup": False, "max_batch_tokens": 512,
                                                          "batch_sizes": (1, 2, 4, 8)}))
    try:
        assert p.reranker.batcher.seq_bucket(60) == 64  # dynamic shapes: padded to a multiple of 8
        plan = p.reranker.chunk_ends
        # no estimate: one pair; no time left: nothing
        assert plan([40] * 10, 0, 5.0, None) == 1
        assert plan([40] * 10, 3, 0.0, 1.0) == 3 and plan([40] * 10, 3, -1.0, None) == 3
        # rows are capped by the batch: 512 tokens hold 8 rows of 64, 4 of 128
        assert plan([60] * 20, 0, 1e9, 1e-9) == 8
        assert plan([60, 60, 120, 60, 60, 60], 0, 1e9, 1e-9) == 4  # the third pads the chunk to 120
        # time: at 1 ms per padded token, 40-token pairs (padded 40) cost 40 ms each
        assert plan([40] * 10, 0, 0.125, 1e-3) == 3
        assert plan([40] * 10, 8, 0.125, 1e-3) == 10  # the end of the list
        # a longer pair later raises the chunk's padded length for all of it
        assert plan([40, 40, 200], 0, 0.200, 1e-3) == 2
        # five 64-token pairs fit the time; a static-shape backend would run them as 4 + 1
        assert plan([60] * 20, 0, 5 * 64 * 1e-3 + 1e-6, 1e-3) == 5
        p.reranker.batcher.static = True
        assert p.reranker.batcher.seq_bucket(60) == 64  # the (32, 64, 128, ...) buckets
        assert plan([60] * 20, 0, 5 * 64 * 1e-3 + 1e-6, 1e-3) == 4
        assert plan([60] * 20, 0, 1e9, 1e-9) == 8
    finally:
        asyncio.run(p.close(save_snapshot=False))


def test_budget_through_grpc(models_dir, tmp_path):
    s = settings_for(models_dir, tmp_path, batch=BATCH, index={"data_dir": tmp_path, "search_budget_ms": 250})
    with EmbeddedServer(s) as srv, Client(srv.target, timeout=120) as c:
        c.upsert([{"id": d.id, "text": d.text} for d in DOCS])
        assert c.stats().search_budget_ms == 250  # the server's default, in Stats
        full = c.search(QUERY, candidates=12, top_n=12, budget_ms=0, raw=True)  # 0: no budget for this call
        assert full.reranked and full.reranked_candidates == 12
        first = c.search(QUERY, candidates=12, top_n=12, rerank=False, raw=True)
        assert first.reranked_candidates == 0 and not first.reranked
        # a budget of 1 ms on a real CPU: after the one-pair measurement, at most that pair;
        # the proto carries the count and the hits without a rerank score
        r = c.search(QUERY, candidates=12, top_n=12, budget_ms=1, raw=True)
        n = r.reranked_candidates
        assert n <= 1 and r.reranked == (n == 1)
        assert sum(h.HasField("rerank_score") for h in r.hits) == n
        assert [h.first_stage_rank for h in r.hits[n:]] == list(range(n + 1, 13))
        hits = c.search(QUERY, candidates=12, top_n=12, budget_ms=1)
        assert sum("rerank_score" in h for h in hits) <= 1
        assert_invalid(lambda: c.search(QUERY, budget_ms=3_600_001), "budget_ms")

        async def via_async():  # AsyncClient carries budget_ms and raw too
            from rerankd.client import AsyncClient

            async with AsyncClient(srv.target, timeout=120) as ac:
                return (await ac.score(QUERY, ["aspirin trial", "colon cancer risk"], budget_ms=60_000, raw=True),
                        await ac.score(QUERY, ["aspirin trial", "colon cancer risk"], budget_ms=1))

        whole, tiny = asyncio.run(via_async())
        assert whole.unscored_items == 0 and len(whole.scores) == 2
        assert sum(e["score"] == float("-inf") for e in tiny) >= 1  # 1 ms: at most one pair scored
        text = srv.app.metrics.registry.get_sample_value("rerankd_budgeted_searches_total", {"stop": "budget"})
        assert text is not None and text >= 1


@pytest.mark.parametrize("bad", [-1, 3_600_001])
def test_bad_server_budget_fails_at_start(models_dir, tmp_path, bad):
    with pytest.raises(ConfigError, match="search-budget-ms"):
        Pipeline(settings_for(models_dir, tmp_path, index={"data_dir": tmp_path, "search_budget_ms": bad}))

    assert Settings().index.search_budget_ms == 0  # off unless asked for


def test_a_full_rerank_lane_gives_a_budgeted_search_the_first_stage(models_dir, tmp_path):
    """--max-concurrent-search 1, held by a Score whose batch is parked in the model thread: an
    unbudgeted reranked Search is refused (RESOURCE_EXHAUSTED), a budgeted one answers from the
    first stage (reranked false, stop "shed")."""
    import threading

    import grpc

    s = settings_for(models_dir, tmp_path, batch=BATCH, server={"listen": "127.0.0.1:0", "max_concurrent_search": 1})
    with EmbeddedServer(s) as srv, Client(srv.target, timeout=120, retries=0) as c:
        c.upsert([{"id": d.id, "text": d.text} for d in DOCS])
        backend = srv.app.pipeline.reranker.backend
        real, running, release = backend.run, threading.Event(), threading.Event()

        def parked(*a):
            running.set()
            assert release.wait(60)
            return real(*a)

        backend.run = parked
        out: list = []
        t = threading.Thread(target=lambda: out.append(c.score(QUERY, ["aspirin trial", "colon cancer risk"])))
        t.start()
        try:
            assert running.wait(60)
            with pytest.raises(grpc.RpcError) as ei:
                c.search(QUERY, candidates=12)
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            r = c.search(QUERY, candidates=12, top_n=12, budget_ms=500, raw=True)
            assert not r.reranked and r.reranked_candidates == 0 and r.reranker_model == ""
            assert [h.first_stage_rank for h in r.hits] == list(range(1, 13))
            assert not any(h.HasField("rerank_score") for h in r.hits)
            # shed or not, a query over --max-query-tokens is refused (validation does not depend on load)
            assert_invalid(lambda: c.search("aspirin " * 300, candidates=12, budget_ms=500), "query")
            # ... in the same order as when admitted: the candidates are checked before the query's tokens
            assert_invalid(lambda: c.search("aspirin " * 300, candidates=0, budget_ms=500), "candidates")
            assert_invalid(lambda: c.score("aspirin " * 300, ["aspirin trial"], budget_ms=500), "query")
            # Score the same: unbudgeted refused, budgeted answered unscored in the order given
            with pytest.raises(grpc.RpcError) as ei:
                c.score(QUERY, ["aspirin trial", "colon cancer risk"])
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            r = c.score(QUERY, ["aspirin trial", "colon cancer risk", "aspirin"], budget_ms=500, raw=True)
            assert r.unscored_items == 3 and [e.index for e in r.scores] == [0, 1, 2]
            assert all(e.score == float("-inf") for e in r.scores) and [e.rank for e in r.scores] == [1, 2, 3]
        finally:
            release.set()
            t.join(60)
            backend.run = real
        assert len(out) == 1 and len(out[0]) == 2  # the Score that held the lane finished
        m = srv.app.metrics.registry.get_sample_value
        assert m("rerankd_budgeted_searches_total", {"stop": "shed"}) == 1
        assert m("rerankd_budgeted_scores_total", {"stop": "shed"}) == 1
        assert m("rerankd_budgeted_scored_items_count") == 1
        # the lane free again: the budgeted Search reranks, the budgeted Score scores
        assert c.search(QUERY, candidates=12, top_n=12, budget_ms=60_000, raw=True).reranked_candidates == 12
        r = c.score(QUERY, ["colon cancer risk", "aspirin trial"], budget_ms=60_000, raw=True)
        assert r.unscored_items == 0 and all(e.score > float("-inf") for e in r.scores)
        assert m("rerankd_budgeted_scores_total", {"stop": "done"}) == 1
        assert_invalid(lambda: c.score(QUERY, ["aspirin"], budget_ms=3_600_001), "budget_ms")


def test_budgeted_calls_move_no_admission_estimate_and_queue_wait_refusals_are_named():
    """A budgeted Search's latency is its budget's: _run(learn=False) leaves every admission
    estimate alone. refusal() is the one place admission decides (concurrency, queue wait); the
    Search handler sheds a budgeted call to the first stage on either."""
    import types

    from rerankd.server import RERANK_LANE, RetrievalServicer

    class Ctx:
        def invocation_metadata(self):
            return ()

        def time_remaining(self):
            return None

    async def ok(_p, _deadline):
        return "ok"

    app = types.SimpleNamespace(settings=Settings(), pipeline=types.SimpleNamespace(ready=True), draining=False,
                                load_error=None, metrics=types.SimpleNamespace(on_call=lambda *a, **k: None),
                                tracer=NOOP)
    sv = RetrievalServicer(app)
    assert asyncio.run(sv._run("Search", Ctx(), ok, lane=RERANK_LANE, size=None, learn=False)) == "ok"
    assert not sv._ewma and not sv._solo and not sv._sized
    asyncio.run(sv._run("Search", Ctx(), ok, lane=RERANK_LANE, size=50))
    assert RERANK_LANE in sv._ewma and RERANK_LANE in sv._solo and sv._sized
    # refusal(): None with room, "concurrency" at the limit, "queue_wait" with the ratio on
    assert sv.refusal(RERANK_LANE, 0.0) is None
    sv._inflight[RERANK_LANE] = Settings().server.max_concurrent_search
    assert sv.refusal(RERANK_LANE, 0.0)[0] == "concurrency"
    app.settings = Settings().replace(server={"max_queue_wait_ratio": 0.5, "max_concurrent_search": 4})
    sv._inflight[RERANK_LANE] = 1
    sv._solo[RERANK_LANE] = (1.0, 3)
    sv._starts[RERANK_LANE] = {1: 100.0}
    reason, err = sv.refusal(RERANK_LANE, 100.1)  # ~0.9 s left of the call in flight > 0.5 x 1 s
    assert reason == "queue_wait" and "estimated wait" in str(err)
    assert sv.refusal(RERANK_LANE, 100.8) is None  # 0.2 s left: admitted


class _Aborted(Exception):
    pass


class _Ctx:
    """A servicer context for calling RetrievalServicer handlers directly."""
    code = None

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return None

    def set_trailing_metadata(self, md):
        self.trailers = md

    async def abort(self, code, details):
        self.code, self.details = code, details
        raise _Aborted(details)


def _queue_wait_servicer(**pipeline):
    """A RetrievalServicer over a fake pipeline (``pipeline``: its methods) whose rerank lane has
    one call in flight with ~1 s to go and a queue-wait limit of 0.5 x one call: admission refuses
    the next rerank-lane call (reason queue_wait)."""
    import types

    from rerankd.server import RERANK_LANE, RetrievalServicer

    metrics = Metrics()
    app = types.SimpleNamespace(
        settings=Settings().replace(server={"max_queue_wait_ratio": 0.5, "max_concurrent_search": 4}),
        pipeline=types.SimpleNamespace(ready=True, **pipeline), draining=False, load_error=None, metrics=metrics,
        shed=lambda method, reason: metrics.rejected.labels(method, reason).inc(), tracer=NOOP)
    sv = RetrievalServicer(app)
    sv._inflight[RERANK_LANE] = 1
    sv._solo[RERANK_LANE] = (1.0, 3)
    sv._starts[RERANK_LANE] = {1: time.perf_counter()}  # a call in flight with ~1 s to go
    return sv, app, metrics


def test_search_handler_sheds_a_budgeted_call_on_a_queue_wait_refusal_and_learns_nothing():
    """Through RetrievalServicer.Search (a fake pipeline): with the queue-wait estimate over its
    limit, a budgeted Search runs first stage only (stop "shed") and moves no admission
    estimate; an unbudgeted one is refused with RESOURCE_EXHAUSTED, reason queue_wait."""
    import grpc

    from rerankd.pipeline import SearchResult, Timings
    from rerankd.server import RERANK_LANE
    from rerankd.v1 import rerankd_pb2 as pb

    seen, held = [], []

    async def search(params, deadline):
        seen.append(params.rerank)
        held.append(sorted(sv._budgets.values()))  # budgets in flight, as estimated_wait sees them
        return SearchResult([], Timings(), "e", "", "hybrid", False)

    import types

    sv, app, metrics = _queue_wait_servicer(search=search, reranker=types.SimpleNamespace(query_ids=lambda q: [1]))
    Ctx, Aborted = _Ctx, _Aborted
    before = (dict(sv._solo), dict(sv._sized), dict(sv._ewma))
    resp = asyncio.run(sv.Search(pb.SearchRequest(query="q", budget_ms=300), Ctx()))
    assert seen == [False] and not resp.reranked and resp.reranked_candidates == 0
    assert metrics.registry.get_sample_value("rerankd_budgeted_searches_total", {"stop": "shed"}) == 1
    # the rerank lane's estimates are untouched (the shed call ran, and may teach, in the first-stage lane)
    assert sv._solo[RERANK_LANE] == before[0][RERANK_LANE] and RERANK_LANE not in sv._ewma
    assert not any(k[0].startswith(RERANK_LANE) for k in sv._sized)
    ctx = Ctx()
    with pytest.raises(Aborted):
        asyncio.run(sv.Search(pb.SearchRequest(query="q"), ctx))
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "estimated wait" in ctx.details
    assert metrics.registry.get_sample_value("rerankd_rejected_calls_total", {"method": "Search", "reason": "queue_wait"}) == 1
    assert seen == [False]  # the refused call never ran
    # admitted (no queue-wait limit): a budgeted Search reranks and teaches admission nothing
    app.settings = Settings().replace(server={"max_concurrent_search": 4})
    sv._inflight[RERANK_LANE] = 0
    sv._solo.pop(RERANK_LANE)
    asyncio.run(sv.Search(pb.SearchRequest(query="q", budget_ms=300), Ctx()))
    assert seen == [False, None] and RERANK_LANE not in sv._solo and RERANK_LANE not in sv._ewma
    assert held == [[], [0.3]] and not sv._budgets  # in flight with its budget (the shed one: none), then released
    asyncio.run(sv.Search(pb.SearchRequest(query="q", budget_ms=0), Ctx()))  # unbudgeted: it does
    assert seen == [False, None, None] and RERANK_LANE in sv._solo and RERANK_LANE in sv._ewma
    # the server's default budget (--search-budget-ms; no budget_ms sent) is held in flight the same way
    app.settings = Settings().replace(server={"max_concurrent_search": 4}, index={"search_budget_ms": 250})
    asyncio.run(sv.Search(pb.SearchRequest(query="q"), Ctx()))
    assert held[-1] == [0.25] and not sv._budgets

    async def failing(params, deadline):
        held.append(sorted(sv._budgets.values()))
        raise InvalidArgument("query", "refused by the fake pipeline")

    from rerankd.errors import InvalidArgument

    app.pipeline.search = failing
    ctx = Ctx()
    with pytest.raises(Aborted):
        asyncio.run(sv.Search(pb.SearchRequest(query="q", budget_ms=400), ctx))
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
    assert held[-1] == [0.4] and not sv._budgets  # a failed call releases its budget too


def test_budgeted_score_scores_the_given_order_prefix(models_dir, tmp_path, monkeypatch):
    """Score with budget_ms: the caller's items are scored in the order given, a batch-sized
    chunk at a time within the budget; the scored ones come back best first, the rest after them
    in the order given with score -inf."""
    from rerankd.errors import InvalidArgument
    from rerankd.pipeline import Item

    items = [Item(d.id, d.text) for d in DOCS]
    inf = float("-inf")

    async def run() -> None:
        p = Pipeline(settings_for(models_dir, tmp_path, batch=BATCH))
        await p.start()
        try:
            whole = await p.score(QUERY, items)  # no budget: every item, best first
            assert (whole.unscored_items, whole.budget_stop) == (0, "")
            exact = {s.index: s.score for s in whole.items}
            clock = _rig(p, monkeypatch)
            # cold: one pair (t=1) measures the rate, then chunks of two (t=3), then one (t=4)
            r = await p.score(QUERY, items, budget_ms=4500)
            assert (r.unscored_items, r.budget_stop) == (8, "budget") and clock.t == 4.0
            head, tail = r.items[:4], r.items[4:]
            assert sorted(s.index for s in head) == [0, 1, 2, 3]
            assert [s.score for s in head] == sorted((s.score for s in head), reverse=True)
            assert all(s.score == pytest.approx(exact[s.index], abs=1e-4) for s in head)
            assert [s.index for s in tail] == list(range(4, 12)) and all(s.score == inf for s in tail)
            assert [s.item_id for s in tail] == [it.id for it in items[4:]]
            assert [s.rank for s in r.items] == list(range(1, 13))
            # top_n cuts the combined list: the four scored, then two unscored in the order given
            r = await p.score(QUERY, items, top_n=6, budget_ms=4500)
            assert [s.score == inf for s in r.items] == [False] * 4 + [True] * 2
            assert [s.index for s in r.items[4:]] == [4, 5]
            # a budget that covers every item: stop "done", the same order as unbudgeted
            r = await p.score(QUERY, items, budget_ms=60_000)
            assert (r.unscored_items, r.budget_stop) == (0, "done")
            assert [s.index for s in r.items] == [s.index for s in whole.items]
            # too small for a pair right after a batch ran: nothing scored, the order given
            r = await p.score(QUERY, items, budget_ms=500)
            assert (r.unscored_items, r.budget_stop) == (12, "budget")
            assert [s.index for s in r.items] == list(range(12)) and all(s.score == inf for s in r.items)
            # shed (rerank False): validated, nothing scored, no model work
            t0 = clock.t
            r = await p.score(QUERY, items, rerank=False)
            assert r.unscored_items == 12 and [s.index for s in r.items] == list(range(12)) and clock.t == t0
            # ... with the refusals of a scored call: validation does not depend on load
            with pytest.raises(InvalidArgument) as ei:
                await p.score(QUERY, [Item("a", "\u200b")], rerank=False)
            assert ei.value.field == "items[0].text"
            for q in ("\u200b", "aspirin " * 300):  # no tokens; over --max-query-tokens
                with pytest.raises(InvalidArgument) as ei:
                    await p.score(q, items, rerank=False)
                assert ei.value.field == "query"
            with pytest.raises(InvalidArgument) as ei:
                await p.score(QUERY, items, budget_ms=3_600_001)
            assert ei.value.field == "budget_ms"
        finally:
            await p.close()

    asyncio.run(run())


def test_score_handler_sheds_a_budgeted_call_on_a_queue_wait_refusal_and_learns_nothing():
    """Through RetrievalServicer.Score (a fake pipeline), as for Search: a budgeted Score that
    admission would refuse runs unscored (rerank False) outside the rerank lane; budgeted calls
    move no admission estimate, unbudgeted ones are refused or, admitted, teach it."""
    import grpc

    from rerankd.pipeline import ScoredItem, ScoreResult, Timings
    from rerankd.server import RERANK_LANE
    from rerankd.v1 import rerankd_pb2 as pb

    seen, held = [], []

    async def score(query, items, deadline, top_n, budget_ms=None, rerank=True, skip_cache=False):
        seen.append((budget_ms, rerank))
        held.append(sorted(sv._budgets.values()))  # budgets in flight, as estimated_wait sees them
        n = len(items) if rerank else 0
        return ScoreResult([ScoredItem(it.id, 1.0 if i < n else float("-inf"), i + 1, i) for i, it in enumerate(items)],
                           Timings(), len(items) - n, "done" if budget_ms and rerank else "")

    import types

    sv, app, metrics = _queue_wait_servicer(score=score, reranker=types.SimpleNamespace(name="ce"))
    req = pb.ScoreRequest(query="q", items=[pb.Item(id="a", text="t"), pb.Item(id="b", text="u")], budget_ms=300)
    before = dict(sv._solo)
    resp = asyncio.run(sv.Score(req, _Ctx()))
    assert seen == [(300, False)] and resp.unscored_items == 2 and [e.score for e in resp.scores] == [float("-inf")] * 2
    assert metrics.registry.get_sample_value("rerankd_budgeted_scores_total", {"stop": "shed"}) == 1
    assert sv._solo == before and not sv._ewma and not sv._sized  # learned nothing, in any lane
    ctx = _Ctx()
    with pytest.raises(_Aborted):
        asyncio.run(sv.Score(pb.ScoreRequest(query="q", items=req.items), ctx))
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "estimated wait" in ctx.details
    assert len(seen) == 1  # the refused call never ran
    # admitted: the budgeted call scores and teaches nothing; an unbudgeted one teaches
    app.settings = Settings().replace(server={"max_concurrent_search": 4})
    sv._inflight[RERANK_LANE] = 0
    sv._solo.pop(RERANK_LANE)
    resp = asyncio.run(sv.Score(req, _Ctx()))
    assert seen[-1] == (300, True) and resp.unscored_items == 0 and RERANK_LANE not in sv._solo
    assert held == [[], [0.3]] and not sv._budgets  # in flight with its budget (the shed one: none), then released
    assert metrics.registry.get_sample_value("rerankd_budgeted_scores_total", {"stop": "done"}) == 1
    asyncio.run(sv.Score(pb.ScoreRequest(query="q", items=req.items), _Ctx()))
    assert seen[-1] == (None, True) and RERANK_LANE in sv._solo and RERANK_LANE in sv._ewma
    assert metrics.registry.get_sample_value("rerankd_budgeted_scores_total", {"stop": "done"}) == 1  # unbudgeted: not counted
    # Never refused early on unbudgeted calls' latency: with slow 2-item Scores on record (5 s,
    # fresh), a 2-item call with 0.1 s left is refused unbudgeted and admitted budgeted.
    key = (f"{RERANK_LANE}/Score", 2 .bit_length())
    sv._sized[key], sv._fresh[key] = (5.0, 20), time.perf_counter()

    class Short(_Ctx):
        def time_remaining(self):
            return 0.1

    ctx = Short()
    with pytest.raises(_Aborted):
        asyncio.run(sv.Score(pb.ScoreRequest(query="q", items=req.items), ctx))
    assert ctx.code == grpc.StatusCode.DEADLINE_EXCEEDED and len(seen) == 3  # refused before it ran
    asyncio.run(sv.Score(req, Short()))
    assert len(seen) == 4 and seen[-1] == (300, True)


def test_calls_answered_from_the_score_cache_teach_admission_nothing():
    """A Search or Score whose every pair came from the score cache took a first stage's time:
    it moves neither the rerank lane's solo latency nor its EWMA, so a run of repeats cannot
    talk admission into a burst of misses; it does move the early deadline check's per-size
    estimate (else short-deadline repeats could be refused for good). A partly cached call
    teaches everything."""
    import types

    from rerankd.pipeline import ScoredItem, ScoreResult, SearchResult, Timings
    from rerankd.server import RERANK_LANE
    from rerankd.v1 import rerankd_pb2 as pb

    hits = {"cached": 0}

    async def search(params, deadline):
        return SearchResult([], Timings(), "e", "r", "hybrid", True, reranked_candidates=5, cache_hits=hits["cached"])

    async def score(query, items, deadline, top_n, budget_ms=None, rerank=True, skip_cache=False):
        scored = [ScoredItem(it.id, 1.0, i + 1, i) for i, it in enumerate(items)][:top_n]
        return ScoreResult(scored, Timings(), 0, cache_hits=hits["cached"])

    sv, app, metrics = _queue_wait_servicer(search=search, score=score, reranker=types.SimpleNamespace(name="r"))
    sv._inflight[RERANK_LANE] = 0
    sv._starts[RERANK_LANE] = {}
    snapshot = lambda: (dict(sv._solo), dict(sv._ewma))  # noqa: E731
    before = snapshot()
    items = [pb.Item(id=str(i), text="t") for i in range(4)]
    hits["cached"] = 5
    asyncio.run(sv.Search(pb.SearchRequest(query="q", candidates=5), _Ctx()))
    hits["cached"] = 4  # every item of the Score, though top_n returns one
    asyncio.run(sv.Score(pb.ScoreRequest(query="q", items=items, top_n=1), _Ctx()))
    assert snapshot() == before
    assert {k[0] for k in sv._sized} == {f"{RERANK_LANE}/Search", f"{RERANK_LANE}/Score"}  # the early check learned
    hits["cached"] = 3  # a Score partly cached: learned
    asyncio.run(sv.Score(pb.ScoreRequest(query="q", items=items, top_n=1), _Ctx()))
    assert snapshot() != before and sv._solo[RERANK_LANE][1] == 4
    hits["cached"] = 4  # a Search partly cached: learned
    asyncio.run(sv.Search(pb.SearchRequest(query="q", candidates=5), _Ctx()))
    assert sv._solo[RERANK_LANE][1] == 5
