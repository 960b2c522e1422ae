"""The passage store of one backend index: SQLite (stdlib, WAL) holding every passage's content.

Table `passages`: rowid (int64, the id the backend's vectors/rows carry), id (the passage id),
doc_id, position, title, text, metadata (JSON), added_version, deleted_version (NULL while live).
The passages live at version V are those with added_version <= V and (deleted_version IS NULL or
deleted_version > V). A writer inserts rows and marks deletions for version V+1 before the
manifest names V+1, so readers at V never see them. Passage ids are unique among rows not yet
deleted (a partial unique index), so an upsert may insert the new row of an id while the old row
stays live for readers at V.

`recover(V)` undoes whatever a writer left behind past V: it deletes rows added after V and clears
deletions after V. `open` runs it with the manifest's version, which is how an ingest that died
before its manifest switch is rolled back.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DB_NAME = "passages.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    rowid INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    added_version INTEGER NOT NULL,
    deleted_version INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS passages_live_id ON passages(id) WHERE deleted_version IS NULL;
CREATE INDEX IF NOT EXISTS passages_doc ON passages(doc_id, position);
"""

_LIVE = "added_version <= ? AND (deleted_version IS NULL OR deleted_version > ?)"
_COLUMNS = "rowid, id, doc_id, position, title, text, metadata"
# SQLite's default limit on host parameters in one statement is 32766; stay well below.
_CHUNK = 900


@dataclass
class Passage:
    id: str
    doc_id: str
    position: int
    title: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)


def _row_to_passage(row: tuple) -> tuple[int, Passage]:
    rowid, pid, doc_id, position, title, text, metadata = row
    return rowid, Passage(pid, doc_id, position, title, text, json.loads(metadata))


def _chunks(items: list, size: int = _CHUNK) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class PassageStore:
    """Passages of one backend index; safe to share between threads."""

    def __init__(self, directory: Path | str, version: int) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path / DB_NAME, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        self.recover(version)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing ---------------------------------------------------------------------------

    def recover(self, version: int) -> None:
        """Rolls the table back to `version`: drops later additions, revives later deletions."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM passages WHERE added_version > ?", (version,))
            self._db.execute(
                "UPDATE passages SET deleted_version = NULL WHERE deleted_version > ?", (version,)
            )

    def stage(
        self, version: int, add: list[Passage], delete_rowids: Iterable[int]
    ) -> list[tuple[int, Passage]]:
        """Writes the changes of `version` (invisible until it is committed) in one transaction.

        Returns the new rows with their rowids. Deletions come first, so an upserted id may be
        inserted again in the same call.
        """
        delete_rowids = list(delete_rowids)
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for chunk in _chunks(delete_rowids):
                marks = ",".join("?" * len(chunk))
                self._db.execute(
                    f"UPDATE passages SET deleted_version = ? WHERE rowid IN ({marks})"
                    " AND deleted_version IS NULL",
                    (version, *chunk),
                )
            (start,) = self._db.execute("SELECT COALESCE(MAX(rowid), 0) + 1 FROM passages").fetchone()
            rows = [(start + i, p) for i, p in enumerate(add)]
            self._db.executemany(
                f"INSERT INTO passages ({_COLUMNS}, added_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (r, p.id, p.doc_id, p.position, p.title, p.text, json.dumps(p.metadata), version)
                    for r, p in rows
                ],
            )
        return rows

    def purge(self, before: int) -> None:
        """Forgets rows deleted at or before version `before` (no reader can still need them)."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM passages WHERE deleted_version <= ?", (before,))

    # -- reading at a version --------------------------------------------------------------

    def _query(self, sql: str, params: tuple) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def rowids_of_ids(self, version: int, ids: list[str]) -> dict[str, int]:
        """id -> rowid of the passages among `ids` that are live at `version`."""
        found: dict[str, int] = {}
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            for rowid, pid in self._query(
                f"SELECT rowid, id FROM passages WHERE id IN ({marks}) AND {_LIVE}",
                (*chunk, version, version),
            ):
                found[pid] = rowid
        return found

    def rowids_of_docs(self, version: int, doc_ids: list[str]) -> list[int]:
        found: list[int] = []
        for chunk in _chunks(doc_ids):
            marks = ",".join("?" * len(chunk))
            found += [
                r
                for (r,) in self._query(
                    f"SELECT rowid FROM passages WHERE doc_id IN ({marks}) AND {_LIVE}",
                    (*chunk, version, version),
                )
            ]
        return found

    def by_rowids(self, version: int, rowids: list[int]) -> dict[int, Passage]:
        found: dict[int, Passage] = {}
        for chunk in _chunks(rowids):
            marks = ",".join("?" * len(chunk))
            for row in self._query(
                f"SELECT {_COLUMNS} FROM passages WHERE rowid IN ({marks}) AND {_LIVE}",
                (*chunk, version, version),
            ):
                rowid, passage = _row_to_passage(row)
                found[rowid] = passage
        return found

    def continuation(self, version: int, passage: Passage) -> Passage | None:
        """The next passage of the same document (position + 1), if it is live at `version`."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM passages WHERE doc_id = ? AND position = ? AND {_LIVE} LIMIT 1",
            (passage.doc_id, passage.position + 1, version, version),
        )
        return _row_to_passage(rows[0])[1] if rows else None

    def rowids_matching(self, version: int, filters: Mapping[str, str]) -> set[int]:
        """Rowids of live passages whose metadata has every key of `filters` with that exact value."""
        sql = f"SELECT rowid FROM passages WHERE {_LIVE}"
        params: list = [version, version]
        for key, value in sorted(filters.items()):
            sql += " AND EXISTS (SELECT 1 FROM json_each(metadata) WHERE key = ? AND value = ?)"
            params += [key, value]
        return {r for (r,) in self._query(sql, tuple(params))}

    def count(self, version: int) -> int:
        (n,) = self._query(f"SELECT COUNT(*) FROM passages WHERE {_LIVE}", (version, version))[0]
        return n

    def count_documents(self, version: int) -> int:
        (n,) = self._query(f"SELECT COUNT(DISTINCT doc_id) FROM passages WHERE {_LIVE}", (version, version))[
            0
        ]
        return n
