"""`rerankd.significance` and `rerankd eval-compare`: intervals and paired tests over queries.

* the bootstrap interval is scipy's percentile bootstrap (same seed, same figures), chunked or not;
* the randomization test equals the exact sign-flip test enumerated by hand on small samples;
* a clear shift is "better"/"worse", identical runs are "within noise" with p = 1;
* the CLI pairs rows, refuses runs of other queries / datasets naming what differs, gates with
  --fail-if-worse, writes JSON; `rerankd eval` rows carry their intervals.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from rerankd import significance as sig
from rerankd.cli import main

stats = pytest.importorskip("scipy.stats")

MEASURES = ["ndcg@10", "mrr@10"]


def _run(path: Path, rows: dict[str, dict[str, float]], dataset: str = "toy", split: str = "test",
         other: dict[str, float] | None = None, measures: list[str] = MEASURES) -> Path:
    """An eval JSON whose rows score query q with ndcg rows[name][q] (mrr = other[q] or the same)."""
    doc = {"meta": {"dataset": dataset, "split": split, "measures": measures},
           "rows": [{"name": n, "metrics": {}, "per_query": {q: {"ndcg@10": v, "mrr@10": (other or pq)[q]}
                                                         for q, v in pq.items()}}
                    for n, pq in rows.items()]}
    path.write_text(json.dumps(doc))
    return path


def _scores(n: int, seed: int, shift: float = 0.0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {f"q{i}": float(min(1.0, max(0.0, v + shift))) for i, v in enumerate(rng.random(n))}


@pytest.mark.parametrize("n", [7, 300, 9000])  # 9000 queries: the draws come in several chunks
def test_interval_is_scipys_percentile_bootstrap(n):
    x = np.random.default_rng(n).random(n)
    ref = stats.bootstrap((x,), np.mean, method="percentile", n_resamples=3000, rng=np.random.default_rng(5))
    lo, hi = sig.confidence_interval(x, resamples=3000, seed=5)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=1e-12)
    assert lo < x.mean() < hi


def test_interval_narrows_with_more_queries_and_collapses_without_spread():
    small = sig.confidence_interval(np.random.default_rng(1).random(50))
    big = sig.confidence_interval(np.random.default_rng(1).random(5000))
    assert big[1] - big[0] < (small[1] - small[0]) / 5  # ~1/sqrt(100) as wide
    assert sig.confidence_interval([0.25] * 40) == (0.25, 0.25)
    assert sig.confidence_interval([0.5]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="at least one query"):
        sig.confidence_interval([])


def test_randomization_test_is_the_exact_sign_flip_test_on_small_samples():
    base = {f"q{i}": v for i, v in enumerate([0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.6, 0.0])}
    new = {q: v + d for (q, v), d in zip(base.items(), [0.3, 0.1, -0.05, 0.2, 0.25, 0.0, 0.15, 0.4])}
    d = np.array([new[q] - base[q] for q in sorted(base)])
    flips = np.array(list(itertools.product([1, -1], repeat=d.size)))
    null = (flips * d).mean(axis=1)
    exact = np.mean(np.abs(null) >= abs(d.mean()) - 1e-12)  # 2^8 = 256 patterns <= resamples: scipy is exact
    r = sig.paired(base, new)
    assert r.p_value == pytest.approx(exact, abs=1e-12)
    assert r.delta == pytest.approx(d.mean()) and r.queries == 8
    assert r.base == pytest.approx(np.mean(list(base.values())))


def test_a_clear_shift_is_significant_and_identical_runs_are_not():
    base = _scores(300, 1)
    up = {q: v + 0.05 for q, v in base.items()}
    r = sig.paired(base, up)
    assert r.verdict == "better" and r.p_value < 0.001 and r.ci[0] > 0
    assert sig.paired(up, base).verdict == "worse"
    same = sig.paired(base, dict(base))
    assert same.verdict == "within noise" and same.p_value == 1.0 and same.ci == (0.0, 0.0) and same.delta == 0.0
    noisy = sig.paired(base, _scores(300, 2))  # two unrelated draws of the same distribution
    assert noisy.verdict == "within noise" and noisy.ci[0] < 0 < noisy.ci[1] and noisy.p_value > 0.05


def test_paired_refuses_runs_over_other_queries():
    with pytest.raises(ValueError, match="1 only in the base run.*0 only in the new run"):
        sig.paired({"a": 1.0, "b": 0.0}, {"a": 1.0})
    with pytest.raises(ValueError, match="0 queries: a paired test needs at least 2"):
        sig.paired({}, {})
    with pytest.raises(ValueError, match="1 queries"):
        sig.paired({"a": 1.0}, {"a": 0.0})
    with pytest.raises(ValueError, match="the new run has non-finite values for 1 queries"):
        sig.paired({"a": 1.0, "b": 0.0}, {"a": 1.0, "b": float("nan")})
    with pytest.raises(ValueError, match="non-finite"):
        sig.confidence_interval([0.1, float("inf")])


def test_queries_are_paired_by_id_not_by_position():
    base = _scores(100, 1)
    new = {q: base[q] + 0.05 for q in reversed(list(base))}  # the same ids, the other order
    r = sig.paired(base, new)
    assert r.delta == pytest.approx(0.05) and r.ci == pytest.approx((0.05, 0.05)) and r.verdict == "better"


def test_a_handful_of_queries_is_never_significant_on_the_interval_alone():
    # 3 queries, all better: the percentile interval lies above 0, the exact test gives p = 2/8
    r = sig.paired({"a": 0.1, "b": 0.2, "c": 0.3}, {"a": 0.2, "b": 0.4, "c": 0.6})
    assert r.ci[0] > 0 and r.p_value == pytest.approx(0.25) and r.verdict == "within noise"
    # with 12 the exact test rejects too (p = 2/4096)
    twelve = sig.paired({f"q{i}": 0.1 for i in range(12)}, {f"q{i}": 0.3 + i / 100 for i in range(12)})
    assert twelve.p_value < 0.001 and twelve.verdict == "better"
    # "p < 0.05" means it: exactly 0.05 is noise (1 - 0.95 is 0.05000000000000004 in floats)
    assert sig.Paired(10, 0.0, 0.1, 0.1, (0.01, 0.2), 0.05).verdict == "within noise"
    assert sig.Paired(10, 0.0, 0.1, 0.1, (0.01, 0.2), 0.0499).verdict == "better"


def test_eval_compare_pairs_same_named_rows(tmp_path, capsys):
    base = _run(tmp_path / "a.json", {"hybrid": _scores(200, 1), "dense": _scores(200, 3)})
    new = _run(tmp_path / "b.json", {"hybrid": {q: min(1.0, v + 0.08) for q, v in _scores(200, 1).items()},
                                     "bm25": _scores(200, 4)})
    out_json = tmp_path / "cmp.json"
    assert main(["eval-compare", str(base), str(new), "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "| hybrid | = | ndcg@10 |" in table and "| better |" in table and "95% CI of Δ" in table
    assert "dense" not in table and "bm25" not in table  # only rows both runs have
    comps = json.loads(out_json.read_text())["comparisons"]
    assert [(c["base_row"], c["measure"]) for c in comps] == [("hybrid", "ndcg@10"), ("hybrid", "mrr@10")]
    assert all(c["verdict"] == "better" and c["ci"][0] > 0 and c["queries"] == 200 for c in comps)


def test_eval_compare_pair_within_one_file_and_the_gate(tmp_path, capsys):
    run = _run(tmp_path / "r.json", {"hybrid": _scores(150, 1, 0.1), "hybrid+rerank@50": _scores(150, 1)})
    argv = ["eval-compare", str(run), str(run), "--pair", "hybrid", "hybrid+rerank@50", "--measures", "ndcg@10"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "| hybrid | hybrid+rerank@50 | ndcg@10 |" in out.out and "| worse |" in out.out
    assert main([*argv, "--fail-if-worse"]) == 1
    assert "significantly worse: hybrid+rerank@50 ndcg@10 -0.0" in capsys.readouterr().err
    # the same gate passes when the new row is the better one
    assert main(["eval-compare", str(run), str(run), "--pair", "hybrid+rerank@50", "hybrid", "--fail-if-worse"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--pair", "nope", "hybrid"], "no row 'nope' in the base run"),
    (["--pair", "hybrid", "nope"], "no row 'nope' in the new run"),
    (["--pair", "hybrid", "hybrid", "--measures", "p@5"], "'p@5' is not reported by both runs"),
    ([], "base and new are the same file: name the rows to compare with --pair"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--level", "95"], "--level must be in (0, 1)"),
    (["--resamples", "10"], "--resamples must be at least 100"),
])
def test_eval_compare_usage_errors_name_the_flag(tmp_path, capsys, argv, message):
    run = _run(tmp_path / "r.json", {"hybrid": _scores(20, 1)})
    assert main(["eval-compare", str(run), str(run), *argv]) == 2
    assert message in capsys.readouterr().err


def test_eval_compare_refuses_other_datasets_splits_and_query_sets(tmp_path, capsys):
    a = _run(tmp_path / "a.json", {"hybrid": _scores(20, 1)})
    assert main(["eval-compare", str(a), str(_run(tmp_path / "b.json", {"hybrid": _scores(20, 1)}, split="dev"))]) == 2
    assert "meta.split differs: base 'test', new 'dev'" in capsys.readouterr().err
    assert main(["eval-compare", str(a), str(_run(tmp_path / "c.json", {"hybrid": _scores(20, 1)}, dataset="nq"))]) == 2
    assert "meta.dataset differs" in capsys.readouterr().err
    assert main(["eval-compare", str(a), str(_run(tmp_path / "d.json", {"hybrid": _scores(25, 1)}))]) == 2
    assert "rows 'hybrid' / 'hybrid', ndcg@10: the runs scored different queries: 0 only in the base run" in capsys.readouterr().err
    assert main(["eval-compare", str(a), str(_run(tmp_path / "e.json", {"dense": _scores(20, 1)}))]) == 2
    assert "no row name in both runs" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"rows": []}')
    assert main(["eval-compare", str(a), str(tmp_path / "bad.json")]) == 2
    assert "not a `rerankd eval --json` file" in capsys.readouterr().err
    assert main(["eval-compare", str(a), str(tmp_path / "missing.json")]) == 2
    assert "new run" in capsys.readouterr().err


def _doc(path: Path) -> dict:
    return json.loads(path.read_text())


def test_eval_compare_refuses_files_it_cannot_compare_faithfully(tmp_path, capsys):
    a = _run(tmp_path / "a.json", {"hybrid": _scores(20, 1), "dense": _scores(20, 2)})
    old = _doc(a)
    del old["rows"][1]["per_query"]  # a row written before per-query figures existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["eval-compare", str(a), str(tmp_path / "old.json")]) == 2
    assert "row 'dense' has no per-query figures" in capsys.readouterr().err
    dup = _doc(a)
    dup["rows"][1]["name"] = "hybrid"
    (tmp_path / "dup.json").write_text(json.dumps(dup))
    assert main(["eval-compare", str(a), str(tmp_path / "dup.json")]) == 2
    assert "two rows named 'hybrid'" in capsys.readouterr().err
    gap = _doc(a)
    del gap["rows"][0]["per_query"]["q3"]["mrr@10"]  # listed in meta.measures, missing for one query
    (tmp_path / "gap.json").write_text(json.dumps(gap))
    assert main(["eval-compare", str(a), str(tmp_path / "gap.json"), "--fail-if-worse"]) == 2
    assert "rows 'hybrid' / 'hybrid', mrr@10: the new run has no mrr@10 for query 'q3'" in capsys.readouterr().err
    # no shared measure: nothing compared is an error, not a passed gate
    other = _run(tmp_path / "other.json", {"hybrid": _scores(20, 9)}, measures=["p@5"])
    assert main(["eval-compare", str(a), str(other), "--fail-if-worse"]) == 2
    assert "nothing to compare: the runs share no measure" in capsys.readouterr().err


def test_eval_compare_uses_the_measures_both_runs_report(tmp_path, capsys):
    a = _run(tmp_path / "a.json", {"hybrid": _scores(30, 1)})
    b = _run(tmp_path / "b.json", {"hybrid": _scores(30, 1)}, measures=["ndcg@10"])
    out = tmp_path / "c.json"
    assert main(["eval-compare", str(a), str(b), "--json", str(out)]) == 0
    assert [c["measure"] for c in _doc(out)["comparisons"]] == ["ndcg@10"]


def test_eval_compare_level_resamples_and_seed_reach_the_figures(tmp_path):
    a = _run(tmp_path / "a.json", {"hybrid": _scores(200, 1)})
    b = _run(tmp_path / "b.json", {"hybrid": _scores(200, 2)})

    def ci(*extra):
        out = tmp_path / "out.json"
        assert main(["eval-compare", str(a), str(b), "--measures", "ndcg@10", "--json", str(out), *extra]) == 0
        doc = _doc(out)
        return doc, doc["comparisons"][0]["ci"]

    doc95, wide = ci()
    doc50, narrow = ci("--level", "0.5")
    assert doc50["level"] == 0.5 and narrow[1] - narrow[0] < (wide[1] - wide[0]) / 2
    ref = sig.paired(_scores(200, 1), _scores(200, 2), level=0.5, resamples=500, seed=7)
    doc, got = ci("--level", "0.5", "--resamples", "500", "--seed", "7")
    assert got == pytest.approx(list(ref.ci), abs=1e-12) and doc["comparisons"][0]["p_value"] == pytest.approx(ref.p_value)
    assert doc["resamples"] == 500 and doc["seed"] == 7

def test_eval_rows_carry_their_intervals():
    from rerankd.evaluate import Row, _row_dict, markdown, score_row

    qrels = {f"q{i}": {f"d{i}": 1} for i in range(40)}
    row = Row("hybrid", "hybrid", False, 100, run={f"q{i}": [f"d{i}" if i % 2 else "x"] for i in range(40)})
    score_row(row, qrels)
    assert row.metrics["ndcg@10"] == pytest.approx(0.5)
    lo, hi = row.ci95["ndcg@10"]
    assert 0.3 < lo < 0.5 < hi < 0.7
    assert (lo, hi) == sig.confidence_interval([v["ndcg@10"] for v in row.per_query.values()])  # the defaults
    assert set(_row_dict(row)["ci95"]) == set(row.metrics)
    meta = {"server": {}, "dataset": "toy", "split": "test", "queries": 40, "documents": 40}
    table = markdown([row], meta)
    assert "| row | NDCG@10 | MRR@10 | P@5 | Recall@100 | NDCG@10 95% CI |" in table
    assert f"| {lo:.3f}–{hi:.3f} |" in table
