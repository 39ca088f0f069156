"""Reranker score cache: a reranked Search repeated, against the same Search scored by the model.

Starts one embedded server (a fresh data dir, the repo's exported models, the default
--rerank-cache-entries), indexes ``--docs`` SciFact documents and, for each of ``--queries`` test
queries, sends the same hybrid Search(candidates=k) three times in a row: ``skip_cache`` (the
model scores every candidate: the baseline), then with the cache (the first fills it), then
again (every pair a hit). Prints p50/p95 of each kind and the ratios, in one process and run.

    python scripts/score_cache_bench.py --dataset ../shared/datasets/scifact --models-dir models
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
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
    args = ap.parse_args()

    docs = _read(args.dataset / "corpus.jsonl", args.docs)
    queries = [q["text"] for q in _read(args.dataset / "queries.jsonl", args.queries)]
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


if __name__ == "__main__":
    main()
