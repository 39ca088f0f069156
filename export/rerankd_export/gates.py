"""Accuracy gates for reduced-precision variants, shared by every variant writer.

A variant is compared with ONNX Runtime fp32 on the same parity cases:

* embed — the worst cosine between mean-pooled, normalized vectors (``min_cosine``);
* rerank — the worst |logit difference| relative to the standard deviation of the fp32 logits
  over the gate's pairs (``max_diff_in_sd``) and the Spearman correlation over all pairs
  (``min_spearman``): a reranker's scores only order candidates, so drift is judged against
  their spread plus rank agreement, not an absolute logit budget.

A failed gate raises :class:`GateError` carrying the full record, so the writer can refuse the
variant (remove its files) and still keep the figures in ``refused_variants``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

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
        refs = np.concatenate([np.ravel(r) for r in ref_outputs]).astype(np.float64)
        gots = np.concatenate([np.ravel(g) for g in outputs]).astype(np.float64)
        worst = float(np.max(np.abs(refs - gots)))
        worst = worst if np.isfinite(worst) else float("inf")
        rho = parity.spearman(refs, gots)
        sd = float(np.std(refs))
        in_sd = worst / sd if sd > 0 else float("inf")
        ok = in_sd <= gate["max_diff_in_sd"] and rho >= gate["min_spearman"]
        rec = {"reference": reference, "metric": "max_diff_in_sd", "gate": gate, "max_abs_diff": worst,
               "max_diff_in_sd": in_sd, "spearman": rho, "pairs": int(refs.size), "logit_std_fp32": sd}
        summary = (f"max |diff| {worst:.4f} = {in_sd:.3f} sd of fp32 logits (gate <= {gate['max_diff_in_sd']}), "
                   f"Spearman {rho:.4f} (gate >= {gate['min_spearman']})")
    rec["passed"] = bool(ok)
    if not ok:
        err = GateError(f"{variant} ({task}) refused: {summary}")
        err.record = rec
        raise err
    log.info("%s (%s) gate ok: %s", variant, task, summary)
    return rec
