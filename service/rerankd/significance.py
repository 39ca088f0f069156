"""How sure is a retrieval figure? Bootstrap intervals and paired tests over the query sample.

An NDCG@10 of 0.7686 on SciFact's 300 test queries is the mean of 300 per-query values, and
another 300 claims would give another mean. ``rerankd eval`` reports each row's 95 % confidence
interval (percentile bootstrap over queries), and ``rerankd eval-compare`` says whether two runs
on the same queries differ by more than that noise: the mean of the per-query differences, its
paired bootstrap interval, and a two-sided paired randomization test (the signs of the per-query
differences flipped at random: Fisher's test, the one Smucker et al. 2007 recommend for IR).

The randomization test is ``scipy.stats.permutation_test`` (exact when 2^n sign patterns are no
more than the resamples; scipy comes with the eval extra); the bootstrap is numpy (see
``confidence_interval``). Fixed seeds: the same inputs always give the same figures. A
difference is "better" / "worse" only when its interval excludes 0 and p < 1 - level (see
``Paired.verdict``). The tests are per measure and per row, with no correction for comparing
many: read a lone p = 0.04 among twenty comparisons as noise.

Usage::

    rerankd eval-compare docs/eval-scifact.json new.json             # same-named rows
    rerankd eval-compare run.json run.json --pair hybrid hybrid+rerank@50
    rerankd eval-compare base.json new.json --fail-if-worse          # exit 1 on a significant loss
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEVEL = 0.95
RESAMPLES = 10_000
SEED = 0


def confidence_interval(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES,
                        seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (one value per query).

    numpy, not ``scipy.stats.bootstrap``: ``rerankd eval`` computes it for every row and numpy is a
    core dependency (scipy comes with the eval extra). It is scipy's ``method="percentile"`` (the
    tests compare the two), drawn in chunks so that many queries do not need resamples x queries
    indices at once.
    """
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values: an interval needs at least one query")
    if not np.all(np.isfinite(x)):
        raise ValueError("non-finite values: an interval needs finite per-query figures")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // x.size)
    for i in range(0, resamples, chunk):
        m = min(chunk, resamples - i)
        means[i:i + m] = x[rng.integers(0, x.size, size=(m, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Paired:
    """``new`` minus ``base`` over the same queries."""

    queries: int
    base: float
    new: float
    delta: float
    ci: tuple[float, float]
    p_value: float
    level: float = LEVEL

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` when the interval of the difference excludes 0 *and* the
        randomization test rejects "no difference" at the same level, else ``within noise``.

        Both, because the percentile interval is too narrow on a handful of queries: 3 queries
        that all moved the same way give an interval above 0, while the exact test says p = 0.25.
        """
        if self.p_value >= round(1 - self.level, 12):  # 1 - 0.95 is 0.05000000000000004
            return "within noise"
        if self.ci[0] > 0:
            return "better"
        if self.ci[1] < 0:
            return "worse"
        return "within noise"


def paired(base: Mapping[str, float], new: Mapping[str, float], level: float = LEVEL,
           resamples: int = RESAMPLES, seed: int = SEED) -> Paired:
    """Compare two per-query scorings of the same queries (query id -> value)."""
    import numpy as np

    only_base, only_new = set(base) - set(new), set(new) - set(base)
    if only_base or only_new:
        raise ValueError(f"the runs scored different queries: {len(only_base)} only in the base run "
                         f"(e.g. {sorted(only_base)[:3]}), {len(only_new)} only in the new run "
                         f"(e.g. {sorted(only_new)[:3]})")
    qids = sorted(base)
    if len(qids) < 2:
        raise ValueError(f"{len(qids)} queries: a paired test needs at least 2")
    b = np.array([base[q] for q in qids], dtype=np.float64)
    n = np.array([new[q] for q in qids], dtype=np.float64)
    for name, x in (("base", b), ("new", n)):
        if not np.all(np.isfinite(x)):
            bad = [q for q, v in zip(qids, x) if not np.isfinite(v)]
            raise ValueError(f"the {name} run has non-finite values for {len(bad)} queries (e.g. {bad[:3]})")
    d = n - b
    lo, hi = confidence_interval(d, level, resamples, seed)
    if np.all(d == 0):
        p = 1.0
    else:
        try:
            from scipy import stats
        except ImportError:
            raise ValueError("the randomization test needs scipy: pip install 'rerankd[eval]'") from None
        # batch: resamples x queries at once would take GBs for a few thousand queries
        r = stats.permutation_test((d,), np.mean, permutation_type="samples", alternative="two-sided",
                                   n_resamples=resamples, vectorized=True, batch=max(1, 2_000_000 // d.size),
                                   rng=np.random.default_rng(seed))
        p = float(r.pvalue)
    return Paired(len(qids), float(b.mean()), float(n.mean()), float(d.mean()), (lo, hi), p, level)


def row_intervals(per_query: Mapping[str, Mapping[str, float]], measures: Sequence[str], level: float = LEVEL,
                  resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, list[float]]:
    """Each measure's interval for one eval row (``per_query``: query id -> measure -> value)."""
    if not per_query:
        return {}
    return {m: list(confidence_interval([v[m] for v in per_query.values()], level, resamples, seed)) for m in measures}


# -- rerankd eval-compare ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", type=Path, help="the baseline run: a `rerankd eval --json` file")
    parser.add_argument("new", type=Path, help="the run compared with it (may be the same file, with --pair)")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("BASE_ROW", "NEW_ROW"), default=None,
                        help="compare BASE_ROW of the base run with NEW_ROW of the new run (repeatable); "
                             "default: every row name the two runs share")
    parser.add_argument("--measures", nargs="+", default=None, metavar="M",
                        help="measures to compare [default: every measure both runs report]")
    parser.add_argument("--level", type=float, default=LEVEL, help=f"confidence level [default {LEVEL}]")
    parser.add_argument("--resamples", type=int, default=RESAMPLES,
                        help=f"bootstrap and randomization resamples [default {RESAMPLES}]")
    parser.add_argument("--seed", type=int, default=SEED, help=f"resampling seed, >= 0 [default {SEED}]")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every comparison as JSON")
    parser.add_argument("--fail-if-worse", action="store_true",
                        help="exit 1 when any compared figure is significantly worse in the new run "
                             "(the interval of the difference lies below 0 and the randomization test's p is "
                             "below 1 - --level): a gate for CI pipelines")


def _load(path: Path, which: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{which} run {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list) or not isinstance(doc.get("meta"), dict):
        raise ValueError(f"{which} run {path}: not a `rerankd eval --json` file (no meta and rows)")
    seen = set()
    for i, r in enumerate(doc["rows"]):
        name = r.get("name") if isinstance(r, dict) else None
        if not isinstance(name, str):
            raise ValueError(f"{which} run {path}: rows[{i}] has no name")
        if not isinstance(r.get("per_query"), dict):
            raise ValueError(f"{which} run {path}: row {name!r} has no per-query figures (written by an older rerankd?)")
        if name in seen:
            raise ValueError(f"{which} run {path}: two rows named {name!r}")
        seen.add(name)
    return doc


def compare(base_doc: dict[str, Any], new_doc: dict[str, Any], pairs: Sequence[tuple[str, str]] | None = None,
            measures: Sequence[str] | None = None, level: float = LEVEL, resamples: int = RESAMPLES,
            seed: int = SEED) -> list[dict[str, Any]]:
    """Every (row pair, measure) comparison, as plain dicts (the JSON output's ``comparisons``)."""
    bm, nm = base_doc["meta"], new_doc["meta"]
    for key in ("dataset", "split"):
        if bm.get(key) != nm.get(key):
            raise ValueError(f"meta.{key} differs: base {bm.get(key)!r}, new {nm.get(key)!r} "
                             "(paired tests need the same queries)")
    base_rows = {r["name"]: r for r in base_doc["rows"]}
    new_rows = {r["name"]: r for r in new_doc["rows"]}
    if pairs is None:
        pairs = [(n, n) for n in base_rows if n in new_rows]
        if not pairs:
            raise ValueError(f"no row name in both runs (base: {sorted(base_rows)}, new: {sorted(new_rows)}); "
                             "name the rows with --pair")
    for b, n in pairs:
        if b not in base_rows:
            raise ValueError(f"--pair: no row {b!r} in the base run (it has {sorted(base_rows)})")
        if n not in new_rows:
            raise ValueError(f"--pair: no row {n!r} in the new run (it has {sorted(new_rows)})")
    have = [m for m in (bm.get("measures") or []) if m in (nm.get("measures") or [])]
    for m in measures or ():
        if m not in have:
            raise ValueError(f"--measures: {m!r} is not reported by both runs (both have {have})")
    ms = list(measures) if measures else have
    out = []
    for b, n in pairs:
        bq, nq = base_rows[b]["per_query"], new_rows[n]["per_query"]
        for m in ms:
            try:
                r = paired(_column(bq, m, "base"), _column(nq, m, "new"), level, resamples, seed)
            except ValueError as e:
                raise ValueError(f"rows {b!r} / {n!r}, {m}: {e}") from None
            out.append({"base_row": b, "new_row": n, "measure": m, "queries": r.queries, "base": r.base, "new": r.new,
                        "delta": r.delta, "ci": list(r.ci), "p_value": r.p_value, "verdict": r.verdict})
    if not out:
        raise ValueError(f"nothing to compare: the runs share no measure (base {bm.get('measures')}, "
                         f"new {nm.get('measures')})")
    return out


def _column(per_query: Mapping[str, Any], measure: str, which: str) -> dict[str, float]:
    out = {}
    for q, v in per_query.items():
        if not isinstance(v, dict) or not isinstance(v.get(measure), (int, float)):
            raise ValueError(f"the {which} run has no {measure} for query {q!r}")
        out[q] = float(v[measure])
    return out


def markdown(comparisons: Sequence[Mapping[str, Any]], level: float, resamples: int) -> str:
    pct = f"{level * 100:g}%"
    lines = [f"| base row | new row | measure | base | new | Δ | {pct} CI of Δ | p | verdict |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for c in comparisons:
        rows = (c["base_row"], c["new_row"]) if c["base_row"] != c["new_row"] else (c["base_row"], "=")
        lines.append(f"| {rows[0]} | {rows[1]} | {c['measure']} | {c['base']:.4f} | {c['new']:.4f} | {c['delta']:+.4f} "
                     f"| {c['ci'][0]:+.4f} … {c['ci'][1]:+.4f} | {c['p_value']:.3g} | {c['verdict']} |")
    n = comparisons[0]["queries"] if comparisons else 0
    lines += ["", f"Paired over {n} queries: Δ = new − base (mean of per-query differences); CI: percentile bootstrap "
                  f"({resamples} resamples); p: two-sided paired randomization test (sign flips). \"better\"/\"worse\": "
                  f"the interval excludes 0 and p < {1 - level:.2g}. No correction for multiple comparisons."]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.level < 1:
        print(f"rerankd eval-compare: --level must be in (0, 1), got {args.level}", file=sys.stderr)
        return 2
    if args.resamples < 100:
        print(f"rerankd eval-compare: --resamples must be at least 100, got {args.resamples}", file=sys.stderr)
        return 2
    if args.seed < 0:
        print(f"rerankd eval-compare: --seed must be >= 0, got {args.seed}", file=sys.stderr)
        return 2
    if not args.pair and args.base.resolve() == args.new.resolve():
        print("rerankd eval-compare: base and new are the same file: name the rows to compare with "
              "--pair BASE_ROW NEW_ROW", file=sys.stderr)
        return 2
    try:
        base, new = _load(args.base, "base"), _load(args.new, "new")
        pairs = [tuple(p) for p in args.pair] if args.pair else None
        comps = compare(base, new, pairs, args.measures, args.level, args.resamples, args.seed)
    except ValueError as e:
        print(f"rerankd eval-compare: {e}", file=sys.stderr)
        return 2
    print(markdown(comps, args.level, args.resamples))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"base": str(args.base), "new": str(args.new), "level": args.level,
                                         "resamples": args.resamples, "seed": args.seed, "comparisons": comps},
                                        indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    worse = [c for c in comps if c["verdict"] == "worse"]
    if args.fail_if_worse and worse:
        print("rerankd eval-compare: significantly worse: "
              + ", ".join(f"{c['new_row']} {c['measure']} {c['delta']:+.4f}" for c in worse), file=sys.stderr)
        return 1
    return 0

