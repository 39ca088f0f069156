"""Metadata-filtered dense search: exact scan vs hnswlib's filtered walk, by filter size.

Measures ``DenseIndex.search_within`` on random unit vectors (the served HNSW settings: M 32,
ef_construction 200, ef 256; dim 384) with the vectors of the exact scan read from a real
document store (SQLite, ~1 KB of text per row, as served), for filters matching a growing share
of the index, both ways, and the unfiltered search as the baseline -- the numbers behind
``--filter-exact-max``. Also reports the filtered walk's recall@k against the exact answer.

    python scripts/filter_bench.py [--n 50000] [--k 400] [--queries 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rerankd.stages.dense_index import DenseIndex
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

    def load(labels):
        return store.vectors_for(labels, a.dim)
    qs = v[rng.choice(a.n, a.queries, replace=False)] + 0.3 * rng.normal(size=(a.queries, a.dim)).astype(np.float32)

    def timed(fn) -> tuple[float, list]:
        out, ts = [], []
        for q in qs:
            t0 = time.perf_counter()
            out.append(fn(q))
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1e3, out

    base, _ = timed(lambda q: ix.search(q, a.k))
    print(f"n={a.n} dim={a.dim} k={a.k}; unfiltered HNSW p50 {base:.2f} ms")
    print("| filter matches | exact scan p50 ms | filtered walk p50 ms | walk recall@k vs exact |")
    print("|---:|---:|---:|---:|")
    for share in (0.002, 0.01, 0.05, 0.1, 0.2, 0.5):
        allowed = set((rng.choice(a.n, int(a.n * share), replace=False) + 1).tolist())  # store labels start at 1
        t_exact, exact = timed(lambda q: ix.search_within(q, a.k, allowed, a.n, load)[0])
        t_walk, walk = timed(lambda q: ix.search_within(q, a.k, allowed, 0, load)[0])
        rec = np.mean([len(set(w.tolist()) & set(e.tolist())) / max(len(e), 1) for w, e in zip(walk, exact)])
        print(f"| {len(allowed):,} ({share:.0%}) | {t_exact:.2f} | {t_walk:.2f} | {rec:.3f} |")


if __name__ == "__main__":
    main()
