"""How far a reduced-precision reranker drifts from its fp32 reference: one rule for the export gate
and for the GPU probe the ``cuda`` backend re-runs at load.

A reranker's logits only order candidates, so drift is judged against their spread and against the
order they give:

* ``max_diff_in_sd`` — the worst |logit difference| over the gate's pairs, in standard deviations of
  the fp32 logits;
* ``min_pair_agreement`` — of the pairs whose fp32 logits differ by more than ``TIE_SD`` standard
  deviations, the share the variant orders the same way (a Kendall-style count);
* ``min_spearman`` — Spearman's rank correlation over all pairs, ties at their average rank. Older
  gates (and the OpenVINO ones) use it.

Why the pair count for fp16 on a GPU: the parity cases hold many irrelevant pairs whose fp32 logits
sit within a few thousandths of each other (the same pair at several batch shapes, and unrelated
passages that all score about -13). Spearman ranks those near-ties too, so fp16 noise far below
any ordering that matters moves it: on an H100, a drift of 0.0026 sd (0.018 logits) gave Spearman
0.9937 and refused a model whose every non-tied pair kept its order. Pairs closer than ``TIE_SD``
are ties at the gate's resolution and are left out of the count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TIE_SD = 0.01  # fp32 logits closer than this many sd count as tied in the pair agreement


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=ranks) / counts)[inv]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation, ties at average rank (NaN when either side is constant)."""
    ra, rb = average_ranks(np.ravel(a)), average_ranks(np.ravel(b))
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def pair_agreement(ref: Sequence[float], got: Sequence[float], tie: float) -> tuple[float, int]:
    """(share of pairs with |ref_i - ref_j| > tie that ``got`` orders the same way, number of such
    pairs); 1.0 when there is none. A tie or a NaN in ``got`` counts as disagreement."""
    ref = np.ravel(np.asarray(ref, dtype=np.float64))
    got = np.ravel(np.asarray(got, dtype=np.float64))
    i, j = np.triu_indices(len(ref), 1)
    dr, dg = ref[i] - ref[j], got[i] - got[j]
    keep = np.abs(dr) > tie
    n = int(keep.sum())
    if n == 0:
        return 1.0, 0
    return float(np.mean(np.sign(dr[keep]) == np.sign(dg[keep]))), n


def rerank_drift(ref: Sequence[float], got: Sequence[float], gate: dict, sd: float | None = None) -> dict:
    """Every drift figure of ``got`` against ``ref`` and whether ``gate`` passes.

    ``sd``: the spread to measure in (default: the standard deviation of ``ref``); the GPU probe
    passes the export's, measured over the same pairs. The gate's keys say which checks apply:
    ``max_diff_in_sd`` always, ``min_pair_agreement`` and ``min_spearman`` where present.
    """
    ref = np.ravel(np.asarray(ref, dtype=np.float64))
    got = np.ravel(np.asarray(got, dtype=np.float64))
    sd = float(np.std(ref)) if sd is None else float(sd)
    worst = float(np.max(np.abs(ref - got))) if ref.size else 0.0
    worst = worst if np.isfinite(worst) else float("inf")
    in_sd = worst / sd if sd > 0 else float("inf")
    rho = spearman(ref, got)
    agree, pairs = pair_agreement(ref, got, TIE_SD * sd)
    ok = in_sd <= gate["max_diff_in_sd"]
    if "min_pair_agreement" in gate:
        ok = ok and agree >= gate["min_pair_agreement"]
    if "min_spearman" in gate:
        ok = ok and rho >= gate["min_spearman"]
    return {"max_abs_diff": worst, "max_diff_in_sd": in_sd, "spearman": rho, "pair_agreement": agree,
            "pairs_compared": pairs, "tie_sd": TIE_SD, "pairs": int(ref.size), "logit_std_fp32": sd,
            "passed": bool(ok)}


def describe(rec: dict, gate: dict) -> str:
    """One line for logs and refusals."""
    parts = [f"max |diff| {rec['max_abs_diff']:.4f} = {rec['max_diff_in_sd']:.4f} sd of fp32 logits "
             f"(gate <= {gate['max_diff_in_sd']})"]
    if "min_pair_agreement" in gate:
        parts.append(f"pair agreement {rec['pair_agreement']:.4f} over {rec['pairs_compared']} pairs "
                     f"> {TIE_SD} sd apart (gate >= {gate['min_pair_agreement']})")
    parts.append(f"Spearman {rec['spearman']:.4f}" + (f" (gate >= {gate['min_spearman']})" if "min_spearman" in gate else ""))
    return ", ".join(parts)
