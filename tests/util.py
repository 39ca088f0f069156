"""Test helpers (not fixtures)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from rerankd.config import Settings


def settings_for(models_dir: Path, data_dir: Path, **sections) -> Settings:
    s = Settings().replace(
        server={"listen": "127.0.0.1:0"},
        # ONNX Runtime fp32: dynamic shapes (no per-shape compile), the reference the other
        # backends are gated against. Backend-specific tests pick their own.
        model={"models_dir": models_dir, "backend": "onnxruntime", "precision": "fp32"},
        index={"data_dir": data_dir},
        batch={"warmup": False},
    )
    return s.replace(**sections) if sections else s


def assert_invalid(fn, field: str) -> str:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    err = ei.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert field in err.details(), f"{field!r} not named in {err.details()!r}"
    return err.details()
