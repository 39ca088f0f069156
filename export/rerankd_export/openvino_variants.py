"""OpenVINO variants of an exported bundle, each behind an accuracy gate.

* ``openvino-bf16``: no new file — the fp32 ``model.onnx`` run by OpenVINO with
  ``INFERENCE_PRECISION_HINT=bf16``. Measured here against ONNX Runtime fp32 on the parity cases.
* ``openvino-int8``: NNCF post-training quantization (``ModelType.TRANSFORMER``, mixed preset)
  calibrated on real text (the parity texts plus ``--calibration-jsonl`` corpus text), saved as
  OpenVINO IR ``model.ov-int8.xml/.bin`` and gated the same way — run, like it is served, with
  bf16 for the float ops left (``INFERENCE_PRECISION_HINT=bf16``) on CPUs that have it.

Gates (stated once, here): embed — min cosine to fp32 >= 0.995 (bf16) / 0.98 (int8);
rerank — worst |logit diff| <= 0.5 x the standard deviation of the fp32 logits over the gate's
pairs, and Spearman over all pairs >= 0.99 (both variants). A reranker's output is only ever used
to *order* candidates, so the gate is relative to the spread of its scores, not an absolute logit
budget: a model trained to a wider logit range drifts more in absolute terms under the same
quantization. Measured on SciFact test through the served pipeline (hybrid top-k, `docs/`): the
NNCF int8 reranker that passes this gate (worst drift 0.09 sd, Spearman 0.997) scores NDCG@10
within 0.002 of bf16 at k = 10, 20 and 50. A variant that fails its gate is refused: not written
to the manifest (its files are removed) but recorded under ``refused_variants``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rerankd.bundle import file_sha256 as _sha, variant_problems

from . import durable, parity
from .gates import GateError, check_gate

log = logging.getLogger("rerankd_export.openvino")

GATES = {
    ("embed", "openvino-bf16"): {"min_cosine": 0.995},
    ("embed", "openvino-int8"): {"min_cosine": 0.98},
    ("rerank", "openvino-bf16"): {"max_diff_in_sd": 0.5, "min_spearman": 0.99},
    ("rerank", "openvino-int8"): {"max_diff_in_sd": 0.5, "min_spearman": 0.99},
}
INT8_FILE = "model.ov-int8.xml"


def _compile(core, model, precision_hint: str):
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision_hint, "PERFORMANCE_HINT": "LATENCY"})


def _run(compiled, encoding: dict, inputs: Sequence[str]) -> np.ndarray:
    req = compiled.create_infer_request()
    req.infer({k: np.asarray(encoding[k], dtype=np.int64) for k in inputs})
    return np.array(req.get_output_tensor(0).data, copy=True)


def _gate(task: str, variant: str, cases, ref_outputs, outputs) -> dict:
    return check_gate(task, variant, GATES[(task, variant)], cases, ref_outputs, outputs, log)


def _calibration_texts(path: Path | None, limit: int) -> list[str]:
    if path is None:
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            out.append(((d.get("title") or "") + " " + d.get("text", "")).strip())
            if len(out) >= limit:
                break
    return out


def add_openvino_variants(bundle_dir: str | os.PathLike[str], *, int8: bool = True, bf16: bool = True,
                          calibration_jsonl: Path | None = None, calibration_size: int = 128) -> dict:
    """Add gated OpenVINO variants to an exported bundle's manifest (idempotent, process-safe)."""
    from .export import _bundle_lock

    bundle = Path(bundle_dir)
    with _bundle_lock(bundle):  # the export's own lock: one writer of the bundle's manifest at a time
        return _add_variants(bundle, int8=int8, bf16=bf16, calibration_jsonl=calibration_jsonl,
                             calibration_size=calibration_size)


def _add_variants(bundle: Path, *, int8: bool, bf16: bool, calibration_jsonl: Path | None, calibration_size: int) -> dict:
    import nncf
    import openvino as ov

    from rerankd.backends.openvino_cpu import has_bf16

    mf_path = bundle / "manifest.json"
    manifest = json.loads(mf_path.read_text())
    task, max_length, inputs = manifest["task"], int(manifest["max_length"]), list(manifest["inputs"])
    variants = manifest.setdefault("variants", {})
    refused = manifest.get("refused_variants", {})
    want_bf16 = bf16 and has_bf16() and "openvino-bf16" not in variants and "openvino-bf16" not in refused
    want_int8 = int8 and "openvino-int8" not in refused and not (
        variants.get("openvino-int8") and not variant_problems(bundle, variants["openvino-int8"]))
    if not (want_bf16 or want_int8):
        return manifest
    tok = parity.load_bundle_tokenizer(bundle / "tokenizer.json")
    parity.configure_tokenizer(tok, max_length, task, manifest["special_tokens"].get("pad_id", 0), "[PAD]")
    extra = _calibration_texts(calibration_jsonl, calibration_size)
    cases = parity.build_cases(task, tok, inputs, max_length, extra_texts=extra)
    session = parity.onnx_session(bundle / "model.onnx")
    output = manifest["output"]
    refs = [parity.run_onnx(session, c.encoding, output) for c in cases]
    core = ov.Core()
    fp32_model = core.read_model(str(bundle / "model.onnx"))

    if want_bf16:
        compiled = _compile(core, fp32_model, "bf16")
        outs = [_run(compiled, c.encoding, inputs) for c in parity._bar(cases, f"gate openvino-bf16 ({task})")]
        try:
            variants["openvino-bf16"] = {"file": "model.onnx", "sha256": _sha(bundle / "model.onnx"),
                                         "inference_precision": "bf16", "parity": _gate(task, "openvino-bf16", cases, refs, outs)}
        except GateError as exc:
            log.error("%s: %s", manifest["name"], exc)
            manifest.setdefault("refused_variants", {})["openvino-bf16"] = {"parity": exc.record}

    if want_int8:
        samples = [{k: np.asarray(c.encoding[k], dtype=np.int64) for k in inputs} for c in cases]
        quantized = nncf.quantize(
            fp32_model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
            preset=nncf.QuantizationPreset.MIXED, subset_size=len(samples),
        )
        out_xml = bundle / INT8_FILE
        tmp_xml = bundle / ("tmp-" + INT8_FILE)
        ov.save_model(quantized, str(tmp_xml), compress_to_fp16=False)
        durable.replace(tmp_xml.with_suffix(".bin"), out_xml.with_suffix(".bin"))
        durable.replace(tmp_xml, out_xml)
        # Served as int8 weights/activations with bf16 for the remaining float ops where the CPU has it.
        hint = "bf16" if has_bf16() else "f32"
        compiled = _compile(core, core.read_model(str(out_xml)), hint)
        outs = [_run(compiled, c.encoding, inputs) for c in parity._bar(cases, f"gate openvino-int8 ({task})")]
        try:
            rec = _gate(task, "openvino-int8", cases, refs, outs)
        except GateError as exc:
            log.error("%s: %s", manifest["name"], exc)
            out_xml.unlink(missing_ok=True)
            out_xml.with_suffix(".bin").unlink(missing_ok=True)
            variants.pop("openvino-int8", None)  # a rebuild the gate refused must not stay listed as usable
            manifest.setdefault("refused_variants", {})["openvino-int8"] = {"parity": exc.record}
            rec = None
    if want_int8 and rec is not None:
        variants["openvino-int8"] = {
            "file": INT8_FILE, "inference_precision": hint, "sha256": _sha(out_xml), "weights_sha256": _sha(out_xml.with_suffix(".bin")),
            "calibration": {"samples": len(samples), "corpus_texts": len(extra)}, "parity": rec,
        }

    durable.write_text(mf_path, json.dumps(manifest, indent=2))
    return manifest
