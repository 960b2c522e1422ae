from ragfleet.v1 import common_pb2 as _common_pb2
from ragfleet.v1 import retriever_pb2 as _retriever_pb2
from ragfleet.v1 import generator_pb2 as _generator_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PipelineIngestRequest(_message.Message):
    __slots__ = ("index", "spec", "documents", "upsert", "last")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    UPSERT_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    index: str
    spec: _common_pb2.IndexSpec
    documents: _containers.RepeatedCompositeFieldContainer[_common_pb2.Document]
    upsert: bool
    last: bool
    def __init__(self, index: _Optional[str] = ..., spec: _Optional[_Union[_common_pb2.IndexSpec, _Mapping]] = ..., documents: _Optional[_Iterable[_Union[_common_pb2.Document, _Mapping]]] = ..., upsert: _Optional[bool] = ..., last: _Optional[bool] = ...) -> None: ...

class PipelineIngestReport(_message.Message):
    __slots__ = ("documents", "passages", "retrievers", "timings")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    RETRIEVERS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    documents: int
    passages: int
    retrievers: _containers.RepeatedCompositeFieldContainer[_retriever_pb2.IngestReport]
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Timing]
    def __init__(self, documents: _Optional[int] = ..., passages: _Optional[int] = ..., retrievers: _Optional[_Iterable[_Union[_retriever_pb2.IngestReport, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.Timing, _Mapping]]] = ...) -> None: ...

class PipelineSearchRequest(_message.Message):
    __slots__ = ("query", "retrieval", "reranking")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    RERANKING_FIELD_NUMBER: _ClassVar[int]
    query: str
    retrieval: _common_pb2.RetrievalSpec
    reranking: RerankSpec
    def __init__(self, query: _Optional[str] = ..., retrieval: _Optional[_Union[_common_pb2.RetrievalSpec, _Mapping]] = ..., reranking: _Optional[_Union[RerankSpec, _Mapping]] = ...) -> None: ...

class PipelineSearchResponse(_message.Message):
    __slots__ = ("results", "versions", "timings", "rerank")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredPassage]
    versions: _containers.RepeatedCompositeFieldContainer[_common_pb2.IndexVersion]
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Timing]
    rerank: RerankReport
    def __init__(self, results: _Optional[_Iterable[_Union[_common_pb2.ScoredPassage, _Mapping]]] = ..., versions: _Optional[_Iterable[_Union[_common_pb2.IndexVersion, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.Timing, _Mapping]]] = ..., rerank: _Optional[_Union[RerankReport, _Mapping]] = ...) -> None: ...

class PipelineSearchBatchRequest(_message.Message):
    __slots__ = ("queries", "retrieval", "reranking")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    RERANKING_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedScalarFieldContainer[str]
    retrieval: _common_pb2.RetrievalSpec
    reranking: RerankSpec
    def __init__(self, queries: _Optional[_Iterable[str]] = ..., retrieval: _Optional[_Union[_common_pb2.RetrievalSpec, _Mapping]] = ..., reranking: _Optional[_Union[RerankSpec, _Mapping]] = ...) -> None: ...

class PipelineSearchBatchResponse(_message.Message):
    __slots__ = ("responses", "versions")
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[PipelineSearchResponse]
    versions: _containers.RepeatedCompositeFieldContainer[_common_pb2.IndexVersion]
    def __init__(self, responses: _Optional[_Iterable[_Union[PipelineSearchResponse, _Mapping]]] = ..., versions: _Optional[_Iterable[_Union[_common_pb2.IndexVersion, _Mapping]]] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("question", "retrieval", "rerank", "reranking", "generate", "params")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    RERANKING_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    question: str
    retrieval: _common_pb2.RetrievalSpec
    rerank: bool
    reranking: RerankSpec
    generate: bool
    params: _common_pb2.GenerationParams
    def __init__(self, question: _Optional[str] = ..., retrieval: _Optional[_Union[_common_pb2.RetrievalSpec, _Mapping]] = ..., rerank: _Optional[bool] = ..., reranking: _Optional[_Union[RerankSpec, _Mapping]] = ..., generate: _Optional[bool] = ..., params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ...) -> None: ...

class Answer(_message.Message):
    __slots__ = ("text", "citations", "timings", "retrieval_only", "versions", "model_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    citations: _containers.RepeatedCompositeFieldContainer[_generator_pb2.Citation]
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Timing]
    retrieval_only: bool
    versions: _containers.RepeatedCompositeFieldContainer[_common_pb2.IndexVersion]
    model_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text: _Optional[str] = ..., citations: _Optional[_Iterable[_Union[_generator_pb2.Citation, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.Timing, _Mapping]]] = ..., retrieval_only: _Optional[bool] = ..., versions: _Optional[_Iterable[_Union[_common_pb2.IndexVersion, _Mapping]]] = ..., model_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("passages", "answer")
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    passages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredPassage]
    answer: Answer
    def __init__(self, passages: _Optional[_Iterable[_Union[_common_pb2.ScoredPassage, _Mapping]]] = ..., answer: _Optional[_Union[Answer, _Mapping]] = ...) -> None: ...

class AskEvent(_message.Message):
    __slots__ = ("retrieved", "reranked", "token", "answer")
    RETRIEVED_FIELD_NUMBER: _ClassVar[int]
    RERANKED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    retrieved: PassageList
    reranked: PassageList
    token: str
    answer: Answer
    def __init__(self, retrieved: _Optional[_Union[PassageList, _Mapping]] = ..., reranked: _Optional[_Union[PassageList, _Mapping]] = ..., token: _Optional[str] = ..., answer: _Optional[_Union[Answer, _Mapping]] = ...) -> None: ...

class PassageList(_message.Message):
    __slots__ = ("passages", "timings", "rerank")
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    passages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredPassage]
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Timing]
    rerank: RerankReport
    def __init__(self, passages: _Optional[_Iterable[_Union[_common_pb2.ScoredPassage, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.Timing, _Mapping]]] = ..., rerank: _Optional[_Union[RerankReport, _Mapping]] = ...) -> None: ...

class RerankSpec(_message.Message):
    __slots__ = ("enabled", "backend", "model", "depth", "required", "retrieval_weight")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    backend: str
    model: str
    depth: int
    required: bool
    retrieval_weight: float
    def __init__(self, enabled: _Optional[bool] = ..., backend: _Optional[str] = ..., model: _Optional[str] = ..., depth: _Optional[int] = ..., required: _Optional[bool] = ..., retrieval_weight: _Optional[float] = ...) -> None: ...

class RerankReport(_message.Message):
    __slots__ = ("model_id", "backend", "candidates", "truncated", "max_length", "note", "retrieval_weight")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    backend: str
    candidates: int
    truncated: int
    max_length: int
    note: str
    retrieval_weight: float
    def __init__(self, model_id: _Optional[str] = ..., backend: _Optional[str] = ..., candidates: _Optional[int] = ..., truncated: _Optional[int] = ..., max_length: _Optional[int] = ..., note: _Optional[str] = ..., retrieval_weight: _Optional[float] = ...) -> None: ...

class PipelineDeleteResponse(_message.Message):
    __slots__ = ("retrievers",)
    RETRIEVERS_FIELD_NUMBER: _ClassVar[int]
    retrievers: _containers.RepeatedCompositeFieldContainer[_retriever_pb2.DeleteResponse]
    def __init__(self, retrievers: _Optional[_Iterable[_Union[_retriever_pb2.DeleteResponse, _Mapping]]] = ...) -> None: ...

class PipelineRebuildRequest(_message.Message):
    __slots__ = ("index", "retrievers")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RETRIEVERS_FIELD_NUMBER: _ClassVar[int]
    index: str
    retrievers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[str] = ..., retrievers: _Optional[_Iterable[str]] = ...) -> None: ...

class PipelineRebuildResponse(_message.Message):
    __slots__ = ("retrievers",)
    RETRIEVERS_FIELD_NUMBER: _ClassVar[int]
    retrievers: _containers.RepeatedCompositeFieldContainer[_retriever_pb2.RebuildResponse]
    def __init__(self, retrievers: _Optional[_Iterable[_Union[_retriever_pb2.RebuildResponse, _Mapping]]] = ...) -> None: ...

class PipelineIndexDescription(_message.Message):
    __slots__ = ("index", "retrievers")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RETRIEVERS_FIELD_NUMBER: _ClassVar[int]
    index: str
    retrievers: _containers.RepeatedCompositeFieldContainer[_retriever_pb2.IndexDescription]
    def __init__(self, index: _Optional[str] = ..., retrievers: _Optional[_Iterable[_Union[_retriever_pb2.IndexDescription, _Mapping]]] = ...) -> None: ...

class PipelineListIndexesResponse(_message.Message):
    __slots__ = ("indexes",)
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    indexes: _containers.RepeatedCompositeFieldContainer[PipelineIndexDescription]
    def __init__(self, indexes: _Optional[_Iterable[_Union[PipelineIndexDescription, _Mapping]]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceEndpoint(_message.Message):
    __slots__ = ("name", "address", "healthy", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    healthy: bool
    detail: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., healthy: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("version", "services", "retrievers", "reranker", "generator")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    RETRIEVERS_FIELD_NUMBER: _ClassVar[int]
    RERANKER_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    version: str
    services: _containers.RepeatedCompositeFieldContainer[ServiceEndpoint]
    retrievers: _containers.RepeatedScalarFieldContainer[str]
    reranker: bool
    generator: bool
    def __init__(self, version: _Optional[str] = ..., services: _Optional[_Iterable[_Union[ServiceEndpoint, _Mapping]]] = ..., retrievers: _Optional[_Iterable[str]] = ..., reranker: _Optional[bool] = ..., generator: _Optional[bool] = ...) -> None: ...
