"""What the sync and async clients share: channels, call metadata and deadlines, retry policy,
request building and reading documents.

`Client` and `AsyncClient` differ only in how they wait (threads or asyncio); everything that decides
what goes on the wire is here, once.

Decisions worth knowing:
- Documents come from dicts ({"id" or "_id", "title", "text", "metadata"}), `Document` messages, a
  JSONL file (optionally .gz) or a BEIR folder (its corpus.jsonl). Metadata values that are not
  strings are stored as their JSON text (1 -> "1", true -> "true"), and filters are converted the
  same way so that they match. Dicts and Documents are sent as they are ("id" and "text" required;
  the Pipeline rejects a document with no text). A file is read as collections come (`read_jsonl`):
  a document with neither title nor text is left out and counted, a title-only one is sent with its
  title as its text.
- An ingest whose source fails half way (a malformed line, an exception from the caller's
  iterable) cancels the call, so the server never commits part of it, and raises the source's error.
- Retries are gRPC's own (a `retryPolicy` in the channel's service config): only for the methods a
  client names idempotent, only on UNAVAILABLE, with exponential backoff and jitter, never past the
  call's deadline (a call whose deadline passes while it waits to retry ends DEADLINE_EXCEEDED), and
  every attempt carries the same metadata (so the same request id). gRPC caps a call at 5 attempts.
- A retrieval is one `RetrievalSpec`: `retrieval_spec` builds it from a spec (message or dict) and
  the keyword arguments the client methods take (`RetrievalArgs`), the same for every method.
- Reranking (`rerank=` of search, search_batch and ask) is one `RerankSpec`: True reranks with the
  Reranker's defaults; a dict of RerankSpec's fields ({"backend", "model", "depth", "required"})
  reranks with those ("enabled" defaults to True); a RerankSpec goes as it is.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar, overload

import grpc
import grpc.aio
from google.protobuf.message import Message

from ragfleet.errors import InvalidArgument, RagfleetError, from_rpc_error
from ragfleet.metadata import APPLICATION_KEY, AUTHORIZATION_KEY, DEADLINE_KEY, REQUEST_ID_KEY
from ragfleet.v1 import common_pb2, pipeline_pb2, pipeline_pb2_grpc, retriever_pb2

if TYPE_CHECKING:
    from typing import Required

    from typing_extensions import Unpack

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Ping every 5 minutes so dead peers and NAT idle timeouts are noticed; not more often, since
    # gRPC servers by default answer more frequent pings with GOAWAY ("too_many_pings").
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)

INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
BACKOFF_MULTIPLIER = 2.0
# gRPC ignores a retry policy of more attempts than this.
MAX_ATTEMPTS = 5

DocumentLike = common_pb2.Document | Mapping[str, Any]
DocumentSource = str | os.PathLike[str] | Iterable[DocumentLike]
SpecLike = common_pb2.IndexSpec | Mapping[str, Any] | None
FusionLike = common_pb2.Fusion | Mapping[str, Any] | str | None
ParamsLike = common_pb2.GenerationParams | Mapping[str, Any] | None
# {"exhaustive", "ncells", "centroid_score_threshold", "ndocs", "compressed_rerank"}: tuning of
# approximate retrievers (colbert).
OptionsLike = common_pb2.SearchOptions | Mapping[str, Any] | None
RetrievalLike = common_pb2.RetrievalSpec | Mapping[str, Any] | None
RerankLike = bool | pipeline_pb2.RerankSpec | Mapping[str, Any] | None
Filters = Mapping[str, Any] | None
Names = str | Sequence[str] | None
ChannelOptions = Sequence[tuple[str, Any]] | None

M = TypeVar("M", bound=Message)


class RetrievalArgs(TypedDict, total=False):
    """The keyword arguments of a retrieval: `index` (required) and the other RetrievalSpec fields
    (see common.proto), laid over `retrieval`, a whole spec (RetrievalSpec or dict) given at once."""

    index: str
    retrieval: RetrievalLike
    top_k: int
    retrievers: Names
    fusion: FusionLike
    filters: Filters
    candidates: int
    options: OptionsLike
    with_continuation: bool


class SearchArgs(RetrievalArgs, total=False):
    """Search's keyword arguments: the retrieval's, plus `rerank` (see the module docstring)."""

    rerank: RerankLike


class AskArgs(SearchArgs, total=False):
    """Ask's keyword arguments: the search's, plus generation."""

    generate: bool
    params: ParamsLike


class IngestArgs(TypedDict, total=False):
    """An ingest into `index`: `spec` (IndexSpec or dict) applies when the index is created; `upsert`
    replaces passages whose ids exist; `batch_size` documents go in each message (256);
    `progress(n)` is called with the number of documents sent so far after each message."""

    index: Required[str]
    spec: SpecLike
    upsert: bool
    batch_size: int
    progress: Callable[[int], object] | None


class DeleteArgs(TypedDict, total=False):
    """What to delete from `index`: passages by id, whole documents by id, or (drop_index) all."""

    index: Required[str]
    ids: Names
    doc_ids: Names
    drop_index: bool


# --- channels and metadata ---------------------------------------------------------------------


class ChannelArgs(TypedDict, total=False):
    tls: bool
    root_certificates: bytes | None
    options: ChannelOptions


@overload
def make_channel(address: str, *, aio: Literal[False] = ..., **kw: Unpack[ChannelArgs]) -> grpc.Channel: ...
@overload
def make_channel(address: str, *, aio: Literal[True], **kw: Unpack[ChannelArgs]) -> grpc.aio.Channel: ...
@overload
def make_channel(
    address: str, *, aio: bool, **kw: Unpack[ChannelArgs]
) -> grpc.Channel | grpc.aio.Channel: ...


def make_channel(
    address: str,
    *,
    tls: bool = False,
    root_certificates: bytes | None = None,
    options: ChannelOptions = None,
    aio: bool = False,
) -> grpc.Channel | grpc.aio.Channel:
    """A channel with ragfleet's defaults (64 MiB messages, keepalive); `options` override them.

    TLS is used when `tls` is true or root certificates (PEM bytes) are given; without them the
    system's trust store verifies the server.
    """
    merged = dict(CHANNEL_OPTIONS)
    merged.update(options or ())
    channel_options = list(merged.items())
    if tls or root_certificates is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates)
        if aio:
            return grpc.aio.secure_channel(address, credentials, options=channel_options)
        return grpc.secure_channel(address, credentials, options=channel_options)
    if aio:
        return grpc.aio.insecure_channel(address, options=channel_options)
    return grpc.insecure_channel(address, options=channel_options)


def retry_service_config(service: str, methods: Sequence[str], retries: int) -> str:
    """A gRPC service config (JSON) that retries `methods` of `service` on UNAVAILABLE, up to
    `retries` times (capped by gRPC at MAX_ATTEMPTS - 1), with exponential backoff and jitter."""
    if retries == 0 or not methods:
        return json.dumps({"methodConfig": []})
    policy = {
        "maxAttempts": min(retries + 1, MAX_ATTEMPTS),
        "initialBackoff": f"{INITIAL_BACKOFF_S:.3f}s",
        "maxBackoff": f"{MAX_BACKOFF_S:.3f}s",
        "backoffMultiplier": BACKOFF_MULTIPLIER,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": service, "method": method} for method in methods]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def call_metadata(
    *,
    token: str | None = None,
    application: str | None = None,
    request_id: str | None = None,
    deadline: float | None = None,
) -> list[tuple[str, str]]:
    """Metadata for one call. `deadline` is absolute (time.time() seconds); a request id is made
    when none is given."""
    metadata = [(REQUEST_ID_KEY, request_id or uuid.uuid4().hex)]
    if deadline is not None:
        metadata.append((DEADLINE_KEY, f"{deadline:.6f}"))
    if token:
        metadata.append((AUTHORIZATION_KEY, f"Bearer {token}"))
    if application:
        metadata.append((APPLICATION_KEY, application))
    return metadata


class CallBudget:
    """One logical call: its request id, metadata and timeout, shared by every attempt gRPC makes."""

    def __init__(self, timeout: float | None, *, token: str | None, application: str | None) -> None:
        self.request_id = uuid.uuid4().hex
        self.timeout = timeout
        self.metadata = tuple(
            call_metadata(
                token=token,
                application=application,
                request_id=self.request_id,
                deadline=None if timeout is None else time.time() + timeout,
            )
        )

    def error(self, err: grpc.RpcError) -> RagfleetError:
        return from_rpc_error(err, request_id=self.request_id)


class BaseClient:
    """Configuration and channel shared by Client, AsyncClient and EvaluatorClient.

    A subclass names its stub, the gRPC service and the methods that are safe to retry.
    """

    _aio = False
    _stub_class: Any = pipeline_pb2_grpc.PipelineStub
    _service = "ragfleet.v1.Pipeline"
    _idempotent: tuple[str, ...] = ("Search", "SearchBatch", "DescribeIndex", "ListIndexes", "Describe")

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        application: str | None = None,
        timeout: float | None = 60.0,
        retries: int = 3,
        tls: bool = False,
        root_certificates: bytes | None = None,
        options: ChannelOptions = None,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.address = address
        self._token = token
        self._application = application
        self._timeout = timeout
        retry = ("grpc.service_config", retry_service_config(self._service, self._idempotent, retries))
        self._channel: Any = make_channel(
            address,
            tls=tls,
            root_certificates=root_certificates,
            options=[retry, *(options or ())],
            aio=self._aio,
        )
        self._stub = self._stub_class(self._channel)

    def _budget(self, timeout: float | None) -> CallBudget:
        """A call's budget; `timeout` None means the client's timeout."""
        return CallBudget(
            self._timeout if timeout is None else timeout, token=self._token, application=self._application
        )

    def _start_stream(self, method: Any, request: Any, timeout: float | None) -> tuple[Any, CallBudget]:
        """Starts a server-streaming call; the caller relays its messages and errors."""
        budget = self._budget(timeout)
        return method(request, timeout=budget.timeout, metadata=budget.metadata), budget


# --- requests ----------------------------------------------------------------------------------


def retrieval_spec(fields: Mapping[str, Any], *, top_k: int) -> common_pb2.RetrievalSpec:
    """The RetrievalSpec of one call from its `RetrievalArgs`: `retrieval` (a spec or a dict of its
    fields), then the other arguments over it; `top_k` is the method's default when neither sets one
    (an explicit top_k=0 goes to the server, which rejects it)."""
    fields = dict(fields)
    unknown = sorted(set(fields) - set(RetrievalArgs.__annotations__))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    retrieval = fields.pop("retrieval", None)
    spec = common_pb2.RetrievalSpec()
    if isinstance(retrieval, Mapping):
        spec.MergeFrom(_retrieval_from_mapping(retrieval))
    elif retrieval is not None:
        spec.CopyFrom(_message(common_pb2.RetrievalSpec, retrieval, "retrieval"))
    spec.MergeFrom(_retrieval_from_mapping(fields))
    if "top_k" not in fields and not spec.top_k:
        spec.top_k = top_k
    return spec


def _retrieval_from_mapping(fields: Mapping[str, Any]) -> common_pb2.RetrievalSpec:
    spec = common_pb2.RetrievalSpec()
    for name, value in fields.items():
        if name == "retrievers":
            spec.retrievers.extend(_names(value))
        elif name == "fusion":
            if (fusion := to_fusion(value)) is not None:
                spec.fusion.CopyFrom(fusion)
        elif name == "filters":
            spec.filters.update(to_filters(value))
        elif name == "options":
            if (options := _message(common_pb2.SearchOptions, value, "options")) is not None:
                spec.options.CopyFrom(options)
        else:
            try:
                setattr(spec, name, value)
            except (AttributeError, TypeError, ValueError) as exc:
                raise InvalidArgument(f"retrieval.{name}: {exc}") from None
    return spec


def to_rerank_spec(rerank: RerankLike) -> pipeline_pb2.RerankSpec | None:
    """None (or False) for no reranking, else the RerankSpec of `rerank` (see the module docstring)."""
    if rerank is None or rerank is False:
        return None
    if rerank is True:
        return pipeline_pb2.RerankSpec(enabled=True)
    if isinstance(rerank, Mapping):
        rerank = {"enabled": True, **rerank}
    return _message(pipeline_pb2.RerankSpec, rerank, "rerank")


def _without_rerank(fields: SearchArgs) -> tuple[dict[str, Any], pipeline_pb2.RerankSpec | None]:
    """A call's other keyword arguments, and its RerankSpec."""
    rest: dict[str, Any] = dict(fields)
    return rest, to_rerank_spec(rest.pop("rerank", None))


def search_request(query: str, fields: SearchArgs) -> pipeline_pb2.PipelineSearchRequest:
    rest, reranking = _without_rerank(fields)
    return pipeline_pb2.PipelineSearchRequest(
        query=query, retrieval=retrieval_spec(rest, top_k=10), reranking=reranking
    )


def search_batch_request(queries: Names, fields: SearchArgs) -> pipeline_pb2.PipelineSearchBatchRequest:
    rest, reranking = _without_rerank(fields)
    return pipeline_pb2.PipelineSearchBatchRequest(
        queries=_names(queries), retrieval=retrieval_spec(rest, top_k=10), reranking=reranking
    )


def ask_request(question: str, fields: AskArgs) -> pipeline_pb2.AskRequest:
    """Ask's request; rerank defaults to off, generate to True. `rerank` also sets the request's
    `rerank` flag, so servers older than RerankSpec rerank too."""
    asked, reranking = _without_rerank(fields)
    generate = asked.pop("generate", True)
    params = _message(common_pb2.GenerationParams, asked.pop("params", None), "params")
    return pipeline_pb2.AskRequest(
        question=question,
        retrieval=retrieval_spec(asked, top_k=5),
        rerank=reranking is not None and reranking.enabled,
        reranking=reranking,
        generate=generate,
        params=params,
    )


def delete_request(fields: DeleteArgs) -> retriever_pb2.DeleteRequest:
    return retriever_pb2.DeleteRequest(
        index=fields["index"],
        ids=_names(fields.get("ids")),
        doc_ids=_names(fields.get("doc_ids")),
        drop_index=fields.get("drop_index", False),
    )


def rebuild_request(*, index: str, retrievers: Names) -> pipeline_pb2.PipelineRebuildRequest:
    return pipeline_pb2.PipelineRebuildRequest(index=index, retrievers=_names(retrievers))


def to_fusion(fusion: FusionLike) -> common_pb2.Fusion | None:
    """None, a method name ("rrf", "weighted"), a dict of Fusion's fields, or a Fusion."""
    if isinstance(fusion, str):
        return common_pb2.Fusion(method=fusion)
    return _message(common_pb2.Fusion, fusion, "fusion")


def to_index_spec(spec: SpecLike) -> common_pb2.IndexSpec | None:
    """None, a dict of IndexSpec's fields (chunking may be a nested dict), or an IndexSpec."""
    return _message(common_pb2.IndexSpec, spec, "spec")


def to_filters(filters: Filters) -> dict[str, str]:
    return {str(key): metadata_value(value) for key, value in (filters or {}).items()}


def metadata_value(value: Any) -> str:
    """Metadata and filter values are strings on the wire; anything else travels as its JSON text."""
    return value if isinstance(value, str) else json.dumps(value)


def _message(cls: type[M], value: M | Mapping[str, Any] | None, field: str) -> M | None:
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{field}: expected a dict or {cls.__name__}, got {type(value).__name__}")
    try:
        return cls(**value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{field}: {exc}") from None


def _names(value: Names) -> list[str]:
    """A list of strings from None, one string, or a sequence of strings."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# --- documents ---------------------------------------------------------------------------------


def iter_documents(
    source: DocumentSource, *, skipped: list[str] | None = None
) -> Iterator[common_pb2.Document]:
    """Validated Documents from a JSONL file, a BEIR folder, or an iterable of dicts/Documents.

    The path is checked now; lines and items are read and checked as the iterator is consumed. A file's
    documents are read by `read_jsonl` (which appends the ids it leaves out to `skipped`).
    """
    if isinstance(source, (str, os.PathLike)):
        return read_jsonl(corpus_path(source), skipped)
    if isinstance(source, Mapping) or not isinstance(source, Iterable):
        raise TypeError(
            f"source: expected a path or an iterable of dicts/Documents, got {type(source).__name__}"
        )
    return (to_document(item, f"documents[{i}]") for i, item in enumerate(source))


def corpus_path(source: str | os.PathLike[str]) -> Path:
    """The JSONL file to read: `source` itself, or corpus.jsonl inside a BEIR folder."""
    path = Path(source)
    if path.is_dir():
        for name in ("corpus.jsonl", "corpus.jsonl.gz"):
            if (path / name).is_file():
                return path / name
        raise InvalidArgument(f"{path}: a folder without corpus.jsonl (expected a BEIR dataset)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return path


def json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSON-lines file (gzip when it ends in
    .gz): UTF-8 with or without a byte-order mark, LF or CRLF line ends."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(
                    f"{where}: not valid UTF-8 (byte {exc.start + 1} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            yield number, value


def read_jsonl(path: Path, skipped: list[str] | None = None) -> Iterator[common_pb2.Document]:
    """Documents from a JSONL file (`json_records`), as collections come: the id is "id" or "_id" (a
    number becomes its decimal text); "title", "text" and "metadata" may be missing or null; other
    fields are ignored.

    A document with neither title nor text (blank counts as none) is left out, since the Pipeline
    rejects a document without text: its id is appended to `skipped`, or, when no list is given, the
    count is logged as a warning at the end of the file. A title-only document is sent with its title
    as its text (and no title), so its title is what gets indexed.
    """
    left_out: list[str] = [] if skipped is None else skipped
    for number, record in json_records(path):
        where = f"{path}:{number}"
        if isinstance(record, Mapping) and record.get("text") is None:
            record = {**record, "text": ""}
        doc = document_from_mapping(record, where)
        if not doc.text.strip():
            if not doc.title.strip():
                left_out.append(doc.id)
                continue
            doc = common_pb2.Document(id=doc.id, text=doc.title, metadata=doc.metadata)
        yield doc
    if skipped is None and left_out:
        logger.warning(
            "%s: skipped %d documents with neither title nor text, e.g. %s", path, len(left_out), left_out[:5]
        )


def to_document(item: DocumentLike, where: str) -> common_pb2.Document:
    if isinstance(item, common_pb2.Document):
        if not item.id:
            raise InvalidArgument(f"{where}: field 'id' is empty")
        return item
    if isinstance(item, Mapping):
        return document_from_mapping(item, where)
    raise TypeError(f"{where}: expected a dict or ragfleet.Document, got {type(item).__name__}")


def document_from_mapping(record: Any, where: str) -> common_pb2.Document:
    """A Document from {"id" or "_id", "text", "title"?, "metadata"?}; `where` names it in errors."""
    if not isinstance(record, Mapping):
        raise InvalidArgument(f"{where}: expected an object, got {type(record).__name__}")
    doc_id = record.get("id")
    if doc_id is None:
        doc_id = record.get("_id")
    if doc_id is None:
        raise InvalidArgument(f"{where}: field 'id' (or '_id') is missing")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or doc_id == "":
        raise InvalidArgument(f"{where}: field 'id' must be a non-empty string, got {doc_id!r}")
    text = record.get("text")
    if text is None:
        raise InvalidArgument(f"{where}: field 'text' is missing")
    if not isinstance(text, str):
        raise InvalidArgument(f"{where}: field 'text' must be a string, got {type(text).__name__}")
    title = record.get("title")
    if title is None:
        title = ""
    if not isinstance(title, str):
        raise InvalidArgument(f"{where}: field 'title' must be a string, got {type(title).__name__}")
    metadata = record.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise InvalidArgument(f"{where}: field 'metadata' must be an object, got {type(metadata).__name__}")
    return common_pb2.Document(
        id=str(doc_id),
        title=title,
        text=text,
        metadata={str(key): metadata_value(value) for key, value in metadata.items()},
    )


class IngestStream:
    """Turns documents into PipelineIngestRequest messages of `batch_size` documents each.

    The first message carries index, spec and upsert; a source without documents still sends that
    one message. When the source fails, the call is cancelled (so the server commits nothing) and
    the failure is kept in `.error` for the client to raise.
    """

    def __init__(self, fields: IngestArgs) -> None:
        unknown = sorted(set(fields) - set(IngestArgs.__annotations__))
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
        batch_size = fields.get("batch_size", 256)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        spec = to_index_spec(fields.get("spec"))
        self._header = pipeline_pb2.PipelineIngestRequest(
            index=fields["index"], spec=spec, upsert=fields.get("upsert", False)
        )
        self._batch_size = batch_size
        self._progress = fields.get("progress")
        self._pending: list[common_pb2.Document] = []
        self._messages = 0
        self._sent = 0
        self.error: Exception | None = None
        # Sync clients only: the source is read on gRPC's thread, which must not end the stream
        # after a failure until the call is cancelled (see bind).
        self._lock = threading.Lock()
        self._cancel: Callable[[], object] | None = None
        self._bound = threading.Event()

    def requests(
        self, documents: Iterable[common_pb2.Document]
    ) -> Iterator[pipeline_pb2.PipelineIngestRequest]:
        """The request iterator for a sync call; call `bind` once the call exists."""
        try:
            for request in self._batches(documents):
                yield request
                self._sent_one(request)
        except Exception as exc:  # noqa: BLE001 - any failure of the source is raised by the client
            self._fail(exc)

    def bind(self, cancel: Callable[[], object]) -> None:
        """Gives the stream its call's cancel(); cancels now if the source has already failed."""
        with self._lock:
            self._cancel = cancel
            failed = self.error is not None
        if failed:
            cancel()
        self._bound.set()

    async def arequests(
        self, documents: Iterable[common_pb2.Document] | AsyncIterable[DocumentLike]
    ) -> AsyncIterator[pipeline_pb2.PipelineIngestRequest]:
        """The request iterator for a grpc.aio call, which cancels itself when this raises."""
        try:
            if isinstance(documents, AsyncIterable):
                batches: AsyncIterator[pipeline_pb2.PipelineIngestRequest] = self._abatches(documents)
            else:
                batches = _as_async(self._batches(documents))
            async for request in batches:
                yield request
                self._sent_one(request)
        except Exception as exc:
            self.error = exc
            raise

    def _batches(
        self, documents: Iterable[common_pb2.Document]
    ) -> Iterator[pipeline_pb2.PipelineIngestRequest]:
        for document in documents:
            if (request := self._add(document)) is not None:
                yield request
        yield self._last()

    async def _abatches(
        self, documents: AsyncIterable[DocumentLike]
    ) -> AsyncIterator[pipeline_pb2.PipelineIngestRequest]:
        position = 0
        async for item in documents:
            if (request := self._add(to_document(item, f"documents[{position}]"))) is not None:
                yield request
            position += 1
        yield self._last()

    def _add(self, document: common_pb2.Document) -> pipeline_pb2.PipelineIngestRequest | None:
        self._pending.append(document)
        return self._flush() if len(self._pending) >= self._batch_size else None

    def _last(self) -> pipeline_pb2.PipelineIngestRequest:
        request = self._flush()
        request.last = True
        return request

    def _flush(self) -> pipeline_pb2.PipelineIngestRequest:
        request = pipeline_pb2.PipelineIngestRequest(documents=self._pending)
        if self._messages == 0:
            request.MergeFrom(self._header)
        self._messages += 1
        self._pending = []
        return request

    def _sent_one(self, request: pipeline_pb2.PipelineIngestRequest) -> None:
        self._sent += len(request.documents)
        if self._progress is not None:
            self._progress(self._sent)

    def _fail(self, exc: Exception) -> None:
        with self._lock:
            self.error = exc
            cancel = self._cancel
        if cancel is not None:
            cancel()
        # Returning ends the stream normally; wait until bind() has cancelled the call.
        self._bound.wait()


async def _as_async(items: Iterable[M]) -> AsyncIterator[M]:
    for item in items:
        yield item
