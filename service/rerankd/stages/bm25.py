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
  so the work per written posting stays constant on average. The pass runs in a background
  thread over the arrays as of one refresh (numpy's sort releases the GIL); searches and
  refreshes go on meanwhile, and the switch-over carries the slots appended and deleted since.
Searches read an immutable snapshot of these arrays (swapped as one attribute), so a refresh
never blocks or tears a search that is already scoring.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

import bm25s
import numpy as np

from ..snapshot import fsync_dir, sha256_file
from ..store import ChangesPruned

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
# After a failed refresh (out of memory, say) the next attempt waits 1, 2, 4 ... up to 60 s: a
# failure that persists costs one rebuild attempt per minute, not one per Search and per write.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
TOMBSTONE_ENTRIES = 64  # chunks of deletes/replacements noted since the published snapshot, before they are joined
_now = time.monotonic  # the backoff's clock (tests replace it here, not process-wide)


class RefreshAborted(Exception):
    """A refresh stopped between tokenizing chunks because the index is closing."""


SAVE_FORMAT = "rerankd-bm25/1"
_SAVED_ARRAYS = ("labels", "doc_len", "alive", "df", "main_ptr", "main_slot", "main_tf", "fwd_ptr", "fwd_term", "fwd_tf")
_FINGERPRINT_TEXT = (  # varied morphology, so a stemmer or stopword change shows in its tokens
    "Running runners ran; the studies' results were analysed: 42 cells, IL-6 and TNF-alpha levels. "
    "Generalizations, organizational hopefulness and relational conditioning were happily observed "
    "across the nations' universities; mice, geese and children played with their cats' toys. "
    "Was it argued that these agreements, arguments and argumentative writings are not about which "
    "of them has been, being or will be the most effective, decisively, sensibly, cautiously?"
)


def tokenizer_fingerprint() -> str:
    """What a saved vocabulary depends on: bm25s, the stemmer and the stopwords, as one hash of
    their output on a fixed text. A saved index tokenized differently is rebuilt, never mixed."""
    tok = tokenize([_FINGERPRINT_TEXT])
    inv = {i: t for t, i in tok.vocab.items()}
    terms = [inv[i] for i in tok.ids[0]]
    stem = getattr(_STEMMER, "__class__", type(None)).__module__
    return hashlib.sha256(json.dumps([bm25s.__version__, stem, terms]).encode()).hexdigest()[:16]


class ChangeSource(Protocol):
    def text_changes_after(self, seq: int) -> tuple[int, np.ndarray, list[str], list[int]]:
        """(last sequence, labels + texts of live documents changed after ``seq`` in ascending
        label order, labels deleted after ``seq``); labels are never reused. Raises
        ``ChangesPruned`` when the log no longer reaches back to ``seq``."""
        ...

    def text_changes_and_live_after(self, seq: int) -> tuple[int, np.ndarray, list[str], np.ndarray]:
        """The same with every live label (ascending) in place of the deletes (after ChangesPruned)."""
        ...


def tokenize(texts: list[str]):
    return bm25s.tokenize(texts, stopwords="en", stemmer=_STEMMER, show_progress=False)


class _Grow:
    """Append-only numpy buffer. Appends write past every published view (``view()`` slices up
    to the length at that time), so a reader's view never changes under it."""

    def __init__(self, dtype, init=(), spare: float = 0.0) -> None:
        a = np.asarray(init, dtype=dtype)
        self.a = np.empty(max(1024, int(len(a) * (1 + spare))), dtype=dtype)
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
    seq: int  # the store sequence this snapshot covers (what a save records)


_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class _MergeJob:
    """What a merge reads: the writer's arrays as of one refresh (views; appends go past them)."""

    epoch: int
    n: int
    ptr: np.ndarray
    term: np.ndarray
    tf: np.ndarray
    alive: np.ndarray  # a copy: deletes flip the writer's in place
    labels: np.ndarray
    doc_len: np.ndarray
    n_terms: int


@dataclasses.dataclass(frozen=True)
class _Merged:
    keep_slot: np.ndarray
    # New buffers with room to spare: the switch-over appends the tail written meanwhile
    # (O(tail) under the lock, not a copy of the whole index).
    labels: _Grow
    doc_len: _Grow
    fwd_ptr: _Grow
    fwd_term: _Grow
    fwd_tf: _Grow
    main_ptr: np.ndarray
    main_slot: np.ndarray
    main_tf: np.ndarray


def _build_merge(job: _MergeJob) -> _Merged:
    """Drop the deleted slots of ``job`` (renumbering the rest, order kept) and build the main
    segment over all of them. Reads only the job; touches no index state."""
    keep_slot = job.alive
    sizes = np.diff(job.ptr)
    slot_of = np.repeat(np.arange(job.n, dtype=np.int64), sizes)
    keep = keep_slot[slot_of]
    new_id = np.cumsum(keep_slot) - 1
    terms = job.term[keep]
    tfs = job.tf[keep]
    slots = new_id[slot_of[keep]]
    order = np.argsort(terms, kind="stable")  # stable: slots stay ascending within a term; releases the GIL
    spare = MERGE_TAIL_FRACTION * 2
    return _Merged(
        keep_slot=keep_slot, labels=_Grow(np.int64, job.labels[keep_slot], spare),
        doc_len=_Grow(np.float32, job.doc_len[keep_slot], spare),
        fwd_ptr=_Grow(np.int64, np.concatenate([[0], np.cumsum(sizes[keep_slot])]), spare),
        fwd_term=_Grow(np.int32, terms, spare), fwd_tf=_Grow(np.float32, tfs, spare),
        main_ptr=np.concatenate([[0], np.cumsum(np.bincount(terms, minlength=job.n_terms))]).astype(np.int64),
        main_slot=slots[order].astype(np.int32), main_tf=tfs[order],
    )


class BM25Index:
    def __init__(self, source: ChangeSource, k1: float = K1, b: float = B, background_merge: bool = True) -> None:
        self._source = source
        self.k1, self.b = k1, b
        self._background = background_merge
        self._merge_thread: threading.Thread | None = None
        self._epoch = 0  # bumped when the index starts over: a merge begun before is dropped
        self._lock = threading.Lock()  # refreshes (writers of the arrays below)
        self._generation = 0  # bumped on every write
        self._built_generation = -1
        self._seq = 0  # last store sequence applied
        self._vocab: dict[str, int] = {}
        self.merges = 0  # main-segment rebuilds (for tests and stats)
        # refresh failures in a row (0: the last refresh succeeded), when the next may start, why
        self.failures = 0
        self.refresh_failures_total = 0
        self._retry_at = 0.0
        self.last_error: str | None = None
        # Called (from a search's thread) when a search read a stale index: the owner makes sure a
        # retry is scheduled -- searches never run one themselves (a rebuild takes minutes at 1M).
        self.on_stale: Callable[[], None] | None = None
        self._closing = False
        self._torn = False  # a writer-array update is part-way: a failure now must start over
        # (store sequences, labels) of deletes and replacements not yet in the published snapshot,
        # as chunks of two parallel arrays: searches mask them, so a stale index never gives top-k
        # places to documents that are gone
        self._tombstones: list[tuple[np.ndarray, np.ndarray]] = []
        self._tomb_lock = threading.Lock()
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
            fwd_tf=self._fwd_tf.view(), vocab=self._vocab, seq=self._seq,
        )

    def mark_dirty(self, gone=(), seq: int = 0) -> None:
        """A write happened. ``gone``: the labels it deleted or replaced, at store sequence
        ``seq``; searches leave them out until a published index covers ``seq``."""
        if len(gone):
            labels = np.asarray(gone, dtype=np.int64)
            with self._tomb_lock:
                self._tombstones.append((np.full(len(labels), int(seq), dtype=np.int64), labels))
                if len(self._tombstones) > TOMBSTONE_ENTRIES:
                    # many writes before a refresh publishes (a long outage): one pair of arrays,
                    # so a search reads one, not thousands (a copy, no sort: O(n) under the lock);
                    # each label keeps its own sequence, so pruning stays exact
                    self._tombstones = [(np.concatenate([q for q, _ in self._tombstones]),
                                         np.concatenate([a for _, a in self._tombstones]))]
        self._generation += 1

    def _prune_tombstones(self) -> None:
        covered = self._snap.seq
        with self._tomb_lock:
            kept = []
            for q, a in self._tombstones:
                later = q > covered
                if later.all():
                    kept.append((q, a))
                elif later.any():
                    kept.append((q[later], a[later]))
            self._tombstones = kept

    def close_refreshes(self) -> None:
        """Shutting down: a refresh in progress stops at its next tokenizing chunk (raising
        ``RefreshAborted``) and no new one starts. Searches and ``save`` go on."""
        self._closing = True

    @property
    def applied_seq(self) -> int:
        """The store sequence the searchable index covers (its published snapshot's)."""
        return self._snap.seq

    def __len__(self) -> int:
        return self._snap.n_alive

    def labels(self) -> set[int]:
        """Labels of the live documents in the (last refreshed) index."""
        s = self._snap
        return set(s.labels[s.alive].tolist())

    def retry_in(self) -> float:
        """Seconds until a refresh may be tried again after a failed one (0: any time)."""
        return max(0.0, self._retry_at - _now()) if self.failures else 0.0

    @property
    def stale(self) -> bool:
        """Searches are served from the last good index while a failed refresh is retried."""
        return self.failures > 0

    def refresh(self, blocking: bool = True, *, retry: bool = True, force: bool = False) -> bool:
        """Apply the store's changes since the last refresh (if a write happened since); True
        when it ran (or had nothing to do).

        A failure is raised; ``failures`` / ``retry_in()`` then say when the next attempt is due
        (backoff 1, 2, 4 ... 60 s), and until one succeeds searches read the last published
        snapshot. After a failure, a call with ``retry=False`` (a search) does nothing and one
        with ``retry=True`` (the owner's background task) attempts only once the backoff has
        passed -- both checked again once the lock is held, so callers queued behind a failing
        attempt do not each start another; ``force`` attempts at once. ``blocking=False``:
        return False at once if another refresh holds the lock."""
        if not self._lock.acquire(blocking=blocking):
            return False
        try:
            if self._closing or (self.failures and not force and (not retry or self.retry_in() > 0)):
                return False
            try:
                self._refresh_locked()
            except RefreshAborted:
                raise  # shutting down: not a failure of the index
            except BaseException as e:
                self.failures += 1
                self.refresh_failures_total += 1
                wait = min(RETRY_MAX_S, RETRY_FIRST_S * 2.0 ** min(self.failures - 1, 32))
                self._retry_at = _now() + wait
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                raise
            if self.failures:
                log.info("BM25 index caught up at seq %d after %d failed refreshes", self._seq, self.failures)
            self.failures, self.last_error = 0, None
            return True
        finally:
            self._lock.release()

    def _catch_up(self) -> None:
        """Before a search: refresh, so the search sees every write acknowledged before it. After
        a failed refresh the search reads the last good snapshot instead -- stale (documents
        written since are missing from this leg; deleted ones are masked) -- and leaves the
        retry to the owner (``on_stale``): a Search neither fails nor runs a rebuild."""
        owned = self.on_stale is not None
        if not self.failures or not owned:
            try:
                # healthy: wait for a refresh in progress. Without an owner to retry (the index used
                # on its own), a search retries once the backoff allows, never waiting for another.
                self.refresh(blocking=not self.failures, retry=not owned)
            except RefreshAborted:
                pass
            except Exception:
                log.exception("BM25 refresh failed: searches use the index as of seq %d until a retry succeeds",
                              self._snap.seq)
        if self.failures and owned:
            try:
                self.on_stale()
            except Exception:  # a search must not fail on the owner's hook
                log.exception("BM25 on_stale hook failed")

    def _refresh_locked(self) -> None:
        """The body of ``refresh`` (its caller holds ``self._lock``)."""
        gen = self._generation
        if self._built_generation == gen:
            return
        self._torn = False
        try:
            last, labels, texts, gone = self._source.text_changes_after(self._seq)  # a failure here changes nothing
        except ChangesPruned:
            # A snapshot pruned the log past this index's position (writes since the last
            # search): take the new documents as usual, and the deletes as "every label held
            # that the store no longer has" -- one pass over the live labels, no re-tokenizing.
            last, labels, texts, live = self._source.text_changes_and_live_after(self._seq)
            held = self._labels.view()[self._alive]
            gone = held[~np.isin(held, live)].tolist()
        try:
            labels, texts = self._skip_indexed(np.asarray(labels, dtype=np.int64), texts)
            if len(labels) and self._labels.n and int(labels[0]) <= int(self._labels.a[self._labels.n - 1]):
                # Cannot happen with the store (labels only grow); a source that breaks the rule
                # gets a full rebuild rather than a silently wrong index.
                log.warning("BM25: a changed label is not newer than the indexed ones; rebuilding from the store")
                self._start_over()
                last, labels, texts, gone = self._source.text_changes_after(0)
            self._delete(np.asarray(gone, dtype=np.int64))
            self._add(np.asarray(labels, dtype=np.int64), texts)
            texts = None  # noqa: F841 -- freed before the merge: on a first build they are every
            # document's text (~1.6 GB per 1M SciFact abstracts), beside the merge's own peak
            self._maybe_merge()
        except BaseException:
            # A failure part-way through updating the writer's arrays (out of memory, say) may
            # leave them out of step with each other: the next refresh rebuilds everything from
            # the store instead of building on them. A failure before or between updates (in
            # tokenizing, in reading the store) leaves them consistent: the next refresh goes on
            # from the same sequence (deletes already applied are skipped, and so are the
            # documents of chunks added before the failure: _skip_indexed). Searches keep the
            # last published snapshot either way.
            if self._torn:
                self._start_over()
            raise
        self._seq = last
        self._snap = self._publish()
        self._built_generation = gen
        self._prune_tombstones()

    def _skip_indexed(self, labels: np.ndarray, texts: list[str]) -> tuple[np.ndarray, list[str]]:
        """Drop the documents a failed or aborted refresh already added (whole chunks, before it
        failed: ``_seq`` did not move, so the retry reads them again). Labels are never reused,
        so an indexed label is the same document; the retry goes on with the rest instead of
        re-tokenizing the whole store."""
        n = self._labels.n
        if not len(labels) or not n or int(labels[0]) > int(self._labels.a[n - 1]):
            return labels, texts
        held = self._labels.view()
        pos = np.minimum(np.searchsorted(held, labels), n - 1)
        known = held[pos] == labels
        if not known.any():
            return labels, texts
        keep = np.flatnonzero(~known)
        return labels[keep], [texts[i] for i in keep.tolist()]

    def _start_over(self) -> None:
        self._epoch += 1
        self._reset_arrays()
        self._vocab = {}  # a new dict: published snapshots keep theirs
        self._seq = 0

    def _delete(self, gone: np.ndarray) -> None:
        n = self._labels.n
        if not len(gone) or not n:
            return
        slots = np.unique(_slots_of(self._labels.view(), gone))
        slots = slots[self._alive[slots]]
        if not len(slots):
            return
        ptr = self._fwd_ptr.view()
        starts, ends = ptr[slots], ptr[slots + 1]
        idx = _ranges(starts, ends)
        terms = self._fwd_term.view()[idx]
        self._torn = True
        np.subtract.at(self._df, terms, 1)
        self._alive[slots] = False
        self._n_alive -= len(slots)
        self._total_len -= float(self._doc_len.view()[slots].sum(dtype=np.float64))
        self._torn = False

    def _add(self, labels: np.ndarray, texts: list[str]) -> None:
        if not len(labels):
            return
        chunks = range(0, len(texts), TOKENIZE_CHUNK)
        if len(texts) >= PROGRESS_MIN_DOCS:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc="BM25 index", unit="chunk", file=sys.stderr, dynamic_ncols=True)
        for i in chunks:
            if self._closing:
                raise RefreshAborted("the BM25 index is closing")
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
        self._torn = True
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
        self._torn = False

    def _maybe_merge(self) -> None:
        if self._merge_thread is not None and len(self._main_slot):  # one at a time; the next refresh looks again
            return
        n = self._labels.n
        ptr = self._fwd_ptr.view()
        tail = int(ptr[n] - ptr[self._tail_slot0])
        dead = n - self._n_alive
        if not (tail > max(MERGE_MIN_POSTINGS, MERGE_TAIL_FRACTION * len(self._main_slot)) or (
                dead >= COMPACT_MIN_DEAD and dead > COMPACT_DEAD_FRACTION * n)):
            return
        job = self._capture()
        # The first build (also after starting over, while a dropped merge may still be running)
        # has nothing to serve from meanwhile: it merges here.
        if not self._background or not len(self._main_slot):
            self._install(job, _build_merge(job))
            return
        t = threading.Thread(target=self._merge_in_background, args=(job,), name="bm25-merge", daemon=True)
        self._merge_thread = t  # before start(): the thread clears it when done
        try:
            t.start()
        except Exception:  # e.g. "can't start new thread": merge here rather than never again
            self._merge_thread = None
            log.exception("BM25: could not start the background merge; merging in the foreground")
            self._install(job, _build_merge(job))

    def _capture(self) -> _MergeJob:
        n = self._labels.n
        ptr = self._fwd_ptr.view()
        return _MergeJob(epoch=self._epoch, n=n, ptr=ptr, term=self._fwd_term.view(), tf=self._fwd_tf.view(),
                         alive=self._alive.copy(), labels=self._labels.view(), doc_len=self._doc_len.view(),
                         n_terms=len(self._df))

    def _merge_in_background(self, job: _MergeJob) -> None:
        """Build the merged arrays without the lock (numpy's sort releases the GIL), then take
        the lock to switch over, carrying what the refreshes meanwhile appended and deleted."""
        try:
            built = _build_merge(job)
            with self._lock:
                if self._epoch == job.epoch:  # else the index started over meanwhile: drop it
                    self._install(job, built)
                    self._snap = self._publish()
        except Exception:
            log.exception("BM25 merge failed; the index keeps serving from its tail (retried on the next write)")
        finally:
            self._merge_thread = None

    def join_merge(self, timeout: float | None = None) -> None:
        """Wait for a background merge (tests, shutdown)."""
        t = self._merge_thread
        if t is not None:
            t.join(timeout)

    def _install(self, job: _MergeJob, built: _Merged) -> None:
        """Under the lock: the merged prefix [0, job.n), renumbered, then the slots appended since
        as the new tail; deletes made since are carried over through ``alive``. Everything is
        built first and then assigned, so a failure (out of memory) changes nothing."""
        n_now = self._labels.n
        ptr_now = self._fwd_ptr.view()
        p0, p1 = int(ptr_now[job.n]), int(ptr_now[n_now])
        k = built.labels.n
        alive = np.concatenate([self._alive[: job.n][built.keep_slot], self._alive[job.n:]])
        base = built.fwd_ptr.a[built.fwd_ptr.n - 1]
        built.labels.extend(self._labels.view()[job.n:])
        built.doc_len.extend(self._doc_len.view()[job.n:])
        built.fwd_ptr.extend(base + (ptr_now[job.n + 1:] - p0))
        built.fwd_term.extend(self._fwd_term.view()[p0:p1])
        built.fwd_tf.extend(self._fwd_tf.view()[p0:p1])
        # Nothing is assigned before every array is complete: a failure above changes nothing
        # here (the built arrays are the merge's own, unpublished).
        self._labels, self._doc_len, self._alive = built.labels, built.doc_len, alive
        self._fwd_ptr, self._fwd_term, self._fwd_tf = built.fwd_ptr, built.fwd_term, built.fwd_tf
        self._main_slot, self._main_tf, self._main_ptr = built.main_slot, built.main_tf, built.main_ptr
        self._tail_slot0 = k
        self.merges += 1

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, directory: Path, store_id: str | None = None) -> int:
        """Write the published index (what searches read) to ``directory`` (``state.npz`` +
        ``manifest.json``); returns the store sequence it covers -- the snapshot's own, which
        after a failed refresh is older than the writer's position. Searches and refreshes go on
        meanwhile. Crash-safe: the manifest, with the state's checksum, is renamed into place last
        (a crash between the renames is rolled forward by ``load``)."""
        with self._lock:  # the vocabulary dict grows under refreshes: read it here
            snap = self._snap
            terms = [""] * len(snap.vocab)
            for t, i in snap.vocab.items():
                terms[i] = t
        if any("\n" in t for t in terms):  # cannot happen with bm25s's \w+ tokens
            raise ValueError("a BM25 term holds a newline: the vocabulary cannot be saved")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp, mtmp = directory / "state.npz.tmp", directory / "manifest.json.tmp"
        try:
            with open(tmp, "wb") as f:
                # every figure the index is rebuilt from is inside the checksummed file
                np.savez(f, vocab=np.frombuffer("\n".join(terms).encode(), dtype=np.uint8),
                         counts=np.array([snap.seq, snap.n_alive, snap.tail_slot0, len(terms)], dtype=np.int64),
                         total_len=np.array([snap.total_len], dtype=np.float64),
                         **{name: getattr(snap, name) for name in _SAVED_ARRAYS})
                f.flush()
                os.fsync(f.fileno())
            manifest = {
                "format": SAVE_FORMAT, "sequence": snap.seq, "store_id": store_id, "sha256": sha256_file(tmp),
                "documents": snap.n_alive, "tokenizer": tokenizer_fingerprint(), "k1": self.k1, "b": self.b,
                "created_at": time.time(),
            }
            mtmp.write_text(json.dumps(manifest, indent=2))
            with open(mtmp, "rb+") as f:
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            mtmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, directory / "state.npz")
        fsync_dir(directory)
        os.replace(mtmp, directory / "manifest.json")
        fsync_dir(directory)
        return snap.seq

    def load(self, directory: Path, store_id: str | None, last_seq: int) -> str | None:
        """Take the index saved in ``directory``; None when loaded, else why not (the caller then
        builds from the store). The next refresh catches up from the saved sequence. A save from
        another store, from a store that ended earlier (an older ``documents.sqlite3`` restored),
        tokenized differently, or whose file does not match its checksum is refused and deleted:
        never trusted later (labels an older store hands out again name other documents)."""
        directory = Path(directory)
        if not (directory / "manifest.json").is_file() and not (directory / "manifest.json.tmp").is_file():
            return "missing"
        why = self._load(directory, store_id, last_seq)
        if why is not None:
            for name in ("manifest.json", "manifest.json.tmp", "state.npz", "state.npz.tmp"):  # manifest first
                try:
                    (directory / name).unlink(missing_ok=True)
                except OSError as e:
                    log.warning("could not remove the refused BM25 save %s: %s", directory / name, e)
        return why

    def _load(self, directory: Path, store_id: str | None, last_seq: int) -> str | None:
        path, mpath, mtmp = directory / "state.npz", directory / "manifest.json", directory / "manifest.json.tmp"
        try:
            if mtmp.is_file() and path.is_file():
                # A save killed between its renames: the new state under the old (or no) manifest,
                # the new manifest complete beside it. Its checksum binds the two.
                new = json.loads(mtmp.read_text())
                if isinstance(new, dict) and new.get("sha256") == sha256_file(path):
                    os.replace(mtmp, mpath)
                    fsync_dir(directory)
            mf = json.loads(mpath.read_text())
            if not isinstance(mf, dict):
                return "unreadable manifest: not an object"
        except FileNotFoundError:
            return "missing"
        except (OSError, ValueError) as e:
            return f"unreadable manifest: {e}"
        try:
            if mf.get("format") != SAVE_FORMAT:
                return f"format {mf.get('format')!r}"
            if mf.get("tokenizer") != tokenizer_fingerprint():
                return "tokenizer changed (bm25s, stemmer or stopwords)"
            if (mf.get("k1"), mf.get("b")) != (self.k1, self.b):
                return "k1/b changed"
            if mf.get("store_id") != store_id:
                return f"saved from another document store ({mf.get('store_id')}, this one is {store_id})"
            if sha256_file(path) != mf.get("sha256"):
                return "checksum mismatch"
            with np.load(path, allow_pickle=False) as z:
                a = {name: z[name] for name in (*_SAVED_ARRAYS, "vocab", "counts", "total_len")}
            seq, n_alive, tail_slot0, n_terms = (int(x) for x in a["counts"])
            total_len = float(a["total_len"][0])
            if seq > last_seq:
                return f"saved at seq {seq} but the store ends at seq {last_seq}"
            blob = a["vocab"].tobytes().decode()
            terms = blob.split("\n") if n_terms else []
            n = len(a["labels"])
            ok = (len(terms) == n_terms and len(a["doc_len"]) == len(a["alive"]) == n and len(a["fwd_ptr"]) == n + 1
                  and int(a["fwd_ptr"][-1]) == len(a["fwd_term"]) == len(a["fwd_tf"]) and len(a["df"]) <= n_terms
                  and 1 <= len(a["main_ptr"]) <= len(a["df"]) + 1
                  and int(a["main_ptr"][-1]) == len(a["main_slot"]) == len(a["main_tf"])
                  and 0 <= tail_slot0 <= n and n_alive == int(a["alive"].sum()) and seq == mf.get("sequence"))
            if not ok:
                return "inconsistent arrays"
        except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
            return f"unreadable: {e}"
        with self._lock:
            self._epoch += 1  # a merge begun on the old arrays is dropped
            self._labels = _Grow(np.int64, a["labels"], MERGE_TAIL_FRACTION * 2)
            self._doc_len = _Grow(np.float32, a["doc_len"], MERGE_TAIL_FRACTION * 2)
            self._alive = a["alive"].astype(bool)
            self._df = a["df"].astype(np.int64)
            self._n_alive, self._total_len = n_alive, total_len
            self._fwd_ptr = _Grow(np.int64, a["fwd_ptr"], MERGE_TAIL_FRACTION * 2)
            self._fwd_term = _Grow(np.int32, a["fwd_term"], MERGE_TAIL_FRACTION * 2)
            self._fwd_tf = _Grow(np.float32, a["fwd_tf"], MERGE_TAIL_FRACTION * 2)
            self._main_ptr = a["main_ptr"].astype(np.int64)
            self._main_slot = a["main_slot"].astype(np.int32)
            self._main_tf = a["main_tf"].astype(np.float32)
            self._tail_slot0 = tail_slot0
            self._vocab = {t: i for i, t in enumerate(terms)}
            self._seq = seq
            self._snap = self._publish()
            self._built_generation = -1  # the next refresh catches up from seq
        self._prune_tombstones()
        return None

    # -- reader side ---------------------------------------------------------------------------------
    def search(self, query: str, k: int, allowed: Callable[[], set[int]] | None = None,
               info: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (labels, BM25 scores), best first; documents with score 0 are left out.

        ``allowed`` (a metadata filter: returns the matching labels; called after the index is
        brought up to date, so it is read no earlier than the index): only those documents can
        be returned -- the others' scores are zeroed before the top-k, so the k are the best
        matching documents, not what is left of an unfiltered top-k. ``info``: gets ``"stale"``,
        whether this search read the last good index while a failed refresh is retried (read
        before the snapshot: a retry succeeding meanwhile makes it say stale, never the reverse).
        """
        self._catch_up()
        stale = self.stale
        with self._tomb_lock:  # before the snapshot: a refresh publishing meanwhile prunes only what it covers
            tombs = list(self._tombstones)
        s = self._snap
        if info is not None:
            info["stale"] = stale
        if s.n_alive == 0 or s.total_len <= 0 or k <= 0:  # no live document has a term
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
        gone = [a[q > s.seq] for q, a in tombs]
        gone = np.concatenate(gone) if gone else _EMPTY_I
        if len(gone):  # deleted or replaced after this snapshot (a stale one, or a refresh racing)
            scores[_slots_of(s.labels, gone)] = 0.0
        if allowed is not None:
            wanted = allowed()
            mask = np.zeros(len(s.labels), dtype=bool)
            mask[_slots_of(s.labels, np.fromiter(wanted, dtype=np.int64, count=len(wanted)))] = True
            scores[~mask] = 0.0
        cand = np.flatnonzero(scores > 0)
        if len(cand) > k:
            cand = cand[np.argpartition(-scores[cand], k - 1)[:k]]
        cand = cand[np.lexsort((cand, -scores[cand]))]  # best first; ties by label
        return s.labels[cand], scores[cand]


def _slots_of(labels: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Slots (positions in the ascending ``labels``) of those ``wanted`` labels that are indexed."""
    pos = np.searchsorted(labels, wanted)
    ok = pos < len(labels)
    ok[ok] = labels[pos[ok]] == wanted[ok]
    return pos[ok]


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenated arange(start, end) for each pair, vectorised."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return _EMPTY_I
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + offsets


