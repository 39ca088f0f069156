"""Fusion: reciprocal rank fusion of first-stage legs (Cormack et al., 2009), and rerank fusion
of the cross-encoder's scores with the first stage's ranks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rrf(rankings: Sequence[Sequence[int]], k: int = 60, limit: int | None = None) -> list[tuple[int, float]]:
    """Fuse ranked label lists (best first, 1-based ranks). Ties: best single-leg rank, then label."""
    scores: dict[int, float] = {}
    best: dict[int, int] = {}
    for ranking in rankings:
        seen: set[int] = set()
        for rank, label in enumerate(ranking, start=1):
            if label in seen:  # a leg listing a label twice counts once, at its best rank
                continue
            seen.add(label)
            scores[label] = scores.get(label, 0.0) + 1.0 / (k + rank)
            best[label] = min(best.get(label, rank), rank)
    fused = sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]], kv[0]))
    return fused[:limit] if limit is not None else fused


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


def rerank_fusion(rerank_scores: Sequence[float], first_stage_ranks: Sequence[int], weight: float) -> np.ndarray:
    """z(reranker scores) + weight * z(-ln first-stage rank), z-scored over the candidate list.

    A cross-encoder and a hybrid first stage err differently; blending them is the cheap part of
    multi-phase ranking (as in Vespa's first/second phase). Standardizing per list makes the
    weight independent of the reranker's logit scale and of the first stage's score type (RRF,
    cosine, BM25 have different ranges; their ranks do not); -ln(rank) keeps the head of the
    first-stage list distinct while flattening its tail. weight 0 (the server default) returns the
    reranker's scores unchanged. Measured on SciFact, weight chosen on held-out train claims: see
    README ("How the defaults were chosen").
    """
    s = np.asarray(rerank_scores, dtype=np.float64)
    if weight == 0 or s.size < 2:
        return s
    r = np.asarray(first_stage_ranks, dtype=np.float64)
    if r.shape != s.shape or np.any(r < 1):
        raise ValueError("first_stage_ranks must be 1-based ranks, one per score")
    return _z(s) + weight * _z(-np.log(r))
