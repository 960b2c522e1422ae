from ragfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RerankRequest(_message.Message):
    __slots__ = ("query", "candidates", "top_k", "model", "backend", "retrieval_weight")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    query: str
    candidates: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredPassage]
    top_k: int
    model: str
    backend: str
    retrieval_weight: float
    def __init__(self, query: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[_common_pb2.ScoredPassage, _Mapping]]] = ..., top_k: _Optional[int] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., retrieval_weight: _Optional[float] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("results", "model_id", "timings", "truncated", "max_length", "backend", "retrieval_weight")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredPassage]
    model_id: str
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Timing]
    truncated: int
    max_length: int
    backend: str
    retrieval_weight: float
    def __init__(self, results: _Optional[_Iterable[_Union[_common_pb2.ScoredPassage, _Mapping]]] = ..., model_id: _Optional[str] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.Timing, _Mapping]]] = ..., truncated: _Optional[int] = ..., max_length: _Optional[int] = ..., backend: _Optional[str] = ..., retrieval_weight: _Optional[float] = ...) -> None: ...
