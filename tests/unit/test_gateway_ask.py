"""The gateway's Ask path against test-double Retriever, Reranker and Generator servers on loopback:
events come in the order retrieved -> reranked -> tokens -> answer, and errors keep their codes."""

from __future__ import annotations

import grpc
import pytest

from ragfleet.v1 import (
    common_pb2,
    generator_pb2,
    generator_pb2_grpc,
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


def scored(pid: str, score: float, rank: int) -> common_pb2.ScoredPassage:
    doc = pid.split("#")[0]
    return common_pb2.ScoredPassage(
        passage=common_pb2.Passage(id=pid, doc_id=doc, text=f"text of {pid}"), score=score, rank=rank
    )


class Retriever(retriever_pb2_grpc.RetrieverServicer):
    def __init__(self) -> None:
        self.seen_metadata: list[dict[str, str]] = []
        self.requests: list[retriever_pb2.SearchBatchRequest] = []

    async def SearchBatch(self, request, context):
        self.seen_metadata.append(dict(context.invocation_metadata()))
        self.requests.append(request)
        if request.index == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "index 'missing' does not exist")
        results = [scored("a#0", 0.9, 1), scored("b#0", 0.5, 2), scored("c#0", 0.1, 3)][: request.top_k]
        version = common_pb2.IndexVersion(index=request.index, retriever="dense", version=3, model_id="enc")
        responses = [retriever_pb2.SearchResponse(results=results, version=version) for _ in request.queries]
        return retriever_pb2.SearchBatchResponse(responses=responses, version=version)


class Reranker(reranker_pb2_grpc.RerankerServicer):
    async def Rerank(self, request, context):
        reordered = list(reversed(request.candidates))[: request.top_k]
        return reranker_pb2.RerankResponse(results=reordered, model_id="reverse-ranker")


class Generator(generator_pb2_grpc.GeneratorServicer):
    def __init__(self) -> None:
        self.requests: list[generator_pb2.GenerateRequest] = []

    async def GenerateStream(self, request, context):
        self.requests.append(request)
        if request.question == "fail":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "params.max_tokens: over the limit")
        for token in ("The", " answer"):
            yield generator_pb2.GenerateEvent(token=token)
        first = request.context[0].passage
        yield generator_pb2.GenerateEvent(
            done=generator_pb2.GenerateResponse(
                text="The answer",
                citations=[generator_pb2.Citation(passage_id=first.id, doc_id=first.doc_id)],
                model_id="retro-test",
            )
        )


@pytest.fixture
async def backends():
    server = grpc.aio.server()
    retriever, generator = Retriever(), Generator()
    retriever_pb2_grpc.add_RetrieverServicer_to_server(retriever, server)
    reranker_pb2_grpc.add_RerankerServicer_to_server(Reranker(), server)
    generator_pb2_grpc.add_GeneratorServicer_to_server(generator, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    retriever.generator = generator
    yield f"127.0.0.1:{port}", retriever
    await server.stop(None)


def gateway(address: str, *, rerank: bool, generate: bool) -> PipelineService:
    endpoint = Endpoint(address=address)
    return PipelineService(
        Settings(
            gateway=GatewaySettings(
                retrievers={"dense": endpoint},
                reranker=endpoint if rerank else None,
                generator=endpoint if generate else None,
            )
        )
    )


async def events(service: PipelineService, question: str = "why?", **kw) -> list[pipeline_pb2.AskEvent]:
    retrieval = common_pb2.RetrievalSpec(index="kb", top_k=3)
    request = pipeline_pb2.AskRequest(question=question, retrieval=retrieval, **kw)
    return [e async for e in service.AskStream(request, CallContext(request_id="r1"))]


async def test_ask_reranks_then_streams_tokens_then_answers(backends) -> None:
    address, retriever = backends
    got = await events(gateway(address, rerank=True, generate=True), rerank=True, generate=True)
    assert [e.WhichOneof("event") for e in got] == ["retrieved", "reranked", "token", "token", "answer"]
    assert [p.passage.id for p in got[0].retrieved.passages] == ["a#0", "b#0", "c#0"]
    assert [p.passage.id for p in got[1].reranked.passages] == ["c#0", "b#0", "a#0"]
    answer = got[-1].answer
    assert answer.text == "The answer" and not answer.retrieval_only
    assert [c.passage_id for c in answer.citations] == ["c#0"]
    assert set(answer.model_ids) == {"enc", "reverse-ranker", "retro-test"}
    assert {t.stage for t in answer.timings} >= {"retrieve", "rerank", "generate"}
    assert retriever.seen_metadata[0]["x-ragfleet-retriever"] == "dense"
    assert retriever.seen_metadata[0]["x-request-id"] == "r1"


async def test_without_reranker_and_generator_the_answer_says_retrieval_only(backends) -> None:
    address, _ = backends
    got = await events(gateway(address, rerank=False, generate=False), rerank=True, generate=True)
    assert [e.WhichOneof("event") for e in got] == ["retrieved", "answer"]
    answer = got[-1].answer
    assert answer.retrieval_only
    assert "no reranker is configured" in answer.text and "no generator is configured" in answer.text
    assert [c.passage_id for c in answer.citations] == ["a#0", "b#0", "c#0"]


async def test_downstream_errors_keep_their_status(backends) -> None:
    address, _ = backends
    service = gateway(address, rerank=False, generate=True)
    with pytest.raises(ServiceError) as err:
        await events(service, question="fail", generate=True)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.message.startswith("generator:")
    with pytest.raises(ServiceError) as err:
        request = pipeline_pb2.AskRequest(question="q", retrieval=common_pb2.RetrievalSpec(index="missing"))
        await service.Ask(request, CallContext())
    assert err.value.code == grpc.StatusCode.NOT_FOUND


async def test_unary_ask_collects_the_stream(backends) -> None:
    address, _ = backends
    retrieval = common_pb2.RetrievalSpec(index="kb", top_k=2)
    request = pipeline_pb2.AskRequest(question="q", retrieval=retrieval, rerank=True, generate=True)
    response = await gateway(address, rerank=True, generate=True).Ask(request, CallContext())
    assert [p.passage.id for p in response.passages] == ["b#0", "a#0"]
    assert response.answer.text == "The answer"


async def test_ask_sends_one_retrieval_spec_to_the_retriever_and_the_generator(backends) -> None:
    address, retriever = backends
    retrieval = common_pb2.RetrievalSpec(
        index="kb", retrievers=["dense"], filters={"lang": "en"}, candidates=7, options={"exhaustive": True}
    )
    request = pipeline_pb2.AskRequest(question="q", retrieval=retrieval, generate=True)
    await gateway(address, rerank=False, generate=True).Ask(request, CallContext())
    searched = retriever.requests[-1]
    assert (searched.index, searched.top_k, dict(searched.filters)) == ("kb", 7, {"lang": "en"})
    assert searched.options.exhaustive and searched.with_continuation
    forwarded = retriever.generator.requests[-1].retrieval
    assert (forwarded.index, forwarded.top_k, dict(forwarded.filters)) == ("kb", 5, {"lang": "en"})
    assert forwarded.options.exhaustive and forwarded.with_continuation and forwarded.candidates == 7


async def test_ask_rejects_a_bad_spec_by_field(backends) -> None:
    address, _ = backends
    service = gateway(address, rerank=False, generate=False)
    for retrieval, field in [
        (common_pb2.RetrievalSpec(), "retrieval.index"),
        (common_pb2.RetrievalSpec(index="kb", top_k=-1), "retrieval.top_k"),
        (common_pb2.RetrievalSpec(index="kb", candidates=-1), "retrieval.candidates"),
        (common_pb2.RetrievalSpec(index="kb", retrievers=["nope"]), "retrieval.retrievers"),
        (common_pb2.RetrievalSpec(index="kb", options={"ndocs": -2}), "retrieval.options.ndocs"),
    ]:
        with pytest.raises(ServiceError) as err:
            await service.Ask(pipeline_pb2.AskRequest(question="q", retrieval=retrieval), CallContext())
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.message.startswith(field)


async def test_search_batch_is_bounded_by_what_the_retrievers_accept(backends) -> None:
    address, retriever = backends
    service = gateway(address, rerank=False, generate=False)
    retrieval = common_pb2.RetrievalSpec(index="kb", top_k=1000)
    request = pipeline_pb2.PipelineSearchBatchRequest(queries=["q"] * 101, retrieval=retrieval)
    with pytest.raises(ServiceError) as err:
        await service.SearchBatch(request, CallContext())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_batch_results" in err.value.message
    assert retriever.requests == []
