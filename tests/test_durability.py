"""Durability with real processes: ``rerankd serve`` subprocesses killed with SIGKILL mid-write.

* every acknowledged Upsert/UpsertStream/Delete survives ``kill -9`` (latest acknowledged version,
  deletes stay deleted; the one call in flight at the kill may land either way), checked through
  BM25 and dense search by exact text, Search include_text and Stats;
* a corrupt or missing ``hnsw/index.bin`` is detected and rebuilt with identical results; a restart
  without changes loads the snapshot (no rebuild, nothing replayed);
* Search during a bulk ``rerankd index`` returns only whole documents and never an error;
* ``rerankd index`` stops at a malformed line, naming it, with the valid lines before it committed.

The default suite runs 2 kill trials; ``-m slow`` runs 20 more.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rerankd.cli import main as cli_main
from rerankd.client import Client

VOCAB = (
    "apple river stone cloud signal garden copper lantern meadow orbit velvet harbor quartz ember "
    "falcon glacier hollow island jasmine kettle lemon marble nectar oyster pepper quiver raven "
    "saddle timber umbrella violet walnut yonder zephyr anchor beacon canyon delta engine forest "
    "granite harvest iron jungle kernel ladder magnet needle ocean paddle quarry ribbon silver "
    "thunder valley window yellow basket candle dragon feather guitar hammer insect jacket kitten "
    "lizard mirror napkin onion parrot rocket spider tomato unicorn vessel wagon puzzle bridge castle "
    "desert eagle fabric glove helmet igloo jigsaw koala llama mango nickel olive pencil rabbit salmon "
    "tulip turtle violin whale yogurt zebra acorn bamboo cactus dolphin"
).split()


def make_text(doc_id: str, version: int) -> str:
    """Short, distinct text per (id, version): '<id> version <v> marker <idv> <8 words>'."""
    r = random.Random(f"{doc_id}/{version}")
    return f"{doc_id} version {version} marker {doc_id.replace('-', '')}v{version} " + " ".join(r.sample(VOCAB, 8))


_TEXT = re.compile(r"^(\S+) version (\d+) ")


def whole_document(doc_id: str, text: str) -> bool:
    """The text is exactly one version of this id's text (not torn, not another document's)."""
    m = _TEXT.match(text)
    return bool(m) and m.group(1) == doc_id and text == make_text(doc_id, int(m.group(2)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    """``python -m rerankd.cli serve`` on a fixed data dir; each start gets a new port and log."""

    def __init__(self, models_dir: Path, data_dir: Path, *extra: str) -> None:
        self.models_dir, self.data_dir, self.extra = models_dir, data_dir, extra
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.port = 0
        self.log_path: Path | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> "ServerProc":
        self.port = _free_port()
        self.starts += 1
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server-{self.starts}.log"
        cmd = [sys.executable, "-m", "rerankd.cli", "serve", "--listen", self.target, "--models-dir", str(self.models_dir),
               "--data-dir", str(self.data_dir), "--no-warmup", "--grace-period-s", "2", *self.extra]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        t_end = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > t_end:
                    self.kill9()
                    raise AssertionError(f"server not SERVING after {timeout} s:\n{self.log()}")
                time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """Graceful: SIGTERM (drain, save the snapshot)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(60) == 0, self.log()
            except subprocess.TimeoutExpired:
                self.kill9()
                raise


@pytest.fixture()
def servers():
    started: list[ServerProc] = []
    yield started
    for s in started:
        s.kill9()


# -- kill -9 trials ---------------------------------------------------------------------------------
ABSENT = None


class Writer(threading.Thread):
    """Streams upserts and deletes one call at a time, recording what was acknowledged.

    ``acked[id]`` is the latest acknowledged version (ABSENT after an acknowledged delete);
    ``inflight[id]`` lists the states the call that failed (at the kill) would have set, in order
    (a stream may have committed some of its batches).
    """

    def __init__(self, target: str, rng: random.Random, acked: dict[str, int | None], versions: dict[str, int],
                 ids: list[str], killed: threading.Event) -> None:
        super().__init__(daemon=True)
        self.target, self.rng, self.acked, self.versions, self.ids, self.killed = target, rng, acked, versions, ids, killed
        self.inflight: dict[str, list[int | None]] = {}
        self.calls = 0
        self.error: BaseException | None = None
        self.error_before_kill = False

    def _new(self, doc_id: str) -> dict:
        self.versions[doc_id] = self.versions.get(doc_id, 0) + 1
        v = self.versions[doc_id]
        self.inflight.setdefault(doc_id, []).append(v)
        return {"id": doc_id, "text": make_text(doc_id, v)}

    def run(self) -> None:
        rng = self.rng
        with Client(self.target, timeout=60) as c:
            while True:
                self.inflight = {}
                op = rng.choices(["upsert", "stream", "delete"], weights=[4, 3, 2])[0]
                try:
                    if op == "upsert":
                        c.upsert([self._new(i) for i in rng.sample(self.ids, rng.randint(1, 4))])
                    elif op == "stream":
                        batches = [[self._new(i) for i in rng.sample(self.ids, rng.randint(1, 3))] for _ in range(rng.randint(2, 3))]
                        # Several batches may repeat an id: the last batch's version wins.
                        c.upsert_stream(batches)
                    else:
                        ids = rng.sample(self.ids, rng.randint(1, 2))
                        for i in ids:
                            self.inflight[i] = [ABSENT]
                        c.delete(ids)
                except BaseException as e:  # the kill (UNAVAILABLE) ends the trial; anything earlier fails it
                    self.error = e
                    self.error_before_kill = not self.killed.is_set()
                    return
                self.acked.update({i: states[-1] for i, states in self.inflight.items()})
                self.inflight = {}
                self.calls += 1


def observe(c: Client, doc_id: str, versions: set[int]) -> int | None:
    """The version of ``doc_id`` the server holds, probed by exact-text BM25 search; None = absent."""
    seen = None
    for v in sorted(versions):
        hits = c.search(make_text(doc_id, v), first_stage="bm25", rerank=False, top_n=5, candidates=5, include_text=True)
        for h in hits:
            assert whole_document(h["id"], h["text"]), h
            if h["id"] == doc_id:
                got = int(_TEXT.match(h["text"]).group(2))
                assert seen in (None, got), (doc_id, seen, got)
                seen = got
    return seen


def check_graph_matches_store(data_dir: Path) -> tuple[str, set[str]]:
    """Before a restart: load the HNSW snapshot and replay the store exactly as the server is
    about to, and compare the graph with the store. Every live document must be in it, not
    marked deleted, with its stored vector bit for bit; nothing else may be live. This is the
    torn-snapshot check, independent of HNSW recall.

    Returns (loaded | rebuilt, ids of documents present but unreachable by a search for their own
    vector): hnswlib's in-place updates and deleted entries can leave a live element without
    in-links (nmslib/hnswlib#522) -- a recall limitation, not a lost write."""
    import numpy as np

    from rerankd import snapshot
    from rerankd.config import IndexConfig
    from rerankd.store import DocumentStore

    cfg = IndexConfig()
    store = DocumentStore(data_dir / "documents.sqlite3")
    try:
        mf = snapshot.info(data_dir / "hnsw")
        dim = json.loads((data_dir / "hnsw" / "manifest.json").read_text())["dim"] if mf else 384
        idx, _, how = snapshot.load_or_rebuild(store, data_dir / "hnsw", dim, m=cfg.hnsw_m,
                                               ef_construction=cfg.ef_construction, ef_search=cfg.ef_search)
        labels, vecs = store.vectors(dim)
        live = set(labels.tolist())
        assert idx.labels() == live, ("live labels differ", sorted(idx.labels() ^ live))
        if len(labels):
            got = idx._index.get_items(labels.tolist(), return_type="numpy")  # raises if one is marked deleted
            stale = [int(lb) for lb, a, b in zip(labels, got, vecs) if not np.array_equal(a, b)]
            assert not stale, f"graph holds stale vectors for labels {stale}"
        for lb in idx._index.get_ids_list():
            if lb not in live:
                with pytest.raises(RuntimeError):  # a deleted document must be marked deleted
                    idx._index.get_items([lb])
        orphans = [int(lb) for lb, v in zip(labels, vecs) if idx.search(v, 1)[0].tolist()[:1] != [lb]]
        return how, {d.id for d in store.fetch(orphans).values()}
    finally:
        store.close()


def verify(target: str, acked: dict[str, int | None], inflight: dict[str, list[int | None]],
           versions: dict[str, int], orphans: set[str] = frozenset()) -> dict[str, int | None]:
    """Check the restarted server against what was acknowledged; returns the state it holds."""
    state: dict[str, int | None] = {}
    with Client(target, timeout=120) as c:
        for doc_id in sorted(set(acked) | set(inflight)):
            allowed = {acked.get(doc_id, ABSENT), *inflight.get(doc_id, ())}
            # Probe with every version the document ever had: a lost update or a resurrected
            # delete shows up as a version outside ``allowed``.
            got = observe(c, doc_id, set(range(1, versions.get(doc_id, 0) + 1)))
            assert got in allowed, f"{doc_id}: server has version {got}, acknowledged {acked.get(doc_id)}, in flight {inflight.get(doc_id, '-')}"
            state[doc_id] = got
        present = {i: v for i, v in state.items() if v is not ABSENT}
        assert c.stats().documents == len(present), (c.stats().documents, len(present))
        # Dense first stage: every present document is the exact nearest neighbour of its own text
        # (a graph missing it or holding a stale vector fails this), and deleted ones never appear.
        # HNSW orphans (proven present with the right vector by check_graph_matches_store) are
        # the one allowed miss.
        for doc_id, v in sorted(present.items()):
            hits = c.search(make_text(doc_id, v), first_stage="dense", rerank=False, top_n=3, candidates=3, include_text=True)
            if doc_id in orphans and (not hits or hits[0]["id"] != doc_id):
                continue
            assert hits and hits[0]["id"] == doc_id and hits[0]["text"] == make_text(doc_id, v), (doc_id, v, hits[:1])
            assert hits[0]["first_stage_score"] > 0.999, (doc_id, hits[0])
        for doc_id in sorted(i for i, v in state.items() if v is ABSENT and versions.get(i)):
            hits = c.search(make_text(doc_id, versions[doc_id]), first_stage="dense", rerank=False, top_n=3, candidates=3)
            assert doc_id not in {h["id"] for h in hits}, (doc_id, hits)
    return state


def run_kill_trials(models_dir: Path, data_dir: Path, servers: list, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    ids = [f"doc-{i}" for i in range(40)]
    acked: dict[str, int | None] = {}
    versions: dict[str, int] = {}
    srv = ServerProc(models_dir, data_dir, "--snapshot-every", "5")
    servers.append(srv)
    srv.start()
    total_calls = total_orphans = 0
    for trial in range(trials):
        killed = threading.Event()
        w = Writer(srv.target, rng, acked, versions, ids, killed)
        w.start()
        time.sleep(rng.uniform(0.3, 2.5))
        killed.set()
        srv.kill9()
        w.join(120)
        assert not w.is_alive()
        assert not w.error_before_kill, f"trial {trial}: a call failed before the kill: {w.error!r}\n{srv.log()}"
        total_calls += w.calls
        try:
            how, orphans = check_graph_matches_store(data_dir)
        except AssertionError as e:
            raise AssertionError(f"trial {trial} (seed {seed}): HNSW snapshot + replay != store: {e}\n{srv.log()}") from None
        srv.start()
        log = srv.log()
        how += " (interrupted save completed)" if "interrupted between its renames" in log else ""
        how += "".join(f" ({m})" for m in re.findall(r"HNSW snapshot unusable \((.*)\); rebuilding", log))
        print(f"trial {trial}: {w.calls} calls acknowledged, in flight at the kill: {w.inflight or '-'}, "
              f"HNSW {how}, unreachable (HNSW orphans): {sorted(orphans) or '-'}")
        total_orphans += len(orphans)
        try:
            state = verify(srv.target, acked, w.inflight, versions, orphans)
        except AssertionError as e:
            raise AssertionError(f"trial {trial} (seed {seed}): {e}\n--- server log ---\n{srv.log()}") from None
        # What the server holds now is durable: the baseline for the next trial.
        acked.clear()
        acked.update(state)
    srv.stop()
    assert total_calls > 0
    assert sum(v is not ABSENT for v in acked.values()) > 0
    assert total_orphans <= trials * 2, f"{total_orphans} unreachable documents in {trials} restarts: HNSW recall degraded"


def test_kill9_keeps_every_acknowledged_write(models_dir, tmp_path, servers):
    run_kill_trials(models_dir, tmp_path / "data", servers, trials=2, seed=int(os.environ.get("RERANKD_DURABILITY_SEED", "1")))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_kill9_many_trials(models_dir, tmp_path, servers):
    seed = int(os.environ.get("RERANKD_DURABILITY_SEED", str(int(time.time()))))
    print(f"seed {seed}")
    run_kill_trials(models_dir, tmp_path / "data", servers, trials=int(os.environ.get("RERANKD_DURABILITY_TRIALS", "20")), seed=seed)


# -- HNSW snapshot: corrupt / missing / unchanged restart -----------------------------------------------
QUERIES = ["apple river stone", "thunder valley window", "doc-3 version 1", "granite harvest iron jungle", "violin whale"]


def _dense_results(target: str) -> list[list[tuple[str, float]]]:
    with Client(target, timeout=60) as c:
        return [[(h["id"], h["score"]) for h in c.search(q, first_stage="dense", rerank=False, top_n=10, candidates=10)]
                for q in QUERIES]


def _same(got: list[list[tuple[str, float]]], want: list[list[tuple[str, float]]]) -> bool:
    return all(
        [i for i, _ in g] == [i for i, _ in w] and all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(g, w))
        for g, w in zip(got, want, strict=True)
    )


def _manifest(data: Path) -> dict:
    return json.loads((data / "hnsw" / "manifest.json").read_text())


def test_snapshot_corrupt_missing_and_unchanged_restart(models_dir, tmp_path, servers):
    data = tmp_path / "data"
    srv = ServerProc(models_dir, data)
    servers.append(srv)
    srv.start()
    with Client(srv.target, timeout=120) as c:
        c.upsert([{"id": f"doc-{i}", "text": make_text(f"doc-{i}", 1)} for i in range(24)])
        c.delete(["doc-5"])
        seq = c.stats().sequence
        want = _dense_results(srv.target)
        comp = c.compact()  # rebuild without the deleted entry + snapshot, under the write path's locks
        assert (comp.snapshot_sequence, comp.documents) == (seq, 23)
        st = c.stats()
        assert (st.deleted_not_compacted, st.snapshot_sequence) == (0, seq)
    assert _same(_dense_results(srv.target), want)
    srv.stop()
    assert srv.log().count(f"HNSW snapshot saved at seq {seq}") == 1  # by Compact; shutdown had nothing new
    mf = _manifest(data)
    assert mf["sequence"] == seq and mf["live"] == 23

    # A restart without changes loads the snapshot: nothing rebuilt or replayed, and the
    # unchanged snapshot is not rewritten at shutdown.
    srv.start()
    assert f"HNSW snapshot at seq {seq} loaded; replayed 0 upserts" in srv.log()
    assert "rebuilding" not in srv.log()
    with Client(srv.target) as c:
        st = c.stats()
        assert (st.documents, st.sequence, st.snapshot_sequence) == (23, seq, seq)
    assert _same(_dense_results(srv.target), want)
    srv.stop()
    assert _manifest(data)["created_at"] == mf["created_at"]

    # Corrupt index.bin (same size, bytes flipped): the checksum catches it -> rebuilt from the
    # stored vectors, identical results, and a good snapshot is written again.
    idx = data / "hnsw" / "index.bin"
    raw = bytearray(idx.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(b ^ 0xFF for b in raw[mid : mid + 64])
    idx.write_bytes(bytes(raw))
    srv.start()
    log = srv.log()
    assert "checksum mismatch" in log and "rebuilding from stored vectors" in log, log
    assert _same(_dense_results(srv.target), want)
    with Client(srv.target) as c:
        assert c.stats().documents == 23
    srv.stop()
    assert _manifest(data)["sha256"] == hashlib.sha256(idx.read_bytes()).hexdigest()
    srv.start()
    assert f"HNSW snapshot at seq {seq} loaded; replayed 0 upserts" in srv.log(), srv.log()
    srv.stop()

    # Missing index.bin -> rebuilt, identical results.
    idx.unlink()
    srv.start()
    assert "HNSW snapshot unusable (missing)" in srv.log()
    assert _same(_dense_results(srv.target), want)
    srv.stop()

    # Deleted entries outnumbering live ones (hnswlib then leaves live elements unreachable):
    # a snapshot saved like that is compacted before serving, and a running server compacts
    # in the background.
    srv.extra = ("--auto-compact-ratio", "0")
    srv.start()
    with Client(srv.target) as c:
        c.delete([f"doc-{i}" for i in range(15) if i != 5])
        assert c.stats().deleted_not_compacted == 14
    srv.stop()
    srv.extra = ()
    srv.start()
    assert "deleted entries for 9 documents: rebuilding it before serving" in srv.log(), srv.log()
    with Client(srv.target) as c:
        assert (c.stats().documents, c.stats().deleted_not_compacted) == (9, 0)
        c.delete([f"doc-{i}" for i in range(15, 20)])
        t_end = time.monotonic() + 60
        while c.stats().deleted_not_compacted and time.monotonic() < t_end:
            time.sleep(0.2)
        assert (c.stats().documents, c.stats().deleted_not_compacted) == (4, 0)
        for i in range(20, 24):
            hits = c.search(make_text(f"doc-{i}", 1), first_stage="dense", rerank=False, top_n=1, candidates=1)
            assert hits[0]["id"] == f"doc-{i}" and hits[0]["score"] > 0.999
    srv.stop()
    assert "HNSW graph compacted in the background: 5 deleted entries dropped, 4 documents" in srv.log(), srv.log()


# -- concurrent Search during a bulk ingest ----------------------------------------------------------------
def test_search_during_bulk_ingest_sees_whole_documents(models_dir, tmp_path, servers):
    n_ids, n_versions = 40, 3
    path = tmp_path / "bulk.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for v in range(1, n_versions + 1):
            for i in range(n_ids):
                f.write(json.dumps({"_id": f"doc-{i}", "text": make_text(f"doc-{i}", v), "metadata": {"v": str(v)}}) + "\n")
    srv = ServerProc(models_dir, tmp_path / "data")
    servers.append(srv)
    srv.start()

    stop = threading.Event()
    seen: list[int] = []
    errors: list[str] = []

    def searcher() -> None:
        rng = random.Random(7)
        with Client(srv.target, timeout=60) as c:
            while not stop.is_set():
                i, v = rng.randrange(n_ids), rng.randint(1, n_versions)
                stage = rng.choice(["bm25", "dense", "hybrid"])
                try:
                    hits = c.search(make_text(f"doc-{i}", v), first_stage=stage, rerank=rng.random() < 0.2,
                                    top_n=5, candidates=5, include_text=True, include_metadata=True)
                except grpc.RpcError as e:
                    errors.append(f"{stage}: {e.code().name}: {e.details()}")
                    continue
                for h in hits:
                    if not whole_document(h["id"], h["text"]) or h["metadata"].get("v") != _TEXT.match(h["text"]).group(2):
                        errors.append(f"torn hit {h}")
                seen.append(len(hits))

    t = threading.Thread(target=searcher, daemon=True)
    t.start()
    proc = subprocess.run([sys.executable, "-m", "rerankd.cli", "index", str(path), "--target", srv.target, "--batch-size", "8"],
                          capture_output=True, text=True, timeout=600)
    stop.set()
    t.join(60)
    assert proc.returncode == 0, proc.stderr
    total = n_ids * n_versions
    m = re.search(r"indexed (\d+) documents \((\d+) replaced, \d+ unchanged\) in ([\d.]+) s: ([\d.]+) docs/s", proc.stdout)
    assert m and int(m.group(1)) == total and int(m.group(2)) == total - n_ids, proc.stdout
    assert not errors, errors[:5]
    assert len(seen) >= 5 and any(seen), seen  # searches ran during the ingest, some with hits
    with Client(srv.target) as c:
        assert c.stats().documents == n_ids
        for i in range(0, n_ids, 7):
            hits = c.search(make_text(f"doc-{i}", n_versions), first_stage="bm25", rerank=False, top_n=1, candidates=1, include_text=True)
            assert hits[0]["id"] == f"doc-{i}" and hits[0]["text"] == make_text(f"doc-{i}", n_versions)
    srv.stop()


# -- rerankd index: malformed input --------------------------------------------------------------------------
def _good(case: str, i: int) -> bytes:
    return (json.dumps({"_id": f"{case}-{i}", "title": "t", "text": make_text(f"{case}-{i}", 1)}) + "\n").encode()


# (case, the bad line's bytes, its 1-based line number, reason fragment)
BAD_LINES = [
    ("json", b'{"_id": "x", "text": "unterminated\n', 4, "bad JSON"),
    ("utf8", b'{"_id": "y", "text": "bad \xff\xfe bytes"}\n', 3, "invalid UTF-8"),
    ("notext", b'{"_id": "z", "title": "   "}\n', 5, 'missing "text"'),
    ("emptytext", b'{"_id": "z", "text": "   "}\n', 2, 'empty "text"'),
    ("noid", b'{"text": "a document without an id"}\n', 3, "missing id"),
    ("meta", b'{"_id": "z", "text": "ok", "metadata": {"n": 3}}\n', 4, "metadata value"),
    ("first", b'not json at all\n', 1, "bad JSON"),
]


def test_a_title_alone_is_a_document_as_the_server_takes_it():
    """Abstract-less corpus rows (TREC-COVID has them) are ingested as their title, like Upsert
    takes them; only a row with neither text nor title is refused (found by a review)."""
    from rerankd import config as cfg
    from rerankd.ingest import LineError, parse_line

    limits = cfg.LimitsConfig()
    for raw in (b'{"_id": "a", "title": "COVID-19 in children", "text": ""}',
                b'{"_id": "a", "title": "COVID-19 in children"}',
                b'{"_id": "a", "title": "COVID-19 in children", "text": null}'):
        d = parse_line(raw, 1, limits)
        assert d is not None and (d.id, d.title, d.text) == ("a", "COVID-19 in children", ""), raw
    for raw, why in ((b'{"_id": "a", "title": " ", "text": " "}', 'empty "text"'),
                     (b'{"_id": "a", "title": "t", "text": 3}', '"text" must be a string')):
        with pytest.raises(LineError, match=why):
            parse_line(raw, 1, limits)


@pytest.fixture(scope="module")
def ingest_server(models_dir, tmp_path_factory):
    srv = ServerProc(models_dir, tmp_path_factory.mktemp("ingest") / "data")
    srv.start()
    yield srv
    srv.kill9()


def _write_case(path: Path, case: str, bad: bytes, lineno: int) -> int:
    """Valid lines (one blank among them when there is room), the bad line at ``lineno``, one valid line after."""
    lines, good = [], 0
    while len(lines) < lineno - 1:
        if len(lines) == 1 and lineno > 3:
            lines.append(b"\n")
        else:
            lines.append(_good(case, good))
            good += 1
    lines.append(bad)
    lines.append(_good(case, 99))
    path.write_bytes(b"".join(lines))
    return good


@pytest.mark.parametrize("case,bad,lineno,reason", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_index_stops_at_malformed_line(ingest_server, tmp_path, capsys, case, bad, lineno, reason):
    path = tmp_path / f"{case}.jsonl"
    good = _write_case(path, case, bad, lineno)
    with Client(ingest_server.target) as c:
        before = c.stats().documents
    rc = cli_main(["index", str(path), "--target", ingest_server.target, "--batch-size", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0
    assert f"{path}:{lineno}: " in err and reason in err, err
    assert f"stopped at line {lineno}: {good} documents were committed" in err, err
    with Client(ingest_server.target) as c:
        assert c.stats().documents == before + good
        for i in range(good):
            hits = c.search(make_text(f"{case}-{i}", 1), first_stage="bm25", rerank=False, top_n=1, candidates=1)
            assert hits and hits[0]["id"] == f"{case}-{i}"
        after = c.search(make_text(f"{case}-99", 1), first_stage="bm25", rerank=False, top_n=3, candidates=3)
        assert f"{case}-99" not in {h["id"] for h in after}


def test_index_embedded_commits_valid_lines_before_bad_one(models_dir, tmp_path, capsys):
    """Without --target: an embedded server on the serve flags; committed lines are in the store."""
    path = tmp_path / "in.jsonl"
    good = _write_case(path, "emb", b'{"_id": "bad", "text": ""}\n', 6)
    data = tmp_path / "data"
    rc = cli_main(["index", str(path), "--models-dir", str(models_dir), "--data-dir", str(data), "--no-warmup",
                   "--batch-size", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and f"stopped at line 6: {good} documents were committed" in err, err
    con = sqlite3.connect(data / "documents.sqlite3")
    try:
        ids = sorted(r[0] for r in con.execute("SELECT id FROM documents"))
    finally:
        con.close()
    assert ids == sorted(f"emb-{i}" for i in range(good))
    # graceful stop of the embedded server wrote a snapshot covering them
    assert json.loads((data / "hnsw" / "manifest.json").read_text())["live"] == good


# -- snapshot files: interrupted save, torn or foreign snapshots (in-process, no models) -----------------------
def test_snapshot_interrupted_save_torn_and_foreign(tmp_path, caplog):
    import logging

    import numpy as np

    from rerankd import snapshot
    from rerankd.stages.dense_index import DenseIndex
    from rerankd.store import DocumentStore, NewDocument

    caplog.set_level(logging.INFO, logger="rerankd.snapshot")
    dim, kw = 16, {"m": 8, "ef_construction": 50, "ef_search": 50}
    rng = np.random.default_rng(0)
    store = DocumentStore(tmp_path / "documents.sqlite3")

    def add(ids: list[str]) -> None:
        v = rng.normal(size=(len(ids), dim)).astype(np.float32)
        store.upsert([NewDocument(i, f"text {i}", "", {}, x / np.linalg.norm(x), None) for i, x in zip(ids, v)])

    def load():
        caplog.clear()
        return snapshot.load_or_rebuild(store, d, dim, **kw)

    d = tmp_path / "hnsw"
    add(["a", "b"])
    idx, _, how = load()
    assert how == "rebuilt"
    snapshot.save(idx, d, store.last_seq())
    old_manifest = (d / "manifest.json").read_bytes()
    add(["c"])
    store.delete(["a"])
    idx, info, how = load()
    assert how == "loaded" and "replayed 1 upserts" in caplog.text
    snapshot.save(idx, d, store.last_seq())
    live = set(store.labels_for(["b", "c"]).values())

    # Killed between the index rename and the manifest rename: new index.bin, old manifest.json,
    # the new manifest complete in manifest.json.tmp -> completed, not rebuilt.
    (d / "manifest.json.tmp").write_bytes((d / "manifest.json").read_bytes())
    (d / "manifest.json").write_bytes(old_manifest)
    idx, info, how = load()
    assert how == "loaded" and info.sequence == store.last_seq() and "replayed 0 upserts" in caplog.text
    assert "interrupted" in caplog.text and not (d / "manifest.json.tmp").exists()
    assert idx.labels() == live
    # The same torn pair without the new manifest: the checksum catches it -> rebuilt.
    (d / "manifest.json").write_bytes(old_manifest)
    idx, _, how = load()
    assert how == "rebuilt" and "checksum mismatch" in caplog.text and idx.labels() == live

    # A graph that lacks a document its manifest claims to cover (a snapshot taken between a
    # commit and its index update) is refused, not trusted.
    torn = DenseIndex(dim, **kw)
    lb_b = store.labels_for(["b"])["b"]
    torn.upsert(np.asarray([lb_b]), store.vectors(dim)[1][store.vectors(dim)[0] == lb_b])
    snapshot.save(torn, d, store.last_seq())
    idx, _, how = load()
    assert how == "rebuilt" and "not in the graph" in caplog.text and idx.labels() == live

    # A snapshot newer than the store (documents.sqlite3 restored from an older copy) is refused.
    snapshot.save(idx, d, store.last_seq() + 5)
    _, _, how = load()
    assert how == "rebuilt" and "store ends at seq" in caplog.text
    store.close()


@pytest.mark.parametrize("content", ["null", "[]", "1", '"x"', "complete but its sequence"])
@pytest.mark.parametrize("where", ["manifest.json", "manifest.json.tmp"])
def test_snapshot_manifest_that_is_json_but_not_a_manifest_is_rebuilt(tmp_path, content, where):
    """A manifest (or the leftover manifest.json.tmp beside a damaged index) that parses but is no
    object, or lacks its sequence, reads as an unusable snapshot: rebuilt, never a failed start."""
    import numpy as np

    from rerankd import snapshot
    from rerankd.store import DocumentStore, NewDocument

    dim, kw = 16, {"m": 8, "ef_construction": 50, "ef_search": 50}
    store = DocumentStore(tmp_path / "documents.sqlite3")
    vecs = np.eye(dim, dtype=np.float32)[:4]
    store.upsert([NewDocument(f"d{i}", f"text {i}", "", {}, vecs[i], None) for i in range(4)])
    d = tmp_path / "hnsw"
    idx, _, _ = snapshot.load_or_rebuild(store, d, dim, **kw)
    snapshot.save(idx, d, store.last_seq(), store_id=store.store_id)
    if where == "manifest.json.tmp":  # a torn save: index.bin no longer matches manifest.json
        with open(d / "index.bin", "r+b") as f:
            f.seek(100)
            f.write(b"\xff\xff")
    if content == "complete but its sequence":  # passes every other check: its sequence is read
        mf = json.loads((d / "manifest.json").read_text())
        del mf["sequence"]
        content = json.dumps(mf)
    (d / where).write_text(content)
    assert snapshot.info(d) is None or where == "manifest.json.tmp"
    idx, info, how = snapshot.load_or_rebuild(store, d, dim, **kw)
    assert (how, info, len(idx)) == ("rebuilt", None, 4)
    store.close()


def test_index_counts_a_batch_committed_before_its_index_update_failed(models_dir, tmp_path, monkeypatch, capsys):
    """Batch n committed to SQLite, then the in-memory update failed: the stream's error counted
    only batches 0..n-1 as committed, and `rerankd index` told the user 3 documents were durable
    when 6 were (found by a review)."""
    from rerankd.embedded import EmbeddedServer
    from rerankd.stages import dense_index
    from util import settings_for

    real = dense_index.DenseIndex.replace
    calls = {"n": 0}

    def fails_second_time(self, labels, vectors, retired):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated: growing the graph failed")
        return real(self, labels, vectors, retired)

    monkeypatch.setattr(dense_index.DenseIndex, "replace", fails_second_time)
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"document number {i} apple"}) + "\n" for i in range(6)))
    with EmbeddedServer(settings_for(models_dir, tmp_path / "data")) as srv:
        rc = cli_main(["index", str(f), "--target", srv.target, "--batch-size", "3", "--no-progress"])
        err = capsys.readouterr().err
        with Client(srv.target) as c:
            assert c.stats().documents == 6
    assert rc == 1
    assert "batch[1]:" in err and "batches 0..1 with 6 documents were committed" in err
    assert "the server reports 6 documents committed" in err


def test_every_store_connection_syncs_fully(tmp_path):
    """WAL with synchronous=NORMAL survives a process kill but can lose acknowledged commits on
    power loss; the kill -9 tests cannot tell them apart (a mutation audit), so check the pragma."""
    from rerankd.store import DocumentStore

    store = DocumentStore(tmp_path / "documents.sqlite3")
    assert store._w.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._r().execute("PRAGMA synchronous").fetchone()[0] == 2
    assert store._w.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
