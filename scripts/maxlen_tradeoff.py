"""Reranker max length: quality on the held-out train claims vs latency of a 50-passage rerank.

Quality comes from ``quick_eval --holdout --max-length L`` runs (their --json files, passed as
``L=path``); latency is measured here, in this process, for each L: the served reranker variant
(OpenVINO int8, shared compile, as ``rerankd serve`` defaults) on 50 real SciFact pairs truncated
to L tokens, padded to the batcher's largest buckets (32 + 18 rows), median of ``--runs`` calls.

    python scripts/maxlen_tradeoff.py --models-dir models --dataset ../shared/datasets/scifact \
        --quality 128=/tmp/dev-128.json 192=/tmp/dev-192.json 256=/tmp/dev-256.json 384=/tmp/dev-384.json \
        --png docs/maxlen-tradeoff.png --json docs/maxlen-tradeoff.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--quality", nargs="+", required=True, metavar="L=JSON")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    from rerankd.backends import BackendOptions, create_backend
    from rerankd.bundle import ModelBundle
    from rerankd.tokenization import PairTokenizer

    bundle = ModelBundle.load(a.models_dir, "rerankd-ce-MiniLM-L6", "rerank")
    be = create_backend("openvino", bundle, BackendOptions(precision="int8"))
    st = bundle.special_tokens
    docs, queries = [], []
    with open(a.dataset / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            docs.append(f"{d.get('title', '')} {d['text']}")
            if len(docs) >= 50:
                break
    with open(a.dataset / "queries.jsonl", encoding="utf-8") as f:
        queries.append(json.loads(f.readline())["text"])

    rows = []
    for item in a.quality:
        length, _, path = item.partition("=")
        length = int(length)
        q = json.loads(Path(path).read_text())
        tok = PairTokenizer(bundle.tokenizer_path, length, st["cls_id"], st["sep_id"], 64)
        seqs = [tok.assemble(tok.query_ids(queries[0]), p) for p in tok.passage_ids(docs)]
        seqs.sort(key=len, reverse=True)
        batches = []
        for chunk in (seqs[:32], seqs[32:]):
            t = max(len(s) for s in chunk)
            ids = np.zeros((len(chunk), t), np.int64)
            mask, types = np.zeros_like(ids), np.zeros_like(ids)
            for i, s in enumerate(chunk):
                ids[i, : len(s)], mask[i, : len(s)], types[i, : len(s)] = s.input_ids, 1, s.token_type_ids
            batches.append((ids, mask, types))
        for b in batches:  # warm this shape
            be.run(*b)
        ts = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            for b in batches:
                be.run(*b)
            ts.append((time.perf_counter() - t0) * 1000)
        rows.append({"max_length": length, "dev_ndcg10": q["reranked"]["NDCG@10"], "queries": q.get("queries"),
                     "rerank50_p50_ms": round(statistics.median(ts), 1),
                     "mean_tokens_per_pair": round(float(np.mean([len(s) for s in seqs])), 1)})
        print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: r["max_length"])
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "variant": "openvino int8 (served default)",
                                      "quality": "quick_eval --holdout (100 held-out train claims, bf16 autocast)"}, indent=2) + "\n")
    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4))
        xs = [r["max_length"] for r in rows]
        ax.plot(xs, [r["dev_ndcg10"] for r in rows], "o-", color="tab:blue")
        ax.set_xlabel("reranker max length at inference (trained at 256)")
        ax.set_ylabel("NDCG@10, 100 held-out train claims", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(xs, [r["rerank50_p50_ms"] for r in rows], "s--", color="tab:red")
        ax2.set_ylabel("rerank of 50 passages, p50 ms (OpenVINO int8)", color="tab:red")
        ax.set_xticks(xs)
        ax.set_title("Quality peaks at the training length; shorter inputs trade it for speed")
        fig.tight_layout()
        fig.savefig(a.png, dpi=110)
    print("| max length | dev NDCG@10 | rerank 50 p50 ms | tokens/pair |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['max_length']} | {r['dev_ndcg10']:.4f} | {r['rerank50_p50_ms']:.0f} | {r['mean_tokens_per_pair']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
