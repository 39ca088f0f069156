"""``rerankd eval``: retrieval quality and latency on a BEIR dataset, through the gRPC API.

    rerankd eval --dataset /path/to/scifact --models-dir models            # embedded server
    rerankd eval --dataset /path/to/scifact --target localhost:50051 --skip-index
    rerankd eval --dataset D --max-queries 50 --max-docs 2000 --json out.json --plot out.png

Rows: each first stage alone (dense, bm25, hybrid; ``rerank=False``, 100 candidates), then the
``--rerank-stage`` first stage + cross-encoder rerank for every k in ``--ks``. Quality columns
are NDCG@10, MRR@10, P@5 and Recall@100 (``rerankd.irmetrics``); latency columns are p50/p95 of
the client-side wall time of real, sequential Search calls at that row's configuration
(candidates=k, top_n=10) plus the per-stage server timings from ``SearchResponse.timings``.

The rerank rows share one Search per query (see ``k_rows``): the cross-encoder's score of a
(query, doc) pair does not depend on k, so a single Search with candidates=K=max(ks), top_n=K
returns each candidate's reranker score and first-stage rank, and the list Search(candidates=k)
would return is "the hits with first_stage_rank <= k, in score order". That holds while the
first stage's top-k is a prefix of its top-K: always for bm25 (up to exact score ties), for dense
while K <= --ef-search, for hybrid while K <= --hybrid-depth. Larger ks get their own Search
calls; ``--exact-k-rows`` makes every k do so.

``--budgets-ms`` adds one row per soft latency budget (``SearchRequest.budget_ms``): a real
budgeted Search per query at candidates=top_n=``--budget-candidates``, scored in the order served
(the reranked prefix, then the rest in first-stage order), with the candidates each reranked.

Startup imports stay light (the CLI imports this module to build its parser for every command):
grpc, tqdm and matplotlib are imported when ``run`` needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from . import config as cfg
from . import irmetrics, significance
from .stages.fusion import rerank_fusion

log = logging.getLogger("rerankd.eval")

STAGES = ("dense", "bm25", "hybrid")
FIRST_STAGE_DEPTH = 100  # first-stage rows: candidates = top_n = 100 (Recall@100)
LATENCY_TOP_N = 10
MEASURES = irmetrics.DEFAULT_MEASURES  # ndcg@10, mrr@10, p@5, recall@100
TIMING_FIELDS = ("embed", "ann", "bm25", "fusion", "rerank", "queue")
UPSERT_BATCH = 64


# -- arguments ------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("eval")
    g.add_argument("--dataset", type=Path, required=True,
                   help="BEIR dataset directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    g.add_argument("--split", default="test", help="qrels split (qrels/<split>.tsv) [default test]")
    g.add_argument("--target", default=None,
                   help="host:port of a running server; default: start an embedded one from the config flags below "
                        "(data in a fresh temporary directory unless --data-dir is given)")
    g.add_argument("--max-queries", type=int, default=None, metavar="N",
                   help="evaluate only the first N judged queries (queries.jsonl order)")
    g.add_argument("--max-docs", type=int, default=None, metavar="N",
                   help="index only N documents: every doc judged for the kept queries, then the corpus in file order")
    g.add_argument("--ks", type=int, nargs="*", default=[10, 20, 50, 100], metavar="K",
                   help="candidate counts k for the rerank rows [default 10 20 50 100]")
    g.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="first stages evaluated alone (no rerank) [default dense bm25 hybrid]")
    g.add_argument("--rerank-stage", choices=STAGES, default="hybrid",
                   help="first stage feeding the reranker in the rerank rows [default hybrid]")
    g.add_argument("--budgets-ms", type=int, nargs="*", default=[], metavar="MS",
                   help="add a row per soft latency budget (SearchRequest.budget_ms): --rerank-stage + rerank of "
                        "--budget-candidates candidates, as many as each budget lets the server rerank; quality, latency "
                        "and the candidates reranked per query [default none]")
    g.add_argument("--budget-candidates", type=int, default=50, metavar="K",
                   help="candidates (k) of the --budgets-ms rows [default 50]")
    g.add_argument("--latency-queries", type=int, default=50, metavar="N",
                   help="queries timed per row (the first N; 0 = no latency) [default 50]")
    g.add_argument("--warmup-queries", type=int, default=3, metavar="N",
                   help="untimed Search calls per row before the timed ones [default 3]")
    g.add_argument("--exact-k-rows", action="store_true",
                   help="one real Search(candidates=k) per query and k instead of sharing one candidates=max(ks) call "
                        "(shared only up to --ef-search for dense, --hybrid-depth for hybrid; with --target the server's "
                        "values, from its Stats)")
    g.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every figure and run metadata as JSON")
    g.add_argument("--plot", type=Path, default=None, metavar="PATH.png",
                   help="write a PNG: NDCG@10 and rerank latency vs k, first stages as baselines")
    g.add_argument("--skip-index", action="store_true",
                   help="do not upsert the corpus (the server already holds it; needs --target or --data-dir)")
    g.add_argument("--timeout", type=float, default=300.0, help="per-call gRPC timeout in seconds [default 300]")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    cfg.add_arguments(parser)
    cfg.add_connection_arguments(parser)


RETRIES = 8  # an overloaded server's RESOURCE_EXHAUSTED / UNAVAILABLE, per Search


def _retry_hint(e: Any) -> float | None:
    """The server's ``retry-after-ms`` trailer in seconds (capped at 30), None without one."""
    try:
        for k, v in e.trailing_metadata() or ():
            if k == "retry-after-ms":
                return min(30.0, max(0.0, float(v) / 1000))
    except (AttributeError, TypeError, ValueError):
        pass
    return None


def retry_after(e: Any, attempt: int) -> float:
    """Seconds to wait before retrying: the server's hint, else a backoff."""
    hint = _retry_hint(e)
    return min(5.0, 0.1 * 2 ** attempt) if hint is None else hint


# -- dataset ----------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8-sig") as f:  # a BOM is not part of the first row
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: not a JSON object: {e}") from None


def row_id(d: dict, path: str = "corpus.jsonl") -> str:
    """A BEIR row's id: ``_id`` (BEIR's name), else ``id``."""
    v = d.get("_id", d.get("id"))
    if v is None:
        raise ValueError(f"{path}: a row has neither _id nor id: {json.dumps(d)[:120]}")
    return str(v)


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (query-id, corpus-id, score; header line optional)."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8-sig") as f:  # a BOM would glue itself to the first query id
        for n, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or not parts[0]:
                continue
            try:
                rel = int(float(parts[2]))
            except ValueError:
                if n == 0:
                    continue  # header
                raise ValueError(f"{path}:{n + 1}: bad relevance {parts[2]!r}") from None
            qrels.setdefault(parts[0], {})[parts[1]] = rel
    return qrels


@dataclass
class Dataset:
    path: Path
    split: str
    queries: list[tuple[str, str]]  # (id, text), judged queries kept for this run
    qrels: dict[str, dict[str, int]]  # of the kept queries
    n_split_queries: int  # queries in qrels/<split>.tsv
    n_unjudged: int  # split queries with no relevance > 0 (never in the averages)
    n_missing_text: int  # split queries absent from queries.jsonl
    max_docs: int | None
    doc_slice: list[dict] | None = None  # the --max-docs slice (else the corpus is streamed)
    n_docs: int = 0
    required_docs: int = 0

    @property
    def name(self) -> str:
        return self.path.resolve().name


def load_dataset(path: Path, split: str, max_queries: int | None, max_docs: int | None) -> Dataset:
    qrels_path = path / "qrels" / f"{split}.tsv"
    for p in (path / "corpus.jsonl", path / "queries.jsonl", qrels_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found (expected a BEIR dataset directory)")
    qrels = load_qrels(qrels_path)
    texts = {row_id(q, "queries.jsonl"): q.get("text") or "" for q in read_jsonl(path / "queries.jsonl")}
    judged = {q for q, j in qrels.items() if irmetrics.num_relevant(j) > 0}
    queries = [(q, t) for q, t in texts.items() if q in judged]
    missing = sum(1 for q in judged if q not in texts)
    if max_queries is not None:
        queries = queries[: max(0, max_queries)]
    kept = {q for q, _ in queries}
    ds = Dataset(path, split, queries, {q: qrels[q] for q in kept}, len(qrels), len(qrels) - len(judged), missing, max_docs)
    if max_docs is not None:
        ds.doc_slice = select_docs(path / "corpus.jsonl", ds.qrels, max_docs)
        ds.n_docs = len(ds.doc_slice)
        ds.required_docs = len({d for j in ds.qrels.values() for d in j})
    else:
        with open(path / "corpus.jsonl", "rb") as f:
            ds.n_docs = sum(1 for line in f if line.strip())
    return ds


def select_docs(corpus: Path, qrels: dict[str, dict[str, int]], max_docs: int) -> list[dict]:
    """Every doc judged for the kept queries (so each relevant one), then corpus order up to max_docs."""
    required = {d for j in qrels.values() for d in j}
    room = max(0, max_docs - len(required))
    if len(required) > max_docs:
        log.warning("--max-docs %d is below the %d docs judged for the kept queries: keeping all of them", max_docs, len(required))
    picked: list[dict] = []
    found = 0
    for d in read_jsonl(corpus):
        if row_id(d) in required:
            picked.append(d)
            found += 1
        elif room > 0:
            picked.append(d)
            room -= 1
        if room == 0 and found == len(required):
            break
    return picked


class _Prepared(NamedTuple):
    doc: dict | None
    fixed: str | None  # "empty" | "title_as_text" | "truncated" | None


def _cut(s: str, max_bytes: int) -> str:
    b = s.encode("utf-8", errors="surrogatepass")
    return s if len(b) <= max_bytes else b[:max_bytes].decode("utf-8", errors="ignore")


def prepare_doc(d: dict, limits: cfg.LimitsConfig) -> _Prepared:
    """A BEIR corpus row -> an Upsert document the server accepts (it rejects texts over
    --max-text-bytes): an empty text takes the title (the server would take the title alone the
    same way; moving it keeps eval's count of such rows), overlong fields are cut."""
    doc_id, title, text = row_id(d), d.get("title") or "", d.get("text") or ""
    fixed = None
    try:
        (doc_id + title + text).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): no gRPC string can carry it
        return _Prepared(None, "unencodable")
    if not text.strip():
        if not title.strip():
            return _Prepared(None, "empty")
        text, title, fixed = title, "", "title_as_text"
    if len(text.encode("utf-8", errors="surrogatepass")) > limits.max_text_bytes or \
            len(title.encode("utf-8", errors="surrogatepass")) > limits.max_text_bytes:
        text, title, fixed = _cut(text, limits.max_text_bytes), _cut(title, limits.max_text_bytes), "truncated"
    return _Prepared({"id": doc_id, "title": title, "text": text}, fixed)


# -- result shaping (pure; the tests use these) -------------------------------------------------------
class H(NamedTuple):
    id: str
    score: float
    fsr: int  # first-stage rank, 1-based
    rerank: float | None = None  # the cross-encoder's own score (reranked hits)


def hits_of(resp: Any) -> list[H]:
    return [H(h.id, float(h.score), int(h.first_stage_rank), float(h.rerank_score) if h.HasField("rerank_score") else None)
            for h in resp.hits]


def drop_self(hits: Sequence[H], query_id: str) -> list[H]:
    """BEIR rule: a hit whose id equals the query id never counts. It is dropped and the
    first-stage ranks behind it move up by one, so "top-k candidates" means k real ones."""
    s = next((h.fsr for h in hits if h.id == query_id), None)
    if s is None:
        return list(hits)
    return [H(h.id, h.score, h.fsr - 1 if h.fsr > s else h.fsr, h.rerank) for h in hits if h.id != query_id]


def k_rows(hits: Sequence[H], ks: Iterable[int], fusion_weight: float = 0.0) -> dict[int, list[str]]:
    """Rerank rows for every k from ONE reranked Search with candidates=K >= max(ks), top_n=K.

    A pair's cross-encoder score does not depend on k and the server orders reranked hits by
    (score desc, first-stage rank), so the list Search(candidates=k, top_n=k) returns is exactly
    the hits with first_stage_rank <= k, kept in served order — provided the first stage's top-k
    is a prefix of its top-K (see the module docstring for when it is). With rerank fusion on,
    the fused score is standardized over the candidate list, so it is recomputed over the k
    candidates from each hit's cross-encoder score and first-stage rank — the server's own
    function and weight, hence the order Search(candidates=k) serves.
    """
    out = {}
    for k in ks:
        sub = [h for h in hits if h.fsr <= k]
        if fusion_weight and sub and all(h.rerank is not None for h in sub):
            fused = rerank_fusion([h.rerank for h in sub], [h.fsr for h in sub], fusion_weight)
            sub = [sub[i] for i in sorted(range(len(sub)), key=lambda i: (-float(fused[i]), sub[i].fsr))]
        out[k] = [h.id for h in sub]
    return out


def prefix_depth(stage: str, settings: cfg.Settings) -> float:
    """Largest K for which the first stage's top-k (k <= K) is a prefix of its top-K."""
    if stage == "dense":
        return settings.index.ef_search  # ef = max(ef_search, k): same search for every k <= ef_search
    if stage == "hybrid":
        return settings.index.hybrid_depth  # legs searched at max(k, hybrid_depth): same fusion below it
    return math.inf  # bm25 is exact (up to exact score ties at the cut)


# -- statistics ---------------------------------------------------------------------------------------
def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "mean": None}
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "mean": float(a.mean())}


def machine_info() -> dict[str, Any]:
    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "cpu_model": cpu or platform.processor() or None,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }


# -- the run ------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    first_stage: str
    rerank: bool
    candidates: int
    k_rows_from: str = "direct"  # "direct" | f"shared candidates={K} call"
    run: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # qid -> error (rejected queries score 0)
    metrics: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)
    ci95: dict[str, list[float]] = field(default_factory=dict)  # measure -> [low, high] (rerankd.significance)
    latency: dict[str, Any] | None = None
    budget_ms: int = 0  # budget rows: the Search's soft latency budget (0: none, every candidate reranked)
    reranked: list[int] = field(default_factory=list)  # budget rows: candidates reranked, per query


class Evaluator:
    def __init__(self, client, ds: Dataset, args: argparse.Namespace, settings: cfg.Settings) -> None:
        self.client = client
        self.ds = ds
        self.args = args
        self.settings = settings
        self.fusion_weight = 0.0  # the server's rerank fusion weight (from Stats), for k_rows
        self.self_ids: set[str] = set()
        self.progress = not args.no_progress

    def _bar(self, it, **kw):
        from tqdm import tqdm

        return tqdm(it, disable=not self.progress, file=sys.stderr, dynamic_ncols=True, **kw)

    def search(self, query: str, *, stage: str, rerank: bool, candidates: int, top_n: int, budget_ms: int = 0):
        # budget_ms 0 explicitly: a --target server's own --search-budget-ms would otherwise cut
        # the ordinary rerank rows short (and the shared k-row call with them). skip_cache: every
        # row reruns the same queries (the timed calls too), and their latency is the model's.
        return self.client.search(query, first_stage=stage, rerank=rerank, candidates=candidates, top_n=top_n,
                                  budget_ms=budget_ms if rerank else None, skip_cache=True, raw=True,
                                  timeout=self.args.timeout)

    def _guarded(self, row: Row, qid: str, fn, retry: bool = True):
        """Run one Search. A query the server rejects (INVALID_ARGUMENT on ``query``, e.g. over
        the reranker's query-token limit) is recorded as failed and scores 0. An overloaded or
        briefly unavailable server (RESOURCE_EXHAUSTED, UNAVAILABLE) is retried after its
        ``retry-after-ms`` hint, up to ``RETRIES`` times (``retry=False``, the latency loop: the
        call counts as failed, as a wait would be timed). Any other error ends the run: an
        INVALID_ARGUMENT on another field (``candidates``, ``top_n``) is a setting the eval
        got wrong, never a property of the query, and zeroing every query would hide it."""
        import grpc

        if qid in self._unencodable():  # a lone surrogate in the query: no request can carry it
            row.failed[qid] = "query: not encodable as UTF-8 (a lone surrogate)"
            return None
        for attempt in range(RETRIES + 1):
            try:
                return fn()
            except grpc.RpcError as e:
                code = e.code()
                # RESOURCE_EXHAUSTED is shedding only with the server's retry hint (gRPC's own
                # "message larger than max" is RESOURCE_EXHAUSTED too, and no retry changes it)
                if code == grpc.StatusCode.UNAVAILABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and _retry_hint(e) is not None):
                    if retry and attempt < RETRIES:
                        time.sleep(retry_after(e, attempt))
                        continue
                    if not retry:
                        row.failed[qid] = e.details() or code.name
                        return None
                if code != grpc.StatusCode.INVALID_ARGUMENT or not (e.details() or "").startswith("query"):
                    raise
                row.failed[qid] = e.details() or code.name
                return None

    def _unencodable(self) -> set[str]:
        """Ids of the queries whose text no gRPC string can carry (computed once)."""
        if getattr(self, "_bad_queries", None) is None:
            bad = set()
            for qid, text in self.ds.queries:
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    bad.add(qid)
            self._bad_queries = bad
        return self._bad_queries

    def _depth(self, k: int, qid: str) -> int:
        """Hits to ask for: k, plus one when the query's own id is in the corpus (BEIR: it is
        dropped, so k real ones remain). Where the server's limits leave no room for that one,
        k: the query's own id then takes one of the k places (documented; rare: limits at k)."""
        extra = 1 if qid in self.self_ids else 0
        lim = self.settings.limits
        return min(k + extra, max(k, min(lim.max_candidates, lim.max_top_n)))

    # -- indexing --------------------------------------------------------------------------------------
    def index(self) -> dict[str, Any]:
        ds, limits = self.ds, self.settings.limits
        docs: Iterable[dict] = ds.doc_slice if ds.doc_slice is not None else read_jsonl(ds.path / "corpus.jsonl")
        fixed = {"empty": 0, "title_as_text": 0, "truncated": 0, "unencodable": 0}
        refused: dict[str, str] = {}  # documents the server refused (INVALID_ARGUMENT on the document)
        indexed_ids: set[str] = set()
        n = 0
        t0 = time.perf_counter()
        with self._bar(None, total=ds.n_docs, unit="doc", desc="index") as bar:
            batch: list[dict] = []

            def flush() -> None:
                nonlocal n
                while batch:
                    bad = self._refused_doc(lambda: self.client.upsert(batch, timeout=self.args.timeout), len(batch))
                    if bad is None:
                        break
                    i, why = bad  # that document is left out, the rest of the batch sent again
                    refused[batch[i]["id"]] = why
                    del batch[i]
                    bar.update(1)
                indexed_ids.update(d["id"] for d in batch)
                n = len(indexed_ids)  # a row whose id came before replaced it: one document
                bar.update(len(batch))
                batch.clear()

            for d in docs:
                p = prepare_doc(d, limits)
                if p.fixed:
                    fixed[p.fixed] += 1
                if p.doc is None:
                    bar.update(1)
                    continue
                if any(b["id"] == p.doc["id"] for b in batch):
                    flush()  # an id twice in one Upsert is refused: the later row goes in the next one
                batch.append(p.doc)
                if len(batch) >= UPSERT_BATCH:
                    flush()
            flush()
        seconds = time.perf_counter() - t0
        self.self_ids = {q for q, _ in ds.queries if q in indexed_ids}
        out = {"documents": n, "seconds": seconds, "docs_per_s": n / seconds if seconds > 0 else None,
               "batch_size": UPSERT_BATCH, "skipped_empty": fixed["empty"], "title_used_as_text": fixed["title_as_text"],
               "truncated": fixed["truncated"], "skipped_unencodable": fixed["unencodable"],
               "refused": len(refused), "refused_examples": dict(list(refused.items())[:10])}
        skipped = [f"{fixed['empty']} empty"] if fixed["empty"] else []
        skipped += [f"{fixed['unencodable']} with text no gRPC string can carry"] if fixed["unencodable"] else []
        skipped += [f"{len(refused)} the server refused (e.g. {next(iter(refused.values()))})"] if refused else []
        print(f"indexed {n} documents in {seconds:.1f} s ({out['docs_per_s'] or 0:.1f} docs/s, Upsert batches of "
              f"{UPSERT_BATCH})" + (f"; skipped {', '.join(skipped)}" if skipped else ""), file=sys.stderr)
        return out

    @staticmethod
    def _refused_doc(fn, n: int) -> tuple[int, str] | None:
        """Run an Upsert; when the server refuses one of its documents (INVALID_ARGUMENT naming
        ``documents[i]``, e.g. a text with no tokens), (i, why) instead of an error."""
        import grpc

        try:
            fn()
            return None
        except grpc.RpcError as e:
            m = re.match(r"documents\[(\d+)\]", e.details() or "")
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT or not m or int(m.group(1)) >= n:
                raise
            return int(m.group(1)), e.details()

    def find_self_ids(self) -> None:
        """--skip-index: query ids that are also corpus ids (BEIR self-hit rule) from the corpus file."""
        qids = {q for q, _ in self.ds.queries}
        docs = self.ds.doc_slice if self.ds.doc_slice is not None else read_jsonl(self.ds.path / "corpus.jsonl")
        self.self_ids = {i for i in map(row_id, docs) if i in qids}

    # -- quality ---------------------------------------------------------------------------------------
    def first_stage_row(self, stage: str) -> Row:
        row = Row(stage, stage, False, FIRST_STAGE_DEPTH)
        for qid, text in self._bar(self.ds.queries, desc=f"{stage:>6} quality", unit="q"):
            # Ask for one extra hit when the query's own id is in the corpus (it is dropped below).
            n = self._depth(FIRST_STAGE_DEPTH, qid)
            resp = self._guarded(row, qid, lambda: self.search(text, stage=stage, rerank=False, candidates=n, top_n=n))
            if resp is not None:
                row.run[qid] = [h.id for h in drop_self(hits_of(resp), qid)][:FIRST_STAGE_DEPTH]
        return row

    def rerank_rows(self) -> list[Row]:
        stage, ks = self.args.rerank_stage, sorted(set(self.args.ks))
        depth = 0 if self.args.exact_k_rows else prefix_depth(stage, self.settings)
        # a query whose own id is a document asks for k + 1 (see _depth): that call too must
        # search exactly as Search(candidates=k) does for the rows it shares
        extra = 1 if self.self_ids else 0
        shared = [k for k in ks if k + extra <= depth]
        rows = {k: Row(f"{stage}+rerank@{k}", stage, True, k) for k in ks}
        groups: list[list[int]] = ([shared] if shared else []) + [[k] for k in ks if k not in shared]
        for group in groups:
            big = max(group)
            # ONE reranked Search per query at candidates=top_n=max(group): each candidate's
            # cross-encoder score is independent of k, so the k-row ("keep first_stage_rank <= k,
            # in score order") is exactly what Search(candidates=k) returns. See k_rows().
            label = f"shared candidates={big} call" if len(group) > 1 else "direct"
            for k in group:
                rows[k].k_rows_from = label
            desc = f"rerank@{big}" + (f" (k={','.join(map(str, group))})" if len(group) > 1 else "")
            for qid, text in self._bar(self.ds.queries, desc=desc, unit="q"):
                n = self._depth(big, qid)
                probe = rows[big]
                resp = self._guarded(probe, qid, lambda: self.search(text, stage=stage, rerank=True, candidates=n, top_n=n))
                if resp is None:
                    for k in group:
                        rows[k].failed[qid] = probe.failed[qid]
                    continue
                for k, ids in k_rows(drop_self(hits_of(resp), qid), group, self.fusion_weight).items():
                    rows[k].run[qid] = ids
        return [rows[k] for k in ks]

    def budget_rows(self) -> list[Row]:
        """One row per ``--budgets-ms`` budget: a real budgeted Search(candidates=K, top_n=K) per
        query, scored in the order served (reranked prefix first, the rest in first-stage order).
        What a budget reranks depends on the machine and its load, so these rows measure this
        server as it ran, not the model."""
        stage, k = self.args.rerank_stage, self.args.budget_candidates
        rows = []
        for ms in self.args.budgets_ms:
            row = Row(f"{stage}+rerank@{k} budget {ms} ms", stage, True, k, budget_ms=ms)
            for qid, text in self._bar(self.ds.queries, desc=f"budget {ms} ms", unit="q"):
                n = self._depth(k, qid)
                resp = self._guarded(row, qid, lambda: self.search(text, stage=stage, rerank=True, candidates=n,
                                                                    top_n=n, budget_ms=ms))
                if resp is not None:
                    row.run[qid] = [h.id for h in drop_self(hits_of(resp), qid)][:k]
                    row.reranked.append(int(resp.reranked_candidates))
            rows.append(row)
        return rows

    # -- latency -----------------------------------------------------------------------------------------
    def latency(self, row: Row) -> dict[str, Any]:
        n, warm = self.args.latency_queries, self.args.warmup_queries
        queries = self.ds.queries[:n]
        top_n = min(LATENCY_TOP_N, row.candidates)
        call = dict(stage=row.first_stage, rerank=row.rerank, candidates=row.candidates, top_n=top_n,
                    budget_ms=row.budget_ms)
        scratch = Row(row.name, row.first_stage, row.rerank, row.candidates)
        for _, text in queries[:warm]:  # warmup: untimed
            self._guarded(scratch, "warmup", lambda: self.search(text, **call))
        wall: list[float] = []
        server: dict[str, list[float]] = {f: [] for f in (*TIMING_FIELDS, "total")}
        reranked: list[int] = []  # budget rows: candidates each timed call reranked
        failed = 0
        for qid, text in self._bar(queries, desc=f"{row.name} latency", unit="q"):
            t0 = time.perf_counter()
            resp = self._guarded(scratch, qid, lambda: self.search(text, **call), retry=False)
            dt = time.perf_counter() - t0
            if resp is None:
                failed += 1
                continue
            wall.append(dt * 1e3)
            reranked.append(int(resp.reranked_candidates))
            t = resp.timings
            for f in TIMING_FIELDS:
                server[f].append(getattr(t, f"{f}_us") / 1e3)
            server["total"].append(t.total_us / 1e3)
        out: dict[str, Any] = {
            "queries": len(wall), "failed": failed, "warmup": min(warm, len(queries)),
            "candidates": row.candidates, "top_n": top_n, "rerank": row.rerank, "first_stage": row.first_stage,
            "total_ms": percentiles(wall), "server_total_ms": percentiles(server["total"]),
        }
        for f in TIMING_FIELDS:
            out[f"{f}_ms"] = percentiles(server[f])
        if row.budget_ms:  # what the timed calls reranked (the quality run's counts are the row's)
            out["reranked_candidates"] = reranked_stats(reranked, row.candidates)
        out["samples_ms"] = {"total": wall, **{f"server_{k}": v for k, v in server.items()}}
        return out


def score_row(row: Row, qrels: dict[str, dict[str, int]]) -> None:
    row.per_query = irmetrics.per_query(row.run, qrels, MEASURES)  # failed queries: no run -> 0
    row.metrics = irmetrics.mean(row.per_query, MEASURES)
    row.ci95 = significance.row_intervals(row.per_query, MEASURES)


# -- output -------------------------------------------------------------------------------------------
def reranked_stats(counts: Sequence[int], candidates: int | None = None) -> dict[str, Any]:
    """How many candidates a budget row's Searches reranked (``all``: queries with every one of
    ``candidates``; without it, the largest count seen)."""
    if not counts:
        return {"queries": 0, "mean": None, "p50": None, "min": None, "max": None, "all": 0}
    xs = sorted(counts)
    full = max(xs) if candidates is None else candidates
    return {"queries": len(xs), "mean": sum(xs) / len(xs), "p50": percentiles(xs)["p50"], "min": xs[0],
            "max": xs[-1], "all": sum(1 for x in xs if x >= full)}


def _f(v: float | None, fmt: str = "{:.4f}") -> str:
    return "–" if v is None else fmt.format(v)


def _ms(lat: dict | None, key: str, pct: str = "p50") -> str:
    if not lat:
        return "–"
    v = lat[key][pct]
    if v is None:
        return "–"
    if key not in ("total_ms", "server_total_ms") and v == 0:
        return "–"  # stage not used by this row
    return f"{v:.1f}"


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    head = ["row", "NDCG@10", "MRR@10", "P@5", "Recall@100", "NDCG@10 95% CI", "p50 ms", "p95 ms", "embed p50", "ann p50", "bm25 p50", "rerank p50"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        m, lat = r.metrics, r.latency
        ci = r.ci95.get("ndcg@10")
        cells = [r.name, _f(m.get("ndcg@10")), _f(m.get("mrr@10")), _f(m.get("p@5")), _f(m.get("recall@100")),
                 f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "–",
                 _ms(lat, "total_ms"), _ms(lat, "total_ms", "p95"), _ms(lat, "embed_ms"), _ms(lat, "ann_ms"),
                 _ms(lat, "bm25_ms"), _ms(lat, "rerank_ms")]
        lines.append("| " + " | ".join(cells) + " |")
    s = meta["server"]
    notes = [
        "",
        f"{meta['dataset']} / {meta['split']}: {meta['queries']} queries, {meta['documents']} documents; "
        f"embedder {s.get('embedder_model')}, reranker {s.get('reranker_model')}"
        + (" (UNTRAINED head: rerank quality is meaningless)" if s.get("reranker_trained") is False else "")
        + f", backend {s.get('backend')} {s.get('precision')}, rerank fusion weight {s.get('rerank_fusion_weight', 0):g}"
        + (" (rerank rows: z(cross-encoder) + w * z(-ln first-stage rank))." if s.get("rerank_fusion_weight") else
           " (rerank rows: cross-encoder order alone)."),
        "Quality: means over queries with at least one relevant document in the qrels (trec_eval convention); "
        "a query the server rejected scores 0. 95% CI: percentile bootstrap over the queries (rerankd eval-compare "
        "tests the difference between two runs). First-stage rows: rerank=False, candidates=top_n=100. "
        "Hits are scored in the order the server returned them; a hit whose id equals the query id is dropped (BEIR).",
    ]
    shared = [r.name for r in rows if r.rerank and r.k_rows_from != "direct"]
    direct = [r.name for r in rows if r.rerank and r.k_rows_from == "direct" and not r.budget_ms]
    if shared:
        notes.append(
            f"Rerank rows ({', '.join(shared)}): one Search per query with candidates=top_n=max(k), rerank=True returns "
            "every candidate's cross-encoder score and first-stage rank; the @k row keeps the hits with "
            "first_stage_rank <= k in score order, which is exactly what Search(candidates=k) returns (a pair's score "
            "does not depend on k)."
        )
    if direct:
        notes.append(f"Rerank rows ({', '.join(direct)}): one real Search(candidates=k, top_n=k, rerank=True) per query.")
    if shared or direct:
        notes.append("Recall@100 of a rerank@k row is the first stage's recall@k (the reranker's ceiling).")
    for r in rows:
        if r.budget_ms and r.reranked:
            st = reranked_stats(r.reranked, r.candidates)
            notes.append(f"{r.name}: one real Search(candidates={r.candidates}, top_n={r.candidates}, budget_ms="
                         f"{r.budget_ms}) per query; candidates reranked per query: mean {st['mean']:.1f}, p50 "
                         f"{st['p50']:g}, min {st['min']}, all {r.candidates} in {st['all']} of {st['queries']} queries "
                         "(the rest in first-stage order; depends on this machine's speed and load).")
    lat_failed = {r.name: r.latency["failed"] for r in rows if r.latency and r.latency.get("failed")}
    if lat_failed:
        notes.append(f"Latency calls the server shed or refused (left out of the percentiles, which read low under "
                     f"load): {lat_failed}.")
    lat = next((r.latency for r in rows if r.latency), None)
    if lat:
        notes.append(
            f"Latency: client wall time of real sequential Search calls at the row's configuration (candidates=k, "
            f"top_n={LATENCY_TOP_N}) over the first {lat['queries']} queries after {lat['warmup']} warmup calls; "
            "per-stage columns are server timings (hybrid runs its dense and bm25 legs concurrently); – = stage not run."
        )
    idx = meta.get("indexing")
    if idx:
        notes.append(f"Indexing: {idx['documents']} documents in {idx['seconds']:.1f} s ({idx['docs_per_s'] or 0:.1f} docs/s).")
    failed = {r.name: len(r.failed) for r in rows if r.failed}
    if failed:
        notes.append(f"Rejected queries (INVALID_ARGUMENT, scored 0): {failed}.")
    return "\n".join(lines + notes)


def plot(rows: list[Row], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rr = [r for r in rows if r.rerank and not r.budget_ms]
    fs = [r for r in rows if not r.rerank]
    budget = [r for r in rows if r.budget_ms and r.latency and r.latency["total_ms"]["p50"] is not None]
    if budget:  # a second panel: quality against latency, one point per budget
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.5), dpi=120)
    else:
        fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    colors = {"dense": "tab:blue", "bm25": "tab:green", "hybrid": "tab:purple"}
    handles = []
    if rr:
        ks = [r.candidates for r in rr]
        handles += ax.plot(ks, [r.metrics["ndcg@10"] for r in rr], "o-", color="tab:red", label=f"{rr[0].first_stage}+rerank NDCG@10")
        if all(r.ci95.get("ndcg@10") for r in rr):  # the query sample's noise: 95% bootstrap interval
            handles.append(ax.fill_between(ks, [r.ci95["ndcg@10"][0] for r in rr], [r.ci95["ndcg@10"][1] for r in rr],
                                           color="tab:red", alpha=0.12, lw=0, label="rerank NDCG@10 95% CI"))
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.minorticks_off()
    for r in fs:
        handles.append(ax.axhline(r.metrics["ndcg@10"], ls="--", lw=1, color=colors.get(r.name, "gray"),
                                  label=f"{r.name} alone NDCG@10"))
    ax.set_xlabel("k (first-stage candidates reranked)")
    ax.set_ylabel("NDCG@10")
    lat_rows = [r for r in rr if r.latency and r.latency["total_ms"]["p50"] is not None]
    if lat_rows:
        ax2 = ax.twinx()
        ks = [r.candidates for r in lat_rows]
        handles += ax2.plot(ks, [r.latency["total_ms"]["p50"] for r in lat_rows], "s-", color="tab:orange", label="rerank p50 ms")
        handles += ax2.plot(ks, [r.latency["total_ms"]["p95"] for r in lat_rows], "^:", color="tab:orange", label="rerank p95 ms")
        ax2.set_ylabel("Search latency, ms (client wall time)")
        ax2.set_ylim(bottom=0)
    if budget:
        _budget_panel(bx, budget, rr, fs, colors)
    s = meta["server"]
    title = f"{meta['dataset']} {meta['split']} — {meta['queries']} queries, {meta['documents']} docs — {s.get('reranker_model')}"
    if s.get("reranker_trained") is False:
        title += " (UNTRAINED)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _budget_panel(ax, budget: list[Row], rr: list[Row], fs: list[Row], colors: dict[str, str]) -> None:
    """NDCG@10 against p50 latency: the budget rows as a curve (each point labelled with its
    budget and mean candidates reranked), the unbudgeted rerank rows and first stages as points."""
    def p50(r: Row) -> float:
        return r.latency["total_ms"]["p50"]

    ax.plot([p50(r) for r in budget], [r.metrics["ndcg@10"] for r in budget], "o-", color="tab:brown",
            label=f"{budget[0].first_stage}+rerank@{budget[0].candidates} with a budget")
    for r in budget:
        st = reranked_stats(r.reranked, r.candidates)
        ax.annotate(f"{r.budget_ms} ms\n{st['mean'] or 0:.1f} reranked", (p50(r), r.metrics["ndcg@10"]),
                    textcoords="offset points", xytext=(6, -14), fontsize=7)
    for r in rr + fs:
        if r.latency and r.latency["total_ms"]["p50"] is not None:
            ax.plot([p50(r)], [r.metrics["ndcg@10"]], "s" if r.rerank else "D",
                    color="tab:red" if r.rerank else colors.get(r.name, "gray"), label=r.name)
    ax.set_xscale("log")
    ax.set_xlabel("Search p50 latency, ms (client wall time, log scale)")
    ax.set_ylabel("NDCG@10")
    ax.set_title("quality vs latency: soft budgets (budget_ms)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _check_args(args: argparse.Namespace, settings: cfg.Settings, check_limits: bool = True) -> str | None:
    if any(k < 1 for k in args.ks):
        return "--ks: every k must be at least 1"
    lim = settings.limits
    # a Search the limits refuse would end the run: say so before indexing anything (with
    # --target, against the server's limits, once Stats has told them)
    limits = (("--max-candidates", lim.max_candidates), ("--max-top-n", lim.max_top_n)) if check_limits else ()
    for flag, limit in limits:
        if args.ks and max(args.ks) > limit:
            return f"--ks: {max(args.ks)} exceeds {flag} {limit}"
        if args.stages and FIRST_STAGE_DEPTH > limit:
            return f"--stages: the first-stage rows ask for {FIRST_STAGE_DEPTH} hits (Recall@{FIRST_STAGE_DEPTH}), above {flag} {limit}"
    if args.skip_index and not args.target and args.index__data_dir is None:
        return "--skip-index needs --target or --data-dir (the default embedded server starts empty)"
    if any(ms < 1 or ms > 3_600_000 for ms in args.budgets_ms):
        return "--budgets-ms: every budget must be 1 to 3600000 ms"
    if args.budgets_ms:
        if args.budget_candidates < 1:
            return "--budget-candidates must be at least 1"
        for flag, limit in limits:
            if args.budget_candidates > limit:
                return f"--budget-candidates: {args.budget_candidates} exceeds {flag} {limit}"
    if args.max_queries is not None and args.max_queries < 1:
        return "--max-queries must be at least 1"
    if args.max_docs is not None and args.max_docs < 1:
        return "--max-docs must be at least 1"
    return None


def run(args: argparse.Namespace) -> int:
    settings = cfg.settings_from_args(args)
    level = args.server__log_level or "WARNING"  # the embedded server's INFO lines would drown the bars
    logging.basicConfig(level=getattr(logging, level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    err = _check_args(args, settings, check_limits=not args.target)  # a target's limits: from its Stats
    if err:
        print(f"rerankd eval: {err}", file=sys.stderr)
        return 2
    try:
        ds = load_dataset(args.dataset, args.split, args.max_queries, args.max_docs)
    except (OSError, ValueError, KeyError) as e:
        print(f"rerankd eval: {e}", file=sys.stderr)
        return 2
    if not ds.queries:
        print(f"rerankd eval: no judged queries in {args.dataset}/qrels/{args.split}.tsv", file=sys.stderr)
        return 2

    import grpc

    from .client import Client, connection, wait_serving
    from .errors import RerankdError

    t_start = time.time()
    try:
        with contextlib.ExitStack() as stack:
            srv = None
            conn: dict = {}
            if args.target:
                target = args.target
                conn = connection(args, settings.server.auth_token, target)  # TLS with --tls-ca, the bearer token
                wait_serving(target, args.timeout, **conn)
            else:
                from .embedded import EmbeddedServer  # imports bm25s, which sets its logger to DEBUG

                if args.server__log_level is None:
                    logging.getLogger("bm25s").setLevel(logging.WARNING)

                data_dir = args.index__data_dir
                if data_dir is None:  # never the configured (env) data dir: eval upserts into it
                    data_dir = Path(tempfile.mkdtemp(prefix="rerankd-eval-"))
                    stack.callback(shutil.rmtree, data_dir, ignore_errors=True)
                settings = cfg.embedded_settings(settings).replace(index={"data_dir": Path(data_dir)})
                print(f"starting an embedded server (models {settings.model.models_dir}, data {data_dir}) ...", file=sys.stderr)
                srv = EmbeddedServer(settings)
                # Not `with srv`: when the models fail to load, start() raises after the gRPC server
                # is already up and __exit__ never runs; stop() must still shut it down.
                stack.callback(srv.stop)
                srv.start()
                target = srv.target
            client = stack.enter_context(Client(target, timeout=args.timeout, retries=0, **conn))  # latencies as served
            st = client.stats()
            # The server's own settings, not this command's defaults (they differ with --target):
            # its candidate limit, and the depths that decide which k-rows one call can share.
            # (0: a server too old to report it; the local value stands)
            settings = settings.replace(
                index={k: v for k, v in (("ef_search", st.ef_search), ("hybrid_depth", st.hybrid_depth)) if v},
                # (a server too old to report max_top_n: its max_candidates stands in; both default to 1000)
                limits={k: v for k, v in (("max_candidates", st.max_candidates),
                                          ("max_top_n", st.max_top_n or st.max_candidates)) if v})
            err = _check_args(args, settings)
            if err:
                print(f"rerankd eval: {err} (the server at {target})", file=sys.stderr)
                return 2
            precision = st.precision
            if precision != "fp32" and not args.exact_k_rows:
                # int8 models quantize activations per batch (DynamicQuantizeLinear), so a pair's
                # score depends on what shares its batch: the shared-call shortcut is not exact.
                print(f"precision {precision}: reranker scores depend on batch composition; "
                      "using one real Search per k (--exact-k-rows)", file=sys.stderr)
                args.exact_k_rows = True
            ev = Evaluator(client, ds, args, settings)
            ev.fusion_weight = client.stats().rerank_fusion_weight

            indexing = None
            if args.skip_index:
                ev.find_self_ids()
            else:
                indexing = ev.index()

            rows = [ev.first_stage_row(s) for s in args.stages]
            if args.ks:
                rows += ev.rerank_rows()
            rows += ev.budget_rows()
            for r in rows:
                score_row(r, ds.qrels)
            if args.latency_queries > 0:
                for r in rows:
                    r.latency = ev.latency(r)

            stats = client.stats()
            server = {
                "target": args.target or "embedded", "embedded": srv is not None,
                "embedder_model": stats.embedder_model, "reranker_model": stats.reranker_model,
                "reranker_trained": srv.app.pipeline.reranker.trained if srv is not None and srv.app and srv.app.pipeline else None,
                "backend": stats.backend, "precision": stats.precision, "documents": stats.documents,
                "dimension": stats.dimension, "rerank_fusion_weight": stats.rerank_fusion_weight,
                "search_budget_ms": stats.search_budget_ms,  # the server's default; rows set their own
            }
    except grpc.RpcError as e:
        print(f"rerankd eval: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (TimeoutError, OSError, ValueError, RerankdError) as e:  # ValueError: a malformed dataset row
        print(f"rerankd eval: {e}", file=sys.stderr)
        return 1

    meta: dict[str, Any] = {
        "dataset": ds.name, "dataset_path": str(ds.path.resolve()), "split": ds.split,
        "queries": len(ds.queries), "queries_in_split": ds.n_split_queries,
        "queries_without_relevant": ds.n_unjudged, "queries_missing_text": ds.n_missing_text,
        "documents": indexing["documents"] if indexing else server["documents"],
        "max_queries": args.max_queries, "max_docs": args.max_docs, "docs_judged_for_kept_queries": ds.required_docs or None,
        "ks": sorted(set(args.ks)), "stages": list(args.stages), "rerank_stage": args.rerank_stage,
        "budgets_ms": list(args.budgets_ms), "budget_candidates": args.budget_candidates if args.budgets_ms else None,
        "first_stage_candidates": FIRST_STAGE_DEPTH, "latency_queries": args.latency_queries,
        "warmup_queries": args.warmup_queries, "exact_k_rows": bool(args.exact_k_rows),
        "self_hit_queries": sorted(ev.self_ids),
        "measures": list(MEASURES),
        "averaging": "mean over queries with >= 1 relevant doc in the qrels (trec_eval); rejected queries score 0",
        "intervals": f"ci95: percentile bootstrap of the mean over queries, {significance.RESAMPLES} resamples, "
                     f"seed {significance.SEED}",
        "server": server, "indexing": indexing, "machine": machine_info(),
        "settings": _settings_dict(settings) if srv is not None else None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_start)),
        "elapsed_s": time.time() - t_start,
    }
    print(markdown(rows, meta))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": [_row_dict(r) for r in rows]}, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(rows, meta, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _row_dict(r: Row) -> dict[str, Any]:
    return {
        "name": r.name, "first_stage": r.first_stage, "rerank": r.rerank, "candidates": r.candidates,
        "k_rows_from": r.k_rows_from if r.rerank else None, "budget_ms": r.budget_ms or None,
        "reranked_candidates": reranked_stats(r.reranked, r.candidates) if r.budget_ms else None,
        "metrics": r.metrics, "ci95": r.ci95, "latency": r.latency, "failed_queries": r.failed,
        "per_query": r.per_query,
    }


def _settings_dict(s: cfg.Settings) -> dict[str, Any]:
    import dataclasses

    def conv(v: Any) -> Any:
        return str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v

    return {sec: {k: conv(v) for k, v in dataclasses.asdict(getattr(s, sec)).items()} for sec in cfg.SECTIONS}
