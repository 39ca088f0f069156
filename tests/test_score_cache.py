"""The reranker's score cache (--rerank-cache-entries): a (query, passage) pair scored recently
reuses its score; keyed by the exact token ids and token types, so a changed text or query misses. Counted with
the model's own batches (the backend is wrapped to count the pairs it runs)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import types
import urllib.request

import numpy as np
import pytest

from rerankd.client import Client
from rerankd.embedded import EmbeddedServer
from rerankd.pipeline import Document, Item, Pipeline, SearchParams
from rerankd.stages.score_cache import ScoreCache, pair_key

from util import settings_for

DOCS = [Document(f"d{c}", f"aspirin trial {c} reduced colon cancer risk in {c * (i + 1)} adults")
        for i, c in enumerate("abcdefgh")]
QUERY = "aspirin colon cancer risk"


def test_lru_units():
    c = ScoreCache(2)
    types = np.array([0, 0, 1])
    k = [pair_key(np.array([101, i, 102]), types) for i in range(3)]
    assert len(set(k)) == 3 and all(len(x) == 16 for x in k)
    assert pair_key(np.array([101, 7, 102], dtype=np.int64), types) == pair_key(np.array([101, 7, 102], dtype=np.int32), types.astype(np.int8))
    assert pair_key(np.array([101, 7, 102]), np.array([0, 1, 1])) != k[0]
    assert c.get_many(k[:2]) == [None, None] and (c.hits, c.misses) == (0, 2)
    c.put_many(k[:2], [1.5, -2.0])
    assert c.get_many([k[0]]) == [1.5]  # k0 is now the most recent
    c.put_many([k[2]], [3.0])  # evicts the least recently used: k1
    assert c.get_many(k) == [1.5, None, 3.0] and len(c) == 2
    assert (c.hits, c.misses) == (3, 3)
    c.put_many([k[2]], [9.0])  # a key held keeps its first score
    assert c.get_many(k, count=False) == [1.5, None, 3.0] and (c.hits, c.misses) == (3, 3)  # uncounted looks
    off = ScoreCache(0)
    off.put_many(k, [1.0, 2.0, 3.0])
    assert off.get_many(k) == [None] * 3 and len(off) == 0 and not off.enabled
    with pytest.raises(ValueError):
        ScoreCache(-1)


def _count_pairs(p: Pipeline, monkeypatch) -> list[int]:
    """Pairs the reranker's model ran, appended per batch."""
    ran: list[int] = []
    real = p.reranker.backend.run

    def run(ids, mask, types):
        ran.append(ids.shape[0])
        return real(ids, mask, types)

    monkeypatch.setattr(p.reranker.backend, "run", run)
    return ran


def _pipeline(models_dir, tmp_path, entries: int = 1000, **sections) -> Pipeline:
    return Pipeline(settings_for(models_dir, tmp_path, model={"rerank_cache_entries": entries}, **sections))


def test_search_and_score_reuse_scores_and_a_changed_text_misses(models_dir, tmp_path, monkeypatch):
    async def run() -> None:
        p = _pipeline(models_dir, tmp_path)
        await p.start()
        try:
            await p.upsert(DOCS)
            ran = _count_pairs(p, monkeypatch)
            q = SearchParams(query=QUERY, candidates=8, top_n=8)
            first = await p.search(q)
            assert sum(ran) == 8 and first.cache_hits == 0
            again = await p.search(q)
            assert sum(ran) == 8 and again.cache_hits == 8 and again.reranked_candidates == 8
            # the same answer: ids, order and scores
            assert [(h.id, h.rerank_score) for h in again.hits] == [(h.id, h.rerank_score) for h in first.hits]
            # skip_cache: the model scores every candidate (and the scores agree)
            skipped = await p.search(SearchParams(query=QUERY, candidates=8, top_n=8, skip_cache=True))
            assert sum(ran) == 16 and skipped.cache_hits == 0
            assert {h.id: h.rerank_score for h in skipped.hits} == pytest.approx({h.id: h.rerank_score for h in first.hits}, abs=1e-4)
            # a document whose text changed misses; the others hit
            await p.upsert([Document("da", "aspirin had no effect on colon cancer risk in this trial")])
            changed = await p.search(q)
            assert sum(ran) == 17 and changed.cache_hits == 7
            # Score: the same pairs as the Search (same query, same passage text) hit
            items = [Item(d.id, d.text) for d in DOCS[1:4]]
            s = await p.score(QUERY, items)
            assert sum(ran) == 17 and s.cache_hits == 3
            # another query: every pair misses
            s2 = await p.score("zebrafish fin regeneration", items)
            assert sum(ran) == 20 and s2.cache_hits == 0
            # a query differing only in case tokenizes the same (uncased model): the pairs hit
            s3 = await p.score(QUERY.upper(), items)
            assert sum(ran) == 20 and s3.cache_hits == 3
            stats = p.stats()
            assert stats["rerank_cache_capacity"] == 1000 and stats["rerank_cache_entries"] == len(p.reranker.cache) == 12
            assert stats["rerank_cache_hits"] == 8 + 7 + 3 + 3
        finally:
            await p.close()

    asyncio.run(run())


def test_the_query_passage_boundary_is_part_of_the_key(models_dir, tmp_path, monkeypatch):
    """A literal "[SEP]" in a query can give the same token ids as a shorter query whose passage
    holds the rest: the pairs differ only in where the passage starts, and must not share a score."""
    long_q, long_p = "aspirin [SEP] colon cancer", "trial reduced risk"
    short_q, short_p = "aspirin", "colon cancer [SEP] trial reduced risk"

    async def run() -> None:
        p = _pipeline(models_dir, tmp_path)
        await p.start()
        try:
            tok = p.reranker.tokenizer
            a, b = tok.encode_pair(long_q, long_p), tok.encode_pair(short_q, short_p)
            assert np.array_equal(a.input_ids, b.input_ids)  # the premise: same ids...
            assert not np.array_equal(a.token_type_ids, b.token_type_ids)  # ...another boundary
            ran = _count_pairs(p, monkeypatch)
            first = await p.score(long_q, [Item("x", long_p)])
            second = await p.score(short_q, [Item("x", short_p)])
            assert sum(ran) == 2 and (first.cache_hits, second.cache_hits) == (0, 0)
            # each is cached under its own key, with its own score
            again = await p.score(short_q, [Item("x", short_p)])
            assert sum(ran) == 2 and again.cache_hits == 1
            assert again.items[0].score == pytest.approx(second.items[0].score, abs=1e-6)
        finally:
            await p.close()

    asyncio.run(run())


def test_a_budget_spends_nothing_on_cached_pairs(models_dir, tmp_path, monkeypatch):
    async def run() -> None:
        p = _pipeline(models_dir, tmp_path, batch={"warmup": False, "batch_sizes": (1, 2)})
        await p.start()
        try:
            await p.upsert(DOCS)
            # the first four candidates are cached (Score with the same texts, in first-stage order)
            plain = await p.search(SearchParams(query=QUERY, candidates=8, top_n=8, rerank=False))
            order = [h.id for h in plain.hits]
            text = {d.id: d.text for d in DOCS}
            await p.score(QUERY, [Item(i, text[i]) for i in order[:4]])
            ran = _count_pairs(p, monkeypatch)
            # A budget no batch fits in (the estimate is warm: the Score's batches set it): no
            # model work, yet the cached prefix comes back reranked.
            p.reranker._probed_at = p.clock()  # no idle probe
            r = await p.search(SearchParams(query=QUERY, candidates=8, top_n=8, budget_ms=1))
            assert sum(ran) == 0
            assert (r.reranked_candidates, r.cache_hits, r.budget_stop) == (4, 4, "budget")
            assert {h.id for h in r.hits[:4]} == set(order[:4]) and all(h.rerank_score is not None for h in r.hits[:4])
            assert [h.id for h in r.hits[4:]] == order[4:] and all(h.rerank_score is None for h in r.hits[4:])
            # A cached pair after an unscored one is not used: the answer stays a prefix.
            await p.score(QUERY, [Item(order[6], text[order[6]])])
            ran.clear()
            r = await p.search(SearchParams(query=QUERY, candidates=8, top_n=8, budget_ms=1))
            assert sum(ran) == 0 and r.reranked_candidates == 4
        finally:
            await p.close()

    asyncio.run(run())


def test_off_caches_nothing(models_dir, tmp_path, monkeypatch):
    async def run() -> None:
        p = _pipeline(models_dir, tmp_path, entries=0)
        await p.start()
        try:
            await p.upsert(DOCS[:3])
            ran = _count_pairs(p, monkeypatch)
            for _ in range(2):
                r = await p.search(SearchParams(query=QUERY, candidates=3, top_n=3))
                assert r.cache_hits == 0
            assert sum(ran) == 6 and len(p.reranker.cache) == 0
        finally:
            await p.close()

    asyncio.run(run())


def test_grpc_reports_hits_skips_on_request_and_exports_metrics(models_dir, tmp_path):
    settings = settings_for(models_dir, tmp_path, model={"rerank_cache_entries": 100},
                            server={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"})
    with EmbeddedServer(settings) as srv, Client(srv.target, timeout=120) as c:
        c.upsert([{"id": d.id, "text": d.text} for d in DOCS[:4]])
        first = c.search(QUERY, candidates=4, top_n=4, raw=True)
        again = c.search(QUERY, candidates=4, top_n=4, raw=True)
        assert (first.cache_hits, again.cache_hits) == (0, 4)
        assert [h.id for h in again.hits] == [h.id for h in first.hits]
        assert c.search(QUERY, candidates=4, top_n=4, skip_cache=True, raw=True).cache_hits == 0
        items = [{"id": "x", "text": DOCS[0].text}, {"id": "y", "text": "an unrelated passage on zebrafish"}]
        s = c.score(QUERY, items, raw=True)
        assert s.cache_hits == 1 and [e.item_id for e in s.scores][0] == "x"
        assert c.score(QUERY, items, skip_cache=True, raw=True).cache_hits == 0
        st = c.stats()
        assert (st.rerank_cache_capacity, st.rerank_cache_entries) == (100, 5)
        assert (st.rerank_cache_hits, st.rerank_cache_misses, st.rerank_cache_coalesced) == (5, 5, 0)
        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.app.metrics_port}/metrics", timeout=30).read().decode()
        assert "rerankd_rerank_cache_hits_total 5.0" in body
        assert "rerankd_rerank_cache_misses_total 5.0" in body
        assert "rerankd_rerank_cache_entries 5.0" in body
        assert "rerankd_rerank_cache_coalesced_total 0.0" in body


def _turnstile(p: Pipeline, monkeypatch, fail: tuple[int, ...] = ()):
    """The reranker's model runs one batch per ``release()`` of the returned semaphore (batches
    run in the batcher's worker thread); the list gets each batch's pair count. ``fail``: the
    batches (1-based, in the order they run) that raise (a backend failure)."""
    turn = threading.Semaphore(0)
    ran: list[int] = []
    real = p.reranker.backend.run

    def run(ids, mask, types):
        assert turn.acquire(timeout=60), "never released"
        ran.append(ids.shape[0])
        if len(ran) in fail:
            raise RuntimeError("backend failed")
        return real(ids, mask, types)

    monkeypatch.setattr(p.reranker.backend, "run", run)
    return ran, turn


async def _until(cond, what: str) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


OPEN = 1000  # releases that let every batch of a test run


@contextlib.asynccontextmanager
async def _leading(models_dir, tmp_path, monkeypatch, n: int, fail: tuple[int, ...] = (), **sections):
    """A started pipeline whose reranker model is held (``_turnstile``) and a first call scoring
    the first ``n`` documents against QUERY, its pairs in flight (published for other calls)."""
    p = _pipeline(models_dir, tmp_path, **sections)
    await p.start()
    try:
        rr = p.reranker
        ran, turn = _turnstile(p, monkeypatch, fail)
        texts = [d.text for d in DOCS[:n]]
        q_ids = rr.query_ids(QUERY)
        passages = rr.passage_ids(texts)
        lead = asyncio.create_task(rr.score_passages(QUERY, q_ids, passages, texts))
        await _until(lambda: len(rr._inflight) == n, "the first call's pairs in flight")
        yield types.SimpleNamespace(rr=rr, ran=ran, turn=turn, q_ids=q_ids, passages=passages, texts=texts, lead=lead)
    finally:
        await p.close()


def test_identical_pairs_in_flight_are_scored_once(models_dir, tmp_path, monkeypatch):
    async def run() -> None:
        async with _leading(models_dir, tmp_path, monkeypatch, 4) as t:
            rr = t.rr
            # a second call asks for two of the same pairs and one new one (plus a repeat of it)
            extra = rr.passage_ids([DOCS[5].text])
            follow = asyncio.create_task(rr.score_passages(QUERY, t.q_ids, [t.passages[1], t.passages[3], extra[0], extra[0]]))
            await _until(lambda: len(rr._inflight) == 5, "the second call's own pair in flight")
            t.turn.release(OPEN)
            a, b = await asyncio.wait_for(t.lead, 30), await asyncio.wait_for(follow, 30)
            assert sorted(t.ran) == [1, 4]  # four pairs once, the new one once: nothing twice
            assert (a.cache_hits, b.cache_hits) == (0, 3)  # two from the first call, one repeat
            assert b.scores.tolist() == [a.scores[1], a.scores[3], b.scores[2], b.scores[2]]
            assert rr.cache.coalesced == 3 and not rr._inflight

    asyncio.run(run())


def test_a_waiting_call_scores_the_pairs_itself_when_the_first_one_is_cancelled(models_dir, tmp_path, monkeypatch):
    async def run() -> None:
        async with _leading(models_dir, tmp_path, monkeypatch, 3) as t:
            rr = t.rr
            follow = asyncio.create_task(rr.score_passages(QUERY, t.q_ids, t.passages, t.texts))
            await asyncio.sleep(0.05)  # the second call now waits on the first one's pairs
            assert not follow.done() and len(rr._inflight) == 3
            t.lead.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t.lead
            t.turn.release(OPEN)
            b = await asyncio.wait_for(follow, 30)
            assert b.cache_hits == 0 and len(b.scores) == 3 and np.isfinite(b.scores).all()
            assert sum(t.ran) >= 3 and not rr._inflight and rr.cache.coalesced == 0
            # and its scores were cached for the next call
            again = await rr.score_passages(QUERY, t.q_ids, t.passages, t.texts)
            assert again.cache_hits == 3 and again.scores.tolist() == b.scores.tolist()

    asyncio.run(run())


def test_a_waiting_call_keeps_its_own_deadline(models_dir, tmp_path, monkeypatch):
    from rerankd.errors import DeadlineExceeded

    async def run() -> None:
        async with _leading(models_dir, tmp_path, monkeypatch, 2) as t:
            rr = t.rr
            loop = asyncio.get_running_loop()
            with pytest.raises(DeadlineExceeded):  # (wait_for: an unbounded wait fails fast, not at the turnstile's 60 s)
                await asyncio.wait_for(rr.score_passages(QUERY, t.q_ids, t.passages, t.texts, deadline=loop.time() + 0.1), 10)
            t.turn.release(OPEN)
            a = await asyncio.wait_for(t.lead, 30)  # the first call is unaffected
            assert len(a.scores) == 2 and sum(t.ran) == 2 and not rr._inflight

    asyncio.run(run())


def test_a_waiting_call_gets_its_pair_when_that_batch_ends_not_the_whole_call(models_dir, tmp_path, monkeypatch):
    """Scores are handed to waiting calls batch by batch: a one-pair call waiting on a pair of a
    larger call finishes when that pair's batch has run, while the larger call goes on."""
    async def run() -> None:
        async with _leading(models_dir, tmp_path, monkeypatch, 4, batch={"batch_sizes": (1,)}) as t:
            rr = t.rr
            singles = [asyncio.create_task(rr.score_passages(QUERY, t.q_ids, [t.passages[i]])) for i in range(4)]
            await asyncio.sleep(0.05)
            t.turn.release()  # one batch: one pair
            await _until(lambda: any(s.done() for s in singles), "the single whose pair ran")
            assert sum(s.done() for s in singles) == 1 and not t.lead.done() and t.ran == [1]
            t.turn.release(3)
            a = await asyncio.wait_for(t.lead, 30)
            b = [await asyncio.wait_for(s, 30) for s in singles]
            assert t.ran == [1, 1, 1, 1]  # each pair once
            assert [x.scores[0] for x in b] == a.scores.tolist() and all(x.cache_hits == 1 for x in b)
            assert rr.cache.coalesced == 4 and not rr._inflight and len(rr.cache) == 4

    asyncio.run(run())


def test_when_the_first_call_fails_its_waiters_score_the_pairs_once(models_dir, tmp_path, monkeypatch):
    """The first call's batch fails: the calls that waited on it do not each run the pairs again
    -- one of them scores them, the others wait on it."""
    from rerankd.errors import BackendError

    async def run() -> None:
        async with _leading(models_dir, tmp_path, monkeypatch, 2, fail=(1,)) as t:
            rr = t.rr
            waiters = [asyncio.create_task(rr.score_passages(QUERY, t.q_ids, t.passages, t.texts)) for _ in range(3)]
            await asyncio.sleep(0.05)
            t.turn.release()  # the first call's batch fails
            with pytest.raises(BackendError):
                await asyncio.wait_for(t.lead, 30)
            await _until(lambda: len(rr._inflight) == 2, "one waiter scoring the pairs")
            t.turn.release(OPEN)  # room for more batches than one: only one may run
            got = [await asyncio.wait_for(w, 30) for w in waiters]
            assert t.ran == [2, 2]  # the failed batch, then the pairs once more
            assert all(g.scores.tolist() == got[0].scores.tolist() for g in got)
            assert sorted(g.cache_hits for g in got) == [0, 2, 2] and not rr._inflight
            # misses - coalesced: the pairs calls sent to the model themselves (the failed batch too)
            assert rr.cache.misses - rr.cache.coalesced == sum(t.ran) == 4

    asyncio.run(run())


def test_a_score_finished_before_the_first_call_fails_is_handed_out_and_cached(models_dir, tmp_path, monkeypatch):
    """The first call's first batch runs, its second fails: the call waiting on the first
    batch's pair gets that score (and the cache keeps it); the one waiting on the failed pair
    scores it itself."""
    from rerankd.errors import BackendError

    async def run() -> None:
        async with _leading(models_dir, tmp_path, monkeypatch, 2, fail=(2,), batch={"batch_sizes": (1,)}) as t:
            rr = t.rr
            singles = [asyncio.create_task(rr.score_passages(QUERY, t.q_ids, [t.passages[i]])) for i in range(2)]
            await asyncio.sleep(0.05)
            t.turn.release()  # batch 1: one pair scored
            await _until(lambda: any(s.done() for s in singles), "the single whose pair ran")
            assert len(rr.cache) == 1
            t.turn.release()  # batch 2 fails
            with pytest.raises(BackendError):
                await asyncio.wait_for(t.lead, 30)
            t.turn.release(OPEN)
            got = [await asyncio.wait_for(x, 30) for x in singles]
            assert t.ran == [1, 1, 1] and len(rr.cache) == 2 and not rr._inflight
            assert sorted(g.cache_hits for g in got) == [0, 1]
            again = await rr.score_passages(QUERY, t.q_ids, t.passages, t.texts)
            assert again.cache_hits == 2 and sum(t.ran) == 3

    asyncio.run(run())


def test_after_its_leader_fails_a_waiter_scores_the_pair_itself_and_newcomers_follow_it(models_dir, tmp_path, monkeypatch):
    """After the call it waited on fails, a waiter scores the pair itself (round 1: it follows
    only other waiters of that call, never a call that arrived since, so it cannot trail a chain
    of failures); a newcomer follows it, and when it fails too, the newcomer scores the pair."""
    from rerankd.errors import BackendError

    async def run() -> None:
        async with _leading(models_dir, tmp_path, monkeypatch, 1, fail=(1, 2)) as t:
            rr = t.rr
            waiter = asyncio.create_task(rr.score_passages(QUERY, t.q_ids, t.passages, t.texts))
            await asyncio.sleep(0.05)
            t.turn.release()  # the first call fails...
            with pytest.raises(BackendError):
                await asyncio.wait_for(t.lead, 30)
            # ...and the waiter took the pair over itself (round 1): a newcomer follows it
            await _until(lambda: rr._inflight and next(iter(rr._inflight.values()))[1] == 1, "the waiter leading")
            newcomer = asyncio.create_task(rr.score_passages(QUERY, t.q_ids, t.passages, t.texts))
            await asyncio.sleep(0.05)
            t.turn.release()  # the waiter's own batch fails too: it reports that failure
            with pytest.raises(BackendError):
                await asyncio.wait_for(waiter, 30)
            t.turn.release(OPEN)
            n = await asyncio.wait_for(newcomer, 30)  # goes round: scores it itself
            assert len(n.scores) == 1 and t.ran == [1, 1, 1] and not rr._inflight

    asyncio.run(run())


def test_a_budgeted_rerank_keeps_each_chunk_scored_before_a_later_one_fails(models_dir, tmp_path, monkeypatch):
    """score_within caches chunk by chunk: a Search whose second chunk fails still leaves the
    first chunk's pairs cached for the next call."""
    from rerankd.errors import BackendError

    async def run() -> None:
        # no warmup: no rate yet, so the first budgeted chunk on an idle reranker is one pair
        p = _pipeline(models_dir, tmp_path, batch={"warmup": False})
        await p.start()
        try:
            await p.upsert(DOCS[:4])
            ran: list[int] = []
            real = p.reranker.backend.run

            def run_(ids, mask, types):
                ran.append(ids.shape[0])
                if len(ran) == 2:
                    raise RuntimeError("backend failed")
                return real(ids, mask, types)

            monkeypatch.setattr(p.reranker.backend, "run", run_)
            with pytest.raises(BackendError):
                await p.search(SearchParams(query=QUERY, candidates=4, top_n=4, budget_ms=60_000))
            assert ran[0] == 1 and len(p.reranker.cache) == 1
            again = await p.search(SearchParams(query=QUERY, candidates=4, top_n=4))
            assert again.cache_hits == 1
        finally:
            await p.close()

    asyncio.run(run())


def test_misses_less_coalesced_counts_what_calls_sent_to_the_model_even_when_they_fail(models_dir, tmp_path, monkeypatch):
    """A call that leads one pair and waits on another, and fails: the pair it only waited on
    counts as coalesced, so misses - coalesced stays the pairs calls sent to the model."""
    from rerankd.errors import BackendError

    async def run() -> None:
        async with _leading(models_dir, tmp_path, monkeypatch, 1, fail=tuple(range(1, 10))) as t:
            rr = t.rr
            other = rr.passage_ids([DOCS[1].text])[0]
            a = asyncio.create_task(rr.score_passages(QUERY, t.q_ids, [other, t.passages[0]]))
            await _until(lambda: len(rr._inflight) == 2, "the second call's own pair in flight")
            t.turn.release(OPEN)
            for call in (t.lead, a):
                with pytest.raises(BackendError):
                    await asyncio.wait_for(call, 30)
            assert (rr.cache.misses, rr.cache.coalesced) == (3, 1)
            assert rr.cache.misses - rr.cache.coalesced == sum(t.ran) == 2 and not rr._inflight

    asyncio.run(run())


def test_the_follow_rule_by_round_and_an_overridden_entry_restored(models_dir, tmp_path, monkeypatch):
    """A retrying call (round 1) does not follow a call on round 0 (one that arrived since the
    failure) but scores the pair itself, and afterwards that call's entry is in flight again;
    it does follow a call on round 1 (another waiter of the failed call)."""
    async def run() -> None:
        p = _pipeline(models_dir, tmp_path)
        await p.start()
        try:
            rr = p.reranker
            ran, turn = _turnstile(p, monkeypatch)
            turn.release(OPEN)
            q_ids = rr.query_ids(QUERY)
            texts = [DOCS[0].text]
            pairs = rr.tokenizer.pairs(QUERY, q_ids, rr.passage_ids(texts), texts)
            k = pair_key(pairs[0].input_ids, pairs[0].token_type_ids)
            loop = asyncio.get_running_loop()
            newcomer = loop.create_future()
            rr._inflight[k] = (newcomer, 0)
            sent = [0]
            got, _, shared = await asyncio.wait_for(rr._coalesced(pairs, [k], [0], None, sent, round_=1), 30)
            assert sent == [1] and shared == 0 and ran == [1] and np.isfinite(got[0])
            assert rr._inflight[k] == (newcomer, 0)  # restored: that call is still scoring it
            newcomer.set_result(None)
            del rr._inflight[k]
            waiter = loop.create_future()
            rr._inflight[k] = (waiter, 1)
            task = asyncio.create_task(rr._coalesced(pairs, [k], [0], None, [0], round_=1))
            await asyncio.sleep(0.05)
            assert not task.done()  # following the other waiter
            waiter.set_result(3.5)
            got, _, shared = await asyncio.wait_for(task, 30)
            assert got == {0: 3.5} and shared == 1 and ran == [1]
        finally:
            await p.close()

    asyncio.run(run())
