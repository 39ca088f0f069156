"""Shared by the load-test tools: realistic request payloads from a BEIR dataset, and the
guard that keeps load on loopback.

A BEIR dataset directory has ``queries.jsonl`` ({"_id", "text"}) and ``corpus.jsonl``
({"_id", "title", "text"}). Search and Score queries are drawn from the queries; Score
candidates and Encode items from the corpus (``title. text``, as the index stores them).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from rerankd.v1 import rerankd_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
RPCS = ("search", "score", "encode")
METHOD = {"search": "Search", "score": "Score", "encode": "Encode"}
SERVICE = "rerankd.v1.Retrieval"

# The reranker keeps the query whole and rejects one over --max-query-tokens (64 by default):
# skip queries that could come near that, so a load test measures load, not INVALID_ARGUMENT.
MAX_QUERY_CHARS = 200
MAX_DOC_CHARS = 2000


class TargetError(ValueError):
    """A target that is not on this machine (without --allow-remote)."""


def default_dataset() -> Path:
    env = os.environ.get("RERANKD_DATASET") or os.environ.get("RERANKD_SCIFACT")
    return Path(env) if env else REPO.parent / "shared" / "datasets" / "scifact"


def check_target(target: str, allow_remote: bool = False) -> str:
    """Return ``target`` if it is loopback (127.0.0.0/8, ::1, localhost) or a Unix socket.

    Anything else raises :class:`TargetError` unless ``allow_remote``: a load test must not
    hit a machine by accident.
    """
    t = target.strip()
    if allow_remote or t.startswith("unix:") or t.startswith("unix-abstract:"):
        return t
    host = t
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:", "http://", "https://"):
        if host.startswith(prefix):
            host = host[len(prefix):]
    if host.startswith("["):  # [::1]:50051
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:  # host:port
        host = host.rsplit(":", 1)[0]
    host = host.rstrip("/")
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost") or host.lower().endswith(".localhost"):
        return t
    try:
        if ipaddress.ip_address(host).is_loopback:
            return t
    except ValueError:
        pass
    raise TargetError(
        f"target {target!r} is not a loopback address (127.0.0.0/8, [::1], localhost) or unix:// socket; "
        "pass --allow-remote (RERANKD_ALLOW_REMOTE=1 for locust) to load a server elsewhere"
    )


@dataclass
class Dataset:
    queries: list[str]
    docs: list[tuple[str, str]]  # (id, "title. text")
    path: Path


def load_dataset(path: str | os.PathLike[str] | None = None, *, max_queries: int = 5000,
                 max_docs: int = 20000) -> Dataset:
    root = Path(path) if path else default_dataset()
    qfile, cfile = root / "queries.jsonl", root / "corpus.jsonl"
    for f in (qfile, cfile):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: --dataset / RERANKD_DATASET must be a BEIR dataset directory")
    queries: list[str] = []
    with open(qfile, encoding="utf-8-sig") as fh:  # a BOM is not part of the first row
        for line in fh:
            if len(queries) >= max_queries:
                break
            if not line.strip():  # blank lines, as eval and `rerankd index` skip them
                continue
            text = (json.loads(line).get("text") or "").strip()
            # ghz treats "{{" as a template action: keep payloads literal.
            if text and len(text) <= MAX_QUERY_CHARS and "{{" not in text:
                queries.append(text)
    docs: list[tuple[str, str]] = []
    seen: set[str] = set()
    with open(cfile, encoding="utf-8-sig") as fh:
        for line in fh:
            if len(docs) >= max_docs:
                break
            if not line.strip():
                continue
            d = json.loads(line)
            doc_id = str(d.get("_id", d.get("id", "")))
            title, text = (d.get("title") or "").strip(), (d.get("text") or "").strip()
            full = f"{title}. {text}" if title and text else (title or text)
            if not doc_id or doc_id in seen or not full or "{{" in full:
                continue
            seen.add(doc_id)
            docs.append((doc_id, full[:MAX_DOC_CHARS]))
    if not queries or not docs:
        raise ValueError(f"{root}: no usable queries ({len(queries)}) or documents ({len(docs)})")
    return Dataset(queries, docs, root)


class Payloads:
    """Builds requests for one RPC from a dataset, deterministically for a given seed."""

    def __init__(self, ds: Dataset, *, candidates: int = 50, top_n: int = 10, encode_batch: int = 8,
                 encode_queries: bool = False, seed: int = 0, rerank: bool | None = None,
                 budget_ms: int | None = None, use_cache: bool = False) -> None:
        if candidates < 1 or top_n < 1 or encode_batch < 1:
            raise ValueError("candidates, top_n and encode_batch must be >= 1")
        self.ds = ds
        self.candidates = candidates
        self.top_n = min(top_n, candidates)
        self.encode_batch = encode_batch
        self.encode_queries = encode_queries
        self.rerank = rerank  # Search: None = the server's default (rerank on), False = first stage only
        self.budget_ms = budget_ms  # Search and Score: soft latency budget (None = Search: the server's default; Score: none)
        # Search and Score: the requests repeat a few hundred queries, so by default they skip the
        # server's score cache (skip_cache) and load the model; True measures a cache-served mix.
        self.use_cache = use_cache
        self.rng = random.Random(seed)

    def search(self) -> pb.SearchRequest:
        req = pb.SearchRequest(query=self.rng.choice(self.ds.queries), top_n=self.top_n, candidates=self.candidates,
                               skip_cache=not self.use_cache)
        if self.rerank is not None:
            req.rerank = self.rerank
        if self.budget_ms is not None:
            req.budget_ms = self.budget_ms
        return req

    def score(self) -> pb.ScoreRequest:
        n = min(self.candidates, len(self.ds.docs))
        picked = self.rng.sample(self.ds.docs, n)
        req = pb.ScoreRequest(query=self.rng.choice(self.ds.queries),
                              items=[pb.Item(id=doc_id, text=text) for doc_id, text in picked],
                              skip_cache=not self.use_cache)
        if self.budget_ms is not None:
            req.budget_ms = self.budget_ms
        return req

    def encode(self) -> pb.EncodeRequest:
        if self.encode_queries:
            texts = [self.rng.choice(self.ds.queries) for _ in range(self.encode_batch)]
            return pb.EncodeRequest(items=[pb.Item(id=str(i), text=t) for i, t in enumerate(texts)], is_query=True)
        picked = self.rng.sample(self.ds.docs, min(self.encode_batch, len(self.ds.docs)))
        return pb.EncodeRequest(items=[pb.Item(id=doc_id, text=text) for doc_id, text in picked], is_query=False)

    def make(self, rpc: str):
        if rpc not in RPCS:
            raise ValueError(f"unknown rpc {rpc!r}; valid: {', '.join(RPCS)}")
        return getattr(self, rpc)()

    def pool(self, rpc: str, n: int) -> list:
        """``n`` requests built up front, so building them costs nothing during a run."""
        return [self.make(rpc) for _ in range(max(1, n))]
