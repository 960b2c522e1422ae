from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Document(_message.Message):
    __slots__ = ("id", "title", "text", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    text: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Passage(_message.Message):
    __slots__ = ("id", "doc_id", "position", "title", "text", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    doc_id: str
    position: int
    title: str
    text: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., doc_id: _Optional[str] = ..., position: _Optional[int] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ScoredPassage(_message.Message):
    __slots__ = ("passage", "score", "retriever", "rank", "continuation", "highlights")
    PASSAGE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    HIGHLIGHTS_FIELD_NUMBER: _ClassVar[int]
    passage: Passage
    score: float
    retriever: str
    rank: int
    continuation: Passage
    highlights: _containers.RepeatedCompositeFieldContainer[Highlight]
    def __init__(self, passage: _Optional[_Union[Passage, _Mapping]] = ..., score: _Optional[float] = ..., retriever: _Optional[str] = ..., rank: _Optional[int] = ..., continuation: _Optional[_Union[Passage, _Mapping]] = ..., highlights: _Optional[_Iterable[_Union[Highlight, _Mapping]]] = ...) -> None: ...

class Highlight(_message.Message):
    __slots__ = ("start", "end", "score")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    score: float
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("stage", "millis")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MILLIS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    millis: float
    def __init__(self, stage: _Optional[str] = ..., millis: _Optional[float] = ...) -> None: ...

class IndexVersion(_message.Message):
    __slots__ = ("index", "retriever", "version", "model_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    index: str
    retriever: str
    version: int
    model_id: str
    def __init__(self, index: _Optional[str] = ..., retriever: _Optional[str] = ..., version: _Optional[int] = ..., model_id: _Optional[str] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_tokens", "seed", "stop")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class ChunkingSpec(_message.Message):
    __slots__ = ("chunk_tokens", "overlap_tokens", "sentence_aware", "whole_documents")
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_AWARE_FIELD_NUMBER: _ClassVar[int]
    WHOLE_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    chunk_tokens: int
    overlap_tokens: int
    sentence_aware: bool
    whole_documents: bool
    def __init__(self, chunk_tokens: _Optional[int] = ..., overlap_tokens: _Optional[int] = ..., sentence_aware: _Optional[bool] = ..., whole_documents: _Optional[bool] = ...) -> None: ...

class IndexSpec(_message.Message):
    __slots__ = ("vector_store", "faiss_index", "model", "chunking", "retrievers", "colbert_model", "nbits", "doc_maxlen", "mamba_model", "seal_model")
    VECTOR_STORE_FIELD_NUMBER: _ClassVar[int]
    FAISS_INDEX_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHUNKING_FIELD_NUMBER: _ClassVar[int]
    RETRIEVERS_FIELD_NUMBER: _ClassVar[int]
    COLBERT_MODEL_FIELD_NUMBER: _ClassVar[int]
    NBITS_FIELD_NUMBER: _ClassVar[int]
    DOC_MAXLEN_FIELD_NUMBER: _ClassVar[int]
    MAMBA_MODEL_FIELD_NUMBER: _ClassVar[int]
    SEAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    vector_store: str
    faiss_index: str
    model: str
    chunking: ChunkingSpec
    retrievers: _containers.RepeatedScalarFieldContainer[str]
    colbert_model: str
    nbits: int
    doc_maxlen: int
    mamba_model: str
    seal_model: str
    def __init__(self, vector_store: _Optional[str] = ..., faiss_index: _Optional[str] = ..., model: _Optional[str] = ..., chunking: _Optional[_Union[ChunkingSpec, _Mapping]] = ..., retrievers: _Optional[_Iterable[str]] = ..., colbert_model: _Optional[str] = ..., nbits: _Optional[int] = ..., doc_maxlen: _Optional[int] = ..., mamba_model: _Optional[str] = ..., seal_model: _Optional[str] = ...) -> None: ...

class SearchOptions(_message.Message):
    __slots__ = ("exhaustive", "ncells", "centroid_score_threshold", "ndocs", "compressed_rerank", "beam", "ngram_length")
    EXHAUSTIVE_FIELD_NUMBER: _ClassVar[int]
    NCELLS_FIELD_NUMBER: _ClassVar[int]
    CENTROID_SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NDOCS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_RERANK_FIELD_NUMBER: _ClassVar[int]
    BEAM_FIELD_NUMBER: _ClassVar[int]
    NGRAM_LENGTH_FIELD_NUMBER: _ClassVar[int]
    exhaustive: bool
    ncells: int
    centroid_score_threshold: float
    ndocs: int
    compressed_rerank: bool
    beam: int
    ngram_length: int
    def __init__(self, exhaustive: _Optional[bool] = ..., ncells: _Optional[int] = ..., centroid_score_threshold: _Optional[float] = ..., ndocs: _Optional[int] = ..., compressed_rerank: _Optional[bool] = ..., beam: _Optional[int] = ..., ngram_length: _Optional[int] = ...) -> None: ...

class Fusion(_message.Message):
    __slots__ = ("method", "rrf_k", "weights")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RRF_K_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    method: str
    rrf_k: int
    weights: _containers.ScalarMap[str, float]
    def __init__(self, method: _Optional[str] = ..., rrf_k: _Optional[int] = ..., weights: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RetrievalSpec(_message.Message):
    __slots__ = ("index", "top_k", "retrievers", "fusion", "filters", "candidates", "options", "with_continuation")
    class FiltersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETRIEVERS_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    WITH_CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    index: str
    top_k: int
    retrievers: _containers.RepeatedScalarFieldContainer[str]
    fusion: Fusion
    filters: _containers.ScalarMap[str, str]
    candidates: int
    options: SearchOptions
    with_continuation: bool
    def __init__(self, index: _Optional[str] = ..., top_k: _Optional[int] = ..., retrievers: _Optional[_Iterable[str]] = ..., fusion: _Optional[_Union[Fusion, _Mapping]] = ..., filters: _Optional[_Mapping[str, str]] = ..., candidates: _Optional[int] = ..., options: _Optional[_Union[SearchOptions, _Mapping]] = ..., with_continuation: _Optional[bool] = ...) -> None: ...
