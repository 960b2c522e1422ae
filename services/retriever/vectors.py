"""Vector stores, and the backend every "encoder -> normalised vectors -> store" retriever is.

`VectorBackend` is a retriever backend that encodes passages and queries into L2-normalised vectors
(so cosine similarity is the inner product) and keeps them in a `VectorStore`; a subclass gives only
its encoder (`encode`, `dimension`, `model_id`) and the spec field naming its model. The dense
(sentence-transformers) and mamba backends are two such subclasses. Two vector stores, chosen per
index by `spec.vector_store` (`resolve_store_spec`):

- "faiss": an `IndexIDMap2` (ids are passage rowids) over `IndexFlatIP` ("flat", exact),
  `IndexHNSWFlat` ("hnsw") or `IndexIVFFlat` ("ivf"; the index stays flat, hence exact, until it
  holds IVF_MIN_VECTORS vectors, then is trained once on what it holds). Saved with
  `faiss.write_index` into each version folder. Filtered searches are exact: an `IDSelectorBatch` on
  flat indexes, a brute-force scan of the allowed vectors on hnsw/ivf. HNSW and IVF cannot remove
  vectors in place, so a removal rebuilds them from the remaining vectors (IVF keeps its training).
- "chroma": one Chroma collection per version (cosine space, ids = rowid strings, our own
  embeddings, no Chroma embedding function), in an embedded `PersistentClient` under the index
  directory, or on `settings.retriever.chroma_host` through `HttpClient`. A new version copies the
  live collection's embeddings into a new collection and applies the changes there, so searches on
  the live one never see a half-written version; the version folder records the collection name.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.retriever.backend import Backend, Hits, Query, passage_text
from services.retriever.passages import Passage
from services.runtime.errors import invalid_argument
from services.runtime.settings import Settings

VECTOR_STORES = ("faiss", "chroma")
FAISS_INDEXES = ("flat", "ivf", "hnsw")
IVF_MIN_VECTORS = 4096
HNSW_M = 32
HNSW_EF_SEARCH = 128
IVF_NPROBE = 16


class VectorStore(ABC):
    """Vectors keyed by int64 rowid, searched by inner product."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    @abstractmethod
    def remove(self, ids: np.ndarray) -> None: ...

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, allowed: set[int] | None) -> list[Hits]: ...

    @abstractmethod
    def save(self, version_dir: Path) -> None: ...

    def discard(self, version_dir: Path) -> None:
        """Frees what the version saved in `version_dir` holds outside that folder."""

    def collect_garbage(self, live_version_dir: Path | None) -> None:
        """Frees leftovers of versions other than the live one."""


class FaissStore(VectorStore):
    FILE = "vectors.faiss"

    def __init__(self, kind: str, dimension: int, version_dir: Path | None) -> None:
        import faiss

        self._faiss = faiss
        self.kind = kind
        self.dimension = dimension
        if version_dir is None:
            self.index = faiss.IndexIDMap2(self._empty_inner())
        else:
            self.index = faiss.read_index(str(version_dir / self.FILE))
        self._tune()

    def _empty_inner(self):
        faiss = self._faiss
        if self.kind == "hnsw":
            return faiss.IndexHNSWFlat(self.dimension, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexFlatIP(self.dimension)

    def _inner(self):
        return self._faiss.downcast_index(self.index.index)

    def _tune(self) -> None:
        inner = self._inner()
        if isinstance(inner, self._faiss.IndexHNSW):
            inner.hnsw.efSearch = HNSW_EF_SEARCH
        elif isinstance(inner, self._faiss.IndexIVF):
            inner.nprobe = min(IVF_NPROBE, inner.nlist)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (rowid, vector) held, in storage order."""
        inner = self._inner()
        if isinstance(inner, self._faiss.IndexIVF):
            inner.make_direct_map()
        ids = self._faiss.vector_to_array(self.index.id_map).astype(np.int64)
        vectors = (
            inner.reconstruct_n(0, inner.ntotal) if len(ids) else np.zeros((0, self.dimension), np.float32)
        )
        return ids, vectors

    def _rebuild(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        inner = self._inner()
        if isinstance(inner, self._faiss.IndexIVF):
            fresh = self._faiss.clone_index(inner)
            fresh.reset()
        else:
            fresh = self._empty_inner()
        index = self._faiss.IndexIDMap2(fresh)
        if len(ids):
            index.add_with_ids(vectors, ids)
        self.index = index
        self._tune()

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(vectors, ids)
        inner = self._inner()
        if (
            self.kind == "ivf"
            and not isinstance(inner, self._faiss.IndexIVF)
            and len(self) >= IVF_MIN_VECTORS
        ):
            all_ids, all_vectors = self._all()
            nlist = max(1, int(np.sqrt(len(all_ids))))
            quantizer = self._faiss.IndexFlatIP(self.dimension)
            ivf = self._faiss.IndexIVFFlat(quantizer, self.dimension, nlist, self._faiss.METRIC_INNER_PRODUCT)
            ivf.train(all_vectors)
            index = self._faiss.IndexIDMap2(ivf)
            index.add_with_ids(all_vectors, all_ids)
            self.index = index
            self._tune()

    def remove(self, ids: np.ndarray) -> None:
        if isinstance(self._inner(), self._faiss.IndexFlat):
            self.index.remove_ids(self._faiss.IDSelectorBatch(ids.astype(np.int64)))
            return
        all_ids, vectors = self._all()
        keep = ~np.isin(all_ids, ids)
        self._rebuild(all_ids[keep], vectors[keep])

    def search(self, queries: np.ndarray, k: int, allowed: set[int] | None) -> list[Hits]:
        if len(self) == 0 or (allowed is not None and not allowed):
            return [[] for _ in range(len(queries))]
        if allowed is None:
            scores, ids = self.index.search(queries, min(k, len(self)))
        elif isinstance(self._inner(), self._faiss.IndexFlat):
            selector = self._faiss.IDSelectorBatch(np.fromiter(allowed, dtype=np.int64))
            params = self._faiss.SearchParameters(sel=selector)
            scores, ids = self.index.search(queries, min(k, len(allowed), len(self)), params=params)
        else:
            all_ids, vectors = self._all()
            mask = np.isin(all_ids, np.fromiter(allowed, dtype=np.int64))
            return _brute_force(queries, all_ids[mask], vectors[mask], k)
        return [
            [(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0]
            for row_ids, row_scores in zip(ids, scores)
        ]

    def save(self, version_dir: Path) -> None:
        self._faiss.write_index(self.index, str(version_dir / self.FILE))


def _brute_force(queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int) -> list[Hits]:
    results: list[Hits] = []
    scores = queries @ vectors.T if len(ids) else np.zeros((len(queries), 0), np.float32)
    for row in scores:
        order = sorted(range(len(ids)), key=lambda i: (-float(row[i]), int(ids[i])))[:k]
        results.append([(int(ids[i]), float(row[i])) for i in order])
    return results


class ChromaStore(VectorStore):
    FILE = "chroma.json"

    def __init__(self, directory: Path, settings: Settings, version_dir: Path | None) -> None:
        import chromadb
        from chromadb.config import Settings as ChromaSettings

        chroma_settings = ChromaSettings(anonymized_telemetry=False)
        if settings.retriever.chroma_host:
            self.client = chromadb.HttpClient(
                host=settings.retriever.chroma_host,
                port=settings.retriever.chroma_port,
                settings=chroma_settings,
            )
        else:
            self.client = chromadb.PersistentClient(path=str(directory / "chroma"), settings=chroma_settings)
        # Collections of this index are "<prefix><version folder>"; the prefix keeps indexes of
        # different tenants apart on a shared Chroma server.
        self.prefix = "rf-" + hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:16] + "-"
        self.collection = None
        if version_dir is not None:
            name = json.loads((version_dir / self.FILE).read_text("utf-8"))["collection"]
            self.collection = self.client.get_collection(name)
        self._added: dict[int, np.ndarray] = {}
        self._removed: set[int] = set()

    def __len__(self) -> int:
        held = self.collection.count() if self.collection is not None else 0
        return held + len(self._added) - len(self._removed)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        for i, v in zip(ids.tolist(), vectors):
            self._added[i] = v

    def remove(self, ids: np.ndarray) -> None:
        for i in ids.tolist():
            if self._added.pop(i, None) is None:
                self._removed.add(i)

    def search(self, queries: np.ndarray, k: int, allowed: set[int] | None) -> list[Hits]:
        count = self.collection.count() if self.collection is not None else 0
        if count == 0 or (allowed is not None and not allowed):
            return [[] for _ in range(len(queries))]
        restrict = [str(i) for i in sorted(allowed)] if allowed is not None else None
        n = min(k, count if allowed is None else len(allowed))
        found = self.collection.query(
            query_embeddings=queries, n_results=n, ids=restrict, include=["distances"]
        )
        return [
            [(int(i), 1.0 - float(d)) for i, d in zip(ids, distances)]
            for ids, distances in zip(found["ids"], found["distances"])
        ]

    def save(self, version_dir: Path) -> None:
        name = self.prefix + version_dir.name
        if name in self._names():  # left by a writer that died before committing this version
            self.client.delete_collection(name)
        target = self.client.create_collection(
            name, metadata={"hnsw:space": "cosine"}, embedding_function=None
        )
        batch = self.client.get_max_batch_size()
        if self.collection is not None:
            offset = 0
            while True:
                page = self.collection.get(limit=batch, offset=offset, include=["embeddings"])
                if not page["ids"]:
                    break
                offset += len(page["ids"])
                keep = [j for j, i in enumerate(page["ids"]) if int(i) not in self._removed]
                if keep:
                    target.add(
                        ids=[page["ids"][j] for j in keep],
                        embeddings=np.asarray(page["embeddings"])[keep],
                    )
        added = list(self._added.items())
        for start in range(0, len(added), batch):
            chunk = added[start : start + batch]
            target.add(ids=[str(i) for i, _ in chunk], embeddings=np.stack([v for _, v in chunk]))
        (version_dir / self.FILE).write_text(json.dumps({"collection": name}), "utf-8")
        self.collection = target
        self._added.clear()
        self._removed.clear()

    def _names(self) -> set[str]:
        return {c if isinstance(c, str) else c.name for c in self.client.list_collections()}

    def discard(self, version_dir: Path) -> None:
        name = self.prefix + version_dir.name
        if name in self._names():
            self.client.delete_collection(name)

    def collect_garbage(self, live_version_dir: Path | None) -> None:
        live = self.prefix + live_version_dir.name if live_version_dir is not None else None
        for name in self._names():
            if name.startswith(self.prefix) and name != live:
                self.client.delete_collection(name)


def resolve_store_spec(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The vector-store fields of a new index's spec (`vector_store`, and `faiss_index` for faiss) with
    the server's defaults filled in; INVALID_ARGUMENT naming the field for a value no store takes."""
    store = spec.get("vector_store") or settings.retriever.vector_store
    if store not in VECTOR_STORES:
        raise invalid_argument("spec.vector_store", f"{store!r} is not one of {', '.join(VECTOR_STORES)}")
    kind = spec.get("faiss_index") or settings.retriever.faiss_index
    if kind not in FAISS_INDEXES:
        raise invalid_argument("spec.faiss_index", f"{kind!r} is not one of {', '.join(FAISS_INDEXES)}")
    if store == "chroma" and spec.get("faiss_index"):
        raise invalid_argument("spec.faiss_index", "applies to the faiss vector store only")
    return {"vector_store": store, "faiss_index": kind} if store == "faiss" else {"vector_store": store}


def open_store(
    directory: Path, spec: dict[str, Any], settings: Settings, dimension: int, version_dir: Path | None
) -> VectorStore:
    """The store a resolved spec names, empty or as saved in `version_dir`."""
    if spec["vector_store"] == "chroma":
        return ChromaStore(directory, settings, version_dir)
    return FaissStore(spec["faiss_index"], dimension, version_dir)


class VectorBackend(Backend):
    """A backend of normalised text vectors in a vector store; subclasses provide the encoder.

    A subclass's constructor loads its encoder, then calls `open_vectors` (which needs `dimension`).
    """

    store: VectorStore

    def open_vectors(
        self, directory: Path, spec: dict[str, Any], settings: Settings, version_dir: Path | None
    ) -> None:
        self.spec = spec
        self.store = open_store(directory, spec, settings, self.dimension, version_dir)

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dimension) float32 C-contiguous L2-normalised vectors."""

    def add(self, rows: Sequence[tuple[int, Passage]]) -> None:
        if rows:
            ids = np.asarray([r for r, _ in rows], dtype=np.int64)
            self.store.add(ids, self.encode([passage_text(p) for _, p in rows]))

    def remove(self, rowids: Sequence[int]) -> None:
        if rowids:
            self.store.remove(np.asarray(list(rowids), dtype=np.int64))

    def search(self, query: Query) -> list[Hits]:
        return self.store.search(self.encode(query.texts), query.k, query.allowed)

    def save(self, version_dir: Path) -> dict[str, Any]:
        self.store.save(version_dir)
        return {"vectors": len(self.store), "dimension": self.dimension}

    def discard(self, version_dir: Path) -> None:
        self.store.discard(version_dir)

    def collect_garbage(self, live_version_dir: Path | None) -> None:
        self.store.collect_garbage(live_version_dir)
