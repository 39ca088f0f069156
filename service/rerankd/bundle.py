"""Read-only view of an exported model bundle (see docs/bundle-format.md)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "rerankd-bundle/1"
REQUIRED_KEYS = ("name", "max_length", "inputs", "special_tokens", "variants")


@dataclass(frozen=True)
class ModelBundle:
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, models_dir: Path, name: str, task: str) -> "ModelBundle":
        path = Path(models_dir) / name
        mf = path / "manifest.json"
        if not mf.is_file():
            raise ConfigError(
                f"model bundle {name!r} not found at {path} (no manifest.json); "
                f"create it with `rerankd export --defaults --models-dir {models_dir}`"
            )
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{mf}: unreadable manifest: {e}") from e
        if manifest.get("format") != BUNDLE_FORMAT:
            raise ConfigError(f"{mf}: format {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        if manifest.get("task") != task:
            raise ConfigError(f"{mf}: bundle {name!r} is a {manifest.get('task')!r} model, expected {task!r}")
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:  # was a bare KeyError at the first property that read one
            raise ConfigError(f"{mf}: manifest lacks {', '.join(missing)}; re-export the bundle")
        return cls(path=path, manifest=manifest)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    @property
    def input_names(self) -> list[str]:
        return list(self.manifest["inputs"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.get("files", {}).get("tokenizer", "tokenizer.json")

    @property
    def special_tokens(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.manifest["special_tokens"].items()}

    def variant_file(self, precision: str) -> Path:
        variants = self.manifest.get("variants", {})
        refused = (self.manifest.get("refused_variants") or {}).get(precision)
        if precision not in variants and refused is not None:
            raise ConfigError(
                f"bundle {self.name!r}: the {precision!r} variant was refused by its accuracy gate at export "
                f"(figures under refused_variants in {self.path / 'manifest.json'}); serve another precision "
                f"(has: {', '.join(sorted(variants))})"
            )
        if precision not in variants:
            raise ConfigError(
                f"bundle {self.name!r} has no {precision!r} variant (has: {', '.join(sorted(variants))}); "
                f"re-export with the matching option (e.g. `rerankd export --int8`)"
            )
        entry = variants[precision]
        if not entry.get("sha256"):  # an older entry (openvino-bf16 serves model.onnx): another
            for other in variants.values():  # variant may give the same file's checksum
                if other.get("file") == entry.get("file") and other.get("sha256"):
                    entry = {**entry, "sha256": other["sha256"]}
                    break
        bad = variant_problems(self.path, entry)
        if bad:
            raise ConfigError(
                f"bundle {self.name!r}, {precision} variant: {'; '.join(bad)}; the bundle is damaged or was "
                f"modified after export: re-export it (`rerankd export --defaults --models-dir {self.path.parent}` "
                f"rebuilds what is missing or changed)"
            )
        return self.path / entry["file"]

    def verified_file(self, name: str, sha256: str | None) -> Path:
        """A file the manifest lists outside the variants (the GPU probe), checked like them."""
        f = self.path / name
        bad = _file_problem(f, sha256)
        if bad:
            raise ConfigError(f"bundle {self.name!r}: {bad}; re-export it")
        return f


def variant_files(bundle_dir: Path, entry: dict[str, Any]) -> list[tuple[Path, str | None]]:
    """(file, expected sha256) for every file a manifest variant entry serves from: the model, and
    for an OpenVINO IR the weights (.bin) beside its .xml."""
    f = Path(bundle_dir) / str(entry.get("file", ""))
    files = [(f, entry.get("sha256"))]
    if "weights_sha256" in entry:
        files.append((f.with_suffix(".bin"), entry.get("weights_sha256")))
    return files


def variant_problems(bundle_dir: Path, entry: dict[str, Any]) -> list[str]:
    """What is wrong with a variant's files (missing, or not the bytes the export wrote); empty
    when intact. A model file that was truncated, overwritten or swapped used to load and serve
    (a review served NaN scores from a model.onnx with 64 KiB overwritten). A file the manifest
    gives no checksum for is only checked to exist (a warning says so). Bundles from exporters
    before the .xml got its own hash recorded the OpenVINO weights' hash as ``sha256``: those
    are checked by their weights alone."""
    files = variant_files(bundle_dir, entry)
    if len(files) == 2 and files[0][1] and files[0][1] == files[1][1]:  # legacy OpenVINO entry
        files = files[1:] + [(files[0][0], None)]
    return [bad for f, sha in files if (bad := _file_problem(f, sha))]


_WARNED: set[str] = set()


def _file_problem(f: Path, sha256: str | None) -> str | None:
    if not f.is_file():
        return f"{f} is missing"
    if not sha256:
        if str(f) not in _WARNED:  # once per file and process, not on every load
            _WARNED.add(str(f))
            log.warning("%s has no checksum of its own in its bundle's manifest: loaded unchecked "
                        "(an older export; re-export to add one)", f)
        return None
    if file_sha256(f) != sha256:
        return f"{f.name} does not match the sha256 in the manifest"
    return None


_SHA_CACHE: dict[tuple[str, int, int, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def file_sha256(f: Path) -> str:
    """sha256 of a file, cached per (path, inode, size, mtime, ctime): a server loads each model
    file a few times (embedder and reranker, every backend tried) and ~0.2 s per 100 MB adds up
    in tests. ctime and the inode change with any rewrite or replace, even one that keeps the
    size and sets the old mtime back (``cp -p``, ``rsync -t``, tar)."""
    st = f.stat()
    key = (str(f.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _SHA_LOCK:
        hit = _SHA_CACHE.get(key)
    if hit is None:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        hit = h.hexdigest()
        with _SHA_LOCK:
            _SHA_CACHE[key] = hit
    return hit
