"""The Generator service in process, with a tiny Retro checkpoint the test saves and a test-double
Retriever on loopback: request checks with their codes and field names, a missing checkpoint, an unknown
index, streamed tokens ending in an answer with citations, per-chunk retrieval and checkpoint reloads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from ragfleet.v1 import common_pb2, generator_pb2, retriever_pb2, retriever_pb2_grpc
from services.generator.retro.data import load_tokenizer
from services.generator.retro.model import RetroConfig, RetroModel
from services.generator.service import GeneratorService
from services.runtime.context import CallContext
from services.runtime.errors import ServiceError
from services.runtime.settings import Endpoint, GeneratorSettings, Settings

CHUNK = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def save_model(tokenizer, path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    config = RetroConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        max_seq_len=128,
        chunk_size=CHUNK,
        num_neighbours=2,
        neighbour_len=8,
        cca_start=1,
        cca_every=1,
        encoder_layers=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    RetroModel(config).save(path)


class Retriever(retriever_pb2_grpc.RetrieverServicer):
    """Knows one index, "kb"; answers every search with one passage and its continuation."""

    def __init__(self) -> None:
        self.searches: list[tuple[retriever_pb2.SearchRequest, dict[str, str]]] = []

    async def DescribeIndex(self, request, context):
        if request.index != "kb":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"index {request.index!r} does not exist")
        return retriever_pb2.IndexDescription(passages=3)

    async def Search(self, request, context):
        self.searches.append((request, dict(context.invocation_metadata())))
        n = len(self.searches)
        hit = common_pb2.ScoredPassage(
            passage=common_pb2.Passage(id=f"hit{n}#0", doc_id=f"hit{n}", title=f"Hit {n}", text="found text"),
            continuation=common_pb2.Passage(id=f"hit{n}#1", doc_id=f"hit{n}", text="what follows"),
            score=1.0,
            rank=1,
        )
        return retriever_pb2.SearchResponse(results=[hit])


@pytest.fixture
async def retriever() -> AsyncIterator[tuple[Retriever, str]]:
    server = grpc.aio.server()
    servicer = Retriever()
    retriever_pb2_grpc.add_RetrieverServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
def checkpoint(tmp_path: Path, tokenizer) -> Path:
    path = tmp_path / "models" / "retro"
    save_model(tokenizer, path, seed=0)
    return path


def service_for(home: Path, retriever_address: str, **generator: object) -> GeneratorService:
    endpoint = Endpoint(address=retriever_address, application="retriever-dense")
    settings = Settings(home=home, generator=GeneratorSettings(retriever=endpoint, **generator))
    return GeneratorService(settings)


def request(
    question: str = "What is the capital of Portugal?",
    index: str = "",
    filters: dict[str, str] | None = None,
    **params,
) -> generator_pb2.GenerateRequest:
    context = [
        common_pb2.ScoredPassage(
            passage=common_pb2.Passage(
                id="lisbon#0", doc_id="lisbon", title="Lisbon", text="Lisbon is a capital."
            ),
            continuation=common_pb2.Passage(id="lisbon#1", doc_id="lisbon", text="It lies on the Tagus."),
            rank=1,
        )
    ]
    retrieval = common_pb2.RetrievalSpec(index=index, filters=filters)
    return generator_pb2.GenerateRequest(
        question=question, context=context, retrieval=retrieval, params=common_pb2.GenerationParams(**params)
    )


async def stream(service: GeneratorService, req: generator_pb2.GenerateRequest) -> list:
    return [event async for event in service.GenerateStream(req, CallContext(request_id="test"))]


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (request(question="   "), "question"),
        (request(question="why " * 400), "question"),
        (request(max_tokens=513), "params.max_tokens"),
        (request(max_tokens=-1), "params.max_tokens"),
        (request(temperature=-0.5), "params.temperature"),
        (request(top_p=1.5), "params.top_p"),
        (request(top_p=-0.1), "params.top_p"),
        (request(stop=[""]), "params.stop"),
    ],
)
async def test_bad_requests_name_their_field(checkpoint, retriever, req, field: str) -> None:
    service = service_for(checkpoint.parents[1], retriever[1])
    with pytest.raises(ServiceError) as err:
        await stream(service, req)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message.startswith(f"{field}:")


async def test_a_missing_checkpoint_is_a_failed_precondition(tmp_path: Path, retriever) -> None:
    service = service_for(tmp_path, retriever[1])
    with pytest.raises(ServiceError) as err:
        await stream(service, request())
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert str(tmp_path / "models" / "retro") in err.value.message
    assert "ragfleet train retro" in err.value.message


async def test_an_unknown_index_is_not_found(checkpoint, retriever) -> None:
    service = service_for(checkpoint.parents[1], retriever[1])
    with pytest.raises(ServiceError) as err:
        await stream(service, request(index="missing"))
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert err.value.message.startswith("retriever:") and "'missing'" in err.value.message
    assert retriever[0].searches == []


async def test_stream_yields_tokens_then_an_answer_with_citations(checkpoint, retriever) -> None:
    servicer, address = retriever
    service = service_for(checkpoint.parents[1], address)
    events = await stream(service, request(index="kb", filters={"lang": "pt"}, max_tokens=10))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"} and len(kinds) > 2
    done = events[-1].done
    assert "".join(e.token for e in events[:-1]) == done.text
    assert done.finish_reason == "length"
    assert done.model_id.startswith(f"retro:{checkpoint}@")
    assert {t.stage for t in done.timings} == {"prefill", "decode", "chunk_retrieval"}
    # Ten answer tokens complete two chunks of four that are fed on: two searches, with the chunk text.
    assert len(servicer.searches) == 2
    for search, metadata in servicer.searches:
        assert search.index == "kb" and search.top_k == 2 and search.with_continuation and search.query
        assert dict(search.filters) == {"lang": "pt"}
        assert metadata["application"] == "retriever-dense" and metadata["x-request-id"] == "test"
    cited = [c.passage_id for c in done.citations]
    assert set(cited) == {"lisbon#0", "hit1#0", "hit2#0"}
    assert next(c for c in done.citations if c.passage_id == "lisbon#0").title == "Lisbon"


async def test_generate_returns_what_the_stream_ends_with(checkpoint, retriever) -> None:
    service = service_for(checkpoint.parents[1], retriever[1])
    response = await service.Generate(request(max_tokens=6), CallContext())
    streamed = (await stream(service, request(max_tokens=6)))[-1].done
    assert response.text == streamed.text and response.model_id == streamed.model_id
    assert [c.passage_id for c in response.citations] == ["lisbon#0"]  # no index: no per-chunk retrieval


async def test_a_rewritten_checkpoint_is_reloaded(checkpoint, retriever, tokenizer) -> None:
    service = service_for(checkpoint.parents[1], retriever[1], default_max_tokens=6)
    before = (await stream(service, request()))[-1].done
    save_model(tokenizer, checkpoint, seed=1)
    after = (await stream(service, request()))[-1].done
    assert before.model_id != after.model_id and after.model_id.startswith(f"retro:{checkpoint}@")


def test_service_errors_survive_pickling() -> None:
    # Under Ray Serve a replica's ServiceError is pickled to the proxy, which answers with its code.
    import pickle

    err = pickle.loads(pickle.dumps(ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "params.top_p: too big")))
    assert (err.code, err.message) == (grpc.StatusCode.INVALID_ARGUMENT, "params.top_p: too big")
