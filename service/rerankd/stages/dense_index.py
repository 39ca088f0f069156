"""Dense first stage: an HNSW graph (hnswlib) over L2-normalized vectors, inner-product space.

Labels are the document store's integer labels. Re-upserting a label replaces its vector in
place; deleting marks it deleted (kept in the graph until ``Compact`` rebuilds it). The index
grows without a preset capacity (``resize_index`` doubles it under the lock).
"""

from __future__ import annotations

import threading
from pathlib import Path

from typing import Callable

import hnswlib
import numpy as np

# labels -> (labels found, their vectors [n, dim]); labels not found (deleted) are left out
VectorLoader = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

# Cost of one HNSW candidate (at ef = candidates asked) relative to one exact-scan vector read
# from the store: a filtered search scans exactly when matching <= this x the oversampled
# candidates. Measured by scripts/filter_bench.py on this VM (see README).
WALK_VS_EXACT_COST = 1.5


def filter_plan(k: int, n_live: int, n_matching: int, exact_max: int,
                walk_vs_exact: float = WALK_VS_EXACT_COST) -> tuple[bool, int]:
    """The cost model of a filtered dense search: ``(scan exactly?, HNSW candidates to fetch)``.

    An unfiltered HNSW search needs about ``k * live / matching`` candidates (+25 %, +8) to hold
    k matching ones; the exact scan reads ``matching`` vectors. Scan when that is cheaper and
    within ``exact_max``."""
    fetch = min(n_live, int(np.ceil(k * n_live / max(n_matching, 1) * 1.25)) + 8)
    return n_matching <= exact_max and n_matching <= walk_vs_exact * fetch, fetch


class DenseIndex:
    def __init__(self, dim: int, *, m: int, ef_construction: int, ef_search: int, capacity: int = 1024) -> None:
        self.dim = dim
        self.m = m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self._lock = threading.Lock()
        self._index = hnswlib.Index(space="ip", dim=dim)
        self._index.init_index(max_elements=max(capacity, 16), M=m, ef_construction=ef_construction)
        self._index.set_ef(ef_search)
        self._live: set[int] = set()

    # -- writes -------------------------------------------------------------------------------------
    def upsert(self, labels: np.ndarray, vectors: np.ndarray, threads: int = 1) -> None:
        with self._lock:
            self._upsert_locked(np.asarray(labels, dtype=np.int64), vectors, threads)

    def _upsert_locked(self, labels: np.ndarray, vectors: np.ndarray, threads: int) -> None:
        if len(labels) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(labels), self.dim):
            raise ValueError(f"vectors shape {vectors.shape} != ({len(labels)}, {self.dim})")
        need = self._index.get_current_count() + len(labels)
        cap = self._index.get_max_elements()
        if need > cap:
            self._index.resize_index(max(need, cap * 2))
        self._index.add_items(vectors, labels, num_threads=threads)
        self._live.update(labels.tolist())

    def replace(self, labels: np.ndarray, vectors: np.ndarray, retired: list[int]) -> None:
        """Add ``labels`` and mark ``retired`` deleted atomically with respect to searches."""
        with self._lock:
            self._upsert_locked(np.asarray(labels, dtype=np.int64), vectors, 1)
            self._delete_locked(retired)

    def delete(self, labels: list[int]) -> None:
        with self._lock:
            self._delete_locked(labels)

    def _delete_locked(self, labels: list[int]) -> None:
        for lb in labels:
            if lb in self._live:
                self._index.mark_deleted(lb)
                self._live.discard(lb)

    def mark_deleted_raw(self, labels: list[int]) -> None:
        """Snapshot replay: mark labels deleted whether or not they are known live."""
        with self._lock:
            for lb in labels:
                self._live.discard(lb)
                try:
                    self._index.mark_deleted(lb)
                except RuntimeError:
                    pass  # not in the graph (created and deleted after the snapshot) or already deleted

    # -- reads ----------------------------------------------------------------------------------------
    def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (labels, cosine scores), best first. Never returns a deleted label."""
        with self._lock:
            k = min(k, len(self._live))
            if k <= 0:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            self._index.set_ef(max(self.ef_search, k))
            q = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
            while True:
                try:
                    labels, dist = self._index.knn_query(q, k=k, num_threads=1)
                    break
                except RuntimeError:
                    # Too few reachable live elements (heavy deletes): ask for fewer.
                    if k <= 1:
                        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
                    k = max(1, k // 2)
        return labels[0].astype(np.int64), (1.0 - dist[0]).astype(np.float32)

    def search_within(self, vector: np.ndarray, k: int, allowed: Callable[[], set[int]], load_vectors: VectorLoader,
                      exact_max: int, walk_vs_exact: float = WALK_VS_EXACT_COST) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (labels, cosine scores) among the labels ``allowed()`` returns (a metadata filter).

        ``allowed`` is called under the index lock, so it is read at the same moment as the
        graph (the pipeline adds a document's labels to the filter index before the graph and
        removes them after it, so no live version of a matching document is ever missed).

        Two ways, whichever the cost model says is cheaper (``scripts/filter_bench.py``):
        * an exact scan of the matching documents, their vectors read with ``load_vectors`` (the
          document store, ~5 us each), for filters matching few documents;
        * an *unfiltered* HNSW search for ``k * live / matching`` candidates (oversampled), the
          first k matching kept -- for filters matching a large share, where that is a small
          multiple of k. hnswlib's own filtered search is not used: its filter is a Python
          callback per visited node, which needs the GIL each time and stalls for seconds when
          another thread is busy in Python (a BM25 rebuild, the batchers).
        Should the HNSW search come back with fewer than k matching documents, it is repeated
        with 4x the candidates (twice at most); should hnswlib find fewer reachable elements
        than asked for (heavy deletes), it asks for half as many; then the exact scan answers if the filter
        matches at most ``exact_max`` documents, else the search returns what it found.
        ``walk_vs_exact``: the cost model's ratio (``filter_plan``).
        """
        q = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        with self._lock:
            matching = allowed()
            n_live = len(self._live)
            k = min(k, len(matching), n_live)
            if k <= 0:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            exact, fetch = filter_plan(k, n_live, len(matching), exact_max, walk_vs_exact)
            walk_labels = np.zeros(0, dtype=np.int64)
            walk_scores = np.zeros(0, dtype=np.float32)
            if not exact:
                cap, walks = n_live, 0
                while walks < 3:
                    self._index.set_ef(max(self.ef_search, fetch))
                    try:
                        labels, dist = self._index.knn_query(q.reshape(1, -1), k=fetch, num_threads=1)
                    except RuntimeError:
                        # Fewer reachable live elements than asked for (heavy deletes): ask for
                        # fewer, as search() does, and never for this many again.
                        cap = fetch // 2
                        if cap < 1:
                            break
                        fetch = cap
                        continue
                    walks += 1
                    labels = labels[0].astype(np.int64)
                    keep = np.fromiter((lb in matching for lb in labels.tolist()), dtype=bool, count=len(labels))
                    walk_labels, walk_scores = labels[keep][:k], (1.0 - dist[0][keep][:k]).astype(np.float32)
                    if len(walk_labels) == k or fetch >= cap:
                        break
                    fetch = min(cap, fetch * 4)
                self._index.set_ef(self.ef_search)
                if len(walk_labels) == k or len(matching) > exact_max:
                    return walk_labels, walk_scores
            live = matching & self._live  # set & iterates the smaller of the two
        # Outside the lock: a label deleted meanwhile is simply not found by the loader.
        ids, vecs = load_vectors(np.fromiter(live, dtype=np.int64, count=len(live)))
        if len(ids) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        scores = np.asarray(vecs, dtype=np.float32) @ q
        k = min(k, len(ids))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((ids[top], -scores[top]))]  # best first, ties by label
        return ids[top], scores[top].astype(np.float32)

    def __len__(self) -> int:
        return len(self._live)

    @property
    def deleted_count(self) -> int:
        """Entries still in the graph but marked deleted (removed by a compaction)."""
        return self._index.get_current_count() - len(self._live)

    def labels(self) -> set[int]:
        with self._lock:
            return set(self._live)

    def missing_labels(self, labels: set[int]) -> set[int]:
        """Of ``labels``, those with no element in the graph (a cheap consistency check on load;
        it does not look at deleted marks: hnswlib has no fast per-label query for them)."""
        with self._lock:
            return labels - set(self._index.get_ids_list())

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, path: Path, on_locked: Callable[[], None] | None = None) -> None:
        """Serialize the graph. ``on_locked`` runs once the graph's lock is held, before the
        graph is written: the snapshot releases the writers' apply lock there, so the file holds
        exactly the changes up to the sequence it read under that lock, none later."""
        with self._lock:
            if on_locked is not None:
                on_locked()
            self._index.save_index(str(path))

    @classmethod
    def load(cls, path: Path, dim: int, *, m: int, ef_construction: int, ef_search: int, live: set[int]) -> "DenseIndex":
        self = cls.__new__(cls)
        self.dim, self.m, self.ef_construction, self.ef_search = dim, m, ef_construction, ef_search
        self._lock = threading.Lock()
        self._index = hnswlib.Index(space="ip", dim=dim)
        self._index.load_index(str(path), max_elements=0)
        self._index.set_ef(ef_search)
        self._live = set(live)
        return self
