"""The mamba backend: spec defaults, a missing model, search over the shared stores, over-long inputs."""

import os

import pytest
from test_mamba_model import save_tiny_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.retriever.backend import BACKENDS, Query, backend_class
from services.retriever.mamba.backend import MambaBackend
from services.retriever.passages import Passage
from services.runtime.errors import ServiceError
from services.runtime.settings import RetrieverSettings, Settings

DOCS = [
    "penguins live in the south",
    "the stock market fell",
    "python is a language",
    "the tower is in paris",
]


def rows(docs=DOCS, start=1):
    return [(start + i, Passage(f"d{start + i}", f"d{start + i}", 0, "", t)) for i, t in enumerate(docs)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("mamba") / "ckpt"))


def test_registered_and_the_default_model_is_where_training_writes(tmp_path):
    assert backend_class("mamba") is MambaBackend and "mamba" in BACKENDS
    settings = Settings(home=tmp_path)
    spec = MambaBackend.resolve_spec({}, settings)
    assert spec == {
        "vector_store": "faiss",
        "faiss_index": "flat",
        "mamba_model": str(tmp_path / "models/mamba"),
    }
    with pytest.raises(ServiceError) as err:
        MambaBackend.open(tmp_path, spec, settings, None)
    assert err.value.code.name == "FAILED_PRECONDITION" and "ragfleet train mamba" in err.value.message
    with pytest.raises(ServiceError) as err:
        MambaBackend.resolve_spec({"vector_store": "milvus"}, settings)
    assert "spec.vector_store" in err.value.message


@pytest.mark.parametrize(
    "store", [{"vector_store": "faiss", "faiss_index": "hnsw"}, {"vector_store": "chroma"}]
)
def test_add_search_remove_and_reopen(tmp_path, checkpoint, store):
    settings = Settings(home=tmp_path, retriever=RetrieverSettings(mamba_model=checkpoint))
    spec = MambaBackend.resolve_spec(store, settings)
    backend = MambaBackend.open(tmp_path, spec, settings, None)
    assert backend.model_id == checkpoint and backend.dimension == 16
    backend.add(rows())
    v1, v2 = tmp_path / "v000001", tmp_path / "v000002"
    v1.mkdir()
    assert backend.save(v1) == {"vectors": 4, "dimension": 16}
    backend = MambaBackend.open(tmp_path, spec, settings, v1)
    # A passage's own text finds it first (the encoder is deterministic; cosine 1).
    assert [h[0][0] for h in backend.search(Query(DOCS, 2))] == [1, 2, 3, 4]
    backend.remove([2])
    v2.mkdir()
    assert backend.save(v2) == {"vectors": 3, "dimension": 16}
    reopened = MambaBackend.open(tmp_path, spec, settings, v2)
    assert 2 not in {r for r, _ in reopened.search(Query([DOCS[1]], 10))[0]}
    hits = reopened.search(Query([DOCS[1], DOCS[2]], 10, allowed={1, 3}))
    assert all(sorted(r for r, _ in h) == [1, 3] for h in hits) and hits[1][0][0] == 3
    reopened.collect_garbage(v2)


def test_an_input_over_mamba_max_tokens_is_invalid_argument_naming_it(tmp_path, checkpoint):
    settings = Settings(
        home=tmp_path, retriever=RetrieverSettings(mamba_model=checkpoint, mamba_max_tokens=5)
    )
    backend = MambaBackend.open(tmp_path, MambaBackend.resolve_spec({}, settings), settings, None)
    with pytest.raises(ServiceError) as err:
        backend.add(rows(["short", "one two three four five six seven"]))
    assert err.value.code.name == "INVALID_ARGUMENT" and "passages[1].text" in err.value.message
    assert "retriever.mamba_max_tokens" in err.value.message
    with pytest.raises(ServiceError) as err:
        backend.search(Query(["one two three four five six seven"], 3))
    assert err.value.code.name == "INVALID_ARGUMENT" and err.value.message.startswith("query")


async def test_the_gateway_refuses_mamba_model_for_an_ingest_without_mamba():
    from ragfleet.v1 import common_pb2, pipeline_pb2
    from services.gateway.service import PipelineService
    from services.runtime.context import CallContext
    from services.runtime.settings import Endpoint, GatewaySettings

    retrievers = {name: Endpoint(address="127.0.0.1:9") for name in ("dense", "bm25", "mamba")}
    gateway = PipelineService(Settings(gateway=GatewaySettings(retrievers=retrievers)))

    async def stream():
        spec = common_pb2.IndexSpec(mamba_model="/models/mamba", retrievers=["dense", "bm25"])
        doc = common_pb2.Document(id="d1", text="penguins")
        yield pipeline_pb2.PipelineIngestRequest(index="kb", spec=spec, documents=[doc], last=True)

    with pytest.raises(ServiceError) as err:
        await gateway.Ingest(stream(), CallContext())
    assert err.value.code.name == "INVALID_ARGUMENT" and err.value.message.startswith("spec.mamba_model")
