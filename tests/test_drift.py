"""The reranker drift rule shared by the export gate and the GPU backend's load-time probe."""

import numpy as np
import pytest

from rerankd import drift

FP16_GATE = {"max_diff_in_sd": 0.05, "min_pair_agreement": 0.999}


def _probe_like(seed=0):
    """Shaped like the shipped reranker's parity cases, where 36 of 83 irrelevant pairs score
    within 0.026 of -13.02 (24 exact ties: the same pair at several batch shapes): a tight cluster
    with ties, plus pairs spread over [-5, 12]; logit sd ~7."""
    rng = np.random.default_rng(seed)
    cluster = -13.03 + rng.uniform(0, 0.012, 40)
    cluster = np.concatenate([cluster, cluster[:20]])  # exact ties
    spread = rng.uniform(-5, 12, 23)
    return np.concatenate([cluster, spread])


def test_pair_agreement_counts_only_pairs_apart_by_more_than_the_tie_width():
    ref = np.array([0.0, 0.001, 5.0, 10.0])
    got = np.array([0.001, 0.0, 5.0, 10.0])  # the near-tie swapped
    assert drift.pair_agreement(ref, got, tie=0.01) == (1.0, 5)
    got = np.array([0.0, 0.001, 10.0, 5.0])  # two separated scores swapped
    agree, n = drift.pair_agreement(ref, got, tie=0.01)
    assert n == 5 and agree == pytest.approx(4 / 5)


def test_pair_agreement_edge_cases():
    assert drift.pair_agreement([1.0, 1.0], [0.0, 5.0], tie=0.01) == (1.0, 0)  # nothing to compare
    assert drift.pair_agreement([0.0, 1.0], [np.nan, 1.0], tie=0.01)[0] == 0.0  # NaN never agrees
    assert drift.pair_agreement([0.0, 1.0], [2.0, 2.0], tie=0.01)[0] == 0.0  # a new tie is a lost order


def test_fp16_noise_among_near_ties_passes_but_failed_the_spearman_gate():
    """What an H100 did: 0.0026 sd of drift reorders the -13 cluster, Spearman drops below 0.999,
    yet no pair that is not a tie at the gate's resolution changes order."""
    ref = _probe_like()
    rng = np.random.default_rng(1)
    got = ref + rng.uniform(-0.018, 0.018, ref.size)
    rec = drift.rerank_drift(ref, got, FP16_GATE)
    assert rec["passed"] and rec["pair_agreement"] == 1.0 and rec["max_diff_in_sd"] < 0.005
    assert rec["spearman"] < 0.999  # the old rule would have refused this model
    assert not drift.rerank_drift(ref, got, {"max_diff_in_sd": 0.05, "min_spearman": 0.999})["passed"]


def test_reordering_separated_scores_is_refused_within_the_diff_budget():
    ref = _probe_like()
    close = -2.0 + 0.08 * np.arange(5)  # five scores 0.08 logits apart: not ties (0.01 sd ~ 0.07)
    one_swap = drift.rerank_drift(np.r_[ref, close[:2]], np.r_[ref, close[1::-1]], FP16_GATE)
    assert one_swap["max_diff_in_sd"] <= 0.05 and one_swap["pair_agreement"] < 1.0
    reversed_ = drift.rerank_drift(np.r_[ref, close], np.r_[ref, close[::-1]], FP16_GATE)
    assert reversed_["max_diff_in_sd"] <= 0.05  # each row moved at most 0.32 logits (0.05 sd)
    assert reversed_["pair_agreement"] < 0.999 and not reversed_["passed"]


def test_drift_past_the_budget_or_not_finite_is_refused():
    ref = _probe_like()
    assert not drift.rerank_drift(ref, ref + 1.0, FP16_GATE)["passed"]  # 1 logit ~ 0.14 sd
    bad = ref.copy()
    bad[3] = np.nan
    rec = drift.rerank_drift(ref, bad, FP16_GATE)
    assert not rec["passed"] and rec["max_diff_in_sd"] == float("inf")


def test_the_probe_measures_in_the_export_sd_when_given():
    ref = _probe_like()
    rec = drift.rerank_drift(ref, ref + 0.1, FP16_GATE, sd=1.0)
    assert rec["logit_std_fp32"] == 1.0 and rec["max_diff_in_sd"] == pytest.approx(0.1)
    assert not rec["passed"]


def test_spearman_gives_ties_their_average_rank():
    assert drift.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert np.isnan(drift.spearman([1, 1, 1], [1, 2, 3]))
