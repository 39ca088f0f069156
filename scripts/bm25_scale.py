"""BM25 at scale: first build from the store vs a start from the saved index, with memory.

Fills a document store with ``--docs`` documents (SciFact abstracts repeated under new ids), then
in one process: builds the incremental BM25 index from the store (what a start without a usable
save does), saves it (what each HNSW snapshot is followed by), and loads it into a new index and
catches up (what a start does), checking that both answer two queries identically.

    python scripts/bm25_scale.py --corpus ../shared/datasets/scifact/corpus.jsonl --docs 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rerankd.stages.bm25 import BM25Index
from rerankd.store import DocumentStore, NewDocument


def rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="a BEIR corpus.jsonl")
    ap.add_argument("--docs", type=int, default=100_000)
    a = ap.parse_args()
    rows = [json.loads(line) for line in a.corpus.open()]
    vec = np.zeros(4, dtype=np.float32)
    queries = ["aspirin reduces the risk of colorectal cancer", "vitamin D deficiency and bone fractures"]
    with tempfile.TemporaryDirectory() as tmp:
        store = DocumentStore(Path(tmp) / "docs.sqlite3")
        for i in tqdm(range(0, a.docs, 1000), desc="store", unit="k docs"):
            store.upsert([NewDocument(f"d{j}", rows[j % len(rows)]["text"], rows[j % len(rows)].get("title", ""), {}, vec, None)
                          for j in range(i, min(i + 1000, a.docs))])
        del rows
        t = time.perf_counter()
        idx = BM25Index(store)
        idx.refresh()
        build = time.perf_counter() - t
        peak_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        want = [idx.search(q, 400) for q in queries]
        t = time.perf_counter()
        idx.save(Path(tmp) / "bm25", store.store_id)
        save = time.perf_counter() - t
        size = sum(p.stat().st_size for p in (Path(tmp) / "bm25").iterdir())
        del idx
        t = time.perf_counter()
        loaded = BM25Index(store)
        why = loaded.load(Path(tmp) / "bm25", store.store_id, store.last_seq())
        loaded.refresh()
        load = time.perf_counter() - t
        same = all(np.array_equal(w[0], g[0]) and np.allclose(w[1], g[1])
                   for w, g in zip(want, (loaded.search(q, 400) for q in queries)))
        store.close()
    print(f"\n{a.docs} documents\n")
    print("| | |\n|---|---|")
    print(f"| first build from the store | {build:.1f} s (peak RSS {peak_build:.2f} GiB) |")
    print(f"| save | {save:.1f} s, {size / 2**30:.2f} GiB on disk |")
    print(f"| start from the save (load, checksum, catch-up) | {load:.1f} s ({why or 'loaded'}; same results: {same}) |")
    print(f"| resident after the load | {rss_gib():.2f} GiB |")


if __name__ == "__main__":
    main()
