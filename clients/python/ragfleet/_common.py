"""What the sync and async clients share: channels, call metadata and deadlines, retry decisions,
request building and reading documents.

`Client` and `AsyncClient` differ only in how they wait (threads or asyncio); everything that decides
what goes on the wire is here, once.

Decisions worth knowing:
- Documents come from dicts ({"id" or "_id", "title", "text", "metadata"}), `Document` messages, a
  JSONL file (optionally .gz) or a BEIR folder (its corpus.jsonl). "id" and "text" are required
  ("text" may be empty: some BEIR documents only have a title); metadata values that are not
  strings are stored as their JSON text (1 -> "1", true -> "true"), and filters are converted the
  same way so that they match.
- An ingest whose source fails half way (a malformed line, an exception from the caller's
  iterable) cancels the call, so the server never commits part of it, and raises the source's error.
- Retries: only for calls the client marks idempotent, only on UNAVAILABLE, with exponential
  backoff and jitter, and never past the call's deadline. Every attempt carries the same request id.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import grpc
import grpc.aio
from google.protobuf.message import Message

from ragfleet.errors import InvalidArgument, RagfleetError, from_rpc_error, status_code
from ragfleet.v1 import common_pb2, pipeline_pb2, pipeline_pb2_grpc, retriever_pb2

REQUEST_ID_KEY = "x-request-id"
# Absolute deadline in Unix seconds: survives hops (such as Ray Serve's proxy) that drop gRPC's own.
DEADLINE_KEY = "x-ragfleet-deadline"
AUTHORIZATION_KEY = "authorization"
# Ray Serve's gRPC proxy routes on this key to the application of that name.
APPLICATION_KEY = "application"

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

DocumentLike = common_pb2.Document | Mapping[str, Any]
DocumentSource = str | os.PathLike[str] | Iterable[DocumentLike]
SpecLike = common_pb2.IndexSpec | Mapping[str, Any] | None
FusionLike = pipeline_pb2.Fusion | Mapping[str, Any] | str | None
ParamsLike = common_pb2.GenerationParams | Mapping[str, Any] | None
# {"exhaustive", "ncells", "centroid_score_threshold", "ndocs", "compressed_rerank"}: tuning of
# approximate retrievers (colbert).
OptionsLike = common_pb2.SearchOptions | Mapping[str, Any] | None
Filters = Mapping[str, Any] | None
Names = str | Sequence[str] | None
ChannelOptions = Sequence[tuple[str, Any]] | None

M = TypeVar("M", bound=Message)


# --- channels and metadata ---------------------------------------------------------------------


@overload
def make_channel(
    address: str,
    *,
    tls: bool = ...,
    root_certificates: bytes | None = ...,
    options: ChannelOptions = ...,
    aio: Literal[False] = ...,
) -> grpc.Channel: ...


@overload
def make_channel(
    address: str,
    *,
    tls: bool = ...,
    root_certificates: bytes | None = ...,
    options: ChannelOptions = ...,
    aio: Literal[True],
) -> grpc.aio.Channel: ...


@overload
def make_channel(
    address: str,
    *,
    tls: bool = ...,
    root_certificates: bytes | None = ...,
    options: ChannelOptions = ...,
    aio: bool,
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
    """One logical call: its request id, metadata, deadline and retries, shared by every attempt."""

    def __init__(
        self, timeout: float | None, *, token: str | None, application: str | None, retries: int
    ) -> None:
        self.request_id = uuid.uuid4().hex
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.metadata = tuple(
            call_metadata(
                token=token,
                application=application,
                request_id=self.request_id,
                deadline=None if timeout is None else time.time() + timeout,
            )
        )
        self._retries_left = retries
        self._attempt = 0

    def remaining(self) -> float | None:
        """Seconds left until the deadline (the gRPC timeout of the next attempt); None: no deadline."""
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    def retry_delay(self, err: grpc.RpcError) -> float | None:
        """Seconds to wait before retrying after `err`, or None when the call must fail with it."""
        if self._retries_left <= 0 or status_code(err) != grpc.StatusCode.UNAVAILABLE:
            return None
        ceiling = min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * BACKOFF_MULTIPLIER**self._attempt)
        delay = random.uniform(ceiling / 2, ceiling)
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            return None
        self._retries_left -= 1
        self._attempt += 1
        return delay

    def error(self, err: grpc.RpcError) -> RagfleetError:
        return from_rpc_error(err, request_id=self.request_id)


class BaseClient:
    """Configuration and channel shared by Client, AsyncClient and EvaluatorClient."""

    _aio = False
    _stub_class: Any = pipeline_pb2_grpc.PipelineStub

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
        self._retries = retries
        self._channel: Any = make_channel(
            address, tls=tls, root_certificates=root_certificates, options=options, aio=self._aio
        )
        self._stub = self._stub_class(self._channel)

    def _budget(self, timeout: float | None, *, idempotent: bool) -> CallBudget:
        """A call's budget; `timeout` None means the client's timeout."""
        return CallBudget(
            self._timeout if timeout is None else timeout,
            token=self._token,
            application=self._application,
            retries=self._retries if idempotent else 0,
        )


# --- requests ----------------------------------------------------------------------------------


def search_request(
    query: str,
    *,
    index: str,
    top_k: int,
    retrievers: Names,
    fusion: FusionLike,
    filters: Filters,
    with_continuation: bool,
    candidates: int,
    options: OptionsLike = None,
) -> pipeline_pb2.PipelineSearchRequest:
    return pipeline_pb2.PipelineSearchRequest(
        query=query,
        index=index,
        top_k=top_k,
        retrievers=_names(retrievers),
        fusion=to_fusion(fusion),
        filters=to_filters(filters),
        with_continuation=with_continuation,
        candidates=candidates,
        options=_message(common_pb2.SearchOptions, options, "options"),
    )


def search_batch_request(
    queries: Names,
    *,
    index: str,
    top_k: int,
    retrievers: Names,
    fusion: FusionLike,
    filters: Filters,
    candidates: int,
    options: OptionsLike = None,
) -> pipeline_pb2.PipelineSearchBatchRequest:
    return pipeline_pb2.PipelineSearchBatchRequest(
        queries=_names(queries),
        index=index,
        top_k=top_k,
        retrievers=_names(retrievers),
        fusion=to_fusion(fusion),
        filters=to_filters(filters),
        candidates=candidates,
        options=_message(common_pb2.SearchOptions, options, "options"),
    )


def ask_request(
    question: str,
    *,
    index: str,
    top_k: int,
    retrievers: Names,
    fusion: FusionLike,
    rerank: bool,
    generate: bool,
    params: ParamsLike,
    filters: Filters,
) -> pipeline_pb2.AskRequest:
    return pipeline_pb2.AskRequest(
        question=question,
        index=index,
        top_k=top_k,
        retrievers=_names(retrievers),
        fusion=to_fusion(fusion),
        rerank=rerank,
        generate=generate,
        params=_message(common_pb2.GenerationParams, params, "params"),
        filters=to_filters(filters),
    )


def delete_request(
    *, index: str, ids: Names, doc_ids: Names, drop_index: bool
) -> retriever_pb2.DeleteRequest:
    return retriever_pb2.DeleteRequest(
        index=index, ids=_names(ids), doc_ids=_names(doc_ids), drop_index=drop_index
    )


def rebuild_request(*, index: str, retrievers: Names) -> pipeline_pb2.PipelineRebuildRequest:
    return pipeline_pb2.PipelineRebuildRequest(index=index, retrievers=_names(retrievers))


def to_fusion(fusion: FusionLike) -> pipeline_pb2.Fusion | None:
    """None, a method name ("rrf", "weighted"), a dict of Fusion's fields, or a Fusion."""
    if isinstance(fusion, str):
        return pipeline_pb2.Fusion(method=fusion)
    return _message(pipeline_pb2.Fusion, fusion, "fusion")


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


def iter_documents(source: DocumentSource) -> Iterator[common_pb2.Document]:
    """Validated Documents from a JSONL file, a BEIR folder, or an iterable of dicts/Documents.

    The path is checked now; lines and items are read and checked as the iterator is consumed.
    """
    if isinstance(source, (str, os.PathLike)):
        return read_jsonl(corpus_path(source))
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


def read_jsonl(path: Path) -> Iterator[common_pb2.Document]:
    """Documents from a JSONL file (gzip when it ends in .gz); blank lines are skipped."""
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
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            yield document_from_mapping(record, where)


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

    def __init__(
        self,
        *,
        index: str,
        spec: SpecLike,
        upsert: bool,
        batch_size: int,
        progress: Callable[[int], object] | None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._header = pipeline_pb2.PipelineIngestRequest(
            index=index, spec=to_index_spec(spec), upsert=upsert
        )
        self._batch_size = batch_size
        self._progress = progress
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
