from ragfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("question", "context", "retrieval", "params")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    question: str
    context: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredPassage]
    retrieval: _common_pb2.RetrievalSpec
    params: _common_pb2.GenerationParams
    def __init__(self, question: _Optional[str] = ..., context: _Optional[_Iterable[_Union[_common_pb2.ScoredPassage, _Mapping]]] = ..., retrieval: _Optional[_Union[_common_pb2.RetrievalSpec, _Mapping]] = ..., params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ...) -> None: ...

class Citation(_message.Message):
    __slots__ = ("passage_id", "doc_id", "weight", "title", "highlights")
    PASSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    HIGHLIGHTS_FIELD_NUMBER: _ClassVar[int]
    passage_id: str
    doc_id: str
    weight: float
    title: str
    highlights: _containers.RepeatedCompositeFieldContainer[_common_pb2.Highlight]
    def __init__(self, passage_id: _Optional[str] = ..., doc_id: _Optional[str] = ..., weight: _Optional[float] = ..., title: _Optional[str] = ..., highlights: _Optional[_Iterable[_Union[_common_pb2.Highlight, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "citations", "model_id", "timings", "finish_reason")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    text: str
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    model_id: str
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Timing]
    finish_reason: str
    def __init__(self, text: _Optional[str] = ..., citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., model_id: _Optional[str] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.Timing, _Mapping]]] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("token", "done")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    token: str
    done: GenerateResponse
    def __init__(self, token: _Optional[str] = ..., done: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...
