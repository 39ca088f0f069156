"""Small, dependency-free IR metrics: NDCG@k, MRR@k (RR@k), P@k, Recall@k.

Conventions (trec_eval / pytrec_eval, which ``ir_measures`` wraps; the tests check them against it):

* A run is a *ranked list* of document ids per query, best first. Metrics read the list in the
  order given — for ``rerankd eval`` that is the order the service returned, so its own
  tie-breaking (first-stage rank, RRF's best-leg rank) is what gets scored. A document listed
  twice counts once, at its first position.
* Relevant means a qrels relevance > 0; relevance <= 0 (including negative judgments) is
  non-relevant and contributes no gain.
* NDCG@k: graded, linear gain ``rel``, discount ``1 / log2(rank + 1)``; the ideal DCG is from
  all of the query's qrels (not only the retrieved ones), so a missing relevant doc costs.
* P@k divides by k even when fewer than k documents were retrieved.
* MRR@k is the reciprocal rank of the first relevant document within the top k (0 if none).
* Averages (``evaluate``) are over queries with at least one relevant document in the qrels;
  a query with no run (or an empty one) scores 0. Queries whose judgments are all <= 0 are left
  out of the average (trec_eval drops them; note ``ir_measures.calc_aggregate`` counts them as 0).
* Ties: ``rank_by_score`` turns {doc: score} into a list with trec_eval's rule: score descending,
  then doc id descending (string order). pytrec_eval follows it; ir_measures' default provider
  for RR@k (``msmarco``) breaks ties by doc id *ascending* instead, so feed ir_measures tie-free
  scores when comparing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

Qrels = Mapping[str, Mapping[str, float]]
Run = Mapping[str, Sequence[str]]

# name -> (function, cutoff); names as in the JSON output of ``rerankd eval``.
DEFAULT_MEASURES: tuple[str, ...] = ("ndcg@10", "mrr@10", "p@5", "recall@100")

_DISCOUNT = [1.0 / math.log2(i + 2) for i in range(1000)]  # rank i+1 (0-based i)


def _discount(i: int) -> float:
    return _DISCOUNT[i] if i < len(_DISCOUNT) else 1.0 / math.log2(i + 2)


def _dedup(ranked: Iterable[str], k: int | None = None) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for d in ranked:
        if d in seen:
            continue
        seen.add(d)
        out.append(d)
        if k is not None and len(out) >= k:
            break
    return out


def rank_by_score(scores: Mapping[str, float]) -> list[str]:
    """Doc ids best first: score descending, ties by doc id descending (trec_eval's rule)."""
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def num_relevant(judged: Mapping[str, float]) -> int:
    return sum(1 for r in judged.values() if r > 0)


def ndcg_at(ranked: Sequence[str], judged: Mapping[str, float], k: int = 10) -> float:
    gains = sorted((r for r in judged.values() if r > 0), reverse=True)[:k]
    ideal = sum(g * _discount(i) for i, g in enumerate(gains))
    if ideal <= 0:
        return 0.0
    dcg = 0.0
    for i, d in enumerate(_dedup(ranked, k)):
        r = judged.get(d, 0)
        if r > 0:
            dcg += r * _discount(i)
    return dcg / ideal


def rr_at(ranked: Sequence[str], judged: Mapping[str, float], k: int = 10) -> float:
    for i, d in enumerate(_dedup(ranked, k)):
        if judged.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def precision_at(ranked: Sequence[str], judged: Mapping[str, float], k: int = 5) -> float:
    return sum(1 for d in _dedup(ranked, k) if judged.get(d, 0) > 0) / k


def recall_at(ranked: Sequence[str], judged: Mapping[str, float], k: int = 100) -> float:
    n = num_relevant(judged)
    if n == 0:
        return 0.0
    return sum(1 for d in _dedup(ranked, k) if judged.get(d, 0) > 0) / n


_FUNCS = {"ndcg": ndcg_at, "mrr": rr_at, "rr": rr_at, "p": precision_at, "recall": recall_at, "r": recall_at}


def parse_measure(name: str):
    """'ndcg@10' -> (ndcg_at, 10). Names: ndcg, mrr|rr, p, recall|r; a cutoff is required."""
    base, _, cut = name.lower().partition("@")
    if base not in _FUNCS or not cut.isdigit() or int(cut) < 1:
        raise ValueError(f"unknown measure {name!r} (use ndcg@k, mrr@k, p@k, recall@k)")
    return _FUNCS[base], int(cut)


def per_query(run: Run, qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, dict[str, float]]:
    """{qid: {measure: value}} for every query with at least one relevant doc in the qrels."""
    fns = [(m, *parse_measure(m)) for m in measures]
    out: dict[str, dict[str, float]] = {}
    for qid, judged in qrels.items():
        if num_relevant(judged) == 0:
            continue
        ranked = run.get(qid) or ()
        out[qid] = {m: fn(ranked, judged, k) for m, fn, k in fns}
    return out


def mean(values: Mapping[str, Mapping[str, float]], measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, float]:
    n = len(values)
    return {m: (sum(v[m] for v in values.values()) / n if n else 0.0) for m in measures}


def evaluate(run: Run, qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, float]:
    """Mean of each measure over the queries with at least one relevant doc (see module doc)."""
    return mean(per_query(run, qrels, measures), measures)
