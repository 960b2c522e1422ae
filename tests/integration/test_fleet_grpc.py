"""The fleet over real gRPC on loopback: `ragfleet serve` processes for the gateway and two retrievers,
driven through the SDK. Covers the data path, the error model, persistence and crash recovery."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import ragfleet
from ragfleet.v1 import pipeline_pb2, pipeline_pb2_grpc, retriever_pb2, retriever_pb2_grpc
from services.demo.corpus import demo_documents, demo_questions
from tools.fleet import LocalFleet as Fleet
from tools.fleet import Service, free_port, service_env

pytestmark = pytest.mark.integration

INDEX = "kb"
EXISTING = demo_documents()[0]["id"]


@pytest.fixture(scope="module")
def client(fleet: Fleet):
    with ragfleet.Client(fleet.address, timeout=120.0) as c:
        c.ingest(demo_documents(), index=INDEX, spec={"chunking": {"chunk_tokens": 64, "overlap_tokens": 16}})
        yield c


def versions(c: ragfleet.Client, index: str = INDEX) -> dict[str, int]:
    return {d.version.retriever: d.version.version for d in c.describe_index(index).retrievers}


def test_every_retriever_finds_the_answering_document(client: ragfleet.Client) -> None:
    for q in demo_questions()[:4]:
        for retrievers in (["dense"], ["bm25"], ["dense", "bm25"]):
            found = client.search(q["question"], index=INDEX, top_k=5, retrievers=retrievers)
            assert q["doc_id"] in [r.passage.doc_id for r in found.results], (q, retrievers)
            assert [r.rank for r in found.results] == list(range(1, len(found.results) + 1))
            top = found.results[0]
            assert top.passage.id == f"{top.passage.doc_id}#{top.passage.position}"
            assert top.retriever == (retrievers[0] if len(retrievers) == 1 else "fused")
            assert {v.retriever for v in found.versions} == set(retrievers)
    dense = client.search("anything", index=INDEX, top_k=1, retrievers=["dense"])
    assert dense.versions[0].model_id.endswith("all-MiniLM-L6-v2") and dense.versions[0].version >= 1


def test_batch_search_equals_single_searches(client: ragfleet.Client) -> None:
    questions = [q["question"] for q in demo_questions()[:3]]
    batch = client.search_batch(questions, index=INDEX, top_k=5)
    for question, response in zip(questions, batch.responses):
        single = client.search(question, index=INDEX, top_k=5)
        assert [r.passage.id for r in response.results] == [r.passage.id for r in single.results]


def test_ask_streams_retrieval_then_a_retrieval_only_answer(client: ragfleet.Client) -> None:
    q = demo_questions()[0]
    events = list(client.ask(q["question"], index=INDEX, top_k=3))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["retrieved", "answer"]
    answer = events[-1].answer
    assert answer.retrieval_only and "no generator is configured" in answer.text
    assert [c.passage_id for c in answer.citations] == [p.passage.id for p in events[0].retrieved.passages]
    assert {t.stage for t in answer.timings} >= {"retrieve"}


@pytest.mark.parametrize(
    ("call", "error", "field"),
    [
        (lambda c: c.search("", index=INDEX), ragfleet.errors.InvalidArgument, "query"),
        (lambda c: c.search("x" * 100_000, index=INDEX), ragfleet.errors.InvalidArgument, "query"),
        (lambda c: c.search("q", index=INDEX, top_k=0), ragfleet.errors.InvalidArgument, "top_k"),
        (lambda c: c.search("q", index=INDEX, top_k=1_000_000), ragfleet.errors.InvalidArgument, "top_k"),
        (lambda c: c.search("q", index="no-such-index"), ragfleet.errors.NotFound, "no-such-index"),
        (
            lambda c: c.search("q", index=INDEX, retrievers=["sparse"]),
            ragfleet.errors.InvalidArgument,
            "retrievers",
        ),
        (
            lambda c: c.search("q", index=INDEX, fusion="borda"),
            ragfleet.errors.InvalidArgument,
            "fusion.method",
        ),
    ],
)
def test_bad_queries_get_clear_errors(client: ragfleet.Client, call, error, field) -> None:
    with pytest.raises(error) as err:
        call(client)
    assert field in err.value.details


@pytest.mark.parametrize(
    ("docs", "code", "field"),
    [
        ([{"id": "", "text": "no id"}], grpc.StatusCode.INVALID_ARGUMENT, "documents[0].id"),
        (
            [{"id": "ok-1", "text": "fine"}, {"id": "x", "text": "   "}],
            grpc.StatusCode.INVALID_ARGUMENT,
            "documents[1].text",
        ),
        ([{"id": "big", "text": "word " * 1_000_000}], grpc.StatusCode.INVALID_ARGUMENT, "documents[0].text"),
        (
            [{"id": "twice", "text": "a"}, {"id": "twice", "text": "b"}],
            grpc.StatusCode.ALREADY_EXISTS,
            "twice",
        ),
        (
            [{"id": "fresh", "text": "new"}, {"id": EXISTING, "text": "exists"}],
            grpc.StatusCode.ALREADY_EXISTS,
            EXISTING,
        ),
    ],
)
def test_bad_documents_change_nothing(fleet: Fleet, client: ragfleet.Client, docs, code, field) -> None:
    before = versions(client)
    counts = {d.version.retriever: d.passages for d in client.describe_index(INDEX).retrievers}
    # The raw stub, not the SDK (which checks documents itself), so the server has to catch them.
    with grpc.insecure_channel(fleet.address) as channel:
        stub = pipeline_pb2_grpc.PipelineStub(channel)
        request = pipeline_pb2.PipelineIngestRequest(index=INDEX, documents=docs, last=True)
        with pytest.raises(grpc.RpcError) as err:
            stub.Ingest(iter([request]), timeout=60)
    assert err.value.code() == code
    assert field in err.value.details()
    assert versions(client) == before
    assert {d.version.retriever: d.passages for d in client.describe_index(INDEX).retrievers} == counts


def test_the_sdk_checks_documents_before_sending(client: ragfleet.Client) -> None:
    with pytest.raises(ragfleet.errors.InvalidArgument) as err:
        client.ingest([{"id": "", "text": "no id"}], index=INDEX)
    assert "documents[0]" in err.value.details and "id" in err.value.details


def test_undecodable_request_is_invalid_argument(fleet: Fleet) -> None:
    # A SearchRequest whose query (field 1) holds bytes that are not UTF-8.
    raw = b"\x0a\x02\xff\xfe\x12\x02kb\x18\x05"
    with grpc.insecure_channel(fleet.services["retriever-bm25"].address) as channel:
        search = channel.unary_unary("/ragfleet.v1.Retriever/Search")
        with pytest.raises(grpc.RpcError) as err:
            search(raw, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request" in err.value.details()


def test_delete_is_visible_at_once(client: ragfleet.Client) -> None:
    client.ingest(
        [{"id": "temp-doc", "text": "The zeppelin quartermaster hums a zirconium tune."}], index=INDEX
    )
    hits = client.search("zeppelin quartermaster zirconium", index=INDEX, top_k=1, retrievers=["bm25"])
    assert hits.results[0].passage.doc_id == "temp-doc"
    before = versions(client)
    deleted = client.delete(index=INDEX, doc_ids=["temp-doc"])
    assert all(r.deleted == 1 for r in deleted.retrievers)
    assert all(v == before[k] + 1 for k, v in versions(client).items())
    hits = client.search("zeppelin quartermaster zirconium", index=INDEX, top_k=5)
    assert "temp-doc" not in [r.passage.doc_id for r in hits.results]


def test_indexes_are_listed_and_described(client: ragfleet.Client) -> None:
    listed = {entry.index: entry for entry in client.list_indexes()}
    assert INDEX in listed
    described = client.describe_index(INDEX)
    assert {d.version.retriever for d in described.retrievers} == {"dense", "bm25"}
    assert all(d.passages > 0 and d.documents == len(demo_documents()) for d in described.retrievers)
    with pytest.raises(ragfleet.errors.NotFound):
        client.describe_index("missing")


def test_health_and_reflection(fleet: Fleet) -> None:
    with grpc.insecure_channel(fleet.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"ragfleet.v1.Pipeline", "grpc.health.v1.Health"} <= names


def test_indexes_survive_a_restart(fleet: Fleet, client: ragfleet.Client) -> None:
    question = demo_questions()[1]["question"]
    before = [r.passage.id for r in client.search(question, index=INDEX, top_k=5).results]
    fleet.restart("retriever-dense")
    fleet.restart("retriever-bm25")
    after = [r.passage.id for r in client.search(question, index=INDEX, top_k=5).results]
    assert after == before


def _slow_ingest(stub: retriever_pb2_grpc.RetrieverStub, sent: list[int]):
    def messages():
        for i in range(1000):
            passages = [
                {"id": f"slow-{i}-{j}#0", "doc_id": f"slow-{i}-{j}", "text": f"slow passage {i} {j}"}
                for j in range(50)
            ]
            yield retriever_pb2.IngestRequest(index="crash", passages=passages)
            sent.append(i)
            time.sleep(0.05)

    return stub.Ingest.future(messages(), timeout=60)


def test_killed_mid_ingest_reloads_the_last_complete_version(tmp_path) -> None:
    service = Service("retriever-bm25", free_port(), service_env(tmp_path))
    service.start()
    service.wait()
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = retriever_pb2_grpc.RetrieverStub(channel)
            first = retriever_pb2.IngestRequest(
                index="crash",
                passages=[{"id": "keep#0", "doc_id": "keep", "text": "the keeper of the flame"}],
                last=True,
            )
            committed = stub.Ingest(iter([first]), timeout=60).version.version
            sent: list[int] = []
            future = _slow_ingest(stub, sent)
            while len(sent) < 5:
                time.sleep(0.05)
            service.kill()
            with pytest.raises(grpc.RpcError):
                future.result()
        service.start()
        service.wait()
        with grpc.insecure_channel(service.address) as channel:
            stub = retriever_pb2_grpc.RetrieverStub(channel)
            described = stub.DescribeIndex(retriever_pb2.DescribeIndexRequest(index="crash"), timeout=30)
            assert described.version.version == committed
            assert described.passages == 1
            hits = stub.Search(
                retriever_pb2.SearchRequest(query="slow passage", index="crash", top_k=10), timeout=30
            )
            assert all(h.passage.doc_id == "keep" for h in hits.results)
    finally:
        service.stop()


def test_describe_reports_healthy_retrievers(client: ragfleet.Client) -> None:
    described: pipeline_pb2.DescribeResponse = client.describe()
    assert sorted(described.retrievers) == ["bm25", "dense"]
    assert all(s.healthy for s in described.services)
    assert not described.generator


def test_an_ingest_stream_without_its_last_message_commits_nothing(
    fleet: Fleet, client: ragfleet.Client
) -> None:
    before = versions(client)
    with grpc.insecure_channel(fleet.address) as channel:
        stub = pipeline_pb2_grpc.PipelineStub(channel)
        request = pipeline_pb2.PipelineIngestRequest(
            index=INDEX, documents=[{"id": "unfinished", "text": "half"}]
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.Ingest(iter([request]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "last" in err.value.details()
    assert versions(client) == before
