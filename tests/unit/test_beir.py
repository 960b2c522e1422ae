"""services.datasets.beir (and datasets.load_beir over it) on tiny BEIR folders written in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.datasets.beir import iter_corpus, load_qrels
from services.datasets.collections import load_beir


def write_beir(root: Path, corpus: list, queries: list, qrels: dict[str, str]) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus), encoding="utf-8")
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    for split, text in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text(text, encoding="utf-8")
    return root


CORPUS = [
    {"_id": "d1", "title": "Alpha", "text": "first document", "metadata": {"year": 2001, "src": "x"}},
    {"_id": 2, "text": "second document, no title"},
    {"_id": "d3", "title": "Gamma", "text": "third — ünïcode"},
]
QUERIES = [
    {"_id": "q1", "text": "alpha?"},
    {"_id": "q2", "text": "second?"},
    {"_id": "q3", "text": "train only"},
]
QRELS = {
    "test": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\t2\t2\nq2\td3\t0\n\n",
    "train": "q3\td3\t1\n",
}


@pytest.fixture
def beir_dir(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "tiny", CORPUS, QUERIES, QRELS)


def test_load_beir(beir_dir: Path):
    data = load_beir(beir_dir)
    assert {d: (doc["title"], doc["text"]) for d, doc in data.corpus.items()} == {
        "d1": ("Alpha", "first document"),
        "2": ("", "second document, no title"),
        "d3": ("Gamma", "third — ünïcode"),
    }
    assert data.queries == {"q1": "alpha?", "q2": "second?"}
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"2": 2, "d3": 0}}


def test_load_beir_other_split_and_headerless_qrels(beir_dir: Path):
    data = load_beir(beir_dir, split="train")
    assert data.queries == {"q3": "train only"}
    assert data.qrels == {"q3": {"d3": 1}}


def test_iter_corpus_streams_documents_with_string_metadata(beir_dir: Path):
    docs = list(iter_corpus(beir_dir))
    assert [d["id"] for d in docs] == ["d1", "2", "d3"]
    assert docs[0] == {
        "id": "d1",
        "title": "Alpha",
        "text": "first document",
        "metadata": {"year": "2001", "src": "x"},
    }
    assert docs[1]["metadata"] == {}


def test_missing_qrels_split_names_the_existing_ones(beir_dir: Path):
    with pytest.raises(FileNotFoundError, match=r"dev\.tsv.*\['test', 'train'\]"):
        load_beir(beir_dir, split="dev")


def test_missing_corpus_file(beir_dir: Path):
    (beir_dir / "corpus.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="corpus.jsonl"):
        load_beir(beir_dir)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"_id": "d9", "text": ', r"corpus\.jsonl:2: invalid JSON"),
        ('["d9", "text"]', r"corpus\.jsonl:2: expected an object"),
        ('{"title": "t", "text": "x"}', r"corpus\.jsonl:2: field 'id' \(or '_id'\) is missing"),
        ('{"_id": "", "text": "x"}', r"corpus\.jsonl:2: field 'id'"),
        ('{"_id": "d9", "text": 5}', r"corpus\.jsonl:2: field 'text' must be a string"),
        ('{"_id": "d9", "title": 5}', r"corpus\.jsonl:2: field 'title' must be a string"),
        ('{"_id": "d9", "text": "x", "metadata": [1]}', r"corpus\.jsonl:2: field 'metadata'"),
        ('{"_id": "d1", "text": "again"}', r"corpus\.jsonl: field '_id' repeats the document id 'd1'"),
    ],
)
def test_malformed_corpus_lines(tmp_path: Path, line: str, message: str):
    root = write_beir(tmp_path / "bad", [CORPUS[0]], QUERIES, QRELS)
    with (root / "corpus.jsonl").open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_beir(root)


def test_malformed_query_line(tmp_path: Path):
    root = write_beir(tmp_path / "bad", CORPUS, [*QUERIES, {"_id": "q4"}], QRELS)
    with pytest.raises(ValueError, match=r"queries\.jsonl:4: field 'text' is missing"):
        load_beir(root)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("q1\td1\n", r"test\.tsv:1: expected 3 tab-separated fields"),
        ("q1\td1\t1\nq2 2 1\n", r"test\.tsv:2: expected 3 tab-separated fields"),
        ("q1\td1\tyes\n", r"test\.tsv:1: field 'score' must be an integer, got 'yes'"),
    ],
)
def test_malformed_qrels(tmp_path: Path, text: str, message: str):
    root = write_beir(tmp_path / "bad", CORPUS, QUERIES, {"test": text})
    with pytest.raises(ValueError, match=message):
        load_qrels(root)


def test_judged_query_missing_from_queries(tmp_path: Path):
    root = write_beir(tmp_path / "bad", CORPUS, QUERIES, {"test": "q1\td1\t1\nq404\td1\t1\n"})
    with pytest.raises(ValueError, match=r"1 judged queries are not in queries\.jsonl.*q404"):
        load_beir(root)
