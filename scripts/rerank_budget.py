"""Score latency at two ``--max-batch-tokens`` budgets, interleaved in one process.

Starts one embedded server per budget (the repo's exported models, the `auto` backend, fresh data
dirs), then sends the same Score calls (``--passages`` SciFact abstracts, one test claim each) to
both in alternating order; the first round only warms. Prints each budget's median/mean/min/max
and the ratio of the medians, so a latency change between two eval runs can be put on the budget
or on the machine.

    python scripts/rerank_budget.py --dataset ../shared/datasets/scifact --models-dir models
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rerankd import config as cfg
from rerankd.client import Client
from rerankd.embedded import EmbeddedServer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True, help="BEIR dataset directory (corpus.jsonl, queries.jsonl)")
    ap.add_argument("--models-dir", type=Path, default=Path("models"))
    ap.add_argument("--budgets", type=int, nargs=2, default=[2048, 8192], metavar=("A", "B"))
    ap.add_argument("--passages", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds per budget (one warm-up round before)")
    a = ap.parse_args()
    with open(a.dataset / "corpus.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line) for _, line in zip(range(a.passages * (a.rounds + 1)), f)]
    with open(a.dataset / "queries.jsonl", encoding="utf-8") as f:
        claims = [json.loads(line)["text"] for _, line in zip(range(a.rounds + 1), f)]
    if len(docs) < a.passages or len(claims) < a.rounds + 1:
        ap.error("the dataset has too few documents or queries for --passages / --rounds")
    if a.budgets[0] == a.budgets[1]:
        ap.error("--budgets: give two different budgets")

    def items(i: int) -> list[dict]:
        window = docs[(i * a.passages) % (len(docs) - a.passages + 1):][:a.passages]
        return [{"id": d["_id"], "text": f"{d.get('title', '')} {d['text']}".strip()} for d in window]

    servers = {}
    dirs = []
    try:
        for b in a.budgets:
            dirs.append(Path(tempfile.mkdtemp(prefix="rerank-budget-")))
            s = cfg.embedded_settings(cfg.Settings()).replace(
                model={"models_dir": a.models_dir}, index={"data_dir": dirs[-1]}, batch={"max_batch_tokens": b})
            srv = EmbeddedServer(s)
            srv.start()
            servers[b] = (srv, Client(srv.target, timeout=600, retries=0))
        st = servers[a.budgets[0]][1].stats()
        print(f"backend {st.backend} {st.precision}, {a.passages} passages per Score, {a.rounds} rounds")
        times: dict[int, list[float]] = {b: [] for b in a.budgets}
        for i in range(a.rounds + 1):
            for b in (a.budgets if i % 2 else a.budgets[::-1]):
                t0 = time.perf_counter()
                servers[b][1].score(claims[i], items(i))
                if i:  # round 0 warms both
                    times[b].append(time.perf_counter() - t0)
        for b, v in times.items():
            print(f"--max-batch-tokens {b}: median {statistics.median(v) * 1e3:.0f} ms, mean {statistics.mean(v) * 1e3:.0f}, "
                  f"min {min(v) * 1e3:.0f}, max {max(v) * 1e3:.0f}")
        x, y = a.budgets
        print(f"ratio of medians {x}/{y}: {statistics.median(times[x]) / statistics.median(times[y]):.2f}")
    finally:
        for srv, client in servers.values():
            client.close()
            srv.stop()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
