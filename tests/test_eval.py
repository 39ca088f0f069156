"""`rerankd eval` and `rerankd.irmetrics`.

* our metrics == ir_measures (the reference) on synthetic runs: graded and negative relevance,
  queries without relevant docs, empty/missing runs, duplicates; ties documented separately;
* our metrics == ir_measures on a real dense run over a SciFact slice;
* `rerankd eval` end to end on a small SciFact slice (embedded server, JSON + PNG), then the same
  data dir behind a second server: the shared-call k-rows equal real Search(candidates=k) calls,
  and `--target --skip-index` works.

On a slice this small the figures are noise: these tests check structure, never quality.
The machine is small and busy: the slice is tiny (8 queries, 80 docs, k in {5, 10}).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
from pathlib import Path

import pytest

from rerankd import irmetrics
from rerankd.config import Settings
from rerankd.evaluate import H, drop_self, hits_of, k_rows, load_dataset, load_qrels

from util import settings_for

ir_measures = pytest.importorskip("ir_measures")
from ir_measures import P, R, RR, Qrel, ScoredDoc, nDCG  # noqa: E402

REF = {"ndcg@10": nDCG @ 10, "mrr@10": RR @ 10, "p@5": P @ 5, "recall@100": R @ 100}
TOL = 1e-9


# -- helpers -------------------------------------------------------------------------------------------
def _ref_per_query(qrels, scored: dict[str, dict[str, float]], provider=None) -> dict[str, dict[str, float]]:
    """ir_measures per-query values, keyed like ours."""
    qr = [Qrel(q, d, r) for q, j in qrels.items() for d, r in j.items()]
    run = [ScoredDoc(q, d, s) for q, docs in scored.items() for d, s in docs.items()]
    names = {v: k for k, v in REF.items()}
    out: dict[str, dict[str, float]] = {}
    calc = (provider or ir_measures).iter_calc(list(REF.values()), qr, run)
    for m in calc:
        out.setdefault(m.query_id, {})[names[m.measure]] = m.value
    return out


def _scores_from_lists(run: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Ranked lists -> strictly decreasing scores (no ties: every provider sees the same order)."""
    out = {}
    for q, ids in run.items():
        seen: dict[str, float] = {}
        for i, d in enumerate(ids):
            seen.setdefault(d, float(len(ids) - i))
        out[q] = seen
    return out


def _assert_match(ours: dict[str, dict[str, float]], ref: dict[str, dict[str, float]], qrels) -> None:
    judged = [q for q, j in qrels.items() if irmetrics.num_relevant(j) > 0]
    assert sorted(ours) == sorted(judged)
    for q in judged:
        for m in REF:
            assert ours[q][m] == pytest.approx(ref[q][m], abs=TOL), (q, m, ours[q][m], ref[q][m])


def _synthetic(seed: int):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(400)]
    qrels: dict[str, dict[str, int]] = {}
    scored: dict[str, dict[str, float]] = {}
    for qi in range(40):
        q = f"q{qi}"
        judged = rng.sample(docs, rng.randint(1, 25))
        qrels[q] = {d: rng.choice([-1, 0, 0, 1, 1, 2, 3]) for d in judged}
        n = rng.choice([0, 1, 3, 7, 12, 60, 150])
        pool = judged + rng.sample(docs, 60)
        retrieved = rng.sample(sorted(set(pool)), min(n, len(set(pool))))
        values = rng.sample(range(10**6), len(retrieved))  # distinct: no ties
        scored[q] = {d: v / 1000 for d, v in zip(retrieved, values)}
    qrels["q_none"] = {"d1": 0, "d2": -1}  # judged, nothing relevant: left out of the averages
    scored["q_none"] = {"d1": 2.0, "d2": 1.0}
    qrels["q_missing"] = {"d3": 1}  # relevant docs but no run at all: scores 0
    qrels["q_empty"] = {"d4": 2}
    scored["q_empty"] = {}
    scored["q_unjudged"] = {"d5": 1.0}  # in the run only: ignored
    return qrels, scored


# -- metrics vs ir_measures ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_ir_measures_on_synthetic_runs(seed):
    qrels, scored = _synthetic(seed)
    run = {q: irmetrics.rank_by_score(s) for q, s in scored.items()}
    ours = irmetrics.per_query(run, qrels)
    ref = _ref_per_query(qrels, {q: s for q, s in scored.items() if s})
    _assert_match(ours, ref, qrels)
    assert ours["q_missing"] == {m: 0.0 for m in REF} and ours["q_empty"] == {m: 0.0 for m in REF}
    # Averages: over queries with >= 1 relevant doc (trec_eval). ir_measures' calc_aggregate also
    # counts q_none (all judgments <= 0) as 0, so compare against its per-query means instead.
    means = irmetrics.evaluate(run, qrels)
    judged = [q for q in qrels if irmetrics.num_relevant(qrels[q]) > 0]
    for m in REF:
        assert means[m] == pytest.approx(sum(ref[q][m] for q in judged) / len(judged), abs=TOL)
    agg = ir_measures.calc_aggregate(list(REF.values()), [Qrel(q, d, r) for q, j in qrels.items() for d, r in j.items()],
                                     [ScoredDoc(q, d, s) for q, docs in scored.items() for d, s in docs.items()])
    n_all = len(qrels)
    assert agg[nDCG @ 10] == pytest.approx(means["ndcg@10"] * len(judged) / n_all, abs=1e-9)


def test_graded_relevance_and_negative_judgments():
    qrels = {"q": {"a": 3, "b": 1, "c": -2, "d": 0, "e": 2}}
    run = {"q": ["c", "b", "x", "a", "d"]}  # e (rel 2) not retrieved
    ours = irmetrics.per_query(run, qrels)["q"]
    _assert_match({"q": ours}, _ref_per_query(qrels, _scores_from_lists(run)), qrels)
    assert ours["mrr@10"] == 0.5  # c (rel -2) is not relevant
    assert ours["p@5"] == pytest.approx(2 / 5)
    assert ours["recall@100"] == pytest.approx(2 / 3)


def test_ranked_lists_are_read_in_order_and_duplicates_count_once():
    qrels = {"q": {"a": 1, "b": 2}}
    run = {"q": ["z", "a", "a", "y", "b"]}
    ours = irmetrics.per_query(run, qrels)["q"]
    ref = _ref_per_query(qrels, _scores_from_lists(run))["q"]
    for m in REF:
        assert ours[m] == pytest.approx(ref[m], abs=TOL)
    assert ours["p@5"] == pytest.approx(2 / 5)  # the duplicate a does not count twice


def test_tie_rule_is_trec_evals():
    """Our tie rule (``rank_by_score``): score descending, then doc id descending — trec_eval's, which
    ir_measures' pytrec_eval provider (nDCG, P, R) follows. ir_measures' default provider for RR@k
    (msmarco) breaks ties by doc id ascending, so on tied scores the providers disagree with each
    other; ``rerankd eval`` never meets this — it scores the order the server returned."""
    scored = {"q": {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.5, "e": 0.5}, "q2": {"10": 2.0, "9": 2.0, "1": 2.0}}
    qrels = {"q": {"a": 1, "e": 2}, "q2": {"10": 1}}
    run = {q: irmetrics.rank_by_score(s) for q, s in scored.items()}
    assert run == {"q": ["c", "b", "a", "e", "d"], "q2": ["9", "10", "1"]}  # string order, descending
    ours = irmetrics.per_query(run, qrels)
    _assert_match(ours, _ref_per_query(qrels, scored, provider=ir_measures.pytrec_eval), qrels)
    default_rr = _ref_per_query(qrels, scored)["q"]["mrr@10"]  # msmarco provider: a first
    assert (ours["q"]["mrr@10"], default_rr) == (1 / 3, 1.0)


# -- eval plumbing (no server) ------------------------------------------------------------------------
def test_drop_self_and_k_rows():
    hits = [H("d7", 5.0, 3), H("q1", 4.0, 1), H("d2", 3.0, 4), H("d9", 2.0, 2), H("d5", 1.0, 5)]
    kept = drop_self(hits, "q1")
    assert kept == [H("d7", 5.0, 2), H("d2", 3.0, 3), H("d9", 2.0, 1), H("d5", 1.0, 4)]
    assert k_rows(kept, [1, 2, 4]) == {1: ["d9"], 2: ["d7", "d9"], 4: ["d7", "d2", "d9", "d5"]}


def test_k_rows_refuse_over_each_k():
    """With rerank fusion the order of a k-row is re-fused over its own k candidates."""
    from rerankd.stages.fusion import rerank_fusion

    hits = [H("a", 0.0, 1, 1.0), H("b", 0.0, 2, 3.0), H("c", 0.0, 3, 2.9), H("d", 0.0, 4, -5.0)]
    assert k_rows(hits, [4], 0.0) == {4: ["a", "b", "c", "d"]}  # weight 0: served order kept
    rows = k_rows(hits, [2, 4], 1.5)
    for k, ids in rows.items():
        sub = hits[:k]
        fused = rerank_fusion([h.rerank for h in sub], [h.fsr for h in sub], 1.5)
        assert ids == [sub[i].id for i in sorted(range(k), key=lambda i: -fused[i])]
    assert rows == {2: ["a", "b"], 4: ["a", "b", "c", "d"]}  # a strong first-stage weight keeps rank 1 on top
    assert k_rows(hits, [4], 0.1) == {4: ["b", "c", "a", "d"]}  # a light one: the reranker's order
    assert drop_self(hits, "nope") == hits


def test_slice_keeps_every_judged_doc(scifact):
    ds = load_dataset(scifact, "test", max_queries=8, max_docs=80)
    ids = {d["_id"] for d in ds.doc_slice}
    assert len(ds.queries) == 8 and len(ids) == ds.n_docs == 80
    full = load_qrels(scifact / "qrels" / "test.tsv")
    for q, _ in ds.queries:
        assert set(full[q]) <= ids
        assert ds.qrels[q] == full[q]


# -- end to end ---------------------------------------------------------------------------------------
N_QUERIES, N_DOCS, KS = 8, 80, ("5", "10")


@pytest.fixture(scope="module")
def eval_run(models_dir, scifact, tmp_path_factory):
    from rerankd.cli import main

    out = tmp_path_factory.mktemp("eval")
    data = out / "data"
    argv = ["eval", "--dataset", str(scifact), "--models-dir", str(models_dir), "--data-dir", str(data),
            "--max-queries", str(N_QUERIES), "--max-docs", str(N_DOCS), "--ks", *KS,
            "--latency-queries", "2", "--warmup-queries", "1", "--no-warmup", "--threads", "1", "--no-progress",
            "--backend", "onnxruntime", "--precision", "fp32",
            "--json", str(out / "eval.json"), "--plot", str(out / "eval.png")]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return {"rc": rc, "stdout": buf.getvalue(), "json": out / "eval.json", "png": out / "eval.png", "data": data}


def test_eval_end_to_end_writes_table_json_and_plot(eval_run, models_dir):
    assert eval_run["rc"] == 0, eval_run["stdout"]
    rows_expected = ["dense", "bm25", "hybrid", *(f"hybrid+rerank@{k}" for k in KS)]
    doc = json.loads(eval_run["json"].read_text())
    meta, rows = doc["meta"], doc["rows"]
    assert [r["name"] for r in rows] == rows_expected
    assert meta["dataset"] == "scifact" and meta["split"] == "test"
    assert meta["queries"] == N_QUERIES and meta["documents"] == N_DOCS
    assert meta["indexing"]["documents"] == N_DOCS and meta["indexing"]["docs_per_s"] > 0
    s = meta["server"]
    assert s["embedded"] and s["embedder_model"] and s["reranker_model"] and s["backend"] == "onnxruntime"
    assert s["precision"] == "fp32" and s["documents"] == N_DOCS and isinstance(s["reranker_trained"], bool)
    assert meta["machine"]["cores"] >= 1 and "cpu_model" in meta["machine"]
    for r in rows:
        assert set(r["metrics"]) == {"ndcg@10", "mrr@10", "p@5", "recall@100"}
        assert all(0.0 <= v <= 1.0 for v in r["metrics"].values())
        assert len(r["per_query"]) == N_QUERIES and not r["failed_queries"]
        lat = r["latency"]
        assert lat["queries"] == 2 and lat["candidates"] == (100 if not r["rerank"] else r["candidates"])
        for key in ("total_ms", "server_total_ms", "embed_ms", "ann_ms", "bm25_ms", "rerank_ms"):
            assert lat[key]["p50"] is not None and lat[key]["p95"] >= lat[key]["p50"] >= 0
        assert lat["total_ms"]["p50"] >= lat["server_total_ms"]["p50"]  # client wall time includes the server's
    by = {r["name"]: r for r in rows}
    assert by["dense"]["latency"]["bm25_ms"]["p50"] == 0 and by["bm25"]["latency"]["embed_ms"]["p50"] == 0
    assert by["bm25"]["latency"]["rerank_ms"]["p50"] == 0 and by["hybrid+rerank@10"]["latency"]["rerank_ms"]["p50"] > 0
    # A rerank@k row keeps the first stage's top-k, so its recall is the first stage's recall@k.
    assert by["hybrid+rerank@5"]["metrics"]["recall@100"] <= by["hybrid+rerank@10"]["metrics"]["recall@100"]
    assert by["hybrid+rerank@10"]["metrics"]["recall@100"] <= by["hybrid"]["metrics"]["recall@100"] + 1e-12
    assert by["hybrid+rerank@5"]["k_rows_from"] == "shared candidates=10 call"
    # The slice holds every relevant doc of the kept queries, and only 80 docs: dense returns all of them.
    assert by["dense"]["metrics"]["recall@100"] == 1.0
    table = eval_run["stdout"]
    assert "| row | NDCG@10 | MRR@10 | P@5 | Recall@100 |" in table
    for name in rows_expected:
        assert f"| {name} |" in table
    assert "exactly what Search(candidates=k) returns" in table and "trec_eval" in table
    png = eval_run["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.fixture(scope="module")
def server(eval_run, models_dir):
    """A second server over the data dir the eval run indexed (no re-embedding)."""
    from rerankd.client import Client
    from rerankd.embedded import EmbeddedServer

    assert eval_run["rc"] == 0
    # rerank fusion on (the default is off), so the k-rows below must be re-fused per k
    settings = settings_for(models_dir, eval_run["data"], model={"threads": 1, "backend": "onnxruntime", "precision": "fp32"},
                            index={"data_dir": eval_run["data"], "rerank_fusion_weight": 1.0})
    with EmbeddedServer(settings) as srv:
        with Client(srv.target, timeout=300) as c:
            assert c.stats().documents == N_DOCS
        yield srv


@pytest.fixture(scope="module")
def queries(scifact):
    ds = load_dataset(scifact, "test", max_queries=N_QUERIES, max_docs=N_DOCS)
    return ds


@pytest.mark.parametrize("stage,big,ks,n", [("hybrid", 10, (3, 6), 3), ("dense", 8, (4,), 2)])
def test_shared_call_k_rows_equal_real_searches(server, queries, stage, big, ks, n):
    """The k-row built from one Search(candidates=K) == a real Search(candidates=k): same docs, same
    first-stage ranks; reranker scores equal up to batch-padding float noise, order consistent."""
    from rerankd.client import Client

    with Client(server.target, timeout=300) as c:
        weight = c.stats().rerank_fusion_weight
        assert weight > 0  # this server's: rows are re-fused over each k's candidates
        for qid, text in queries.queries[:n]:
            shared = drop_self(hits_of(c.search(text, first_stage=stage, rerank=True, candidates=big, top_n=big, raw=True)), qid)
            rows = k_rows(shared, ks, weight)
            by_id = {h.id: h for h in shared}
            for k in ks:
                real = drop_self(hits_of(c.search(text, first_stage=stage, rerank=True, candidates=k, top_n=k, raw=True)), qid)
                assert sorted(rows[k]) == sorted(h.id for h in real), (qid, k)
                real_by = {h.id: h for h in real}
                for d in rows[k]:
                    assert real_by[d].fsr == by_id[d].fsr
                    assert real_by[d].rerank == pytest.approx(by_id[d].rerank, abs=1e-3)
                emulated_real_scores = [real_by[d].score for d in rows[k]]
                assert all(a >= b - 1e-3 for a, b in zip(emulated_real_scores, emulated_real_scores[1:]))
                if [h.id for h in real] != rows[k]:  # only a near-tie may swap
                    diffs = [abs(real_by[a].score - real_by[b].score) for a, b in zip(rows[k], [h.id for h in real]) if a != b]
                    assert max(diffs) <= 2e-3


def test_metrics_match_ir_measures_on_a_real_dense_run(server, scifact, queries):
    from rerankd.client import Client

    qrels_all = load_qrels(scifact / "qrels" / "test.tsv")
    texts = {json.loads(line)["_id"]: json.loads(line)["text"] for line in open(scifact / "queries.jsonl", encoding="utf-8")}
    # The kept queries (relevant docs indexed) plus a few whose relevant docs are mostly absent.
    qids = [q for q, _ in queries.queries] + [q for q in qrels_all if q not in queries.qrels][:6]
    run: dict[str, list[str]] = {}
    with Client(server.target, timeout=300) as c:
        for q in qids:
            run[q] = [h.id for h in c.search(texts[q], first_stage="dense", rerank=False, candidates=100, top_n=100, raw=True).hits]
    qrels = {q: qrels_all[q] for q in qids}
    ours = irmetrics.per_query(run, qrels)
    # ir_measures gets the served order as strictly decreasing scores (no tie-rule differences).
    _assert_match(ours, _ref_per_query(qrels, _scores_from_lists(run)), qrels)
    assert 0 < irmetrics.evaluate(run, qrels)["ndcg@10"] <= 1


def test_eval_against_a_running_target(server, scifact, tmp_path):
    from rerankd.cli import main

    out = tmp_path / "t.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["eval", "--dataset", str(scifact), "--target", server.target, "--skip-index",
                   "--max-queries", "3", "--max-docs", str(N_DOCS), "--stages", "bm25", "--ks",
                   "--latency-queries", "1", "--warmup-queries", "0", "--no-progress", "--json", str(out)])
    assert rc == 0, buf.getvalue()
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["rows"]] == ["bm25"]
    assert doc["meta"]["server"]["target"] == server.target and doc["meta"]["server"]["embedded"] is False
    assert doc["meta"]["documents"] == N_DOCS and doc["meta"]["indexing"] is None
    assert "| bm25 |" in buf.getvalue()


def test_eval_budget_rows(server, scifact, tmp_path):
    """--budgets-ms rows: real budgeted Searches; a budget that covers everything scores as the
    unbudgeted rerank row, a 1 ms one reranks at most the one pair that measures the rate."""
    from rerankd.cli import main

    out, png = tmp_path / "b.json", tmp_path / "b.png"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["eval", "--dataset", str(scifact), "--target", server.target, "--skip-index",
                   "--max-queries", "3", "--max-docs", str(N_DOCS), "--stages", "hybrid", "--ks", "5",
                   "--budgets-ms", "1", "600000", "--budget-candidates", "5",
                   "--latency-queries", "1", "--warmup-queries", "0", "--no-progress", "--json", str(out), "--plot", str(png)])
    assert rc == 0, buf.getvalue()
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["hybrid", "hybrid+rerank@5", "hybrid+rerank@5 budget 1 ms", "hybrid+rerank@5 budget 600000 ms"]
    wide, tight = rows["hybrid+rerank@5 budget 600000 ms"], rows["hybrid+rerank@5 budget 1 ms"]
    assert wide["budget_ms"] == 600000 and wide["reranked_candidates"]["all"] == 3 and wide["reranked_candidates"]["min"] == 5
    assert wide["per_query"] == rows["hybrid+rerank@5"]["per_query"]  # the same served order
    assert tight["reranked_candidates"]["max"] <= 1 and tight["reranked_candidates"]["queries"] == 3
    assert tight["latency"]["queries"] == 1 and rows["hybrid+rerank@5"]["budget_ms"] is None
    assert wide["latency"]["reranked_candidates"]["min"] == 5 and "reranked_candidates" not in rows["hybrid"]["latency"]
    assert "budget_ms=600000) per query; candidates reranked per query: mean 5.0" in buf.getvalue()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reranked_stats_and_budget_arguments():
    from rerankd.evaluate import _check_args, reranked_stats

    assert reranked_stats([5, 0, 3, 5], 5) == {"queries": 4, "mean": 3.25, "p50": 4.0, "min": 0, "max": 5, "all": 2}
    assert reranked_stats([])["mean"] is None
    args = argparse.Namespace(ks=[10], stages=[], skip_index=False, target=None, index__data_dir=None,
                              max_queries=None, max_docs=None, budgets_ms=[0], budget_candidates=50)
    assert "--budgets-ms" in _check_args(args, Settings())
    args.budgets_ms, args.budget_candidates = [100], 5000
    assert "--budget-candidates: 5000 exceeds --max-candidates 1000" == _check_args(args, Settings())
    args.budget_candidates = 50
    assert _check_args(args, Settings()) is None


def test_eval_rejects_bad_arguments(scifact, capsys):
    from rerankd.cli import main

    assert main(["eval", "--dataset", str(scifact), "--skip-index"]) == 2
    assert "--skip-index needs" in capsys.readouterr().err
    assert main(["eval", "--dataset", str(Path("/nonexistent"))]) == 2


# -- datasets that `rerankd index` takes, and server answers eval must not turn into zeros -----------------
def _tiny_beir(root: Path, corpus_lines: list[str], qrels: str) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(corpus_lines), encoding="utf-8")
    queries = [{"_id": "q1", "text": "aspirin colon cancer"}, {"_id": "q2", "text": "statins and heart disease"}]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    (root / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    return root


def test_eval_takes_the_datasets_index_takes(models_dir, tmp_path, capsys):
    """A third review: a BOM on corpus.jsonl or the qrels, an id twice within one Upsert batch, a
    row with a lone surrogate, a text the server refuses (no tokens) and rows keyed "id" each
    crashed eval or silently dropped a query. They are now read, skipped and counted."""
    from rerankd.cli import main

    docs = [{"_id": "d1", "title": "Aspirin", "text": "Aspirin lowers the risk of colon cancer."},
            {"id": "d2", "title": "Statins", "text": "Statins reduce heart disease events."},
            {"_id": "d3", "title": "", "text": "Coffee and liver enzymes."},
            {"_id": "d1", "title": "Aspirin", "text": "Aspirin lowers colon cancer risk (a later version)."},
            {"_id": "dz", "title": "", "text": "\u200b\u200b"}]
    lines = ["\ufeff" + json.dumps(docs[0]) + "\n", *(json.dumps(d) + "\n" for d in docs[1:]),
             '{"_id": "ds", "title": "x", "text": "bad \\ud800 text"}\n']
    ds = _tiny_beir(tmp_path / "ds", lines, "\ufeffq1\td1\t1\nq2\td2\t1\n")
    out = tmp_path / "e.json"
    rc = main(["eval", "--dataset", str(ds), "--split", "test", "--models-dir", str(models_dir), "--no-warmup",
               "--stages", "bm25", "--ks", "--latency-queries", "0", "--no-progress", "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    doc = json.loads(out.read_text())
    assert doc["meta"]["queries"] == 2  # q1 was lost to the qrels' BOM
    idx = doc["meta"]["indexing"]
    assert (idx["refused"], idx["skipped_unencodable"]) == (1, 1) and "dz" in idx["refused_examples"]
    assert idx["documents"] == 3  # d1 twice is one document
    assert "has no tokens" in idx["refused_examples"]["dz"] and "the server refused" in err
    assert doc["rows"][0]["metrics"]["recall@100"] == 1.0  # both relevant docs, d2 keyed "id", were indexed


def test_eval_refuses_limits_its_rows_exceed_instead_of_scoring_zeros(models_dir, tmp_path, capsys):
    """The first-stage rows ask for 100 hits (+1): with --max-candidates 60 every query was
    refused with INVALID_ARGUMENT on candidates, counted as a rejected query, and the run printed
    rows of zeros with exit 0 (found by a review)."""
    from rerankd.cli import main

    ds = _tiny_beir(tmp_path / "ds", [json.dumps({"_id": "d1", "text": "aspirin"}) + "\n"], "q1\td1\t1\n")
    rc = main(["eval", "--dataset", str(ds), "--split", "test", "--models-dir", str(models_dir), "--no-warmup",
               "--stages", "bm25", "--ks", "--max-candidates", "60", "--no-progress"])
    assert rc == 2 and "--max-candidates 60" in capsys.readouterr().err


def test_eval_retries_an_overloaded_search_and_counts_only_query_errors(monkeypatch):
    """One RESOURCE_EXHAUSTED ended the whole eval and lost what was measured (found by a
    review): it is retried after the server's retry-after-ms. An INVALID_ARGUMENT on another
    field than the query ends the run rather than scoring the query 0."""
    import types

    import grpc

    from rerankd import evaluate

    class Err(grpc.RpcError):
        def __init__(self, code, details, retry_ms=None):
            self._c, self._d, self._m = code, details, retry_ms

        def code(self):
            return self._c

        def details(self):
            return self._d

        def trailing_metadata(self):
            return (("retry-after-ms", str(self._m)),) if self._m is not None else ()

    slept: list[float] = []
    monkeypatch.setattr(evaluate.time, "sleep", slept.append)
    ev = evaluate.Evaluator.__new__(evaluate.Evaluator)
    ev.ds = types.SimpleNamespace(queries=[("q6", "statins \ud800"), ("q7", "fine")])
    row = evaluate.Row("bm25", "bm25", False, 100)
    answers = [Err(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", 250), Err(grpc.StatusCode.UNAVAILABLE, "draining"), "ok"]

    def fn():
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    assert ev._guarded(row, "q1", fn) == "ok" and slept == [0.25, 0.2] and not row.failed
    assert ev._guarded(row, "q2", lambda: (_ for _ in ()).throw(Err(grpc.StatusCode.INVALID_ARGUMENT, "query: has no tokens"))) is None
    assert row.failed == {"q2": "query: has no tokens"}
    with pytest.raises(grpc.RpcError):
        ev._guarded(row, "q3", lambda: (_ for _ in ()).throw(Err(grpc.StatusCode.INVALID_ARGUMENT, "candidates: 101 exceeds")))
    # the latency loop does not retry (a wait would be timed): the call counts as failed
    assert ev._guarded(row, "q4", lambda: (_ for _ in ()).throw(Err(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", 100)), retry=False) is None
    assert "q4" in row.failed and len(slept) == 2
    # RESOURCE_EXHAUSTED without the server's hint is gRPC's own (a message over the size limit): no retry helps
    with pytest.raises(grpc.RpcError):
        ev._guarded(row, "q5", lambda: (_ for _ in ()).throw(Err(grpc.StatusCode.RESOURCE_EXHAUSTED, "message larger than max")))
    assert len(slept) == 2
    # a query no request can carry (a lone surrogate) scores 0, as a refused one does; another
    # encoding error (e.g. in a token) is not blamed on the query
    assert ev._guarded(row, "q6", lambda: pytest.fail("never sent")) is None and "q6" in row.failed
    with pytest.raises(UnicodeEncodeError):
        ev._guarded(row, "q7", lambda: "token \ud800".encode("utf-8"))


def test_eval_runs_at_limits_of_exactly_its_depth_with_a_self_hit(models_dir, tmp_path, capsys):
    """The first check asked for room for the BEIR self-hit's extra hit on every query: a server
    limited to 100 candidates or top_n could not be evaluated at all (a review). The extra hit is
    asked for only by a query whose id is a document, and only where the limits leave room."""
    from rerankd.cli import main

    docs = [{"_id": "q1", "text": "aspirin and colon cancer, the query's own row"},
            {"_id": "d1", "text": "Aspirin lowers the risk of colon cancer."},
            {"_id": "d2", "text": "Statins reduce heart disease events."}]
    ds = _tiny_beir(tmp_path / "ds", [json.dumps(d) + "\n" for d in docs], "q1\td1\t1\nq2\td2\t1\n")
    out = tmp_path / "e.json"
    rc = main(["eval", "--dataset", str(ds), "--split", "test", "--models-dir", str(models_dir), "--no-warmup",
               "--stages", "bm25", "--ks", "--latency-queries", "0", "--max-candidates", "100", "--max-top-n", "100",
               "--no-progress", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    row = json.loads(out.read_text())["rows"][0]
    assert row["metrics"]["recall@100"] == 1.0 and not row.get("failed")


def test_shared_k_rows_account_for_the_self_hit_extra_candidate():
    """A query whose own id is a document asks for k + 1: with the largest k at --ef-search, the
    shared call searched at ef = k + 1 and its k-rows were labelled exact (a review)."""
    import argparse
    import types

    from rerankd import config as cfg
    from rerankd import evaluate

    ev = evaluate.Evaluator.__new__(evaluate.Evaluator)
    ev.args = argparse.Namespace(rerank_stage="dense", ks=[10, 100], exact_k_rows=False, timeout=1)
    ev.settings = cfg.Settings().replace(index={"ef_search": 100})
    ev.ds = types.SimpleNamespace(queries=[("q1", "aspirin")])
    ev.progress, ev.fusion_weight = False, 0.0
    calls: list[int] = []

    def search(text, *, stage, rerank, candidates, top_n):
        calls.append(candidates)
        return types.SimpleNamespace(hits=[])

    ev.search = search
    for self_ids, want in ((set(), [100]), ({"q1"}, [11, 101])):
        calls.clear()
        ev.self_ids = self_ids
        rows = ev.rerank_rows()
        assert calls == want, (self_ids, calls)
        assert [r.k_rows_from for r in rows] == (["shared candidates=100 call"] * 2 if not self_ids else ["direct", "direct"])
