"""The synchronous ragfleet client: one method per Pipeline RPC.

    with ragfleet.Client("127.0.0.1:50051") as client:
        client.ingest("data/scifact", index="scifact", spec={"chunking": {"whole_documents": True}})
        for hit in client.search("what is ...", index="scifact").results:
            print(hit.score, hit.passage.id)

Every method takes `timeout` (seconds; None means the client's), raises `ragfleet.errors.*`, and
retries only the idempotent ones (search, search_batch, describe_index, list_indexes, describe) on
UNAVAILABLE. An ingest's `timeout` bounds the whole upload: raise it for large corpora.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from ragfleet import _common
from ragfleet._common import BaseClient, CallBudget
from ragfleet.errors import Unavailable
from ragfleet.v1 import pipeline_pb2, retriever_pb2

if TYPE_CHECKING:
    from typing_extensions import Unpack

_Client = TypeVar("_Client", bound="SyncClientBase")


class SyncClientBase(BaseClient):
    """The blocking plumbing every synchronous client shares: unary calls, closing."""

    _channel: grpc.Channel

    def close(self) -> None:
        self._channel.close()

    def __enter__(self: _Client) -> _Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _unary(self, method: grpc.UnaryUnaryMultiCallable, request: Any, timeout: float | None) -> Any:
        budget = self._budget(timeout)
        try:
            return method(request, timeout=budget.timeout, metadata=budget.metadata)
        except grpc.RpcError as err:
            raise budget.error(err) from err


class Client(SyncClientBase):
    """Blocking client for the Pipeline service; see the module docstring."""

    def ingest(
        self,
        source: _common.DocumentSource,
        *,
        timeout: float | None = None,
        **fields: Unpack[_common.IngestArgs],
    ) -> pipeline_pb2.PipelineIngestReport:
        """Streams documents (dicts, Documents, a JSONL file or a BEIR folder) into `index`; see
        `_common.IngestArgs` for the other keyword arguments."""
        stream = _common.IngestStream(fields)
        documents = _common.iter_documents(source)
        budget = self._budget(timeout)
        future = self._stub.Ingest.future(
            stream.requests(documents), timeout=budget.timeout, metadata=budget.metadata
        )
        stream.bind(future.cancel)
        try:
            return future.result()
        except grpc.FutureCancelledError:
            if stream.error is None:
                raise
            raise stream.error from None
        except grpc.RpcError as err:
            raise budget.error(err) from err
        finally:
            future.cancel()

    def search(
        self, query: str, *, timeout: float | None = None, **fields: Unpack[_common.SearchArgs]
    ) -> pipeline_pb2.PipelineSearchResponse:
        """Retrieves and fuses: `index` and the keyword arguments of `RetrievalArgs` (top_k=10,
        retrievers, fusion, filters, candidates, options, with_continuation) over `retrieval`, a
        RetrievalSpec or dict. `options` tunes approximate retrievers (colbert), e.g.
        {"exhaustive": True} or {"ncells": 4, "ndocs": 4096}. `rerank=True` (or a dict such as
        {"depth": 30, "model": PATH}) reranks the fused list; the response's `rerank` says how."""
        request = _common.search_request(query, fields)
        return self._unary(self._stub.Search, request, timeout)

    def search_batch(
        self, queries: _common.Names, *, timeout: float | None = None, **fields: Unpack[_common.SearchArgs]
    ) -> pipeline_pb2.PipelineSearchBatchResponse:
        """`search` for many queries with one spec, in one call."""
        request = _common.search_batch_request(queries, fields)
        return self._unary(self._stub.SearchBatch, request, timeout)

    def ask(
        self, question: str, *, timeout: float | None = None, **fields: Unpack[_common.AskArgs]
    ) -> Iterator[pipeline_pb2.AskEvent]:
        """Streams events: retrieved, reranked (when asked), tokens, then the answer. Retrieval as in
        `search`, with top_k=5.

        Stopping the iteration early (break, close()) cancels the call.
        """
        return relay_stream(
            *self._start_stream(self._stub.AskStream, _common.ask_request(question, fields), timeout)
        )

    def ask_once(
        self, question: str, *, timeout: float | None = None, **fields: Unpack[_common.AskArgs]
    ) -> pipeline_pb2.AskResponse:
        """`ask` collected into one reply."""
        request = _common.ask_request(question, fields)
        return self._unary(self._stub.Ask, request, timeout)

    def delete(
        self, *, timeout: float | None = None, **fields: Unpack[_common.DeleteArgs]
    ) -> pipeline_pb2.PipelineDeleteResponse:
        """Deletes passages by id, whole documents by id, or (drop_index=True) the index."""
        return self._unary(self._stub.Delete, _common.delete_request(fields), timeout)

    def rebuild(
        self, index: str, *, retrievers: _common.Names = None, timeout: float | None = None
    ) -> pipeline_pb2.PipelineRebuildResponse:
        """Rebuilds the index's search structures (colbert: centroids and codes) in `retrievers`
        (default: every retriever holding the index); exact retrievers report their version unchanged."""
        request = _common.rebuild_request(index=index, retrievers=retrievers)
        return self._unary(self._stub.Rebuild, request, timeout)

    def describe_index(
        self, index: str, *, timeout: float | None = None
    ) -> pipeline_pb2.PipelineIndexDescription:
        request = retriever_pb2.DescribeIndexRequest(index=index)
        return self._unary(self._stub.DescribeIndex, request, timeout)

    def list_indexes(self, *, timeout: float | None = None) -> list[pipeline_pb2.PipelineIndexDescription]:
        request = retriever_pb2.ListIndexesRequest()
        response = self._unary(self._stub.ListIndexes, request, timeout)
        return list(response.indexes)

    def describe(self, *, timeout: float | None = None) -> pipeline_pb2.DescribeResponse:
        return self._unary(self._stub.Describe, pipeline_pb2.DescribeRequest(), timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Waits until the channel is connected; raises errors.Unavailable after `timeout` seconds."""
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            ready.cancel()
            raise Unavailable(f"{self.address}: not reachable within {timeout:g} s") from None


def relay_stream(call: Any, budget: CallBudget) -> Iterator[Any]:
    """Yields a server stream's messages, raising ragfleet.errors.* and cancelling the call on exit."""
    try:
        yield from call
    except grpc.RpcError as err:
        raise budget.error(err) from err
    finally:
        call.cancel()
