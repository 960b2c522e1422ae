"""Dense backend: a sentence-transformers encoder over the shared vector stores (`vectors.py`).

The encoder is `settings.retriever.model` unless the index spec names a model; the resolved name is
fixed in the manifest when the index is created. Embeddings are L2-normalised, so cosine similarity
is the inner product; the store (faiss or chroma, `spec.vector_store`) is `vectors.VectorBackend`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.retriever.vectors import VectorBackend, resolve_store_spec
from services.runtime.errors import failed_precondition
from services.runtime.models import load_sentence_transformer, model_id
from services.runtime.settings import Settings


class DenseBackend(VectorBackend):
    def __init__(
        self, directory: Path, spec: dict[str, Any], settings: Settings, version_dir: Path | None
    ) -> None:
        self.batch_size = settings.retriever.batch_size
        try:
            self.encoder = load_sentence_transformer(spec["model"], settings.retriever.device)
        except Exception as exc:  # a missing or broken checkpoint is the server's state, not bad input
            raise failed_precondition(f"cannot load model {spec['model']!r}: {exc}") from exc
        self._dimension = int(self.encoder.get_embedding_dimension())
        self.open_vectors(directory, spec, settings, version_dir)

    @classmethod
    def resolve_spec(cls, spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
        # The fields of other retrievers in the shared IndexSpec (colbert_model, nbits, doc_maxlen,
        # mamba_model) are not read here, so they are ignored.
        return resolve_store_spec(spec, settings) | {"model": spec.get("model") or settings.retriever.model}

    @classmethod
    def open(
        cls, directory: Path, spec: dict[str, Any], settings: Settings, version_dir: Path | None
    ) -> DenseBackend:
        return cls(directory, spec, settings, version_dir)

    @property
    def model_id(self) -> str:
        return model_id(self.spec["model"])

    @property
    def dimension(self) -> int:
        return self._dimension

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self.encoder.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), self._dimension)
