"""The bm25 backend on a handful of passages."""

from services.retriever.backend import Query
from services.retriever.bm25 import BM25Backend
from services.retriever.passages import Passage
from services.runtime.settings import Settings

DOCS = [
    "The cat sat on the mat.",
    "Dogs are loyal animals that love running.",
    "Quantum computers use qubits for computation.",
    "Cats and kittens chase mice.",
]


def make(tmp_path, docs=DOCS):
    settings = Settings(home=tmp_path)
    spec = BM25Backend.resolve_spec({}, settings)
    backend = BM25Backend.open(tmp_path, spec, settings, None)
    backend.add([(i + 1, Passage(f"d{i}", f"d{i}", 0, "", t)) for i, t in enumerate(docs)])
    return backend, spec, settings


def test_search_ranks_and_stems(tmp_path):
    backend, _, _ = make(tmp_path)
    hits = backend.search(Query(["cats", "qubit computing", "zebra"], 2))
    assert hits[0][0][0] in (1, 4) and {r for r, _ in hits[0]} == {1, 4}
    assert hits[1][0][0] == 3 and len(hits[1]) == 1
    assert hits[2] == []


def test_filter_add_remove_and_round_trip(tmp_path):
    backend, spec, settings = make(tmp_path)
    assert [r for r, _ in backend.search(Query(["cat"], 5, allowed={4}))[0]] == [4]
    backend.remove([1])
    assert [r for r, _ in backend.search(Query(["cat"], 5))[0]] == [4]
    backend.add([(9, Passage("n", "n", 0, "Cat facts", "A cat purrs."))])
    before = backend.search(Query(["cat purring"], 5))
    assert before[0][0][0] == 9
    version_dir = tmp_path / "v1"
    version_dir.mkdir()
    backend.save(version_dir)
    reopened = BM25Backend.open(tmp_path, spec, settings, version_dir)
    assert reopened.search(Query(["cat purring"], 5)) == before
