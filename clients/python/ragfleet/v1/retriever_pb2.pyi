from ragfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestRequest(_message.Message):
    __slots__ = ("index", "spec", "passages", "upsert", "last")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    UPSERT_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    index: str
    spec: _common_pb2.IndexSpec
    passages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Passage]
    upsert: bool
    last: bool
    def __init__(self, index: _Optional[str] = ..., spec: _Optional[_Union[_common_pb2.IndexSpec, _Mapping]] = ..., passages: _Optional[_Iterable[_Union[_common_pb2.Passage, _Mapping]]] = ..., upsert: _Optional[bool] = ..., last: _Optional[bool] = ...) -> None: ...

class IngestReport(_message.Message):
    __slots__ = ("version", "added", "replaced", "total_passages", "timings")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PASSAGES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.IndexVersion
    added: int
    replaced: int
    total_passages: int
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Timing]
    def __init__(self, version: _Optional[_Union[_common_pb2.IndexVersion, _Mapping]] = ..., added: _Optional[int] = ..., replaced: _Optional[int] = ..., total_passages: _Optional[int] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.Timing, _Mapping]]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "index", "top_k", "filters", "with_continuation", "options")
    class FiltersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUERY_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    WITH_CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    query: str
    index: str
    top_k: int
    filters: _containers.ScalarMap[str, str]
    with_continuation: bool
    options: _common_pb2.SearchOptions
    def __init__(self, query: _Optional[str] = ..., index: _Optional[str] = ..., top_k: _Optional[int] = ..., filters: _Optional[_Mapping[str, str]] = ..., with_continuation: _Optional[bool] = ..., options: _Optional[_Union[_common_pb2.SearchOptions, _Mapping]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "version", "timings")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredPassage]
    version: _common_pb2.IndexVersion
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Timing]
    def __init__(self, results: _Optional[_Iterable[_Union[_common_pb2.ScoredPassage, _Mapping]]] = ..., version: _Optional[_Union[_common_pb2.IndexVersion, _Mapping]] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.Timing, _Mapping]]] = ...) -> None: ...

class SearchBatchRequest(_message.Message):
    __slots__ = ("queries", "index", "top_k", "filters", "with_continuation", "options")
    class FiltersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    WITH_CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedScalarFieldContainer[str]
    index: str
    top_k: int
    filters: _containers.ScalarMap[str, str]
    with_continuation: bool
    options: _common_pb2.SearchOptions
    def __init__(self, queries: _Optional[_Iterable[str]] = ..., index: _Optional[str] = ..., top_k: _Optional[int] = ..., filters: _Optional[_Mapping[str, str]] = ..., with_continuation: _Optional[bool] = ..., options: _Optional[_Union[_common_pb2.SearchOptions, _Mapping]] = ...) -> None: ...

class SearchBatchResponse(_message.Message):
    __slots__ = ("responses", "version")
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[SearchResponse]
    version: _common_pb2.IndexVersion
    def __init__(self, responses: _Optional[_Iterable[_Union[SearchResponse, _Mapping]]] = ..., version: _Optional[_Union[_common_pb2.IndexVersion, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("index", "ids", "doc_ids", "drop_index")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    DROP_INDEX_FIELD_NUMBER: _ClassVar[int]
    index: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    doc_ids: _containers.RepeatedScalarFieldContainer[str]
    drop_index: bool
    def __init__(self, index: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., doc_ids: _Optional[_Iterable[str]] = ..., drop_index: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "version")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    version: _common_pb2.IndexVersion
    def __init__(self, deleted: _Optional[int] = ..., version: _Optional[_Union[_common_pb2.IndexVersion, _Mapping]] = ...) -> None: ...

class DescribeIndexRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: str
    def __init__(self, index: _Optional[str] = ...) -> None: ...

class IndexDescription(_message.Message):
    __slots__ = ("version", "passages", "documents", "spec", "dimension", "bytes_on_disk", "created_at", "updated_at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_ON_DISK_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.IndexVersion
    passages: int
    documents: int
    spec: _common_pb2.IndexSpec
    dimension: int
    bytes_on_disk: int
    created_at: str
    updated_at: str
    def __init__(self, version: _Optional[_Union[_common_pb2.IndexVersion, _Mapping]] = ..., passages: _Optional[int] = ..., documents: _Optional[int] = ..., spec: _Optional[_Union[_common_pb2.IndexSpec, _Mapping]] = ..., dimension: _Optional[int] = ..., bytes_on_disk: _Optional[int] = ..., created_at: _Optional[str] = ..., updated_at: _Optional[str] = ...) -> None: ...

class RebuildRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: str
    def __init__(self, index: _Optional[str] = ...) -> None: ...

class RebuildResponse(_message.Message):
    __slots__ = ("version", "timings")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.IndexVersion
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Timing]
    def __init__(self, version: _Optional[_Union[_common_pb2.IndexVersion, _Mapping]] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.Timing, _Mapping]]] = ...) -> None: ...

class ListIndexesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListIndexesResponse(_message.Message):
    __slots__ = ("indexes",)
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    indexes: _containers.RepeatedCompositeFieldContainer[IndexDescription]
    def __init__(self, indexes: _Optional[_Iterable[_Union[IndexDescription, _Mapping]]] = ...) -> None: ...
