"""Backends against the ONNX Runtime fp32 reference, the registry, and `auto` resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rerankd import backends
from rerankd.backends import BackendOptions, create_backend, resolve
from rerankd.bundle import ModelBundle
from rerankd.errors import ConfigError
from rerankd.stages.embedder import mean_pool
from rerankd.tokenization import PairTokenizer, TextTokenizer

from conftest import read_jsonl

VARIANTS = [("onnxruntime", "int8", "int8"), ("openvino", "fp32", "fp32"),
            ("openvino", "bf16", "openvino-bf16"), ("openvino", "int8", "openvino-int8")]


def _pad(seqs):
    t = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), t), np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)], types[i, : len(s)] = s.input_ids, 1, s.token_type_ids
    return ids, mask, types


@pytest.fixture(scope="module")
def real_text(scifact):
    docs = read_jsonl(scifact / "corpus.jsonl", 24)
    queries = [q["text"] for q in read_jsonl(scifact / "queries.jsonl", 24)]
    return queries, [f"{d['title']} {d['text']}" for d in docs]


@pytest.mark.parametrize("backend,precision,variant", VARIANTS)
def test_reranker_backend_matches_onnxruntime_fp32(models_dir, real_text, backend, precision, variant):
    bundle = ModelBundle.load(models_dir, "rerankd-ce-MiniLM-L6", "rerank")
    if variant not in bundle.manifest["variants"]:
        pytest.skip(f"bundle has no {variant} variant on this machine")
    queries, passages = real_text
    st = bundle.special_tokens
    tok = PairTokenizer(bundle.tokenizer_path, bundle.max_length, st["cls_id"], st["sep_id"], 128)
    pairs = [tok.assemble(tok.query_ids(q), p) for q, p in zip(queries, tok.passage_ids(passages))]
    batch = _pad(pairs[:16])
    ref = create_backend("onnxruntime", bundle, BackendOptions(precision="fp32")).run(*batch).ravel()
    got = create_backend(backend, bundle, BackendOptions(precision=precision)).run(*batch).ravel()
    # The tolerance each variant was gated at when exported (fp32: the export parity tolerance;
    # OpenVINO variants: a fraction of the fp32 logits' spread, plus rank agreement).
    parity = bundle.manifest["variants"][variant]["parity"]
    gate = parity.get("gate")
    if variant == "fp32":
        tol = 1e-3
    elif isinstance(gate, dict) and "max_diff_in_sd" in gate:
        # The drift bound scales with the logits' spread on the gate's pairs (these 16 pairs are
        # all non-relevant and tightly clustered, so rank agreement among them is not meaningful:
        # the gate's Spearman is measured at export over pairs with a real spread).
        tol = gate["max_diff_in_sd"] * parity["logit_std_fp32"]
    else:
        tol = gate["max_abs_diff"] if isinstance(gate, dict) else float(gate)
    assert np.max(np.abs(ref - got)) <= tol, (np.max(np.abs(ref - got)), tol)


@pytest.mark.parametrize("backend,precision,variant", VARIANTS)
def test_embedder_backend_matches_onnxruntime_fp32(models_dir, real_text, backend, precision, variant):
    bundle = ModelBundle.load(models_dir, "all-MiniLM-L6-v2", "embed")
    if variant not in bundle.manifest["variants"]:
        pytest.skip(f"bundle has no {variant} variant on this machine")
    _, passages = real_text
    seqs = TextTokenizer(bundle.tokenizer_path, bundle.max_length).encode(passages[:12])
    ids, mask, types = _pad(seqs)
    ref = mean_pool(create_backend("onnxruntime", bundle, BackendOptions(precision="fp32")).run(ids, mask, types), mask, True)
    got = mean_pool(create_backend(backend, bundle, BackendOptions(precision=precision)).run(ids, mask, types), mask, True)
    min_cos = float(np.min(np.sum(ref * got, axis=1)))
    floor = 0.9999 if variant == "fp32" else bundle.manifest["variants"][variant]["parity"].get("min_cosine", 0.98) - 0.01
    assert min_cos >= min(floor, 0.98 if "int8" in variant else 0.995), min_cos


def test_openvino_per_shape_compiles_each_bucket_and_shared_compiles_once(models_dir):
    bundle = ModelBundle.load(models_dir, "rerankd-ce-MiniLM-L6", "rerank")
    per = create_backend("openvino", bundle, BackendOptions(precision="fp32", openvino_compile="per-shape"))
    shared = create_backend("openvino", bundle, BackendOptions(precision="fp32", openvino_compile="shared"))
    rng = np.random.default_rng(0)
    for be in (per, shared):
        assert be.static_shapes()  # both: the batcher pads to buckets and warms each one
    for b, t in ((1, 32), (2, 64), (1, 32)):
        ids = rng.integers(1000, 20000, (b, t), dtype=np.int64)
        ids[:, 0] = 101
        args = (ids, np.ones((b, t), np.int64), np.zeros((b, t), np.int64))
        a, c = per.run(*args), shared.run(*args)
        assert a.shape[0] == b and c.shape == a.shape
        assert np.max(np.abs(a - c)) < 1e-3  # the same graph, fp32: same scores either way
    assert sorted(per._compiled) == [(1, 32), (2, 64)]
    assert len({id(m) for m in per._compiled.values()}) == 2  # one compiled model per bucket
    assert sorted(shared._compiled) == [(1, 32), (2, 64)]
    assert len({id(m) for m in shared._compiled.values()}) == 1  # one model, a request per bucket
    with pytest.raises(ConfigError, match="openvino_compile"):
        create_backend("openvino", bundle, BackendOptions(precision="fp32", openvino_compile="sometimes"))


def test_unknown_backend_lists_valid_ones(models_dir):
    bundle = ModelBundle.load(models_dir, "rerankd-ce-MiniLM-L6", "rerank")
    with pytest.raises(ConfigError) as ei:
        create_backend("tensorrt-llm", bundle, BackendOptions())
    assert "onnxruntime" in str(ei.value) and "openvino" in str(ei.value)


def test_missing_dependency_names_install_command(models_dir, monkeypatch):
    bundle = ModelBundle.load(models_dir, "rerankd-ce-MiniLM-L6", "rerank")
    monkeypatch.setitem(backends.REGISTRY, "fancy", ("rerankd.backends.does_not_exist", "X", "pip install 'fancy-runtime'"))
    with pytest.raises(ConfigError) as ei:
        create_backend("fancy", bundle, BackendOptions())
    assert "pip install 'fancy-runtime'" in str(ei.value)


def test_missing_variant_is_a_clear_error(models_dir, tmp_path):
    src = models_dir / "rerankd-ce-MiniLM-L6"
    dst = tmp_path / "rr"
    dst.mkdir()
    mf = json.loads((src / "manifest.json").read_text())
    mf["variants"] = {"fp32": mf["variants"]["fp32"]}
    mf.pop("refused_variants", None)  # never built (a refused one has its own message)
    (dst / "manifest.json").write_text(json.dumps(mf))
    bundle = ModelBundle.load(tmp_path, "rr", "rerank")
    with pytest.raises(ConfigError) as ei:
        create_backend("onnxruntime", bundle, BackendOptions(precision="int8"))
    assert "int8" in str(ei.value) and "re-export" in str(ei.value)


def test_auto_resolution_prefers_gated_fast_variants(models_dir, monkeypatch):
    from rerankd.backends import openvino_cpu

    b = [ModelBundle.load(models_dir, "all-MiniLM-L6-v2", "embed"), ModelBundle.load(models_dir, "rerankd-ce-MiniLM-L6", "rerank")]
    assert resolve("onnxruntime", "fp32", b) == ("onnxruntime", "fp32")
    have = set.intersection(*(set(x.manifest["variants"]) for x in b))
    if "openvino-int8" in have:
        monkeypatch.setattr(openvino_cpu, "has_int8_dot", lambda: True)
        assert resolve("auto", "auto", b) == ("openvino", "int8")
        # Without VNNI/AMX int8 is slower than fp32 (measured): auto takes fp32 (bf16 if the CPU
        # has it); int8 asked for by name is still served.
        monkeypatch.setattr(openvino_cpu, "has_int8_dot", lambda: False)
        monkeypatch.setattr(openvino_cpu, "has_bf16", lambda: False)
        assert resolve("auto", "auto", b) == ("openvino", "fp32")
        assert resolve("auto", "int8", b) == ("openvino", "int8")
        assert resolve("openvino", "auto", b) == ("openvino", "fp32")
        monkeypatch.undo()
    assert resolve("auto", "fp32", b) == ("openvino", "fp32")
    assert resolve("onnxruntime", "auto", b) == ("onnxruntime", "fp32")  # int8 ORT only when asked for
    for bb in b:  # each model resolves on its own: a refused variant is never picked
        vs = bb.manifest["variants"]
        if "openvino-int8" in vs or "int8" in vs:
            assert resolve("auto", "int8", [bb])[1] == "int8"
        else:
            with pytest.raises(ConfigError):
                resolve("auto", "int8", [bb])
    # Without bf16 hardware, auto never picks bf16.
    monkeypatch.setattr(openvino_cpu, "has_bf16", lambda: False)
    for bb in b:
        monkeypatch.setitem(bb.manifest, "variants", {k: v for k, v in bb.manifest["variants"].items() if k != "openvino-int8"})
    assert resolve("auto", "auto", b) == ("openvino", "fp32")
    assert resolve("auto", "auto", b, skip=("openvino",)) == ("onnxruntime", "fp32")


def test_int8_dot_detection(monkeypatch):
    from rerankd.backends import openvino_cpu

    for flags, want in (({"avx2", "fma"}, False), ({"avx2", "avx_vnni"}, True),
                        ({"avx512f", "avx512_vnni"}, True), ({"amx_int8"}, True), (set(), False)):
        monkeypatch.setattr(openvino_cpu, "cpu_flags", lambda f=flags: set(f))
        assert openvino_cpu.has_int8_dot() is want, flags
