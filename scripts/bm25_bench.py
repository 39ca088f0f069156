"""BM25 under writes: the incremental index against a bm25s index rebuilt from the store.

Before the incremental index, any write made the next BM25/hybrid search rebuild bm25s from the
whole store (re-tokenizing every document). This measures, on one real document store, in one
process:
- the first build from the store (both);
- a search with no write since (both);
- a search right after a one-document upsert (the read-your-writes cost: rebuild vs apply);
- a search right after a 100-document batch, and after deleting one document;
then, for the incremental index only, ``--merge-rounds`` rounds of (100-document batch, search)
with main-segment merges in the foreground vs in a background thread (the default): the
search latency distribution, whose tail is where a foreground merge shows.
Documents are SciFact's corpus (``--corpus``), repeated with new ids up to ``--docs``.

    python scripts/bm25_bench.py --corpus ../shared/datasets/scifact/corpus.jsonl [--docs 20000] [--writes 10]

At scale, without the rebuild baseline (a bm25s rebuild per write is minutes there) and with
larger write batches so that merges happen within a few rounds:

    python scripts/bm25_bench.py --corpus ... --docs 1000000 --skip-baseline --merge-modes background \
        --merge-rounds 30 --merge-batch 10000
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import bm25s
import numpy as np
from tqdm import tqdm

from rerankd.stages.bm25 import BM25Index, tokenize
from rerankd.store import DocumentStore, NewDocument


class RebuildBaseline:
    """What the service did before: any write -> rebuild bm25s from all stored texts on the next search."""

    def __init__(self, store: DocumentStore) -> None:
        self.store, self.dirty = store, True

    def mark_dirty(self) -> None:
        self.dirty = True

    def search(self, query: str, k: int):
        if self.dirty:
            self.labels, texts = self.store.texts()
            self.r = bm25s.BM25()
            self.r.index(tokenize(texts), show_progress=False)
            self.dirty = False
        docs, scores = self.r.retrieve(tokenize([query]), k=k, show_progress=False, n_threads=1)
        return self.labels[docs[0]], scores[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="a BEIR corpus.jsonl")
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--writes", type=int, default=10, help="timed write+search rounds per kind")
    ap.add_argument("--k", type=int, default=400, help="depth asked of the BM25 leg (the hybrid default)")
    ap.add_argument("--merge-rounds", type=int, default=150, help="batch+search rounds per merge mode (0: skip)")
    ap.add_argument("--merge-batch", type=int, default=100, help="documents per batch in the merge rounds")
    ap.add_argument("--merge-modes", choices=("both", "background"), default="both")
    ap.add_argument("--skip-baseline", action="store_true", help="time the incremental index only")
    a = ap.parse_args()
    rows = [json.loads(line) for line in a.corpus.open()]
    texts = [(r.get("title", ""), r.get("text", "")) for r in rows]
    queries = ["aspirin reduces the risk of colorectal cancer", "vitamin D deficiency and bone fractures",
               "BRCA1 mutations in breast cancer", "statins lower cholesterol", "malaria vaccine efficacy"]
    vec = np.zeros(4, dtype=np.float32)

    def doc(i: int) -> NewDocument:
        title, text = texts[i % len(texts)]
        return NewDocument(id=f"d{i}", title=title, text=text, metadata={}, vector=vec, token_ids=None)

    with tempfile.TemporaryDirectory() as tmp:
        store = DocumentStore(Path(tmp) / "docs.sqlite3")
        for i in tqdm(range(0, a.docs, 1000), desc="store", unit="k docs"):
            store.upsert([doc(j) for j in range(i, min(i + 1000, a.docs))])
        n_next = a.docs
        results: dict[str, dict[str, float]] = {}
        doomed = iter(range(a.docs))  # ids to delete, one per round
        kinds = [("rebuild (bm25s, before)", lambda: RebuildBaseline(store)), ("incremental (now)", lambda: BM25Index(store))]
        for name, make in kinds[1:] if a.skip_baseline else kinds:
            t0 = time.perf_counter()
            idx = make()
            idx.search(queries[0], a.k)
            r = {"first build": time.perf_counter() - t0}

            def timed(write) -> float:
                times = []
                for i in range(a.writes):
                    if write is not None:
                        write()
                        idx.mark_dirty()  # as the pipeline does after a committed write
                    t = time.perf_counter()
                    idx.search(queries[i % len(queries)], a.k)
                    times.append(time.perf_counter() - t)
                return statistics.median(times)

            r["search, no write"] = timed(None)

            def upsert(n: int):
                def go():
                    nonlocal n_next
                    store.upsert([doc(j) for j in range(n_next, n_next + n)])
                    n_next += n
                return go

            r["search after 1 upsert"] = timed(upsert(1))
            r["search after 100 upserts"] = timed(upsert(100))
            r["search after 1 delete"] = timed(lambda: store.delete([f"d{next(doomed)}"]))
            results[name] = r
            if name.startswith("incremental"):
                s = idx._snap
                index_bytes = sum(x.nbytes for x in (s.labels, s.doc_len, s.alive, s.df, s.main_ptr, s.main_slot,
                                                     s.main_tf, s.fwd_ptr, s.fwd_term, s.fwd_tf))
                postings = int(len(s.fwd_term))
                del s
            del idx
        store.close()
        merge_rows = {}
        modes = (("foreground merges", False), ("background merges (default)", True))
        for mode, background in modes[1:] if a.merge_modes == "background" else modes:
            if a.merge_rounds <= 0:
                break
            store = DocumentStore(Path(tmp) / f"merge-{background}.sqlite3")  # each mode from the same start
            for i in range(0, a.docs, 1000):
                store.upsert([doc(j) for j in range(i, min(i + 1000, a.docs))])
            idx = BM25Index(store, background_merge=background)
            idx.search(queries[0], a.k)
            merges0, times = idx.merges, []
            b = a.merge_batch
            for i in tqdm(range(a.merge_rounds), desc=mode, unit="round"):
                store.upsert([doc(j) for j in range(a.docs + b * i, a.docs + b * (i + 1))])
                idx.mark_dirty()
                t = time.perf_counter()
                idx.search(queries[i % len(queries)], a.k)
                times.append(time.perf_counter() - t)
            idx.join_merge()
            merge_rows[mode] = (np.percentile(times, 50), np.percentile(times, 99), max(times), idx.merges - merges0)
            store.close()
    new = results["incremental (now)"]
    print(f"\n{a.docs} documents, BM25 leg depth {a.k}, median of {a.writes} rounds")
    print(f"incremental index: {postings:,} postings, {index_bytes / 2**20:.0f} MiB in its arrays; "
          f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB\n")
    if a.skip_baseline:
        print("| | incremental (now) |\n|---|---|")
        for key in new:
            print(f"| {key} | {new[key] * 1e3:.1f} ms |")
    else:
        base = results["rebuild (bm25s, before)"]
        print("| | rebuild (bm25s, before) | incremental (now) | speed-up |")
        print("|---|---|---|---|")
        for key in base:
            print(f"| {key} | {base[key] * 1e3:.1f} ms | {new[key] * 1e3:.1f} ms | {base[key] / new[key]:.1f}x |")
    if merge_rows:
        print(f"\nincremental index, {a.merge_rounds} rounds of ({a.merge_batch}-document batch, search), from {a.docs} documents\n")
        print("| merges | search p50 | p99 | max | merges done |")
        print("|---|---:|---:|---:|---:|")
        for mode, (p50, p99, mx, m) in merge_rows.items():
            print(f"| {mode} | {p50 * 1e3:.1f} ms | {p99 * 1e3:.1f} ms | {mx * 1e3:.1f} ms | {m} |")


if __name__ == "__main__":
    main()
