"""Configuration: one frozen keyword-only dataclass per component.

Every field is settable by a CLI flag and an environment variable; both are derived from the
field name (``ef_search`` in ``IndexConfig`` -> ``--ef-search`` / ``RERANKD_EF_SEARCH``) and
documented once, in the field's ``help`` metadata. ``rerankd config`` prints the table that
the README embeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
DEFAULT_RERANKER = "rerankd-ce-MiniLM-L6"


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=tuple(default): d, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    listen: str = _f("[::]:50051", "gRPC listen address(es), comma-separated: host:port or unix:///path")
    grace_period_s: float = _f(10.0, "SIGTERM: seconds to finish in-flight calls before cancelling them")
    stream_idle_timeout_s: float = _f(
        60.0,
        "UpsertStream: end a stream that sends no batch for this long with DEADLINE_EXCEEDED (saying what was "
        "committed), so idle streams cannot hold the method's concurrency slots; 0 = never",
    )
    max_message_bytes: int = _f(16 * 1024 * 1024, "Max gRPC message size (receive and send)")
    max_queue_wait_ratio: float = _f(
        0.0,
        "Reranked Search and Score: also refuse (RESOURCE_EXHAUSTED) when the estimated wait behind the calls already in "
        "flight (their typical solo latency, a budgeted call's at most its budget, minus elapsed time) exceeds this fraction of one call; 0 = off, only "
        "--max-concurrent-search (measured at 0.5: admitted p99 unchanged, see loadtest/README.md)",
    )
    max_concurrent_calls: int = _f(64, "Calls admitted at once per RPC method (reranked Searches and Scores excepted: see --max-concurrent-search); beyond it RESOURCE_EXHAUSTED")
    max_concurrent_search: int = _f(
        2,
        "Calls that run the cross-encoder -- reranked Searches and Scores, together -- admitted at once; beyond it "
        "RESOURCE_EXHAUSTED with a retry hint (first-stage-only Searches count under --max-concurrent-calls). 2 keeps the reranker busy (one batch running, one prepared) "
        "while admitted calls wait at most about one call's time; raise it where reranking is cheap (GPU)",
    )
    early_deadline_reject: bool = _f(True, "Reject at once (DEADLINE_EXCEEDED) a call whose deadline is below half the recent average latency of its method's calls of about its size (a Score is compared with Scores, a reranked Search with reranked Searches, although they share `--max-concurrent-search`; same power of two of items, documents, ids or candidates; after 20 of them); never a stream or Compact. Only successes move that average, so when it has had no news for a second the next call it would refuse goes through as a probe: after a slow spell the check follows the server back down")
    log_level: str = _f("INFO", "Log level (DEBUG logs one line per call)")
    metrics_listen: str = _f("", "Prometheus /metrics HTTP address host:port (empty = off)")
    otlp_endpoint: str = _f(
        "", "OpenTelemetry traces: OTLP/gRPC collector address, e.g. http://otel-collector:4317 (https:// = TLS); "
            "empty = tracing off. One span per call, continuing the caller's W3C traceparent, with a child span per "
            "stage. Needs the tracing extra (installed by setup)")
    trace_sample_ratio: float = _f(
        1.0, "Share of calls without a sampled caller trace that start a trace (0-1); a caller's traceparent "
             "decides for its own calls (parent-based sampling)")
    trace_service_name: str = _f("rerankd", "service.name of the spans (--otlp-endpoint)")
    tls_cert: str = _f("", "TLS server certificate chain (PEM); with --tls-key enables TLS on TCP listeners")
    tls_key: str = _f("", "TLS server private key (PEM)")
    tls_client_ca: str = _f("", "CA bundle (PEM) to require and verify client certificates (mTLS)")
    auth_token: str = _f("", "Static bearer token required in `authorization: Bearer <token>` (health checks exempt)")
    keepalive_time_s: float = _f(60.0, "Server keepalive ping interval on idle connections")
    keepalive_timeout_s: float = _f(20.0, "Keepalive ping ack timeout before the connection is closed")
    min_client_ping_interval_s: float = _f(10.0, "Smallest client keepalive ping interval accepted")
    max_connection_age_s: float = _f(0.0, "Close connections after this age so clients rebalance (0 = never)")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    models_dir: Path = _f(Path("models"), "Directory of exported model bundles (rerankd export)")
    embedder: str = _f(DEFAULT_EMBEDDER, "Embedder bundle name under --models-dir")
    reranker: str = _f(DEFAULT_RERANKER, "Cross-encoder bundle name under --models-dir")
    backend: str = _f("auto", "Inference backend: auto | onnxruntime | openvino | cuda (auto = fastest gated variant; cuda needs onnxruntime-gpu and a GPU)")
    precision: str = _f("auto", "Precision: auto | fp32 | int8 | bf16 (openvino) | fp16 (cuda); must be a gated bundle variant")
    threads: int = _f(0, "Intra-op threads per model (0 = number of CPU cores)")
    openvino_compile: str = _f(
        "shared",
        "OpenVINO: shared = one compiled model serves every bucket shape (~0.8 GiB server RSS with both models); "
        "per-shape = one compiled model per (batch, length) bucket (~90 MB each: ~5.4 GiB for both default models; "
        "~8 percent faster per batch)",
    )
    device_id: int = _f(0, "cuda backend: CUDA device index")
    gpu_provider: str = _f(
        "auto",
        "cuda backend: auto | tensorrt | cuda (auto = TensorRT when onnxruntime-gpu has it and libnvinfer loads, else CUDA)",
    )
    tensorrt_cache_dir: str = _f("", "cuda backend with TensorRT: engine/timing cache directory (empty = <data-dir>/tensorrt-cache)")
    score_activation: str = _f("none", "Reranker score: none (raw logit) | sigmoid")
    max_query_tokens: int = _f(128, "Reranker: queries up to this many tokens are kept whole (the passage is cut); longer ones are rejected")
    rerank_cache_entries: int = _f(
        100_000,
        "Reranker score cache: scores of this many recently scored (query, passage) pairs are kept and reused, keyed "
        "by the exact token ids and token types the model reads (~0.18 KB each; 0 = off)")


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    batch_sizes: tuple[int, ...] = _f((1, 2, 4, 8, 16, 32), "Batch-size buckets (fixed shapes)", type=int, nargs="+")
    seq_buckets: tuple[int, ...] = _f((32, 64, 128, 192, 256), "Sequence-length buckets (fixed shapes)", type=int, nargs="+")
    max_batch_tokens: int = _f(
        0,
        "Token budget per batch (batch size x padded length); 0 = auto: 2048 on CPU backends (8 passages of 256 "
        "tokens: a Search's query waits for at most one such batch of an Upsert's documents, and CPU throughput "
        "is the same as with 8192), 8192 on the cuda backend (a 50-passage rerank in two batches)",
    )
    max_queue: int = _f(4096, "Sequences waiting per model; beyond it calls get RESOURCE_EXHAUSTED (at least --max-candidates and --max-items, checked at start)")
    sort_window: int = _f(256, "Queued sequences considered together for length sorting")
    batch_order: str = _f(
        "length",
        "Order inside the sort window: length = longest first across all queued calls (least padding), except that a call which stayed the oldest while 2 batches took none of its rows goes next, in batches of its own length (short work is never starved); "
        "arrival = oldest call first, longest first within a call (a running call is not slowed by newcomers)",
    )
    warmup: bool = _f(True, "Run every (batch, length) bucket once before reporting SERVING")


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    data_dir: Path = _f(Path("data"), "Data directory: SQLite document store + HNSW snapshot")
    hnsw_m: int = _f(32, "HNSW M (graph degree)")
    ef_construction: int = _f(200, "HNSW ef_construction")
    ef_search: int = _f(256, "HNSW ef at query time (raised to k when k is larger)")
    rrf_k: int = _f(20, "Reciprocal-rank-fusion constant for hybrid retrieval (20 and depth 400 beat the "
                        "classic 60 and 100 on SciFact train: Recall@100 0.961 vs 0.956, NDCG@10 0.707 vs 0.701)")
    first_stage: str = _f("hybrid", "Default first stage: dense | bm25 | hybrid")
    hybrid_depth: int = _f(400, "Hybrid: candidates taken from each leg before fusion (at least k)")
    rerank_fusion_weight: float = _f(
        0.0,
        "Rerank fusion: final order = z(reranker scores) + weight * z(-ln first-stage rank) over the candidates; "
        "0 = reranker order alone, the default: for rerankers trained with the shipped recipe it gave no reliable "
        "gain on held-out train claims, see README (SearchRequest.fusion_weight overrides per call)",
    )
    search_budget_ms: int = _f(
        0,
        "Soft latency budget of a reranked Search, in ms from its arrival: the cross-encoder scores the candidates in "
        "first-stage order, a batch at a time, and starts no batch it expects to end past the budget; the rest follow "
        "in first-stage order (SearchResponse.reranked_candidates says how many were reranked). 0 = no budget, rerank "
        "every candidate (SearchRequest.budget_ms overrides per call)",
    )
    filter_exact_max: int = _f(
        50000,
        "Metadata-filtered dense search: most matching documents it scores exactly (vectors read from the store, "
        "~5 us each). Up to it the cheaper of that scan and an oversampled unfiltered HNSW search is used (a cost "
        "model measured by scripts/filter_bench.py); above it always HNSW, which may return fewer than k matches",
    )
    snapshot_every: int = _f(
        10000,
        "Save the HNSW snapshot in the background after this many changes (upserted or deleted documents), "
        "so a restart after a crash replays at most about that many; each snapshot also prunes the change log and saves the BM25 index; 0 = only at shutdown, Compact and graph rebuilds (the log grows until one)",
    )
    auto_compact_ratio: float = _f(
        1.0,
        "Rebuild the HNSW graph in the background (as Compact does) once entries marked deleted exceed this many "
        "times the live documents: past that, hnswlib leaves live documents unreachable; 0 = only by Compact",
    )


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    max_candidates: int = _f(1000, "Largest `candidates` (k) a Search may ask for")
    max_top_n: int = _f(1000, "Largest `top_n` a Search may ask for")
    max_items: int = _f(512, "Most items/documents/ids per Encode, Score, Upsert, Delete or Get call")
    max_text_bytes: int = _f(65536, "Largest text of one item or document (UTF-8 bytes)")
    max_query_bytes: int = _f(4096, "Largest query (UTF-8 bytes)")
    max_id_bytes: int = _f(512, "Largest id (UTF-8 bytes)")
    max_metadata_bytes: int = _f(65536, "Largest metadata of one document: keys + values (UTF-8 bytes)")


@dataclass(frozen=True, kw_only=True)
class Settings:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def replace(self, **sections: Any) -> "Settings":
        """``settings.replace(index={"ef_search": 64})`` -> a copy with those fields changed."""
        out = {}
        for name, changes in sections.items():
            out[name] = dataclasses.replace(getattr(self, name), **changes)
        return dataclasses.replace(self, **out)


# --max-batch-tokens 0 (auto): measured on the 2-core AVX2 VM, document embedding ran at the same
# rate with 2048 as with 8192 (8.0-9.1 vs 8.0-9.3 docs/s, interleaved), while a first-stage Search
# during a 128-document Upsert waited p50 0.47 s instead of 3.4 s (scripts/ingest_latency.py).
# GPUs want big batches.
AUTO_BATCH_TOKENS = {"cuda": 8192}
AUTO_BATCH_TOKENS_CPU = 2048


def resolve_batch(batch: "BatchConfig", backend_name: str, max_length: int = 0) -> "BatchConfig":
    """``batch`` with ``max_batch_tokens`` 0 (auto) resolved for the backend that will run it,
    and never below one sequence of the model's ``max_length``."""
    if batch.max_batch_tokens:
        return batch
    auto = AUTO_BATCH_TOKENS.get(backend_name, AUTO_BATCH_TOKENS_CPU)
    return dataclasses.replace(batch, max_batch_tokens=max(auto, max_length))


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """How the command line tools (``rerankd index``/``eval --target``, ``health``) reach a server
    run with TLS; the bearer token is ``--auth-token`` / ``RERANKD_AUTH_TOKEN``, as for ``serve``."""
    g = parser.add_argument_group("connecting to a TLS server (--target)")
    env = os.environ.get
    g.add_argument("--tls-ca", default=env("RERANKD_TLS_CA", ""),
                   help="PEM CA bundle that signed the server's certificate: connect with TLS (env RERANKD_TLS_CA)")
    g.add_argument("--tls-client-cert", default=env("RERANKD_TLS_CLIENT_CERT", ""),
                   help="PEM client certificate for a server that requires one (mTLS; env RERANKD_TLS_CLIENT_CERT)")
    g.add_argument("--tls-client-key", default=env("RERANKD_TLS_CLIENT_KEY", ""),
                   help="PEM key of --tls-client-cert (env RERANKD_TLS_CLIENT_KEY)")
    g.add_argument("--tls-server-name", default=env("RERANKD_TLS_SERVER_NAME", ""),
                   help="name the server's certificate must carry when it is not the target's host")


def embedded_settings(settings: "Settings") -> "Settings":
    """The settings of an embedded server (``rerankd index`` / ``eval`` / ``bench`` without
    ``--target``): its only client is the command itself, over loopback, so it listens on
    127.0.0.1 (a free port) without TLS, a token or a metrics endpoint. ``--tls-*`` /
    ``--auth-token`` / ``RERANKD_AUTH_TOKEN`` set for a real server would otherwise lock the
    command out of its own server, and the real server's metrics address would be taken."""
    return settings.replace(server={"listen": "127.0.0.1:0", "tls_cert": "", "tls_key": "", "tls_client_ca": "",
                                    "auth_token": "", "metrics_listen": ""})


# Smallest value each numeric setting takes. A value below it used to start a server that then
# failed every affected call (a review found --rrf-k -1: INTERNAL on every hybrid Search;
# --max-concurrent-search 0: RESOURCE_EXHAUSTED forever; --max-candidates 0: every default Search
# refused); ``check_settings`` refuses it at start instead, naming the flag.
MINIMUM: dict[str, float] = {
    "grace_period_s": 0, "stream_idle_timeout_s": 0, "max_message_bytes": 1, "max_queue_wait_ratio": 0,
    "max_concurrent_calls": 1, "max_concurrent_search": 1, "keepalive_time_s": 0, "keepalive_timeout_s": 0,
    "min_client_ping_interval_s": 0, "max_connection_age_s": 0, "trace_sample_ratio": 0,
    "threads": 0, "device_id": 0, "max_query_tokens": 1, "rerank_cache_entries": 0,
    "max_batch_tokens": 0, "max_queue": 1, "sort_window": 1,
    "hnsw_m": 2, "ef_construction": 1, "ef_search": 1, "rrf_k": 0, "hybrid_depth": 1, "filter_exact_max": 0,
    "snapshot_every": 0, "auto_compact_ratio": 0, "search_budget_ms": 0,
    "max_candidates": 1, "max_top_n": 1, "max_items": 1, "max_text_bytes": 1, "max_query_bytes": 1,
    "max_id_bytes": 1, "max_metadata_bytes": 0,
}

# The words each string setting takes. A typo used to start the server, bind the port, load the
# models and only then fail (--batch-order, --score-activation, --openvino-compile) or was read as
# a default without a word (an unknown --log-level served at INFO).
CHOICES: dict[str, tuple[str, ...]] = {
    "backend": ("auto", "onnxruntime", "openvino", "cuda"),
    "precision": ("auto", "fp32", "int8", "bf16", "fp16"),
    "openvino_compile": ("shared", "per-shape"),
    "gpu_provider": ("auto", "tensorrt", "cuda"),
    "score_activation": ("none", "sigmoid"),
    "batch_order": ("length", "arrival"),
    "log_level": ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL"),  # as logging takes them
}


def setting_name(name: str) -> str:
    """How an error names a setting: its flag and its environment variable, either of which the
    user may have set."""
    return f"{flag_name(name)} ({env_name(name)})"


def check_settings(settings: "Settings") -> None:
    """Refuse, naming the flag, a setting no call could work with (ConfigError): a number below
    its ``MINIMUM``, a word outside its ``CHOICES``. Combinations (a precision a backend lacks)
    are checked by the backends as they are built."""
    from .errors import ConfigError, InvalidArgument
    from .validation import check_budget, check_fusion_weight

    for section in SECTIONS:
        for f in dataclasses.fields(SECTIONS[section]):
            v = getattr(getattr(settings, section), f.name)
            low = MINIMUM.get(f.name)
            if low is not None and not v >= low:  # "not >=" also refuses NaN
                raise ConfigError(f"{setting_name(f.name)} must be at least {low:g}, got {v!r}")
            if isinstance(v, tuple) and not (v and all(x >= 1 for x in v)):  # --batch-sizes, --seq-buckets
                raise ConfigError(f"{setting_name(f.name)} must be one or more numbers of at least 1, got {' '.join(map(str, v))!r}")
            allowed = choices(f.name)
            if allowed and (v.upper() if f.name == "log_level" else v) not in allowed:
                raise ConfigError(f"{setting_name(f.name)} must be one of {', '.join(allowed)}, got {v!r}")
    try:
        check_fusion_weight(settings.index.rerank_fusion_weight, "rerank_fusion_weight")
    except InvalidArgument as e:
        raise ConfigError(f"{setting_name('rerank_fusion_weight')}: {e}") from None
    try:
        check_budget(settings.index.search_budget_ms, "search_budget_ms")
    except InvalidArgument as e:
        raise ConfigError(f"{setting_name('search_budget_ms')}: {e}") from None
    if not settings.server.trace_sample_ratio <= 1:
        raise ConfigError(f"{setting_name('trace_sample_ratio')} must be at most 1, got {settings.server.trace_sample_ratio!r}")
    # A call whose sequences can never fit the queue would get a retryable RESOURCE_EXHAUSTED
    # forever: the largest call the limits admit (a reranked Search's candidates, a Score's
    # items, an Upsert's documents) must fit an empty queue.
    lim = settings.limits
    biggest = max(lim.max_candidates, lim.max_items)
    if settings.batch.max_queue < biggest:
        raise ConfigError(f"--max-queue {settings.batch.max_queue} is below the largest call the limits admit "
                          f"({biggest}: --max-candidates {lim.max_candidates}, --max-items "
                          f"{lim.max_items}): such calls could never be queued")


def choices(name: str) -> tuple[str, ...]:
    """The words a string setting takes (empty: free text)."""
    if name == "first_stage":
        from .validation import FIRST_STAGES

        return tuple(FIRST_STAGES)
    return CHOICES.get(name, ())


SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "model": ModelConfig,
    "batch": BatchConfig,
    "index": IndexConfig,
    "limits": LimitsConfig,
}

T = TypeVar("T")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return "RERANKD_" + name.upper()


def _parse_value(f: dataclasses.Field, raw: str) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(default, bool):
        v = raw.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise ValueError("not a boolean")
    if isinstance(default, tuple):
        return tuple(int(x) for x in raw.replace(",", " ").split())
    if isinstance(default, Path):
        return Path(raw)
    return type(default)(raw)


def _kind(f: dataclasses.Field) -> str:
    default = _default(f)
    if isinstance(default, bool):
        return "a boolean (1/0, true/false, yes/no, on/off)"
    if isinstance(default, tuple):
        return "whole numbers separated by spaces or commas"
    return {int: "a whole number", float: "a number"}.get(type(default), "text")


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def add_arguments(parser: argparse.ArgumentParser, sections: tuple[str, ...] = tuple(SECTIONS)) -> None:
    """Add one flag per config field. Defaults are resolved later (flag > env > default)."""
    for section in sections:
        cls = SECTIONS[section]
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            default = _default(f)
            help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {_show(default)}]"
            kw: dict[str, Any] = {"dest": f"{section}__{f.name}", "default": None, "help": help_text}
            if not isinstance(default, bool):
                kw["metavar"] = f.name.upper()
            if isinstance(default, bool):
                kw["action"] = argparse.BooleanOptionalAction
            elif isinstance(default, tuple):
                kw["type"] = int
                kw["nargs"] = "+"
            elif isinstance(default, Path):
                kw["type"] = Path
            else:
                kw["type"] = type(default)
            group.add_argument(flag_name(f.name), **kw)


def settings_from_args(args: argparse.Namespace | None = None, env: dict[str, str] | None = None) -> Settings:
    from .errors import ConfigError

    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            given = getattr(args, f"{section}__{f.name}", None) if args is not None else None
            if given is not None:
                kwargs[f.name] = tuple(given) if isinstance(given, list) else given
            elif env_name(f.name) in env:
                try:
                    kwargs[f.name] = _parse_value(f, env[env_name(f.name)])
                except ValueError as e:
                    why = "" if isinstance(_default(f), bool) else f" ({e})"
                    raise ConfigError(f"{env_name(f.name)}: cannot read {env[env_name(f.name)]!r} "
                                      f"as {_kind(f)}{why}") from None
        values[section] = cls(**kwargs)
    return Settings(**values)


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return " ".join(str(x) for x in v)
    return str(v)


def markdown_table() -> str:
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            default = _show(_default(f))
            meaning = f.metadata["help"].replace("|", "\\|")  # a literal | would split the table cell
            rows.append(f"| `{flag_name(f.name)}` | `{env_name(f.name)}` | {f'`{default}`' if default else '(empty)'} | {meaning} |")
    return "\n".join(rows)
