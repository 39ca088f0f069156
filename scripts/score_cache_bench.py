"""Reranker score cache: a reranked Search repeated, against the same Search scored by the model.

Starts one embedded server (a fresh data dir, the repo's exported models, the default
--rerank-cache-entries), indexes ``--docs`` SciFact documents and, for each of ``--queries`` test
queries, sends the same hybrid Search(candidates=k) three times in a row: ``skip_cache`` (the
model scores every candidate: the baseline), then with the cache (the first fills it), then
again (every pair a hit). Prints p50/p95 of each kind and the ratios, in one process and run.

Then bursts (``--bursts``, 0 = none): for each of that many further queries (none scored
before), ``--burst`` identical Searches sent at once (default 2, the default
--max-concurrent-search), first with ``skip_cache`` (each call runs the model), then with the
cache (the calls in flight share one scoring: in-flight coalescing). Prints the p50/p95 of each
burst's slowest call and the pairs the model ran, from Stats.

    python scripts/score_cache_bench.py --dataset ../shared/datasets/scifact --models-dir models
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from rerankd.client import Client
from rerankd.config import Settings
from rerankd.embedded import EmbeddedServer


def _read(path: Path, n: int) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--models-dir", type=Path, default=Path("models"))
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--bursts", type=int, default=10, help="bursts of identical Searches (0: none)")
    ap.add_argument("--burst", type=int, default=2, help="identical Searches per burst, sent at once")
    args = ap.parse_args()

    docs = _read(args.dataset / "corpus.jsonl", args.docs)
    every = [q["text"] for q in _read(args.dataset / "queries.jsonl", args.queries + args.bursts)]
    queries, burst_queries = every[:args.queries], every[args.queries:]
    with tempfile.TemporaryDirectory(prefix="rerankd-cache-bench-") as data:
        settings = Settings().replace(server={"listen": "127.0.0.1:0"}, model={"models_dir": args.models_dir},
                                      index={"data_dir": Path(data)})
        with EmbeddedServer(settings) as srv, Client(srv.target, timeout=600, retries=0) as c:
            for i in tqdm(range(0, len(docs), 64), desc="indexing", unit="batch"):
                c.upsert([{"id": d["_id"], "title": d.get("title", ""), "text": d.get("text") or d.get("title", "")}
                          for d in docs[i:i + 64]])
            st = c.stats()
            times: dict[str, list[float]] = {"model (skip_cache)": [], "first, fills the cache": [], "repeated (hits)": []}
            hits = []
            for q in tqdm(queries, desc="queries", unit="query"):
                for kind, skip in zip(times, (True, False, False)):
                    t0 = time.perf_counter()
                    r = c.search(q, candidates=args.candidates, top_n=10, skip_cache=skip, raw=True)
                    times[kind].append((time.perf_counter() - t0) * 1e3)
                hits.append(r.cache_hits)
            base = statistics.median(times["model (skip_cache)"])
            print(f"hybrid Search k={args.candidates}, top_n 10, {len(queries)} queries, {len(docs)} documents, "
                  f"{st.backend}:{st.precision}")
            print("| call | p50 ms | p95 ms | p50 vs model |\n|---|---:|---:|---:|")
            for kind, xs in times.items():
                p50 = statistics.median(xs)
                print(f"| {kind} | {p50:,.1f} | {_pct(xs, 0.95):,.1f} | {p50 / base:.3f}x |")
            print(f"cache hits per repeated Search: mean {statistics.mean(hits):.1f} of {args.candidates}; "
                  f"server cache: {c.stats().rerank_cache_entries} pairs held")
            if burst_queries:
                _bursts(c, burst_queries, args.burst, args.candidates)


def _bursts(c: Client, queries: list[str], n: int, k: int) -> None:
    """Each query sent ``n`` times at once, without and with the cache: the slowest call of each
    burst, and the pairs the model ran (misses minus coalesced, from Stats; skip_cache calls are
    not counted there, so theirs is n x k by construction)."""
    slowest: dict[str, list[float]] = {"model (skip_cache)": [], "cache on (coalesced)": []}
    before = c.stats()
    with ThreadPoolExecutor(n) as pool:
        for q in tqdm(queries, desc=f"bursts of {n}", unit="burst"):
            for kind, skip in zip(slowest, (True, False)):
                def one(_):
                    t0 = time.perf_counter()
                    c.search(q, candidates=k, top_n=10, skip_cache=skip, raw=True)
                    return (time.perf_counter() - t0) * 1e3
                slowest[kind].append(max(pool.map(one, range(n))))
    after = c.stats()
    misses = after.rerank_cache_misses - before.rerank_cache_misses
    coalesced = after.rerank_cache_coalesced - before.rerank_cache_coalesced
    base = statistics.median(slowest["model (skip_cache)"])
    print(f"\n{len(queries)} bursts of {n} identical Searches sent at once (k={k}); the slowest call of each burst:")
    print("| burst | p50 ms | p95 ms | p50 vs model | pairs the model ran |\n|---|---:|---:|---:|---:|")
    ran = {"model (skip_cache)": n * k * len(queries), "cache on (coalesced)": misses - coalesced}
    for kind, xs in slowest.items():
        p50 = statistics.median(xs)
        print(f"| {kind} | {p50:,.1f} | {_pct(xs, 0.95):,.1f} | {p50 / base:.3f}x | {ran[kind]:,} |")
    print(f"coalesced pairs: {coalesced:,} of {misses:,} missed")


if __name__ == "__main__":
    main()
