"""Prometheus metrics (prometheus-client), served on a separate HTTP port (``--metrics-listen``).

One registry per server (tests run several in one process). Calls by method and status code,
latency histograms per RPC and per stage (embed, ANN, BM25, fusion, rerank, queue wait), batch
sizes, padding efficiency (real / padded tokens), queue depth, index documents, and the
process's memory / CPU / file descriptors.
"""

from __future__ import annotations

from typing import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily

# 50-200 ms (the Search budget) finely; 1.25 s is the reranked-Search p99 target of loadtest/README.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.25,
                   1.5, 2.0, 3.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds (Linux /proc): what
        # an operator (and loadtest/openloop.py --overload-test) watches for leaks under load.
        ProcessCollector(registry=r)
        self.calls = Counter("rerankd_calls", "RPC calls by method and status code", ["method", "code"], registry=r)
        self.call_seconds = Histogram(
            "rerankd_call_seconds",
            "RPC latency of the calls that ran (admitted; every status code), by method and whether it ran the "
            "cross-encoder (rerank=true: reranked Search, Score; false: first-stage-only Search and the rest)",
            ["method", "rerank"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("rerankd_stage_seconds", "Search/Score stage latency", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("rerankd_batch_size", "Sequences per model batch", ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("rerankd_batch_seconds", "Model time per batch", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("rerankd_batch_tokens", "Tokens run through the models (kind=real|padded)", ["model", "kind"], registry=r)
        self.padding_efficiency = Gauge("rerankd_padding_efficiency", "Real tokens / padded tokens since start", ["model"], registry=r)
        self.queue_depth = Gauge("rerankd_queue_depth", "Sequences waiting in a model's batcher", ["model"], registry=r)
        self.documents = Gauge("rerankd_index_documents", "Documents in the index", registry=r)
        self.bm25_failed_refreshes = Gauge(
            "rerankd_bm25_failed_refreshes",
            "BM25 refreshes failed in a row (0: up to date with the last write it saw). Above 0, BM25 legs read the "
            "last good index (documents written since are missing from them) while it retries with backoff",
            registry=r)
        self.bm25_applied_seq = Gauge(
            "rerankd_bm25_applied_sequence", "Store sequence the searchable BM25 index covers", registry=r)
        # Budgeted reranks (Search: its candidates; Score: the caller's items), per RPC:
        # (calls by how the scoring ended, histogram of how many each scored).
        self.budget = {rpc: (Counter(f"rerankd_budgeted_{plural}", doc, ["stop"], registry=r),
                             Histogram(f"rerankd_budgeted_{counted}", f"{what} a budgeted {rpc} call scored",
                                       buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r))
                       for rpc, plural, counted, what, doc in (
            ("Search", "searches", "reranked_candidates", "Candidates",
             "Reranked Searches with a latency budget, by how the rerank ended: done (every candidate), budget (the "
             "next batch would have ended past the budget), overloaded (a batch met a full queue), shed (admission "
             "would have refused the rerank: first stage only)"),
            ("Score", "scores", "scored_items", "Items",
             "Score calls with a latency budget, by how the scoring ended: done (every item), budget, overloaded, "
             "shed (admission would have refused it: no item scored), as rerankd_budgeted_searches"))}
        self.bm25_refresh_failures = _LiveCounter(
            "rerankd_bm25_refresh_failures",
            "BM25 refreshes that failed, since start (the gauge rerankd_bm25_failed_refreshes is the current run of "
            "failures and returns to 0 on success; this one shows failures that a retry then mended)")
        r.register(self.bm25_refresh_failures)
        self.rerank_cache = {
            outcome: _LiveCounter(f"rerankd_rerank_cache_{outcome}",
                                  f"Reranker score cache lookups that {'found' if outcome == 'hits' else 'missed'} a "
                                  "(query, passage) score, since start (hits / (hits + misses): the share of pairs "
                                  "the cache answered)")
            for outcome in ("hits", "misses")}
        self.rerank_cache["coalesced"] = _LiveCounter(
            "rerankd_rerank_cache_coalesced",
            "Missed pairs a call did not score itself, since start: another call was scoring them at the same time "
            "(the call waited for that score instead of running the pair again) or they repeated a pair earlier in "
            "the call (whatever its outcome). misses - coalesced: the pairs calls sent to the model themselves")
        for c in self.rerank_cache.values():
            r.register(c)
        self.rerank_cache_entries = Gauge(
            "rerankd_rerank_cache_entries", "Pairs held by the reranker score cache (at most --rerank-cache-entries)",
            registry=r)
        self.rejected = Counter(
            "rerankd_rejected_calls",
            "Calls refused before they ran, by reason: concurrency | queue_wait | deadline (admission), queue_full "
            "(a batcher queue at --max-queue), auth (bearer token)", ["method", "reason"], registry=r)
        self._http = None

    # hooks ---------------------------------------------------------------------------------------
    def on_call(self, method: str, code: grpc.StatusCode, seconds: float, *, ran: bool = True,
                rerank: bool = False) -> None:
        """Count every call; time the ones that ran, whatever their code -- only OK calls were
        timed, so an outage of timeouts left the latency panels empty (a review)."""
        self.calls.labels(method, code.name).inc()
        if ran:
            self.call_seconds.labels(method, "true" if rerank else "false").observe(seconds)

    def on_budget(self, stop: str, reranked: int, rpc: str = "Search") -> None:
        """A budgeted call's outcome: ``reranked`` candidates (Search) or items (Score) scored."""
        counter, hist = self.budget[rpc]
        counter.labels(stop).inc()
        hist.observe(reranked)

    def on_stages(self, timings) -> None:
        for stage in ("embed", "ann", "bm25", "fusion", "rerank", "queue"):
            us = getattr(timings, f"{stage}_us", 0)
            if us:
                self.stage_seconds.labels(stage).observe(us / 1e6)

    def on_batch(self, model: str, prepared, seconds: float) -> None:
        self.batch_size.labels(model).observe(len(prepared.items))
        self.batch_seconds.labels(model).observe(seconds)
        self.tokens.labels(model, "real").inc(prepared.real_tokens)
        self.tokens.labels(model, "padded").inc(int(prepared.input_ids.size))

    def bind(self, pipeline) -> None:
        """Gauges read live from the pipeline at scrape time."""
        for name, batcher in (("embedder", pipeline.embedder.batcher), ("reranker", pipeline.reranker.batcher)):
            self.queue_depth.labels(name).set_function(_getter(lambda b=batcher: b.queue_depth))
            self.padding_efficiency.labels(name).set_function(_getter(lambda b=batcher: b.stats.padding_efficiency))
        self.documents.set_function(_getter(lambda: len(pipeline.dense)))
        self.bm25_failed_refreshes.set_function(_getter(lambda: pipeline.bm25.failures))
        self.bm25_applied_seq.set_function(_getter(lambda: pipeline.bm25.applied_seq))
        self.bm25_refresh_failures.read = lambda: pipeline.bm25.refresh_failures_total
        self.rerank_cache["hits"].read = lambda: pipeline.reranker.cache.hits
        self.rerank_cache["misses"].read = lambda: pipeline.reranker.cache.misses
        self.rerank_cache["coalesced"].read = lambda: pipeline.reranker.cache.coalesced
        self.rerank_cache_entries.set_function(_getter(lambda: len(pipeline.reranker.cache)))

    def serve(self, listen: str) -> int:
        """Start the /metrics HTTP server on ``host:port``; returns the bound port."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        self._http, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        return int(self._http.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _LiveCounter:
    """A counter the pipeline keeps itself, read at scrape time (prometheus_client's Counter
    cannot read a value from elsewhere; a Gauge would lose the counter type that rate() and
    reset handling expect). Registered once; ``read`` is set when a pipeline is bound. Unbound,
    or when the read fails, the family has no sample: a counter has no NaN value to report."""

    def __init__(self, name: str, doc: str, read: Callable[[], float] | None = None) -> None:
        self.name, self.doc, self.read = name, doc, read

    def describe(self):
        return [CounterMetricFamily(self.name, self.doc)]

    def collect(self):
        c = CounterMetricFamily(self.name, self.doc)
        if self.read is not None:
            try:
                c.add_metric([], float(self.read()))
            except Exception:
                pass
        yield c


def _getter(fn: Callable[[], float]) -> Callable[[], float]:
    def get() -> float:
        try:
            return float(fn())
        except Exception:
            return float("nan")

    return get
