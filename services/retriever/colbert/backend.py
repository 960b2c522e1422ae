"""ColBERT backend: token-level embeddings from a `ColbertEncoder`, searched in a `PlaidIndex`.

The spec of an index (fixed when it is created, kept in its manifest):
- `colbert_model`: a checkpoint path or id, default `settings.retriever.colbert_model`:
  "ragfleet-colbert", the trained default that ships with the project (MiniLM's top layer and a
  projection fine-tuned on SciFact's train split). "all-MiniLM-L6-v2" is MiniLM with an untrained
  projection (a baseline); a folder written by `ragfleet train colbert`, or any HF ColBERT checkpoint,
  is the user's own.
- `nbits`: bits per residual dimension, 1, 2 or 4; default `settings.retriever.colbert_nbits` (2).
  The ColBERT library defaults to 1; 2 bits (32 bytes per 128-d vector) stays closer to uncompressed
  MaxSim at twice the size.
- `doc_maxlen`: tokens kept per passage, 8 to 512; default `settings.retriever.colbert_doc_maxlen`
  (220, ColBERTv2's); longer passages are truncated when encoded.

Queries are encoded as ColBERT does: to the encoder's `query_maxlen` (32) tokens, longer queries
truncated (only their first 32 wordpieces count), shorter ones padded with [MASK]. The service caps
a query's length in characters (`limits.max_query_chars`) before that.

Search runs PLAID with the parameters of `SearchParams.for_k(k)`, each one the request's
SearchOptions sets replacing the default; `options.exhaustive` scores every passage with exact MaxSim
instead. Filters restrict both. The centroids and residual codec are trained on an index's first ingest;
passages added later are compressed with them, coarsely where their words are new to the codec, and
removed ones stay on disk as tombstones. `rebuild` (the Rebuild RPC) re-trains on the passages held and
rewrites them, as a fresh build would.

The encoder is loaded once per process for each (model, doc_maxlen, device) and shared by every index
and version using it: opening a version to write it must not reload the model.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from services.retriever.backend import Backend, Hits, Query, passage_text
from services.retriever.colbert.codec import NBITS
from services.retriever.colbert.encoder import ColbertEncoder
from services.retriever.colbert.plaid import PlaidIndex, SearchParams
from services.retriever.passages import Passage
from services.runtime.errors import failed_precondition, invalid_argument
from services.runtime.model_errors import ArtifactError, ParamError
from services.runtime.settings import Settings

MIN_DOC_MAXLEN = 8
MAX_DOC_MAXLEN = 512

_encoders: dict[tuple[str, int, str], ColbertEncoder] = {}
_encoders_lock = threading.Lock()


def load_encoder(model: str, doc_maxlen: int, device: str) -> ColbertEncoder:
    """The encoder for `model` with `doc_maxlen`, loaded once per process.

    A checkpoint that is missing or broken is FAILED_PRECONDITION; a doc_maxlen beyond the model's
    positions is INVALID_ARGUMENT naming `spec.doc_maxlen`.
    """
    key = (model, doc_maxlen, device)
    with _encoders_lock:
        encoder = _encoders.get(key)
        if encoder is None:
            try:
                encoder = ColbertEncoder.load(model, device=device, doc_maxlen=doc_maxlen)
            except ParamError as err:  # doc_maxlen is the only argument that comes from the request
                raise invalid_argument(f"spec.{err.field}", err.problem) from err
            except ArtifactError as err:
                raise failed_precondition(str(err)) from err
            _encoders[key] = encoder
        return encoder


class ColbertBackend(Backend):
    SEARCH_OPTIONS: ClassVar[frozenset[str]] = frozenset(
        ("exhaustive", "ncells", "centroid_score_threshold", "ndocs", "compressed_rerank")
    )

    def __init__(self, spec: dict[str, Any], settings: Settings, version_dir: Path | None) -> None:
        self.spec = spec
        self.batch_size = settings.retriever.batch_size
        self.encoder = load_encoder(spec["colbert_model"], spec["doc_maxlen"], settings.retriever.device)
        if version_dir is None:
            self.index = PlaidIndex.empty(self.encoder.dim, spec["nbits"])
        else:
            try:
                self.index = PlaidIndex.load(version_dir)
            except ArtifactError as err:
                raise failed_precondition(str(err)) from err

    @classmethod
    def resolve_spec(cls, spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
        # The dense-only fields of the shared IndexSpec (vector_store, faiss_index, model) are not
        # read here, so they are ignored.
        retriever = settings.retriever
        nbits = spec.get("nbits") or retriever.colbert_nbits
        if nbits not in NBITS:
            raise invalid_argument("spec.nbits", f"{nbits} is not one of {', '.join(map(str, NBITS))}")
        doc_maxlen = spec.get("doc_maxlen") or retriever.colbert_doc_maxlen
        if not MIN_DOC_MAXLEN <= doc_maxlen <= MAX_DOC_MAXLEN:
            raise invalid_argument(
                "spec.doc_maxlen", f"must be between {MIN_DOC_MAXLEN} and {MAX_DOC_MAXLEN}, got {doc_maxlen}"
            )
        return {
            "colbert_model": spec.get("colbert_model") or retriever.colbert_model,
            "nbits": nbits,
            "doc_maxlen": doc_maxlen,
        }

    @classmethod
    def open(
        cls, directory: Path, spec: dict[str, Any], settings: Settings, version_dir: Path | None
    ) -> ColbertBackend:
        return cls(spec, settings, version_dir)

    model_id = property(lambda self: self.encoder.model_id)
    dimension = property(lambda self: self.encoder.dim)

    def add(self, rows: Sequence[tuple[int, Passage]]) -> None:
        if rows:
            embeddings = self.encoder.encode_documents(
                [passage_text(p) for _, p in rows], batch_size=self.batch_size
            )
            self.index.add(np.asarray([r for r, _ in rows], dtype=np.int64), embeddings)

    def remove(self, rowids: Sequence[int]) -> None:
        self.index.remove(list(rowids))

    def search(self, query: Query) -> list[Hits]:
        options, k = query.options, query.k
        params = None
        if not options.exhaustive:
            tuned = {name: getattr(options, name) for name in options.set_fields()}
            params = dataclasses.replace(SearchParams.for_k(k), **tuned)
        encoded, lengths = self.encoder.encode_queries(list(query.texts))
        results: list[Hits] = []
        for q, length in zip(encoded, lengths.tolist()):
            if params is None:
                results.append(self.index.search_exhaustive(q[:length], k, allowed=query.allowed))
            else:
                results.append(self.index.search(q[:length], k, params, allowed=query.allowed))
        return results

    def rebuild(self) -> bool:
        if self.index.codec is None:  # nothing was ever added
            return False
        self.index.rebuild()
        return True

    def save(self, version_dir: Path) -> dict[str, Any]:
        return self.index.save(version_dir)
