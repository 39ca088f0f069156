"""A small synchronous Python client, shaped like the Superlinked SIE client.

    from rerankd.client import Client
    with Client("localhost:50051") as c:
        c.upsert([{"id": "d1", "text": "Aspirin lowers colorectal cancer risk."}])
        hits = c.search("does aspirin prevent cancer?", top_n=5)
        vecs = c.encode(["a query"], is_query=True)              # np.ndarray [n, dim]
        ranked = c.score("a query", [{"id": "a", "text": "..."}, {"id": "b", "text": "..."}])
        # -> [{"item_id": "b", "score": 3.1, "rank": 1, "index": 1},
        #     {"item_id": "a", "score": -2.0, "rank": 2, "index": 0}]

``model=`` arguments are optional and, when given, must match the model the server runs
(a server serves one embedder and one reranker), so SIE-style calls ``score(model, ...)``
port with a keyword.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import grpc
import numpy as np

from . import tracing
from .v1 import rerankd_pb2 as pb
from .v1 import rerankd_pb2_grpc as pb_grpc

_STAGES = {"dense": pb.FIRST_STAGE_DENSE, "bm25": pb.FIRST_STAGE_BM25, "hybrid": pb.FIRST_STAGE_HYBRID, None: pb.FIRST_STAGE_UNSPECIFIED}

ItemLike = str | Mapping[str, Any]


def _items(items: Iterable[ItemLike]) -> list[pb.Item]:
    out = []
    for i, it in enumerate(items):
        if isinstance(it, str):
            out.append(pb.Item(id=str(i), text=it))
        else:
            # A missing text is the server's to refuse, naming items[i].text (was a KeyError here).
            out.append(pb.Item(id=str(it.get("id", it.get("item_id", i))), text=it.get("text", "") or ""))
    return out


def _metadata(meta: Mapping[str, Any] | None) -> dict[str, str]:
    """Metadata values are strings, as in filters and `rerankd index` (this turned 2020, True and
    None into "2020", "True" and "None" silently, while a filter on 2020 raised: a review)."""
    out = {}
    for k, v in (meta or {}).items():
        if not isinstance(v, str):
            raise TypeError(f"metadata[{k!r}]: metadata values are strings (filters match them exactly); "
                            f"got {type(v).__name__} {v!r}: convert it, e.g. str({v!r})")
        out[str(k)] = v
    return out


def _doc(d: Mapping[str, Any]) -> pb.Document:
    return pb.Document(
        # Title-only documents are valid (the server and `rerankd index` take them).
        id=str(d.get("id", d.get("_id", ""))), text=d.get("text", "") or "", title=d.get("title", "") or "",
        metadata=_metadata(d.get("metadata")),
    )


def _stage(first_stage: str | None) -> int:
    try:
        return _STAGES[first_stage]
    except KeyError:
        raise ValueError(f"first_stage must be one of dense, bm25, hybrid or None, not {first_stage!r}") from None


DEFAULT_OPTIONS: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 << 20),
                                          ("grpc.max_send_message_length", 64 << 20)]


def connection(args: argparse.Namespace, token: str = "", target: str = "") -> dict[str, Any]:
    """``Client``/``open_channel`` keyword arguments from ``config.add_connection_arguments`` flags.
    A ``unix:`` target is plaintext whatever they say (the server never serves TLS there)."""
    ca, cert, key, name = (getattr(args, a, "") or "" for a in ("tls_ca", "tls_client_cert", "tls_client_key", "tls_server_name"))
    if target.startswith("unix:"):
        ca = cert = key = name = ""
    if bool(cert) != bool(key):
        raise ValueError("--tls-client-cert and --tls-client-key go together")
    if (cert or name) and not ca:
        raise ValueError("--tls-client-cert / --tls-server-name need --tls-ca (they only apply to TLS)")
    creds = None
    if ca:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        creds = grpc.ssl_channel_credentials(read(ca), read(key) if key else None, read(cert) if cert else None)
    options = DEFAULT_OPTIONS + ([("grpc.ssl_target_name_override", name)] if name else [])
    return {"credentials": creds, "metadata": [("authorization", f"Bearer {token}")] if token else None,
            "options": options}


def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None,
                 options: list[tuple[str, Any]] | None = None, **_: Any) -> grpc.Channel:
    opts = options or DEFAULT_OPTIONS
    return grpc.secure_channel(target, credentials, opts) if credentials else grpc.insecure_channel(target, opts)


def wait_serving(target: str, timeout: float = 600.0, *, connect_timeout: float = 30.0,
                 credentials: grpc.ChannelCredentials | None = None, options: list[tuple[str, Any]] | None = None,
                 **_: Any) -> None:
    """Block until the server's health check says SERVING (it needs no token). A server that
    answers NOT_SERVING (loading and warming its models) is waited for up to ``timeout``; one
    that has not answered for ``min(connect_timeout, timeout)`` raises TimeoutError with gRPC's
    last reason (connection refused, a failed TLS handshake), as does one that stops answering."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    start = time.monotonic()
    deadline, silent_limit = start + timeout, min(connect_timeout, timeout)
    last_answer, said = start, False
    with open_channel(target, credentials, options) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            now = time.monotonic()
            wait = max(0.1, min(5.0, deadline - now, last_answer + silent_limit - now))  # never past either limit
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=wait).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
                last_answer = time.monotonic()
                if not said:
                    logging.getLogger(__name__).warning("%s is NOT_SERVING (loading its models?): waiting up to %.0f s",
                                                        target, timeout)
                    said = True
                state = "NOT_SERVING"
            except grpc.RpcError as e:
                state = f"{e.code().name}: {e.details()}"
                if time.monotonic() - last_answer > silent_limit:
                    raise TimeoutError(f"{target}: no answer for {silent_limit:.0f} s ({state})") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target}: not SERVING after {timeout:.0f} s ({state})")
            time.sleep(0.5)


def error_details(err: grpc.RpcError) -> dict[str, Any]:
    """What a refusal says in gRPC's rich error model: ``{"field_violations": [(field,
    description), ...], "retry_delay_s": float | None}`` (empty list / None when absent), from
    the ``google.rpc.Status`` the server attaches (BadRequest on INVALID_ARGUMENT, RetryInfo on
    RESOURCE_EXHAUSTED)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    out: dict[str, Any] = {"field_violations": [], "retry_delay_s": None}
    try:  # grpc.RpcError from a channel, or grpc.aio.AioRpcError (not a grpc.Call, same methods)
        status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    except ValueError:  # details that do not match the status the client got (e.g. a transport error)
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out["field_violations"] += [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            out["retry_delay_s"] = info.retry_delay.ToMilliseconds() / 1000
    return out


RETRYABLE = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")


def retry_service_config(attempts: int, *, initial_backoff_s: float = 0.1, max_backoff_s: float = 5.0) -> str:
    """gRPC service config (JSON) that retries rerankd's unary calls on RESOURCE_EXHAUSTED and
    UNAVAILABLE, up to ``attempts`` tries in all, within the call's deadline. The server sends
    ``grpc-retry-pushback-ms`` with every overload refusal, which gRPC's retry waits for instead of
    its own backoff. Every unary rerankd call is safe to repeat (Upsert replaces by id, Delete of a
    deleted id is a no-op); UpsertStream is not retried. Any gRPC client can use the same config
    (channel option ``grpc.service_config``; raise its per-call retry buffer, 256 KiB by default,
    or larger requests are never retried: ``retry_options``). A refusal whose hint exceeds the
    call's remaining deadline comes with a pushback that says "do not retry", so the caller gets
    RESOURCE_EXHAUSTED at once instead of waiting out its deadline."""
    if attempts < 2:
        raise ValueError("attempts must be at least 2 (1 = no retries: leave the config out)")
    unary = ["Search", "Encode", "Score", "Upsert", "Delete", "Get", "Stats", "Compact"]
    return json.dumps({"methodConfig": [{
        "name": [{"service": "rerankd.v1.Retrieval", "method": m} for m in unary],
        "retryPolicy": {
            "maxAttempts": min(int(attempts), 5),  # gRPC caps it at 5
            "initialBackoff": f"{initial_backoff_s}s", "maxBackoff": f"{max_backoff_s}s", "backoffMultiplier": 2,
            "retryableStatusCodes": list(RETRYABLE),
        },
    }]})


def retry_options(retries: int) -> list[tuple[str, Any]]:
    """Channel options for ``retries`` extra tries (``retry_service_config``). gRPC keeps a copy of
    each request to resend it, and by default only up to 256 KiB per call (a review: a 300 KB
    Score was never retried): the buffers are raised to the message size limit."""
    return [("grpc.enable_retries", 1), ("grpc.service_config", retry_service_config(retries + 1)),
            ("grpc.per_rpc_retry_buffer_size", 64 << 20), ("grpc.retry_buffer_size", 256 << 20)]



# -- request building and response shaping, shared by Client and AsyncClient -------------------------
def _check_model(wanted: str | None, served: str) -> None:
    if wanted is not None and wanted != served:
        raise ValueError(f"server runs model {served!r}, not {wanted!r}")


def _search_request(query, top_n, candidates, rerank, first_stage, include_text, include_metadata,
                    fusion_weight, filter, budget_ms=None, collapse_key="", collapse_max=None,
                    diversity=None, skip_cache=False) -> pb.SearchRequest:  # noqa: A002 - filter: the API's name
    conds = []
    for k, v in (filter or {}).items():
        values = [v] if isinstance(v, str) else list(v) if isinstance(v, Iterable) else None
        if values is None or not all(isinstance(x, str) for x in values):
            raise TypeError(f"filter[{k!r}]: metadata values are strings; give a str or a list of str, got {v!r}")
        conds.append(pb.MetadataMatch(key=k, values=values))
    return pb.SearchRequest(query=query, top_n=top_n, candidates=candidates, rerank=rerank, first_stage=_stage(first_stage),
                            include_text=include_text, include_metadata=include_metadata, fusion_weight=fusion_weight,
                            filter=conds, budget_ms=budget_ms, collapse_key=collapse_key or "",
                            collapse_max=collapse_max, diversity=diversity, skip_cache=bool(skip_cache))


def _hits(resp: pb.SearchResponse, include_metadata: bool, raw: bool) -> list[dict[str, Any]] | pb.SearchResponse:
    if raw:
        return resp
    out = []
    for h in resp.hits:
        d: dict[str, Any] = {"id": h.id, "score": h.score, "rank": h.rank,
                             "first_stage_score": h.first_stage_score, "first_stage_rank": h.first_stage_rank,
                             "dense_rank": h.dense_rank, "bm25_rank": h.bm25_rank}
        if h.HasField("rerank_score"):
            d["rerank_score"] = h.rerank_score
        if h.HasField("text"):
            d["text"] = h.text
            d["title"] = h.title
        if include_metadata:
            d["metadata"] = dict(h.metadata)
        out.append(d)
    return out


def _encode_request(items, single: bool, is_query: bool) -> pb.EncodeRequest:
    return pb.EncodeRequest(items=_items([items] if single else items), is_query=is_query)


def _vectors(resp: pb.EncodeResponse, model: str | None, single: bool) -> np.ndarray:
    _check_model(model, resp.model)
    vecs = np.asarray([list(e.vector) for e in resp.embeddings], dtype=np.float32).reshape(-1, resp.dimension)
    return vecs[0] if single else vecs


def _score_request(query: str, items: Iterable[ItemLike], top_n: int | None, budget_ms: int | None,
                   skip_cache: bool = False) -> pb.ScoreRequest:
    return pb.ScoreRequest(query=query, items=_items(items), top_n=top_n, budget_ms=budget_ms, skip_cache=bool(skip_cache))


def _scores(resp: pb.ScoreResponse, model: str | None, raw: bool = False) -> list[dict[str, Any]] | pb.ScoreResponse:
    _check_model(model, resp.model)
    if raw:
        return resp
    return [{"item_id": s.item_id, "score": s.score, "rank": s.rank, "index": s.index} for s in resp.scores]


def _upsert_timeout(timeout: float | None, default: float | None, docs: list) -> float | None:
    if timeout is None and default is not None:
        return max(default, float(len(docs)))
    return timeout


def _requests(batches: Iterable[Iterable[Mapping[str, Any]]], failure: list[BaseException]) -> Iterator[pb.UpsertRequest]:
    """An UpsertStream's requests; an exception of the source is kept in ``failure`` (gRPC
    replaces it by UNKNOWN "Exception iterating requests!") for ``_reraise_source_error``."""
    try:
        for batch in batches:
            yield pb.UpsertRequest(documents=[_doc(d) for d in batch])
    except Exception as e:
        failure.append(e)
        raise


async def _async_requests(batches, failure: list[BaseException]) -> AsyncIterator[pb.UpsertRequest]:
    """``_requests`` for AsyncClient: ``batches`` may be an iterable or an async iterable."""
    if not isinstance(batches, AsyncIterable):
        for req in _requests(batches, failure):
            yield req
        return
    try:
        async for batch in batches:
            yield pb.UpsertRequest(documents=[_doc(d) for d in batch])
    except Exception as e:
        failure.append(e)
        raise


def _reraise_source_error(failure: list[BaseException]) -> None:
    if failure:
        exc = failure[0]
        exc.add_note("rerankd: the UpsertStream was cancelled; batches sent before this error may have been committed")
        raise exc from None

class Client:
    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = 30.0,
                 credentials: grpc.ChannelCredentials | None = None, metadata: list[tuple[str, str]] | None = None,
                 options: list[tuple[str, Any]] | None = None, retries: int = 2) -> None:
        """``retries``: extra tries of a unary call refused with RESOURCE_EXHAUSTED or UNAVAILABLE
        (default 2, at most 4; 0 = none, for load tests that must see refusals), after the
        server's retry-after hint, within the call's deadline (see ``retry_service_config``).
        Every rerankd call is safe to repeat (a Delete retried after a lost reply reports the ids
        its first try deleted as not_found). ``timeout``: the default deadline in seconds
        (``upsert`` allows at least 1 s per document; ``upsert_stream`` has none)."""
        opts = list(options or DEFAULT_OPTIONS)
        if retries:
            opts += retry_options(retries)
        self._channel = grpc.secure_channel(target, credentials, opts) if credentials else grpc.insecure_channel(target, opts)
        self._stub = pb_grpc.RetrievalStub(self._channel)
        self.timeout = timeout
        self.metadata = metadata

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        # The caller's trace context (W3C traceparent) rides along when it has an active span.
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": tracing.inject(self.metadata)}

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    # -- RPCs ------------------------------------------------------------------------------------------
    def search(self, query: str, *, top_n: int | None = None, candidates: int | None = None, rerank: bool | None = None,
               first_stage: str | None = None, include_text: bool = False, include_metadata: bool = False,
               fusion_weight: float | None = None, filter: Mapping[str, str | Iterable[str]] | None = None,
               budget_ms: int | None = None, collapse_key: str | None = None, collapse_max: int | None = None,
               diversity: float | None = None, skip_cache: bool = False, timeout: float | None = None,
               raw: bool = False) -> list[dict[str, Any]] | pb.SearchResponse:
        """``filter``: metadata conditions, e.g. ``{"lang": "en", "source": ["pubmed", "arxiv"]}``
        (every key must match; a list means any of its values). ``budget_ms``: soft latency
        budget; the candidates it left unreranked follow the reranked ones in first-stage order,
        without ``rerank_score`` (``raw=True``: ``reranked_candidates`` in the response).
        ``collapse_key``: at most ``collapse_max`` (default 1) hits per value of that metadata key,
        e.g. one chunk per parent document (``raw=True``: ``collapsed`` in the response).
        ``diversity`` (0..1): maximal marginal relevance, near-duplicates give way to other content.
        ``skip_cache``: rerank with the model, bypassing the server's score cache (benchmarks;
        ``raw=True``: ``cache_hits`` in the response)."""
        req = _search_request(query, top_n, candidates, rerank, first_stage, include_text, include_metadata,
                              fusion_weight, filter, budget_ms, collapse_key, collapse_max, diversity, skip_cache)
        return _hits(self._stub.Search(req, **self._kw(timeout)), include_metadata, raw)

    def encode(self, items: ItemLike | Iterable[ItemLike], *, is_query: bool = False, model: str | None = None,
               timeout: float | None = None) -> np.ndarray:
        single = isinstance(items, (str, Mapping))
        resp = self._stub.Encode(_encode_request(items, single, is_query), **self._kw(timeout))
        return _vectors(resp, model, single)

    def score(self, query: str, items: Iterable[ItemLike], *, model: str | None = None, top_n: int | None = None,
              budget_ms: int | None = None, skip_cache: bool = False, timeout: float | None = None,
              raw: bool = False) -> list[dict[str, Any]] | pb.ScoreResponse:
        """Best first: ``[{"item_id", "score", "rank", "index"}]`` (``index``: the item's position in
        ``items``; a plain string's id is its position too). ``top_n``: only the best n.
        ``budget_ms``: soft latency budget; items are scored in the order given and the ones it
        left unscored follow the scored ones in that order, with score ``-inf`` (``raw=True``:
        the response, with ``unscored_items``). ``skip_cache``: score with the model, bypassing
        the server's score cache (``raw=True``: ``cache_hits`` in the response)."""
        resp = self._stub.Score(_score_request(query, items, top_n, budget_ms, skip_cache), **self._kw(timeout))
        return _scores(resp, model, raw)

    def upsert(self, documents: Iterable[Mapping[str, Any]], *, timeout: float | None = None) -> pb.UpsertResponse:
        """Insert or replace ``documents`` (acknowledged once durable). Without ``timeout`` the
        deadline is the client's, but at least 1 s per document: embedding is the slow part
        (~18 documents/s on a 2-core AVX2 CPU), and a deadline that passes mid-call commits
        nothing. Batches of 32-64 documents (as `rerankd index` sends) keep calls short."""
        docs = [_doc(d) for d in documents]
        return self._stub.Upsert(pb.UpsertRequest(documents=docs), **self._kw(_upsert_timeout(timeout, self.timeout, docs)))

    def upsert_stream(self, batches: Iterable[Iterable[Mapping[str, Any]]], *, timeout: float | None = None) -> pb.UpsertResponse:
        """Bulk ingest over one client stream. No deadline unless ``timeout`` is given (a corpus can
        take minutes). An exception raised by ``batches`` (or a bad document in it) is re-raised
        as itself — gRPC would report it as UNKNOWN "Exception iterating requests!" — after the
        stream was cancelled: the batches sent before it may have been committed."""
        failure: list[BaseException] = []
        try:
            return self._stub.UpsertStream(_requests(batches, failure), timeout=timeout, metadata=tracing.inject(self.metadata))
        except grpc.RpcError:
            _reraise_source_error(failure)
            raise

    def delete(self, ids: Iterable[str], *, timeout: float | None = None) -> pb.DeleteResponse:
        return self._stub.Delete(pb.DeleteRequest(ids=list(ids)), **self._kw(timeout))

    def get(self, ids: Iterable[str], *, timeout: float | None = None) -> pb.GetResponse:
        """Stored documents by id (``documents`` in request order, ``not_found``, ``sequence``)."""
        return self._stub.Get(pb.GetRequest(ids=list(ids)), **self._kw(timeout))

    def stats(self, *, timeout: float | None = None) -> pb.StatsResponse:
        return self._stub.Stats(pb.StatsRequest(), **self._kw(timeout))

    def compact(self, *, timeout: float | None = None) -> pb.CompactResponse:
        return self._stub.Compact(pb.CompactRequest(), **self._kw(timeout if timeout is not None else 600))



class AsyncClient:
    """The same calls as ``Client`` for asyncio applications (grpc.aio; a sync ``Client`` would
    block the event loop for the whole call)::

        async with AsyncClient("localhost:50051") as c:
            hits = await c.search("does aspirin prevent cancer?", top_n=5)
            ranked = await c.score("a query", ["passage one", "passage two"])

    Same arguments, results, defaults (``retries=2``, ``timeout=30``) and errors
    (``grpc.aio.AioRpcError``, readable with ``error_details``). Create it inside the running
    event loop that uses it."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = 30.0,
                 credentials: grpc.ChannelCredentials | None = None, metadata: list[tuple[str, str]] | None = None,
                 options: list[tuple[str, Any]] | None = None, retries: int = 2) -> None:
        opts = list(options or DEFAULT_OPTIONS)
        if retries:
            opts += retry_options(retries)
        self._channel = (grpc.aio.secure_channel(target, credentials, opts) if credentials
                         else grpc.aio.insecure_channel(target, opts))
        self._stub = pb_grpc.RetrievalStub(self._channel)
        self.timeout = timeout
        self.metadata = metadata

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        # The caller's trace context (W3C traceparent) rides along when it has an active span.
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": tracing.inject(self.metadata)}

    async def wait_ready(self, timeout: float = 60.0) -> None:
        await asyncio.wait_for(self._channel.channel_ready(), timeout)

    async def search(self, query: str, *, top_n: int | None = None, candidates: int | None = None,
                     rerank: bool | None = None, first_stage: str | None = None, include_text: bool = False,
                     include_metadata: bool = False, fusion_weight: float | None = None,
                     filter: Mapping[str, str | Iterable[str]] | None = None, budget_ms: int | None = None,
                     collapse_key: str | None = None, collapse_max: int | None = None, diversity: float | None = None,
                     skip_cache: bool = False, timeout: float | None = None,
                     raw: bool = False) -> list[dict[str, Any]] | pb.SearchResponse:
        req = _search_request(query, top_n, candidates, rerank, first_stage, include_text, include_metadata,
                              fusion_weight, filter, budget_ms, collapse_key, collapse_max, diversity, skip_cache)
        return _hits(await self._stub.Search(req, **self._kw(timeout)), include_metadata, raw)

    async def encode(self, items: ItemLike | Iterable[ItemLike], *, is_query: bool = False, model: str | None = None,
                     timeout: float | None = None) -> np.ndarray:
        single = isinstance(items, (str, Mapping))
        resp = await self._stub.Encode(_encode_request(items, single, is_query), **self._kw(timeout))
        return _vectors(resp, model, single)

    async def score(self, query: str, items: Iterable[ItemLike], *, model: str | None = None,
                    top_n: int | None = None, budget_ms: int | None = None, skip_cache: bool = False,
                    timeout: float | None = None, raw: bool = False) -> list[dict[str, Any]] | pb.ScoreResponse:
        resp = await self._stub.Score(_score_request(query, items, top_n, budget_ms, skip_cache), **self._kw(timeout))
        return _scores(resp, model, raw)

    async def upsert(self, documents: Iterable[Mapping[str, Any]], *, timeout: float | None = None) -> pb.UpsertResponse:
        docs = [_doc(d) for d in documents]
        return await self._stub.Upsert(pb.UpsertRequest(documents=docs),
                                       **self._kw(_upsert_timeout(timeout, self.timeout, docs)))

    async def upsert_stream(self, batches: Iterable[Iterable[Mapping[str, Any]]] | AsyncIterable[Iterable[Mapping[str, Any]]],
                            *, timeout: float | None = None) -> pb.UpsertResponse:
        """``batches``: an iterable or an async iterable of lists of documents (see ``Client``)."""
        failure: list[BaseException] = []
        try:
            return await self._stub.UpsertStream(_async_requests(batches, failure), timeout=timeout, metadata=tracing.inject(self.metadata))
        except (grpc.RpcError, asyncio.CancelledError):  # grpc.aio cancels the call when the source raises
            _reraise_source_error(failure)
            raise

    async def delete(self, ids: Iterable[str], *, timeout: float | None = None) -> pb.DeleteResponse:
        return await self._stub.Delete(pb.DeleteRequest(ids=list(ids)), **self._kw(timeout))

    async def get(self, ids: Iterable[str], *, timeout: float | None = None) -> pb.GetResponse:
        return await self._stub.Get(pb.GetRequest(ids=list(ids)), **self._kw(timeout))

    async def stats(self, *, timeout: float | None = None) -> pb.StatsResponse:
        return await self._stub.Stats(pb.StatsRequest(), **self._kw(timeout))

    async def compact(self, *, timeout: float | None = None) -> pb.CompactResponse:
        return await self._stub.Compact(pb.CompactRequest(), **self._kw(timeout if timeout is not None else 600))
