"""Distributed tracing with OpenTelemetry: one SERVER span per RPC, child spans per stage.

The caller's W3C trace context (``traceparent`` / ``tracestate`` gRPC metadata, what Envoy-based
meshes and every OpenTelemetry client propagate) is continued, so a Search shows up inside the
trace of the request that made it, with its stages (query embedding, ANN, BM25, fusion, document
reads, rerank with its queue wait) as children. Spans go to an OTLP/gRPC collector
(``--otlp-endpoint``; the ``tracing`` extra: opentelemetry-sdk and the OTLP exporter). Off by
default: the OpenTelemetry API's no-op tracer then costs about a microsecond per span.

The server span is opened in ``RetrievalServicer._run`` rather than by
opentelemetry-instrumentation-grpc's interceptor (a beta package): there it gets the status code
rerankd decided (admission refusals, deadlines, validation) and the request id, in a few lines.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger(__name__)
PROPAGATOR = TraceContextTextMapPropagator()
CLOSE_TIMEOUT_S = 5.0  # at shutdown, spans still buffered get this long to reach the collector
NOOP = trace.NoOpTracer()
INSTRUMENTATION = "rerankd"


def tracer_provider(settings: "Settings", processor=None):
    """A TracerProvider for this server, or None when tracing is off. ``processor``: a span
    processor to use instead of batching to ``--otlp-endpoint`` (tests: an in-memory exporter).
    Root spans (no sampled caller) are sampled at ``--trace-sample-ratio``; a caller's sampling
    decision is always followed (parent-based)."""
    s = settings.server
    if processor is None and not s.otlp_endpoint:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as e:
        raise ConfigError(f"--otlp-endpoint needs the tracing extra (pip install 'rerankd[tracing]'): {e}") from None
    # shutdown_on_exit off: the server shuts the provider down itself, bounded (``close``); the
    # SDK's atexit hook would flush again, unbounded, after a collector had gone away
    provider = TracerProvider(resource=Resource.create({"service.name": s.trace_service_name}),
                              sampler=ParentBased(TraceIdRatioBased(s.trace_sample_ratio)),
                              shutdown_on_exit=False)
    if processor is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # Batched in a background thread: a slow or absent collector never delays a call (spans
        # beyond the queue are dropped, by the SDK's own accounting).
        # (The exporter's own timeout bounds each export, retries included.)
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=s.otlp_endpoint, timeout=CLOSE_TIMEOUT_S,
                                                        insecure=not s.otlp_endpoint.startswith("https://")))
    provider.add_span_processor(processor)
    return provider


def close(provider, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
    """Flush the buffered spans and shut ``provider`` down, waiting at most ``timeout_s``
    (blocking: call it off the event loop). False when that ran out: what was left is dropped
    with the process. The SDK's own timeouts do not bound this (a review measured 15 s of
    ``force_flush(5000)`` with the collector refusing connections), so the work runs in a daemon
    thread that the process does not wait for."""
    def run() -> None:
        try:
            provider.force_flush(round(timeout_s * 1000))
            provider.shutdown()
        except Exception:  # an exporter failing at shutdown must not fail the server's
            log.warning("tracing: flushing spans at shutdown failed", exc_info=True)

    t = threading.Thread(target=run, name="rerankd-trace-close", daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive()


def caller_context(metadata: Iterable[tuple[str, str | bytes]] | None):
    """The caller's trace context from gRPC invocation metadata (None: start a new trace)."""
    carrier = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
    if "traceparent" not in carrier:
        return None
    return PROPAGATOR.extract(carrier)


def inject(metadata: list[tuple[str, str]] | None) -> list[tuple[str, str]] | None:
    """Client side: ``metadata`` plus the current span's context (``traceparent``), when the
    calling application has an active, valid span; else ``metadata`` unchanged."""
    if not trace.get_current_span().get_span_context().is_valid:
        return metadata
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    if not carrier:
        return metadata
    have = {k.lower() for k, _ in (metadata or ())}
    return list(metadata or ()) + [(k, v) for k, v in carrier.items() if k not in have]


def attributes(attrs: Mapping[str, object]) -> dict[str, object]:
    """``attrs`` without its None values (OpenTelemetry refuses None, with a warning per call)."""
    return {k: v for k, v in attrs.items() if v is not None}


def set_attributes(span, attrs: Mapping[str, object]) -> None:
    if span.is_recording():
        span.set_attributes(attributes(attrs))
