"""Embedding stage: texts -> L2-normalized dense vectors (prepare / forward / post)."""

from __future__ import annotations

import asyncio

import numpy as np

from ..backends import Backend
from ..batcher import Batcher
from ..bundle import ModelBundle
from ..config import BatchConfig
from ..errors import BackendError
from ..tokenization import TextTokenizer


def mean_pool(hidden: np.ndarray, mask: np.ndarray, normalize: bool) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    summed = (hidden.astype(np.float32) * m).sum(axis=1)
    vec = summed / np.clip(m.sum(axis=1), 1e-9, None)
    if normalize:
        vec /= np.clip(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12, None)
    return vec


class Embedder:
    def __init__(self, bundle: ModelBundle, backend: Backend, batch: BatchConfig, on_batch=None) -> None:
        mf = bundle.manifest
        self.name = bundle.name
        self.dimension = int(mf["dimension"])
        self.normalize = bool(mf.get("normalize", True))
        if mf.get("pooling", "mean") != "mean":
            raise ValueError(f"{bundle.name}: unsupported pooling {mf.get('pooling')!r}")
        self.query_prefix = mf.get("query_prefix", "")
        self.document_prefix = mf.get("document_prefix", "")
        self.tokenizer = TextTokenizer(bundle.tokenizer_path, bundle.max_length)
        self.backend = backend
        self.batcher = Batcher(
            "embedder",
            self._forward,
            batch,
            max_length=bundle.max_length,
            static_shapes=backend.static_shapes(),
            backend=backend.name,
            pad_id=bundle.special_tokens.get("pad_id", 0),
            on_batch=on_batch,
        )

    def _forward(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        vecs = mean_pool(self.backend.run(ids, mask, types), mask, self.normalize)
        if not np.isfinite(vecs).all():  # a NaN vector would be stored in the index and break search
            raise BackendError(f"embedder produced non-finite vectors in a batch of shape {ids.shape}: "
                               f"the model is broken; re-export it")
        return vecs

    async def encode(self, texts: list[str], *, is_query: bool, deadline: float | None = None) -> tuple[np.ndarray, float]:
        """Returns ([n, dim] float32, seconds spent queued)."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32), 0.0
        prefix = self.query_prefix if is_query else self.document_prefix
        if prefix:
            texts = [prefix + t for t in texts]
        # prepare: tokenization off the event loop when it is more than a query
        if len(texts) == 1 and len(texts[0]) < 2048:
            seqs = self.tokenizer.encode(texts)
        else:
            seqs = await asyncio.to_thread(self.tokenizer.encode, texts)
        # Query-side work is interactive (a Search waits for it): it goes ahead of documents.
        rows, queued = await self.batcher.submit(seqs, deadline, priority=is_query)
        return np.stack(rows).astype(np.float32, copy=False), queued
