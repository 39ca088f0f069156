"""Lexical first stage: BM25 via ``bm25s`` (English stopwords, Snowball stemmer).

bm25s builds an immutable sparse index, so writes mark the index stale and it is rebuilt from
the document store on the next search (read-your-writes) or by a debounced background refresh,
whichever comes first; a rebuild of the 5k-document SciFact corpus takes about a second on two
cores. Results are filtered against the store, so a deleted document is never returned.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import bm25s
import numpy as np

log = logging.getLogger(__name__)
logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets itself to DEBUG on import

try:  # PyStemmer is a hard dependency, but keep a clear message if it goes missing
    import Stemmer  # type: ignore[import-not-found]

    _STEMMER = Stemmer.Stemmer("english")
except ImportError:  # pragma: no cover
    _STEMMER = None
    log.warning("PyStemmer missing: BM25 runs without stemming (pip install PyStemmer)")

Loader = Callable[[], tuple[np.ndarray, list[str]]]


def tokenize(texts: list[str]):
    return bm25s.tokenize(texts, stopwords="en", stemmer=_STEMMER, show_progress=False)


class BM25Index:
    def __init__(self, loader: Loader) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._generation = 0  # bumped on every write
        self._built_generation = -1
        # (retriever, labels) swapped as ONE attribute: a search reads a consistent pair.
        self._state: tuple[bm25s.BM25 | None, np.ndarray] = (None, np.zeros(0, dtype=np.int64))

    def mark_dirty(self) -> None:
        self._generation += 1

    @property
    def fresh(self) -> bool:
        return self._built_generation == self._generation

    def refresh(self) -> None:
        """Rebuild from the store if a write happened since the last build."""
        with self._lock:
            gen = self._generation
            if self._built_generation == gen:
                return
            labels, texts = self._loader()
            labels = np.asarray(labels, dtype=np.int64)
            if len(labels) > 1 and not np.all(labels[:-1] < labels[1:]):  # the filter mask needs them sorted
                order = np.argsort(labels, kind="stable")
                labels, texts = labels[order], [texts[i] for i in order]
            if texts:
                retriever = bm25s.BM25()
                retriever.index(tokenize(texts), show_progress=False)
            else:
                retriever = None
            self._state = (retriever, labels)
            self._built_generation = gen

    def search(self, query: str, k: int, allowed: Callable[[], set[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (labels, BM25 scores), best first; documents with score 0 are left out.

        ``allowed`` (a metadata filter: returns the matching labels; called after the index is
        brought up to date, so it is read no earlier than the index): only those documents can
        be returned -- bm25s zeroes the others' scores before the top-k (``weight_mask``), so the
        k are the best matching documents, not what is left of an unfiltered top-k.
        """
        self.refresh()
        retriever, labels = self._state
        if retriever is None or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        q = tokenize([query])
        if not q.ids or not q.ids[0]:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        mask = None
        if allowed is not None:
            wanted = allowed()
            want = np.fromiter(wanted, dtype=np.int64, count=len(wanted))
            pos = np.searchsorted(labels, want)  # labels are sorted (refresh)
            ok = pos < len(labels)
            ok[ok] = labels[pos[ok]] == want[ok]
            pos = pos[ok]
            mask = np.zeros(len(labels), dtype=np.float32)
            mask[pos] = 1.0
            k = min(k, len(pos))
            if k <= 0:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        k = min(k, len(labels))
        docs, scores = retriever.retrieve(q, k=k, show_progress=False, n_threads=1, weight_mask=mask)
        docs, scores = docs[0], scores[0].astype(np.float32)
        keep = scores > 0
        return labels[docs[keep]], scores[keep]
