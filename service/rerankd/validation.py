"""Input validation shared by every entry point; errors name the offending field."""

from __future__ import annotations

import math

from collections.abc import Sequence

from .config import LimitsConfig
from .errors import InvalidArgument

FIRST_STAGES = ("dense", "bm25", "hybrid")


def _nbytes(s: str) -> int:
    return len(s.encode("utf-8", errors="surrogatepass"))


def check_query(query: str, limits: LimitsConfig, field: str = "query") -> str:
    if not query or not query.strip():
        raise InvalidArgument(field, "must not be empty or whitespace")
    if _nbytes(query) > limits.max_query_bytes:
        raise InvalidArgument(field, f"{_nbytes(query)} bytes exceeds the limit of {limits.max_query_bytes}")
    return query


def check_count(n: int, limits: LimitsConfig, field: str, *, allow_empty: bool = False) -> None:
    if n == 0 and not allow_empty:
        raise InvalidArgument(field, "must contain at least one entry")
    if n > limits.max_items:
        raise InvalidArgument(field, f"{n} entries exceeds the limit of {limits.max_items} per call")


def check_text(text: str, limits: LimitsConfig, field: str) -> None:
    if not text or not text.strip():
        raise InvalidArgument(field, "must not be empty or whitespace")
    n = _nbytes(text)
    if n > limits.max_text_bytes:
        raise InvalidArgument(field, f"{n} bytes exceeds the limit of {limits.max_text_bytes}")


def check_metadata(metadata: dict[str, str], limits: LimitsConfig, field: str) -> None:
    """Per-document metadata bound (keys + values, UTF-8). Metadata is stored with the document,
    decoded for every first-stage candidate and held in the filter index: without a bound one
    Upsert (up to the message size) slows every Search that meets the document and breaks those
    that return it with include_metadata."""
    n = sum(_nbytes(k) + _nbytes(v) for k, v in metadata.items())
    if n > limits.max_metadata_bytes:
        raise InvalidArgument(field, f"{len(metadata)} entries of {n} bytes (keys and values) exceed the limit of "
                                     f"{limits.max_metadata_bytes}")


def check_ids(ids: Sequence[str], limits: LimitsConfig, field: str, *, required: bool = True,
              unique: bool = True) -> None:
    """Ids non-empty (if required), bounded, unique within the call (if unique). ``field`` like
    'items' -> 'items[3].id'."""
    first: dict[str, int] = {}
    for i, doc_id in enumerate(ids):
        name = f"{field}[{i}]" if field.endswith("ids") else f"{field}[{i}].id"
        if not doc_id:
            if required:
                raise InvalidArgument(name, "must not be empty")
            continue
        if _nbytes(doc_id) > limits.max_id_bytes:
            raise InvalidArgument(name, f"id longer than {limits.max_id_bytes} bytes")
        if unique and doc_id in first:
            raise InvalidArgument(name, f"duplicate id {doc_id!r} (first at index {first[doc_id]})")
        first[doc_id] = i


def resolve_search(top_n: int | None, candidates: int | None, limits: LimitsConfig) -> tuple[int, int]:
    if top_n is None:
        # Unset: 10, but never more than the caller's own (valid) candidates or the limits.
        top_n = min(10, limits.max_top_n, limits.max_candidates)
        if candidates is not None and 1 <= candidates < top_n:
            top_n = candidates
    if top_n < 1:
        raise InvalidArgument("top_n", f"must be at least 1, got {top_n}")
    if top_n > limits.max_top_n:
        raise InvalidArgument("top_n", f"{top_n} exceeds the limit of {limits.max_top_n}")
    if candidates is None:
        candidates = min(max(50, top_n), limits.max_candidates)
    if candidates < 1:
        raise InvalidArgument("candidates", f"must be at least 1, got {candidates}")
    if candidates > limits.max_candidates:
        raise InvalidArgument("candidates", f"{candidates} exceeds the limit of {limits.max_candidates}")
    if top_n > candidates:
        raise InvalidArgument("top_n", f"top_n={top_n} is larger than candidates={candidates}")
    return top_n, candidates


MAX_FUSION_WEIGHT = 100.0


def check_fusion_weight(weight: float, field: str = "fusion_weight") -> float:
    w = float(weight)
    if not math.isfinite(w) or w < 0 or w > MAX_FUSION_WEIGHT:
        raise InvalidArgument(field, f"must be a finite number in [0, {MAX_FUSION_WEIGHT:g}], got {weight!r}")
    return w


def check_diversity(value: float, field: str = "diversity") -> float:
    """A Search's MMR trade-off: 0 (off) to 1."""
    v = float(value)
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise InvalidArgument(field, f"must be a number from 0 (off) to 1, got {value!r}")
    return v


MAX_BUDGET_MS = 3_600_000


def check_budget(ms: int, field: str = "budget_ms") -> int:
    """A Search's soft latency budget in ms (0 = none)."""
    if not 0 <= ms <= MAX_BUDGET_MS:
        raise InvalidArgument(field, f"must be 0 (no budget) to {MAX_BUDGET_MS} ms, got {ms}")
    return int(ms)


def check_collapse(key: str, most: int | None, limits: LimitsConfig) -> int:
    """Field collapsing of a Search: hits per value of metadata[key] (0: no collapsing)."""
    if not key:
        if most is not None:
            raise InvalidArgument("collapse_max", "is set without collapse_key (the metadata key to collapse on)")
        return 0
    if _nbytes(key) > limits.max_metadata_bytes:
        raise InvalidArgument("collapse_key", f"longer than {limits.max_metadata_bytes} bytes")
    most = 1 if most is None else int(most)
    if most < 1:
        raise InvalidArgument("collapse_max", f"must be at least 1, got {most}")
    return most


def check_first_stage(name: str, field: str = "first_stage") -> str:
    if name not in FIRST_STAGES:
        raise InvalidArgument(field, f"unknown first stage {name!r}; valid: {', '.join(FIRST_STAGES)}")
    return name


MAX_FILTER_CONDITIONS = 32
MAX_FILTER_VALUES = 1024


def check_filter(conditions: Sequence[tuple[str, Sequence[str] | str]], limits: LimitsConfig,
                 field: str = "filter") -> list[tuple[str, frozenset[str]]]:
    """A Search metadata filter ``[(key, values), ...]`` (AND across, OR within) -> the same
    with each condition's values as a frozenset (a bare string is one value)."""
    if len(conditions) > MAX_FILTER_CONDITIONS:
        raise InvalidArgument(field, f"{len(conditions)} conditions exceeds the limit of {MAX_FILTER_CONDITIONS}")
    out = []
    for i, (key, values) in enumerate(conditions):
        if isinstance(values, str):
            values = (values,)
        # "" is a valid key: metadata maps may hold it. Keys and values are bounded as stored ones are.
        if _nbytes(key) > limits.max_metadata_bytes:
            raise InvalidArgument(f"{field}[{i}].key", f"longer than {limits.max_metadata_bytes} bytes")
        if not values:
            raise InvalidArgument(f"{field}[{i}].values", "must list at least one value")
        if len(values) > MAX_FILTER_VALUES:
            raise InvalidArgument(f"{field}[{i}].values", f"{len(values)} values exceeds the limit of {MAX_FILTER_VALUES}")
        for j, v in enumerate(values):
            if _nbytes(v) > limits.max_metadata_bytes:
                raise InvalidArgument(f"{field}[{i}].values[{j}]", f"longer than {limits.max_metadata_bytes} bytes")
        out.append((key, frozenset(values)))
    return out
