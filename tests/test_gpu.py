"""The GPU path, checked on a CPU: the fp16 export and its gates, the cuda backend's provider
options, its refusal to run on the CPU by accident, its load-time probe, and ``auto`` resolution.

What cannot be checked here (no GPU, CPU build of onnxruntime): fp16 arithmetic on a GPU,
TensorRT engine builds, and speed. The backend's session is pointed at the CPU provider through
``session_providers`` so that everything around the session (variant choice, I/O, the probe
gate, the reranker stage on top) runs for real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rerankd import backends
from rerankd.backends import BackendOptions, create_backend, onnxruntime_gpu, resolve
from rerankd.bundle import ModelBundle, file_sha256
from rerankd.errors import ConfigError
from rerankd.tokenization import PairTokenizer

from conftest import read_jsonl

from rerankd_export import gpu_variants

MODELS = {"rerank": "rerankd-ce-MiniLM-L6", "embed": "all-MiniLM-L6-v2"}


def _copy_bundle(src: Path, dest: Path) -> Path:
    """A private bundle dir: manifest/tokenizer copied (they get rewritten), big files linked."""
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in ("manifest.json", "tokenizer.json"):
            shutil.copy2(f, dest / f.name)
        elif f.is_file() and not f.name.startswith("model.fp16") and f.name != gpu_variants.PROBE_FILE:
            (dest / f.name).symlink_to(f.resolve())
    return dest


def _vouch_for_probe(bundle_dir: Path) -> None:
    """Record a test-made probe's checksum in the manifest (the backend checks it first: a probe
    that does not match is refused as damaged before its cases are read)."""
    mf = json.loads((bundle_dir / "manifest.json").read_text())
    mf["variants"]["fp16"]["probe"]["sha256"] = file_sha256(bundle_dir / gpu_variants.PROBE_FILE)
    (bundle_dir / "manifest.json").write_text(json.dumps(mf))


@pytest.fixture(scope="module")
def fp16_models(models_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-models")
    for task, name in MODELS.items():
        _copy_bundle(models_dir / name, out / name)
        m = gpu_variants.add_fp16_variant(out / name)
        assert "fp16" in m["variants"], m.get("refused_variants")
    return out


def _pretend_gpu(monkeypatch):
    """A CUDA build of onnxruntime and one GPU, as far as the backend's checks can tell."""
    monkeypatch.setattr(onnxruntime_gpu, "cuda_provider_available", lambda: True)
    monkeypatch.setattr(onnxruntime_gpu, "gpu_count", lambda: 1)
    monkeypatch.setattr(onnxruntime_gpu, "session_providers", lambda *a, **k: [("CPUExecutionProvider", {})])


@pytest.fixture
def on_cpu(monkeypatch):
    """Let the cuda backend build its session on the CPU provider (the only one here)."""
    _pretend_gpu(monkeypatch)
    monkeypatch.setattr(onnxruntime_gpu, "PROVIDER_NAMES", {"cuda": "CPUExecutionProvider", "tensorrt": "CPUExecutionProvider"})


@pytest.mark.parametrize("task", ["rerank", "embed"])
def test_fp16_export_fuses_attention_and_passes_its_gate(fp16_models, task):
    bundle = fp16_models / MODELS[task]
    v = json.loads((bundle / "manifest.json").read_text())["variants"]["fp16"]
    # MiniLM-L6: six layers, each with one fused attention; embeddings + layer norms fused too.
    assert v["fusion"]["Attention"] == 6
    assert v["fusion"]["EmbedLayerNormalization"] == 1
    assert v["fusion"]["SkipLayerNormalization"] == 12
    assert v["parity"]["passed"] is True
    if task == "rerank":
        assert v["parity"]["max_diff_in_sd"] <= gpu_variants.GATES["rerank"]["max_diff_in_sd"]
        assert v["parity"]["pair_agreement"] >= gpu_variants.GATES["rerank"]["min_pair_agreement"]
        assert v["probe"]["gate"] == gpu_variants.GATES["rerank"]
    else:
        assert v["parity"]["min_cosine"] >= 0.999
    # The fp16 graph really holds fp16 weights (about half the fp32 file) and keeps fp32 I/O.
    import onnx

    model = onnx.load(str(bundle / v["file"]), load_external_data=False)
    assert (bundle / v["file"]).stat().st_size < 0.6 * (bundle / "model.onnx").stat().st_size
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    probe = np.load(bundle / v["probe"]["file"])
    assert "reference_0" in probe and "input_ids_0" in probe


def test_fp16_export_is_idempotent(fp16_models):
    bundle = fp16_models / MODELS["rerank"]
    stamp = (bundle / gpu_variants.FP16_FILE).stat().st_mtime_ns
    gpu_variants.add_fp16_variant(bundle)
    assert (bundle / gpu_variants.FP16_FILE).stat().st_mtime_ns == stamp


def test_fp16_gate_refuses_a_variant_past_it(models_dir, tmp_path, monkeypatch):
    bundle = _copy_bundle(models_dir / MODELS["rerank"], tmp_path / "b")
    default_gate = dict(gpu_variants.GATES["rerank"])
    monkeypatch.setitem(gpu_variants.GATES, "rerank", {"max_diff_in_sd": 0.0, "min_pair_agreement": 1.01})
    m = gpu_variants.add_fp16_variant(bundle)
    assert "fp16" not in m["variants"]
    assert m["refused_variants"]["fp16"]["parity"]["passed"] is False
    assert not (bundle / gpu_variants.FP16_FILE).exists()
    # Refusals are remembered under the same gate and optimizer: no retry on every export...
    real = gpu_variants.optimize_fp16
    monkeypatch.setattr(gpu_variants, "optimize_fp16", lambda *a: pytest.fail("a remembered refusal was retried"))
    assert "fp16" not in gpu_variants.add_fp16_variant(bundle)["variants"]
    # ...but a changed gate (or onnxruntime) retries it, and so does --force.
    monkeypatch.setattr(gpu_variants, "optimize_fp16", real)
    monkeypatch.setitem(gpu_variants.GATES, "rerank", default_gate)
    m = gpu_variants.add_fp16_variant(bundle)
    assert "fp16" in m["variants"] and "fp16" not in m.get("refused_variants", {})
    assert (bundle / gpu_variants.FP16_FILE).is_file() and (bundle / gpu_variants.PROBE_FILE).is_file()
    assert "fp16" in gpu_variants.add_fp16_variant(bundle, force=True)["variants"]
    assert not list(bundle.glob("tmp-*"))


def test_fp16_variant_gated_by_an_older_rule_is_regated(models_dir, tmp_path):
    """Bundles exported under the Spearman gate (refused on an H100 for noise among near-tied
    pairs) get the current gate, and a probe carrying it, the next time the fp16 variant is
    added (what `rerankd export --fp16`, or any export where onnxruntime is a GPU build, runs)."""
    bundle = _copy_bundle(models_dir / MODELS["rerank"], tmp_path / "b")
    gpu_variants.add_fp16_variant(bundle)
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    old = {"max_diff_in_sd": 0.05, "min_spearman": 0.999}
    m["variants"]["fp16"]["probe"]["gate"] = m["variants"]["fp16"]["parity"]["gate"] = old
    mf.write_text(json.dumps(m))
    stamp = (bundle / gpu_variants.PROBE_FILE).stat().st_mtime_ns
    v = gpu_variants.add_fp16_variant(bundle)["variants"]["fp16"]
    assert v["probe"]["gate"] == v["parity"]["gate"] == gpu_variants.GATES["rerank"] != old
    assert (bundle / gpu_variants.PROBE_FILE).stat().st_mtime_ns != stamp


def test_fp16_export_refuses_a_graph_without_fused_attention(models_dir, tmp_path, monkeypatch):
    bundle = _copy_bundle(models_dir / MODELS["rerank"], tmp_path / "b")
    real = gpu_variants.optimize_fp16
    monkeypatch.setattr(gpu_variants, "optimize_fp16", lambda *a: {k: v for k, v in real(*a).items() if k != "Attention"})
    m = gpu_variants.add_fp16_variant(bundle)
    assert "fp16" not in m["variants"]
    rec = m["refused_variants"]["fp16"]["parity"]
    assert rec["passed"] is False and "Attention" not in rec["fusion"] and rec["fusion"]["SkipLayerNormalization"] == 12
    assert not (bundle / gpu_variants.FP16_FILE).exists()


def test_cuda_backend_refuses_without_onnxruntime_gpu(fp16_models):
    if onnxruntime_gpu.cuda_provider_available():
        pytest.skip("this onnxruntime is a GPU build")
    bundle = ModelBundle.load(fp16_models, MODELS["rerank"], "rerank")
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        create_backend("cuda", bundle, BackendOptions(precision="fp16"))
    assert onnxruntime_gpu.available() is False


def test_cuda_backend_refuses_a_silent_cpu_fallback(fp16_models, monkeypatch):
    _pretend_gpu(monkeypatch)  # the session ends up on the CPU provider: what a failed CUDA start looks like
    bundle = ModelBundle.load(fp16_models, MODELS["rerank"], "rerank")
    with pytest.raises(ConfigError, match="asked onnxruntime for CUDAExecutionProvider"):
        create_backend("cuda", bundle, BackendOptions(precision="fp16", gpu_provider="cuda"))


def test_cuda_backend_checks_the_device_id(fp16_models, on_cpu):
    bundle = ModelBundle.load(fp16_models, MODELS["rerank"], "rerank")
    with pytest.raises(ConfigError, match="device_id 1 but the CUDA driver reports 1"):
        create_backend("cuda", bundle, BackendOptions(precision="fp16", device_id=1))


def _pairs(scifact, bundle, n=16):
    docs = read_jsonl(scifact / "corpus.jsonl", n)
    queries = [q["text"] for q in read_jsonl(scifact / "queries.jsonl", n)]
    st = bundle.special_tokens
    tok = PairTokenizer(bundle.tokenizer_path, bundle.max_length, st["cls_id"], st["sep_id"], 128)
    passages = tok.passage_ids([f"{d['title']} {d['text']}" for d in docs])
    # four queries spread over n passages: a spread of scores, not only unrelated pairs
    seqs = [tok.assemble(tok.query_ids(queries[i % 4]), passages[i]) for i in range(n)]
    t = max(len(s) for s in seqs)
    ids = np.zeros((n, t), np.int64)
    mask, types = np.zeros_like(ids), np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)], types[i, : len(s)] = s.input_ids, 1, s.token_type_ids
    return ids, mask, types


def test_cuda_backend_fp16_scores_match_fp32_and_pass_the_probe(fp16_models, scifact, on_cpu):
    bundle = ModelBundle.load(fp16_models, MODELS["rerank"], "rerank")
    be = create_backend("cuda", bundle, BackendOptions(precision="fp16", gpu_provider="cuda"))
    assert be.probe_result["checked"] and be.probe_result["passed"]
    assert be.probe_result["rows"] == bundle.manifest["variants"]["fp16"]["parity"]["pairs"]  # every parity pair
    assert be._session._enable_fallback is False  # a failed run raises; it never moves the session to the CPU
    batch = _pairs(scifact, bundle)
    got = be.run(*batch).ravel()
    ref = create_backend("onnxruntime", bundle, BackendOptions(precision="fp32")).run(*batch).ravel()
    assert got.dtype == np.float32
    sd = bundle.manifest["variants"]["fp16"]["parity"]["logit_std_fp32"]
    assert np.max(np.abs(got - ref)) <= 0.05 * sd
    assert list(np.argsort(-got)) == list(np.argsort(-ref))


def test_cuda_backend_embedder_probe(fp16_models, on_cpu):
    bundle = ModelBundle.load(fp16_models, MODELS["embed"], "embed")
    be = create_backend("cuda", bundle, BackendOptions(precision="fp16", gpu_provider="cuda"))
    assert be.probe_result["passed"] and be.probe_result["min_cosine"] >= 0.999


def test_cuda_backend_refuses_to_start_when_the_probe_drifts(fp16_models, tmp_path, on_cpu):
    bundle_dir = _copy_bundle(fp16_models / MODELS["rerank"], tmp_path / "b")
    probe_path = bundle_dir / gpu_variants.PROBE_FILE
    probe = dict(np.load(fp16_models / MODELS["rerank"] / gpu_variants.PROBE_FILE))
    probe["reference_0"] = probe["reference_0"] + 3.0  # what a broken GPU kernel would look like
    (bundle_dir / gpu_variants.FP16_FILE).symlink_to(fp16_models / MODELS["rerank"] / gpu_variants.FP16_FILE)
    with open(probe_path, "wb") as f:
        np.savez(f, **probe)
    _vouch_for_probe(bundle_dir)
    bundle = ModelBundle.load(tmp_path, "b", "rerank")
    with pytest.raises(ConfigError, match="drifted past its gate"):
        create_backend("cuda", bundle, BackendOptions(precision="fp16", gpu_provider="cuda"))


@pytest.mark.parametrize("broken", ["constant", "nan"])
def test_cuda_backend_refuses_a_gpu_that_returns_nonsense(fp16_models, monkeypatch, on_cpu, broken):
    """The load-time probe, fed what a broken GPU path returns: one constant for every pair (the
    drift and the lost order both refuse it) or NaN (never counted as agreement)."""
    from rerankd.backends import onnxruntime_gpu as gpu

    def bad(self, feeds):
        n = len(feeds["input_ids"])
        return np.full((n, 1), -13.0 if broken == "constant" else np.nan, dtype=np.float32)

    monkeypatch.setattr(gpu.OnnxRuntimeGpuBackend, "_run", bad)
    bundle = ModelBundle.load(fp16_models, MODELS["rerank"], "rerank")
    with pytest.raises(ConfigError, match="drifted past its gate") as ei:
        create_backend("cuda", bundle, BackendOptions(precision="fp16", gpu_provider="cuda"))
    assert "'pair_agreement': 0.0" in str(ei.value)


def test_cuda_backend_refuses_an_empty_probe_with_a_config_error(fp16_models, tmp_path, on_cpu):
    bundle_dir = _copy_bundle(fp16_models / MODELS["rerank"], tmp_path / "b")
    (bundle_dir / gpu_variants.FP16_FILE).symlink_to(fp16_models / MODELS["rerank"] / gpu_variants.FP16_FILE)
    with open(bundle_dir / gpu_variants.PROBE_FILE, "wb") as f:
        np.savez(f, nothing=np.zeros(1))
    _vouch_for_probe(bundle_dir)
    bundle = ModelBundle.load(tmp_path, "b", "rerank")
    with pytest.raises(ConfigError, match="has no cases"):  # not a ValueError: auto falls back on it
        create_backend("cuda", bundle, BackendOptions(precision="fp16", gpu_provider="cuda"))


def test_cuda_backend_needs_the_fp16_variant_for_fp16(models_dir, tmp_path, on_cpu):
    d = _copy_bundle(models_dir / MODELS["rerank"], tmp_path / "b")
    m = json.loads((d / "manifest.json").read_text())
    m["variants"].pop("fp16", None)
    (d / "manifest.json").write_text(json.dumps(m))
    bundle = ModelBundle.load(tmp_path, "b", "rerank")
    with pytest.raises(ConfigError, match="--fp16"):
        create_backend("cuda", bundle, BackendOptions(precision="fp16"))
    with pytest.raises(ConfigError, match="precision must be one of"):
        create_backend("cuda", bundle, BackendOptions(precision="int8"))


def test_tensorrt_provider_options_cover_every_bucket(tmp_path):
    opts = BackendOptions(precision="fp16", device_id=1, max_batch=32)
    provs = onnxruntime_gpu.session_providers("tensorrt", "fp16", opts, ["input_ids", "attention_mask"], 256,
                                              tmp_path / "trt")
    (trt, t), (cuda, c) = provs
    assert (trt, cuda) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert t["trt_fp16_enable"] is True and t["device_id"] == 1 and c["device_id"] == 1
    assert t["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1"
    assert t["trt_profile_opt_shapes"] == t["trt_profile_max_shapes"] == "input_ids:32x256,attention_mask:32x256"
    assert t["trt_engine_cache_enable"] is True and t["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert (tmp_path / "trt").is_dir()
    # every key is one the TensorRT provider documents (a typo would be ignored by onnxruntime)
    assert set(t) <= {"device_id", "trt_fp16_enable", "trt_engine_cache_enable", "trt_engine_cache_path",
                      "trt_timing_cache_enable", "trt_timing_cache_path", "trt_profile_min_shapes",
                      "trt_profile_opt_shapes", "trt_profile_max_shapes"}
    (name, c32), = onnxruntime_gpu.session_providers("cuda", "fp32", opts, ["input_ids"], 256, tmp_path / "x")
    assert name == "CUDAExecutionProvider" and c32["use_tf32"] == 0


def _fake(task, variants):
    return ModelBundle(path=Path("/nonexistent"), manifest={"name": "x", "task": task,
                                                            "variants": {v: {"file": "f"} for v in variants}})


def test_auto_prefers_the_gpu_when_there_is_one(monkeypatch):
    b = _fake("rerank", ["fp32", "fp16", "openvino-int8"])
    monkeypatch.setattr(onnxruntime_gpu, "available", lambda: True)
    assert resolve("auto", "auto", [b]) == ("cuda", "fp16")
    # a bundle exported without --fp16 still runs on the GPU, in fp32
    assert resolve("auto", "auto", [_fake("rerank", ["fp32", "openvino-int8"])]) == ("cuda", "fp32")
    assert resolve("cuda", "auto", [b]) == ("cuda", "fp16")
    assert resolve("auto", "fp32", [b]) == ("cuda", "fp32")
    cpu_pick = resolve("auto", "auto", [b], skip=("cuda",))
    assert cpu_pick[0] != "cuda"
    monkeypatch.setattr(onnxruntime_gpu, "available", lambda: False)
    assert resolve("auto", "auto", [b]) == cpu_pick


def test_auto_falls_back_to_the_cpu_when_the_gpu_backend_cannot_start(models_dir, monkeypatch, caplog):
    from rerankd.config import Settings

    bundle = ModelBundle.load(models_dir, MODELS["rerank"], "rerank")
    monkeypatch.setattr(onnxruntime_gpu, "available", lambda: True)  # auto picks cuda; its start fails here
    s = Settings().replace(model={"models_dir": models_dir})
    be, name, prec = backends.create_for(s, bundle)
    assert name != "cuda" and be.name == name
    assert (name, prec) == resolve("auto", "auto", [bundle], skip=("cuda",))
    assert "falls back to the CPU" in caplog.text
    with pytest.raises(ConfigError):  # asked for by name: no fallback
        backends.create_for(Settings().replace(model={"models_dir": models_dir, "backend": "cuda"}), bundle)


def test_cuda_is_a_registered_backend():
    assert "cuda" in backends.available()
    assert "pip install 'onnxruntime-gpu[cuda,cudnn]==" in backends.REGISTRY["cuda"][2]  # as README "GPU" says


def test_gpu_check_script_runs_its_checks(fp16_models, scifact, on_cpu):
    """scripts/gpu_check.py is what a GPU session runs: keep it working between GPU sessions."""
    import importlib.util

    from rerankd.config import BatchConfig

    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    passages = [f"{d['title']} {d['text']}" for d in read_jsonl(scifact / "corpus.jsonl", 3)]
    small = BatchConfig(batch_sizes=(1, 4), seq_buckets=(64, 256), max_batch_tokens=1024)
    r = mod.check_bundle(fp16_models, MODELS["rerank"], "cuda", 1, passages, shapes=((2, 32),), batch_config=small)
    assert r["provider"] == "CPUExecutionProvider" and r["probe"]["passed"]
    assert r["raw"]["2x32"]["p50_ms"] > 0
    assert r["engine"]["pairs"] == 3 and r["engine"]["batches"] >= 1


def test_export_cli_adds_the_fp16_variant(models_dir, tmp_path, monkeypatch, capsys):
    """`rerankd export --defaults --fp16` on up-to-date bundles: only the GPU variant is added."""
    import os

    from rerankd.cli import main

    out = tmp_path / "models"
    for name in MODELS.values():  # hard links: the export rewrites manifests by rename, never in place
        shutil.copytree(models_dir / name, out / name, copy_function=os.link,
                        ignore=shutil.ignore_patterns("model.fp16.onnx", gpu_variants.PROBE_FILE))
        m = json.loads((out / name / "manifest.json").read_text())
        m["variants"].pop("fp16", None)
        (out / name / "manifest.json").unlink()
        (out / name / "manifest.json").write_text(json.dumps(m))
    assert main(["export", "--defaults", "--models-dir", str(out), "--fp16"]) == 0
    printed = capsys.readouterr().out
    assert "fp16 max_diff" in printed and "fp16 min_cos" in printed and "up to date" in printed
    for name in MODELS.values():
        assert "fp16" in json.loads((out / name / "manifest.json").read_text())["variants"]
    # an optimizer failure (not a gate refusal) fails the export only when --fp16 was asked for
    def boom(*a, **k):
        raise RuntimeError("optimizer exploded")

    monkeypatch.setattr(gpu_variants, "add_fp16_variant", boom)
    assert main(["export", "--defaults", "--models-dir", str(out), "--fp16"]) == 1
    monkeypatch.setattr(gpu_variants, "cuda_available", lambda: True)  # --fp16 left to auto
    assert main(["export", "--defaults", "--models-dir", str(out)]) == 0
