"""The asyncio ragfleet client: the same methods as `ragfleet.Client`, awaitable.

    async with ragfleet.AsyncClient("127.0.0.1:50051") as client:
        await client.ingest("corpus.jsonl", index="docs")
        async for event in client.ask("what is ...", index="docs"):
            print(event.WhichOneof("event"))

`ask` is not a coroutine: it returns an async iterator of events. `ingest` also accepts an async
iterable of dicts or Documents. Timeouts, retries and errors behave as in `ragfleet.client`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from ragfleet._common import (
    BaseClient,
    CallBudget,
    DocumentLike,
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

AsyncDocumentSource = DocumentSource | AsyncIterable[DocumentLike]


class AsyncClient(BaseClient):
    """asyncio client for the Pipeline service; create it inside a running event loop."""

    _aio = True
    _channel: grpc.aio.Channel

    async def ingest(
        self,
        source: AsyncDocumentSource,
        *,
        index: str,
        spec: SpecLike = None,
        upsert: bool = False,
        batch_size: int = 256,
        progress: Callable[[int], object] | None = None,
        timeout: float | None = None,
    ) -> pipeline_pb2.PipelineIngestReport:
        """Streams documents (dicts, Documents, async iterables of them, a JSONL file or a BEIR
        folder) into `index`; `progress(n)` gets the number of documents sent so far."""
        stream = IngestStream(index=index, spec=spec, upsert=upsert, batch_size=batch_size, progress=progress)
        documents = source if isinstance(source, AsyncIterable) else iter_documents(source)
        budget = self._budget(timeout, idempotent=False)
        call = self._stub.Ingest(
            stream.arequests(documents), timeout=budget.remaining(), metadata=budget.metadata
        )
        try:
            return await call
        except asyncio.CancelledError:
            # grpc.aio cancels the call when the request iterator raises.
            if stream.error is None:
                raise
            raise stream.error from None
        except grpc.RpcError as err:
            raise budget.error(err) from err

    async def search(
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
        return await self._unary(self._stub.Search, request, timeout, idempotent=True)

    async def search_batch(
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
        return await self._unary(self._stub.SearchBatch, request, timeout, idempotent=True)

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
    ) -> AsyncIterator[pipeline_pb2.AskEvent]:
        """An async iterator of events: retrieved, reranked (when asked), tokens, then the answer.

        To stop early and cancel the call at once, close it (`contextlib.aclosing`).
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
        return _events(call, budget)

    async def ask_once(
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
        return await self._unary(self._stub.Ask, request, timeout, idempotent=False)

    async def delete(
        self,
        *,
        index: str,
        ids: Names = (),
        doc_ids: Names = (),
        drop_index: bool = False,
        timeout: float | None = None,
    ) -> pipeline_pb2.PipelineDeleteResponse:
        request = delete_request(index=index, ids=ids, doc_ids=doc_ids, drop_index=drop_index)
        return await self._unary(self._stub.Delete, request, timeout, idempotent=False)

    async def rebuild(
        self, index: str, *, retrievers: Names = None, timeout: float | None = None
    ) -> pipeline_pb2.PipelineRebuildResponse:
        """Rebuilds the index's search structures (colbert: centroids and codes) in `retrievers`
        (default: every retriever holding the index); exact retrievers report their version unchanged."""
        request = rebuild_request(index=index, retrievers=retrievers)
        return await self._unary(self._stub.Rebuild, request, timeout, idempotent=False)

    async def describe_index(
        self, index: str, *, timeout: float | None = None
    ) -> pipeline_pb2.PipelineIndexDescription:
        request = retriever_pb2.DescribeIndexRequest(index=index)
        return await self._unary(self._stub.DescribeIndex, request, timeout, idempotent=True)

    async def list_indexes(
        self, *, timeout: float | None = None
    ) -> list[pipeline_pb2.PipelineIndexDescription]:
        request = retriever_pb2.ListIndexesRequest()
        response = await self._unary(self._stub.ListIndexes, request, timeout, idempotent=True)
        return list(response.indexes)

    async def describe(self, *, timeout: float | None = None) -> pipeline_pb2.DescribeResponse:
        request = pipeline_pb2.DescribeRequest()
        return await self._unary(self._stub.Describe, request, timeout, idempotent=True)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Waits until the channel is connected; raises errors.Unavailable after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:  # noqa: UP041 - not the builtin TimeoutError on Python 3.10
            raise Unavailable(f"{self.address}: not reachable within {timeout:g} s") from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable,
        request: Any,
        timeout: float | None,
        *,
        idempotent: bool,
    ) -> Any:
        budget = self._budget(timeout, idempotent=idempotent)
        while True:
            try:
                return await method(request, timeout=budget.remaining(), metadata=budget.metadata)
            except grpc.RpcError as err:
                delay = budget.retry_delay(err)
                if delay is None:
                    raise budget.error(err) from err
            await asyncio.sleep(delay)


async def _events(call: Any, budget: CallBudget) -> AsyncIterator[pipeline_pb2.AskEvent]:
    try:
        async for event in call:
            yield event
    except grpc.RpcError as err:
        raise budget.error(err) from err
    finally:
        call.cancel()
