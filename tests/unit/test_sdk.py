"""ragfleet.Client and ragfleet.AsyncClient against a test-double Pipeline over real loopback gRPC."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

import ragfleet
from ragfleet import _common, errors
from ragfleet.v1 import common_pb2, pipeline_pb2, pipeline_pb2_grpc, retriever_pb2

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@dataclass
class Seen:
    method: str
    request: Any  # Ingest: the list of messages received
    metadata: dict[str, str]
    time_remaining: float | None


class FakePipeline(pipeline_pb2_grpc.PipelineServicer):
    """Records every call and its metadata; `fail(method, code, times)` makes calls fail first."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.failures: dict[str, list[grpc.StatusCode]] = {}
        self.committed: list[list[pipeline_pb2.PipelineIngestRequest]] = []
        self.ingest_ended = threading.Event()

    def fail(self, method: str, code: grpc.StatusCode, times: int = 1) -> None:
        self.failures.setdefault(method, []).extend([code] * times)

    def calls(self, method: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.method == method]

    def _enter(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        metadata = {key: value for key, value in context.invocation_metadata()}
        self.seen.append(Seen(method, request, metadata, context.time_remaining()))
        if self.failures.get(method):
            context.abort(self.failures[method].pop(0), f"injected failure of {method}")

    def Ingest(self, request_iterator, context):
        messages: list[pipeline_pb2.PipelineIngestRequest] = []
        self._enter("Ingest", messages, context)
        try:
            messages.extend(request_iterator)
            # A cancelled stream can end like a completed one: as the real servers do, commit only
            # when the final message is marked last.
            if not messages or not messages[-1].last:
                return pipeline_pb2.PipelineIngestReport()
        except grpc.RpcError:  # the client cancelled while messages were still coming
            return pipeline_pb2.PipelineIngestReport()
        finally:
            self.ingest_ended.set()
        self.committed.append(messages)
        return pipeline_pb2.PipelineIngestReport(documents=sum(len(m.documents) for m in messages))

    def Search(self, request, context):
        self._enter("Search", request, context)
        if request.query == "slow":
            time.sleep(0.5)
        return search_response(request.query)

    def SearchBatch(self, request, context):
        self._enter("SearchBatch", request, context)
        return pipeline_pb2.PipelineSearchBatchResponse(
            responses=[search_response(q) for q in request.queries]
        )

    def Ask(self, request, context):
        self._enter("Ask", request, context)
        return pipeline_pb2.AskResponse(answer=pipeline_pb2.Answer(text="42"))

    def AskStream(self, request, context):
        self._enter("AskStream", request, context)
        yield pipeline_pb2.AskEvent(retrieved=pipeline_pb2.PassageList(passages=search_response("q").results))
        for token in ("4", "2"):
            yield pipeline_pb2.AskEvent(token=token)
        yield pipeline_pb2.AskEvent(answer=pipeline_pb2.Answer(text="42"))

    def Delete(self, request, context):
        self._enter("Delete", request, context)
        deleted = len(request.ids) + len(request.doc_ids)
        return pipeline_pb2.PipelineDeleteResponse(retrievers=[retriever_pb2.DeleteResponse(deleted=deleted)])

    def Rebuild(self, request, context):
        self._enter("Rebuild", request, context)
        version = common_pb2.IndexVersion(index=request.index, retriever="colbert", version=2)
        return pipeline_pb2.PipelineRebuildResponse(
            retrievers=[retriever_pb2.RebuildResponse(version=version)]
        )

    def DescribeIndex(self, request, context):
        self._enter("DescribeIndex", request, context)
        if request.index == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "index 'missing' not found")
        return pipeline_pb2.PipelineIndexDescription(index=request.index)

    def ListIndexes(self, request, context):
        self._enter("ListIndexes", request, context)
        return pipeline_pb2.PipelineListIndexesResponse(
            indexes=[pipeline_pb2.PipelineIndexDescription(index=name) for name in ("a", "b")]
        )

    def Describe(self, request, context):
        self._enter("Describe", request, context)
        return pipeline_pb2.DescribeResponse(version="test", retrievers=["dense"])


def search_response(query: str) -> pipeline_pb2.PipelineSearchResponse:
    passage = common_pb2.Passage(id="d1#0", doc_id="d1", text=query)
    return pipeline_pb2.PipelineSearchResponse(
        results=[common_pb2.ScoredPassage(passage=passage, score=1.0, retriever="fused", rank=1)]
    )


@pytest.fixture
def fake() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def address(fake: FakePipeline) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pipeline_pb2_grpc.add_PipelineServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def client(address: str) -> Iterator[ragfleet.Client]:
    with ragfleet.Client(address, timeout=5.0) as client:
        yield client


@pytest.fixture
async def aclient(address: str) -> AsyncIterator[ragfleet.AsyncClient]:
    async with ragfleet.AsyncClient(address, timeout=5.0) as client:
        yield client


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "INITIAL_BACKOFF_S", 0.01)


def corpus(n: int) -> list[dict[str, str]]:
    return [{"id": f"d{i}", "title": f"T{i}", "text": f"text {i}"} for i in range(n)]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- ingest ------------------------------------------------------------------------------------


def test_ingest_list_batches_with_header_first(client: ragfleet.Client, fake: FakePipeline) -> None:
    sent: list[int] = []
    report = client.ingest(
        corpus(5),
        index="docs",
        spec={"model": "m", "chunking": {"whole_documents": True}},
        upsert=True,
        batch_size=2,
        progress=sent.append,
    )
    assert report.documents == 5 and sent == [2, 4, 5]
    (messages,) = fake.committed
    assert [len(m.documents) for m in messages] == [2, 2, 1]
    first = messages[0]
    assert first.index == "docs" and first.upsert and first.spec.chunking.whole_documents
    assert all(not m.index and not m.HasField("spec") for m in messages[1:])
    assert [d.id for m in messages for d in m.documents] == [f"d{i}" for i in range(5)]


def test_ingest_jsonl_file_and_beir_folder(
    client: ragfleet.Client, fake: FakePipeline, tmp_path: Path
) -> None:
    lines = [json.dumps({"_id": f"b{i}", "title": "", "text": f"beir {i}"}) for i in range(3)]
    path = write_jsonl(tmp_path / "corpus.jsonl", lines)
    assert client.ingest(str(path), index="f").documents == 3
    assert client.ingest(tmp_path, index="beir", batch_size=1).documents == 3
    assert [len(m.documents) for m in fake.committed[1]] == [1, 1, 1, 0]
    assert [m.last for m in fake.committed[1]] == [False, False, False, True]
    assert fake.committed[1][2].documents[0].id == "b2"


def test_malformed_jsonl_mid_stream_cancels_ingest(
    client: ragfleet.Client, fake: FakePipeline, tmp_path: Path
) -> None:
    lines = [json.dumps(d) for d in corpus(3)] + ['{"id": "d3", "text": oops}']
    path = write_jsonl(tmp_path / "corpus.jsonl", lines)
    with pytest.raises(errors.InvalidArgument, match=r"corpus\.jsonl:4: invalid JSON") as info:
        client.ingest(path, index="docs", batch_size=1)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.ingest_ended.wait(5) and fake.committed == []
    assert len(fake.calls("Ingest")) == 1


def test_non_utf8_jsonl_is_rejected_before_commit(
    client: ragfleet.Client, fake: FakePipeline, tmp_path: Path
) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(json.dumps(corpus(1)[0]).encode() + b"\n" + b'{"id": "x", "text": "\xff"}\n')
    with pytest.raises(errors.InvalidArgument, match=r"corpus\.jsonl:2: not valid UTF-8"):
        client.ingest(path, index="docs")
    assert fake.committed == []


def test_failing_caller_iterable_cancels_ingest(client: ragfleet.Client, fake: FakePipeline) -> None:
    def documents() -> Iterator[dict[str, str]]:
        yield from corpus(2)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        client.ingest(documents(), index="docs", batch_size=1)
    assert fake.ingest_ended.wait(5) and fake.committed == []


def test_ingest_and_delete_are_not_retried(client: ragfleet.Client, fake: FakePipeline) -> None:
    fake.fail("Ingest", UNAVAILABLE)
    fake.fail("Delete", UNAVAILABLE)
    fake.fail("Ask", UNAVAILABLE)
    with pytest.raises(errors.Unavailable):
        client.ingest(corpus(2), index="docs")
    with pytest.raises(errors.Unavailable):
        client.delete(index="docs", ids=["d0#0"])
    with pytest.raises(errors.Unavailable):
        client.ask_once("q", index="docs")
    assert [len(fake.calls(m)) for m in ("Ingest", "Delete", "Ask")] == [1, 1, 1]


# --- search, retries, errors, metadata ---------------------------------------------------------


def test_search_sends_every_argument(client: ragfleet.Client, fake: FakePipeline) -> None:
    response = client.search(
        "hello",
        index="docs",
        top_k=3,
        retrievers=["dense", "bm25"],
        fusion="weighted",
        filters={"lang": "en"},
        with_continuation=True,
        candidates=40,
    )
    assert response.results[0].passage.text == "hello"
    request = fake.calls("Search")[0].request.retrieval
    assert (request.index, request.top_k, request.candidates) == ("docs", 3, 40)
    assert list(request.retrievers) == ["dense", "bm25"] and request.fusion.method == "weighted"
    assert dict(request.filters) == {"lang": "en"} and request.with_continuation


def test_search_options_and_rebuild(client: ragfleet.Client, fake: FakePipeline) -> None:
    client.search("q", index="docs", retrievers="colbert", options={"exhaustive": True})
    client.search_batch(["a"], index="docs", options=ragfleet.SearchOptions(ncells=4, ndocs=512))
    client.search("q", index="docs")
    search, plain = fake.calls("Search")
    assert search.request.retrieval.options.exhaustive and not plain.request.retrieval.HasField("options")
    batch = fake.calls("SearchBatch")[0].request.retrieval.options
    assert (batch.ncells, batch.ndocs, batch.exhaustive) == (4, 512, False)
    with pytest.raises(errors.InvalidArgument, match="options: .*nprobe"):
        client.search("q", index="docs", options={"nprobe": 3})
    done = client.rebuild("docs", retrievers="colbert")
    assert done.retrievers[0].version.version == 2
    fake.fail("Rebuild", UNAVAILABLE)
    with pytest.raises(errors.Unavailable):
        client.rebuild("docs")
    first, second = fake.calls("Rebuild")
    assert (first.request.index, list(first.request.retrievers)) == ("docs", ["colbert"])
    assert list(second.request.retrievers) == []


def test_search_retries_unavailable_with_one_request_id(client: ragfleet.Client, fake: FakePipeline) -> None:
    fake.fail("Search", UNAVAILABLE, times=3)
    assert client.search("q", index="docs").results
    calls = fake.calls("Search")
    assert len(calls) == 4
    assert len({c.metadata["x-request-id"] for c in calls}) == 1


def test_search_gives_up_after_retries(address: str, fake: FakePipeline) -> None:
    fake.fail("Search", UNAVAILABLE, times=5)
    with ragfleet.Client(address, retries=1) as client, pytest.raises(errors.Unavailable):
        client.search("q", index="docs")
    assert len(fake.calls("Search")) == 2


def test_retries_stop_before_the_deadline(
    address: str, fake: FakePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_common, "INITIAL_BACKOFF_S", 2.0)
    fake.fail("Search", UNAVAILABLE, times=100)
    start = time.monotonic()
    # gRPC ends a call whose deadline passes while it waits to retry with DEADLINE_EXCEEDED.
    with ragfleet.Client(address, retries=50) as client, pytest.raises(errors.DeadlineExceeded):
        client.search("q", index="docs", timeout=0.5)
    # Four retries with 2 s growing backoff would take many seconds; the slack only absorbs a loaded CI box.
    assert time.monotonic() - start < 2.0
    assert 1 <= len(fake.calls("Search")) < 5


def test_other_codes_are_not_retried(client: ragfleet.Client, fake: FakePipeline) -> None:
    fake.fail("SearchBatch", grpc.StatusCode.RESOURCE_EXHAUSTED)
    with pytest.raises(errors.ResourceExhausted):
        client.search_batch(["a", "b"], index="docs")
    assert len(fake.calls("SearchBatch")) == 1
    assert len(client.search_batch(["a", "b"], index="docs").responses) == 2


def test_not_found_maps_to_error_with_details(client: ragfleet.Client, fake: FakePipeline) -> None:
    with pytest.raises(errors.NotFound) as info:
        client.describe_index("missing")
    err = info.value
    assert err.code == grpc.StatusCode.NOT_FOUND and err.details == "index 'missing' not found"
    assert err.request_id == fake.calls("DescribeIndex")[0].metadata["x-request-id"]
    assert isinstance(err.__cause__, grpc.RpcError) and isinstance(err, ragfleet.RagfleetError)
    assert "NOT_FOUND: index 'missing' not found" in str(err)


def test_deadline_exceeded(client: ragfleet.Client) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        client.search("slow", index="docs", timeout=0.1)


def test_metadata_auth_application_request_id_deadline(address: str, fake: FakePipeline) -> None:
    with ragfleet.Client(address, token="s3cret", application="pipeline", timeout=7.0) as client:
        client.describe()
        client.list_indexes(timeout=2.0)
    first, second = fake.seen
    assert first.metadata["authorization"] == "Bearer s3cret"
    assert first.metadata["application"] == "pipeline"
    assert len(first.metadata["x-request-id"]) == 32
    assert first.metadata["x-request-id"] != second.metadata["x-request-id"]
    assert abs(float(first.metadata["x-ragfleet-deadline"]) - (time.time() + 7.0)) < 1.0
    assert abs(float(second.metadata["x-ragfleet-deadline"]) - (time.time() + 2.0)) < 1.0
    assert 5.0 < first.time_remaining < 7.1 and 0.0 < second.time_remaining < 2.1


def test_no_auth_or_application_metadata_by_default(client: ragfleet.Client, fake: FakePipeline) -> None:
    client.describe()
    assert "authorization" not in fake.seen[0].metadata
    assert "application" not in fake.seen[0].metadata


def test_other_unary_methods(client: ragfleet.Client, fake: FakePipeline) -> None:
    assert client.ask_once("q", index="docs", params={"max_tokens": 8}).answer.text == "42"
    assert fake.calls("Ask")[0].request.params.max_tokens == 8
    deleted = client.delete(index="docs", ids=["a#0"], doc_ids=["b"])
    assert deleted.retrievers[0].deleted == 2
    assert client.delete(index="docs", drop_index=True).retrievers[0].deleted == 0
    assert fake.calls("Delete")[1].request.drop_index
    assert [d.index for d in client.list_indexes()] == ["a", "b"]
    assert client.describe().version == "test"
    assert client.describe_index("docs").index == "docs"


def test_ask_streams_events(client: ragfleet.Client, fake: FakePipeline) -> None:
    events = list(client.ask("q", index="docs", rerank=True, fusion={"method": "rrf", "rrf_k": 10}))
    assert [e.WhichOneof("event") for e in events] == ["retrieved", "token", "token", "answer"]
    assert "".join(e.token for e in events) == "42" and events[-1].answer.text == "42"
    request = fake.calls("AskStream")[0].request
    assert request.rerank and request.generate and request.retrieval.fusion.rrf_k == 10


def test_ask_stream_errors_are_mapped(client: ragfleet.Client, fake: FakePipeline) -> None:
    fake.fail("AskStream", grpc.StatusCode.FAILED_PRECONDITION)
    with pytest.raises(errors.FailedPrecondition, match="injected"):
        list(client.ask("q", index="docs"))


def test_wait_ready(client: ragfleet.Client) -> None:
    client.wait_ready(timeout=5.0)
    with ragfleet.Client(f"127.0.0.1:{unused_port()}") as down, pytest.raises(errors.Unavailable):
        down.wait_ready(timeout=0.2)


# --- errors ------------------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, trailing: tuple = ()) -> None:
        self._code, self._trailing = code, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "why"

    def trailing_metadata(self) -> tuple:
        return self._trailing


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.CANCELLED, errors.Cancelled),
        (grpc.StatusCode.INTERNAL, errors.Internal),
        (grpc.StatusCode.DATA_LOSS, errors.Internal),
        (grpc.StatusCode.UNKNOWN, errors.Internal),
    ],
)
def test_from_rpc_error_mapping(code: grpc.StatusCode, cls: type[errors.RagfleetError]) -> None:
    err = errors.from_rpc_error(FakeRpcError(code), request_id="mine")
    assert type(err) is cls and err.code == code and err.details == "why" and err.request_id == "mine"


def test_from_rpc_error_prefers_server_request_id_and_handles_bare_errors() -> None:
    err = errors.from_rpc_error(
        FakeRpcError(grpc.StatusCode.NOT_FOUND, (("x-request-id", "srv"),)), request_id="mine"
    )
    assert err.request_id == "srv"
    bare = errors.from_rpc_error(grpc.RpcError())
    assert isinstance(bare, errors.Internal) and bare.code == grpc.StatusCode.UNKNOWN


def test_sdk_imports_nothing_heavy() -> None:
    code = "import ragfleet, sys; print(sorted({'torch', 'numpy', 'services'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- AsyncClient -------------------------------------------------------------------------------


async def test_async_ingest_list_and_async_iterable(
    aclient: ragfleet.AsyncClient, fake: FakePipeline
) -> None:
    sent: list[int] = []
    report = await aclient.ingest(
        corpus(3), index="docs", spec=ragfleet.IndexSpec(model="m"), batch_size=2, progress=sent.append
    )
    assert report.documents == 3 and sent == [2, 3]

    async def documents() -> AsyncIterator[dict[str, str]]:
        for doc in corpus(3):
            yield doc

    assert (await aclient.ingest(documents(), index="docs2", batch_size=2)).documents == 3
    first, second = fake.committed
    assert first[0].index == "docs" and first[0].spec.model == "m"
    assert [len(m.documents) for m in second] == [2, 1] and second[0].index == "docs2"


async def test_async_malformed_jsonl_cancels_ingest(
    aclient: ragfleet.AsyncClient, fake: FakePipeline, tmp_path: Path
) -> None:
    lines = [json.dumps(d) for d in corpus(2)] + [json.dumps({"id": "x", "text": 3})]
    path = write_jsonl(tmp_path / "corpus.jsonl", lines)
    with pytest.raises(errors.InvalidArgument, match=r"corpus\.jsonl:3: field 'text' must be a string"):
        await aclient.ingest(path, index="docs", batch_size=1)
    assert fake.ingest_ended.wait(5) and fake.committed == []


async def test_async_search_retries_and_metadata(address: str, fake: FakePipeline) -> None:
    fake.fail("Search", UNAVAILABLE, times=2)
    async with ragfleet.AsyncClient(address, token="tok", application="pipeline") as client:
        response = await client.search("q", index="docs", top_k=2, fusion=ragfleet.Fusion(method="rrf"))
    assert response.results
    calls = fake.calls("Search")
    assert len(calls) == 3 and len({c.metadata["x-request-id"] for c in calls}) == 1
    assert calls[0].metadata["authorization"] == "Bearer tok"
    assert calls[0].metadata["application"] == "pipeline"
    assert calls[0].request.retrieval.top_k == 2 and "x-ragfleet-deadline" in calls[0].metadata


async def test_async_non_idempotent_calls_are_not_retried(
    aclient: ragfleet.AsyncClient, fake: FakePipeline
) -> None:
    fake.fail("Ingest", UNAVAILABLE)
    fake.fail("Delete", UNAVAILABLE)
    with pytest.raises(errors.Unavailable):
        await aclient.ingest(corpus(1), index="docs")
    with pytest.raises(errors.Unavailable):
        await aclient.delete(index="docs", doc_ids=["d0"])
    assert len(fake.calls("Ingest")) == len(fake.calls("Delete")) == 1


async def test_async_errors_and_other_methods(aclient: ragfleet.AsyncClient) -> None:
    with pytest.raises(errors.NotFound, match="index 'missing' not found") as info:
        await aclient.describe_index("missing")
    assert len(info.value.request_id or "") == 32
    assert (await aclient.describe()).retrievers == ["dense"]
    assert [d.index for d in await aclient.list_indexes()] == ["a", "b"]
    assert len((await aclient.search_batch(["x", "y"], index="docs")).responses) == 2
    assert (await aclient.ask_once("q", index="docs")).answer.text == "42"
    assert (await aclient.delete(index="docs", ids=["a#0"])).retrievers[0].deleted == 1


async def test_async_search_options_and_rebuild(aclient: ragfleet.AsyncClient, fake: FakePipeline) -> None:
    await aclient.search("q", index="docs", options={"centroid_score_threshold": 0.3})
    await aclient.search_batch(["a", "b"], index="docs", options={"exhaustive": True})
    assert fake.calls("Search")[0].request.retrieval.options.centroid_score_threshold == pytest.approx(0.3)
    assert fake.calls("SearchBatch")[0].request.retrieval.options.exhaustive
    assert (await aclient.rebuild(index="docs")).retrievers[0].version.index == "docs"
    fake.fail("Rebuild", UNAVAILABLE)
    with pytest.raises(errors.Unavailable):
        await aclient.rebuild("docs", retrievers=["colbert", "dense"])
    assert list(fake.calls("Rebuild")[1].request.retrievers) == ["colbert", "dense"]


async def test_async_ask_streams_events(aclient: ragfleet.AsyncClient, fake: FakePipeline) -> None:
    events = [event async for event in aclient.ask("q", index="docs", generate=False)]
    assert [e.WhichOneof("event") for e in events] == ["retrieved", "token", "token", "answer"]
    assert not fake.calls("AskStream")[0].request.generate
    fake.fail("AskStream", grpc.StatusCode.UNAUTHENTICATED)
    with pytest.raises(errors.Unauthenticated):
        _ = [event async for event in aclient.ask("q", index="docs")]


async def test_async_wait_ready(aclient: ragfleet.AsyncClient) -> None:
    await aclient.wait_ready(timeout=5.0)
    async with ragfleet.AsyncClient(f"127.0.0.1:{unused_port()}") as down:
        with pytest.raises(errors.Unavailable):
            await down.wait_ready(timeout=0.2)
