"""Reranker score cache: scores of recently scored (query, passage) pairs, reused.

A cross-encoder pair costs ~60 ms on a 2-core CPU (rerank@50: ~3 s), and production traffic
repeats itself: popular questions, a client retrying after a timeout, an agent re-asking, the
next page of the same Search, Score called on the same BM25 list. A pair's score depends only on
the model and the exact inputs it reads, so the key is a 128-bit BLAKE2b digest of the pair's
input ids and token type ids (query, passage, special tokens, after truncation). No invalidation is needed: a
document whose text changed gives different ids, a different key; a different query or a change
of tokenizer too; the cache belongs to one loaded reranker (backend, precision, activation), so a
restart with another model starts empty.

Hand-written (an OrderedDict LRU) rather than cachetools: a few lines, batch lookups under one
lock, and hit/miss counters for /metrics. Bounded by entries: ~180 bytes each in CPython
(tracemalloc: 100,000 entries hold ~18 MB). A lookup costs ~3-5 us per pair to hash (a 300-token pair;
measured 2.7 and 4.7 us on two 2-vCPU VMs) and ~0.3 us to find, on the event loop: a
50-candidate rerank ~0.2 ms, k = 1,000 ~3-5 ms, against ~60 ms of model time per pair on a
2-core CPU.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def pair_key(input_ids: np.ndarray, token_type_ids: np.ndarray) -> bytes:
    """The cache key of a pair: a 16-byte digest of its input ids (as int32) and token type ids
    (as int8; collisions: ~2^-64 at 2^32 distinct pairs). The type ids are part of the key
    because the ids alone do not say where the query ends: a query holding the literal text
    "[SEP]" and a shorter query whose passage starts after that "[SEP]" read the same ids, with
    the boundary, and so the score, elsewhere. Both arrays have one entry per token, so the bytes
    hashed split one way only."""
    h = hashlib.blake2b(np.ascontiguousarray(input_ids, dtype=np.int32).tobytes(), digest_size=16)
    h.update(np.ascontiguousarray(token_type_ids, dtype=np.int8).tobytes())
    return h.digest()


class ScoreCache:
    """Least-recently-used map of pair key -> score, at most ``entries`` of them (0: off: every
    lookup misses and nothing is kept). Thread-safe."""

    def __init__(self, entries: int) -> None:
        if entries < 0:
            raise ValueError(f"entries must be >= 0, got {entries}")
        self.capacity = int(entries)
        self._scores: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        # missed pairs a call did not send to the model itself: another call scored them, or a
        # repeat within the call (Reranker.score_passages; counted whatever the call's outcome)
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._scores)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def get_many(self, keys: Sequence[bytes], count: bool = True) -> list[float | None]:
        """The cached score of each key (None: not cached), each hit made most recently used;
        counted in ``hits`` / ``misses`` unless ``count`` is False (a second look within one
        call's lookup)."""
        if not self.capacity:
            return [None] * len(keys)
        out: list[float | None] = []
        with self._lock:
            for k in keys:
                s = self._scores.get(k)
                if s is not None:
                    self._scores.move_to_end(k)
                out.append(s)
            if count:
                found = sum(s is not None for s in out)
                self.hits += found
                self.misses += len(keys) - found
        return out

    def put_many(self, keys: Sequence[bytes], scores: Sequence[float]) -> None:
        """Keep these scores, evicting the least recently used beyond ``capacity``. A key
        already held keeps its score (made most recently used): the first scoring wins, so a
        repeated call gets the same answer even where two calls scored a pair at once and the
        backend's score moves a little with the batch (OpenVINO int8)."""
        if not self.capacity:
            return
        with self._lock:
            for k, s in zip(keys, scores):
                if k not in self._scores:
                    self._scores[k] = float(s)
                self._scores.move_to_end(k)
            while len(self._scores) > self.capacity:
                self._scores.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._scores.clear()
