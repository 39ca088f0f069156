"""Reciprocal rank fusion (Cormack et al., 2009): score(d) = sum over legs of 1 / (k + rank)."""

from __future__ import annotations

from collections.abc import Sequence


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
