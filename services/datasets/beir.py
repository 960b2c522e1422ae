"""Reads the files of a dataset in the BEIR layout (`datasets.load_beir` makes them an `EvalDataset`).

A BEIR folder holds `corpus.jsonl` (`{"_id", "title", "text", "metadata"?}` per line),
`queries.jsonl` (`{"_id", "text"}`) and `qrels/<split>.tsv` (`query-id  corpus-id  score`, tab
separated, with or without that header line). Ids are read as strings (a numeric `_id` becomes its
decimal text); a missing `title` is empty. Blank lines are skipped.

Malformed input raises ValueError naming `file:line` and the field; a missing file raises
FileNotFoundError (for a split, listing the splits that exist). Qrels may judge documents that are
not in the corpus (they stay in the qrels, as relevant documents no system can find), and a document
id may appear only once in the corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (a BEIR folder needs {CORPUS_FILE}, "
            f"{QUERIES_FILE} and {QRELS_DIR}/<split>.tsv)"
        )
    return path


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line number, object) for each non-blank line of a JSON-lines file."""
    with _require(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problem = f"{error.msg} at column {error.colno}"
                raise ValueError(f"{path}:{number}: not valid JSON ({problem})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def _id(record: dict[str, Any], where: str) -> str:
    value = record.get("_id")
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
        raise ValueError(f"{where}: field '_id' is missing or not a non-empty string")
    return str(value)


def _text(record: dict[str, Any], field: str, where: str, *, required: bool) -> str:
    value = record.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problem = "is missing" if value is None else f"must be a string, got {type(value).__name__}"
        raise ValueError(f"{where}: field '{field}' {problem}")
    return value


def _metadata(record: dict[str, Any], where: str) -> dict[str, str]:
    """The record's metadata as strings (what `Document.metadata` holds); non-strings as JSON."""
    value = record.get("metadata") or {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: field 'metadata' must be an object, got {type(value).__name__}")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def iter_corpus(folder: str | Path) -> Iterator[dict[str, Any]]:
    """Streams the corpus as `{"id", "title", "text", "metadata"}` dicts, in file order."""
    path = Path(folder) / CORPUS_FILE
    seen: set[str] = set()
    for number, record in json_lines(path):
        where = f"{path}:{number}"
        doc_id = _id(record, where)
        if doc_id in seen:
            raise ValueError(f"{where}: field '_id' repeats the document id {doc_id!r}")
        seen.add(doc_id)
        yield {
            "id": doc_id,
            "title": _text(record, "title", where, required=False),
            "text": _text(record, "text", where, required=True),
            "metadata": _metadata(record, where),
        }


def load_queries(folder: str | Path) -> dict[str, str]:
    """All queries of the folder, `{query id: text}`."""
    path = Path(folder) / QUERIES_FILE
    queries: dict[str, str] = {}
    for number, record in json_lines(path):
        where = f"{path}:{number}"
        queries[_id(record, where)] = _text(record, "text", where, required=True)
    return queries


def load_qrels(folder: str | Path, split: str = "test") -> dict[str, dict[str, int]]:
    """The split's judgements, `{query id: {doc id: relevance}}`."""
    qrels_dir = Path(folder) / QRELS_DIR
    path = qrels_dir / f"{split}.tsv"
    if not path.is_file():
        splits = sorted(p.stem for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
        raise FileNotFoundError(f"{path}: no qrels for split {split!r} (splits here: {splits or 'none'})")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if number == 1 and fields[:3] == ["query-id", "corpus-id", "score"]:
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
