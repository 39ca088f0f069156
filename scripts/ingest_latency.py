"""First-stage Search latency while one bulk Upsert runs: query priority on/off, batch token budget.

Starts embedded servers (fresh data dirs, the repo's exported models), upserts ``--upsert-docs``
SciFact documents in one call on a thread and, meanwhile, sends a first-stage-only Search
(``rerank=false``) every 0.5 s. The configurations run one after the other in one process;
"priority off" replaces the batcher's priority flag with False (the behaviour before query-side
work had its own queue). Prints one line per configuration.

    python scripts/ingest_latency.py --dataset ../shared/datasets/scifact --models-dir models
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from rerankd import batcher as batcher_mod
from rerankd.client import Client
from rerankd.config import Settings
from rerankd.embedded import EmbeddedServer


def _docs(dataset: Path, tag: str, n: int) -> list[dict]:
    out = []
    with open(dataset / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            out.append({"id": f"{tag}-{len(out)}", "title": d.get("title", ""), "text": d.get("text", "")})
            if len(out) == n:
                break
    return out


def measure(args, priority: bool, budget: int) -> dict:
    real = batcher_mod.Batcher.submit

    async def submit(self, seqs, deadline=None, *, priority=False):
        return await real(self, seqs, deadline, priority=priority and use_priority)

    use_priority = priority
    batcher_mod.Batcher.submit = submit
    try:
        settings = Settings().replace(model={"models_dir": Path(args.models_dir)},
                                      index={"data_dir": Path(tempfile.mkdtemp(prefix="ingest-latency-"))},
                                      server={"listen": "127.0.0.1:0"}, batch={"max_batch_tokens": budget})
        with EmbeddedServer(settings) as srv, Client(srv.target, timeout=600, retries=0) as c:
            c.upsert(_docs(args.dataset, "seed", 16))
            done, lat = threading.Event(), []
            took = {}

            def upsert():
                t = time.perf_counter()
                c.upsert(_docs(args.dataset, "bulk", args.upsert_docs))
                took["upsert_s"] = time.perf_counter() - t
                done.set()

            th = threading.Thread(target=upsert)
            th.start()
            time.sleep(0.5)
            while not done.is_set():
                t = time.perf_counter()
                c.search("aspirin and colorectal cancer", rerank=False, top_n=5, candidates=20)
                lat.append((time.perf_counter() - t) * 1e3)
                time.sleep(0.5)
            th.join()
    finally:
        batcher_mod.Batcher.submit = real
    return {"priority": priority, "max_batch_tokens": budget, "upsert_s": round(took["upsert_s"], 1),
            "searches": len(lat), "p50_ms": round(statistics.median(lat)), "max_ms": round(max(lat))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--upsert-docs", type=int, default=128)
    args = ap.parse_args()
    for priority, budget in ((False, 8192), (True, 8192), (True, 2048)):
        print(json.dumps(measure(args, priority, budget)), flush=True)


if __name__ == "__main__":
    main()
