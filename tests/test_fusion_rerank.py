"""Rerank fusion: z(reranker scores) + weight * z(-ln first-stage rank), and its wiring into Search."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rerankd.client import Client
from rerankd.config import Settings
from rerankd.embedded import EmbeddedServer
from rerankd.errors import ConfigError
from rerankd.stages.fusion import rerank_fusion

from util import assert_invalid, settings_for


def test_weight_zero_is_the_reranker_alone():
    s = [2.0, -1.0, 0.5]
    assert np.array_equal(rerank_fusion(s, [1, 2, 3], 0.0), np.asarray(s, dtype=np.float64))


def test_fusion_is_scale_free_in_the_reranker_scores():
    s, r = np.array([3.0, 1.0, 2.0, -4.0]), [4, 1, 2, 3]
    a = rerank_fusion(s, r, 0.7)
    b = rerank_fusion(10 * s + 5, r, 0.7)  # a reranker with a wider logit range orders the same
    assert np.allclose(a, b)


def test_fusion_values_by_hand():
    s, r = [1.0, 3.0], [1, 2]
    # two candidates: each z-score is +-1, so weight 1 ties them and weight 2 lets rank 1 win
    assert np.allclose(rerank_fusion(s, r, 1.0), [0.0, 0.0])
    assert np.allclose(rerank_fusion(s, r, 2.0), [1.0, -1.0])
    assert rerank_fusion([5.0], [1], 1.0).tolist() == [5.0]  # one candidate: nothing to fuse
    flat = rerank_fusion([1.0, 1.0, 1.0], [1, 2, 3], 1.0)  # constant reranker: first-stage order
    assert list(np.argsort(-flat)) == [0, 1, 2]


def test_fusion_rejects_bad_ranks():
    with pytest.raises(ValueError):
        rerank_fusion([1.0, 2.0], [0, 1], 1.0)
    with pytest.raises(ValueError):
        rerank_fusion([1.0, 2.0], [1], 1.0)


DOCS = [
    {"id": f"d{i}", "title": t, "text": x} for i, (t, x) in enumerate([
        ("Aspirin", "Regular aspirin use lowers the long-term risk of colorectal cancer."),
        ("Aspirin dosing", "Low-dose aspirin for the prevention of cardiovascular disease."),
        ("Colon cancer screening", "Colonoscopy screening reduces colorectal cancer mortality."),
        ("Vitamin D", "Vitamin D supplementation did not reduce fracture risk in older women."),
        ("Sleep", "Slow-wave sleep consolidates declarative memory."),
        ("NSAIDs", "Non-steroidal anti-inflammatory drugs and the risk of colorectal adenoma."),
    ])
]


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data-fusion")
    # fusion is off by default (see IndexConfig.rerank_fusion_weight): this server turns it on
    with EmbeddedServer(settings_for(models_dir, data, index={"data_dir": data, "rerank_fusion_weight": 1.0})) as srv:
        with Client(srv.target, timeout=120) as c:
            c.upsert(DOCS)
        yield srv


def test_search_orders_by_the_fused_score_and_reports_the_reranker_score(server):
    q = "does aspirin prevent colon cancer"
    with Client(server.target, timeout=120) as c:
        assert Settings().index.rerank_fusion_weight == 0.0  # the served default: reranker order alone
        assert c.stats().rerank_fusion_weight == 1.0
        fused = c.search(q, candidates=6, top_n=6)
        alone = c.search(q, candidates=6, top_n=6, fusion_weight=0.0)
        heavy = c.search(q, candidates=6, top_n=6, fusion_weight=100.0)
    # Each hit carries the cross-encoder's own score; it does not depend on the weight.
    ce = {h["id"]: h["rerank_score"] for h in alone}
    assert all(h["rerank_score"] == pytest.approx(ce[h["id"]], abs=1e-3) for h in fused)
    # fusion_weight=0: score IS the reranker score, ordered by it.
    assert [h["score"] for h in alone] == [h["rerank_score"] for h in alone]
    assert [h["id"] for h in alone] == sorted(ce, key=lambda d: -ce[d])
    # The server's weight: the served order is the fused score's, computed from the hits' own fields.
    expect = rerank_fusion([h["rerank_score"] for h in fused], [h["first_stage_rank"] for h in fused], 1.0)
    assert [h["score"] for h in fused] == pytest.approx(expect.tolist(), abs=1e-3)
    assert all(a["score"] >= b["score"] for a, b in zip(fused, fused[1:]))
    # A huge weight: the first stage's order.
    assert [h["first_stage_rank"] for h in heavy] == sorted(h["first_stage_rank"] for h in heavy)
    with Client(server.target, timeout=120) as c:
        plain = c.search(q, candidates=6, top_n=6, rerank=False)
    assert plain and all("rerank_score" not in h for h in plain)


@pytest.mark.parametrize("bad", [-0.5, math.inf, math.nan, 101.0])
def test_bad_fusion_weight_is_invalid_argument(server, bad):
    with Client(server.target, timeout=60) as c:
        assert_invalid(lambda: c.search("aspirin", fusion_weight=bad), "fusion_weight")


def test_bad_server_fusion_weight_fails_at_start(models_dir, tmp_path):
    from rerankd.pipeline import Pipeline

    with pytest.raises(ConfigError, match="rerank-fusion-weight"):
        Pipeline(settings_for(models_dir, tmp_path, index={"data_dir": tmp_path, "rerank_fusion_weight": -1.0}))
