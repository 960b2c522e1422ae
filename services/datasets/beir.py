"""Reads the files of a dataset in the BEIR layout (`datasets.load_beir` makes them an `EvalDataset`).

A BEIR folder holds `corpus.jsonl` (`{"_id", "title", "text", "metadata"?}` per line),
`queries.jsonl` (`{"_id", "text"}`) and `qrels/<split>.tsv` (`query-id  corpus-id  score`, tab
separated, with or without that header line). Files are read as real collections come: UTF-8 with
or without a byte-order mark, LF or CRLF line ends, blank lines skipped, fields other than these
ignored, ids read as strings (a numeric `_id` becomes its decimal text).

The corpus is read by the SDK's reader, the one `ragfleet ingest` uses
(`ragfleet._common.read_jsonl`), so both see the same documents: a document with neither title nor
text is left out (its id goes to the caller's `skipped` list), a title-only one has its title as its
text. Qrels may judge documents that are not in the corpus, left-out ones included (they stay in the
qrels, as relevant documents no system can find), and a document id may appear only once.

Malformed input raises ValueError naming `file:line` and the field (a repeated document id: the
file and the id); a missing file raises FileNotFoundError (for a split, listing the splits that
exist).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ragfleet._common import json_records, read_jsonl
from ragfleet.errors import InvalidArgument

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"
QRELS_HEADER = ["query-id", "corpus-id", "score"]


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (a BEIR folder needs {CORPUS_FILE}, "
            f"{QUERIES_FILE} and {QRELS_DIR}/<split>.tsv)"
        )
    return path


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line number, object) for each non-blank line of a JSON-lines file."""
    try:
        for number, record in json_records(_require(path)):
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record
    except InvalidArgument as error:  # the SDK's error for a bad line; a dataset's is ValueError
        raise ValueError(error.details) from None


def _id(record: dict[str, Any], where: str) -> str:
    value = record.get("_id")
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
        raise ValueError(f"{where}: field '_id' is missing or not a non-empty string")
    return str(value)


def iter_corpus(folder: str | Path, skipped: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Streams the corpus as `{"id", "title", "text", "metadata"}` dicts, in file order; the ids of the
    documents left out for having neither title nor text are appended to `skipped` (without it, the
    SDK's reader logs how many)."""
    path = _require(Path(folder) / CORPUS_FILE)
    seen: set[str] = set()
    try:
        for doc in read_jsonl(path, skipped):
            if doc.id in seen:
                raise ValueError(f"{path}: field '_id' repeats the document id {doc.id!r}")
            seen.add(doc.id)
            yield {"id": doc.id, "title": doc.title, "text": doc.text, "metadata": dict(doc.metadata)}
    except InvalidArgument as error:
        raise ValueError(error.details) from None


def load_queries(folder: str | Path) -> dict[str, str]:
    """All queries of the folder, `{query id: text}`."""
    path = Path(folder) / QUERIES_FILE
    queries: dict[str, str] = {}
    for number, record in json_lines(path):
        where = f"{path}:{number}"
        text = record.get("text")
        if not isinstance(text, str):
            problem = "is missing" if text is None else f"must be a string, got {type(text).__name__}"
            raise ValueError(f"{where}: field 'text' {problem}")
        queries[_id(record, where)] = text
    return queries


def load_qrels(folder: str | Path, split: str = "test") -> dict[str, dict[str, int]]:
    """The split's judgements, `{query id: {doc id: relevance}}`."""
    qrels_dir = Path(folder) / QRELS_DIR
    path = qrels_dir / f"{split}.tsv"
    if not path.is_file():
        splits = sorted(p.stem for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
        raise FileNotFoundError(f"{path}: no qrels for split {split!r} (splits here: {splits or 'none'})")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = [field.strip() for field in line.rstrip("\r\n").split("\t")]
            if number == 1 and fields == QRELS_HEADER:
                continue
            where = f"{path}:{number}"
            if len(fields) != 3 or not fields[0] or not fields[1]:
                raise ValueError(f"{where}: expected 3 tab-separated fields query-id, corpus-id, score")
            try:
                score = int(fields[2])
            except ValueError:
                raise ValueError(f"{where}: field 'score' must be an integer, got {fields[2]!r}") from None
            qrels.setdefault(fields[0], {})[fields[1]] = score
    return qrels
