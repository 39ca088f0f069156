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


# Tokenizing a long text only to keep its first few hundred tokens dominated large calls (a
# review measured 6.4 s for one Score of 512 passages of 30 KB, work that went on after the
# call was cancelled). A text longer than this many characters per kept token is tokenized from
# its head, cut at a whitespace: word-splitting tokenizers give the head's tokens as a prefix of
# the whole text's, so when the head yields enough tokens the result is the same. When it does
# not (a text of very long "words"), the whole text is tokenized. Checked at load time against
# the whole-text result; a tokenizer for which it does not hold always tokenizes whole texts.
CHARS_PER_KEPT_TOKEN = 16


def _head(text: str, tokens: int) -> str | None:
    """``text`` cut at its last whitespace before ``tokens * CHARS_PER_KEPT_TOKEN`` characters;
    None when the text is no longer than that or has no whitespace to cut at."""
    n = tokens * CHARS_PER_KEPT_TOKEN
    if len(text) <= n:
        return None
    cut = max(text.rfind(c, 0, n) for c in " \n\t\r")
    # No whitespace left at the end: a tokenizer that marks word starts (SentencePiece's "▁")
    # would give a trailing run of it a token the whole text does not have there.
    head = text[:cut].rstrip() if cut > 0 else ""
    return head or None


def _encode_heads(tok: Tokenizer, texts: list[str], tokens: int, enough, add_special_tokens: bool) -> list:
    """``tok.encode_batch(texts)``, tokenizing long texts from their head: an encoding of a head
    for which ``enough(encoding)`` is false is redone from the whole text. ``enough`` asks for
    more tokens than are kept, so the head's last token, whatever the cut did to it, is dropped."""
    heads = [_head(t, tokens) for t in texts]
    out = tok.encode_batch([t if h is None else h for t, h in zip(texts, heads)], add_special_tokens=add_special_tokens)
    redo = [i for i, h in enumerate(heads) if h is not None and not enough(out[i])]
    if redo:
        for i, e in zip(redo, tok.encode_batch([texts[i] for i in redo], add_special_tokens=add_special_tokens)):
            out[i] = e
    return out


def _heads_agree(encode_whole, encode_heads) -> bool:
    """Load-time check that tokenizing from the head gives what tokenizing the whole text does."""
    words = "Regular aspirin use (81 mg/day) was associated with a lower incidence of colorectal adenomas; "
    texts = [words * 200, ("naïve café résumé 東京 " + words) * 150, "x" * 9000 + " end", words[:40],
             (words + "  \n ") * 100, ("a  " * 2100) + words]  # whitespace runs at the cut
    return all(np.array_equal(a, b) for a, b in zip(encode_whole(texts), encode_heads(texts)))


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
        self.from_heads = _heads_agree(lambda t: [x.input_ids for x in self._encode(t, False)],
                                       lambda t: [x.input_ids for x in self._encode(t, True)])

    def encode(self, texts: list[str]) -> list[Encoded]:
        return self._encode(texts, self.from_heads)

    def _encode(self, texts: list[str], heads: bool) -> list[Encoded]:
        if heads:  # a head that was truncated gives what the whole text gives
            enc = _encode_heads(self._tok, texts, self.max_length, lambda e: len(e.overflowing) > 0, True)
        else:
            enc = self._tok.encode_batch(texts)
        return [Encoded(np.asarray(e.ids, dtype=ID_DTYPE), np.asarray(e.type_ids, dtype=np.int8)) for e in enc]


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
        self.from_heads = _heads_agree(lambda t: self._passage_ids(t, False), lambda t: self._passage_ids(t, True))
        self.fast_assembly = self._check_assembly()

    # -- passages (cached at upsert) -------------------------------------------------------
    def passage_ids(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each passage without special tokens, cut to the longest usable length."""
        return self._passage_ids(texts, self.from_heads)

    def _passage_ids(self, texts: list[str], heads: bool) -> list[np.ndarray]:
        limit = self.max_length - 3 - 1  # [CLS] q [SEP] p [SEP] with at least one query token
        if heads:
            enc = _encode_heads(self._raw, texts, limit, lambda e: len(e.ids) > limit, False)
        else:
            enc = self._raw.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids[:limit], dtype=ID_DTYPE) for e in enc]

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
