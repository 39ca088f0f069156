"""The document store: SQLite in WAL mode, the source of truth.

Each document row holds its id, title, text, metadata (JSON), the reranker's cached passage
token ids and its embedding. Every change appends to ``changes`` (the sequence log the HNSW
snapshot is replayed from, and the BM25 index and a graph rebuild catch up from). The log is
pruned through each new snapshot (``prune_changes``, never during a graph rebuild); a reader from
before the pruned horizon gets :class:`ChangesPruned` and rebuilds (the HNSW snapshot) or
reconciles against the live labels (the BM25 index). ``synchronous=FULL``: a write returns only after its commit is on
disk, so an acknowledged Upsert/Delete survives ``kill -9``.

Writes go through one connection under a lock; reads use one connection per thread (WAL lets
readers run beside the writer and see a consistent snapshot per statement).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    label     INTEGER PRIMARY KEY AUTOINCREMENT,
    id        TEXT    NOT NULL UNIQUE,
    title     TEXT    NOT NULL DEFAULT '',
    text      TEXT    NOT NULL,
    metadata  TEXT    NOT NULL DEFAULT '{}',
    token_ids BLOB,
    vector    BLOB    NOT NULL,
    seq       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_seq ON documents (seq);
CREATE TABLE IF NOT EXISTS changes (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    op     TEXT    NOT NULL CHECK (op IN ('upsert', 'delete')),
    label  INTEGER NOT NULL,
    doc_id TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


PRUNED_KEY = "changes_pruned_through"  # meta: the change log holds no row at or below this sequence
PRUNE_BATCH = 50_000  # change-log rows dropped per transaction: writes wait for one batch at most


class ChangesPruned(LookupError):
    """The change log no longer reaches back to the sequence asked for: rebuild from the documents."""


@dataclass(frozen=True)
class NewDocument:
    id: str
    text: str
    title: str
    metadata: dict[str, str]
    vector: np.ndarray  # float32 [dim]
    token_ids: np.ndarray | None  # int32 [T] (reranker passage ids, no special tokens)


@dataclass(frozen=True)
class StoredDocument:
    label: int
    id: str
    title: str
    text: str
    metadata: dict[str, str]
    token_ids: np.ndarray | None

    @property
    def full_text(self) -> str:
        return join_title(self.title, self.text)


def join_title(title: str, text: str) -> str:
    """The text that is embedded, BM25-indexed and reranked: BEIR's "title text"."""
    if not title:
        return text
    return f"{title} {text}" if text else title


class DocumentStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._w = self._connect()
        self._w.executescript(SCHEMA)
        # Who this store is: a snapshot records it, so one made from another server's store (a
        # documents.sqlite3 copied in on its own) is refused even where the sequences would pass.
        self._w.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)", (uuid.uuid4().hex,))
        self.store_id: str = self._w.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("PRAGMA foreign_keys=ON")
        with self._all_lock:
            self._all.append(con)
        return con

    def _r(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._connect()
            self._local.con = con
        return con

    def close(self) -> None:
        with self._all_lock:
            for con in self._all:
                try:
                    con.close()
                except sqlite3.Error:
                    pass
            self._all.clear()

    # -- writes -------------------------------------------------------------------------------------
    def upsert(self, docs: list[NewDocument]) -> tuple[list[int], int, int, list[int]]:
        """Insert or replace; returns (labels in input order, number replaced, last sequence, retired labels).

        A replaced document gets a NEW label (its old row is deleted, its old label retired and
        logged as a delete): the HNSW graph then only ever inserts and marks deleted, never
        updates a vector in place — hnswlib's in-place update can leave an element unreachable
        after heavy churn on similar vectors.
        """
        with self._write_lock:
            con = self._w
            con.execute("BEGIN IMMEDIATE")
            try:
                labels: list[int] = []
                retired: list[int] = []
                replaced = 0
                seq = 0
                for d in docs:
                    row = con.execute("SELECT label FROM documents WHERE id = ?", (d.id,)).fetchone()
                    if row is not None:
                        replaced += 1
                        retired.append(int(row[0]))
                        con.execute("DELETE FROM documents WHERE label = ?", (row[0],))
                        con.execute("INSERT INTO changes (op, label, doc_id) VALUES ('delete', ?, ?)", (row[0], d.id))
                    cur = con.execute(
                        "INSERT INTO documents (id, title, text, metadata, token_ids, vector, seq) VALUES (?,?,?,?,?,?,0)",
                        (d.id, d.title, d.text, json.dumps(d.metadata, sort_keys=True), _ids_blob(d.token_ids), _vec_blob(d.vector)),
                    )
                    label = cur.lastrowid
                    seq = con.execute("INSERT INTO changes (op, label, doc_id) VALUES ('upsert', ?, ?)", (label, d.id)).lastrowid
                    con.execute("UPDATE documents SET seq=? WHERE label=?", (seq, label))
                    labels.append(int(label))
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise
            return labels, replaced, int(seq), retired

    def delete(self, ids: list[str]) -> tuple[list[int], list[str], int]:
        """Returns (deleted labels, ids not found, last sequence)."""
        with self._write_lock:
            con = self._w
            con.execute("BEGIN IMMEDIATE")
            try:
                labels, missing = [], []
                for doc_id in ids:
                    row = con.execute("SELECT label FROM documents WHERE id = ?", (doc_id,)).fetchone()
                    if row is None:
                        missing.append(doc_id)
                        continue
                    con.execute("DELETE FROM documents WHERE label = ?", (row[0],))
                    con.execute("INSERT INTO changes (op, label, doc_id) VALUES ('delete', ?, ?)", (row[0], doc_id))
                    labels.append(int(row[0]))
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise
            return labels, missing, self.last_seq()

    def set_token_ids(self, rows: Iterable[tuple[int, np.ndarray]]) -> None:
        """Rewrite cached passage ids (after a reranker tokenizer change). Not a logical change."""
        with self._write_lock:
            con = self._w
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany("UPDATE documents SET token_ids=? WHERE label=?", ((_ids_blob(t), lb) for lb, t in rows))
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise

    def checkpoint(self) -> bool:
        """Copy the write-ahead log into ``documents.sqlite3`` (PASSIVE: never waits for a reader,
        so it never stalls writes), so the main file alone holds every commit: a copy of the data
        dir that misses the ``-wal`` file (a review restored one that lost 47 writes and brought
        back 30 deleted documents) then misses nothing written before this. True when every
        frame was copied; False when a reader (an online backup, a search) still needed some."""
        with self._write_lock:
            _busy, frames, copied = self._w.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return frames == copied

    def set_meta(self, key: str, value: str) -> None:
        with self._write_lock:
            self._w.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def prune_changes(self, through: int) -> int:
        """Drop the change-log rows at or below ``through``; returns how many went.

        Only deletes are ever read back from the log (upserts are found through ``documents.seq``),
        and only by readers positioned after some sequence: the snapshot replay, the BM25 index, a
        graph rebuild. The pipeline passes the snapshot it just saved (the restart's position) and
        never prunes during a graph rebuild; a reader from before the horizon (``pruned_through``)
        gets :class:`ChangesPruned`. The newest row always stays, so
        ``last_seq`` never moves back. Runs in batches, one transaction each, with the horizon
        written in the same transaction as the rows it covers."""
        removed = 0
        while True:
            with self._write_lock:
                con = self._w
                con.execute("BEGIN IMMEDIATE")
                try:
                    last = int(con.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])
                    upto = min(int(through), last - 1)
                    if upto <= self._pruned_through(con):
                        con.execute("COMMIT")
                        return removed
                    row = con.execute("SELECT seq FROM changes WHERE seq <= ? ORDER BY seq LIMIT 1 OFFSET ?",
                                      (upto, PRUNE_BATCH)).fetchone()
                    horizon = upto if row is None else int(row[0]) - 1
                    removed += con.execute("DELETE FROM changes WHERE seq <= ?", (horizon,)).rowcount
                    con.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                                (PRUNED_KEY, str(horizon)))
                    con.execute("COMMIT")
                except BaseException:
                    _rollback(con)
                    raise

    @staticmethod
    def _pruned_through(con: sqlite3.Connection) -> int:
        row = con.execute("SELECT value FROM meta WHERE key = ?", (PRUNED_KEY,)).fetchone()
        return int(row[0]) if row else 0

    def pruned_through(self) -> int:
        """The change log holds nothing at or below this sequence (0: never pruned)."""
        return self._pruned_through(self._r())

    def change_log_rows(self) -> int:
        return int(self._r().execute("SELECT COUNT(*) FROM changes").fetchone()[0])

    def get_meta(self, key: str) -> str | None:
        row = self._r().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # -- reads ----------------------------------------------------------------------------------------
    def fetch(self, labels: list[int]) -> dict[int, StoredDocument]:
        """Documents by label (missing = deleted meanwhile), one statement per 500 labels (a Search
        reads at most its candidates; a write between two statements only changes which version of
        a candidate is reranked)."""
        out: dict[int, StoredDocument] = {}
        if not labels:
            return out
        con = self._r()
        for chunk in _chunks(labels, 500):
            q = f"SELECT label, id, title, text, metadata, token_ids FROM documents WHERE label IN ({','.join('?' * len(chunk))})"
            for label, doc_id, title, text, meta, tok in con.execute(q, chunk):
                out[label] = StoredDocument(label, doc_id, title, text, json.loads(meta), _blob_ids(tok))
        return out

    def get(self, ids: list[str]) -> tuple[dict[str, StoredDocument], int]:
        """Documents by id (absent: not stored) and the sequence of the last change the read
        reflects, all in one read transaction: a write committed meanwhile is wholly in or out.
        Token ids and vectors are not read."""
        out: dict[str, StoredDocument] = {}
        con = self._r()
        _rollback(con)  # a read cut short earlier on this thread's connection would make BEGIN fail
        con.execute("BEGIN")
        try:
            for chunk in _chunks(ids, 500):
                q = f"SELECT label, id, title, text, metadata FROM documents WHERE id IN ({','.join('?' * len(chunk))})"
                for label, doc_id, title, text, meta in con.execute(q, chunk):
                    out[doc_id] = StoredDocument(label, doc_id, title, text, json.loads(meta), None)
            seq = int(con.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
        return out, seq

    def unchanged(self, docs: Iterable[tuple[str, str, str, dict[str, str]]]) -> set[str]:
        """Of (id, title, text, metadata), the ids whose stored document is exactly that."""
        want = {doc_id: (title, text, json.dumps(meta, sort_keys=True)) for doc_id, title, text, meta in docs}
        same: set[str] = set()
        con = self._r()
        for chunk in _chunks(list(want), 500):
            q = f"SELECT id, title, text, metadata FROM documents WHERE id IN ({','.join('?' * len(chunk))})"
            for doc_id, title, text, meta in con.execute(q, chunk):
                if want[doc_id] == (title, text, meta):
                    same.add(doc_id)
        return same

    def labels_for(self, ids: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        con = self._r()
        for chunk in _chunks(ids, 500):
            q = f"SELECT id, label FROM documents WHERE id IN ({','.join('?' * len(chunk))})"
            out.update(dict(con.execute(q, chunk).fetchall()))
        return out

    def vectors(self, dim: int, after_seq: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(labels, vectors) of live documents changed after ``after_seq`` (all by default)."""
        if after_seq > 0:  # a replay or catch-up: usually a few rows, found through the seq index
            rows = self._r().execute("SELECT label, vector FROM documents INDEXED BY documents_seq WHERE seq > ?",
                                     (after_seq,)).fetchall()
            rows.sort(key=lambda r: r[0])
        else:  # everything: one pass over the table in label order
            rows = self._r().execute("SELECT label, vector FROM documents ORDER BY label").fetchall()
        return _label_vectors(rows, dim)

    def vectors_for(self, labels: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels found, vectors) for these labels, in label order; deleted labels are left out.
        About 5 us per vector (the exact scan of a filtered dense search)."""
        con = self._r()
        rows: list = []
        for chunk in _chunks([int(x) for x in labels], 500):
            rows += con.execute(f"SELECT label, vector FROM documents WHERE label IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        rows.sort(key=lambda r: r[0])
        return _label_vectors(rows, dim)

    def texts(self) -> tuple[np.ndarray, list[str]]:
        rows = self._r().execute("SELECT label, title, text FROM documents ORDER BY label").fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64), [join_title(r[1], r[2]) for r in rows]

    def metadata(self) -> tuple[list[int], list[dict[str, str]]]:
        """(labels, metadata) of every document that has metadata (the filter index's source)."""
        rows = self._r().execute("SELECT label, metadata FROM documents WHERE metadata != '{}' ORDER BY label").fetchall()
        return [int(r[0]) for r in rows], [json.loads(r[1]) for r in rows]

    def deletes_after(self, seq: int) -> list[int]:
        """Labels deleted after ``seq`` and not re-created since (for snapshot replay and catch-up).

        Raises :class:`ChangesPruned` when the log was pruned past ``seq``. ``seq`` 0 is always
        answered: it means "from an empty index" (BM25 starting over, a snapshot of an empty
        graph), which needs no deletes; a graph rebuild that started at 0 saw an empty store,
        whose horizon is 0, and holds the compaction lock that pruning waits out. The horizon
        and the rows are read in one transaction."""
        con = self._r()
        own = not con.in_transaction
        if own:
            con.execute("BEGIN")
        try:
            pruned = self._pruned_through(con)
            if 0 < seq < pruned:
                raise ChangesPruned(f"the change log is pruned through seq {pruned}; it cannot replay from seq {seq}")
            rows = con.execute(
                "SELECT DISTINCT c.label FROM changes c WHERE c.seq > ? AND c.op = 'delete' "
                "AND NOT EXISTS (SELECT 1 FROM documents d WHERE d.label = c.label)", (seq,)
            ).fetchall()
        finally:
            if own and con.in_transaction:
                con.execute("ROLLBACK")  # a read
        return [r[0] for r in rows]

    def text_changes_after(self, seq: int) -> tuple[int, np.ndarray, list[str], list[int]]:
        """(last sequence, labels and texts of live documents changed after ``seq`` in label order,
        labels deleted after ``seq``), read in one transaction: one consistent point of the log.

        Labels are never reused (AUTOINCREMENT; a replaced document gets a new label), so a
        deleted label is final and the changed labels are all greater than any seen before.
        Raises :class:`ChangesPruned` when the log no longer reaches back to ``seq``: see
        :meth:`text_changes_and_live_after`."""
        return self._text_changes(seq, live=False)

    def text_changes_and_live_after(self, seq: int) -> tuple[int, np.ndarray, list[str], np.ndarray]:
        """For a reader the change log was pruned past: as :meth:`text_changes_after`, but the
        last element is every live label (ascending) instead of the deletes. The reader drops
        whatever it holds that is not among them; no text is read again."""
        return self._text_changes(seq, live=True)

    def _text_changes(self, seq: int, live: bool):
        con = self._r()
        if con.in_transaction:  # left open by an earlier failure on this thread's connection
            con.execute("ROLLBACK")
        con.execute("BEGIN")
        try:
            last = int(con.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])
            # INDEXED BY: without it SQLite walks the whole table in label order (12 ms at 20k rows).
            rows = con.execute("SELECT label, title, text FROM documents INDEXED BY documents_seq WHERE seq > ?",
                               (seq,)).fetchall()
            rows.sort(key=lambda r: r[0])
            if live:
                gone = np.fromiter((r[0] for r in con.execute("SELECT label FROM documents ORDER BY label")), dtype=np.int64)
            else:
                gone = [int(lb) for lb in self.deletes_after(seq)]  # same connection: inside this transaction
        finally:
            if con.in_transaction:
                con.execute("ROLLBACK")  # a read: nothing to keep, and it cannot fail like COMMIT
        return (last, np.asarray([r[0] for r in rows], dtype=np.int64), [join_title(r[1], r[2]) for r in rows], gone)

    def labels_changed_at_or_before(self, seq: int) -> list[int]:
        """Live labels whose latest change is covered by a snapshot at ``seq``."""
        return [r[0] for r in self._r().execute("SELECT label FROM documents WHERE seq <= ?", (seq,))]

    def iter_token_ids(self) -> list[tuple[int, str, str]]:
        return self._r().execute("SELECT label, title, text FROM documents ORDER BY label").fetchall()

    def count(self) -> int:
        return int(self._r().execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    def last_seq(self) -> int:
        return int(self._r().execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())


def _rollback(con: sqlite3.Connection) -> None:
    """Roll back, keeping the caller's error: after a disk-full or I/O error SQLite has often
    rolled the transaction back itself, and a bare ROLLBACK would then raise "no transaction is
    active" in place of the error that says what went wrong."""
    if con.in_transaction:
        con.execute("ROLLBACK")


def _label_vectors(rows: list, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(label, vector blob)`` rows -> (labels int64 [n], vectors float32 [n, dim])."""
    labels = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    if not rows:
        return labels, np.zeros((0, dim), np.float32)
    return labels, np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)


def _chunks(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i : i + n]


def _vec_blob(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype=np.float32).tobytes()


def _ids_blob(t: np.ndarray | None) -> bytes | None:
    return None if t is None else np.ascontiguousarray(t, dtype=np.int32).tobytes()


def _blob_ids(b: bytes | None) -> np.ndarray | None:
    return None if b is None else np.frombuffer(b, dtype=np.int32)
