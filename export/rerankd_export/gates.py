"""Accuracy gates for reduced-precision variants, shared by every variant writer.

A variant is compared with ONNX Runtime fp32 on the same parity cases:

* embed — the worst cosine between mean-pooled, normalized vectors (``min_cosine``);
* rerank — the worst |logit difference| relative to the standard deviation of the fp32 logits
  over the gate's pairs (``max_diff_in_sd``) plus rank agreement (``min_pair_agreement`` and/or
  ``min_spearman``), by :func:`rerankd.drift.rerank_drift`, the rule the GPU backend re-applies to
  its probe at load: a reranker's scores only order candidates, so drift is judged against their
  spread and their order, not an absolute logit budget.

A failed gate raises :class:`GateError` carrying the full record, so the writer can refuse the
variant (remove its files) and still keep the figures in ``refused_variants``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from rerankd import drift

from . import parity


class GateError(parity.ParityError):
    record: dict


def check_gate(task: str, variant: str, gate: dict, cases: Sequence, ref_outputs: Sequence[np.ndarray],
               outputs: Sequence[np.ndarray], log: logging.Logger, reference: str = "onnxruntime fp32") -> dict:
    """Compare ``outputs`` with ``ref_outputs`` case by case; returns the record or raises GateError."""
    records = []
    if task == "embed":
        worst = 1.0
        for case, ref, got in zip(cases, ref_outputs, outputs):
            mask = case.encoding["attention_mask"]
            cos = float(np.min(np.sum(parity.mean_pool_normalize(got, mask) * parity.mean_pool_normalize(ref, mask), axis=1)))
            worst = min(worst, cos) if np.isfinite(cos) else float("-inf")
            records.append({"kind": case.kind, "batch": case.batch, "length": case.length, "min_cosine": cos})
        ok = worst >= gate["min_cosine"]
        rec = {"reference": reference, "metric": "min_cosine", "gate": gate, "min_cosine": worst, "cases": records}
        summary = f"min cosine {worst:.5f} (gate >= {gate['min_cosine']})"
    else:
        refs = np.concatenate([np.ravel(r) for r in ref_outputs])
        gots = np.concatenate([np.ravel(g) for g in outputs])
        rec = {"reference": reference, "metric": "max_diff_in_sd", "gate": gate, **drift.rerank_drift(refs, gots, gate)}
        ok = rec["passed"]
        summary = drift.describe(rec, gate)
    rec["passed"] = bool(ok)
    if not ok:
        err = GateError(f"{variant} ({task}) refused: {summary}")
        err.record = rec
        raise err
    log.info("%s (%s) gate ok: %s", variant, task, summary)
    return rec
