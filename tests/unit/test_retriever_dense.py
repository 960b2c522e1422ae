"""The dense backend with each vector store, on a handful of passages (MiniLM, offline)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.retriever import vectors
from services.retriever.backend import Query
from services.retriever.dense import DenseBackend
from services.retriever.passages import Passage
from services.runtime.errors import ServiceError
from services.runtime.settings import Settings

DOCS = [
    "The Eiffel Tower is in Paris, France.",
    "Photosynthesis converts sunlight into chemical energy in plants.",
    "The stock market fell sharply on Monday.",
    "Penguins live in the southern hemisphere and cannot fly.",
    "Python is a popular programming language.",
    "Mount Everest is the highest mountain on Earth.",
]
QUERIES = {"Which bird can't fly?": 4, "How do plants make energy from light?": 2, "coding languages": 5}
STORES = [{"vector_store": "faiss", "faiss_index": k} for k in ("flat", "hnsw", "ivf")] + [
    {"vector_store": "chroma"}
]


def rows(docs=DOCS, start=1):
    return [(start + i, Passage(f"d{start + i}", f"d{start + i}", 0, "", t)) for i, t in enumerate(docs)]


@pytest.fixture(params=STORES, ids=lambda s: s.get("faiss_index", s["vector_store"]))
def spec_settings(request, tmp_path, monkeypatch):
    monkeypatch.setattr(vectors, "IVF_MIN_VECTORS", 4)  # so the ivf case really trains an IVF index
    settings = Settings(home=tmp_path)
    return DenseBackend.resolve_spec(request.param, settings), settings


def test_search_filter_remove_and_round_trip(tmp_path, spec_settings):
    spec, settings = spec_settings
    backend = DenseBackend.open(tmp_path, spec, settings, None)
    assert backend.model_id == "sentence-transformers/all-MiniLM-L6-v2" and backend.dimension == 384
    backend.add(rows())
    v1 = tmp_path / "v000001"
    v1.mkdir()
    backend.save(v1)
    backend = DenseBackend.open(tmp_path, spec, settings, v1)
    hits = backend.search(Query(list(QUERIES), 3))
    assert [h[0][0] for h in hits] == list(QUERIES.values())
    assert all(len(h) == 3 and h[0][1] >= h[1][1] >= h[2][1] for h in hits)
    # Filters are exact whatever the store: only allowed rowids, all of them when k is large.
    filtered = backend.search(Query(["Which bird can't fly?"], 10, allowed={1, 3}))[0]
    assert sorted(r for r, _ in filtered) == [1, 3]
    backend.remove([4])
    backend.add(rows(["Emperor penguins huddle in the Antarctic winter."], start=7))
    v2 = tmp_path / "v000002"
    v2.mkdir()
    backend.save(v2)
    reopened = DenseBackend.open(tmp_path, spec, settings, v2)
    top = reopened.search(Query(["Which bird can't fly?"], 10))[0]
    assert top[0][0] == 7 and 4 not in {r for r, _ in top} and len(top) == 6
    if spec["vector_store"] == "faiss" and spec["faiss_index"] == "ivf":
        import faiss

        assert isinstance(faiss.downcast_index(reopened.store.index.index), faiss.IndexIVFFlat)
    reopened.collect_garbage(v2)


def test_bad_spec_is_invalid_argument(tmp_path):
    settings = Settings(home=tmp_path)
    with pytest.raises(ServiceError) as err:
        DenseBackend.resolve_spec({"vector_store": "milvus"}, settings)
    assert "spec.vector_store" in err.value.message
    with pytest.raises(ServiceError) as err:
        DenseBackend.resolve_spec({"faiss_index": "pq"}, settings)
    assert "spec.faiss_index" in err.value.message


def test_missing_model_is_failed_precondition(tmp_path):
    settings = Settings(home=tmp_path)
    spec = DenseBackend.resolve_spec({"model": str(tmp_path / "no-such-model")}, settings)
    with pytest.raises(ServiceError) as err:
        DenseBackend.open(tmp_path, spec, settings, None)
    assert err.value.code.name == "FAILED_PRECONDITION"
