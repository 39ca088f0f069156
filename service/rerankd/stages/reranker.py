"""Cross-encoder stage: (query, passage) pairs -> relevance scores.

Passage token ids are computed once at upsert (``passage_ids``) and stored with the document;
a rerank tokenizes only the query and assembles pairs from the cached ids.
"""

from __future__ import annotations

import asyncio

import numpy as np

from ..backends import Backend
from ..batcher import Batcher
from ..bundle import ModelBundle
from ..config import BatchConfig
from ..errors import BackendError, InvalidArgument
from ..tokenization import PairTokenizer


class Reranker:
    def __init__(
        self,
        bundle: ModelBundle,
        backend: Backend,
        batch: BatchConfig,
        *,
        max_query_tokens: int,
        activation: str = "none",
        on_batch=None,
    ) -> None:
        if activation not in ("none", "sigmoid"):
            raise ValueError(f"score_activation must be none or sigmoid, got {activation!r}")
        st = bundle.special_tokens
        self.name = bundle.name
        self.trained = bool(bundle.manifest.get("trained", True))
        self.activation = activation
        self.tokenizer = PairTokenizer(
            bundle.tokenizer_path, bundle.max_length, st["cls_id"], st["sep_id"], max_query_tokens
        )
        self.backend = backend
        self.batcher = Batcher(
            "reranker",
            self._forward,
            batch,
            max_length=bundle.max_length,
            static_shapes=backend.static_shapes(),
            backend=backend.name,
            pad_id=st.get("pad_id", 0),
            on_batch=on_batch,
        )

    def _forward(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        logits = np.asarray(self.backend.run(ids, mask, types), dtype=np.float32).reshape(ids.shape[0], -1)[:, 0]
        if not np.isfinite(logits).all():  # a NaN would sort anywhere and reach the caller as a score
            raise BackendError(f"reranker produced {int((~np.isfinite(logits)).sum())} non-finite scores in a "
                               f"batch of shape {ids.shape}: the model is broken; re-export it")
        if self.activation == "sigmoid":
            logits = 1.0 / (1.0 + np.exp(-logits))
        return logits

    def passage_ids(self, texts: list[str]) -> list[np.ndarray]:
        return self.tokenizer.passage_ids(texts)

    def query_ids(self, query: str, field: str = "query") -> np.ndarray:
        return self.tokenizer.query_ids(query, field)

    async def score_cached(
        self, query: str, query_ids: np.ndarray, passages: list[np.ndarray], texts: list[str] | None = None,
        deadline: float | None = None,
    ) -> tuple[np.ndarray, float]:
        """Scores for each cached passage (same order); returns (scores, seconds queued)."""
        if not passages:
            return np.zeros((0,), dtype=np.float32), 0.0
        pairs = self.tokenizer.pairs(query, query_ids, passages, texts)
        rows, queued = await self.batcher.submit(pairs, deadline)
        return np.asarray(rows, dtype=np.float32), queued

    async def score_texts(self, query: str, texts: list[str], deadline: float | None = None,
                          field: str = "items") -> tuple[np.ndarray, float]:
        """Scores for caller-supplied passages (tokenized here, off the event loop)."""
        q = self.query_ids(query)
        passages = await asyncio.to_thread(self.passage_ids, texts)
        check_has_tokens(passages, [f"{field}[{i}].text" for i in range(len(texts))])
        return await self.score_cached(query, q, passages, texts, deadline)


def check_has_tokens(passages: list[np.ndarray], fields: list[str]) -> None:
    """A text of only characters the tokenizer drops (zero-width spaces, control characters) is
    not empty to ``str.strip`` but gives the reranker nothing to read: its pair scored like a real
    match (a review saw 4.7 against a relevant passage's 12.5). Refused as a query is."""
    for i, p in enumerate(passages):
        if len(p) == 0:
            raise InvalidArgument(fields[i], "has no tokens (only characters the tokenizer drops)")
