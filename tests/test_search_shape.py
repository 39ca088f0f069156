"""Search result shaping: field collapsing (collapse_key) and each first-stage leg's rank per hit,
on a real server over a small hand-made corpus of chunked documents (no dataset needed)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from rerankd.client import Client
from rerankd.config import LimitsConfig
from rerankd.embedded import EmbeddedServer
from rerankd.errors import InvalidArgument
from rerankd.pipeline import Document, Pipeline, SearchParams, SHED_DIVERSITY_POOL_MIN, SHED_DIVERSITY_POOL_PER_HIT, _collapse, _diversity_pool, _ranks
from rerankd.validation import check_collapse

from util import assert_invalid, settings_for

# Three parent documents split into chunks (metadata "parent"), all about aspirin and colorectal
# cancer, so their chunks crowd the top of the list; plus chunks with no parent key.
CHUNKS = [
    ("a-1", "a", "Aspirin use lowers the incidence of colorectal adenomas in randomized trials."),
    ("a-2", "a", "Daily aspirin reduced colorectal cancer mortality after twenty years of follow-up."),
    ("a-3", "a", "Aspirin inhibits COX-2, a pathway implicated in colorectal tumour growth."),
    ("b-1", "b", "Low-dose aspirin and the risk of colorectal cancer: a cohort of nurses."),
    ("b-2", "b", "Colorectal cancer risk fell among regular aspirin users in the cohort."),
    ("c-1", "c", "Aspirin and bleeding risk in elderly patients with colorectal polyps."),
    ("x-1", None, "Aspirin, colorectal cancer and the gut microbiome: a review."),
    ("x-2", None, "Colorectal cancer screening uptake after an aspirin trial invitation."),
    ("z-1", "z", "Zebrafish fin regeneration requires osteoblast dedifferentiation."),
    ("z-2", "z", "Heart regeneration in zebrafish depends on cardiomyocyte proliferation."),
]
QUERY = "does aspirin prevent colorectal cancer?"


@pytest.fixture(scope="module")
def client(models_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("shape-data")
    with EmbeddedServer(settings_for(models_dir, data)) as srv, Client(srv.target, timeout=120) as c:
        c.upsert([{"id": i, "text": t, "metadata": {"parent": p} if p else {}} for i, p, t in CHUNKS])
        yield c


PARENT = {i: p for i, p, _ in CHUNKS}


def _parents(hits):
    return [PARENT[h["id"]] for h in hits]


@pytest.mark.parametrize("rerank", [False, True])
def test_collapse_keeps_the_best_hits_per_parent_in_order(client, rerank):
    whole = client.search(QUERY, top_n=10, candidates=10, rerank=rerank, raw=True)
    order = [h.id for h in whole.hits]
    r = client.search(QUERY, top_n=10, candidates=10, rerank=rerank, collapse_key="parent", raw=True)
    ids = [h.id for h in r.hits]
    # at most one hit per parent; chunks without the key are never collapsed
    kept_parents = [PARENT[i] for i in ids if PARENT[i] is not None]
    assert len(kept_parents) == len(set(kept_parents)) == 4  # a, b, c, z
    assert {"x-1", "x-2"} <= set(ids)
    # the best chunk of each parent, in the uncollapsed order (the others move up)
    expect = []
    for i in order:
        if PARENT[i] is None or PARENT[i] not in {PARENT[j] for j in expect}:
            expect.append(i)
    if not rerank:  # first-stage scores are deterministic: the same order exactly
        assert ids == expect
    else:
        assert set(ids) == set(expect)
    assert r.collapsed == 10 - len(ids) == 4 and whole.collapsed == 0
    assert [h.rank for h in r.hits] == list(range(1, len(ids) + 1))
    assert r.reranked_candidates == (10 if rerank else 0)  # collapsing does not change what was reranked


def test_collapse_max_and_top_n(client):
    r = client.search(QUERY, top_n=10, candidates=10, rerank=False, collapse_key="parent", collapse_max=2, raw=True)
    parents = [PARENT[h.id] for h in r.hits]
    assert parents.count("a") == 2 and r.collapsed == 1 and len(r.hits) == 9
    top = client.search(QUERY, top_n=3, candidates=10, rerank=False, collapse_key="parent", raw=True)
    assert [h.id for h in top.hits] == [h.id for h in client.search(
        QUERY, top_n=10, candidates=10, rerank=False, collapse_key="parent", raw=True).hits][:3]
    # a key no document has: nothing collapsed
    none = client.search(QUERY, top_n=10, candidates=10, rerank=False, collapse_key="no-such-key", raw=True)
    assert len(none.hits) == 10 and none.collapsed == 0


def test_leg_ranks_are_each_legs_own_rank(client):
    n = len(CHUNKS)
    dense = [h["id"] for h in client.search(QUERY, top_n=n, candidates=n, rerank=False, first_stage="dense")]
    bm25 = [h["id"] for h in client.search(QUERY, top_n=n, candidates=n, rerank=False, first_stage="bm25")]
    hybrid = client.search(QUERY, top_n=n, candidates=n, rerank=True, first_stage="hybrid")
    for h in hybrid:
        assert h["dense_rank"] == (dense.index(h["id"]) + 1 if h["id"] in dense else 0), h
        assert h["bm25_rank"] == (bm25.index(h["id"]) + 1 if h["id"] in bm25 else 0), h
    assert any(h["bm25_rank"] == 0 for h in hybrid)  # zebrafish chunks share no term with the query
    assert all(h["dense_rank"] > 0 for h in hybrid)
    for stage, mine, other in (("dense", "dense_rank", "bm25_rank"), ("bm25", "bm25_rank", "dense_rank")):
        hits = client.search(QUERY, top_n=5, candidates=5, rerank=True, first_stage=stage)
        assert all(h[mine] == h["first_stage_rank"] and h[other] == 0 for h in hits), (stage, hits)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"collapse_max": 2}, "collapse_max"),
        ({"collapse_key": "parent", "collapse_max": 0}, "collapse_max"),
        ({"collapse_key": "k" * 70000}, "collapse_key"),  # over --max-metadata-bytes
    ],
)
def test_collapse_bad_input_names_the_field(client, kwargs, field):
    assert_invalid(lambda: client.search(QUERY, **kwargs), field)


def test_collapse_and_ranks_units():
    ranked = [("a", 1), ("b", 2), ("a", 3), (None, 4), ("a", 5), (None, 6), ("b", 7)]
    kept, out = _collapse(ranked, lambda r: r[0], 1)
    assert kept == [("a", 1), ("b", 2), (None, 4), (None, 6)] and out == 3
    kept, out = _collapse(ranked, lambda r: r[0], 2)
    assert kept == [("a", 1), ("b", 2), ("a", 3), (None, 4), (None, 6), ("b", 7)] and out == 1
    assert _ranks([7, 3, 7, 9]) == {7: 1, 3: 2, 9: 4}  # a label listed twice keeps its best rank
    limits = LimitsConfig()
    assert check_collapse("", None, limits) == 0 and check_collapse("parent", None, limits) == 1
    assert check_collapse("parent", 3, limits) == 3
    with pytest.raises(InvalidArgument):
        check_collapse("", 2, limits)


def test_mmr_units():
    from rerankd.stages.fusion import mmr

    e = np.eye(3, dtype=np.float32)
    # items 0 and 1 are the same document; 2 is different and less relevant
    v = np.stack([e[0], e[0], e[1]])
    rel = [3.0, 2.9, 1.0]
    assert mmr(rel, v, 0.0, 3) == [0, 1, 2]  # off: relevance order
    assert mmr(rel, v, 0.5, 3) == [0, 2, 1]  # the duplicate gives way
    assert mmr(rel, v, 0.5, 2) == [0, 2] and mmr(rel, v, 0.5, 9) == [0, 2, 1]
    assert mmr([1.0, 1.0, 1.0], v, 0.3, 3) == [0, 2, 1]  # equal relevance: the earlier first, then novelty
    assert mmr([], np.zeros((0, 3)), 0.5, 3) == []
    # a zero vector (a document deleted meanwhile) is similar to nothing
    assert mmr([3.0, 2.9, 1.0], np.stack([e[0], np.zeros(3), e[0]]), 0.5, 3) == [0, 1, 2]
    # scale does not matter (min-max): logits or cosines pick the same
    assert mmr([30.0, 29.0, 10.0], v, 0.5, 3) == mmr([0.30, 0.29, 0.10], v, 0.5, 3)
    # near-ties (float noise below 1e-6) go to the earlier item, as exact ties do
    assert mmr([1.0, 1.0 + 1e-8, 0.0], np.stack([e[0], e[1], e[2]]), 0.0, 3) == [0, 1, 2]


DUPES = [{"id": f"dup-{i}", "text": "Aspirin lowers colorectal cancer risk in a large randomized trial.",
          "metadata": {"parent": f"dup-{i}"}} for i in range(3)]


@pytest.mark.parametrize("rerank", [False, True])
def test_diversity_lets_near_duplicates_give_way(client, rerank):
    client.upsert(DUPES)
    try:
        n = len(CHUNKS) + len(DUPES)
        plain = [h["id"] for h in client.search(QUERY, top_n=5, candidates=n, rerank=rerank)]
        assert sum(i.startswith("dup-") for i in plain) >= 2  # the copies crowd the top without it
        div = client.search(QUERY, top_n=5, candidates=n, rerank=rerank, diversity=0.7)
        ids = [h["id"] for h in div]
        assert sum(i.startswith("dup-") for i in ids) == 1 and len(ids) == 5
        assert ids[0] == plain[0]  # the most relevant hit stays first
        assert [h["rank"] for h in div] == [1, 2, 3, 4, 5]
        tiny = [h["id"] for h in client.search(QUERY, top_n=5, candidates=n, rerank=rerank, diversity=1e-6)]
        if not rerank:
            assert tiny == plain  # a negligible weight keeps the relevance order
    finally:
        client.delete([d["id"] for d in DUPES])


def test_diversity_and_collapse_apply_together(client):
    client.upsert(DUPES)  # three copies, each its own parent: collapsing alone keeps them all
    try:
        n = len(CHUNKS) + len(DUPES)
        collapsed = [h["id"] for h in client.search(QUERY, top_n=6, candidates=n, collapse_key="parent")]
        assert sum(i.startswith("dup-") for i in collapsed) >= 2
        both = client.search(QUERY, top_n=6, candidates=n, collapse_key="parent", diversity=0.7, raw=True)
        ids = [h.id for h in both.hits]
        parents = [PARENT.get(i, i) for i in ids if PARENT.get(i, i) is not None]
        assert len(parents) == len(set(parents))  # still one hit per parent
        assert sum(i.startswith("dup-") for i in ids) == 1 and both.collapsed > 0
    finally:
        client.delete([d["id"] for d in DUPES])


def test_diversity_pool_is_the_reranked_prefix_or_a_bounded_head():
    def entries(scored: int, total: int):
        return [((i, 0.0, i + 1), 1.0, 0.5 if i < scored else None) for i in range(total)]

    assert _diversity_pool(entries(0, 300), False, 10) == 300  # rerank off: every candidate
    assert _diversity_pool(entries(50, 50), True, 10) == 50  # fully reranked
    assert _diversity_pool(entries(7, 300), True, 10) == 7  # a budget cut the rerank: the scored prefix
    # a rerank that scored nothing (shed, or no time for a batch): the first-stage head, bounded
    assert _diversity_pool(entries(0, 300), True, 10) == SHED_DIVERSITY_POOL_MIN
    assert _diversity_pool(entries(0, 300), True, 40) == SHED_DIVERSITY_POOL_PER_HIT * 40
    assert _diversity_pool(entries(0, 12), True, 10) == 12


def test_a_shed_search_diversifies_a_bounded_head(models_dir, tmp_path, monkeypatch):
    """The server sheds a Search's rerank under load by turning rerank off (check_rerank_query
    set): MMR must then stay as cheap as for a rerank that scored nothing, not run over every
    candidate of an overloaded server."""
    n = SHED_DIVERSITY_POOL_MIN + 10

    async def run() -> list[int]:
        p = Pipeline(settings_for(models_dir, tmp_path))
        await p.start()
        pools: list[int] = []
        real = p._diversify

        async def spy(ranked, pool_n, diversity, top_n):
            pools.append(pool_n)
            return await real(ranked, pool_n, diversity, top_n)

        monkeypatch.setattr(p, "_diversify", spy)
        try:
            await p.upsert([Document(f"d{i}", f"aspirin and colorectal cancer, cohort {i}") for i in range(n)])
            shed = await p.search(SearchParams(query=QUERY, candidates=n, top_n=1, rerank=False,
                                               check_rerank_query=True, diversity=0.5))
            off = await p.search(SearchParams(query=QUERY, candidates=n, top_n=1, rerank=False, diversity=0.5))
            assert len(shed.hits) == len(off.hits) == 1
        finally:
            await p.close()
        return pools

    assert asyncio.run(run()) == [SHED_DIVERSITY_POOL_MIN, n]


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_diversity_out_of_range_names_the_field(client, value):
    assert_invalid(lambda: client.search(QUERY, diversity=value), "diversity")
