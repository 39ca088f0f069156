"""Metadata-filtered dense search: exact scan vs oversampled HNSW search, by filter size.

Measures ``DenseIndex.search_within`` on random unit vectors (the served HNSW settings: M 32,
ef_construction 200, ef 256; dim 384) with the vectors of the exact scan read from a real
document store (SQLite, ~1 KB of text per row, as served), for filters matching a growing share
of the index: the exact scan, the oversampled unfiltered HNSW search (what the cost model picks
for broad filters), and -- for reference -- hnswlib's own filtered search with a Python filter
callback, idle and while another thread runs Python (the GIL stall that ruled it out). Also the
HNSW answers' recall@k against the exact one, and the unfiltered search's own recall. The
ratio of the per-candidate HNSW cost to the per-vector scan cost is ``WALK_VS_EXACT_COST``.

    python scripts/filter_bench.py [--n 50000] [--k 400] [--queries 30]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rerankd.stages.dense_index import WALK_VS_EXACT_COST, DenseIndex, filter_plan
from rerankd.store import DocumentStore, NewDocument


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=400, help="depth asked of the dense leg (the hybrid default)")
    ap.add_argument("--queries", type=int, default=30)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    v = rng.normal(size=(a.n, a.dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ix = DenseIndex(a.dim, m=32, ef_construction=200, ef_search=256, capacity=a.n)
    store = DocumentStore(Path(tempfile.mkdtemp(prefix="filter-bench-")) / "documents.sqlite3")
    text, toks = "lorem ipsum dolor sit amet " * 40, np.arange(250, dtype=np.int32)
    for s in tqdm(range(0, a.n, 5000), desc="store + HNSW", unit="chunk"):
        labels, *_ = store.upsert([NewDocument(f"d{i}", text, "", {}, v[i], toks) for i in range(s, min(s + 5000, a.n))])
        ix.upsert(np.asarray(labels), v[s : s + 5000], threads=2)
    qs = v[rng.choice(a.n, a.queries, replace=False)] + 0.3 * rng.normal(size=(a.queries, a.dim)).astype(np.float32)

    def load(labels):
        return store.vectors_for(labels, a.dim)

    def timed(fn) -> tuple[float, list]:
        out, ts = [], []
        for q in qs:
            t0 = time.perf_counter()
            out.append(fn(q))
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1e3, out

    def recall(got, want) -> float:
        return float(np.mean([len(set(g.tolist()) & set(w.tolist())) / max(len(w), 1) for g, w in zip(got, want)]))

    everything = set(range(1, a.n + 1))
    t_base, base = timed(lambda q: ix.search(q, a.k)[0])
    _, base_exact = timed(lambda q: ix.search_within(q, a.k, lambda: everything, load, a.n, float("inf"))[0])
    print(f"n={a.n} dim={a.dim} k={a.k}; unfiltered HNSW p50 {t_base:.2f} ms, recall@{a.k} "
          f"{recall(base, base_exact):.3f}; WALK_VS_EXACT_COST={WALK_VS_EXACT_COST}")

    def callback_walk(q, allowed):
        ix._index.set_ef(max(256, a.k))
        return ix._index.knn_query(q.reshape(1, -1), k=min(a.k, len(allowed)), num_threads=1,
                                   filter=allowed.__contains__)[0][0].astype(np.int64)

    stop = threading.Event()

    def busy():  # a pure-Python thread (like a BM25 rebuild's tokenizer)
        x = 0
        while not stop.is_set():
            x += 1

    print("| filter matches | exact scan p50 ms | oversampled HNSW p50 ms (recall) | cost model picks |"
          " hnswlib filter callback p50 ms (recall) | callback, Python thread busy p50 ms | oversampled, busy p50 ms |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for share in (0.002, 0.01, 0.05, 0.1, 0.2, 0.5):
        allowed = set((rng.choice(a.n, int(a.n * share), replace=False) + 1).tolist())
        t_exact, exact = timed(lambda q: ix.search_within(q, a.k, lambda: allowed, load, a.n, float("inf"))[0])
        t_over, over = timed(lambda q: ix.search_within(q, a.k, lambda: allowed, load, 0)[0])
        exact_pick, _ = filter_plan(min(a.k, len(allowed)), a.n, len(allowed), exact_max=a.n)
        pick = "exact" if exact_pick else "HNSW"
        t_cb, cb = timed(lambda q: callback_walk(q, allowed))
        t_cb_busy = t_over_busy = float("nan")
        if share >= 0.01:
            th = threading.Thread(target=busy, daemon=True)
            stop.clear()
            th.start()
            qs_all = qs
            try:
                qs = qs_all[:5]  # a few: the callback path takes seconds each under contention
                t_cb_busy, _ = timed(lambda q: callback_walk(q, allowed))
                t_over_busy, _ = timed(lambda q: ix.search_within(q, a.k, lambda: allowed, load, 0)[0])
            finally:
                qs = qs_all
                stop.set()
                th.join()
        print(f"| {len(allowed):,} ({share:.1%}) | {t_exact:.1f} | {t_over:.1f} ({recall(over, exact):.3f}) | {pick} |"
              f" {t_cb:.1f} ({recall(cb, exact):.3f}) | {t_cb_busy:.1f} | {t_over_busy:.1f} |")


if __name__ == "__main__":
    main()
