"""Test helpers: exported default bundles, cached across test runs.

Exporting both default models takes about a minute on 2 CPU cores, so test suites share one
export in ``<repo>/.cache/test-models`` (gitignored; ``$RERANKD_TEST_MODELS_DIR`` overrides) and
rely on the exporter's checksum cache: a later run only re-exports when the source, max_length or
exporter versions changed.

Use from a conftest::

    import pytest
    from rerankd_export.testing import exported_models

    @pytest.fixture(scope="session")
    def models():
        return exported_models()
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .sources import repo_root

__all__ = ["ExportedModels", "exported_models", "test_models_dir", "TEST_MAX_LENGTH"]

TEST_MAX_LENGTH = 256


def test_models_dir() -> Path:
    """``$RERANKD_TEST_MODELS_DIR`` or ``<repo>/.cache/test-models``."""
    env = os.environ.get("RERANKD_TEST_MODELS_DIR")
    return Path(env).expanduser().resolve() if env else repo_root() / ".cache" / "test-models"


test_models_dir.__test__ = False  # not a pytest test despite the name


@dataclass(frozen=True)
class ExportedModels:
    models_dir: Path
    embedder: Path  # bundle dir of the default embedder (task "embed")
    reranker: Path  # bundle dir of the default reranker (task "rerank")
    manifests: dict = field(default_factory=dict)  # bundle name -> manifest

    def manifest(self, task: str) -> dict:
        bundle = self.embedder if task == "embed" else self.reranker
        return self.manifests[bundle.name]


def exported_models(tmp_root: str | os.PathLike[str] | None = None, *, int8: bool = True,
                    max_length: int = TEST_MAX_LENGTH) -> ExportedModels:
    """Export (or reuse) the default embedder and reranker bundles under ``tmp_root``.

    ``tmp_root`` defaults to :func:`test_models_dir`. With ``int8`` (default) both bundles also
    carry ``model.int8.onnx``. The reranker is the trained checkpoint when
    ``<repo>/checkpoints/rerankd-ce-MiniLM-L6`` (or ``$RERANKD_RERANKER_SOURCE``) exists, else
    an untrained fresh head (``manifest["trained"] is False``).
    """
    from .export import DEFAULT_EMBEDDER_NAME, DEFAULT_RERANKER_NAME, export_defaults

    root = Path(tmp_root).expanduser().resolve() if tmp_root is not None else test_models_dir()
    manifests = export_defaults(root, max_length=max_length, int8=int8)
    return ExportedModels(
        models_dir=root,
        embedder=root / DEFAULT_EMBEDDER_NAME,
        reranker=root / DEFAULT_RERANKER_NAME,
        manifests=manifests,
    )
