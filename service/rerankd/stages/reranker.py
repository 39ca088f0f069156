"""Cross-encoder stage: (query, passage) pairs -> relevance scores.

Passage token ids are computed once at upsert (``passage_ids``) and stored with the document;
a rerank tokenizes only the query and assembles pairs from the stored ids. Scores of pairs seen
recently come from the score cache (``score_cache.py``) instead of the model.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..backends import Backend
from ..batcher import Batcher
from ..bundle import ModelBundle
from ..config import BatchConfig
from ..errors import BackendError, DeadlineExceeded, InvalidArgument, Overloaded
from ..tokenization import PairTokenizer
from .score_cache import ScoreCache, pair_key

# Budgeted reranks: when the estimate says not even one pair fits a call's budget, one pair is
# scored anyway if the reranker is idle and no batch has run for this long: an estimate left high
# by a spell of CPU contention would otherwise keep every budgeted call from reranking, and none
# would correct it.
RATE_PROBE_S = 1.0


@dataclass
class Scored:
    """A rerank's outcome: scores of the first ``len(scores)`` passages (all of them unless a
    budget cut the rerank)."""
    scores: np.ndarray
    queued: float  # seconds its batches waited in the batcher
    stop: str = "done"  # "done" | "budget" (the next chunk would end past it) | "overloaded" (a chunk met a full queue)
    cache_hits: int = 0  # of those scores, how many the model did not run for this call (cache, a concurrent call, a repeat)


# In-flight coalescing (Reranker._coalesced): after the call a waiter followed failed, it may
# follow other retrying waiters this many times; then it scores the pair itself.
MAX_FOLLOW_ROUNDS = 3


class Reranker:
    def __init__(
        self,
        bundle: ModelBundle,
        backend: Backend,
        batch: BatchConfig,
        *,
        max_query_tokens: int,
        activation: str = "none",
        on_batch=None,
        cache_entries: int = 0,
    ) -> None:
        if activation not in ("none", "sigmoid"):
            raise ValueError(f"score_activation must be none or sigmoid, got {activation!r}")
        st = bundle.special_tokens
        self.name = bundle.name
        self.trained = bool(bundle.manifest.get("trained", True))
        self.activation = activation
        self.tokenizer = PairTokenizer(
            bundle.tokenizer_path, bundle.max_length, st["cls_id"], st["sep_id"], max_query_tokens
        )
        self.backend = backend
        self.cache = ScoreCache(cache_entries)  # scores of recent pairs (0 entries: off)
        # Pairs being scored for an unbudgeted call right now (key -> (its score's future, the
        # scoring call's round, see _coalesced)): an identical pair asked for meanwhile waits for
        # that score instead of running again.
        self._inflight: dict[bytes, tuple[asyncio.Future, int]] = {}
        self._probed_at: float | None = None  # budgeted reranks: clock() of the last probe (see RATE_PROBE_S)
        self.batcher = Batcher(
            "reranker",
            self._forward,
            batch,
            max_length=bundle.max_length,
            static_shapes=backend.static_shapes(),
            backend=backend.name,
            pad_id=st.get("pad_id", 0),
            on_batch=on_batch,
        )

    def _forward(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        logits = np.asarray(self.backend.run(ids, mask, types), dtype=np.float32).reshape(ids.shape[0], -1)[:, 0]
        if not np.isfinite(logits).all():  # a NaN would sort anywhere and reach the caller as a score
            raise BackendError(f"reranker produced {int((~np.isfinite(logits)).sum())} non-finite scores in a "
                               f"batch of shape {ids.shape}: the model is broken; re-export it")
        if self.activation == "sigmoid":
            logits = 1.0 / (1.0 + np.exp(-logits))
        return logits

    def passage_ids(self, texts: list[str]) -> list[np.ndarray]:
        return self.tokenizer.passage_ids(texts)

    def query_ids(self, query: str, field: str = "query") -> np.ndarray:
        return self.tokenizer.query_ids(query, field)

    def _lookup(self, pairs: list, use_cache: bool) -> tuple[list[bytes] | None, list[float | None]]:
        """(cache keys or None when the cache is off or skipped, cached score or None per pair)."""
        if not (use_cache and self.cache.enabled and pairs):
            return None, [None] * len(pairs)
        keys = [pair_key(p.input_ids, p.token_type_ids) for p in pairs]
        return keys, self.cache.get_many(keys)

    async def score_passages(
        self, query: str, query_ids: np.ndarray, passages: list[np.ndarray], texts: list[str] | None = None,
        deadline: float | None = None, use_cache: bool = True,
    ) -> Scored:
        """Scores for each passage's token ids (same order): cached pairs from the score cache,
        pairs another call is scoring right now from that call (``_coalesced``), the rest from
        the model in one submission. ``use_cache`` False: all from the model, nothing kept."""
        if not passages:
            return Scored(np.zeros((0,), dtype=np.float32), 0.0)
        pairs = self.tokenizer.pairs(query, query_ids, passages, texts)
        keys, cached = self._lookup(pairs, use_cache)
        miss = [i for i, c in enumerate(cached) if c is None]
        scores = np.asarray([0.0 if c is None else c for c in cached], dtype=np.float32)
        queued, shared = 0.0, 0
        if miss and keys is None:
            rows, queued = await self.batcher.submit([pairs[i] for i in miss], deadline)
            scores[miss] = np.asarray(rows, dtype=np.float32)
        elif miss:
            sent = [0]
            try:
                got, queued, shared = await self._coalesced(pairs, keys, miss, deadline, sent)
            finally:  # whatever the outcome: misses - coalesced = pairs calls sent to the model
                self.cache.coalesced += len(miss) - sent[0]
            scores[miss] = np.asarray([got[i] for i in miss], dtype=np.float32)
        return Scored(scores, queued, "done", len(pairs) - len(miss) + shared)

    async def _coalesced(self, pairs: list, keys: list[bytes], miss: list[int], deadline: float | None,
                         sent: list[int], round_: int = 0) -> tuple[dict[int, float], float, int]:
        """Score ``pairs[i]`` for each i in ``miss`` (none of them cached), each distinct pair
        once server-wide: a pair another call is scoring now is awaited rather than run again (a
        burst of one popular query, a client's hedged or retried call), and this call's own
        pairs are published for others while they run -- each as soon as its batch has run (and
        cached then), so a small call waiting on one pair of a large one waits for that pair's
        batch, not the whole call. Returns (score by index, seconds queued for this call's own
        batches, pairs whose score came from another call, the cache, or a repeat within this
        call); ``sent[0]`` grows by the pairs this call submits to the model itself.

        A call that fails or is cancelled (a client gone away included) publishes no score for
        the pairs it had not finished: the calls waiting on them go round again (``round_``),
        first to the cache (another waiter may have scored them meanwhile). On round r a waiter
        follows only a call that is itself on round r or later -- another waiter of a failed
        call, never a call that arrived since -- so the waiters of a failed call score each pair
        once between them, not once each, and none trails a chain of newcomers. From round
        ``MAX_FOLLOW_ROUNDS`` on it follows nobody (at most that many waits, then its own
        scoring). Waiting is bounded by this call's deadline (``DeadlineExceeded``, as a wait in
        the batcher)."""
        loop = asyncio.get_running_loop()
        lead: list[int] = []
        follow: list[tuple[int, asyncio.Future]] = []
        mine: dict[bytes, asyncio.Future] = {}
        displaced: dict[bytes, tuple[asyncio.Future, int]] = {}  # entries of calls we did not follow
        for i in miss:
            k = keys[i]
            fut = mine.get(k)
            if fut is None and k in self._inflight:
                theirs, their_round = self._inflight[k]
                if round_ == 0 or (round_ < MAX_FOLLOW_ROUNDS and their_round >= round_):
                    fut = theirs
                else:
                    displaced[k] = (theirs, their_round)
            if fut is not None:
                follow.append((i, fut))
                continue
            fut = mine[k] = loop.create_future()
            self._inflight[k] = (fut, round_)
            lead.append(i)

        def publish(j: int, row) -> None:  # the batcher's per-row callback: hand it out now
            k = keys[lead[j]]
            fut = mine[k]
            if not fut.done():
                fut.set_result(float(row))
                self.cache.put_many([k], [float(row)])

        got: dict[int, float] = {}
        queued = 0.0
        try:
            if lead:
                sent[0] += len(lead)
                rows, queued = await self.batcher.submit([pairs[i] for i in lead], deadline, on_row=publish)
                for i, r in zip(lead, rows):
                    got[i] = float(r)
        finally:
            for k, fut in mine.items():
                if not fut.done():
                    fut.set_result(None)  # no score: whoever waits goes round again
                if self._inflight.get(k, (None,))[0] is fut:
                    # a call we overrode may still be scoring the pair: it is in flight again
                    back = displaced.get(k)
                    if back is not None and not back[0].done():
                        self._inflight[k] = back
                    else:
                        del self._inflight[k]
        if not follow:
            return got, queued, 0
        waiting = {f for _, f in follow if not f.done()}
        if waiting:
            left = None if deadline is None else max(deadline - loop.time(), 0.0)
            _, pending = await asyncio.wait(waiting, timeout=left)  # never cancels the others' futures
            if pending:
                raise DeadlineExceeded(f"deadline exceeded waiting for {self.batcher.name} (a pair another call was scoring)")
        for i, f in follow:
            if f.result() is not None:
                got[i] = f.result()
        retry = [i for i, f in follow if f.result() is None]
        if retry:
            # The call scoring them failed or was cancelled: another waiter may have scored
            # them meanwhile (the cache); the rest go round again.
            peeked = self.cache.get_many([keys[i] for i in retry], count=False)
            for i, v in zip(retry, peeked):
                if v is not None:
                    got[i] = v
            retry = [i for i, v in zip(retry, peeked) if v is None]
        shared = len(follow) - len(retry)
        if retry:
            more, q, s = await self._coalesced(pairs, keys, retry, deadline, sent, round_ + 1)
            got.update(more)
            queued += q
            shared += s
        return got, queued, shared

    def chunk_ends(self, lengths: list[int], start: int, seconds_left: float, rate: float | None) -> int:
        """End (exclusive) of the next budgeted chunk from ``start``: as many pairs, in order, as
        one batch holds (``max_rows`` of their padded length; on a static-shape backend, a batch
        size bucket) and, with an estimate ``rate`` (model seconds per padded token), as are
        expected to finish within ``seconds_left``. Without an estimate, one pair (its batch
        measures the rate). ``start`` itself when nothing fits."""
        if seconds_left <= 0:
            return start
        if rate is None:
            return start + 1
        b = self.batcher
        end, longest = start, 0
        while end < len(lengths):
            longest = max(longest, lengths[end])
            padded = b.seq_bucket(longest)
            rows = end - start + 1
            if rows > b.max_rows(padded) or rows * padded * rate > seconds_left:
                break
            end += 1
        if b.static and end > start:  # a static backend runs 5 rows as 4 + 1: two batches
            end = start + b.batch_bucket(end - start)
        return end

    async def score_within(
        self, query: str, query_ids: np.ndarray, passages: list[np.ndarray], texts: list[str] | None,
        soft_end: float, deadline: float | None = None, clock: Callable[[], float] = time.perf_counter,
        use_cache: bool = True,
    ) -> Scored:
        """Score a prefix of ``passages`` (first-stage order) within a soft budget: one batch-sized
        chunk at a time, each started only when it is expected to end by ``soft_end`` (a
        ``clock()`` time). The expectation is the batcher's model time per padded token (an
        average over every batch it ran, whoever's) times the chunk's padded tokens plus the
        backlog ahead of it (batches prepared or running, queued sequences), so a budget under
        load reranks fewer candidates rather than answering late; the budget is overrun by at
        most one chunk's misestimate. Before the reranker's first batch, the first chunk is one
        pair if the reranker is idle, none if it is busy. When not even one pair is expected to
        fit, one is scored anyway if the reranker is idle and no batch has run for
        ``RATE_PROBE_S`` (at most one such probe a second, server-wide); it can overrun the
        budget by one pair's time.

        Written here rather than by the batcher: the batcher orders sequences by length across
        calls, so a deadline there would leave an arbitrary subset scored, not a prefix of the
        first stage's order. Chunks of one call are sequential (other calls fill the batches
        between them), which costs the batcher's overlap of preparing one batch while another
        runs. A full queue (``Overloaded``) ends the rerank with the prefix scored so far (stop
        "overloaded"), the first chunk included: a budgeted call answers rather than refuses.

        Pairs in the score cache cost nothing: the chunks are made of the others (in order), and
        the prefix returned runs up to the first pair neither cached nor scored."""
        pairs = self.tokenizer.pairs(query, query_ids, passages, texts)
        keys, cached = self._lookup(pairs, use_cache)
        miss = [i for i, c in enumerate(cached) if c is None]
        lengths = [len(pairs[i].input_ids) for i in miss]
        b = self.batcher
        scores: list[float] = []  # of the first len(scores) misses
        queued, stop = 0.0, "done"
        while len(scores) < len(miss):
            start = len(scores)
            now = clock()
            rate = b.seconds_per_token
            idle = b.backlog_tokens(1) == 0  # nothing prepared, running or queued
            ahead = b.backlog_tokens(b.seq_bucket(lengths[start])) * rate if rate is not None else 0.0
            # No estimate yet (after a start; warmup records none): one pair measures it, but only
            # on an idle reranker -- a busy one will have one soon, and the pair would wait behind
            # all of its work. The same holds for a probe.
            end = self.chunk_ends(lengths, start, soft_end - now - ahead, rate) if rate is not None or idle else start
            if end <= start and not scores and soft_end > now and idle and rate is not None:
                last = max((t for t in (b.last_batch_at, self._probed_at) if t is not None), default=None)
                if last is None or now - last >= RATE_PROBE_S:
                    end = start + 1  # probe: the estimate may be stale (see RATE_PROBE_S)
                    self._probed_at = now
            if end <= start:
                stop = "budget"
                break
            try:
                rows, q = await b.submit([pairs[i] for i in miss[start:end]], deadline)
            except Overloaded:
                stop = "overloaded"
                break
            got = [float(x) for x in rows]
            if keys is not None:  # kept per chunk: a chunk scored stays scored if a later one fails
                self.cache.put_many([keys[i] for i in miss[start:end]], got)
            scores.extend(got)
            queued += q
        end = miss[len(scores)] if len(scores) < len(miss) else len(pairs)  # the scored prefix
        computed = dict(zip(miss, scores))
        out = np.asarray([computed[i] if cached[i] is None else cached[i] for i in range(end)], dtype=np.float32)
        return Scored(out, queued, stop, sum(c is not None for c in cached[:end]))

    def passages_with_tokens(self, texts: list[str], field: str = "items") -> list[np.ndarray]:
        """Token ids of caller-supplied passages (blocking: call it off the event loop); a text
        with no tokens is refused, naming ``field[i].text``."""
        passages = self.passage_ids(texts)
        check_has_tokens(passages, [f"{field}[{i}].text" for i in range(len(texts))])
        return passages

    async def score_texts(self, query: str, texts: list[str], deadline: float | None = None,
                          field: str = "items", q_ids: np.ndarray | None = None, use_cache: bool = True) -> Scored:
        """Scores for caller-supplied passages (tokenized here, off the event loop; ``q_ids``:
        the query's token ids when the caller has them)."""
        q = self.query_ids(query) if q_ids is None else q_ids
        passages = await asyncio.to_thread(self.passages_with_tokens, texts, field)
        return await self.score_passages(query, q, passages, texts, deadline, use_cache)


def check_has_tokens(passages: list[np.ndarray], fields: list[str]) -> None:
    """A text of only characters the tokenizer drops (zero-width spaces, control characters) is
    not empty to ``str.strip`` but gives the reranker nothing to read: its pair scored like a real
    match (a review saw 4.7 against a relevant passage's 12.5). Refused as a query is."""
    for i, p in enumerate(passages):
        if len(p) == 0:
            raise InvalidArgument(fields[i], "has no tokens (only characters the tokenizer drops)")
