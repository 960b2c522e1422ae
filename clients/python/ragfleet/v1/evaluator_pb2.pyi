from ragfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QueryJudgements(_message.Message):
    __slots__ = ("relevance",)
    class RelevanceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    relevance: _containers.ScalarMap[str, int]
    def __init__(self, relevance: _Optional[_Mapping[str, int]] = ...) -> None: ...

class QueryRun(_message.Message):
    __slots__ = ("scores",)
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.ScalarMap[str, float]
    def __init__(self, scores: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ScoreRetrievalRequest(_message.Message):
    __slots__ = ("run", "qrels", "measures")
    class RunEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: QueryRun
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[QueryRun, _Mapping]] = ...) -> None: ...
    class QrelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: QueryJudgements
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[QueryJudgements, _Mapping]] = ...) -> None: ...
    RUN_FIELD_NUMBER: _ClassVar[int]
    QRELS_FIELD_NUMBER: _ClassVar[int]
    MEASURES_FIELD_NUMBER: _ClassVar[int]
    run: _containers.MessageMap[str, QueryRun]
    qrels: _containers.MessageMap[str, QueryJudgements]
    measures: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run: _Optional[_Mapping[str, QueryRun]] = ..., qrels: _Optional[_Mapping[str, QueryJudgements]] = ..., measures: _Optional[_Iterable[str]] = ...) -> None: ...

class MeasureValues(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, float]
    def __init__(self, values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ScoreRetrievalResponse(_message.Message):
    __slots__ = ("aggregate", "per_query")
    class AggregateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PerQueryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MeasureValues
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MeasureValues, _Mapping]] = ...) -> None: ...
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    PER_QUERY_FIELD_NUMBER: _ClassVar[int]
    aggregate: _containers.ScalarMap[str, float]
    per_query: _containers.MessageMap[str, MeasureValues]
    def __init__(self, aggregate: _Optional[_Mapping[str, float]] = ..., per_query: _Optional[_Mapping[str, MeasureValues]] = ...) -> None: ...

class AnswerItem(_message.Message):
    __slots__ = ("id", "question", "prediction", "gold_answers", "contexts")
    ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    GOLD_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    question: str
    prediction: str
    gold_answers: _containers.RepeatedScalarFieldContainer[str]
    contexts: _containers.RepeatedCompositeFieldContainer[_common_pb2.Passage]
    def __init__(self, id: _Optional[str] = ..., question: _Optional[str] = ..., prediction: _Optional[str] = ..., gold_answers: _Optional[_Iterable[str]] = ..., contexts: _Optional[_Iterable[_Union[_common_pb2.Passage, _Mapping]]] = ...) -> None: ...

class ScoreAnswersRequest(_message.Message):
    __slots__ = ("items", "metrics")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[AnswerItem]
    metrics: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[AnswerItem, _Mapping]]] = ..., metrics: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreAnswersResponse(_message.Message):
    __slots__ = ("aggregate", "per_item")
    class AggregateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PerItemEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MeasureValues
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MeasureValues, _Mapping]] = ...) -> None: ...
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    PER_ITEM_FIELD_NUMBER: _ClassVar[int]
    aggregate: _containers.ScalarMap[str, float]
    per_item: _containers.MessageMap[str, MeasureValues]
    def __init__(self, aggregate: _Optional[_Mapping[str, float]] = ..., per_item: _Optional[_Mapping[str, MeasureValues]] = ...) -> None: ...

class RunExperimentRequest(_message.Message):
    __slots__ = ("config_yaml",)
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    config_yaml: str
    def __init__(self, config_yaml: _Optional[str] = ...) -> None: ...

class ExperimentEvent(_message.Message):
    __slots__ = ("progress", "report")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    progress: ExperimentProgress
    report: ExperimentReport
    def __init__(self, progress: _Optional[_Union[ExperimentProgress, _Mapping]] = ..., report: _Optional[_Union[ExperimentReport, _Mapping]] = ...) -> None: ...

class ExperimentProgress(_message.Message):
    __slots__ = ("run_id", "done", "total", "stage")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    done: int
    total: int
    stage: str
    def __init__(self, run_id: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., stage: _Optional[str] = ...) -> None: ...

class ExperimentReport(_message.Message):
    __slots__ = ("run_ids", "report_path", "markdown")
    RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    REPORT_PATH_FIELD_NUMBER: _ClassVar[int]
    MARKDOWN_FIELD_NUMBER: _ClassVar[int]
    run_ids: _containers.RepeatedScalarFieldContainer[str]
    report_path: str
    markdown: str
    def __init__(self, run_ids: _Optional[_Iterable[str]] = ..., report_path: _Optional[str] = ..., markdown: _Optional[str] = ...) -> None: ...
