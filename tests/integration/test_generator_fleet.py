"""Generation over real gRPC on loopback: `ragfleet serve` processes for the dense retriever, the
generator and the gateway. The generator starts without a checkpoint (as in the demo, which trains one
after the fleet is up), picks it up once it is written, streams tokens through the Pipeline and
retrieves again through the real Retriever as each chunk completes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

import ragfleet
from ragfleet.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.demo.corpus import demo_documents, demo_questions
from services.generator.retro.data import load_tokenizer
from services.generator.retro.model import RetroConfig, RetroModel
from tools.fleet import RAGFLEET, LocalFleet, start_local_fleet

pytestmark = pytest.mark.integration

INDEX = "gen"
DOCUMENTS = demo_documents()[:12]
QUESTION = demo_questions()[0]["question"]
GENERATE = {"max_tokens": 20}


@pytest.fixture(scope="module")
def generator_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    running = start_local_fleet(
        tmp_path_factory.mktemp("generator-home"), names=("retriever-dense", "generator", "pipeline")
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(generator_fleet: LocalFleet) -> Iterator[ragfleet.Client]:
    with ragfleet.Client(generator_fleet.address, timeout=300.0) as c:
        c.ingest(DOCUMENTS, index=INDEX, spec={"chunking": {"chunk_tokens": 48, "overlap_tokens": 0}})
        yield c


def save_checkpoint(home: Path) -> None:
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = RetroConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        max_seq_len=128,
        chunk_size=8,
        num_neighbours=2,
        neighbour_len=16,
        cca_start=1,
        cca_every=1,
        encoder_layers=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    RetroModel(config).save(home / "models" / "retro")


@pytest.fixture(scope="module")
def trained(generator_fleet: LocalFleet, client: ragfleet.Client) -> None:
    """Asking before the checkpoint exists fails plainly; then the test writes one."""
    with pytest.raises(ragfleet.errors.FailedPrecondition) as err:
        list(client.ask(QUESTION, index=INDEX, params=GENERATE))
    assert "ragfleet train retro" in str(err.value) and str(generator_fleet.home) in str(err.value)
    save_checkpoint(generator_fleet.home)


def test_ask_streams_tokens_then_an_answer_citing_passages(client: ragfleet.Client, trained: None) -> None:
    events = list(client.ask(QUESTION, index=INDEX, top_k=3, params=GENERATE))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "retrieved" and kinds[-1] == "answer"
    assert set(kinds[1:-1]) == {"token"} and len(kinds) > 3
    answer = events[-1].answer
    assert not answer.retrieval_only
    assert "".join(e.token for e in events[1:-1]) == answer.text
    passage_ids = {f"{d['id']}#{n}" for d in DOCUMENTS for n in range(20)}
    assert answer.citations and {c.passage_id for c in answer.citations} <= passage_ids
    question_passages = {p.passage.id for p in events[0].retrieved.passages[:2]}
    assert question_passages <= {c.passage_id for c in answer.citations}
    assert any(m.startswith("retro:") for m in answer.model_ids)
    stages = {t.stage: t.millis for t in answer.timings}
    assert {"retrieve", "generate", "prefill", "decode", "chunk_retrieval"} <= set(stages)
    # 20 greedy tokens complete two chunks of 8 that are fed on: the generator searched twice.
    assert stages["chunk_retrieval"] > 0


def test_an_unknown_index_is_not_found(
    generator_fleet: LocalFleet, client: ragfleet.Client, trained: None
) -> None:
    with pytest.raises(ragfleet.errors.NotFound):
        list(client.ask(QUESTION, index="no-such-index", params=GENERATE))
    # Asked directly, the generator checks the index with its Retriever before decoding.
    with grpc.insecure_channel(generator_fleet.services["generator"].address) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        request = generator_pb2.GenerateRequest(
            question=QUESTION, retrieval=common_pb2.RetrievalSpec(index="no-such-index")
        )
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateStream(request, timeout=60))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details().startswith("retriever:") and "no-such-index" in err.value.details()


def test_ragfleet_ask_prints_the_tokens_then_the_answer(generator_fleet: LocalFleet, trained: None) -> None:
    run = subprocess.run(
        [
            RAGFLEET,
            "ask",
            QUESTION,
            "--index",
            INDEX,
            "--address",
            generator_fleet.address,
            "--max-tokens",
            "12",
        ],
        env={**os.environ, "COLUMNS": "400", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    streamed, _, rest = run.stdout.partition("\nanswer: ")
    text = rest.splitlines()[0]
    assert text and streamed.endswith(text)
    assert "citations: " in rest and "chunk_retrieval" in rest
