"""gRPC transport: maps proto <-> domain types and domain errors <-> status codes. Nothing else.

``create_server(settings)`` binds (port 0 allowed), starts serving at once with health
NOT_SERVING, then loads and warms the models in the background and flips health to SERVING.
``serve(settings)`` adds signal handling: SIGTERM/SIGINT -> NOT_SERVING, stop accepting, let
in-flight calls finish within the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import inspect
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

try:  # what a send on a call that already ended raises (grpc's Cython layer; private)
    from grpc._cython.cygrpc import ExecuteBatchError as _EXECUTE_BATCH_ERROR
except ImportError:  # pragma: no cover - another grpc build: no special case
    _EXECUTE_BATCH_ERROR = ()

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from . import errors, tracing
from .config import Settings, check_settings
from .metrics import Metrics
from .pipeline import Document, Item, Pipeline, SearchParams, Timings
from .v1 import rerankd_pb2 as pb
from .v1 import rerankd_pb2_grpc as pb_grpc
from .validation import resolve_search

log = logging.getLogger("rerankd.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Retrieval"].full_name
# Admission lane of a Search that reranks (held to --max-concurrent-search); a first-stage-only
# Search is the "Search" lane, held to --max-concurrent-calls like the other methods.
# The lane of every call that runs the cross-encoder: reranked Searches and Scores share one
# admission limit (--max-concurrent-search) and one latency estimate. Score had the generic
# 64-call limit: a review's Score flood queued 2,700 sequences (~45 s of reranking) ahead of a
# reranked Search, and a dozen big Scores took the RSS past the k8s example's memory limit.
RERANK_LANE = "reranking (Search with rerank, Score)"
SHED_LOG_S = 60.0
RICH_MAX_MESSAGE = 2048

# One mapping table, domain error -> gRPC status. Anything else is a bug -> INTERNAL (logged).
STATUS_FOR: dict[type[errors.RerankdError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.BackendError: grpc.StatusCode.INTERNAL,
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
}

_STAGE_TO_PB = {
    "dense": pb.FIRST_STAGE_DENSE,
    "bm25": pb.FIRST_STAGE_BM25,
    "hybrid": pb.FIRST_STAGE_HYBRID,
}
_PB_TO_STAGE = {v: k for k, v in _STAGE_TO_PB.items()}


def status_for(err: errors.RerankdError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in STATUS_FOR:
            return STATUS_FOR[cls]
    return grpc.StatusCode.INTERNAL


def _timings(t: Timings) -> pb.StageTimings:
    return pb.StageTimings(
        embed_us=t.embed_us, ann_us=t.ann_us, bm25_us=t.bm25_us, fusion_us=t.fusion_us,
        rerank_us=t.rerank_us, total_us=t.total_us, queue_us=t.queue_us,
    )


@dataclass
class App:
    """What ``create_server`` returns besides the server: state shared with the servicer."""

    settings: Settings
    health: health.aio.HealthServicer
    pipeline: Pipeline | None = None
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    load_error: BaseException | None = None
    draining: bool = False
    metrics: Metrics = field(default_factory=Metrics)
    metrics_port: int = 0
    tracer: trace.Tracer = tracing.NOOP  # --otlp-endpoint: the tracer provider's (see tracing.py)
    tracer_provider: object | None = None
    # Calls refused since the last summary line, by (method, reason): shedding is counted in
    # rerankd_rejected_calls_total and summed up in one WARNING line at most every SHED_LOG_S
    # (a review saw 158 RESOURCE_EXHAUSTED and 2 UNAUTHENTICATED calls leave no log line at all;
    # one line per call would flood the logs under overload instead).
    shed_counts: dict[tuple[str, str], int] = field(default_factory=dict)
    shed_logged_at: float = 0.0
    shed_timer: asyncio.TimerHandle | None = None
    cancelled_while_draining: int = 0  # calls the end of the grace period cut off (logged once)

    loader: asyncio.Task | None = None

    def shed(self, method: str, reason: str) -> None:
        """Count a refused call: in the metric at once, and in one WARNING line that sums up the
        refusals of up to SHED_LOG_S (written by the first refusal after a quiet minute, else by a
        timer when the minute is up, and at shutdown)."""
        self.metrics.rejected.labels(method, reason).inc()
        key = (method, reason)
        self.shed_counts[key] = self.shed_counts.get(key, 0) + 1
        wait = self.shed_logged_at + SHED_LOG_S - time.monotonic()
        if wait <= 0:
            self.flush_shed()
        elif self.shed_timer is None:
            try:
                self.shed_timer = asyncio.get_running_loop().call_later(wait, self.flush_shed)
            except RuntimeError:  # no loop (a unit test): the next refusal or shutdown writes it
                pass

    def flush_shed(self) -> None:
        if self.shed_timer is not None:
            self.shed_timer.cancel()
            self.shed_timer = None
        if not self.shed_counts:
            return
        now = time.monotonic()
        total = sum(self.shed_counts.values())
        what = ", ".join(f"{m}/{r}={n}" for (m, r), n in sorted(self.shed_counts.items()))
        since = "since start" if self.shed_logged_at == 0.0 else f"in the last {now - self.shed_logged_at:.0f} s"
        log.warning("refused %d calls %s (method/reason=count): %s", total, since, what)
        self.shed_counts.clear()
        self.shed_logged_at = now

    def start_loading(self) -> None:
        if self.loader is None:
            self.loader = asyncio.create_task(_load(self))

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.ready_event.wait(), timeout)
        if self.load_error is not None:
            raise self.load_error

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)


# The early deadline check lets a call it would refuse through as a probe when its estimate has
# had no news for this long (per lane and size).
PROBE_INTERVAL_S = 1.0


class RetrievalServicer(pb_grpc.RetrievalServicer):
    def __init__(self, app: App) -> None:
        self.app = app
        self._inflight: dict[str, int] = {}
        self._ewma: dict[str, tuple[float, int]] = {}  # lane -> (EWMA of OK latency, observations)
        # The early deadline check's estimates: per lane and method *and size class* (items,
        # documents, ids or candidates, by powers of two), so a 1-item call is never judged by
        # 512-item ones, nor a Score by reranked Searches (which add the first stage).
        self._sized: dict[tuple[str, int], tuple[float, int]] = {}
        # When each estimate last had news (a call of that lane and size succeeded, or one the
        # check would refuse went through to probe).
        self._fresh: dict[tuple[str, int], float] = {}
        # Latency-aware admission (reranked Searches): start times of the calls in flight, and the
        # EWMA latency of calls that ran with no other call of their lane in flight ("solo").
        self._starts: dict[str, dict[int, float]] = {}
        # Budgeted calls in flight (token -> budget in seconds): one ends by about its budget, so
        # the wait behind it is at most what is left of that, not the unbudgeted solo latency.
        self._budgets: dict[int, float] = {}
        self._solo: dict[str, tuple[float, int]] = {}
        self._seq = 0

    def estimated_wait(self, lane: str, now: float) -> float | None:
        """Seconds a call admitted now would wait for the calls already in flight in ``lane``:
        the sum of their typical solo latency (a budgeted call's: at most its budget) minus their
        elapsed time (None without history)."""
        est, n = self._solo.get(lane, (0.0, 0))
        if n < 3:
            return None
        return sum(max(0.0, min(est, self._budgets.get(tok, est)) - (now - t))
                   for tok, t in self._starts.get(lane, {}).items())

    def refusal(self, lane: str, now: float) -> tuple[str, errors.Overloaded] | None:
        """Why admission would refuse a call in ``lane`` now -- (reason, error) -- or None:
        the lane's concurrency limit, or (reranked calls, ``--max-queue-wait-ratio``) the
        estimated wait behind the calls in flight."""
        limit = self._limit(lane)
        if self._inflight.get(lane, 0) >= limit:
            est, _ = self._ewma.get(lane, (0.05, 0))
            return "concurrency", errors.Overloaded(f"{lane}: {limit} calls already in flight; retry later",
                                                    retry_after_s=max(est, 0.01))
        ratio = self.app.settings.server.max_queue_wait_ratio
        if lane == RERANK_LANE and ratio > 0 and self._inflight.get(lane, 0) > 0:
            wait = self.estimated_wait(lane, now)
            solo = self._solo.get(lane, (0.0, 0))[0]
            if wait is not None and wait > ratio * solo:
                return "queue_wait", errors.Overloaded(
                    f"{lane}: estimated wait {wait * 1e3:.0f} ms behind the calls in flight exceeds "
                    f"{ratio:g} x one call ({solo * 1e3:.0f} ms); retry later", retry_after_s=max(wait, 0.01))
        return None

    def _limit(self, lane: str) -> int:
        s = self.app.settings.server
        return s.max_concurrent_search if lane == RERANK_LANE else s.max_concurrent_calls

    def _too_short(self, kind: str, size: int | None, remaining: float, now: float | None = None) -> float | None:
        """The typical latency of ``kind``'s calls of this size when ``remaining`` cannot cover
        it, else None. ``kind`` is the method within its lane: Score and reranked Search share a
        lane (one concurrency limit) but not an estimate, since a Search adds its first stage.
        ``size`` None (a stream, Compact: no size known up front) is never refused.

        The estimate only moves when a call succeeds, and a refused call never does: after a slow
        spell, clients with a fixed short deadline would be refused for good although the server
        is fast again (found by a review). So when an estimate has had no news for a second, the
        next call it would refuse goes through as a probe: if it succeeds, its latency pulls the
        estimate down (one such call a second per lane and size, at most)."""
        if not self.app.settings.server.early_deadline_reject or size is None:
            return None
        key = (kind, size.bit_length())
        est, n = self._sized.get(key, (0.0, 0))
        # Only with enough history, and only for deadlines clearly below the typical latency.
        if n < 20 or remaining >= 0.5 * est:
            return None
        now = time.perf_counter() if now is None else now
        if now - self._fresh.get(key, now) >= PROBE_INTERVAL_S:
            self._fresh[key] = now
            return None
        return est

    def _observe(self, lane: str, kind: str, size: int | None, seconds: float, lane_wide: bool = True) -> None:
        if lane_wide:
            est, n = self._ewma.get(lane, (seconds, 0))
            self._ewma[lane] = (0.9 * est + 0.1 * seconds, n + 1)
        if size is not None:
            key = (kind, size.bit_length())
            est, n = self._sized.get(key, (seconds, 0))
            self._sized[key] = (0.9 * est + 0.1 * seconds, n + 1)
            self._fresh[key] = time.perf_counter()

    async def _run(self, method: str, context: grpc.aio.ServicerContext, fn, lane: str | None = None,
                   size: int | None = 1, learn: bool = True, budget_s: float | None = None, all_cached=None):
        """Admission, deadline, error mapping and logging around one call.

        ``lane`` groups calls that share a concurrency limit and a latency estimate (default: the
        method). A reranked Search costs ~100x a first-stage-only one, so they are separate lanes:
        the reranked one is held to --max-concurrent-search, and neither skews the other's EWMA
        (which the early deadline check reads). ``size`` is the call's amount of work (items,
        documents, ids, a Search's candidates with the default resolved): the early deadline check compares a
        call only with calls of its lane of about the same size (same power of two). None: no
        size known up front (a client stream, Compact), never refused early. ``learn`` False: the
        call's latency moves no estimate (a budgeted Search: its budget, not its work, sets it).
        ``budget_s``: the call's soft budget, if any; ``estimated_wait`` counts it in flight as
        lasting no longer. ``all_cached(result)``: whether the model scored none of the call's
        pairs (the score cache or another call in flight); such a call moves only the early
        deadline check's per-size estimate."""
        app = self.app
        lane = lane or method
        kind = f"{lane}/{method}"  # the early deadline check's estimate: per method within its lane
        md = context.invocation_metadata() or ()
        request_id = dict(md).get("x-request-id") or uuid.uuid4().hex[:16]
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        error = ""
        admitted = ran = False
        # The server span: a child of the caller's span when it sent a traceparent (tracing.py).
        span = app.tracer.start_span(f"{SERVICE_NAME}/{method}",
                                     context=tracing.caller_context(md) if app.tracer is not tracing.NOOP else None,
                                     kind=trace.SpanKind.SERVER,
                                     attributes={"rpc.system": "grpc", "rpc.service": SERVICE_NAME, "rpc.method": method,
                                                 "rerankd.request_id": request_id, "rerankd.lane": lane})
        span_token = otel_context.attach(trace.set_span_in_context(span))
        try:
            if app.pipeline is None or not app.pipeline.ready or app.draining:
                if app.draining:
                    raise errors.NotReady("draining")
                if app.load_error is not None:
                    raise errors.NotReady(f"models failed to load: {app.load_error}")
                raise errors.NotReady("models are loading and warming up; retry shortly")
            refusal = self.refusal(lane, t0)
            if refusal is not None:
                reason, err = refusal
                app.shed(method, reason)
                raise err
            solo_start = self._inflight.get(lane, 0) == 0
            self._inflight[lane] = self._inflight.get(lane, 0) + 1
            self._seq += 1
            token = self._seq
            self._starts.setdefault(lane, {})[token] = t0
            if budget_s:
                self._budgets[token] = budget_s
            admitted = True
            remaining = context.time_remaining()
            deadline = None
            if remaining is not None:
                if remaining <= 0:
                    raise errors.DeadlineExceeded("deadline already expired on arrival")
                typical = self._too_short(kind, size, remaining, t0)
                if typical is not None:
                    app.shed(method, "deadline")
                    raise errors.DeadlineExceeded(
                        f"deadline of {remaining * 1e3:.0f} ms cannot be met: {method} of this size takes "
                        f"~{typical * 1e3:.0f} ms now"
                    )
                deadline = asyncio.get_running_loop().time() + remaining
            ran = True
            result = await fn(app.pipeline, deadline)
            took = time.perf_counter() - t0
            # A call the model ran for none of (every pair from the score cache or another call
            # in flight) says nothing about the lane's cost: learning from it would let a mix
            # rich in repeats talk admission into a burst of misses it cannot serve. It still
            # teaches the early deadline check's per-size estimate, which otherwise could refuse
            # short-deadline repeats for good after a spell of misses (its probes never land).
            cached = all_cached is not None and all_cached(result)
            if learn:
                self._observe(lane, kind, size, took, lane_wide=not cached)
            if learn and not cached and solo_start and self._inflight.get(lane, 0) == 1:  # ran alone from start to end
                est, n = self._solo.get(lane, (took, 0))
                self._solo[lane] = (0.8 * est + 0.2 * took, n + 1)
            return result
        except errors.RerankdError as e:
            code = status_for(e)
            error = str(e)
            trailers = list(rich_details(e, code))
            if isinstance(e, errors.Overloaded):
                if ran:  # admitted, then refused by a full batcher queue (--max-queue)
                    app.shed(method, "queue_full")
                ms = str(int(e.retry_after_s * 1000))
                # retry-after-ms for our tools; grpc-retry-pushback-ms is what gRPC's own retry
                # policy (any language, service config retryPolicy) waits for before the next try.
                # A wait the call's deadline cannot cover gets a negative pushback ("do not
                # retry"): the caller sees this refusal now, not DEADLINE_EXCEEDED at its deadline.
                left = context.time_remaining()
                push = "-1" if left is not None and e.retry_after_s >= left else ms
                trailers += [("retry-after-ms", ms), ("grpc-retry-pushback-ms", push)]
            if trailers:
                context.set_trailing_metadata(tuple(trailers))
            if code == grpc.StatusCode.INTERNAL:
                log.error("request %s %s failed: %s", request_id, method, e)
            await abort(context, code, str(e))
        except asyncio.CancelledError:
            # grpc cancels the handler both when the client cancels and when its deadline passes:
            # count the latter as what the client saw (it was all CANCELLED, a review found).
            left = context.time_remaining()
            code = grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else grpc.StatusCode.CANCELLED
            if app.draining and code == grpc.StatusCode.CANCELLED:
                app.cancelled_while_draining += 1
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # a bug: log it with the request id, never crash the server
            code = grpc.StatusCode.INTERNAL
            error = type(e).__name__
            log.exception("request %s %s: unexpected error", request_id, method)
            await abort(context, code, f"internal error (request id {request_id}): {type(e).__name__}")
        finally:
            if admitted:
                self._inflight[lane] -= 1
                self._starts[lane].pop(token, None)
                self._budgets.pop(token, None)
            seconds = time.perf_counter() - t0
            log.debug("request_id=%s method=%s code=%s ms=%.1f", request_id, method, code.name, seconds * 1e3)
            app.metrics.on_call(method, code, seconds, ran=ran, rerank=lane == RERANK_LANE)
            if span.is_recording():
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code != grpc.StatusCode.OK:
                    span.set_status(Status(StatusCode.ERROR, f"{code.name}: {error}" if error else code.name))
            span.end()
            otel_context.detach(span_token)

    # -- RPCs --------------------------------------------------------------------------------------------
    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        shed = False

        async def fn(p: Pipeline, deadline):
            params = SearchParams(
                query=request.query,
                top_n=request.top_n if request.HasField("top_n") else None,
                candidates=request.candidates if request.HasField("candidates") else None,
                rerank=False if shed else request.rerank if request.HasField("rerank") else None,
                include_text=request.include_text,
                include_metadata=request.include_metadata,
                first_stage=_stage_name(request.first_stage),
                fusion_weight=request.fusion_weight if request.HasField("fusion_weight") else None,
                filter=tuple((m.key, tuple(m.values)) for m in request.filter),
                budget_ms=request.budget_ms if request.HasField("budget_ms") else None,
                check_rerank_query=shed,  # validation must not depend on load
                collapse_key=request.collapse_key,
                collapse_max=request.collapse_max if request.HasField("collapse_max") else None,
                diversity=request.diversity if request.HasField("diversity") else None,
                skip_cache=request.skip_cache,
            )
            r = await p.search(params, deadline)
            if shed:
                r.budget_stop = "shed"
            self.app.metrics.on_stages(r.timings)
            if r.budget_stop:
                self.app.metrics.on_budget(r.budget_stop, r.reranked_candidates)
            resp = pb.SearchResponse(
                hits=[
                    pb.Hit(id=h.id, score=h.score, rank=h.rank, first_stage_score=h.first_stage_score,
                           first_stage_rank=h.first_stage_rank, text=h.text, title=h.title, metadata=h.metadata,
                           rerank_score=h.rerank_score, dense_rank=h.dense_rank, bm25_rank=h.bm25_rank)
                    for h in r.hits
                ],
                timings=_timings(r.timings), embedder_model=r.embedder, reranker_model=r.reranker,
                first_stage=_STAGE_TO_PB[r.first_stage], reranked=r.reranked, bm25_stale=r.bm25_stale,
                reranked_candidates=r.reranked_candidates, collapsed=r.collapsed, cache_hits=r.cache_hits,
            )
            # Say which arguments to change, rather than let grpc fail the send after the fact.
            limit = self.app.settings.server.max_message_bytes
            if (size := resp.ByteSize()) > limit:
                raise errors.InvalidArgument(
                    "top_n", f"{len(resp.hits)} hits (include_text={request.include_text}, include_metadata="
                    f"{request.include_metadata}) make a {size}-byte response, over the {limit}-byte message limit: "
                    "ask for fewer hits or leave out text/metadata")
            return resp

        rerank = request.rerank if request.HasField("rerank") else True
        size = _admission_size(request, self.app.settings)
        budgeted = rerank and size is None
        if budgeted and self.refusal(RERANK_LANE, time.perf_counter()) is not None:
            # Admission would refuse it (the rerank lane is full, or its queue-wait estimate is
            # over): a budgeted Search asked for an answer in time, so it gets the first stage's
            # (in that lane, reranked=false, stop "shed") instead of RESOURCE_EXHAUSTED. No await
            # between this check and _run's own.
            shed = True
        budget_ms = request.budget_ms if request.HasField("budget_ms") else self.app.settings.index.search_budget_ms
        return await self._run("Search", context, fn, lane="Search" if shed or not rerank else RERANK_LANE,
                               size=size, learn=not budgeted or shed,
                               budget_s=budget_ms / 1e3 if budgeted and not shed else None,
                               all_cached=lambda r: 0 < r.reranked_candidates <= r.cache_hits)

    async def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        async def fn(p: Pipeline, deadline):
            items = [Item(it.id, it.text) for it in request.items]
            vecs, t = await p.encode(items, request.is_query, deadline)
            return pb.EncodeResponse(
                embeddings=[pb.Embedding(id=it.id, vector=v.tolist()) for it, v in zip(items, vecs)],
                dimension=p.dim, model=p.embedder.name, timings=_timings(t),
            )

        return await self._run("Encode", context, fn, size=len(request.items))

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        budgeted = request.budget_ms > 0  # unset reads 0: no budget (no server default for Score)
        shed = budgeted and self.refusal(RERANK_LANE, time.perf_counter()) is not None

        async def fn(p: Pipeline, deadline):
            r = await p.score(request.query, [Item(it.id, it.text) for it in request.items], deadline,
                              request.top_n if request.HasField("top_n") else None,
                              budget_ms=request.budget_ms if request.HasField("budget_ms") else None, rerank=not shed,
                              skip_cache=request.skip_cache)
            self.app.metrics.on_stages(r.timings)
            if budgeted:
                self.app.metrics.on_budget("shed" if shed else r.budget_stop, len(request.items) - r.unscored_items,
                                           rpc="Score")
            # `model` names the reranker even when nothing was scored (shed): a client pinning
            # the model must not fail because the server was busy.
            return pb.ScoreResponse(
                scores=[pb.ScoreEntry(item_id=s.item_id, score=s.score, rank=s.rank, index=s.index) for s in r.items],
                model=p.reranker.name, timings=_timings(r.timings), unscored_items=r.unscored_items,
                cache_hits=r.cache_hits,
            )

        # As a budgeted Search: a budgeted Score that admission would refuse answers unscored (in
        # the Score lane, not the rerank one) rather than RESOURCE_EXHAUSTED, no await between the
        # check and _run's own; its latency is its budget's, so it is never refused early on the
        # estimate of unbudgeted calls (size None) nor moves it (learn False).
        return await self._run("Score", context, fn, lane="Score" if shed else RERANK_LANE,
                               size=None if budgeted else len(request.items), learn=not budgeted,
                               budget_s=request.budget_ms / 1e3 if budgeted and not shed else None,
                               all_cached=lambda r: 0 < len(request.items) - r.unscored_items <= r.cache_hits)

    async def Upsert(self, request: pb.UpsertRequest, context) -> pb.UpsertResponse:
        async def fn(p: Pipeline, deadline):
            r = await p.upsert(_documents(request), deadline)
            return pb.UpsertResponse(upserted=r.upserted, replaced=r.replaced, sequence=r.sequence, timings=_timings(r.timings),
                                     unchanged=r.unchanged)

        return await self._run("Upsert", context, fn, size=len(request.documents))

    async def UpsertStream(self, request_iterator, context) -> pb.UpsertResponse:
        async def fn(p: Pipeline, deadline):
            upserted = replaced = unchanged = seq = 0
            t0 = time.perf_counter()
            n = 0
            requests = aiter(request_iterator)
            idle = self.app.settings.server.stream_idle_timeout_s

            def committed() -> str:
                return f"batches 0..{n - 1} with {upserted} documents were committed" if n else "nothing was committed"

            while True:
                try:
                    try:
                        request = await _next_batch(requests, idle)  # a malformed message raises InvalidArgument
                    except StopAsyncIteration:
                        break
                    except asyncio.TimeoutError:
                        raise errors.DeadlineExceeded(f"no batch for {idle:g} s (--stream-idle-timeout-s): stream ended") from None
                    r = await p.upsert(_documents(request), deadline)
                except errors.InvalidArgument as e:
                    # Earlier batches are committed; say exactly where the stream stopped.
                    raise errors.InvalidArgument(f"batch[{n}].{e.field}", f"{str(e).split(': ', 1)[-1]} ({committed()})") from e
                except errors.RerankdError as e:
                    # The idle timeout, overload, deadline, a backend or index failure: same status,
                    # plus where it stopped. A copy: a batcher hands one exception to every call in its batch.
                    at = n
                    if isinstance(e, errors.CommittedNotIndexed):  # this batch is durable too
                        upserted += len(request.documents)
                        n += 1
                    err = copy.copy(e)
                    err.args = (f"batch[{at}]: {e} (stream stopped there; {committed()})",)
                    raise err from e
                except Exception as e:  # e.g. SQLite failing the commit: still say what is durable
                    raise errors.BackendError(f"batch[{n}]: {e!r} (stream stopped there; {committed()})") from e
                upserted += r.upserted
                replaced += r.replaced
                unchanged += r.unchanged
                seq = r.sequence
                n += 1
            return pb.UpsertResponse(upserted=upserted, replaced=replaced, unchanged=unchanged, sequence=seq,
                                     timings=pb.StageTimings(total_us=int((time.perf_counter() - t0) * 1e6)))

        return await self._run("UpsertStream", context, fn, size=None)

    async def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteResponse:
        async def fn(p: Pipeline, deadline):
            r = await p.delete(list(request.ids))
            return pb.DeleteResponse(deleted=r.deleted, not_found=r.not_found, sequence=r.sequence)

        return await self._run("Delete", context, fn, size=len(request.ids))

    async def Get(self, request: pb.GetRequest, context) -> pb.GetResponse:
        async def fn(p: Pipeline, deadline):
            r = await p.get(list(request.ids))
            resp = pb.GetResponse(
                documents=[pb.Document(id=d.id, text=d.text, title=d.title, metadata=d.metadata) for d in r.documents],
                not_found=r.not_found, sequence=r.sequence,
            )
            limit = self.app.settings.server.max_message_bytes
            if (size := resp.ByteSize()) > limit:  # as Search: say what to change, not a failed send
                raise errors.InvalidArgument(
                    "ids", f"{len(resp.documents)} documents make a {size}-byte response, over the {limit}-byte "
                    "message limit: ask for fewer ids per call")
            return resp

        return await self._run("Get", context, fn, size=len(request.ids))

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        async def fn(p: Pipeline, deadline):
            return pb.StatsResponse(**await asyncio.to_thread(p.stats))

        return await self._run("Stats", context, fn)

    async def Compact(self, request: pb.CompactRequest, context) -> pb.CompactResponse:
        async def fn(p: Pipeline, deadline):
            info, seconds = await p.compact()
            return pb.CompactResponse(snapshot_sequence=info.sequence, documents=len(p.dense), seconds=seconds)

        return await self._run("Compact", context, fn, size=None)


def _stage_name(value: int) -> str | None:
    if value == pb.FIRST_STAGE_UNSPECIFIED:
        return None
    if value not in _PB_TO_STAGE:
        raise errors.InvalidArgument("first_stage", f"unknown enum value {value}")
    return _PB_TO_STAGE[value]


def _search_size(request: pb.SearchRequest, limits) -> int:
    """A Search's amount of work for the early deadline check: its candidates, the default
    resolved (so leaving it unset and asking for the default are one size); invalid values are
    left to the pipeline's validation."""
    try:
        return resolve_search(request.top_n if request.HasField("top_n") else None,
                              request.candidates if request.HasField("candidates") else None, limits)[1]
    except errors.InvalidArgument:
        return 0


def _admission_size(request: pb.SearchRequest, settings: Settings) -> int | None:
    """A Search's size for the early deadline check. None for a budgeted reranked Search: its
    latency is its budget's, not its candidates', so it is never refused on the estimate of
    unbudgeted ones, nor does it move that estimate."""
    rerank = request.rerank if request.HasField("rerank") else True
    budget = request.budget_ms if request.HasField("budget_ms") else settings.index.search_budget_ms
    return None if rerank and budget else _search_size(request, settings.limits)


def _documents(request: pb.UpsertRequest) -> list[Document]:
    return [Document(id=d.id, text=d.text, title=d.title, metadata=dict(d.metadata)) for d in request.documents]


def server_options(settings: Settings) -> list[tuple[str, int]]:
    s = settings.server
    opts = [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(s.min_client_ping_interval_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if s.max_connection_age_s > 0:
        opts += [("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                 ("grpc.max_connection_age_grace_ms", int(s.grace_period_s * 1000))]
    return opts


async def _next_batch(requests, idle_s: float):
    """The stream's next message, or ``asyncio.TimeoutError`` after ``idle_s`` without one."""
    if idle_s <= 0:
        return await anext(requests)
    if hasattr(asyncio, "timeout"):  # 3.11+: unlike wait_for, never swallows a cancellation
        async with asyncio.timeout(idle_s):
            return await anext(requests)
    return await asyncio.wait_for(anext(requests), idle_s)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """A request that does not parse (corrupt wire format, a string field that is not UTF-8) is
    the caller's error: INVALID_ARGUMENT, not grpc's UNKNOWN with a logged traceback -- for every
    service on the port (Retrieval, health, reflection).

    The handler gets raw bytes and parses them itself. In a Retrieval client stream, a malformed
    message raises ``InvalidArgument`` from the request iterator, so the servicer can say which
    message it was and what had been committed before it; in another service's stream the wrapper
    answers INVALID_ARGUMENT itself."""

    PREFIX = f"/{SERVICE_NAME}/"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        ours = details.method.startswith(self.PREFIX)
        parse = handler.request_deserializer
        kw = {"response_serializer": handler.response_serializer}

        async def requests(raw_iterator):
            async for raw in raw_iterator:
                try:
                    yield parse(raw)
                except DecodeError as e:
                    raise errors.InvalidArgument("request", _malformed(e)) from None

        async def invalid(context, err: errors.InvalidArgument) -> None:
            context.set_trailing_metadata(rich_details(err, grpc.StatusCode.INVALID_ARGUMENT))
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))

        async def parsed(raw, context):
            try:
                return parse(raw)
            except DecodeError as e:
                await invalid(context, errors.InvalidArgument("request", _malformed(e)))

        if not handler.request_streaming and not handler.response_streaming:
            async def unary_unary(raw, context):
                request = await parsed(raw, context)
                return await handler.unary_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        if handler.request_streaming and not handler.response_streaming:
            async def stream_unary(raw_iterator, context):
                if ours:  # the servicer reports which message failed and what was committed
                    return await handler.stream_unary(requests(raw_iterator), context)
                try:
                    return await handler.stream_unary(requests(raw_iterator), context)
                except errors.InvalidArgument as e:
                    await invalid(context, e)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        # Server streaming (health Watch, reflection): answer through context.write, whichever
        # style (async generator or reader-writer coroutine) the wrapped handler uses.
        async def forward(result, context):
            if inspect.isasyncgen(result):
                async for message in result:
                    await context.write(message)
            else:
                await result

        if not handler.request_streaming:
            async def unary_stream(raw, context):
                request = await parsed(raw, context)
                await forward(handler.unary_stream(request, context), context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)

        async def stream_stream(raw_iterator, context):
            try:
                await forward(handler.stream_stream(requests(raw_iterator), context), context)
            except errors.InvalidArgument as e:
                await invalid(context, e)

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


def rich_details(e: errors.RerankdError, code: grpc.StatusCode) -> tuple[tuple[str, bytes], ...]:
    """gRPC's rich error model (``grpc-status-details-bin``, a ``google.rpc.Status``): the field an
    INVALID_ARGUMENT is about as ``google.rpc.BadRequest`` (so clients need not parse the message),
    the retry hint of a RESOURCE_EXHAUSTED as ``google.rpc.RetryInfo``. The message and the plain
    trailers stay as they were; ``rerankd.client.error_details`` reads both kinds. A message over
    RICH_MAX_MESSAGE characters gets none: the details repeat it, and the trailers would pass
    gRPC's metadata limit (16 KiB), turning the refusal into a transport error."""
    if len(str(e)) > RICH_MAX_MESSAGE:
        return ()
    if isinstance(e, errors.InvalidArgument):
        detail = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=e.field, description=e.reason)])
    elif isinstance(e, errors.Overloaded):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(e.retry_after_s * 1000))
        detail = error_details_pb2.RetryInfo(retry_delay=delay)
    else:
        return ()
    packed = any_pb2.Any()
    packed.Pack(detail)
    status = status_pb2.Status(code=code.value[0], message=str(e), details=[packed])
    return (("grpc-status-details-bin", status.SerializeToString()),)


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """``context.abort``, except when the call has already ended: a client deadline or cancel that
    lands while the server answers makes grpc's send fail (ExecuteBatchError), which grpc logs as
    an ERROR with two tracebacks although the client already has its status. Such a call ends as
    cancelled instead (grpc logs that at debug)."""
    try:
        await context.abort(code, details)
    except grpc.aio.AbortError:
        raise
    except _EXECUTE_BATCH_ERROR:
        raise asyncio.CancelledError(f"call ended before its status ({code.name}) was sent") from None


def _malformed(e: DecodeError) -> str:
    # "Error parsing message with type 'rerankd.v1.SearchRequest': String field had bad UTF-8"
    what, _, why = str(e).partition(": ")
    name = what.rsplit(".", 1)[-1].strip("'") if "'" in what else "message"
    return f"malformed {name}: {why or what}"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call except health checks (the scheme
    name is case-insensitive, RFC 7235: ``bearer`` works too; the token is compared exactly)."""

    EXEMPT = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str, on_denied=None) -> None:
        self._expected = token.encode()
        self._on_denied = on_denied  # (method) -> None: App.shed, so refusals are counted and logged

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.EXEMPT):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(got, str):
            got = got.encode()
        scheme, _, token = got.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token, self._expected):
            return handler
        if self._on_denied is not None:  # a known method (handler is not None): bounded label values
            self._on_denied(details.method.rsplit("/", 1)[-1])
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def abort_unary(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        yield  # pragma: no cover - makes this an async generator

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(abort_unary, **kw)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    s = settings.server
    if not (s.tls_cert or s.tls_key):
        if s.tls_client_ca:
            raise errors.ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (s.tls_cert and s.tls_key):
        raise errors.ConfigError("TLS needs both --tls-cert and --tls-key")
    with open(s.tls_key, "rb") as f:
        key = f.read()
    with open(s.tls_cert, "rb") as f:
        cert = f.read()
    ca = None
    if s.tls_client_ca:
        with open(s.tls_client_ca, "rb") as f:
            ca = f.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


async def create_server(settings: Settings, *, load: bool = True,
                        span_processor=None) -> tuple[grpc.aio.Server, int, App]:
    """Bind and start; health NOT_SERVING until the models are loaded and warmed.

    ``span_processor``: an OpenTelemetry span processor to trace into instead of
    ``--otlp-endpoint`` (tests: an in-memory exporter).

    Returns (server, bound TCP port of the first TCP address or 0, app). ``await
    app.wait_ready()`` waits for SERVING (re-raises a load failure).
    """
    check_settings(settings)  # before binding: a bad flag is an error at once, not a failed model load
    provider = tracing.tracer_provider(settings, span_processor)  # the tracing extra missing: an error now too
    health_servicer = health.aio.HealthServicer()
    app = App(settings=settings, health=health_servicer, tracer_provider=provider,
              tracer=provider.get_tracer(tracing.INSTRUMENTATION) if provider is not None else tracing.NOOP)
    interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequestInterceptor()]
    if settings.server.auth_token:  # outermost: an unauthenticated call is refused before it is parsed
        interceptors.insert(0, BearerTokenInterceptor(settings.server.auth_token, lambda m: app.shed(m, "auth")))
    creds = server_credentials(settings)
    server = grpc.aio.server(options=server_options(settings), interceptors=interceptors)
    pb_grpc.add_RetrievalServicer_to_server(RetrievalServicer(app), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = 0
    for addr in [a.strip() for a in settings.server.listen.split(",") if a.strip()]:
        # TLS applies to TCP listeners; a Unix socket is local to the pod/host and stays plaintext.
        if creds is not None and not addr.startswith("unix:"):
            bound = server.add_secure_port(addr, creds)
        else:
            bound = server.add_insecure_port(addr)
        if not addr.startswith("unix:") and port == 0:
            port = bound
    await app.set_serving(False)
    if settings.server.metrics_listen:
        app.metrics_port = app.metrics.serve(settings.server.metrics_listen)
    await server.start()
    if load:
        app.start_loading()
    return server, port, app


async def _load(app: App) -> None:
    pipeline = None
    try:
        t0 = time.perf_counter()
        pipeline = await asyncio.to_thread(Pipeline, app.settings, app.metrics.on_batch)
        pipeline.tracer = app.tracer
        await pipeline.start()
        shapes = await asyncio.to_thread(pipeline.warmup)
        if app.draining:  # a signal came while warming up: never go SERVING
            raise asyncio.CancelledError
        pipeline.ready = True
        app.pipeline = pipeline
        app.metrics.bind(pipeline)
        await app.set_serving(True)
        log.info(
            "SERVING: embedder=%s reranker=%s backend=%s documents=%d index=%s, %d shapes warmed, %.1f s",
            pipeline.embedder.name, pipeline.reranker.name, pipeline.backend_name, pipeline.store.count(),
            pipeline.index_load, shapes, time.perf_counter() - t0,
        )
    except BaseException as e:
        app.load_error = e
        if isinstance(e, asyncio.CancelledError):
            log.info("start-up cancelled (signal): not serving")
        else:
            log.error("failed to load models: %s", e)
        if pipeline is not None and app.pipeline is not pipeline:
            # Built but never served (cancelled while starting or warming up): close it here, as
            # shutdown() only closes app.pipeline. Nothing was acknowledged through it. Shielded:
            # shutdown() cancels this task, and a close cut in half would leave the store open.
            closing = asyncio.ensure_future(pipeline.close(save_snapshot=False))
            while not closing.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(closing)
            if not closing.cancelled() and closing.exception() is not None:
                log.error("closing the half-started pipeline failed: %s", closing.exception())
    finally:
        app.ready_event.set()


async def shutdown(server: grpc.aio.Server, app: App, grace: float | None = None) -> None:
    """NOT_SERVING, stop accepting, finish in-flight calls within the grace period, close."""
    app.draining = True
    await app.set_serving(False)
    await server.stop(app.settings.server.grace_period_s if grace is None else grace)
    await asyncio.sleep(0)  # let the handlers the stop cancelled run their accounting
    app.flush_shed()
    if app.cancelled_while_draining:
        log.warning("shutdown: %d calls still running when the %.0f s grace period ended were cancelled",
                    app.cancelled_while_draining, app.settings.server.grace_period_s if grace is None else grace)
    loader = app.loader
    if loader is not None and not loader.done():
        loader.cancel()
        with contextlib.suppress(BaseException):
            await loader
    if app.pipeline is not None:
        await app.pipeline.close()
    app.metrics.close()
    if app.tracer_provider is not None:
        # Export what is buffered, for at most 5 s (a collector gone away must not hold the
        # shutdown), then shut the exporter down.
        if not await asyncio.to_thread(tracing.close, app.tracer_provider):
            log.warning("shutdown: spans not exported within %.0f s were dropped", tracing.CLOSE_TIMEOUT_S)


async def serve(settings: Settings, early_signal=None) -> int:
    """Run until SIGTERM/SIGINT. ``early_signal()`` says whether one arrived before the loop's
    handlers were installed (``rerankd serve`` catches them from its first line: as PID 1 in a
    container, a signal with no handler is dropped, and a pod deleted during the ~0.5 s of
    imports waited out its whole grace period, a review found)."""
    server, port, app = await create_server(settings)
    log.info("listening on %s (health NOT_SERVING until models are warm)", settings.server.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if early_signal is not None and early_signal():
        stop.set()
    waiter = asyncio.create_task(stop.wait())
    assert app.loader is not None
    await asyncio.wait({waiter, app.loader}, return_when=asyncio.FIRST_COMPLETED)
    if app.load_error is not None:
        await shutdown(server, app, grace=0)
        return 1
    await waiter
    log.info("signal received: NOT_SERVING, draining for up to %.0f s", settings.server.grace_period_s)
    await shutdown(server, app)
    log.info("stopped")
    return 0
