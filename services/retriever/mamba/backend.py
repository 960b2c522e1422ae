"""Mamba backend: a `MambaEncoder` (model.py) over the shared vector stores (`vectors.VectorBackend`).

It differs from the dense backend only in its encoder. The spec of an index (fixed when it is created):
- `mamba_model`: a checkpoint folder; default `settings.retriever.mamba_model`, else
  `<home>/models/mamba`, where `ragfleet train mamba` writes. Until a model is there, creating an index
  is FAILED_PRECONDITION saying to run that command.
- `vector_store` / `faiss_index`: as for dense.

Passages and queries are encoded whole, however long (in windows, the scan state carried), up to
`settings.retriever.mamba_max_tokens` tokens; a longer one is INVALID_ARGUMENT naming it
(`passages[i].text`, `query` or `queries[i]`). The encoder is loaded once per process for each
(folder, weights file stamp, device, max_tokens): a retrained model at the same folder is reloaded.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.retriever.backend import Hits, Query
from services.retriever.mamba.model import WEIGHTS_FILE, MambaEncoder
from services.retriever.passages import Passage
from services.retriever.vectors import VectorBackend, resolve_store_spec
from services.runtime.errors import failed_precondition, invalid_argument
from services.runtime.model_errors import ArtifactError, ParamError
from services.runtime.settings import Settings

DEFAULT_FOLDER = "mamba"
TRAIN_COMMAND = "ragfleet train mamba"

_encoders: dict[tuple[str, int, str, int], MambaEncoder] = {}
_encoders_lock = threading.Lock()


def default_model(settings: Settings) -> str:
    """The checkpoint of a new index whose spec names none."""
    return settings.retriever.mamba_model or str(Path(settings.home) / "models" / DEFAULT_FOLDER)


def load_encoder(folder: str, settings: Settings) -> MambaEncoder:
    """The encoder at `folder`, loaded once per process; FAILED_PRECONDITION when it is missing or broken."""
    path = Path(folder).expanduser()
    if not (path / WEIGHTS_FILE).is_file():
        raise failed_precondition(
            f"no mamba model at {path}; train one with `{TRAIN_COMMAND}` or set retriever.mamba_model"
        )
    retriever = settings.retriever
    key = (str(path), (path / WEIGHTS_FILE).stat().st_mtime_ns, retriever.device, retriever.mamba_max_tokens)
    with _encoders_lock:
        encoder = _encoders.get(key)
        if encoder is None:
            try:
                encoder = MambaEncoder.load(
                    path, device=retriever.device, max_tokens=retriever.mamba_max_tokens
                )
            except ArtifactError as err:
                raise failed_precondition(str(err)) from err
            _encoders[key] = encoder
        return encoder


def _text_index(err: ParamError) -> int:
    """i of the encoder's "texts[i]"."""
    return int(err.field.removeprefix("texts[").removesuffix("]"))


class MambaBackend(VectorBackend):
    def __init__(
        self, directory: Path, spec: dict[str, Any], settings: Settings, version_dir: Path | None
    ) -> None:
        self.batch_size = settings.retriever.batch_size
        self.encoder = load_encoder(spec["mamba_model"], settings)
        self.open_vectors(directory, spec, settings, version_dir)

    @classmethod
    def resolve_spec(cls, spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
        # The fields of other retrievers in the shared IndexSpec (model, colbert_model, nbits,
        # doc_maxlen) are not read here, so they are ignored.
        return resolve_store_spec(spec, settings) | {
            "mamba_model": spec.get("mamba_model") or default_model(settings)
        }

    @classmethod
    def open(
        cls, directory: Path, spec: dict[str, Any], settings: Settings, version_dir: Path | None
    ) -> MambaBackend:
        return cls(directory, spec, settings, version_dir)

    @property
    def model_id(self) -> str:
        return self.spec["mamba_model"]

    @property
    def dimension(self) -> int:
        return self.encoder.dimension

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(texts, batch_size=self.batch_size)

    def add(self, rows: Sequence[tuple[int, Passage]]) -> None:
        try:
            super().add(rows)
        except ParamError as err:
            raise invalid_argument(f"passages[{_text_index(err)}].text", err.problem) from err

    def search(self, query: Query) -> list[Hits]:
        try:
            return super().search(query)
        except ParamError as err:
            field = "query" if len(query.texts) == 1 else f"queries[{_text_index(err)}]"
            raise invalid_argument(field, err.problem) from err
