"""``rerankd bench``: rerank and Search latency, baselines and rerankd backends in one run.

    rerankd bench --dataset ../shared/datasets/scifact --json bench.json

In one process, on the same weights (the reranker bundle and the checkpoint it was exported
from) and the same 50 real passages per call (max length 256):

1. baseline: sentence-transformers ``CrossEncoder`` (torch fp32) — what users would pick;
2. raw ONNX Runtime fp32: one padded 50 x 256 session run;
3. each rerankd backend/precision the bundles carry, through the engine (batcher + backend);
4. ``Score`` through a real gRPC server on the default configuration (``--backend auto``);
   (``--score-budgets-ms``: the same with soft budgets, and the passages each call scored);
5. ``Search`` end to end (gRPC, hybrid first stage, rerank on) at k = 10, 20, 50, 100;
6. concurrency: N clients calling ``Score`` at once -> pairs/s vs the best single-batch pairs/s.

Prints p50/p95/p99 and the speed-up over the baseline (baseline p50 / row p50) for each row.
This is a benchmark, not a test: numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import config as cfg

log = logging.getLogger("rerankd.bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("bench")
    g.add_argument("--dataset", type=Path, required=True, help="BEIR dataset dir (corpus.jsonl, queries.jsonl)")
    g.add_argument("--runs", type=int, default=30, help="timed calls per row (after 3 warmup calls)")
    g.add_argument("--pairs", type=int, default=50, help="passages per rerank call")
    g.add_argument("--docs", type=int, default=0, help="documents indexed for the Search rows (0 = whole corpus)")
    g.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100], help="Search candidates")
    g.add_argument("--concurrency", type=int, default=8, help="clients in the concurrency row (0 = skip)")
    g.add_argument("--concurrency-seconds", type=float, default=20.0)
    g.add_argument("--score-budgets-ms", type=_budget_ms, nargs="*", default=[],
                   help="also time gRPC Score with these soft budgets (ScoreRequest.budget_ms) and report the "
                        "passages scored per call")
    g.add_argument("--skip-baseline", action="store_true", help="skip sentence-transformers (needs torch)")
    g.add_argument("--skip-search", action="store_true")
    g.add_argument("--variants", nargs="*", default=None,
                   help="engine rows as backend:precision (default: every variant the bundles carry)")
    g.add_argument("--json", type=Path, default=None)
    cfg.add_arguments(parser)


def _budget_ms(text: str) -> int:
    """A --score-budgets-ms value: a budget the server takes (0 means no budget: that is the
    unbudgeted row, already measured)."""
    from .validation import MAX_BUDGET_MS

    try:
        ms = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of milliseconds: {text!r}") from None
    if not 1 <= ms <= MAX_BUDGET_MS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_BUDGET_MS} ms, got {ms}")
    return ms


def _pcts(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)

    def q(p: float) -> float:
        i = min(len(s) - 1, max(0, int(round(p * (len(s) - 1)))))
        return s[i] * 1e3

    return {"p50": statistics.median(s) * 1e3, "p95": q(0.95), "p99": q(0.99), "n": len(s)}


def _read(path: Path, limit: int | None = None) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if limit and len(out) >= limit:
                break
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.settings = cfg.settings_from_args(args)
        self.rows: list[dict[str, Any]] = []
        corpus = _read(args.dataset / "corpus.jsonl")
        self.corpus = corpus
        self.queries = [q["text"] for q in _read(args.dataset / "queries.jsonl")]
        rnd = random.Random(0)
        self.calls = []  # (query, [passage texts]) per call, shared by every row
        for i in range(args.runs + 3):
            docs = rnd.sample(corpus, args.pairs)
            self.calls.append((self.queries[i % len(self.queries)], [f"{d['title']} {d['text']}".strip() for d in docs]))

    def add(self, name: str, times: list[float], **extra: Any) -> dict[str, Any]:
        row = {"name": name, **_pcts(times), **extra}
        self.rows.append(row)
        base = self.rows[0]["p50"] if self.rows and self.rows[0]["name"].startswith("baseline") else None
        row["speedup"] = (base / row["p50"]) if base else None
        print(f"  {name:<52} p50 {row['p50']:8.1f} ms  p95 {row['p95']:8.1f}  p99 {row['p99']:8.1f}"
              + (f"  x{row['speedup']:.1f}" if row["speedup"] else ""), flush=True)
        return row

    def timed(self, fn) -> list[float]:
        for q, ps in self.calls[:3]:
            fn(q, ps)
        out = []
        for q, ps in self.calls[3:]:
            t0 = time.perf_counter()
            fn(q, ps)
            out.append(time.perf_counter() - t0)
        return out

    # -- rows ---------------------------------------------------------------------------------------
    def baseline(self, rr_bundle) -> None:
        src = Path(rr_bundle.manifest["source"]["path"])
        try:
            import torch
            from sentence_transformers import CrossEncoder
        except ImportError as e:
            print(f"  (baseline skipped: {e}; pip install 'rerankd[bench]')")
            return
        if not (src / "config.json").is_file():
            print(f"  (baseline skipped: reranker source {src} not available here)")
            return
        torch.set_num_threads(self.settings.model.threads or (torch.get_num_threads()))
        model = CrossEncoder(str(src), max_length=rr_bundle.max_length, device="cpu", num_labels=1)
        model.model.float()
        self.add("baseline: sentence-transformers CrossEncoder fp32", self.timed(
            lambda q, ps: model.predict([(q, p) for p in ps], batch_size=len(ps), show_progress_bar=False)))

    def raw_ort(self, rr_bundle) -> None:
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(rr_bundle.tokenizer_path))
        tok.enable_truncation(max_length=rr_bundle.max_length, strategy="only_second")
        tok.enable_padding(length=rr_bundle.max_length)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.settings.model.threads or 0
        sess = ort.InferenceSession(str(rr_bundle.variant_file("fp32")), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def run(q, ps):
            enc = tok.encode_batch([(q, p) for p in ps])
            feeds = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                     "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                     "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
            sess.run(None, {k: feeds[k] for k in names})

        self.add(f"raw onnxruntime fp32 ({len(self.calls[0][1])}x{rr_bundle.max_length} padded)", self.timed(run))

    def engine(self, rr_bundle, backend: str, precision: str) -> None:
        from .backends import BackendOptions, create_backend
        from .stages.reranker import Reranker

        try:
            be = create_backend(backend, rr_bundle, BackendOptions.from_settings(self.settings, precision))
        except Exception as e:
            print(f"  (engine {backend}:{precision} skipped: {e})")
            return
        rr = Reranker(rr_bundle, be, self.settings.batch, max_query_tokens=self.settings.model.max_query_tokens)
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(rr.batcher.start())
            rr.batcher.warmup()
            cached = [rr.passage_ids(ps) for _, ps in self.calls]
            calls = iter(range(len(self.calls)))

            def run(q, ps):
                i = next(calls)
                loop.run_until_complete(rr.score_passages(q, rr.query_ids(q), cached[i]))

            times = self.timed(run)
            st = rr.batcher.stats
            self.add(f"rerankd engine {backend}:{precision} (cached tokens)", times,
                     padding_efficiency=round(st.padding_efficiency, 3), batches=st.batches)
        finally:
            loop.run_until_complete(rr.batcher.close())
            loop.close()

    def grpc_rows(self) -> None:
        # a throwaway store (removed after: it holds the corpus's text and embeddings)
        with tempfile.TemporaryDirectory(prefix="rerankd-bench-") as data:
            settings = cfg.embedded_settings(self.settings).replace(index={"data_dir": Path(data)})
            # The concurrency row measures how N concurrent Scores share the batcher, so all N must
            # be admitted: Score shares --max-concurrent-search (default 2) with reranked Search.
            want = max(settings.server.max_concurrent_search, self.args.concurrency)
            # Timed calls repeat their queries and passages: the score cache would time itself.
            settings = settings.replace(server={"max_concurrent_search": want}, model={"rerank_cache_entries": 0})
            self._grpc_rows(settings)

    def _grpc_rows(self, settings) -> None:
        from .client import Client
        from .embedded import EmbeddedServer

        args = self.args
        with EmbeddedServer(settings) as srv, Client(srv.target, timeout=600, retries=0) as c:  # measure refusals, do not hide them
            st = c.stats()
            label = f"{st.backend}:{st.precision}"
            self.add(f"gRPC Score {args.pairs} passages ({label}, default config)", self.timed(
                lambda q, ps: c.score(q, [{"id": str(i), "text": p} for i, p in enumerate(ps)])))
            single_best = args.pairs / (self.rows[-1]["p50"] / 1e3)
            for budget in args.score_budgets_ms:
                self.score_budget(c, budget, label)
            if not args.skip_search:
                docs = self.corpus if not args.docs else self.corpus[: args.docs]
                t0 = time.perf_counter()
                for i in range(0, len(docs), 64):
                    c.upsert([{"id": d["_id"], "title": d.get("title", ""), "text": d["text"] or d.get("title", "")} for d in docs[i:i + 64]])
                rate = len(docs) / (time.perf_counter() - t0)
                print(f"  indexed {len(docs)} documents at {rate:.1f} docs/s")
                self.ingest_docs_per_s = rate
                for k in args.ks:
                    qi = iter(range(10**9))

                    def run(q, ps, k=k):
                        c.search(self.queries[next(qi) % len(self.queries)], top_n=min(10, k), candidates=k)

                    self.add(f"gRPC Search hybrid k={k} rerank ({label})", self.timed(run))
            if args.concurrency:
                self.concurrency(c, srv.target, single_best)

    def score_budget(self, c, budget_ms: int, label: str) -> dict[str, Any]:
        """One row: the same Score calls with a soft budget; latency and how many passages each
        call scored (the timed calls only)."""
        scored: list[int] = []

        def call(q, ps):
            r = c.score(q, [{"id": str(i), "text": p} for i, p in enumerate(ps)], budget_ms=budget_ms, raw=True)
            scored.append(len(ps) - r.unscored_items)

        times = self.timed(call)
        timed = scored[-len(times):]
        row = self.add(f"gRPC Score {self.args.pairs} passages, budget {budget_ms} ms ({label})", times,
                       budget_ms=budget_ms, scored_mean=round(statistics.fmean(timed), 2),
                       scored_min=min(timed), scored_max=max(timed))
        print(f"    scored per call: mean {row['scored_mean']:.1f}, min {row['scored_min']}, max {row['scored_max']}")
        return row

    def concurrency(self, c, target: str, single_best: float) -> None:
        from .client import Client

        args = self.args
        stop = time.perf_counter() + args.concurrency_seconds
        done = [0] * args.concurrency
        errors: list[str] = []
        lat: list[float] = []
        lock = threading.Lock()

        def worker(w: int) -> None:
            with Client(target, timeout=600, retries=0) as cl:
                i = w
                while time.perf_counter() < stop:
                    q, ps = self.calls[i % len(self.calls)]
                    t0 = time.perf_counter()
                    try:
                        cl.score(q, [{"id": str(j), "text": p} for j, p in enumerate(ps)])
                        with lock:
                            lat.append(time.perf_counter() - t0)
                        done[w] += len(ps)
                    except Exception as e:  # counted, reported
                        errors.append(str(e)[:200])
                    i += args.concurrency

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        el = time.perf_counter() - t0
        pps = sum(done) / el
        row = self.add(f"gRPC Score x{args.concurrency} concurrent clients", lat or [0.0],
                       pairs_per_s=round(pps, 1), single_call_pairs_per_s=round(single_best, 1),
                       ratio_to_single=round(pps / single_best, 3) if single_best else None, errors=len(errors))
        print(f"    throughput {pps:.1f} pairs/s vs single-call {single_best:.1f} pairs/s "
              f"= {row['ratio_to_single']:.2f}; errors: {len(errors)}")

    def run(self) -> int:
        from .bundle import ModelBundle
        from .backends import AUTO_ORDER

        s = self.settings
        rr_bundle = ModelBundle.load(s.model.models_dir, s.model.reranker, "rerank")
        print(f"rerank of {self.args.pairs} real passages (max length {rr_bundle.max_length}), "
              f"{self.args.runs} timed calls per row, model {rr_bundle.name}")
        if not self.args.skip_baseline:
            self.baseline(rr_bundle)
        self.raw_ort(rr_bundle)
        variants = self.args.variants
        if variants is None:
            from .backends import onnxruntime_gpu

            variants = [f"{b}:{p}" for b, p, v in AUTO_ORDER[::-1] if v in rr_bundle.manifest.get("variants", {})
                        and (b != "cuda" or onnxruntime_gpu.available())]
            variants += ["openvino:fp32"]
        for v in variants:
            b, _, p = v.partition(":")
            self.engine(rr_bundle, b, p)
        self.grpc_rows()
        if self.args.json:
            from .evaluate import machine_info

            self.args.json.write_text(json.dumps({"rows": self.rows, "machine": machine_info(),
                                                  "ingest_docs_per_s": getattr(self, "ingest_docs_per_s", None)}, indent=2))
        print(self.markdown())
        return 0

    def markdown(self) -> str:
        out = ["| row | p50 ms | p95 ms | p99 ms | x baseline |", "|---|---:|---:|---:|---:|"]
        for r in self.rows:
            sp = f"{r['speedup']:.1f}" if r.get("speedup") else "–"
            name = r["name"]
            if "scored_mean" in r:  # budgeted Score rows: what the latency bought
                name += f"; scored per call {r['scored_mean']:.1f} (min {r['scored_min']}, max {r['scored_max']})"
            out.append(f"| {name} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {sp} |")
        return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    return Bench(args).run()
