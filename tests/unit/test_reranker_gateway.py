"""The Pipeline's rerank stage against test-double Retriever and Reranker servers on loopback: Search,
SearchBatch and Ask retrieve `depth` deep and return the Reranker's top_k with a RerankReport; without a
reranker or a model they keep retrieval order with a note unless reranking is required."""

from __future__ import annotations

import grpc
import pytest

from ragfleet.v1 import (
    common_pb2,
    pipeline_pb2,
    reranker_pb2,
    reranker_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from services.gateway.service import PipelineService
from services.runtime.context import CallContext
from services.runtime.errors import ServiceError
from services.runtime.settings import Endpoint, GatewaySettings, Settings

IDS = ["a#0", "b#0", "c#0", "d#0", "e#0"]


class Retriever(retriever_pb2_grpc.RetrieverServicer):
    def __init__(self) -> None:
        self.top_ks: list[int] = []

    async def SearchBatch(self, request, context):
        self.top_ks.append(request.top_k)
        results = [
            common_pb2.ScoredPassage(
                passage=common_pb2.Passage(id=pid, doc_id=pid[0], text=f"text {pid}"),
                score=1 - i / 10,
                rank=i + 1,
            )
            for i, pid in enumerate(IDS[: request.top_k])
        ]
        responses = [retriever_pb2.SearchResponse(results=results) for _ in request.queries]
        return retriever_pb2.SearchBatchResponse(responses=responses)


class Reranker(reranker_pb2_grpc.RerankerServicer):
    """Reverses the candidates; `fail` makes it answer with that status."""

    def __init__(self) -> None:
        self.fail: tuple[grpc.StatusCode, str] | None = None
        self.requests: list[reranker_pb2.RerankRequest] = []

    async def Rerank(self, request, context):
        self.requests.append(request)
        if self.fail:
            await context.abort(*self.fail)
        reordered = list(reversed(request.candidates))[: request.top_k]
        return reranker_pb2.RerankResponse(
            results=reordered,
            retrieval_weight=request.retrieval_weight if request.HasField("retrieval_weight") else 0.25,
            model_id="reverse",
            backend="cross_encoder",
            truncated=1,
            max_length=256,
            timings=[common_pb2.Timing(stage="rerank.score", millis=1.0)],
        )


@pytest.fixture
async def remotes():
    server = grpc.aio.server()
    retriever, reranker = Retriever(), Reranker()
    retriever_pb2_grpc.add_RetrieverServicer_to_server(retriever, server)
    reranker_pb2_grpc.add_RerankerServicer_to_server(reranker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", retriever, reranker
    await server.stop(None)


def gateway(address: str, *, reranker: bool = True) -> PipelineService:
    endpoint = Endpoint(address=address)
    settings = GatewaySettings(retrievers={"dense": endpoint}, reranker=endpoint if reranker else None)
    return PipelineService(Settings(gateway=settings))


def search(top_k: int = 2, **reranking) -> pipeline_pb2.PipelineSearchRequest:
    return pipeline_pb2.PipelineSearchRequest(
        query="q",
        retrieval=common_pb2.RetrievalSpec(index="kb", top_k=top_k),
        reranking=pipeline_pb2.RerankSpec(**reranking),
    )


def ids(results) -> list[str]:
    return [r.passage.id for r in results]


async def test_search_reranks_the_deeper_list(remotes) -> None:
    address, retriever, reranker = remotes
    reply = await gateway(address).Search(search(enabled=True, depth=4, model="m"), CallContext())
    assert retriever.top_ks == [4]
    assert len(reranker.requests[0].candidates) == 4 and reranker.requests[0].top_k == 2
    assert reranker.requests[0].model == "m"
    assert ids(reply.results) == ["d#0", "c#0"]
    report = reply.rerank
    assert (report.model_id, report.candidates, report.truncated, report.max_length) == ("reverse", 4, 1, 256)
    assert {"retrieve", "rerank", "rerank.score"} <= {t.stage for t in reply.timings}


async def test_the_retrieval_weight_goes_to_the_reranker_only_when_set(remotes) -> None:
    address, _, reranker = remotes
    pipeline = gateway(address)
    reply = await pipeline.Search(search(enabled=True, depth=4), CallContext())
    assert not reranker.requests[0].HasField("retrieval_weight") and reply.rerank.retrieval_weight == 0.25
    reply = await pipeline.Search(search(enabled=True, depth=4, retrieval_weight=0.0), CallContext())
    assert reranker.requests[1].HasField("retrieval_weight") and reply.rerank.retrieval_weight == 0.0
    with pytest.raises(ServiceError) as err:
        await pipeline.Search(search(enabled=True, retrieval_weight=2.0), CallContext())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message.startswith("reranking.retrieval_weight:") and len(reranker.requests) == 2


async def test_search_without_reranking_is_unchanged(remotes) -> None:
    address, retriever, reranker = remotes
    reply = await gateway(address).Search(search(), CallContext())
    assert ids(reply.results) == ["a#0", "b#0"] and not reply.HasField("rerank")
    assert retriever.top_ks == [2] and not reranker.requests


async def test_no_model_keeps_retrieval_order_with_a_note_unless_required(remotes) -> None:
    address, _, reranker = remotes
    reranker.fail = (grpc.StatusCode.FAILED_PRECONDITION, "no cross_encoder model; train one")
    reply = await gateway(address).Search(search(enabled=True, depth=4), CallContext())
    assert ids(reply.results) == ["a#0", "b#0"]
    assert "no model" in reply.rerank.note and not reply.rerank.model_id
    with pytest.raises(ServiceError) as err:
        await gateway(address).Search(search(enabled=True, required=True), CallContext())
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_no_reranker_keeps_retrieval_order_unless_required(remotes) -> None:
    address, _, _ = remotes
    reply = await gateway(address, reranker=False).Search(search(enabled=True, depth=3), CallContext())
    assert ids(reply.results) == ["a#0", "b#0"] and "no reranker is configured" in reply.rerank.note
    with pytest.raises(ServiceError) as err:
        await gateway(address, reranker=False).Search(search(enabled=True, required=True), CallContext())
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "reranking.required" in err.value.message


async def test_bad_reranking_fields_are_named(remotes) -> None:
    address, _, reranker = remotes
    for reranking in ({"enabled": True, "depth": 1}, {"enabled": True, "depth": 5000}):
        with pytest.raises(ServiceError) as err:
            await gateway(address).Search(search(**reranking), CallContext())
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.message.startswith("reranking.depth:")
    reranker.fail = (grpc.StatusCode.INVALID_ARGUMENT, "model: '/x' is not a cross-encoder")
    with pytest.raises(ServiceError) as err:
        await gateway(address).Search(search(enabled=True, model="/x"), CallContext())
    assert err.value.message.startswith("reranking.model: '/x' is not a cross-encoder")


async def test_search_batch_reranks_each_query(remotes) -> None:
    address, _, reranker = remotes
    request = pipeline_pb2.PipelineSearchBatchRequest(
        queries=["q1", "q2"],
        retrieval=common_pb2.RetrievalSpec(index="kb", top_k=2),
        reranking=pipeline_pb2.RerankSpec(enabled=True, depth=3),
    )
    reply = await gateway(address).SearchBatch(request, CallContext())
    assert [ids(r.results) for r in reply.responses] == [["c#0", "b#0"], ["c#0", "b#0"]]
    assert sorted(r.query for r in reranker.requests) == ["q1", "q2"]
    assert all(r.rerank.model_id == "reverse" for r in reply.responses)


async def test_ask_reranked_event_carries_the_report(remotes) -> None:
    address, retriever, _ = remotes
    request = pipeline_pb2.AskRequest(
        question="q",
        retrieval=common_pb2.RetrievalSpec(index="kb", top_k=2),
        reranking=pipeline_pb2.RerankSpec(enabled=True, depth=5),
    )
    events = [e async for e in gateway(address).AskStream(request, CallContext())]
    assert [e.WhichOneof("event") for e in events] == ["retrieved", "reranked", "answer"]
    assert len(events[0].retrieved.passages) == 5 and retriever.top_ks == [5]
    reranked = events[1].reranked
    assert ids(reranked.passages) == ["e#0", "d#0"]
    assert (reranked.rerank.model_id, reranked.rerank.truncated) == ("reverse", 1)
    assert [c.passage_id for c in events[-1].answer.citations] == ["e#0", "d#0"]
    assert "reverse" in events[-1].answer.model_ids


async def test_ask_without_a_model_answers_in_retrieval_order_with_a_note(remotes) -> None:
    address, _, reranker = remotes
    reranker.fail = (grpc.StatusCode.FAILED_PRECONDITION, "no cross_encoder model")
    request = pipeline_pb2.AskRequest(
        question="q", retrieval=common_pb2.RetrievalSpec(index="kb", top_k=2), rerank=True
    )
    events = [e async for e in gateway(address).AskStream(request, CallContext())]
    assert [e.WhichOneof("event") for e in events] == ["retrieved", "answer"]
    answer = events[-1].answer
    assert "the reranker has no model" in answer.text
    assert [c.passage_id for c in answer.citations] == ["a#0", "b#0"]
