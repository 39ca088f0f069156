"""``rerankd index FILE.jsonl``: bulk ingest through the client-streaming ``UpsertStream`` RPC.

One JSON object per line: ``{"_id" or "id": ..., "title"?: str, "text": str, "metadata"?: {str: str}}``
(BEIR's corpus.jsonl works as is). Lines go to the server in batches of ``--batch-size``; each
batch is committed (durable) by the server before it reads the next one. Without ``--target``
the command runs an embedded server on the same configuration flags as ``rerankd serve``.

A malformed line (bad JSON, invalid UTF-8, missing id, missing or empty text without a title (a
title alone is a document, as the server takes it), a metadata value
that is not a string, a field over the size limits) stops the command: the valid lines before
it are sent and committed first, then it exits non-zero naming the line and saying exactly how
many documents were committed. Re-running the file is safe (upserts by id are idempotent).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as cfg

log = logging.getLogger("rerankd.ingest")

_BATCH_ERR = re.compile(r"^batch\[(\d+)\](?:\.documents\[(\d+)\])?")
_COMMITTED = re.compile(r"with (\d+) documents were committed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help='JSONL file: one {"_id" or "id", "title"?, "text", "metadata"?} object per line')
    parser.add_argument("--target", default=None,
                        help="host:port of a running rerankd server (default: an embedded server on the flags below)")
    parser.add_argument("--batch-size", type=int, default=64, help="documents per UpsertStream message (default 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--timeout", type=float, default=None, help="deadline for the whole stream in seconds (default none)")
    parser.add_argument("--wait-ready", type=float, default=600.0,
                        help="with --target: seconds to wait for a server still loading its models (default 600)")
    cfg.add_arguments(parser)
    cfg.add_connection_arguments(parser)


class LineError(Exception):
    def __init__(self, lineno: int, reason: str) -> None:
        super().__init__(f"line {lineno}: {reason}")
        self.lineno = lineno
        self.reason = reason


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    title: str
    metadata: dict[str, str]


def _utf8(value: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate escape)") from None


def parse_line(raw: bytes, lineno: int, limits: cfg.LimitsConfig) -> Doc | None:
    """One JSONL line -> a document, None for a blank line; raises ``LineError``."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte-order mark
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineError(lineno, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise LineError(lineno, f"bad JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise LineError(lineno, f"expected a JSON object, got {type(obj).__name__}")
    try:
        return _document(obj, limits)
    except ValueError as e:
        raise LineError(lineno, str(e)) from None


def _document(obj: dict[str, Any], limits: cfg.LimitsConfig) -> Doc:
    key = "_id" if "_id" in obj else "id"
    doc_id = obj.get(key)
    if doc_id is None or doc_id == "":
        raise ValueError('missing id ("_id" or "id")')
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise ValueError(f'"{key}" must be a string, got {type(doc_id).__name__}')
    doc_id = str(doc_id)
    _utf8(doc_id, f'"{key}"')
    if len(doc_id.encode("utf-8")) > limits.max_id_bytes:
        raise ValueError(f'"{key}" is longer than {limits.max_id_bytes} bytes')

    title = obj.get("title")
    if title is None:
        title = ""
    if not isinstance(title, str):
        raise ValueError(f'"title" must be a string, got {type(title).__name__}')
    _utf8(title, '"title"')
    if len(title.encode("utf-8")) > limits.max_text_bytes:
        raise ValueError(f'"title" is over the limit of {limits.max_text_bytes} bytes')

    text = obj.get("text")
    if text is None:
        text = ""
        if not title.strip():
            raise ValueError('missing "text"')
    if not isinstance(text, str):
        raise ValueError(f'"text" must be a string, got {type(text).__name__}')
    # An abstract-less entry (TREC-COVID has them) is its title alone, as the server takes it.
    if not text.strip() and not title.strip():
        raise ValueError('empty "text" (and no "title")')
    _utf8(text, '"text"')
    if len(text.encode("utf-8")) > limits.max_text_bytes:
        raise ValueError(f'"text" is {len(text.encode("utf-8"))} bytes, over the limit of {limits.max_text_bytes}')

    meta = obj.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ValueError(f'"metadata" must be an object of strings, got {type(meta).__name__}')
    for k, v in meta.items():
        if not isinstance(v, str):
            raise ValueError(f'metadata value for {k!r} must be a string, got {type(v).__name__}')
        _utf8(k, "a metadata key")
        _utf8(v, f"metadata value for {k!r}")
    return Doc(doc_id, text, title, dict(meta))


@dataclass
class Feeder:
    """The request iterator: reads, validates and batches lines; never raises into gRPC."""

    path: Path
    batch_size: int
    limits: cfg.LimitsConfig
    error: LineError | None = None
    io_error: BaseException | None = None
    batches: list[list[int]] = field(default_factory=list)  # line numbers of each batch sent
    sent_docs: int = 0

    def _emit(self, batch: list[Doc], lines: list[int]):
        from .v1 import rerankd_pb2 as pb

        self.batches.append(lines)
        self.sent_docs += len(batch)
        return pb.UpsertRequest(documents=[
            pb.Document(id=d.id, text=d.text, title=d.title, metadata=d.metadata) for d in batch
        ])

    def __iter__(self):
        batch: list[Doc] = []
        lines: list[int] = []
        ids: set[str] = set()
        try:
            with open(self.path, "rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    try:
                        doc = parse_line(raw, lineno, self.limits)
                    except LineError as e:
                        self.error = e
                        break
                    if doc is None:
                        continue
                    if doc.id in ids:  # an id twice in one call is refused: the later line goes next
                        yield self._emit(batch, lines)
                        batch, lines, ids = [], [], set()
                    batch.append(doc)
                    lines.append(lineno)
                    ids.add(doc.id)
                    if len(batch) >= self.batch_size:
                        yield self._emit(batch, lines)
                        batch, lines, ids = [], [], set()
        except Exception as e:  # an exception raised into gRPC would cancel the call mid-batch
            self.io_error = e
        if batch:  # the valid lines before a malformed one are committed too
            yield self._emit(batch, lines)


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                n += 1
    return n


def _stream(target: str, feeder: Feeder, timeout: float | None, bar, conn: dict | None = None):
    """Run the stream. gRPC flow control lets the reader run megabytes ahead of the server, so
    the progress bar follows the server's committed sequence (polled with Stats) instead of the
    lines sent; with other writers on the same server it is approximate, and documents that were
    unchanged (skipped by the server) show only in the ``sent`` count."""
    import threading

    import grpc

    from .v1 import rerankd_pb2 as pb
    from .v1 import rerankd_pb2_grpc as pb_grpc

    from .client import open_channel

    conn = conn or {}
    md = conn.get("metadata")
    with open_channel(target, **conn) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        stub = pb_grpc.RetrievalStub(ch)
        seq0 = stub.Stats(pb.StatsRequest(), timeout=30, metadata=md).sequence
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(1.0):
                try:
                    seq = stub.Stats(pb.StatsRequest(), timeout=10, metadata=md).sequence
                except grpc.RpcError:
                    continue
                bar.n = min(max(seq - seq0, 0), feeder.sent_docs)
                bar.set_postfix(sent=feeder.sent_docs, refresh=False)
                bar.refresh()

        poller = threading.Thread(target=poll, name="ingest-progress", daemon=True)
        if not bar.disable:
            poller.start()
        try:
            return stub.UpsertStream(iter(feeder), timeout=timeout, metadata=md)
        finally:
            stop.set()
            if poller.is_alive():
                poller.join(15)


def _ingest(target: str, args: argparse.Namespace, limits: cfg.LimitsConfig, conn: dict | None = None) -> int:
    import grpc
    from tqdm import tqdm

    path: Path = args.file
    total = _count_lines(path)
    bar = tqdm(total=total, unit="doc", desc=f"indexing {path.name}", disable=args.no_progress, file=sys.stderr)
    feeder = Feeder(path, args.batch_size, limits)
    t0 = time.perf_counter()
    try:
        resp = _stream(target, feeder, args.timeout, bar, conn)
    except grpc.RpcError as e:
        bar.close()
        return _report_rpc_error(e, feeder, path)
    except grpc.FutureTimeoutError:
        bar.close()
        print(f"error: could not connect to {target}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    bar.n = resp.upserted
    bar.refresh()
    bar.close()
    rate = resp.upserted / seconds if seconds > 0 else 0.0
    print(f"indexed {resp.upserted} documents ({resp.replaced} replaced, {resp.unchanged} unchanged) in {seconds:.1f} s: {rate:.1f} docs/s "
          f"(sequence {resp.sequence})")
    if feeder.error is not None:
        ln = feeder.error.lineno
        print(f"error: {path}:{ln}: {feeder.error.reason}\n"
              f"stopped at line {ln}: {resp.upserted} documents were committed (the valid lines before line {ln}); "
              f"line {ln} and the lines after it were not indexed", file=sys.stderr)
        return 1
    if feeder.io_error is not None:
        last = feeder.batches[-1][-1] if feeder.batches else 0
        print(f"error: reading {path} failed after line {last}: {feeder.io_error}\n"
              f"{resp.upserted} documents were committed (lines 1-{last})", file=sys.stderr)
        return 1
    return 0


def _report_rpc_error(e, feeder: Feeder, path: Path) -> int:
    import grpc

    code, details = e.code(), e.details() or ""
    m = _BATCH_ERR.match(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT and m and int(m.group(1)) < len(feeder.batches):
        n = int(m.group(1))
        lines = feeder.batches[n]
        line = lines[int(m.group(2))] if m.group(2) is not None and int(m.group(2)) < len(lines) else lines[0]
        c = _COMMITTED.search(details)
        committed = int(c.group(1)) if c else sum(len(b) for b in feeder.batches[:n])
        last_ok = feeder.batches[n - 1][-1] if n > 0 else 0
        print(f"error: {path}:{line}: the server refused the document: {details}\n"
              f"stopped at line {line}: {committed} documents were committed (lines 1-{last_ok}); "
              f"the batch of lines {lines[0]}-{lines[-1]} and everything after it were not indexed", file=sys.stderr)
        return 1
    last = feeder.batches[-1][-1] if feeder.batches else 0
    c = _COMMITTED.search(details)
    known = (f"the server reports {c.group(1)} documents committed" if c
             else "whether the last batches were committed is unknown")
    print(f"error: UpsertStream failed: {code.name}: {details}\n"
          f"{feeder.sent_docs} documents (lines 1-{last}) were sent; {known}. "
          f"Re-running the file is safe (upserts by id are idempotent).", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    settings = cfg.settings_from_args(args)
    level = args.server__log_level or "WARNING"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path: Path = args.file
    if not path.is_file():
        print(f"error: {path}: no such file", file=sys.stderr)
        return 2
    if not 1 <= args.batch_size <= settings.limits.max_items:
        print(f"error: --batch-size must be 1..{settings.limits.max_items} (--max-items)", file=sys.stderr)
        return 2
    if args.target:
        from .client import connection, wait_serving

        try:
            conn = connection(args, settings.server.auth_token, args.target)
            wait_serving(args.target, args.wait_ready, **conn)  # a server still warming up answers NOT_SERVING
        except (OSError, ValueError, TimeoutError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return _ingest(args.target, args, settings.limits, conn)

    from .embedded import EmbeddedServer

    t0 = time.perf_counter()
    srv = EmbeddedServer(cfg.embedded_settings(settings))
    try:
        srv.start()
    except BaseException as e:
        print(f"error: the embedded server failed to start: {e}", file=sys.stderr)
        srv.stop()
        return 1
    log.info("embedded server ready in %.1f s", time.perf_counter() - t0)
    try:
        return _ingest(srv.target, args, settings.limits)
    finally:
        srv.stop()  # graceful: saves the HNSW snapshot
