"""Collections as users bring them, one test per shape, read both ways a user reads them: the SDK's
`iter_documents` (what `ragfleet ingest FILE` sends) and `load_beir` (what `ragfleet eval retrieval
--beir` indexes and scores). Each test writes a tiny BEIR folder in tmp_path."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import ragfleet
from ragfleet._common import iter_documents
from services.cli import app
from services.datasets.collections import load_beir

Docs = list[tuple[str, str, str]]  # (id, title, text) in file order


def lines(records: list, *, bom: bool = False, crlf: bool = False) -> bytes:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + ("\r\n" if crlf else "\n") for r in records)
    return ("\ufeff" if bom else "").encode() + text.encode()


def write_beir(
    root: Path,
    corpus: list,
    queries: list | None = None,
    qrels: str = "q1\td1\t1\n",
    *,
    bom: bool = False,
    crlf: bool = False,
) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_bytes(lines(corpus, bom=bom, crlf=crlf))
    queries = [{"_id": "q1", "text": "first?"}] if queries is None else queries
    (root / "queries.jsonl").write_bytes(lines(queries, bom=bom, crlf=crlf))
    if crlf:
        qrels = qrels.replace("\n", "\r\n")
    (root / "qrels" / "test.tsv").write_bytes((("\ufeff" if bom else "") + qrels).encode())
    return root


def read_with_sdk(folder: Path) -> tuple[Docs, list[str]]:
    skipped: list[str] = []
    docs = [(d.id, d.title, d.text) for d in iter_documents(folder, skipped=skipped)]
    return docs, skipped


def read_for_eval(folder: Path) -> tuple[Docs, list[str]]:
    data = load_beir(folder)
    return [(d["id"], d["title"], d["text"]) for d in data.documents()], data.skipped_documents


@pytest.fixture(params=[read_with_sdk, read_for_eval], ids=["ingest", "eval"])
def read(request) -> Callable[[Path], tuple[Docs, list[str]]]:
    return request.param


def test_a_document_with_neither_title_nor_text_is_skipped_and_counted(tmp_path: Path, read) -> None:
    corpus = [
        {"_id": "d1", "title": "One", "text": "first"},
        {"_id": "empty", "title": "", "text": ""},
        {"_id": "blank", "title": " ", "text": "\n\t"},
        {"_id": "bare"},
        {"_id": "nulls", "title": None, "text": None},
        {"_id": "d2", "text": "second"},
    ]
    docs, skipped = read(write_beir(tmp_path / "c", corpus))
    assert [d[0] for d in docs] == ["d1", "d2"]
    assert skipped == ["empty", "blank", "bare", "nulls"]


def test_judgements_of_a_skipped_document_stay_so_it_counts_as_a_miss(tmp_path: Path) -> None:
    corpus = [{"_id": "d1", "text": "first"}, {"_id": "gone", "text": ""}]
    data = load_beir(write_beir(tmp_path / "c", corpus, qrels="q1\td1\t1\nq1\tgone\t1\n"))
    assert "gone" not in data.corpus and data.qrels == {"q1": {"d1": 1, "gone": 1}}


def test_without_a_list_the_sdk_logs_how_many_it_skipped(tmp_path: Path, caplog) -> None:
    corpus = [{"_id": "d1", "text": "x"}, {"_id": "e1"}, {"_id": "e2", "text": ""}]
    folder = write_beir(tmp_path / "c", corpus)
    with caplog.at_level(logging.WARNING, logger="ragfleet"):
        assert [d.id for d in iter_documents(folder)] == ["d1"]
    assert "skipped 2 documents with neither title nor text" in caplog.text and "'e1', 'e2'" in caplog.text


def test_dicts_given_in_code_are_sent_as_they_are(tmp_path: Path) -> None:
    # Only files are read leniently; the Pipeline's own check rejects an empty document sent in code.
    (doc,) = iter_documents([{"id": "e", "title": "", "text": ""}])
    assert (doc.id, doc.title, doc.text) == ("e", "", "")


def test_a_title_only_document_is_indexed_by_its_title(tmp_path: Path, read) -> None:
    corpus = [{"_id": "t1", "title": "Only a title"}, {"_id": "t2", "title": "Blank text", "text": "  "}]
    docs, skipped = read(write_beir(tmp_path / "c", corpus))
    assert docs == [("t1", "", "Only a title"), ("t2", "", "Blank text")] and skipped == []


def test_integer_ids_are_their_decimal_text(tmp_path: Path, read) -> None:
    corpus = [{"_id": 7, "text": "seven"}, {"_id": 10, "text": "ten"}]
    folder = write_beir(tmp_path / "c", corpus, [{"_id": 1, "text": "which?"}], qrels="1\t7\t1\n")
    docs, _ = read(folder)
    assert [d[0] for d in docs] == ["7", "10"]
    data = load_beir(folder)
    assert data.queries == {"1": "which?"} and data.qrels == {"1": {"7": 1}}


def test_extra_fields_are_ignored(tmp_path: Path, read) -> None:
    corpus = [{"_id": "d1", "title": "T", "text": "x", "url": "http://x", "pmid": 12, "tags": ["a"]}]
    folder = write_beir(tmp_path / "c", corpus, [{"_id": "q1", "text": "q?", "query_type": "fact"}])
    docs, _ = read(folder)
    assert docs == [("d1", "T", "x")]
    assert load_beir(folder).queries == {"q1": "q?"}


@pytest.mark.parametrize("header", ["query-id\tcorpus-id\tscore\n", ""], ids=["header", "no-header"])
def test_qrels_with_or_without_a_header(tmp_path: Path, header: str) -> None:
    corpus = [{"_id": "d1", "text": "x"}, {"_id": "d2", "text": "y"}]
    queries = [{"_id": "q1", "text": "a?"}, {"_id": "q2", "text": "b?"}]
    data = load_beir(write_beir(tmp_path / "c", corpus, queries, qrels=header + "q1\td1\t1\nq2\td2\t2\n"))
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}


def test_queries_without_qrels_are_not_asked_and_counted(tmp_path: Path) -> None:
    queries = [{"_id": "q1", "text": "judged"}, {"_id": "q2", "text": "not"}, {"_id": "q3", "text": "nor"}]
    data = load_beir(write_beir(tmp_path / "c", [{"_id": "d1", "text": "x"}], queries))
    assert data.queries == {"q1": "judged"} and data.queries_without_qrels == ["q2", "q3"]


def test_utf8_with_a_byte_order_mark(tmp_path: Path, read) -> None:
    folder = write_beir(
        tmp_path / "c",
        [{"_id": "d1", "title": "Ünï", "text": "cödé"}],
        qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\n",
        bom=True,
    )
    docs, _ = read(folder)
    assert docs == [("d1", "Ünï", "cödé")]
    data = load_beir(folder)
    assert data.queries == {"q1": "first?"} and data.qrels == {"q1": {"d1": 1}}


def test_crlf_line_ends(tmp_path: Path, read) -> None:
    corpus = [{"_id": "d1", "text": "x"}, "", {"_id": "d2", "title": "T", "text": "y"}]
    folder = write_beir(tmp_path / "c", corpus, qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\n", crlf=True)
    docs, _ = read(folder)
    assert docs == [("d1", "", "x"), ("d2", "T", "y")]
    data = load_beir(folder)
    assert data.queries == {"q1": "first?"} and data.qrels == {"q1": {"d1": 1}}


def test_ragfleet_ingest_prints_what_it_skipped(tmp_path: Path, monkeypatch) -> None:
    sent: list[str] = []

    def ingest(source, **kwargs):
        sent.extend(d.id for d in source)
        return SimpleNamespace(retrievers=[], documents=len(sent), passages=len(sent))

    client = SimpleNamespace(ingest=ingest)
    monkeypatch.setattr("services.cli._client", lambda *args, **kwargs: nullcontext(client))
    path = tmp_path / "docs.jsonl"
    path.write_bytes(lines([{"id": "a", "text": "x"}, {"id": "b", "title": ""}, {"id": "c", "title": "C"}]))
    result = CliRunner().invoke(app, ["ingest", str(path), "--index", "docs"])
    assert result.exit_code == 0, result.output
    assert sent == ["a", "c"]
    assert "skipped 1 documents with neither title nor text" in result.output
    assert "2 documents -> 2 passages" in result.output


def test_the_pipeline_still_rejects_an_empty_document_and_takes_a_rewritten_title_only_one(
    tmp_path: Path,
) -> None:
    from services.gateway.service import PipelineService
    from services.runtime.errors import ServiceError
    from services.runtime.settings import Settings

    check = PipelineService(Settings())._check_document
    folder = write_beir(tmp_path / "c", [{"_id": "t", "title": "Only a title"}])
    (rewritten,) = iter_documents(folder)
    check(rewritten, "documents[0]", set())
    with pytest.raises(ServiceError, match=r"documents\[0\]\.text: document 'e' has no text"):
        check(ragfleet.Document(id="e", title="", text=""), "documents[0]", set())
    with pytest.raises(ServiceError, match="has no text"):
        check(ragfleet.Document(id="t", title="Only a title"), "documents[0]", set())
