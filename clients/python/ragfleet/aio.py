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
from collections.abc import AsyncIterable, AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from ragfleet import _common
from ragfleet._common import BaseClient, CallBudget
from ragfleet.errors import Unavailable
from ragfleet.v1 import pipeline_pb2, retriever_pb2

if TYPE_CHECKING:
    from typing_extensions import Unpack

AsyncDocumentSource = _common.DocumentSource | AsyncIterable[_common.DocumentLike]


class AsyncClient(BaseClient):
    """asyncio client for the Pipeline service; create it inside a running event loop."""

    _aio = True
    _channel: grpc.aio.Channel

    async def ingest(
        self,
        source: AsyncDocumentSource,
        *,
        timeout: float | None = None,
        **fields: Unpack[_common.IngestArgs],
    ) -> pipeline_pb2.PipelineIngestReport:
        """Streams documents (dicts, Documents, async iterables of them, a JSONL file or a BEIR
        folder) into `index`; `progress(n)` gets the number of documents sent so far."""
        stream = _common.IngestStream(fields)
        documents = source if isinstance(source, AsyncIterable) else _common.iter_documents(source)
        budget = self._budget(timeout)
        call = self._stub.Ingest(
            stream.arequests(documents), timeout=budget.timeout, metadata=budget.metadata
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
        self, query: str, *, timeout: float | None = None, **fields: Unpack[_common.SearchArgs]
    ) -> pipeline_pb2.PipelineSearchResponse:
        """Retrieves and fuses; arguments as in `Client.search`."""
        request = _common.search_request(query, fields)
        return await self._unary(self._stub.Search, request, timeout)

    async def search_batch(
        self, queries: _common.Names, *, timeout: float | None = None, **fields: Unpack[_common.SearchArgs]
    ) -> pipeline_pb2.PipelineSearchBatchResponse:
        request = _common.search_batch_request(queries, fields)
        return await self._unary(self._stub.SearchBatch, request, timeout)

    def ask(
        self, question: str, *, timeout: float | None = None, **fields: Unpack[_common.AskArgs]
    ) -> AsyncIterator[pipeline_pb2.AskEvent]:
        """An async iterator of events: retrieved, reranked (when asked), tokens, then the answer.

        To stop early and cancel the call at once, close it (`contextlib.aclosing`).
        """
        return _events(
            *self._start_stream(self._stub.AskStream, _common.ask_request(question, fields), timeout)
        )

    async def ask_once(
        self, question: str, *, timeout: float | None = None, **fields: Unpack[_common.AskArgs]
    ) -> pipeline_pb2.AskResponse:
        request = _common.ask_request(question, fields)
        return await self._unary(self._stub.Ask, request, timeout)

    async def delete(
        self, *, timeout: float | None = None, **fields: Unpack[_common.DeleteArgs]
    ) -> pipeline_pb2.PipelineDeleteResponse:
        return await self._unary(self._stub.Delete, _common.delete_request(fields), timeout)

    async def rebuild(
        self, index: str, *, retrievers: _common.Names = None, timeout: float | None = None
    ) -> pipeline_pb2.PipelineRebuildResponse:
        """Rebuilds the index's search structures (colbert: centroids and codes) in `retrievers`
        (default: every retriever holding the index); exact retrievers report their version unchanged."""
        request = _common.rebuild_request(index=index, retrievers=retrievers)
        return await self._unary(self._stub.Rebuild, request, timeout)

    async def describe_index(
        self, index: str, *, timeout: float | None = None
    ) -> pipeline_pb2.PipelineIndexDescription:
        request = retriever_pb2.DescribeIndexRequest(index=index)
        return await self._unary(self._stub.DescribeIndex, request, timeout)

    async def list_indexes(
        self, *, timeout: float | None = None
    ) -> list[pipeline_pb2.PipelineIndexDescription]:
        request = retriever_pb2.ListIndexesRequest()
        response = await self._unary(self._stub.ListIndexes, request, timeout)
        return list(response.indexes)

    async def describe(self, *, timeout: float | None = None) -> pipeline_pb2.DescribeResponse:
        request = pipeline_pb2.DescribeRequest()
        return await self._unary(self._stub.Describe, request, timeout)

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
        self, method: grpc.aio.UnaryUnaryMultiCallable, request: Any, timeout: float | None
    ) -> Any:
        budget = self._budget(timeout)
        try:
            return await method(request, timeout=budget.timeout, metadata=budget.metadata)
        except grpc.RpcError as err:
            raise budget.error(err) from err


async def _events(call: Any, budget: CallBudget) -> AsyncIterator[pipeline_pb2.AskEvent]:
    try:
        async for event in call:
            yield event
    except grpc.RpcError as err:
        raise budget.error(err) from err
    finally:
        call.cancel()
