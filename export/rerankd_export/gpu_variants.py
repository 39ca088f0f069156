"""The GPU variant of an exported bundle: ``fp16`` — a fused fp16 ONNX graph for ONNX Runtime CUDA.

What it is: ``model.onnx`` put through ONNX Runtime's transformer optimizer (BERT fusions:
``Attention``, ``EmbedLayerNormalization``, ``SkipLayerNormalization``, ``BiasGelu``) and
converted to float16 with float32 inputs/outputs (``keep_io_types``), written as
``model.fp16.onnx``. The fusion matters: measured on an H100 in an earlier session, an
unfused fp16 graph ran 50x256 in 4.0 ms on the CUDA EP against 2.45 ms for torch SDPA, because
ORT then computes attention as separate MatMul/Softmax kernels. The fused operator counts are
recorded in the manifest (``fusion``) and the export refuses the variant when no attention was
fused, since it would not be the fast path it claims to be.

TensorRT needs no file of its own: the TensorRT execution provider builds its fp16 engine from
the fp32 ``model.onnx`` on the serving GPU (TensorRT does its own fusions; ORT's contrib ops in
the fused graph are not TensorRT operators) and caches it there.

Accuracy, in two places:

* **export** (here, on any machine): the fp16 graph is run by ONNX Runtime's CPU provider on the
  parity cases and gated against fp32 (embed: min cosine >= 0.999; rerank: worst drift <= 0.05 sd
  of the fp32 logits and pair agreement >= 0.999, see ``rerankd.drift``). On a CPU, ONNX Runtime computes the fp16 operators it
  has no fp16 kernel for in fp32, so this gate checks the graph, the fusions and fp16 weight
  rounding, not fp16 arithmetic;
* **first load on the GPU** (``rerankd.backends.onnxruntime_gpu``): the backend re-runs every
  parity case, stored here (``gpu-probe.npz``: the inputs and their fp32 outputs), on the
  device it will serve from and refuses to start past the same gate. That check is the one that
  covers fp16 arithmetic, cuDNN/cuBLAS kernels and TensorRT engines.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from rerankd.bundle import file_sha256 as _sha

from . import durable, parity
from .gates import GateError, check_gate

log = logging.getLogger("rerankd_export.gpu")

FP16_FILE = "model.fp16.onnx"
PROBE_FILE = "gpu-probe.npz"
GATES = {
    "embed": {"min_cosine": 0.999},
    "rerank": {"max_diff_in_sd": 0.05, "min_pair_agreement": 0.999},  # rerankd.drift says why not Spearman
}


def cuda_available() -> bool:
    """True when the installed onnxruntime is a GPU build (onnxruntime-gpu): the service's own check."""
    from rerankd.backends.onnxruntime_gpu import cuda_provider_available

    return cuda_provider_available()


def optimize_fp16(fp32_path: Path, out_path: Path) -> dict:
    """Fuse and convert ``fp32_path`` to a float16 graph at ``out_path``; returns the fusion counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    # opt_level=0: only the optimizer's own (provider-independent) fusions, no ORT session pass
    # that could bake CPU-specific operators into a graph meant for the CUDA provider.
    # num_heads/hidden_size 0: read from the graph. The fused graph keeps int64 inputs (the
    # optimizer casts to int32 in front of EmbedLayerNormalization).
    model = optimize_model(str(fp32_path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0,
                           use_gpu=True)
    fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(out_path))
    return fused


def _probe_arrays(task: str, cases, refs) -> dict[str, np.ndarray]:
    """Every parity case as probe arrays: ``<input>_<i>`` (int32) and ``reference_<i>`` (fp32 outputs).

    All of them, not a few batches: the rerank cases spread the logits (sd ~7 for the shipped
    reranker) over ~80 pairs, so rank agreement is measured over real gaps rather than over a
    handful of unrelated pairs whose logits differ by 1e-4 (one swapped near-tie among 24 pairs
    already costs 0.0009 of Spearman).
    """
    out: dict[str, np.ndarray] = {}
    for i, (case, ref) in enumerate(zip(cases, refs)):
        for name, arr in case.encoding.items():
            out[f"{name}_{i}"] = np.asarray(arr, dtype=np.int32)
        if task == "embed":  # vectors, not the [B, T, H] hidden states: the probe stays small
            out[f"reference_{i}"] = parity.mean_pool_normalize(ref, case.encoding["attention_mask"]).astype(np.float32)
        else:
            out[f"reference_{i}"] = np.asarray(ref, dtype=np.float32)
    return out


def _refusal_key(task: str) -> dict:
    import onnxruntime

    return {"gate": GATES[task], "onnxruntime": onnxruntime.__version__}


def add_fp16_variant(bundle_dir: str | os.PathLike[str], *, force: bool = False) -> dict:
    """Add the gated ``fp16`` variant and its GPU probe to an exported bundle (idempotent, process-safe)."""
    from .export import _bundle_lock

    bundle = Path(bundle_dir)
    with _bundle_lock(bundle):  # the export's own lock: one writer of the bundle's manifest at a time
        return _add(bundle, force=force)


def _add(bundle: Path, *, force: bool) -> dict:
    mf_path = bundle / "manifest.json"
    manifest = json.loads(mf_path.read_text(encoding="utf-8"))
    task, max_length, inputs, output = manifest["task"], int(manifest["max_length"]), list(manifest["inputs"]), manifest["output"]
    variants = manifest.setdefault("variants", {})
    current = variants.get("fp16")
    refusal = manifest.get("refused_variants", {}).get("fp16")
    # A refusal stands until --force, or until the gate or the optimizer (onnxruntime) changes.
    if not force and refusal and refusal.get("key") == _refusal_key(task):
        return manifest
    # An accepted variant is kept while its files are intact and its gate is today's: a bundle gated
    # by an older rule is re-gated (and its probe re-written with the new gate) on the next export.
    if not force and current and current.get("probe", {}).get("gate") == GATES[task] and all(
        (bundle / f).is_file() and _sha(bundle / f) == sha
        for f, sha in ((current["file"], current["sha256"]), (current["probe"]["file"], current["probe"]["sha256"]))
    ):
        return manifest
    tok = parity.load_bundle_tokenizer(bundle / "tokenizer.json")
    parity.configure_tokenizer(tok, max_length, task, manifest["special_tokens"].get("pad_id", 0), "[PAD]")
    cases = parity.build_cases(task, tok, inputs, max_length)
    ref_session = parity.onnx_session(bundle / "model.onnx")
    refs = [parity.run_onnx(ref_session, c.encoding, output) for c in cases]

    # Built and gated under temporary names; renamed into place only once it passed, so a crash or
    # a refusal never leaves an ungated model.fp16.onnx behind a manifest entry.
    out, probe = bundle / FP16_FILE, bundle / PROBE_FILE
    tmp_out, tmp_probe = bundle / ("tmp-" + FP16_FILE), bundle / ("tmp-" + PROBE_FILE)
    refused = manifest.setdefault("refused_variants", {})
    try:
        fused = optimize_fp16(bundle / "model.onnx", tmp_out)
        if not fused.get("Attention", 0) + fused.get("MultiHeadAttention", 0):
            err = GateError(f"fp16 ({task}) refused: ONNX Runtime's optimizer fused no attention ({fused}); "
                            "the unfused fp16 graph is slower than the CUDA path it is for")
            err.record = {"fusion": fused, "passed": False}
            raise err
        session = parity.onnx_session(tmp_out)
        outs = [parity.run_onnx(session, c.encoding, output) for c in parity._bar(cases, f"gate fp16 ({task})")]
        rec = check_gate(task, "fp16", GATES[task], cases, refs, outs, log,
                         reference="onnxruntime fp32 (fp16 graph run by the CPU provider: graph + weight rounding)")
        with open(tmp_probe, "wb") as f:
            np.savez_compressed(f, **_probe_arrays(task, cases, refs))
    except GateError as exc:
        log.error("%s: %s", manifest["name"], exc)
        for f in (tmp_out, tmp_probe, out, probe):  # the old variant, if any, is no longer listed either
            f.unlink(missing_ok=True)
        variants.pop("fp16", None)
        refused["fp16"] = {"parity": exc.record, "key": _refusal_key(task)}
    except BaseException:
        tmp_out.unlink(missing_ok=True)
        tmp_probe.unlink(missing_ok=True)
        raise
    else:
        durable.replace(tmp_out, out)
        durable.replace(tmp_probe, probe)
        refused.pop("fp16", None)
        variants["fp16"] = {
            "file": FP16_FILE, "sha256": _sha(out), "for": "onnxruntime CUDA execution provider",
            "fusion": fused, "parity": rec,
            "probe": {"file": PROBE_FILE, "sha256": _sha(probe), "gate": GATES[task], "cases": len(cases),
                      "note": "re-run on the serving GPU at load; the backend refuses to start past the gate"},
        }
    if not refused:
        manifest.pop("refused_variants", None)
    durable.write_text(mf_path, json.dumps(manifest, indent=2) + "\n")
    return manifest
