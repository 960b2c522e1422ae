"""The gateway's Ingest path against test-double Retrievers on loopback: chunking runs off the event
loop, what a request may make is bounded by the limits, every message to a retriever is bounded in
bytes, a retriever that dies mid-stream is reported UNAVAILABLE, and one stream names one index."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from ragfleet.v1 import common_pb2, pipeline_pb2, retriever_pb2, retriever_pb2_grpc
from services.gateway import service as gateway_service
from services.gateway.service import PipelineService
from services.runtime.calls import CallGate, rpc_methods
from services.runtime.context import CallContext
from services.runtime.errors import ServiceError
from services.runtime.settings import Endpoint, GatewaySettings, Limits, Settings

INGEST = next(m for m in rpc_methods("ragfleet.v1.Pipeline") if m.name == "Ingest")


class Retriever(retriever_pb2_grpc.RetrieverServicer):
    """Records every Ingest message; `received` is set once the first one arrived."""

    def __init__(self) -> None:
        self.messages: list[retriever_pb2.IngestRequest] = []
        self.received = asyncio.Event()

    async def Ingest(self, request_iterator, context):
        async for message in request_iterator:
            self.messages.append(message)
            self.received.set()
        return retriever_pb2.IngestReport(added=sum(len(m.passages) for m in self.messages))

    async def ListIndexes(self, request, context):
        return retriever_pb2.ListIndexesResponse()


@pytest.fixture
async def retriever():
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 30)])
    fake = Retriever()
    retriever_pb2_grpc.add_RetrieverServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", fake, server
    await server.stop(None)


def gateway(address: str, limits: Limits | None = None, **gateway_settings) -> PipelineService:
    settings = GatewaySettings(retrievers={"r1": Endpoint(address=address)}, **gateway_settings)
    return PipelineService(Settings(gateway=settings, limits=limits or Limits()))


def message(*docs: common_pb2.Document, index: str = "kb", last: bool = False, **chunking):
    spec = common_pb2.IndexSpec(chunking=common_pb2.ChunkingSpec(**chunking))
    return pipeline_pb2.PipelineIngestRequest(index=index, spec=spec, documents=docs, last=last)


def document(doc_id: str, text: str, **metadata: str) -> common_pb2.Document:
    return common_pb2.Document(id=doc_id, text=text, metadata=metadata)


async def stream(*messages: pipeline_pb2.PipelineIngestRequest, pause: float = 0.0) -> AsyncIterator:
    for m in messages:
        yield m
        await asyncio.sleep(pause)


async def refused(service: PipelineService, *messages) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await service.Ingest(stream(*messages), CallContext())
    return caught.value


def slow_chunking(monkeypatch, seconds: float) -> None:
    """Chunking that holds its thread (and the GIL-free sleep) for `seconds` per document."""
    chunk = gateway_service.chunk_document

    def slow(*args):
        time.sleep(seconds)
        return chunk(*args)

    monkeypatch.setattr(gateway_service, "chunk_document", slow)


async def test_other_calls_are_served_while_a_big_document_is_chunked(retriever, monkeypatch) -> None:
    address, fake, _ = retriever
    service = gateway(address)
    slow_chunking(monkeypatch, 1.0)
    start = time.perf_counter()

    async def cheap_call_soon() -> float:
        await asyncio.sleep(0.1)
        await service.ListIndexes(retriever_pb2.ListIndexesRequest(), CallContext())
        return time.perf_counter() - start

    report, answered = await asyncio.gather(
        service.Ingest(stream(message(document("a", "some text"), last=True)), CallContext()),
        cheap_call_soon(),
    )
    assert report.passages == 1
    assert answered < 0.6, f"ListIndexes waited {answered:.2f} s for the chunking"


async def test_the_deadline_stops_an_ingest_that_is_chunking(retriever, monkeypatch) -> None:
    address, _, _ = retriever
    service = gateway(address)
    gate = CallGate("Pipeline", service.settings)
    slow_chunking(monkeypatch, 0.5)
    docs = [message(document(f"d{i}", "text")) for i in range(5)] + [message(last=True)]
    start = time.perf_counter()
    with pytest.raises(ServiceError) as caught:
        await gate.unary(INGEST, lambda c: service.Ingest(stream(*docs), c), gate.context([], 0.3))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - start < 0.9


async def test_metadata_or_a_title_over_the_limit_is_refused_before_chunking(retriever) -> None:
    address, fake, _ = retriever
    service = gateway(address, Limits(max_metadata_bytes=1000))
    ok = message(document("a", "x " * 50, k="v" * 990), last=True, chunk_tokens=1)
    assert (await service.Ingest(stream(ok), CallContext())).passages == 50
    big = message(document("a", "x " * 50, k="v" * 2000), last=True, chunk_tokens=1)
    err = await refused(service, big)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message.startswith("documents[0].metadata:") and "limits.max_metadata_bytes" in err.message
    titled = common_pb2.Document(id="a", title="t" * 5000, text="x")
    err = await refused(service, message(titled, last=True))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.message.startswith("documents[0].title:")


async def test_a_document_cut_into_too_many_passages_is_refused(retriever) -> None:
    address, _, _ = retriever
    err = await refused(gateway(address), message(document("a", "x " * 20_000), last=True, chunk_tokens=1))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_passages_per_document" in err.message


async def test_a_window_over_the_limit_is_refused(retriever) -> None:
    address, _, _ = retriever
    err = await refused(gateway(address), message(document("a", "x"), last=True, chunk_tokens=2**31 - 1))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "limits.max_chunk_tokens" in err.message


async def test_messages_to_retrievers_are_bounded_in_bytes(retriever) -> None:
    address, fake, _ = retriever
    batch_bytes = 64 * 1024
    service = gateway(address, ingest_batch_bytes=batch_bytes)
    # 2,000 passages of about 1.1 KB (1 KB of metadata each) from one document: 2.2 MB in all.
    doc = document("a", "word " * 2000, blob="m" * 1000)
    report = await service.Ingest(stream(message(doc, last=True, chunk_tokens=1)), CallContext())
    assert report.passages == 2000
    assert sum(len(m.passages) for m in fake.messages) == 2000
    sizes = [m.ByteSize() for m in fake.messages]
    # Each passage adds a few bytes of field prefix to its message; the first one holds the spec.
    assert max(sizes) <= batch_bytes + 100 and len(sizes) >= sum(sizes) // batch_bytes


async def test_a_later_message_naming_another_index_is_refused(retriever) -> None:
    address, fake, _ = retriever
    service = gateway(address)
    same = [message(document("a", "x")), message(document("b", "y"), index="kb", last=True)]
    assert (await service.Ingest(stream(*same), CallContext())).documents == 2
    unnamed = [message(document("a", "x")), message(document("b", "y"), index="", last=True)]
    assert (await service.Ingest(stream(*unnamed), CallContext())).documents == 2
    err = await refused(service, message(document("a", "x")), message(document("b", "y"), index="other"))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.message.startswith("index:")
    assert "'other'" in err.message and "'kb'" in err.message


async def test_a_retriever_that_dies_mid_stream_is_reported_unavailable(retriever) -> None:
    address, fake, server = retriever
    service = gateway(address, ingest_batch=1)
    messages = [message(document(f"d{i}", "some words here"), chunk_tokens=1) for i in range(200)]

    async def die_after_the_first_message() -> None:
        await fake.received.wait()
        await server.stop(None)

    results = await asyncio.gather(
        service.Ingest(stream(*messages, message(last=True), pause=0.005), CallContext()),
        die_after_the_first_message(),
        return_exceptions=True,
    )
    err = results[0]
    assert isinstance(err, ServiceError), err
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.message.startswith("retriever r1:")
