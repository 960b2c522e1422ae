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

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import grpc

from ragfleet._common import (
    BaseClient,
    CallBudget,
    DocumentSource,
    Filters,
    FusionLike,
    IngestStream,
    Names,
    OptionsLike,
    ParamsLike,
    SpecLike,
    ask_request,
    delete_request,
    iter_documents,
    rebuild_request,
    search_batch_request,
    search_request,
)
from ragfleet.errors import Unavailable
from ragfleet.v1 import pipeline_pb2, retriever_pb2

_Client = TypeVar("_Client", bound="SyncClientBase")


class SyncClientBase(BaseClient):
    """The blocking plumbing every synchronous client shares: unary calls with retries, closing."""

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

    def _unary(
        self, method: grpc.UnaryUnaryMultiCallable, request: Any, timeout: float | None, *, idempotent: bool
    ) -> Any:
        budget = self._budget(timeout, idempotent=idempotent)
        while True:
            try:
                return method(request, timeout=budget.remaining(), metadata=budget.metadata)
            except grpc.RpcError as err:
                delay = budget.retry_delay(err)
                if delay is None:
                    raise budget.error(err) from err
            time.sleep(delay)


class Client(SyncClientBase):
    """Blocking client for the Pipeline service; see the module docstring."""

    def ingest(
        self,
        source: DocumentSource,
        *,
        index: str,
        spec: SpecLike = None,
        upsert: bool = False,
        batch_size: int = 256,
        progress: Callable[[int], object] | None = None,
        timeout: float | None = None,
    ) -> pipeline_pb2.PipelineIngestReport:
        """Streams documents (dicts, Documents, a JSONL file or a BEIR folder) into `index`.

        `progress(n)` is called with the number of documents sent so far after each message.
        """
        stream = IngestStream(index=index, spec=spec, upsert=upsert, batch_size=batch_size, progress=progress)
        documents = iter_documents(source)
        budget = self._budget(timeout, idempotent=False)
        future = self._stub.Ingest.future(
            stream.requests(documents), timeout=budget.remaining(), metadata=budget.metadata
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
        self,
        query: str,
        *,
        index: str,
        top_k: int = 10,
        retrievers: Names = None,
        fusion: FusionLike = None,
        filters: Filters = None,
        with_continuation: bool = False,
        candidates: int = 0,
        options: OptionsLike = None,
        timeout: float | None = None,
    ) -> pipeline_pb2.PipelineSearchResponse:
        """Retrieves and fuses. `options` tunes approximate retrievers (colbert): a dict of
        SearchOptions' fields, e.g. {"exhaustive": True} or {"ncells": 4, "ndocs": 4096}."""
        request = search_request(
            query,
            index=index,
            top_k=top_k,
            retrievers=retrievers,
            fusion=fusion,
            filters=filters,
            with_continuation=with_continuation,
            candidates=candidates,
            options=options,
        )
        return self._unary(self._stub.Search, request, timeout, idempotent=True)

    def search_batch(
        self,
        queries: Names,
        *,
        index: str,
        top_k: int = 10,
        retrievers: Names = None,
        fusion: FusionLike = None,
        filters: Filters = None,
        candidates: int = 0,
        options: OptionsLike = None,
        timeout: float | None = None,
    ) -> pipeline_pb2.PipelineSearchBatchResponse:
        request = search_batch_request(
            queries,
            index=index,
            top_k=top_k,
            retrievers=retrievers,
            fusion=fusion,
            filters=filters,
            candidates=candidates,
            options=options,
        )
        return self._unary(self._stub.SearchBatch, request, timeout, idempotent=True)

    def ask(
        self,
        question: str,
        *,
        index: str,
        top_k: int = 5,
        retrievers: Names = None,
        fusion: FusionLike = None,
        rerank: bool = False,
        generate: bool = True,
        params: ParamsLike = None,
        filters: Filters = None,
        timeout: float | None = None,
    ) -> Iterator[pipeline_pb2.AskEvent]:
        """Streams events: retrieved, reranked (when asked), tokens, then the answer.

        Stopping the iteration early (break, close()) cancels the call.
        """
        request = ask_request(
            question,
            index=index,
            top_k=top_k,
            retrievers=retrievers,
            fusion=fusion,
            rerank=rerank,
            generate=generate,
            params=params,
            filters=filters,
        )
        budget = self._budget(timeout, idempotent=False)
        call = self._stub.AskStream(request, timeout=budget.remaining(), metadata=budget.metadata)
        return relay_stream(call, budget)

    def ask_once(
        self,
        question: str,
        *,
        index: str,
        top_k: int = 5,
        retrievers: Names = None,
        fusion: FusionLike = None,
        rerank: bool = False,
        generate: bool = True,
        params: ParamsLike = None,
        filters: Filters = None,
        timeout: float | None = None,
    ) -> pipeline_pb2.AskResponse:
        request = ask_request(
            question,
            index=index,
            top_k=top_k,
            retrievers=retrievers,
            fusion=fusion,
            rerank=rerank,
            generate=generate,
            params=params,
            filters=filters,
        )
        return self._unary(self._stub.Ask, request, timeout, idempotent=False)

    def delete(
        self,
        *,
        index: str,
        ids: Names = (),
        doc_ids: Names = (),
        drop_index: bool = False,
        timeout: float | None = None,
    ) -> pipeline_pb2.PipelineDeleteResponse:
        """Deletes passages by id, whole documents by id, or (drop_index=True) the index."""
        request = delete_request(index=index, ids=ids, doc_ids=doc_ids, drop_index=drop_index)
        return self._unary(self._stub.Delete, request, timeout, idempotent=False)

    def rebuild(
        self, index: str, *, retrievers: Names = None, timeout: float | None = None
    ) -> pipeline_pb2.PipelineRebuildResponse:
        """Rebuilds the index's search structures (colbert: centroids and codes) in `retrievers`
        (default: every retriever holding the index); exact retrievers report their version unchanged."""
        request = rebuild_request(index=index, retrievers=retrievers)
        return self._unary(self._stub.Rebuild, request, timeout, idempotent=False)

    def describe_index(
        self, index: str, *, timeout: float | None = None
    ) -> pipeline_pb2.PipelineIndexDescription:
        request = retriever_pb2.DescribeIndexRequest(index=index)
        return self._unary(self._stub.DescribeIndex, request, timeout, idempotent=True)

    def list_indexes(self, *, timeout: float | None = None) -> list[pipeline_pb2.PipelineIndexDescription]:
        request = retriever_pb2.ListIndexesRequest()
        response = self._unary(self._stub.ListIndexes, request, timeout, idempotent=True)
        return list(response.indexes)

    def describe(self, *, timeout: float | None = None) -> pipeline_pb2.DescribeResponse:
        return self._unary(self._stub.Describe, pipeline_pb2.DescribeRequest(), timeout, idempotent=True)

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
