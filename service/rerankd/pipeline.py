"""The pipeline: composes the stages into Search / Encode / Score / Upsert / Delete.

Knows nothing about gRPC: takes and returns plain domain types and raises ``rerankd.errors``.
Model work goes through the batchers (model threads); index, BM25 and SQLite work runs in
worker threads so the event loop never blocks: a Search's index and store reads in the
pipeline's own search pool, writes, snapshots and the rest in asyncio's default pool, so
searches parked on the BM25 lock during a refresh never hold the threads a write needs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import snapshot, tracing
from .backends import create_for
from .bundle import ModelBundle
from .config import Settings, check_settings
from .errors import BackendError, CommittedNotIndexed, InvalidArgument, NotReady
from .stages.bm25 import BM25Index, RefreshAborted
from .stages.embedder import Embedder
from .stages.fusion import mmr, rerank_fusion, rrf
from .stages.metadata_filter import FilterView, MetadataIndex, matches
from .stages.reranker import Reranker, Scored, check_has_tokens
from .store import DocumentStore, NewDocument, join_title
from .validation import (
    check_budget,
    check_collapse,
    check_count,
    check_diversity,
    check_filter,
    check_first_stage,
    check_fusion_weight,
    check_ids,
    check_metadata,
    check_query,
    check_text,
    resolve_search,
)

log = logging.getLogger(__name__)
BM25_RETRY_NAP_S = 0.25  # how often the background BM25 task looks at its retry time and at shutdown


# -- domain types ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchParams:
    query: str
    top_n: int | None = None
    candidates: int | None = None
    rerank: bool | None = None
    include_text: bool = False
    include_metadata: bool = False
    first_stage: str | None = None
    fusion_weight: float | None = None
    # Metadata filter: ((key, (value, ...)), ...), AND across conditions, OR within one.
    filter: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Soft latency budget in ms from arrival (None: the server's --search-budget-ms; 0: none).
    budget_ms: int | None = None
    # Check the query as a reranked Search does (--max-query-tokens) even when rerank is False: a
    # budgeted Search shed to the first stage under load is validated as it would be admitted.
    check_rerank_query: bool = False
    # Field collapsing: at most collapse_max (None: 1) hits per value of metadata[collapse_key]; "" = off.
    collapse_key: str = ""
    collapse_max: int | None = None
    # Maximal marginal relevance over the candidates, 0 (None: off) to 1 (see stages.fusion.mmr).
    diversity: float | None = None
    # Score every candidate with the model, neither reading nor filling the reranker's score cache.
    skip_cache: bool = False


@dataclass
class Hit:
    id: str
    score: float
    rank: int
    first_stage_score: float
    first_stage_rank: int
    text: str | None = None
    title: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    rerank_score: float | None = None
    dense_rank: int = 0  # 1-based rank in the dense leg's list; 0: not in it, or the leg did not run
    bm25_rank: int = 0  # the same for the BM25 leg


@dataclass
class Timings:
    embed_us: int = 0
    ann_us: int = 0
    bm25_us: int = 0
    fusion_us: int = 0
    rerank_us: int = 0
    queue_us: int = 0
    total_us: int = 0


@dataclass
class SearchResult:
    hits: list[Hit]
    timings: Timings
    embedder: str
    reranker: str
    first_stage: str
    reranked: bool
    bm25_stale: bool = False  # the BM25 leg read the last good index while a failed refresh is retried
    reranked_candidates: int = 0  # candidates the cross-encoder scored (fewer than found when a budget cut it short)
    budget_stop: str = ""  # budgeted reranks: "done" | "budget" | "overloaded" ("shed": set by the server); "" without a budget
    collapsed: int = 0  # candidates left out by field collapsing (collapse_key)
    cache_hits: int = 0  # reranked candidates whose score came from the reranker's score cache


@dataclass(frozen=True)
class Item:
    id: str
    text: str


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float
    rank: int
    index: int = 0  # position in the request's items


@dataclass(frozen=True)
class ScoreResult:
    items: list[ScoredItem]  # best first; items a budget left unscored last, in the request's order, score -inf
    timings: Timings
    unscored_items: int  # items a budget left unscored (last, score -inf)
    budget_stop: str = ""  # budgeted calls: "done" | "budget" | "overloaded" ("shed": set by the server); "" without a budget
    cache_hits: int = 0  # scored items whose score came from the reranker's score cache


@dataclass(frozen=True)
class UpsertResult:
    upserted: int
    replaced: int
    sequence: int
    timings: Timings
    unchanged: int = 0  # of upserted: identical to the stored document, nothing written


@dataclass(frozen=True)
class DeleteResult:
    deleted: int
    not_found: list[str]
    sequence: int


@dataclass(frozen=True)
class GetResult:
    documents: list[Document]  # found, in request order
    not_found: list[str]  # in request order
    sequence: int  # the last change the read reflects


class _IndexesBehind(Exception):
    """A write was committed to the store but updating the in-memory indexes failed."""

    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.seq = seq


def _ranks(labels: list[int]) -> dict[int, int]:
    """label -> 1-based rank in a leg's list (a label listed twice keeps its best rank, as in rrf:
    the list is read backwards, so the best rank is written last). One dict build: ~20 us for
    1,000 labels, where a Python loop took ~150 us of every hybrid Search's fusion time."""
    return dict(zip(labels[::-1], range(len(labels), 0, -1)))


def _diversity_pool(ranked: list, rerank: bool, top_n: int) -> int:
    """How many of ``ranked`` (entries (candidate, score, rerank score or None), best first) MMR
    reorders: the reranked candidates (all of them unless a budget cut the rerank: the unreranked
    rest then stays after them, in first-stage order), or all candidates when rerank is off. A
    rerank asked for that scored nothing (shed under load, or a budget with no time for a batch)
    keeps that call cheap: the first-stage head only."""
    if not rerank:
        return len(ranked)
    reranked = sum(1 for r in ranked if r[2] is not None)
    if reranked:
        return reranked
    return min(len(ranked), max(SHED_DIVERSITY_POOL_PER_HIT * top_n, SHED_DIVERSITY_POOL_MIN))


def _collapse(ranked: list, group, most: int) -> tuple[list, int]:
    """Field collapsing over a ranked list, best first: keep an entry unless ``most`` better ones
    share its ``group(entry)``; None is no group (never collapsed). Returns (kept, left out)."""
    seen: dict[str, int] = {}
    kept = []
    for r in ranked:
        g = group(r)
        if g is not None:
            if seen.get(g, 0) >= most:
                continue
            seen[g] = seen.get(g, 0) + 1
        kept.append(r)
    return kept, len(ranked) - len(kept)


def _us(seconds: float) -> int:
    return int(seconds * 1e6)


def _dir_bytes(path: Path) -> int:
    """Total file size; files renamed away meanwhile (a snapshot's .tmp files) are skipped."""
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


# A budgeted Search plans its last rerank chunk to end this long before the call's gRPC deadline
# (what is left: ordering the hits, building and sending the response).
DEADLINE_MARGIN_S = 0.01
# Diversity on a Search whose rerank scored nothing (shed under load, or a budget with no time for
# a batch): MMR over the first max(4 x top_n, 50) candidates, not all k (up to 1,000 vector reads).
SHED_DIVERSITY_POOL_PER_HIT = 4
SHED_DIVERSITY_POOL_MIN = 50


class Pipeline:
    def __init__(self, settings: Settings, on_batch=None) -> None:
        """Blocking: loads the model bundles, opens the store, brings the indexes up to date."""
        self.settings = settings
        s = settings
        check_settings(s)
        self.clock = time.perf_counter  # budgeted Searches measure their budget with it (tests: a fake clock)
        self.tracer = tracing.NOOP  # the server sets its own when tracing is on (--otlp-endpoint)
        emb_bundle = ModelBundle.load(s.model.models_dir, s.model.embedder, "embed")
        rr_bundle = ModelBundle.load(s.model.models_dir, s.model.reranker, "rerank")
        # Each model gets the fastest variant that passed ITS gate (with `auto`): the embedder may
        # run int8 while the reranker, whose int8 drifted past the gate, runs bf16.
        emb_backend, emb_be, emb_prec = create_for(s, emb_bundle)
        rr_backend, rr_be, rr_prec = create_for(s, rr_bundle)
        self.backend_name = emb_be if emb_be == rr_be else f"embed={emb_be},rerank={rr_be}"
        self.precision = emb_prec if emb_prec == rr_prec else f"embed={emb_prec},rerank={rr_prec}"
        log.info("embedder %s:%s, reranker %s:%s", emb_be, emb_prec, rr_be, rr_prec)
        self.embedder = Embedder(emb_bundle, emb_backend, s.batch, on_batch=on_batch)
        self.reranker = Reranker(
            rr_bundle, rr_backend, s.batch,
            max_query_tokens=s.model.max_query_tokens, activation=s.model.score_activation, on_batch=on_batch,
            cache_entries=s.model.rerank_cache_entries,
        )
        if not self.reranker.trained:
            log.warning("reranker %r has an UNTRAINED head: its scores are meaningless", self.reranker.name)
        self.dim = self.embedder.dimension
        data = Path(s.index.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        self.store = DocumentStore(data / "documents.sqlite3")
        self._check_store_models(emb_bundle, rr_bundle)
        self.snapshot_dir = data / "hnsw"
        self.dense, self.snapshot_info, how = snapshot.load_or_rebuild(
            self.store, self.snapshot_dir, self.dim,
            m=s.index.hnsw_m, ef_construction=s.index.ef_construction, ef_search=s.index.ef_search,
        )
        self.index_load = how
        compact_now = self._needs_compaction()
        if compact_now:
            # Entries marked deleted outnumber the live ones: hnswlib leaves live elements
            # unreachable in such graphs (the exact match of a stored document is not found).
            log.info("HNSW graph has %d deleted entries for %d documents: rebuilding it before serving",
                     self.dense.deleted_count, len(self.dense))
            self.dense = snapshot.rebuild(self.store, self.dim, m=s.index.hnsw_m, ef_construction=s.index.ef_construction,
                                          ef_search=s.index.ef_search)
        self.bm25 = BM25Index(self.store)
        self.bm25.on_stale = self._bm25_stale
        self.bm25_dir = data / "bm25"
        t0 = time.perf_counter()
        why = self.bm25.load(self.bm25_dir, self.store.store_id, self.store.last_seq())
        if why is None:
            log.info("BM25 index loaded at seq %d (%.1f s); catching up from the store", self.bm25.applied_seq, time.perf_counter() - t0)
        elif why != "missing" or self.store.count():
            log.warning("BM25 index on disk unusable (%s): building it from the store", why)
        self._bm25_saved_seq = self.bm25.applied_seq if why is None else -1
        try:
            self.bm25.refresh()
        except Exception:
            if why is not None:  # nothing to serve BM25 from: the start fails
                raise
            # the saved index loaded: serve it (stale) and retry in the background from start()
            log.exception("BM25 catch-up after loading the saved index failed: serving the index as of seq %d "
                          "and retrying in the background", self.bm25.applied_seq)
        self.metadata_index = MetadataIndex()
        self.metadata_index.add(*self.store.metadata())
        self._write_lock: asyncio.Lock | None = None
        # Held (in the worker thread) around "commit to the store + apply to the in-memory
        # indexes", and by a snapshot while it reads the sequence it covers: so every change at
        # or below that sequence is in the graph being saved. An asyncio lock alone is not
        # enough: a cancelled call releases it while its worker thread is still applying.
        self._apply_lock = threading.RLock()
        self._snapshot_lock = threading.Lock()  # one snapshot save at a time (they share index.bin.tmp)
        self._bm25_save_lock = threading.Lock()  # one BM25 save at a time (they share state.npz.tmp)
        self._applied_seq = self.store.last_seq()
        # -1: no usable snapshot on disk (rebuilt at start) -> the next save is never skipped.
        self._snapshot_seq = self.snapshot_info.sequence if self.snapshot_info and not compact_now else -1
        self._snapshot_task: asyncio.Task | None = None
        self._compact_lock = threading.Lock()  # one graph rebuild at a time
        self._compact_task: asyncio.Task | None = None
        # A Search's first-stage legs, filter and store reads, with as many threads as asyncio's
        # default pool would give them (capacity not re-measured); see the module docstring.
        self._search_pool = ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4),
                                               thread_name_prefix="rerankd-search")
        # Compact calls: the one rebuilding, and the next one, which every call arriving during a
        # rebuild shares (it starts after all of them called; see compact()).
        self._compact_now: asyncio.Task | None = None
        self._compact_next: asyncio.Task | None = None
        self._repair_task: asyncio.Task | None = None
        # BM25 catches up in the background after each write, so the next Search does not pay
        # for tokenizing it (a profile: +23-35 ms on the Search after a 64-document Upsert; the
        # first Search after a bulk ingest paid for all of it). One refresh at a time; writes
        # made during one are picked up by the next.
        self._bm25_task: asyncio.Task | None = None
        self._bm25_pending = False
        self._repair_requested = 0  # bumped (under the apply lock) by each write the indexes missed
        self._indexes_behind = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.ready = False

    @property
    def changes_since_snapshot(self) -> int:
        """Changes a restart would replay on top of the snapshot on disk."""
        return self._applied_seq - max(self._snapshot_seq, 0)

    def _check_store_models(self, emb: ModelBundle, rr: ModelBundle) -> None:
        """Stored vectors belong to one embedder; cached token ids to one reranker tokenizer."""
        # The truncation length is part of what a vector means: an embedder re-exported with another
        # --max-length would mix vectors of differently cut documents in one index. It is kept under
        # its own key, so the "embedder" value stays what older versions read (a rollback works);
        # a store from before it was recorded is taken as indexed at the current length.
        emb_key = f"{emb.name}:{emb.manifest['source']['sha256']}"
        have = self.store.get_meta("embedder")
        if have is not None and have != emb_key and self.store.count() > 0:
            raise NotReady(
                f"data dir {self.settings.index.data_dir} was indexed with embedder {have!r}, "
                f"not {emb_key!r}: re-index into a fresh --data-dir"
            )
        have_len = self.store.get_meta("embedder_max_length")
        if have_len is not None and have_len != str(emb.max_length) and self.store.count() > 0:
            raise NotReady(
                f"data dir {self.settings.index.data_dir} was indexed with embedder {have!r} cutting documents at "
                f"{have_len} tokens, not {emb.max_length}: re-index into a fresh --data-dir"
            )
        self.store.set_meta("embedder", emb_key)
        self.store.set_meta("embedder_max_length", str(emb.max_length))
        tok_key = hashlib.sha256(rr.tokenizer_path.read_bytes()).hexdigest() + f":{rr.max_length}"
        if self.store.get_meta("reranker_tokenizer") != tok_key and self.store.count() > 0:
            log.info("reranker tokenizer changed: recomputing cached passage token ids")
            rows = self.store.iter_token_ids()
            ids = self.reranker.passage_ids([join_title(t, x) for _, t, x in rows])
            self.store.set_token_ids(zip((r[0] for r in rows), ids))
        self.store.set_meta("reranker_tokenizer", tok_key)

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        self._write_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        if self.bm25.failures:  # the catch-up at load failed: retry it in the background
            self._refresh_bm25_soon()
        await self.embedder.batcher.start()
        await self.reranker.batcher.start()
        # A rebuilt graph or a long replay: snapshot now so the next restart does not repeat it.
        every = self.settings.index.snapshot_every
        if every > 0 and (self.changes_since_snapshot >= every or (self._snapshot_seq < 0 and self._applied_seq > 0)):
            self._maybe_snapshot(force=True)

    def warmup(self) -> int:
        if not self.settings.batch.warmup:
            return 0
        return self.embedder.batcher.warmup() + self.reranker.batcher.warmup()

    async def close(self, save_snapshot: bool = True) -> None:
        self.ready = False
        self._closing = True
        self.bm25.close_refreshes()  # a BM25 refresh in progress (a retry's rebuild) stops at its next chunk
        await self.embedder.batcher.close()
        await self.reranker.batcher.close()
        for task in (self._compact_task, self._compact_now, self._compact_next, self._snapshot_task,
                     self._repair_task, self._bm25_task):
            if task is not None and not task.done():
                await asyncio.wait({task})
        if save_snapshot:
            try:
                # Skipped when nothing changed since the snapshot on disk; takes the apply lock, so
                # a write still running in a worker thread (its call cancelled at shutdown) is
                # either fully in the snapshot's sequence and graph or in neither.
                await asyncio.to_thread(self._save_snapshot)
            except Exception:
                log.exception("saving the HNSW snapshot at shutdown failed (it is rebuilt on start)")
        # the search pool first: a read of a cancelled Search still running there must not meet
        # a closed store
        await asyncio.to_thread(self._search_pool.shutdown, True, cancel_futures=True)
        await asyncio.to_thread(self._close_store)

    async def _searching(self, fn, *args):
        """``fn(*args)`` in the search pool (a Search's index and store reads)."""
        return await asyncio.get_running_loop().run_in_executor(self._search_pool, functools.partial(fn, *args))

    def _close_store(self) -> None:
        with self._apply_lock:  # never close the connection under a commit in progress
            self.store.close()

    @property
    def models(self) -> tuple[str, str]:
        return self.embedder.name, self.reranker.name

    # -- Search ---------------------------------------------------------------------------------------
    async def search(self, p: SearchParams, deadline: float | None = None) -> SearchResult:
        t_start = time.perf_counter()
        arrival = self.clock()
        limits = self.settings.limits
        check_query(p.query, limits)
        top_n, k = resolve_search(p.top_n, p.candidates, limits)
        stage = check_first_stage(p.first_stage or self.settings.index.first_stage)
        rerank = True if p.rerank is None else p.rerank
        # the server's own weight was validated at start; only a per-call one needs checking
        fusion_weight = (self.settings.index.rerank_fusion_weight if p.fusion_weight is None
                         else check_fusion_weight(p.fusion_weight))
        budget_ms = (self.settings.index.search_budget_ms if p.budget_ms is None
                     else check_budget(p.budget_ms))
        q_ids = self.reranker.query_ids(p.query) if rerank or p.check_rerank_query else None
        conditions = check_filter(p.filter, limits)
        collapse_max = check_collapse(p.collapse_key, p.collapse_max, limits)
        diversity = 0.0 if p.diversity is None else check_diversity(p.diversity)
        # None: no filter. Else the labels matching it, re-read by each leg at the moment it reads
        # its own index if a write changed the filter index since (see FilterView).
        allowed = await self._searching(FilterView, self.metadata_index, conditions) if conditions else None
        t = Timings()
        stale: list[bool] = []
        budget_stop = "done" if rerank and budget_ms else ""  # kept when there is no candidate to rerank
        cache_hits = 0

        async def dense_leg(depth: int) -> tuple[np.ndarray, np.ndarray]:
            t0 = time.perf_counter()
            with self.tracer.start_as_current_span("embed query") as span:
                vec, queued = await self.embedder.encode([p.query], is_query=True, deadline=deadline)
                tracing.set_attributes(span, {"rerankd.queue_ms": queued * 1e3})
            t1 = time.perf_counter()
            with self.tracer.start_as_current_span("ann", attributes={"rerankd.depth": depth,
                                                                       "rerankd.filtered": allowed is not None}):
                if allowed is None:
                    labels, scores = await self._searching(self.dense.search, vec[0], depth)
                else:
                    labels, scores = await self._searching(self.dense.search_within, vec[0], depth, allowed,
                                                             self._load_vectors, self.settings.index.filter_exact_max)
            t.embed_us, t.ann_us = _us(t1 - t0), _us(time.perf_counter() - t1)
            t.queue_us += _us(queued)
            return labels, scores

        async def bm25_leg(depth: int) -> tuple[np.ndarray, np.ndarray]:
            t0 = time.perf_counter()
            info: dict = {}
            with self.tracer.start_as_current_span("bm25", attributes={"rerankd.depth": depth}) as span:
                labels, scores = await self._searching(self.bm25.search, p.query, depth, allowed, info)
                tracing.set_attributes(span, {"rerankd.bm25_stale": bool(info.get("stale"))})
            stale.append(bool(info.get("stale")))
            t.bm25_us = _us(time.perf_counter() - t0)
            return labels, scores

        def pairs(leg: tuple[np.ndarray, np.ndarray]) -> list[tuple[int, float]]:
            return list(zip(leg[0][:k].tolist(), leg[1][:k].tolist()))

        dense_ranks: dict[int, int] = {}
        bm25_ranks: dict[int, int] = {}
        if allowed is not None and allowed.empty_at_start:
            first = []  # nothing matches the filter: no model work
        elif stage == "dense":
            first = pairs(await dense_leg(k))
            dense_ranks = _ranks([lb for lb, _ in first])
        elif stage == "bm25":
            first = pairs(await bm25_leg(k))
            bm25_ranks = _ranks([lb for lb, _ in first])
        else:
            depth = max(k, self.settings.index.hybrid_depth)
            d, b = await asyncio.gather(dense_leg(depth), bm25_leg(depth))
            t0 = time.perf_counter()
            with self.tracer.start_as_current_span("fusion", attributes={"rerankd.rrf_k": self.settings.index.rrf_k}):
                first = rrf([d[0], b[0]], k=self.settings.index.rrf_k, limit=k)
                dense_ranks, bm25_ranks = _ranks(d[0].tolist()), _ranks(b[0].tolist())
            t.fusion_us = _us(time.perf_counter() - t0)
        first = first[:k]

        with self.tracer.start_as_current_span("fetch documents", attributes={"rerankd.candidates": len(first)}):
            docs = await self._searching(self._fetch, [lb for lb, _ in first], conditions)
        cands = [(lb, s, r) for r, (lb, s) in enumerate(first, start=1) if lb in docs]  # drop deleted meanwhile

        if rerank and cands:
            t0 = time.perf_counter()
            with self.tracer.start_as_current_span("rerank", attributes=tracing.attributes(
                    {"rerankd.candidates": len(cands), "rerankd.budget_ms": budget_ms or None})) as rerank_span:
                passages = [docs[lb].token_ids for lb, _, _ in cands]
                if any(x is None for x in passages):
                    missing = [i for i, x in enumerate(passages) if x is None]
                    fresh = await self._searching(self.reranker.passage_ids, [docs[cands[i][0]].full_text for i in missing])
                    for i, ids in zip(missing, fresh):
                        passages[i] = ids
                texts = [docs[lb].full_text for lb, _, _ in cands]
                if budget_ms:
                    soft_end = self._soft_end(arrival, budget_ms, deadline)
                    b = await self.reranker.score_within(p.query, q_ids, passages, texts, soft_end, deadline, self.clock,
                                                         use_cache=not p.skip_cache)
                    budget_stop = b.stop
                else:
                    b = await self.reranker.score_passages(p.query, q_ids, passages, texts, deadline,
                                                           use_cache=not p.skip_cache)
                scores, queued, cache_hits = b.scores, b.queued, b.cache_hits
                tracing.set_attributes(rerank_span, {"rerankd.reranked": len(scores), "rerankd.queue_ms": queued * 1e3,
                                                     "rerankd.budget_stop": budget_stop or None,
                                                     "rerankd.cache_hits": cache_hits})
            t.rerank_us = _us(time.perf_counter() - t0)
            t.queue_us += _us(queued)
            m = len(scores)  # a budget may have cut the rerank to the first m candidates
            final = rerank_fusion(scores, [c[2] for c in cands[:m]], fusion_weight) if m else scores
            order = sorted(range(m), key=lambda i: (-float(final[i]), cands[i][2]))
            # the candidates a budget left unscored follow in first-stage order, with their own score
            ranked = [(cands[i], float(final[i]), float(scores[i])) for i in order] + [(c, float(c[1]), None) for c in cands[m:]]
        else:
            ranked = [(c, float(c[1]), None) for c in cands]
        reranked = sum(1 for r in ranked if r[2] is not None)
        collapsed = 0
        if collapse_max:
            ranked, collapsed = _collapse(ranked, lambda r: docs[r[0][0]].metadata.get(p.collapse_key), collapse_max)
        if diversity and ranked:
            # a shed Search (check_rerank_query: the server turned its rerank off under load) is
            # bounded like a rerank that scored nothing, not given every candidate
            pool_n = _diversity_pool(ranked, bool(rerank or p.check_rerank_query), top_n)
            with self.tracer.start_as_current_span("diversity", attributes={"rerankd.diversity": diversity,
                                                                            "rerankd.pool": pool_n}):
                ranked = await self._diversify(ranked, pool_n, diversity, top_n)

        hits = []
        for rank, ((lb, fs, fr), score, rr_score) in enumerate(ranked[:top_n], start=1):
            d = docs[lb]
            hits.append(Hit(
                id=d.id, score=score, rank=rank, first_stage_score=float(fs), first_stage_rank=fr,
                text=d.text if p.include_text else None, title=d.title if p.include_text else None,
                metadata=d.metadata if p.include_metadata else {}, rerank_score=rr_score,
                dense_rank=dense_ranks.get(lb, 0), bm25_rank=bm25_ranks.get(lb, 0),
            ))
        t.total_us = _us(time.perf_counter() - t_start)
        on = bool(rerank) and (reranked > 0 or not cands)  # off too when a budget left no time for one batch
        return SearchResult(hits, t, self.embedder.name, self.reranker.name if on else "", stage, on,
                            bm25_stale=any(stale), reranked_candidates=reranked, budget_stop=budget_stop,
                            collapsed=collapsed, cache_hits=cache_hits)

    async def _diversify(self, ranked: list, pool_n: int, diversity: float, top_n: int) -> list:
        """``ranked`` with its first ``pool_n`` entries reordered by MMR (their top_n picks first,
        then the rest of the pool in order); similarity is the cosine of the stored document
        embeddings (a document deleted meanwhile: similar to nothing)."""
        pool = ranked[:pool_n]
        labels = np.asarray([r[0][0] for r in pool], dtype=np.int64)
        found, vecs = await self._searching(self._load_vectors, labels)
        row = {int(lb): i for i, lb in enumerate(found)}
        v = np.zeros((len(pool), self.dim), dtype=np.float32)
        for i, lb in enumerate(labels.tolist()):
            if lb in row:
                v[i] = vecs[row[lb]]
        pick = await self._searching(mmr, [r[1] for r in pool], v, diversity, min(top_n, len(pool)))
        picked = set(pick)
        return [pool[i] for i in pick] + [r for i, r in enumerate(pool) if i not in picked] + ranked[pool_n:]

    def _soft_end(self, arrival: float, budget_ms: int, deadline: float | None) -> float:
        """The ``self.clock()`` time a budgeted rerank plans to end by: ``budget_ms`` after
        ``arrival``, capped by the gRPC deadline less ``DEADLINE_MARGIN_S`` (a chunk past the
        deadline would lose the prefix scored so far)."""
        soft_end = arrival + budget_ms / 1e3
        if deadline is not None:
            left = deadline - asyncio.get_running_loop().time() - DEADLINE_MARGIN_S
            soft_end = min(soft_end, self.clock() + left)
        return soft_end

    def _fetch(self, labels: list[int], conditions) -> dict:
        """Candidates' stored rows (deleted ones absent); with a filter, also re-checked against
        the stored metadata itself -- a guard on the filter index, in this worker thread."""
        docs = self.store.fetch(labels)
        if conditions:
            docs = {lb: d for lb, d in docs.items() if matches(d.metadata, conditions)}
        return docs

    def _load_vectors(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.store.vectors_for(labels, self.dim)

    # -- Encode / Score -------------------------------------------------------------------------------
    async def encode(self, items: list[Item], is_query: bool, deadline: float | None = None) -> tuple[np.ndarray, Timings]:
        limits = self.settings.limits
        check_count(len(items), limits, "items")
        check_ids([it.id for it in items], limits, "items", required=False)
        for i, it in enumerate(items):
            check_text(it.text, limits, f"items[{i}].text")
        t0 = time.perf_counter()
        with self.tracer.start_as_current_span("embed", attributes={"rerankd.items": len(items)}) as span:
            vecs, queued = await self.embedder.encode([it.text for it in items], is_query=is_query, deadline=deadline)
            tracing.set_attributes(span, {"rerankd.queue_ms": queued * 1e3})
        return vecs, Timings(embed_us=_us(time.perf_counter() - t0), queue_us=_us(queued), total_us=_us(time.perf_counter() - t0))

    async def score(self, query: str, items: list[Item], deadline: float | None = None,
                    top_n: int | None = None, budget_ms: int | None = None, rerank: bool = True,
                    skip_cache: bool = False) -> ScoreResult:
        """Rerank the caller's items, best first (``top_n``: only the best n). Ids are the
        caller's: empty or repeated ones are allowed, each entry also carries its index.

        ``budget_ms`` (None or 0: none): score a prefix of the items, in the order given, within a
        soft budget from arrival (``Reranker.score_within``, as a budgeted Search's candidates);
        the unscored rest follow the scored items in the order given, with score -inf.
        ``rerank`` False: validate, score nothing and return the items in the order given (a
        budgeted call admission would refuse: the server sheds it to this). ``skip_cache``: score
        every item with the model, neither reading nor filling the reranker's score cache."""
        arrival = self.clock()
        limits = self.settings.limits
        check_query(query, limits)
        check_count(len(items), limits, "items")
        if top_n is not None and top_n < 1:
            raise InvalidArgument("top_n", f"must be at least 1, got {top_n}")
        budget_ms = check_budget(budget_ms) if budget_ms is not None else 0
        check_ids([it.id for it in items], limits, "items", required=False, unique=False)
        for i, it in enumerate(items):
            check_text(it.text, limits, f"items[{i}].text")
        q_ids = self.reranker.query_ids(query)  # refuses a query over --max-query-tokens, shed or not
        t0 = time.perf_counter()
        texts = [it.text for it in items]
        with self.tracer.start_as_current_span("rerank", attributes=tracing.attributes(
                {"rerankd.items": len(items), "rerankd.budget_ms": budget_ms or None})) as span:
            if not rerank:
                # The same refusals as a scored call (validation must not depend on load), at the cost
                # of tokenizing the items (~5 ms for 50 abstracts; 0.45 s for 512 items of 30 KB).
                await asyncio.to_thread(self.reranker.passages_with_tokens, texts, "items")
                b = Scored(np.zeros((0,), dtype=np.float32), 0.0, "")
            elif budget_ms:
                passages = await asyncio.to_thread(self.reranker.passages_with_tokens, texts, "items")
                b = await self.reranker.score_within(query, q_ids, passages, texts,
                                                     self._soft_end(arrival, budget_ms, deadline), deadline, self.clock,
                                                     use_cache=not skip_cache)
            else:
                b = await self.reranker.score_texts(query, texts, deadline, q_ids=q_ids, use_cache=not skip_cache)
                b.stop = ""
            scores, queued, stop = b.scores, b.queued, b.stop
            tracing.set_attributes(span, {"rerankd.reranked": len(scores), "rerankd.queue_ms": queued * 1e3,
                                          "rerankd.budget_stop": stop or None, "rerankd.cache_hits": b.cache_hits})
        m = len(scores)  # a budget may have cut the scoring to the first m items
        order = sorted(range(m), key=lambda i: (-float(scores[i]), i)) + list(range(m, len(items)))
        out = [ScoredItem(items[i].id, float(scores[i]) if i < m else float("-inf"), r, i)
               for r, i in enumerate(order[:top_n], start=1)]
        el = _us(time.perf_counter() - t0)
        return ScoreResult(out, Timings(rerank_us=el, queue_us=_us(queued), total_us=el), len(items) - m, stop,
                           cache_hits=b.cache_hits)

    # -- writes ----------------------------------------------------------------------------------------
    def validate_documents(self, docs: list[Document], field_name: str = "documents") -> None:
        limits = self.settings.limits
        check_count(len(docs), limits, field_name)
        check_ids([d.id for d in docs], limits, field_name)
        for i, d in enumerate(docs):
            check_metadata(d.metadata, limits, f"{field_name}[{i}].metadata")
            if d.title.strip() and not d.text.strip():
                # Abstract-less corpus entries: the title alone is the indexed text.
                check_text(d.title, limits, f"{field_name}[{i}].title")
                continue
            check_text(d.text, limits, f"{field_name}[{i}].text")
            if len(d.title.encode("utf-8", errors="surrogatepass")) > limits.max_text_bytes:
                raise InvalidArgument(f"{field_name}[{i}].title", f"exceeds the limit of {limits.max_text_bytes} bytes")

    async def upsert(self, docs: list[Document], deadline: float | None = None) -> UpsertResult:
        self.validate_documents(docs)
        start = time.perf_counter()
        # A document identical to its stored version (a nightly full re-sync) is not embedded or
        # written again: it cost an embedding and left a deleted entry in the graph per round (a
        # review). Read under the apply lock (a write's commit and index update are one step for
        # it, even when the write's call was cancelled meanwhile): read between another Upsert's
        # commit and its index update, "unchanged" acknowledged a document the dense leg could
        # not find yet (the diff review). Not the asyncio write lock: a Compact holds that for its
        # whole rebuild. Not while the indexes are being rebuilt after a failed update: then the
        # write goes through.
        same, seq, behind = await asyncio.to_thread(self._unchanged, docs)
        if same and not behind:
            positions = [i for i, d in enumerate(docs) if d.id not in same]
            if not positions:
                return UpsertResult(len(docs), 0, seq, Timings(total_us=_us(time.perf_counter() - start)),
                                    unchanged=len(docs))
            r = await self._upsert([docs[i] for i in positions], deadline, start, positions)
            return dataclasses.replace(r, upserted=len(docs), unchanged=len(same))
        return await self._upsert(docs, deadline, start)

    def _unchanged(self, docs: list[Document]) -> tuple[set[str], int, bool]:
        with self._apply_lock:  # a write's commit and index update are one step for this read
            return (self.store.unchanged([(d.id, d.title, d.text, dict(d.metadata)) for d in docs]),
                    self.store.last_seq(), self._indexes_behind)

    async def _upsert(self, docs: list[Document], deadline: float | None, start: float,
                      positions: list[int] | None = None) -> UpsertResult:
        """``positions``: each document's index in the request (errors name ``documents[i]``)."""
        texts = [join_title(d.title, d.text) for d in docs]
        token_ids = await asyncio.to_thread(self.reranker.passage_ids, texts)
        # before the embedder's work; a title-only document's tokens are its title's
        check_has_tokens(token_ids, [f"documents[{i}].{'text' if d.text.strip() else 'title'}"
                                     for i, d in zip(positions or range(len(docs)), docs)])
        t0 = time.perf_counter()
        with self.tracer.start_as_current_span("embed documents", attributes={"rerankd.documents": len(docs)}) as span:
            vecs, queued = await self.embedder.encode(texts, is_query=False, deadline=deadline)
            tracing.set_attributes(span, {"rerankd.queue_ms": queued * 1e3})
        t1 = time.perf_counter()
        rows = [NewDocument(d.id, d.text, d.title, dict(d.metadata), v, tok) for d, v, tok in zip(docs, vecs, token_ids)]
        assert self._write_lock is not None
        with self.tracer.start_as_current_span("write"):
            async with self._write_lock:
                # Durable commit, then the in-memory indexes; the lock keeps both in one order.
                labels, replaced, seq = await self._apply(self._apply_upsert, rows, vecs)
        self._refresh_bm25_soon()
        self._maybe_snapshot()
        if replaced:
            self._maybe_compact()  # a replaced document leaves its old entry marked deleted, as a Delete does
        return UpsertResult(len(docs), replaced, seq, Timings(embed_us=_us(t1 - t0), queue_us=_us(queued), total_us=_us(time.perf_counter() - start)))

    async def _apply(self, fn, *args):
        """Run a write's commit-and-apply in a worker thread. Should the in-memory update fail
        after the commit (e.g. out of memory growing the graph), the write is durable but the
        indexes miss it: the worker itself requests a rebuild from the store (``_indexes_behind``,
        also when this call was cancelled meanwhile), and the caller gets an error that says so."""
        try:
            return await asyncio.to_thread(fn, *args)
        except _IndexesBehind as e:
            raise CommittedNotIndexed(
                f"the write was committed (sequence {e.seq}) but updating the in-memory indexes failed "
                f"({e.__cause__!r}); they are being rebuilt from the store. Retrying is safe (a retried Delete "
                f"reports the ids it already deleted as not_found)") from None

    def _indexes_fell_behind(self, seq: int, cause: BaseException) -> None:
        """Worker thread, under the apply lock: a committed write is missing from the indexes."""
        self._repair_requested += 1
        self._indexes_behind = True  # no snapshot of the graph until it is repaired
        log.error("write committed at seq %d but the in-memory indexes failed to update: %r; rebuilding them "
                  "from the store", seq, cause)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._schedule_repair)

    def _schedule_repair(self) -> None:
        if self._repair_task is None or self._repair_task.done():
            self._repair_task = asyncio.get_running_loop().create_task(self._background_repair())

    async def _background_repair(self) -> None:
        """Rebuild until a pass completes with no new failure requested during it; a failing pass
        (memory still short) is retried with backoff until the server closes."""
        delay = 1.0
        while not self._closing:
            target = self._repair_requested
            try:
                await asyncio.to_thread(self._repair_indexes, target)
            except Exception:
                log.exception("rebuilding the in-memory indexes failed; retrying in %.0f s", delay)
                for _ in range(int(delay / 0.25)):  # a shutdown does not wait for the backoff
                    if self._closing:
                        return
                    await asyncio.sleep(0.25)
                delay = min(delay * 2, 30.0)
                continue
            if not self._indexes_behind:
                log.info("in-memory indexes rebuilt from the store")
                await self._snapshot_rebuilt_graph("the index rebuild")
                if not self._indexes_behind:  # else a write failed meanwhile (its request found this task running)
                    return

    def _repair_indexes(self, target: int) -> None:
        self._rebuild_dense()  # the graph from the stored vectors, with the writes made meanwhile
        with self._apply_lock:
            self.metadata_index.reset(*self.store.metadata())  # in place: searches' views re-read
            self.bm25.mark_dirty()
            if self._repair_requested == target:  # no write failed since this pass began
                self._indexes_behind = False

    def _apply_upsert(self, rows: list[NewDocument], vecs: np.ndarray) -> tuple[list[int], int, int]:
        with self._apply_lock:
            labels, replaced, seq, retired = self.store.upsert(rows)
            self._applied_seq = max(self._applied_seq, seq)
            try:
                self.bm25.mark_dirty(retired, seq)  # first: BM25 catches up even if the graph update fails
                # The filter index gets new labels before the graph and loses retired ones after
                # it: a filtered search reads it under the graph's lock, so it never misses the
                # live version of a matching document (stale labels it still holds are not live).
                self.metadata_index.add(labels, [r.metadata for r in rows])
                # New labels in, replaced ones out, under one index lock: a concurrent search sees
                # the old or the new version (the retired row is gone from the store already).
                self.dense.replace(np.asarray(labels, dtype=np.int64), vecs, retired)
                self.metadata_index.remove(retired)
            except Exception as e:
                self._indexes_fell_behind(seq, e)
                raise _IndexesBehind(seq) from e
        return labels, replaced, seq

    async def delete(self, ids: list[str]) -> DeleteResult:
        limits = self.settings.limits
        check_count(len(ids), limits, "ids")
        check_ids(ids, limits, "ids")
        assert self._write_lock is not None
        async with self._write_lock:
            labels, missing, seq = await self._apply(self._apply_delete, ids)
        if labels:
            self._refresh_bm25_soon()
        self._maybe_snapshot()
        self._maybe_compact()
        return DeleteResult(len(labels), missing, seq)

    def _apply_delete(self, ids: list[str]) -> tuple[list[int], list[str], int]:
        with self._apply_lock:
            labels, missing, seq = self.store.delete(ids)
            if labels:
                self._applied_seq = max(self._applied_seq, seq)
            try:
                if labels:
                    self.bm25.mark_dirty(labels, seq)  # first: BM25 catches up even if the graph update fails
                self.dense.delete(labels)
                self.metadata_index.remove(labels)
            except Exception as e:
                self._indexes_fell_behind(seq, e)
                raise _IndexesBehind(seq) from e
        return labels, missing, seq

    async def get(self, ids: list[str]) -> GetResult:
        """Stored documents by id, in request order, read at one point in time (a store read in
        the search pool: Get never waits for a write in progress)."""
        limits = self.settings.limits
        check_count(len(ids), limits, "ids")
        check_ids(ids, limits, "ids")
        found, seq = await self._searching(self.store.get, ids)
        docs = [Document(id=d.id, text=d.text, title=d.title, metadata=d.metadata)
                for d in (found.get(i) for i in ids) if d is not None]
        return GetResult(docs, [i for i in ids if i not in found], seq)

    # -- operations ------------------------------------------------------------------------------------
    def _save_snapshot(self, force: bool = False, bm25: bool = True) -> snapshot.SnapshotInfo | None:
        """Write the HNSW snapshot, then (``bm25``) the BM25 index (worker thread). Returns None
        when the HNSW snapshot was already current or skipped."""
        info = self._save_hnsw(force)
        if bm25:
            self._save_bm25()
        return info

    def _save_hnsw(self, force: bool) -> snapshot.SnapshotInfo | None:
        """Write the HNSW snapshot and prune the change log behind it. None when already current.

        The sequence is read under the apply lock, which is held until the graph's own lock is
        taken for serializing: the file holds exactly the changes up to that sequence. (Released
        right after reading it, a delete committed in between could reach the serialized graph;
        a store later restored from a backup taken before that delete would then pass the
        sequence check with a live document marked deleted in the graph.) Writes wait only while
        hnswlib serializes the graph (it also holds the GIL: ~1 ms per MB of index), as they did
        for the graph's lock before; the rest of the save (fsync, checksum) runs without locks.
        """
        with self._snapshot_lock:
            self._apply_lock.acquire()
            held = True

            def release() -> None:
                nonlocal held
                if held:
                    held = False
                    self._apply_lock.release()

            try:
                if self._indexes_behind:
                    # The graph misses a committed write: saving it under a sequence that covers
                    # the write would make a restart trust it. The rebuild saves one when done.
                    log.warning("HNSW snapshot skipped: the in-memory indexes are being rebuilt")
                    return None
                seq = self.store.last_seq()
                dense = self.dense
                if not force and seq == self._snapshot_seq:
                    return None
                t0 = time.perf_counter()
                info = snapshot.save(dense, self.snapshot_dir, seq, store_id=self.store.store_id, on_locked=release)
            finally:
                release()
            self.snapshot_info = info
            self._snapshot_seq = seq
            log.info("HNSW snapshot saved at seq %d (%d documents, %.0f ms)", seq, len(dense), (time.perf_counter() - t0) * 1e3)
            self._prune_change_log(seq)
            return info

    def _save_bm25(self) -> None:
        """Save the BM25 index beside the HNSW snapshot (worker thread, one save at a time), so a
        start loads it and tokenizes only what came after, instead of the whole store. It is
        saved as of its last refresh; a failure is logged and the previous save stays valid."""
        with self._bm25_save_lock:
            if self.bm25.applied_seq == self._bm25_saved_seq:
                return
            try:
                t0 = time.perf_counter()
                self._bm25_saved_seq = seq = self.bm25.save(self.bm25_dir, self.store.store_id)
                log.info("BM25 index saved at seq %d (%d documents, %.0f ms)", seq, len(self.bm25), (time.perf_counter() - t0) * 1e3)
            except Exception:
                log.exception("saving the BM25 index failed (the previous save stays valid; retried with the next snapshot)")

    def _prune_change_log(self, snapshot_seq: int) -> None:
        """Drop the change log up to the snapshot just saved (worker thread): a restart replays
        from it. A graph rebuild in progress reads the log from where it started, so nothing is
        pruned while one runs. The BM25 index is not waited for: one that is behind the horizon
        (writes since the last search) reconciles its deletes against the live labels on its
        next refresh (``ChangesPruned``). A failure only leaves the log longer."""
        if not self._compact_lock.acquire(blocking=False):
            return
        try:
            t0 = time.perf_counter()
            n = self.store.prune_changes(snapshot_seq)
            if n:
                log.info("change log pruned through seq %d: %d rows dropped (%.0f ms)", snapshot_seq, n, (time.perf_counter() - t0) * 1e3)
        except Exception:
            log.exception("pruning the change log failed (retried after the next snapshot)")
        finally:
            self._compact_lock.release()

    def _refresh_bm25_soon(self) -> None:
        """Bring BM25 up to date in the background (event loop; see ``_bm25_task``)."""
        if self._closing:
            return
        self._bm25_pending = True
        if self._bm25_task is None or self._bm25_task.done():
            self._bm25_task = asyncio.get_running_loop().create_task(self._background_bm25())

    def _bm25_stale(self) -> None:
        """``BM25Index.on_stale`` (a search's thread): a search read a stale BM25 index; make sure
        the background task is retrying (after a failure a Search's own refresh found)."""
        loop = self._loop
        if loop is None or self._closing:
            return
        try:
            loop.call_soon_threadsafe(self._refresh_bm25_soon)
        except RuntimeError:  # the loop is closed: shutting down
            pass

    async def _background_bm25(self) -> None:
        """Refresh BM25 while writes keep coming; after a failure, retry when the backoff allows
        (searches read the last good index meanwhile) until one succeeds, writes or not."""
        while self._bm25_pending and not self._closing:
            wait = self.bm25.retry_in()
            if wait > 0:  # short naps: close() waits for this task
                await asyncio.sleep(min(wait, BM25_RETRY_NAP_S))
                continue
            self._bm25_pending = False
            try:
                await asyncio.to_thread(self.bm25.refresh)
            except RefreshAborted:
                return
            except Exception:
                log.exception("background BM25 refresh failed: searches use the index as of seq %d; "
                              "retry in %.0f s", self.bm25.applied_seq, self.bm25.retry_in())
            if self.bm25.failures:  # failed, or skipped as not due (a racing attempt failed)
                self._bm25_pending = True

    def _maybe_snapshot(self, force: bool = False) -> None:
        """Start a background snapshot once ``snapshot_every`` changes piled up (event loop)."""
        every = self.settings.index.snapshot_every
        if self._closing or every <= 0 or (not force and self.changes_since_snapshot < every):
            return
        if self._snapshot_task is not None and not self._snapshot_task.done():
            return  # one at a time; the next write re-checks
        self._snapshot_task = asyncio.get_running_loop().create_task(self._background_snapshot())

    async def _background_snapshot(self) -> None:
        try:
            await asyncio.to_thread(self._save_snapshot)
        except Exception:
            log.exception("background HNSW snapshot failed (the previous one stays valid; retried later)")

    async def compact(self) -> tuple[snapshot.SnapshotInfo, float]:
        """Rebuild the HNSW graph without deleted entries and snapshot it. Reads go on meanwhile.

        Calls coalesce: while one rebuild runs, every Compact that arrives shares the *next* one,
        which starts when the running one ends, so each call gets a rebuild that began after it
        was made (its own deletes are dropped, not only marked) and a burst of N calls costs two
        rebuilds, not N back to back holding the write lock. A caller that goes away (cancelled,
        deadline) leaves the shared rebuild running for the others."""
        nxt = self._compact_next
        if nxt is None or nxt.done():
            prev = self._compact_now

            async def run() -> tuple[snapshot.SnapshotInfo, float]:
                if prev is not None and not prev.done():
                    await asyncio.wait({prev})
                self._compact_now, self._compact_next = self._compact_next, None
                return await self._compact_once()

            nxt = self._compact_next = asyncio.get_running_loop().create_task(run())
            # its outcome is read by the callers; this keeps an unread failure (all callers gone)
            # from being logged as "never retrieved"
            nxt.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(nxt)

    async def _compact_once(self) -> tuple[snapshot.SnapshotInfo, float]:
        assert self._write_lock is not None
        t0 = time.perf_counter()
        async with self._write_lock:  # writes wait; searches keep using the old graph
            await asyncio.to_thread(self._rebuild_dense)
            info = await asyncio.to_thread(self._save_snapshot, True, False)
            # The main database file then holds every commit the snapshot covers (README "Backup").
            # PASSIVE: a reader (an online backup) never makes writes wait here (TRUNCATE did, 30 s).
            if not await asyncio.to_thread(self.store.checkpoint):
                log.warning("Compact: a reader still needed part of the write-ahead log, so documents.sqlite3 "
                            "alone does not hold every commit yet: back up the -wal file too, or use .backup")
        await asyncio.to_thread(self._save_bm25)  # after the write lock: writes need not wait for it
        if info is None:  # skipped: a failed write's index rebuild is still running
            raise NotReady("the in-memory indexes are being rebuilt after a failed write; retry Compact shortly")
        return info, time.perf_counter() - t0

    def _rebuild_dense(self) -> int:
        """Rebuild the graph from the stored vectors (no deleted entries) and swap it in; returns
        the number of deleted entries dropped. Writes may go on while it builds: the changes
        committed since it started are replayed onto the new graph under the apply lock, right
        before the swap, so the swapped-in graph holds every committed change (also a write whose
        call was cancelled but whose worker thread still commits)."""
        s = self.settings.index
        with self._compact_lock:
            with self._apply_lock:
                seq0 = self.store.last_seq()
            fresh = snapshot.rebuild(self.store, self.dim, m=s.hnsw_m, ef_construction=s.ef_construction, ef_search=s.ef_search)
            with self._apply_lock:
                labels, vecs = self.store.vectors(self.dim, after_seq=seq0)
                # Only what the rebuild did not already read: re-adding a label hnswlib holds is an
                # in-place update that re-links its neighbours and costs recall, for no change
                # (labels are immutable per document version).
                new = ~np.isin(labels, np.fromiter(fresh.labels(), dtype=np.int64))
                fresh.upsert(labels[new], vecs[new])
                fresh.mark_deleted_raw(self.store.deletes_after(seq0))
                dropped = self.dense.deleted_count
                self.dense = fresh
            return dropped

    def _needs_compaction(self) -> bool:
        ratio = self.settings.index.auto_compact_ratio
        d = self.dense
        return ratio > 0 and d.deleted_count > 0 and d.deleted_count > ratio * len(d)

    def _maybe_compact(self) -> None:
        """Rebuild the graph in the background once deleted entries outnumber live ones by
        ``auto_compact_ratio`` (event loop). Searches and writes go on meanwhile."""
        if self._closing or not self._needs_compaction():
            return
        if self._compact_task is not None and not self._compact_task.done():
            return
        self._compact_task = asyncio.get_running_loop().create_task(self._background_compact())

    async def _background_compact(self) -> None:
        t0 = time.perf_counter()
        try:
            dropped = await asyncio.to_thread(self._rebuild_dense)
            log.info("HNSW graph compacted in the background: %d deleted entries dropped, %d documents, %.2f s",
                     dropped, len(self.dense), time.perf_counter() - t0)
        except Exception:
            log.exception("background HNSW compaction failed (the current graph stays in use)")
            return
        await self._snapshot_rebuilt_graph("background compaction")

    async def _snapshot_rebuilt_graph(self, after: str) -> None:
        """Persist a graph rebuilt in the background now, as Compact does: the snapshot on disk is
        the old graph, and a restart would load it and redo the rebuild."""
        try:
            await asyncio.to_thread(self._save_snapshot, True)
        except Exception:
            log.exception("snapshot after %s failed (the previous one stays valid)", after)

    async def flush(self) -> None:
        """Bring the BM25 index up to date now (otherwise done lazily on the next search); after a
        failed refresh, retry at once rather than after the backoff."""
        await asyncio.to_thread(functools.partial(self.bm25.refresh, force=True))

    def stats(self) -> dict:
        info = self.snapshot_info
        return {
            "documents": self.store.count(),
            "dimension": self.dim,
            "embedder_model": self.embedder.name,
            "reranker_model": self.reranker.name,
            "deleted_not_compacted": self.dense.deleted_count,
            "sequence": self.store.last_seq(),
            "change_log_rows": self.store.change_log_rows(),
            "change_log_pruned_through": self.store.pruned_through(),
            "snapshot_sequence": info.sequence if info else 0,
            "snapshot_age_seconds": (time.time() - info.created_at) if info else 0.0,
            "data_dir_bytes": _dir_bytes(Path(self.settings.index.data_dir)),
            "backend": self.backend_name,
            "precision": self.precision,
            "reranker_trained": self.reranker.trained,
            "ef_search": self.settings.index.ef_search,
            "hybrid_depth": self.settings.index.hybrid_depth,
            "rrf_k": self.settings.index.rrf_k,
            "rerank_fusion_weight": self.settings.index.rerank_fusion_weight,
            "search_budget_ms": self.settings.index.search_budget_ms,
            "max_candidates": self.settings.limits.max_candidates,
            "max_top_n": self.settings.limits.max_top_n,
            "bm25_sequence": self.bm25.applied_seq,
            "bm25_failed_refreshes": self.bm25.failures,
            "bm25_last_error": self.bm25.last_error or "",
            "rerank_cache_entries": len(self.reranker.cache),
            "rerank_cache_capacity": self.reranker.cache.capacity,
            "rerank_cache_hits": self.reranker.cache.hits,
            "rerank_cache_misses": self.reranker.cache.misses,
            "rerank_cache_coalesced": self.reranker.cache.coalesced,
        }

