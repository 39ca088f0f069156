"""Lexical first stage: BM25, kept up to date incrementally from the document store's change log.

Tokenization is ``bm25s``'s (English stopwords, Snowball stemmer) and the scores are bm25s's
"lucene" BM25 (k1 1.5, b 0.75) -- a test checks them against ``bm25s`` on the same corpus. The
index is our own because bm25s's is immutable: it precomputes every (term, document) score with
the corpus-wide IDF and average length, so any write meant rebuilding it from the whole store,
re-tokenizing every document (~1 s per 5k documents on two cores), on the next search. Here a
write costs only its own documents: refresh() reads the changes after the last sequence it
applied (one read transaction), tokenizes the new documents, and keeps document frequencies and
lengths current; the IDF and length normalisation are computed at query time from those, so
every score is what a fresh bm25s build would give (to float32 rounding: near-tied documents can
swap places -- 2 of SciFact's 300 test queries have another top-10 order, NDCG@10 0.6860 vs 0.6863).

Layout, all numpy (a document is a *slot*; slots are in label order, and labels only grow):
- a forward index: each slot's (term id, tf) pairs, append-only; it lets a delete take back the
  document's frequencies and is what merges are built from;
- a *main* segment: postings by term (CSR) over the slots present at the last merge;
- the *tail*: slots added since, scored by scanning their forward entries. When the tail grows
  past max(100k postings, a quarter of the main segment) -- or deleted slots pass a quarter of
  all slots -- the live slots are renumbered and the main segment rebuilt in one vectorised pass,
  so the work per written posting stays constant on average.
Searches read an immutable snapshot of these arrays (swapped as one attribute), so a refresh
never blocks or tears a search that is already scoring.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
import threading
from typing import Callable, Protocol

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

K1, B = 1.5, 0.75  # bm25s's defaults
MERGE_MIN_POSTINGS = 100_000
MERGE_TAIL_FRACTION = 0.25
COMPACT_DEAD_FRACTION = 0.25
COMPACT_MIN_DEAD = 1024
TOKENIZE_CHUNK = 20_000  # documents tokenized at a time (bounds the memory of a large first build)
PROGRESS_MIN_DOCS = 50_000


class ChangeSource(Protocol):
    def text_changes_after(self, seq: int) -> tuple[int, np.ndarray, list[str], list[int]]:
        """(last sequence, labels + texts of live documents changed after ``seq`` in ascending
        label order, labels deleted after ``seq``); labels are never reused."""
        ...


def tokenize(texts: list[str]):
    return bm25s.tokenize(texts, stopwords="en", stemmer=_STEMMER, show_progress=False)


class _Grow:
    """Append-only numpy buffer. Appends write past every published view (``view()`` slices up
    to the length at that time), so a reader's view never changes under it."""

    def __init__(self, dtype, init=()) -> None:
        a = np.asarray(init, dtype=dtype)
        self.a = np.empty(max(1024, len(a)), dtype=dtype)
        self.a[: len(a)] = a
        self.n = len(a)

    def extend(self, x: np.ndarray) -> None:
        need = self.n + len(x)
        if need > len(self.a):
            new = np.empty(max(need, 2 * len(self.a)), dtype=self.a.dtype)
            new[: self.n] = self.a[: self.n]
            self.a = new
        self.a[self.n:need] = x
        self.n = need

    def view(self) -> np.ndarray:
        return self.a[: self.n]


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    labels: np.ndarray  # slot -> label, ascending
    doc_len: np.ndarray  # float32 per slot
    alive: np.ndarray  # bool per slot
    df: np.ndarray  # live documents per term id
    n_alive: int
    total_len: float
    main_ptr: np.ndarray  # postings of term t: main_slot/main_tf[main_ptr[t]:main_ptr[t+1]]
    main_slot: np.ndarray
    main_tf: np.ndarray
    tail_slot0: int  # first slot not in the main segment
    fwd_ptr: np.ndarray  # slot s's forward entries: fwd_term/fwd_tf[fwd_ptr[s]:fwd_ptr[s+1]]
    fwd_term: np.ndarray
    fwd_tf: np.ndarray
    vocab: dict[str, int]  # term -> id; only grows, except a rebuild, which makes a new dict


_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float32)


class BM25Index:
    def __init__(self, source: ChangeSource, k1: float = K1, b: float = B) -> None:
        self._source = source
        self.k1, self.b = k1, b
        self._lock = threading.Lock()  # refreshes (writers of the arrays below)
        self._generation = 0  # bumped on every write
        self._built_generation = -1
        self._seq = 0  # last store sequence applied
        self._vocab: dict[str, int] = {}
        self.merges = 0  # main-segment rebuilds (for tests and stats)
        self._reset_arrays()
        self._snap = self._publish()

    # -- writer side (under self._lock) ------------------------------------------------------------
    def _reset_arrays(self) -> None:
        self._labels = _Grow(np.int64)
        self._doc_len = _Grow(np.float32)
        self._alive = np.zeros(0, dtype=bool)
        self._df = np.zeros(0, dtype=np.int64)
        self._n_alive = 0
        self._total_len = 0.0
        self._fwd_ptr = _Grow(np.int64, [0])
        self._fwd_term = _Grow(np.int32)
        self._fwd_tf = _Grow(np.float32)
        self._main_ptr = np.zeros(1, dtype=np.int64)
        self._main_slot = np.zeros(0, dtype=np.int32)
        self._main_tf = np.zeros(0, dtype=np.float32)
        self._tail_slot0 = 0

    def _publish(self) -> _Snapshot:
        return _Snapshot(
            labels=self._labels.view(), doc_len=self._doc_len.view(), alive=self._alive.copy(),
            df=self._df.copy(), n_alive=self._n_alive, total_len=self._total_len,
            main_ptr=self._main_ptr, main_slot=self._main_slot, main_tf=self._main_tf,
            tail_slot0=self._tail_slot0, fwd_ptr=self._fwd_ptr.view(), fwd_term=self._fwd_term.view(),
            fwd_tf=self._fwd_tf.view(), vocab=self._vocab,
        )

    def mark_dirty(self) -> None:
        self._generation += 1

    @property
    def fresh(self) -> bool:
        return self._built_generation == self._generation

    def __len__(self) -> int:
        return self._snap.n_alive

    def labels(self) -> set[int]:
        """Labels of the live documents in the (last refreshed) index."""
        s = self._snap
        return set(s.labels[s.alive].tolist())

    def refresh(self) -> None:
        """Apply the store's changes since the last refresh (if a write happened since)."""
        with self._lock:
            gen = self._generation
            if self._built_generation == gen:
                return
            last, labels, texts, gone = self._source.text_changes_after(self._seq)  # a failure here changes nothing
            try:
                if len(labels) and self._labels.n and int(labels[0]) <= int(self._labels.a[self._labels.n - 1]):
                    # Cannot happen with the store (labels only grow); a source that breaks the rule
                    # gets a full rebuild rather than a silently wrong index.
                    log.warning("BM25: a changed label is not newer than the indexed ones; rebuilding from the store")
                    self._start_over()
                    last, labels, texts, gone = self._source.text_changes_after(0)
                self._delete(np.asarray(gone, dtype=np.int64))
                self._add(np.asarray(labels, dtype=np.int64), texts)
                self._maybe_merge()
            except BaseException:
                # A failure part-way (out of memory in a merge, say) may leave the writer's arrays
                # out of step with each other. Searches keep the last published snapshot; the
                # next refresh rebuilds everything from the store instead of building on them.
                self._start_over()
                raise
            self._seq = last
            self._snap = self._publish()
            self._built_generation = gen

    def _start_over(self) -> None:
        self._reset_arrays()
        self._vocab = {}  # a new dict: published snapshots keep theirs
        self._seq = 0

    def _delete(self, gone: np.ndarray) -> None:
        n = self._labels.n
        if not len(gone) or not n:
            return
        labels = self._labels.view()
        pos = np.searchsorted(labels, gone)
        ok = pos < n
        ok[ok] = labels[pos[ok]] == gone[ok]
        slots = np.unique(pos[ok])
        slots = slots[self._alive[slots]]
        if not len(slots):
            return
        ptr = self._fwd_ptr.view()
        starts, ends = ptr[slots], ptr[slots + 1]
        idx = _ranges(starts, ends)
        np.subtract.at(self._df, self._fwd_term.view()[idx], 1)
        self._alive[slots] = False
        self._n_alive -= len(slots)
        self._total_len -= float(self._doc_len.view()[slots].sum(dtype=np.float64))

    def _add(self, labels: np.ndarray, texts: list[str]) -> None:
        if not len(labels):
            return
        chunks = range(0, len(texts), TOKENIZE_CHUNK)
        if len(texts) >= PROGRESS_MIN_DOCS:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc="BM25 index", unit="chunk", file=sys.stderr, dynamic_ncols=True)
        for i in chunks:
            self._add_chunk(labels[i:i + TOKENIZE_CHUNK], texts[i:i + TOKENIZE_CHUNK])

    def _add_chunk(self, labels: np.ndarray, texts: list[str]) -> None:
        tok = tokenize(texts)
        gid = np.empty(len(tok.vocab), dtype=np.int64)
        for term, i in tok.vocab.items():
            gid[i] = -1 if term == "" else self._vocab.setdefault(term, len(self._vocab))
        vocab_size = max(1, len(self._vocab))
        lengths = np.fromiter((len(x) for x in tok.ids), dtype=np.int64, count=len(tok.ids))
        flat = np.fromiter(itertools.chain.from_iterable(tok.ids), dtype=np.int64, count=int(lengths.sum()))
        doc = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
        g = gid[flat] if len(flat) else flat
        keep = g >= 0
        doc, g = doc[keep], g[keep]
        doc_len = np.bincount(doc, minlength=len(texts)).astype(np.float32)
        key, tf = np.unique(doc * vocab_size + g, return_counts=True)  # sorted by (document, term)
        d, term = key // vocab_size, (key % vocab_size).astype(np.int32)
        per_doc = np.bincount(d, minlength=len(texts))
        base = self._fwd_ptr.a[self._fwd_ptr.n - 1]
        self._fwd_ptr.extend(base + np.cumsum(per_doc))
        self._fwd_term.extend(term)
        self._fwd_tf.extend(tf.astype(np.float32))
        self._labels.extend(labels)
        self._doc_len.extend(doc_len)
        self._alive = np.concatenate([self._alive, np.ones(len(texts), dtype=bool)])
        if len(self._df) < len(self._vocab):
            self._df = np.concatenate([self._df, np.zeros(len(self._vocab) - len(self._df), dtype=np.int64)])
        self._df += np.bincount(term, minlength=len(self._df))
        self._n_alive += len(texts)
        self._total_len += float(doc_len.sum(dtype=np.float64))

    def _maybe_merge(self) -> None:
        n = self._labels.n
        ptr = self._fwd_ptr.view()
        tail = int(ptr[n] - ptr[self._tail_slot0])
        dead = n - self._n_alive
        if tail > max(MERGE_MIN_POSTINGS, MERGE_TAIL_FRACTION * len(self._main_slot)) or (
            dead >= COMPACT_MIN_DEAD and dead > COMPACT_DEAD_FRACTION * n
        ):
            self._merge()

    def _merge(self) -> None:
        """Drop deleted slots (renumbering the rest, order kept) and rebuild the main segment
        over all of them: every array is new, so published snapshots keep theirs."""
        n = self._labels.n
        ptr = self._fwd_ptr.view()
        keep_slot = self._alive
        slot_of = np.repeat(np.arange(n, dtype=np.int64), np.diff(ptr))
        keep = keep_slot[slot_of]
        new_id = np.cumsum(keep_slot) - 1
        terms = self._fwd_term.view()[keep]
        tfs = self._fwd_tf.view()[keep]
        slots = new_id[slot_of[keep]]
        counts = np.diff(ptr)[keep_slot]
        order = np.argsort(terms, kind="stable")  # stable: slots stay ascending within a term
        labels = _Grow(np.int64, self._labels.view()[keep_slot])
        doc_len = _Grow(np.float32, self._doc_len.view()[keep_slot])
        fwd_ptr = _Grow(np.int64, np.concatenate([[0], np.cumsum(counts)]))
        fwd_term, fwd_tf = _Grow(np.int32, terms), _Grow(np.float32, tfs)
        main_slot, main_tf = slots[order].astype(np.int32), tfs[order]
        main_ptr = np.concatenate([[0], np.cumsum(np.bincount(terms, minlength=len(self._df)))]).astype(np.int64)
        # Everything is built: switch over with plain assignments (nothing left to fail half-way).
        self._labels, self._doc_len, self._alive = labels, doc_len, np.ones(labels.n, dtype=bool)
        self._fwd_ptr, self._fwd_term, self._fwd_tf = fwd_ptr, fwd_term, fwd_tf
        self._main_slot, self._main_tf, self._main_ptr = main_slot, main_tf, main_ptr
        self._tail_slot0 = labels.n
        self.merges += 1

    # -- reader side ---------------------------------------------------------------------------------
    def search(self, query: str, k: int, allowed: Callable[[], set[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (labels, BM25 scores), best first; documents with score 0 are left out.

        ``allowed`` (a metadata filter: returns the matching labels; called after the index is
        brought up to date, so it is read no earlier than the index): only those documents can
        be returned -- the others' scores are zeroed before the top-k, so the k are the best
        matching documents, not what is left of an unfiltered top-k.
        """
        self.refresh()
        s = self._snap
        if s.n_alive == 0 or k <= 0:
            return _EMPTY_I, _EMPTY_F
        q = tokenize([query])
        ours = {i: s.vocab.get(t) for t, i in q.vocab.items()}  # the query's own vocabulary -> ours
        qids = [ours[i] for i in q.ids[0]] if q.ids else []
        qids = np.asarray([t for t in qids if t is not None and t < len(s.df)], dtype=np.int64)
        if not len(qids):
            return _EMPTY_I, _EMPTY_F
        uniq, mult = np.unique(qids, return_counts=True)  # a repeated query term counts again, as in bm25s
        df = s.df[uniq].astype(np.float64)
        n = float(s.n_alive)
        weight = (np.log(1.0 + (n - df + 0.5) / (df + 0.5)) * mult).astype(np.float32)
        avgdl = s.total_len / n
        slot_parts, tf_parts, w_parts = [], [], []
        n_main_terms = len(s.main_ptr) - 1
        for t, w in zip(uniq.tolist(), weight.tolist()):
            if t < n_main_terms:
                a, z = s.main_ptr[t], s.main_ptr[t + 1]
                if z > a:
                    slot_parts.append(s.main_slot[a:z])
                    tf_parts.append(s.main_tf[a:z])
                    w_parts.append(np.full(z - a, w, dtype=np.float32))
        p0 = s.fwd_ptr[s.tail_slot0]
        tail_terms = s.fwd_term[p0:]
        hit = np.flatnonzero(np.isin(tail_terms, uniq)) if len(tail_terms) else _EMPTY_I
        if len(hit):
            pos = hit + p0
            slot_parts.append(np.searchsorted(s.fwd_ptr, pos, side="right") - 1)
            tf_parts.append(s.fwd_tf[pos])
            w_parts.append(weight[np.searchsorted(uniq, tail_terms[hit])])
        if not slot_parts:
            return _EMPTY_I, _EMPTY_F
        slots = np.concatenate(slot_parts)
        tf = np.concatenate(tf_parts)
        norm = s.doc_len[slots] / np.float32(avgdl)
        contrib = np.concatenate(w_parts) * (tf / (np.float32(self.k1) * ((1 - np.float32(self.b)) + np.float32(self.b) * norm) + tf))
        scores = np.bincount(slots, weights=contrib, minlength=len(s.labels)).astype(np.float32)
        scores[~s.alive] = 0.0
        if allowed is not None:
            wanted = allowed()
            want = np.fromiter(wanted, dtype=np.int64, count=len(wanted))
            pos = np.searchsorted(s.labels, want)
            ok = pos < len(s.labels)
            ok[ok] = s.labels[pos[ok]] == want[ok]
            mask = np.zeros(len(s.labels), dtype=bool)
            mask[pos[ok]] = True
            scores[~mask] = 0.0
        cand = np.flatnonzero(scores > 0)
        if len(cand) > k:
            cand = cand[np.argpartition(-scores[cand], k - 1)[:k]]
        cand = cand[np.lexsort((cand, -scores[cand]))]  # best first; ties by label
        return s.labels[cand], scores[cand]


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenated arange(start, end) for each pair, vectorised."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return _EMPTY_I
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + offsets

