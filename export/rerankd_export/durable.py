"""Durable publishing for the exporter.

A rename is atomic but not durable: after a power loss the new name can point at a file whose
bytes never reached the disk (ext4/xfs may commit the rename before the data), or the rename
itself can be lost. So new bytes are fsynced before the rename that makes them visible, and the
directory after it; a crash then leaves either the old state or the new one, never a bundle with
empty or truncated model files behind a manifest that vouches for them.
"""
from __future__ import annotations

import os
from pathlib import Path

from rerankd.snapshot import fsync_dir


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every regular file under ``root``, then each directory, deepest first."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fsync_file(path)
        fsync_dir(Path(dirpath))


def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``os.replace(src, dst)`` with ``src``'s bytes on disk first and the rename after."""
    fsync_file(src)
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``path`` whole or not at all (a temporary file beside it, fsynced, then renamed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
