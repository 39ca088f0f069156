"""Shared fixtures: exported model bundles (cached by source checksum) and SciFact access."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("RERANKD_SCIFACT", REPO.parent / "shared" / "datasets" / "scifact"))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Default bundles exported once into .cache/test-models (re-export only when sources change)."""
    from rerankd.cli import main

    out = Path(os.environ.get("RERANKD_TEST_MODELS_DIR", REPO / ".cache" / "test-models"))
    assert main(["export", "--defaults", "--models-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def scifact() -> Path:
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT} (set RERANKD_SCIFACT)")
    return SCIFACT


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if limit is not None and len(out) >= limit:
                break
    return out


@pytest.fixture(scope="session")
def scifact_docs(scifact: Path) -> list[dict]:
    return read_jsonl(scifact / "corpus.jsonl")
