"""Check the ``cuda`` backend on a real GPU: load-time probe (fp16 drift on GPU arithmetic) and speed.

Runs with numpy, onnxruntime-gpu and (optionally) tokenizers only — no grpc, no torch — so that it
works on a bare GPU image with ``PYTHONPATH=service``. For each bundle under ``--models`` that has
an fp16 variant, and each provider this onnxruntime can start, it:

1. builds the backend exactly as the server does (``rerankd.backends.create_backend``), which runs
   the probe batches on the GPU and refuses past the gate — the probe figures are printed;
2. times raw batches of bucket shapes (1, 16 and 32 x 256) and the two batches a 50-passage rerank
   of full-length passages becomes under the default 8,192-token budget (32x256 + 18x256; the
   engine pads the 18 to the 32 bucket), medians over ``--runs``;
3. for a reranker with its tokenizer, times the whole engine path (``Reranker.score_passages``, no score cache:
   cached passage tokens, batcher, buckets) on 50 real passages when ``--passages`` is given.

Writes everything to ``--json``. Usage on the device (see scripts/gpu_check.sh)::

    PYTHONPATH=/tmp/site:service python3 scripts/gpu_check.py --models .gpucheck --json $OUT/gpu-check.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np


SHAPES = ((1, 256), (16, 256), (32, 256))


def _median_ms(fn, runs: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000)
    ts.sort()
    return {"p50_ms": round(statistics.median(ts), 3), "p95_ms": round(ts[int(0.95 * (len(ts) - 1))], 3), "runs": runs}


def _batch(rng, b: int, t: int, vocab: int = 30000):
    ids = rng.integers(1000, vocab, size=(b, t), dtype=np.int64)
    ids[:, 0] = 101
    ids[:, -1] = 102
    types = np.zeros_like(ids)
    types[:, t // 8:] = 1  # a short query, then the passage
    return ids, np.ones_like(ids), types


def check_bundle(models: Path, name: str, provider: str, runs: int, passages: list[str],
                 shapes=SHAPES, batch_config=None) -> dict:
    from rerankd.backends import BackendOptions, create_backend
    from rerankd.bundle import ModelBundle

    manifest = json.loads((models / name / "manifest.json").read_text())
    bundle = ModelBundle.load(models, name, manifest["task"])
    out: dict = {"bundle": name, "task": manifest["task"], "requested_provider": provider}
    t0 = time.perf_counter()
    be = create_backend("cuda", bundle, BackendOptions(precision="fp16", gpu_provider=provider,
                                                       tensorrt_cache_dir=str(models / ".tensorrt-cache")))
    out.update(load_s=round(time.perf_counter() - t0, 2), provider=be.provider, probe=be.probe_result)
    rng = np.random.default_rng(0)
    out["raw"] = {}
    for b, t in shapes:
        batch = _batch(rng, b, t)
        out["raw"][f"{b}x{t}"] = _median_ms(lambda: be.run(*batch), runs)
    if shapes == SHAPES:
        two = [_batch(rng, 32, 256), _batch(rng, 18, 256)]
        out["raw"]["50 pairs as 32x256 + 18x256"] = _median_ms(lambda: [be.run(*x) for x in two], runs)
    if manifest["task"] == "rerank" and passages:
        try:  # the probe and raw figures above stay reported even if the engine path fails
            out["engine"] = engine_timing(bundle, be, passages, runs, batch_config)
        except Exception:
            out["engine_error"] = traceback.format_exc()
    return out


def engine_timing(bundle, be, passages: list[str], runs: int, batch_config=None) -> dict:
    from rerankd.config import BatchConfig
    from rerankd.stages.reranker import Reranker

    rr = Reranker(bundle, be, batch_config or BatchConfig(), max_query_tokens=128)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(rr.batcher.start())
        rr.batcher.warmup()
        cached = rr.passage_ids(passages[:50])
        q = "Aspirin use reduces the risk of colorectal adenoma."
        qids = rr.query_ids(q)
        res = _median_ms(lambda: loop.run_until_complete(rr.score_passages(q, qids, cached)), runs)
        st = rr.batcher.stats
        res.update(pairs=len(cached), batches=st.batches, padding_efficiency=round(st.padding_efficiency, 3))
        return res
    finally:
        loop.run_until_complete(rr.batcher.close())
        loop.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, required=True, help="bundle dir(s) parent: each with manifest + model.fp16.onnx + gpu-probe.npz")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--passages", type=Path, default=None, help="corpus.jsonl for the engine timing (first 50 docs)")
    a = p.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    report: dict = {"python": sys.version.split()[0], "machine": platform.node(), "onnxruntime": ort.__version__,
                    "available_providers": ort.get_available_providers(), "results": [], "errors": []}
    try:
        from rerankd.backends import onnxruntime_gpu

        report["gpu_count"] = onnxruntime_gpu.gpu_count()
        report["tensorrt_loadable"] = onnxruntime_gpu._tensorrt_loadable()
    except Exception:
        report["errors"].append(traceback.format_exc())
    passages: list[str] = []
    if a.passages and a.passages.is_file():
        with open(a.passages, encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                passages.append(f"{d.get('title', '')} {d.get('text', '')}".strip())
                if len(passages) >= 50:
                    break
    names = sorted(d.name for d in a.models.iterdir() if (d / "manifest.json").is_file())
    for name in names:
        # TensorRT compiles the fp32 model.onnx, which prepare does not carry (64 MiB per call) unless asked
        trt = report.get("tensorrt_loadable") and (a.models / name / "model.onnx").is_file()
        for provider in ["cuda"] + (["tensorrt"] if trt else []):
            try:
                r = check_bundle(a.models, name, provider, a.runs, passages)
                report["results"].append(r)
                if "engine_error" in r:
                    report["errors"].append(f"{name} {provider} engine: {r['engine_error']}")
                print(json.dumps(r), flush=True)
            except Exception:
                report["errors"].append(f"{name} {provider}: {traceback.format_exc()}")
                print(report["errors"][-1], file=sys.stderr, flush=True)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))
    return 0 if report["results"] and not report["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
