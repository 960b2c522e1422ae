"""The interface every retriever backend implements, and the registry of backends.

A backend holds the search structure of one index at one version. The service never mutates the
instance searches are using: a writer opens a fresh instance from the live version's folder
(copy-on-write), applies `add` / `remove`, `save`s it into a new version folder and only then, after
the manifest switch, swaps it in. Rowids are the passage store's int64 rowids; the backend knows
nothing of passage ids, versions or metadata.

Backends are imported lazily (`backend_class`), so a bm25-only process never imports torch, and a
backend never imports another backend.

Search options (`SearchOptions`) tune approximate backends. A backend names the options it uses in
`SEARCH_OPTIONS`; the service rejects any other option that is set, so backends never see one they
ignore.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from services.retriever.passages import Passage
from services.runtime.settings import Settings

# name -> "module:Class"
BACKENDS: dict[str, str] = {
    "dense": "services.retriever.dense:DenseBackend",
    "bm25": "services.retriever.bm25:BM25Backend",
    "colbert": "services.retriever.colbert.backend:ColbertBackend",
    "mamba": "services.retriever.mamba.backend:MambaBackend",
    "seal": "services.retriever.seal.backend:SealBackend",
}

# (rowid, score) per hit; a backend that reports highlights adds its matches: (rowid, score, matches),
# which the service hands back to `Backend.highlights` with the hit's passage.
Hits = list[tuple[int, float] | tuple[int, float, Any]]


@dataclass(frozen=True)
class Span:
    """A highlighted character span [start, end) of a passage's text and the weight of its match."""

    start: int
    end: int
    score: float


@dataclass(frozen=True)
class SearchOptions:
    """SearchOptions of retriever.proto; zero values mean the backend's default for the top_k."""

    exhaustive: bool = False
    ncells: int = 0
    centroid_score_threshold: float = 0.0
    ndocs: int = 0
    compressed_rerank: bool = False
    beam: int = 0
    ngram_length: int = 0

    def set_fields(self) -> list[str]:
        """Names of the options that differ from their defaults."""
        return [f.name for f in fields(self) if getattr(self, f.name) != f.default]


@dataclass(frozen=True)
class Query:
    """One search call to a backend: the query texts, hits wanted per text, the rowids a filter allows
    (None: every passage) and the options (only fields the backend names in SEARCH_OPTIONS are set)."""

    texts: Sequence[str]
    k: int
    allowed: set[int] | None = None
    options: SearchOptions = SearchOptions()


class Backend(ABC):
    """One backend index at one version."""

    # The SearchOptions fields this backend uses.
    SEARCH_OPTIONS: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    @abstractmethod
    def resolve_spec(cls, spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
        """The full spec of a new index: `spec`'s fields (IndexSpec names) with defaults filled in.

        Raises ServiceError (INVALID_ARGUMENT naming `spec.<field>`) for values this backend rejects.
        """

    @classmethod
    @abstractmethod
    def open(
        cls, directory: Path, spec: dict[str, Any], settings: Settings, version_dir: Path | None
    ) -> Backend:
        """The index saved in `version_dir`, or an empty one when it is None.

        `directory` is the backend index directory (`.../<index>/<backend>/`), `spec` a resolved spec.
        """

    @property
    @abstractmethod
    def model_id(self) -> str: ...

    @property
    @abstractmethod
    def dimension(self) -> int:
        """Embedding dimension; 0 for sparse backends."""

    @abstractmethod
    def add(self, rows: Sequence[tuple[int, Passage]]) -> None: ...

    @abstractmethod
    def remove(self, rowids: Sequence[int]) -> None: ...

    @abstractmethod
    def search(self, query: Query) -> list[Hits]:
        """Top-k (rowid, score) per query text, best first; only rowids in `query.allowed` when given."""

    def highlights(self, passage: Passage, matches: Any = None) -> list[Span]:
        """The character spans of `passage.text` a hit matched, from the matches `search` gave it; none
        for backends that report no matches (this default)."""
        return []

    def rebuild(self) -> bool:
        """Rebuilds the search structure from the vectors the index holds, as a fresh build would make
        it; returns False when that would change nothing, as for exact backends (this default)."""
        return False

    @abstractmethod
    def save(self, version_dir: Path) -> dict[str, Any]:
        """Writes this index into the (new, empty) `version_dir`; returns facts for the manifest."""

    def discard(self, version_dir: Path) -> None:
        """Frees what the version in `version_dir` holds outside that folder (the folder itself is
        removed by the caller)."""

    def collect_garbage(self, live_version_dir: Path | None) -> None:
        """Frees leftovers of versions other than the live one (after a crash), outside folders."""


def backend_class(name: str) -> type[Backend]:
    module_name, _, class_name = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def passage_text(passage: Passage) -> str:
    """What backends index: the title and the text."""
    return f"{passage.title} {passage.text}" if passage.title else passage.text
