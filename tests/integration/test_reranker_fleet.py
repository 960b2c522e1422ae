"""The Reranker in a real fleet of `ragfleet serve` processes on loopback (dense, bm25, reranker, pipeline):
before a model exists reranking falls back to retrieval order with a note (or fails when required);
`ragfleet train cross-encoder` trains one through the fleet and the running Reranker picks it up; the
report of what reranking did reaches Search and Ask; bad models are named."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

import ragfleet
from ragfleet.v1 import common_pb2, reranker_pb2, reranker_pb2_grpc
from services.cli import app
from services.demo.corpus import demo_documents
from tests.unit.reranker_fixtures import make_tiny_bi_encoder
from tools.fleet import LocalFleet, start_local_fleet

pytestmark = pytest.mark.integration

INDEX = "islands"
DOCUMENTS = demo_documents()[:24]
QUERY = DOCUMENTS[0]["text"].split(".")[0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    running = start_local_fleet(
        tmp_path_factory.mktemp("reranker-home"),
        ("retriever-dense", "retriever-bm25", "reranker", "pipeline"),
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(fleet: LocalFleet) -> Iterator[ragfleet.Client]:
    with ragfleet.Client(fleet.address, timeout=300.0) as c:
        c.ingest(DOCUMENTS, index=INDEX, spec={"chunking": {"whole_documents": True}})
        yield c


def ids(results) -> list[str]:
    return [r.passage.id for r in results]


def test_without_a_model_reranking_keeps_retrieval_order(fleet: LocalFleet, client: ragfleet.Client) -> None:
    plain = client.search(QUERY, index=INDEX, top_k=3)
    reply = client.search(QUERY, index=INDEX, top_k=3, rerank={"depth": 10})
    assert ids(reply.results) == ids(plain.results)
    assert not reply.rerank.model_id and "ragfleet train cross-encoder" in reply.rerank.note
    with pytest.raises(ragfleet.errors.FailedPrecondition, match="ragfleet train cross-encoder"):
        client.search(QUERY, index=INDEX, rerank={"required": True})
    with grpc.insecure_channel(fleet.services["reranker"].address) as channel:
        stub = reranker_pb2_grpc.RerankerStub(channel)
        candidate = common_pb2.ScoredPassage(passage=common_pb2.Passage(id="x#0", text="some text"))
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(reranker_pb2.RerankRequest(query="q", candidates=[candidate], top_k=1))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_trained_model_is_picked_up_and_reported(
    fleet: LocalFleet, client: ragfleet.Client, tmp_path: Path
) -> None:
    base = make_tiny_bi_encoder(tmp_path / "base")
    out = fleet.home / "models" / "cross-encoder"
    args = ["train", "cross-encoder", "--corpus", str(tmp_path / "corpus.jsonl"), "--index", INDEX]
    args += [
        "--out",
        str(out),
        "--base",
        str(base),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--max-length",
        "48",
    ]
    args += ["--address", fleet.address]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # The JSON line may follow a progress bar's carriage returns.
    line = next(line for line in result.output.splitlines() if '{"steps"' in line)
    metrics = json.loads(line[line.index("{") :])
    assert metrics["steps"] == 4

    reply = client.search(QUERY, index=INDEX, top_k=3, rerank={"depth": 10})
    report = reply.rerank
    assert report.model_id.startswith(f"cross_encoder:{out}@") and report.backend == "cross_encoder"
    assert (report.candidates, report.max_length) == (10, 48) and report.truncated > 0
    assert len(reply.results) == 3 and {r.retriever for r in reply.results} == {"cross_encoder"}
    assert [r.rank for r in reply.results] == [1, 2, 3]

    events = list(client.ask(QUERY, index=INDEX, top_k=2, rerank=True, generate=False))
    assert [e.WhichOneof("event") for e in events] == ["retrieved", "reranked", "answer"]
    assert events[1].reranked.rerank.model_id == report.model_id
    assert report.model_id in events[-1].answer.model_ids


def test_a_named_model_that_is_not_a_cross_encoder_is_an_invalid_argument(
    client: ragfleet.Client, tmp_path: Path
) -> None:
    bi_encoder = make_tiny_bi_encoder(tmp_path / "bi")
    with pytest.raises(ragfleet.errors.InvalidArgument, match="reranking.model: .*not a cross-encoder"):
        client.search(QUERY, index=INDEX, rerank={"model": str(bi_encoder)})
