from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FirstStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIRST_STAGE_UNSPECIFIED: _ClassVar[FirstStage]
    FIRST_STAGE_DENSE: _ClassVar[FirstStage]
    FIRST_STAGE_BM25: _ClassVar[FirstStage]
    FIRST_STAGE_HYBRID: _ClassVar[FirstStage]
FIRST_STAGE_UNSPECIFIED: FirstStage
FIRST_STAGE_DENSE: FirstStage
FIRST_STAGE_BM25: FirstStage
FIRST_STAGE_HYBRID: FirstStage

class Item(_message.Message):
    __slots__ = ("id", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class MetadataMatch(_message.Message):
    __slots__ = ("key", "values")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    key: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "top_n", "candidates", "rerank", "include_text", "first_stage", "include_metadata", "fusion_weight", "filter", "budget_ms", "collapse_key", "collapse_max", "diversity", "skip_cache")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TEXT_FIELD_NUMBER: _ClassVar[int]
    FIRST_STAGE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_METADATA_FIELD_NUMBER: _ClassVar[int]
    FUSION_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    COLLAPSE_KEY_FIELD_NUMBER: _ClassVar[int]
    COLLAPSE_MAX_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    SKIP_CACHE_FIELD_NUMBER: _ClassVar[int]
    query: str
    top_n: int
    candidates: int
    rerank: bool
    include_text: bool
    first_stage: FirstStage
    include_metadata: bool
    fusion_weight: float
    filter: _containers.RepeatedCompositeFieldContainer[MetadataMatch]
    budget_ms: int
    collapse_key: str
    collapse_max: int
    diversity: float
    skip_cache: bool
    def __init__(self, query: _Optional[str] = ..., top_n: _Optional[int] = ..., candidates: _Optional[int] = ..., rerank: _Optional[bool] = ..., include_text: _Optional[bool] = ..., first_stage: _Optional[_Union[FirstStage, str]] = ..., include_metadata: _Optional[bool] = ..., fusion_weight: _Optional[float] = ..., filter: _Optional[_Iterable[_Union[MetadataMatch, _Mapping]]] = ..., budget_ms: _Optional[int] = ..., collapse_key: _Optional[str] = ..., collapse_max: _Optional[int] = ..., diversity: _Optional[float] = ..., skip_cache: _Optional[bool] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "rank", "first_stage_score", "first_stage_rank", "text", "metadata", "title", "rerank_score", "dense_rank", "bm25_rank")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    FIRST_STAGE_SCORE_FIELD_NUMBER: _ClassVar[int]
    FIRST_STAGE_RANK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    RERANK_SCORE_FIELD_NUMBER: _ClassVar[int]
    DENSE_RANK_FIELD_NUMBER: _ClassVar[int]
    BM25_RANK_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    rank: int
    first_stage_score: float
    first_stage_rank: int
    text: str
    metadata: _containers.ScalarMap[str, str]
    title: str
    rerank_score: float
    dense_rank: int
    bm25_rank: int
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., first_stage_score: _Optional[float] = ..., first_stage_rank: _Optional[int] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., title: _Optional[str] = ..., rerank_score: _Optional[float] = ..., dense_rank: _Optional[int] = ..., bm25_rank: _Optional[int] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("embed_us", "ann_us", "bm25_us", "fusion_us", "rerank_us", "total_us", "queue_us")
    EMBED_US_FIELD_NUMBER: _ClassVar[int]
    ANN_US_FIELD_NUMBER: _ClassVar[int]
    BM25_US_FIELD_NUMBER: _ClassVar[int]
    FUSION_US_FIELD_NUMBER: _ClassVar[int]
    RERANK_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    embed_us: int
    ann_us: int
    bm25_us: int
    fusion_us: int
    rerank_us: int
    total_us: int
    queue_us: int
    def __init__(self, embed_us: _Optional[int] = ..., ann_us: _Optional[int] = ..., bm25_us: _Optional[int] = ..., fusion_us: _Optional[int] = ..., rerank_us: _Optional[int] = ..., total_us: _Optional[int] = ..., queue_us: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "timings", "embedder_model", "reranker_model", "first_stage", "reranked", "bm25_stale", "reranked_candidates", "collapsed", "cache_hits")
    HITS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_MODEL_FIELD_NUMBER: _ClassVar[int]
    RERANKER_MODEL_FIELD_NUMBER: _ClassVar[int]
    FIRST_STAGE_FIELD_NUMBER: _ClassVar[int]
    RERANKED_FIELD_NUMBER: _ClassVar[int]
    BM25_STALE_FIELD_NUMBER: _ClassVar[int]
    RERANKED_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    COLLAPSED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    timings: StageTimings
    embedder_model: str
    reranker_model: str
    first_stage: FirstStage
    reranked: bool
    bm25_stale: bool
    reranked_candidates: int
    collapsed: int
    cache_hits: int
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., embedder_model: _Optional[str] = ..., reranker_model: _Optional[str] = ..., first_stage: _Optional[_Union[FirstStage, str]] = ..., reranked: _Optional[bool] = ..., bm25_stale: _Optional[bool] = ..., reranked_candidates: _Optional[int] = ..., collapsed: _Optional[int] = ..., cache_hits: _Optional[int] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("items", "is_query")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    IS_QUERY_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    is_query: bool
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., is_query: _Optional[bool] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("id", "vector")
    ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, id: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("embeddings", "dimension", "model", "timings")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dimension: int
    model: str
    timings: StageTimings
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dimension: _Optional[int] = ..., model: _Optional[str] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("query", "items", "top_n", "budget_ms", "skip_cache")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    SKIP_CACHE_FIELD_NUMBER: _ClassVar[int]
    query: str
    items: _containers.RepeatedCompositeFieldContainer[Item]
    top_n: int
    budget_ms: int
    skip_cache: bool
    def __init__(self, query: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., top_n: _Optional[int] = ..., budget_ms: _Optional[int] = ..., skip_cache: _Optional[bool] = ...) -> None: ...

class ScoreEntry(_message.Message):
    __slots__ = ("item_id", "score", "rank", "index")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    rank: int
    index: int
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "model", "timings", "unscored_items", "cache_hits")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    UNSCORED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[ScoreEntry]
    model: str
    timings: StageTimings
    unscored_items: int
    cache_hits: int
    def __init__(self, scores: _Optional[_Iterable[_Union[ScoreEntry, _Mapping]]] = ..., model: _Optional[str] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., unscored_items: _Optional[int] = ..., cache_hits: _Optional[int] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("id", "text", "metadata", "title")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    metadata: _containers.ScalarMap[str, str]
    title: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., title: _Optional[str] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("upserted", "replaced", "sequence", "timings", "unchanged")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    replaced: int
    sequence: int
    timings: StageTimings
    unchanged: int
    def __init__(self, upserted: _Optional[int] = ..., replaced: _Optional[int] = ..., sequence: _Optional[int] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., unchanged: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "not_found", "sequence")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    sequence: int
    def __init__(self, deleted: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ..., sequence: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("documents", "not_found", "sequence")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    not_found: _containers.RepeatedScalarFieldContainer[str]
    sequence: int
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., not_found: _Optional[_Iterable[str]] = ..., sequence: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("documents", "dimension", "embedder_model", "reranker_model", "deleted_not_compacted", "sequence", "snapshot_sequence", "snapshot_age_seconds", "data_dir_bytes", "backend", "precision", "reranker_trained", "ef_search", "hybrid_depth", "rrf_k", "max_candidates", "rerank_fusion_weight", "change_log_rows", "change_log_pruned_through", "max_top_n", "bm25_sequence", "bm25_failed_refreshes", "bm25_last_error", "search_budget_ms", "rerank_cache_entries", "rerank_cache_capacity", "rerank_cache_hits", "rerank_cache_misses", "rerank_cache_coalesced")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_MODEL_FIELD_NUMBER: _ClassVar[int]
    RERANKER_MODEL_FIELD_NUMBER: _ClassVar[int]
    DELETED_NOT_COMPACTED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RERANKER_TRAINED_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    HYBRID_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RRF_K_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    RERANK_FUSION_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHANGE_LOG_ROWS_FIELD_NUMBER: _ClassVar[int]
    CHANGE_LOG_PRUNED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_N_FIELD_NUMBER: _ClassVar[int]
    BM25_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BM25_FAILED_REFRESHES_FIELD_NUMBER: _ClassVar[int]
    BM25_LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    SEARCH_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    RERANK_CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    RERANK_CACHE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    RERANK_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    RERANK_CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    RERANK_CACHE_COALESCED_FIELD_NUMBER: _ClassVar[int]
    documents: int
    dimension: int
    embedder_model: str
    reranker_model: str
    deleted_not_compacted: int
    sequence: int
    snapshot_sequence: int
    snapshot_age_seconds: float
    data_dir_bytes: int
    backend: str
    precision: str
    reranker_trained: bool
    ef_search: int
    hybrid_depth: int
    rrf_k: int
    max_candidates: int
    rerank_fusion_weight: float
    change_log_rows: int
    change_log_pruned_through: int
    max_top_n: int
    bm25_sequence: int
    bm25_failed_refreshes: int
    bm25_last_error: str
    search_budget_ms: int
    rerank_cache_entries: int
    rerank_cache_capacity: int
    rerank_cache_hits: int
    rerank_cache_misses: int
    rerank_cache_coalesced: int
    def __init__(self, documents: _Optional[int] = ..., dimension: _Optional[int] = ..., embedder_model: _Optional[str] = ..., reranker_model: _Optional[str] = ..., deleted_not_compacted: _Optional[int] = ..., sequence: _Optional[int] = ..., snapshot_sequence: _Optional[int] = ..., snapshot_age_seconds: _Optional[float] = ..., data_dir_bytes: _Optional[int] = ..., backend: _Optional[str] = ..., precision: _Optional[str] = ..., reranker_trained: _Optional[bool] = ..., ef_search: _Optional[int] = ..., hybrid_depth: _Optional[int] = ..., rrf_k: _Optional[int] = ..., max_candidates: _Optional[int] = ..., rerank_fusion_weight: _Optional[float] = ..., change_log_rows: _Optional[int] = ..., change_log_pruned_through: _Optional[int] = ..., max_top_n: _Optional[int] = ..., bm25_sequence: _Optional[int] = ..., bm25_failed_refreshes: _Optional[int] = ..., bm25_last_error: _Optional[str] = ..., search_budget_ms: _Optional[int] = ..., rerank_cache_entries: _Optional[int] = ..., rerank_cache_capacity: _Optional[int] = ..., rerank_cache_hits: _Optional[int] = ..., rerank_cache_misses: _Optional[int] = ..., rerank_cache_coalesced: _Optional[int] = ...) -> None: ...

class CompactRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CompactResponse(_message.Message):
    __slots__ = ("snapshot_sequence", "documents", "seconds")
    SNAPSHOT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    snapshot_sequence: int
    documents: int
    seconds: float
    def __init__(self, snapshot_sequence: _Optional[int] = ..., documents: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...
