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
        # The score cache off: tests that count batches, budgets or queue waits repeat their
        # queries; tests/test_score_cache.py turns it on.
        model={"models_dir": models_dir, "backend": "onnxruntime", "precision": "fp32", "rerank_cache_entries": 0},
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
    # ... and in the rich error model: a google.rpc.BadRequest naming the field the message leads with.
    from rerankd.client import error_details

    violations = error_details(err)["field_violations"]
    assert len(violations) == 1 and field in violations[0][0], (violations, err.details())
    assert err.details() == f"{violations[0][0]}: {violations[0][1]}"
    return err.details()


class ChangeLogSource:
    """An in-memory stand-in for the document store's change log (``text_changes_after``):
    labels only grow, a delete is final, a replace is a delete plus a new label."""

    def __init__(self, labels=(), texts=()) -> None:
        self.docs: dict[int, str] = {}
        self.log: list[tuple[str, int]] = []
        self.next = 1
        self.calls: list[tuple[int, int]] = []  # (seq asked for, documents returned)
        for label, text in zip(labels, texts):
            self.docs[label] = text
            self.log.append(("upsert", label))
            self.next = max(self.next, label + 1)

    def add(self, texts) -> list[int]:
        out = []
        for t in texts:
            self.docs[self.next] = t
            self.log.append(("upsert", self.next))
            out.append(self.next)
            self.next += 1
        return out

    def delete(self, labels) -> None:
        for label in labels:
            del self.docs[label]
            self.log.append(("delete", label))

    def text_changes_after(self, seq: int):
        import numpy as np

        later = self.log[seq:]
        changed = sorted({lb for op, lb in later if op == "upsert" and lb in self.docs})
        gone = sorted({lb for op, lb in later if op == "delete"})
        self.calls.append((seq, len(changed)))
        return len(self.log), np.asarray(changed, dtype=np.int64), [self.docs[lb] for lb in changed], gone
