"""services.datasets.collections on tiny hand-made files in tmp_path, and the demo set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.datasets.collections import (
    load_beir,
    load_dataset,
    load_demo,
    load_qa_jsonl,
    load_squad,
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), "utf-8")
    return path


@pytest.fixture
def beir_dir(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    (root / "qrels").mkdir(parents=True)
    write_jsonl(
        root / "corpus.jsonl",
        [
            {"_id": "d1", "title": "Alpha", "text": "first", "metadata": {"year": 2001}},
            {"_id": "d2", "text": "second"},
        ],
    )
    write_jsonl(root / "queries.jsonl", [{"_id": "q1", "text": "alpha?"}, {"_id": "q2", "text": "other"}])
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\n", "utf-8")
    return root


def squad(version: str, qas: list[dict]) -> dict:
    return {
        "version": version,
        "data": [
            {"title": "First", "paragraphs": [{"context": "Paris is in France.", "qas": qas[:1]}]},
            {
                "title": "Second",
                "paragraphs": [
                    {"context": "Unused paragraph.", "qas": []},
                    {"context": "Rome is in Italy.", "qas": qas[1:]},
                ],
            },
        ],
    }


V1_QAS = [
    {"id": "a", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}] * 2},
    {"id": "b", "question": "Where is Rome?", "answers": [{"text": "Italy", "answer_start": 11}]},
]


def test_beir_folder_keeps_metadata_and_only_judged_queries(beir_dir: Path) -> None:
    dataset = load_beir(beir_dir)
    assert (dataset.name, dataset.kind) == ("tiny-test", "ir")
    assert dataset.queries == {"q1": "alpha?"} and dataset.queries_without_qrels == ["q2"]
    assert dataset.qrels == {"q1": {"d1": 2}} and dataset.skipped_documents == []
    assert dataset.answers == {} and dataset.contexts == {}
    documents = list(dataset.documents())
    assert documents[0] == {"id": "d1", "title": "Alpha", "text": "first", "metadata": {"year": "2001"}}
    assert [d["id"] for d in documents] == ["d1", "d2"] and dataset.has_corpus


def test_beir_errors_name_file_line_and_field(beir_dir: Path) -> None:
    write_jsonl(beir_dir / "corpus.jsonl", [{"_id": "d1", "text": "ok"}, {"_id": "d2", "text": 5}])
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: field 'text' must be a string"):
        load_beir(beir_dir)
    with pytest.raises(FileNotFoundError, match="splits here"):
        load_beir(beir_dir, "dev")


def test_squad_v11_paragraphs_are_documents_and_questions_point_at_them(tmp_path: Path) -> None:
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(squad("1.1", V1_QAS)), "utf-8")
    dataset = load_squad(path)
    assert (dataset.name, dataset.kind) == ("dev-v1.1", "qa")
    assert [(d["id"], d["title"]) for d in dataset.documents()] == [
        ("0-0", "First"),
        ("1-0", "Second"),
        ("1-1", "Second"),
    ]
    assert dataset.queries == {"a": "Where is Paris?", "b": "Where is Rome?"}
    assert dataset.answers == {"a": ["France", "France"], "b": ["Italy"]}
    assert dataset.qrels == {"a": {"0-0": 1}, "b": {"1-1": 1}}
    assert dataset.contexts["b"] == ["Rome is in Italy."]


def test_squad_v2_impossible_questions_have_no_answers(tmp_path: Path) -> None:
    qas = [
        V1_QAS[0] | {"is_impossible": False},
        {
            "id": "c",
            "question": "Where is Atlantis?",
            "answers": [],
            "plausible_answers": [{"text": "Italy", "answer_start": 11}],
            "is_impossible": True,
        },
    ]
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(squad("v2.0", qas)), "utf-8")
    dataset = load_squad(path)
    assert dataset.answers == {"a": ["France", "France"], "c": []}
    assert dataset.qrels["c"] == {"1-1": 1}


QA0 = r"data\[1\]\.paragraphs\[1\]\.qas\[0\]"


def question(d: dict) -> dict:
    return d["data"][1]["paragraphs"][1]["qas"][0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: question(d).pop("answers"), QA0 + r"\.answers must be a list, got nothing"),
        (lambda d: question(d).update(answers=[]), QA0 + r"\.answers is empty but .* is_impossible"),
        (
            lambda d: question(d)["answers"][0].update(text=3),
            QA0 + r"\.answers\[0\]\.text must be .*, got int",
        ),
        (lambda d: question(d).update(id="a"), QA0 + r"\.id repeats the question id 'a'"),
        (lambda d: question(d).update(is_impossible="no"), QA0 + r"\.is_impossible must be true or false"),
        (
            lambda d: d["data"][0]["paragraphs"][0].update(context=""),
            r"data\[0\]\.paragraphs\[0\]\.context must",
        ),
        (
            lambda d: d["data"][0].update(title=None),
            r"data\[0\]\.title must be a non-empty string, got nothing",
        ),
        (lambda d: d.update(data={}), r"data must be a list, got dict"),
    ],
)
def test_squad_errors_name_the_json_path(tmp_path: Path, change, message: str) -> None:
    data = json.loads(json.dumps(squad("1.1", V1_QAS)))
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), "utf-8")
    with pytest.raises(ValueError, match=message):
        load_squad(path)


def test_squad_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"data": [\n  {"title": "x",\n}', "utf-8")
    with pytest.raises(ValueError, match=r"bad\.json:3: not valid JSON"):
        load_squad(path)


PARIS = "Paris is the capital."


def test_qa_jsonl_contexts_become_shared_documents(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": "Capital of France?", "answers": ["Paris"], "contexts": [PARIS]},
            "",
            {
                "id": "x",
                "question": "And of Italy?",
                "answers": ["Rome", "Roma"],
                "contexts": ["Rome.", PARIS],
            },
            {"id": 7, "question": "No context?", "answers": ["none"]},
        ],
    )
    dataset = load_qa_jsonl(path)
    assert (dataset.name, dataset.kind) == ("qa", "qa")
    assert list(dataset.queries) == ["1", "x", "7"]
    assert dataset.answers["x"] == ["Rome", "Roma"]
    assert [(d["id"], d["text"]) for d in dataset.documents()] == [
        ("ctx-0", "Paris is the capital."),
        ("ctx-1", "Rome."),
    ]
    assert dataset.qrels == {"1": {"ctx-0": 1}, "x": {"ctx-1": 1, "ctx-0": 1}}
    assert "7" not in dataset.contexts


def test_qa_jsonl_without_contexts_has_no_corpus(tmp_path: Path) -> None:
    dataset = load_qa_jsonl(write_jsonl(tmp_path / "q.jsonl", [{"question": "Why?", "answers": ["because"]}]))
    assert not dataset.has_corpus and dataset.qrels == {} and list(dataset.documents()) == []


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"question": "q", "answers": ["a"]', r":2: invalid JSON"),
        ({"answers": ["a"]}, r":2: field 'question' is missing"),
        ({"question": "q"}, r":2: field 'answers' is missing"),
        ({"question": "q", "answers": "a"}, r":2: field 'answers' must be a non-empty list"),
        ({"question": "q", "answers": ["a", 1]}, r":2: field 'answers\[1\]' must be a non-empty string"),
        ({"question": "q", "answers": ["a"], "contexts": [""]}, r":2: field 'contexts\[0\]'"),
        ({"id": "1", "question": "q", "answers": ["a"]}, r":2: field 'id' repeats the question id '1'"),
        (["a list"], r":2: expected a JSON object"),
    ],
)
def test_qa_jsonl_errors_name_line_and_field(tmp_path: Path, row, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "fine", "answers": ["yes"]}, row])
    with pytest.raises(ValueError, match=r"bad\.jsonl" + message):
        load_qa_jsonl(path)


def test_demo_set_questions_point_at_their_documents() -> None:
    dataset = load_demo()
    assert (dataset.name, dataset.kind) == ("demo", "qa")
    documents = {d["id"]: d for d in dataset.documents()}
    assert len(documents) == 160 and len(dataset.queries) == 8
    for qid in dataset.queries:
        (doc_id,) = dataset.qrels[qid]
        (answer,) = dataset.answers[qid]
        assert answer in documents[doc_id]["text"]
        assert dataset.contexts[qid] == [documents[doc_id]["text"]]


def test_load_dataset_dispatches_on_specs_and_paths(beir_dir: Path, tmp_path: Path) -> None:
    squad_path = tmp_path / "s.json"
    squad_path.write_text(json.dumps(squad("1.1", V1_QAS)), "utf-8")
    jsonl_path = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answers": ["a"]}])
    assert load_dataset("demo").name == "demo"
    assert load_dataset({"kind": "demo"}).name == "demo"
    assert load_dataset(beir_dir).name == "tiny-test"
    assert load_dataset(str(squad_path)).kind == "qa"
    assert load_dataset({"path": str(jsonl_path)}).name == "q"
    assert load_dataset({"kind": "beir", "path": str(beir_dir), "split": "test"}).qrels == {"q1": {"d1": 2}}


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ({"kind": "csv", "path": "x"}, ValueError, "dataset.kind: expected one of"),
        ({"kind": "squad"}, ValueError, "dataset.path: .* needs a path"),
        ({"kind": "demo", "split": "dev"}, ValueError, "takes no path or split"),
        ({"path": "x.json", "splt": "dev"}, ValueError, "unknown field 'splt'"),
        ("missing.json", FileNotFoundError, "no such file"),
    ],
)
def test_load_dataset_rejects_bad_specs(spec, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        load_dataset(spec)


def test_load_dataset_rejects_unknown_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n", "utf-8")
    with pytest.raises(ValueError, match="cannot tell the dataset kind"):
        load_dataset(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="without corpus.jsonl"):
        load_dataset(tmp_path)
    jsonl = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answers": ["a"]}])
    with pytest.raises(ValueError, match="only BEIR datasets have splits"):
        load_dataset({"path": str(jsonl), "split": "test"})
