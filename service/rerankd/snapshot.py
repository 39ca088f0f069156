"""HNSW snapshots: a derived artifact of the document store.

``<data-dir>/hnsw/index.bin`` plus ``manifest.json`` with the store sequence number it covers,
its sha256, and the HNSW parameters. On start the snapshot is loaded and brought up to date by
replaying later changes from the store; a missing, corrupt (checksum) or incompatible snapshot
is rebuilt from the stored vectors — never by re-embedding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .stages.dense_index import DenseIndex
from .store import DocumentStore

log = logging.getLogger(__name__)

FORMAT = "rerankd-hnsw/1"


@dataclass(frozen=True)
class SnapshotInfo:
    sequence: int
    created_at: float
    path: Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(index: DenseIndex, directory: Path, sequence: int, store_id: str | None = None,
         on_locked: Callable[[], None] | None = None) -> SnapshotInfo:
    """Write ``index`` as the snapshot covering store sequence ``sequence`` (``on_locked``: see
    ``DenseIndex.save``)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "index.bin.tmp"
    index.save(tmp, on_locked)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    manifest = {
        "format": FORMAT,
        "sequence": sequence,
        "sha256": sha256_file(tmp),
        "dim": index.dim,
        "m": index.m,
        "ef_construction": index.ef_construction,
        "live": len(index),
        "created_at": time.time(),
    }
    if store_id is not None:
        manifest["store_id"] = store_id  # the document store it was made from (checked on load)
    # Manifest first under a temp name, then the index, then the manifest: a crash anywhere
    # leaves either the old pair, or a new index under the old manifest whose checksum does not
    # match (-> rebuild from the store; never a graph trusted for a sequence it does not cover).
    mtmp = directory / "manifest.json.tmp"
    mtmp.write_text(json.dumps(manifest, indent=2))
    with open(mtmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / "index.bin")
    fsync_dir(directory)  # the index rename is on disk before the manifest rename
    os.replace(mtmp, directory / "manifest.json")
    fsync_dir(directory)
    return SnapshotInfo(sequence, manifest["created_at"], directory)


def load_or_rebuild(
    store: DocumentStore, directory: Path, dim: int, *, m: int, ef_construction: int, ef_search: int
) -> tuple[DenseIndex, SnapshotInfo | None, str]:
    """Returns (index up to date with the store, the snapshot used or None, how: loaded|rebuilt)."""
    reason = _check(directory, dim, m, ef_construction)
    if reason is not None and reason != "parameters changed" and _roll_forward(directory):
        reason = _check(directory, dim, m, ef_construction)
    if reason is None:
        mf = _read_manifest(directory / "manifest.json") or {}
        try:
            seq = int(mf["sequence"])
            sid = mf.get("store_id")  # absent in snapshots saved before it was recorded
            if sid is not None and sid != store.store_id:
                # documents.sqlite3 copied in from another server: its labels name other documents.
                raise ValueError(f"snapshot was made from another document store ({sid}, this one is {store.store_id})")
            last = store.last_seq()
            if seq > last:
                # The store is older than the snapshot (restored/replaced documents.sqlite3):
                # the graph may hold labels the store will hand out again for other documents.
                raise ValueError(f"snapshot covers seq {seq} but the store ends at seq {last}")
            live_before = set(store.labels_changed_at_or_before(seq))
            index = DenseIndex.load(directory / "index.bin", dim, m=m, ef_construction=ef_construction,
                                    ef_search=ef_search, live=live_before)
            missing = index.missing_labels(live_before)
            if missing:
                raise ValueError(f"{len(missing)} documents at or before seq {seq} are not in the graph")
            labels, vecs = store.vectors(dim, after_seq=seq)
            index.upsert(labels, vecs)
            index.mark_deleted_raw(store.deletes_after(seq))
            log.info("HNSW snapshot at seq %d loaded; replayed %d upserts", seq, len(labels))
            return index, SnapshotInfo(seq, float(mf["created_at"]), directory), "loaded"
        except Exception as e:  # corrupt in a way the checksum did not catch
            reason = f"load failed: {e}"
            # Never trusted again: a snapshot newer than the store (older documents.sqlite3
            # restored) would pass the sequence check once new writes carry the store past it,
            # and its graph holds other documents' vectors under the labels handed out again.
            _discard(directory)
    if reason == "missing" and store.count() == 0:
        log.info("empty data dir: starting a new HNSW index")
    else:
        log.warning("HNSW snapshot unusable (%s); rebuilding from stored vectors", reason)
    return rebuild(store, dim, m=m, ef_construction=ef_construction, ef_search=ef_search), None, "rebuilt"


def _discard(directory: Path) -> None:
    """Remove a refused snapshot (manifest first: an index without one is never loaded)."""
    try:
        for name in ("manifest.json", "manifest.json.tmp", "index.bin"):
            (directory / name).unlink(missing_ok=True)
        fsync_dir(directory)
    except OSError as e:
        log.warning("could not remove the refused HNSW snapshot in %s: %s", directory, e)


def _roll_forward(directory: Path) -> bool:
    """Finish a save killed between its two renames: the new index.bin sits under the old
    manifest, and the new manifest, written and fsynced before the index was renamed, is
    complete in manifest.json.tmp. Its checksum binds it to that index: if it matches, the pair
    is the new snapshot. Saves a full rebuild after a crash in that window."""
    mtmp, idx = directory / "manifest.json.tmp", directory / "index.bin"
    if not mtmp.is_file() or not idx.is_file():
        return False
    mf = _read_manifest(mtmp)
    if mf is None:
        return False
    try:
        if mf.get("format") != FORMAT or sha256_file(idx) != mf.get("sha256"):
            return False
        os.replace(mtmp, directory / "manifest.json")
        fsync_dir(directory)
    except (OSError, ValueError):
        return False
    log.info("HNSW snapshot: completed a save interrupted between its renames (seq %s)", mf.get("sequence"))
    return True


def rebuild(store: DocumentStore, dim: int, *, m: int, ef_construction: int, ef_search: int) -> DenseIndex:
    labels, vecs = store.vectors(dim)
    index = DenseIndex(dim, m=m, ef_construction=ef_construction, ef_search=ef_search, capacity=max(1024, len(labels) * 5 // 4))
    for i in range(0, len(labels), 4096):
        index.upsert(labels[i : i + 4096], vecs[i : i + 4096], threads=-1)
    return index


def _check(directory: Path, dim: int, m: int, ef_construction: int) -> str | None:
    mf_path, idx = directory / "manifest.json", directory / "index.bin"
    if not mf_path.is_file() or not idx.is_file():
        return "missing"
    mf = _read_manifest(mf_path)
    if mf is None:
        return "manifest unreadable"
    if mf.get("format") != FORMAT:
        return f"format {mf.get('format')!r}"
    if (mf.get("dim"), mf.get("m"), mf.get("ef_construction")) != (dim, m, ef_construction):
        return "parameters changed"
    if sha256_file(idx) != mf.get("sha256"):
        return "checksum mismatch (corrupt)"
    return None


def info(directory: Path) -> SnapshotInfo | None:
    mf = _read_manifest(directory / "manifest.json")
    try:
        return SnapshotInfo(int(mf["sequence"]), float(mf["created_at"]), directory) if mf else None
    except (ValueError, KeyError, TypeError):
        return None


def _read_manifest(path: Path) -> dict | None:
    """The manifest as a dict; None when it cannot be read, is not JSON, or is JSON but not an
    object (``null``, a list: a damaged file must read as "unusable", never crash the start)."""
    try:
        mf = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return mf if isinstance(mf, dict) else None


__all__ = ["save", "load_or_rebuild", "rebuild", "info", "SnapshotInfo", "np"]
