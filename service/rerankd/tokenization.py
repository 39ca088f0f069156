"""Tokenization with Hugging Face ``tokenizers``.

Two jobs:
* single texts for the embedder: ``[CLS] text [SEP]`` truncated to ``max_length``;
* (query, passage) pairs for the cross-encoder, assembled from *cached* passage ids so that a
  rerank tokenizes only the query. Truncation cuts the passage, never the query: a query longer
  than ``max_query_tokens`` is rejected instead.

Pair assembly is written by hand (it is the hot path: numpy concatenation instead of a tokenizer
call per pair) and verified against the tokenizer's own pair encoding at load time; if the
bundle's template is not BERT-style ``[CLS] A [SEP] B [SEP]`` it falls back to the tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import InvalidArgument

log = logging.getLogger(__name__)

ID_DTYPE = np.int32


@dataclass(frozen=True)
class Encoded:
    """One model input sequence (special tokens included), unpadded."""

    input_ids: np.ndarray  # int32 [T]
    token_type_ids: np.ndarray  # int8 [T]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _load(path: Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


class TextTokenizer:
    """Single-sequence tokenization for the embedder."""

    def __init__(self, path: Path, max_length: int) -> None:
        self.max_length = max_length
        self._tok = _load(path)
        self._tok.enable_truncation(max_length=max_length)

    def encode(self, texts: list[str]) -> list[Encoded]:
        out = []
        for e in self._tok.encode_batch(texts):
            out.append(Encoded(np.asarray(e.ids, dtype=ID_DTYPE), np.asarray(e.type_ids, dtype=np.int8)))
        return out


class PairTokenizer:
    """(query, passage) pairs for the cross-encoder, from cached passage ids."""

    def __init__(self, path: Path, max_length: int, cls_id: int, sep_id: int, max_query_tokens: int) -> None:
        if max_query_tokens + 4 > max_length:
            raise ValueError(f"max_query_tokens={max_query_tokens} leaves no room for a passage in max_length={max_length}")
        self.max_length = max_length
        self.max_query_tokens = max_query_tokens
        self._cls = np.asarray([cls_id], dtype=ID_DTYPE)
        self._sep = np.asarray([sep_id], dtype=ID_DTYPE)
        self._raw = _load(path)  # no special tokens, no truncation: ids of a text alone
        self._ref = _load(path)  # reference pair encoder (truncate only the second sequence)
        self._ref.enable_truncation(max_length=max_length, strategy="only_second")
        self.fast_assembly = self._check_assembly()

    # -- passages (cached at upsert) -------------------------------------------------------
    def passage_ids(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each passage without special tokens, cut to the longest usable length."""
        limit = self.max_length - 3 - 1  # [CLS] q [SEP] p [SEP] with at least one query token
        return [np.asarray(e.ids[:limit], dtype=ID_DTYPE) for e in self._raw.encode_batch(texts, add_special_tokens=False)]

    # -- queries --------------------------------------------------------------------------------
    def query_ids(self, query: str, field: str = "query") -> np.ndarray:
        ids = self._raw.encode(query, add_special_tokens=False).ids
        if not ids:
            raise InvalidArgument(field, "has no tokens")
        if len(ids) > self.max_query_tokens:
            raise InvalidArgument(
                field,
                f"{len(ids)} tokens exceeds the reranker's query limit of {self.max_query_tokens} tokens "
                f"(queries are never truncated; raise --max-query-tokens up to max_length-4)",
            )
        return np.asarray(ids, dtype=ID_DTYPE)

    # -- pairs -----------------------------------------------------------------------------------
    def assemble(self, query_ids: np.ndarray, passage_ids: np.ndarray) -> Encoded:
        budget = self.max_length - 3 - len(query_ids)
        p = passage_ids[:budget]
        ids = np.concatenate([self._cls, query_ids, self._sep, p, self._sep])
        types = np.zeros(ids.shape[0], dtype=np.int8)
        types[len(query_ids) + 2 :] = 1
        return Encoded(ids, types)

    def encode_pair(self, query: str, passage: str) -> Encoded:
        """Reference path: the tokenizer's own pair encoding (used by tests and the fallback)."""
        e = self._ref.encode(query, passage)
        return Encoded(np.asarray(e.ids, dtype=ID_DTYPE), np.asarray(e.type_ids, dtype=np.int8))

    def pairs(self, query: str, query_ids: np.ndarray, passages: list[np.ndarray], texts: list[str] | None = None) -> list[Encoded]:
        if self.fast_assembly or texts is None:
            return [self.assemble(query_ids, p) for p in passages]
        return [self.encode_pair(query, t) for t in texts]

    def _check_assembly(self) -> bool:
        q = "Does aspirin reduce the risk of colorectal cancer?"
        p = "Regular aspirin use was associated with a lower incidence of colorectal adenomas " * 20
        fast = self.assemble(self.query_ids(q), self.passage_ids([p])[0])
        ref = self.encode_pair(q, p)
        same = np.array_equal(fast.input_ids, ref.input_ids) and np.array_equal(fast.token_type_ids, ref.token_type_ids)
        if not same:
            log.warning("pair template is not [CLS] A [SEP] B [SEP]; tokenizing pairs on the hot path (slower)")
        return same
