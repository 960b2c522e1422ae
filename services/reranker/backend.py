"""The interface every reranker backend implements, and the registry of backends.

A backend instance is one loaded model. `rerank(query, texts)` orders all the texts for the query and
says how many did not fit the model's input (`rerank_many` does it for several calls at once, which the
service uses to batch concurrent calls); the service picks the top_k, maps errors to statuses and
builds the response. Backends are model code: they know nothing of gRPC or the protos and raise the
plain errors of `services.runtime.model_errors` (`ArtifactError` for a checkpoint that is missing or is
not a model of this backend). They are imported lazily (`backend_class`), and a backend never imports
another backend.
"""

from __future__ import annotations

import importlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from services.runtime.model_errors import ArtifactError
from services.runtime.models import resolve_model
from services.runtime.settings import RerankerSettings
from services.runtime.training import TRAIN_FILE

# name -> "module:Class"
BACKENDS: dict[str, str] = {
    "cross_encoder": "services.reranker.cross_encoder:CrossEncoderReranker",
    "first": "services.reranker.first:FirstReranker",
}


@dataclass(frozen=True)
class Ranking:
    """One call's candidates reordered: `order` holds candidate positions, best first, and `scores` the
    score of each (aligned with `order`); `truncated` candidates were cut to the model's input length;
    `timings` are (stage, milliseconds) of the work done."""

    order: list[int]
    scores: list[float]
    truncated: int
    timings: list[tuple[str, float]] = field(default_factory=list)


class RerankerModel(ABC):
    """A loaded checkpoint of one backend."""

    # The folder under <home>/models that holds the default checkpoint, and the command that writes it
    # (None while the backend has no trainer).
    DEFAULT_FOLDER: ClassVar[str]
    TRAIN_COMMAND: ClassVar[str | None]
    # A file every complete checkpoint folder holds (a trainer's checkpoints may come first).
    CHECKPOINT_FILE: ClassVar[str] = "config.json"
    # The weight of the retrieval scores in this model's final order (see `blend`) when a call names
    # none: what the checkpoint's trainer tuned on held-out queries (`trained_retrieval_weight`), else 0.
    retrieval_weight: float = 0.0
    # Whether a candidate's score depends on the others and their order (a listwise model).
    ORDER_SENSITIVE: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def configured_model(cls, settings: RerankerSettings) -> str | None:
        """The checkpoint settings name for this backend; None means DEFAULT_FOLDER."""

    @classmethod
    @abstractmethod
    def load(cls, name_or_path: str, settings: RerankerSettings) -> RerankerModel:
        """The checkpoint at a local path or hub id; ArtifactError if there is none or it is not a model
        of this backend."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Tokens of one model input; longer candidates are cut."""

    @abstractmethod
    def rerank(self, query: str, texts: Sequence[str]) -> Ranking:
        """Every text ordered by relevance to `query`, best first."""

    # Whether `rerank_many` scores several calls' candidates together (in shared forward passes), so
    # the service batches concurrent calls for it; otherwise it gains nothing and each call goes alone.
    BATCHES_CALLS: ClassVar[bool] = False

    def rerank_many(self, calls: Sequence[tuple[str, Sequence[str]]]) -> list[Ranking]:
        """`rerank` of each (query, texts), in order."""
        return [self.rerank(query, texts) for query, texts in calls]


@dataclass(frozen=True)
class ModelFiles:
    """A Hugging Face checkpoint to load: where from, whether from local files only, and its config."""

    path: str
    local_files_only: bool
    config: Any


def find_checkpoint(name_or_path: str, architectures: tuple[str, ...], kind: str) -> ModelFiles:
    """The checkpoint at a local path or hub id ("all-MiniLM-L6-v2" is the offline package's folder);
    ArtifactError when there is none, or when its config names no architecture ending in one of
    `architectures` (`kind` says what was expected, e.g. "a cross-encoder")."""
    from transformers import AutoConfig

    path = resolve_model(name_or_path)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    local_only = offline or Path(path).exists()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise ArtifactError(
            f"{name_or_path!r} is not a local folder or a reachable hub model ({err})"
        ) from err
    found = config.architectures or []
    if not any(a.endswith(architectures) for a in found):
        raise ArtifactError(
            f"{name_or_path!r} is not {kind}: its config names {', '.join(found) or 'no architecture'}"
        )
    return ModelFiles(path, local_only, config)


def trained_retrieval_weight(path: str) -> float:
    """The retrieval weight a ragfleet trainer recorded in the checkpoint folder's train.json; 0 for a
    checkpoint without one (a hub id, a model trained elsewhere)."""
    record = Path(path) / TRAIN_FILE
    if not record.is_file():
        return 0.0
    try:
        weight = float(json.loads(record.read_text()).get("retrieval_weight", 0.0))
    except (ValueError, TypeError, AttributeError) as err:
        raise ArtifactError(f"{record} is not a training record ({err})") from err
    if not 0.0 <= weight <= 1.0:
        raise ArtifactError(f"{record}: retrieval_weight must be between 0 and 1, got {weight}")
    return weight


def _scaled(values: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1]; all zeros when every value is the same."""
    span = float(values.max() - values.min())
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def blend(ranking: Ranking, retrieval: Sequence[float], weight: float) -> Ranking:
    """`ranking` reordered by (1 - weight) x its scores + weight x the candidates' `retrieval` scores
    (by candidate position), each min-max scaled over the candidates; ties keep the order of the side
    weighted more (the model's at 0.5), so weight 1 is exactly the retrieval order, ties and all.

    Interpolating a reranker's scores with the first stage's is the usual guard against a reranker that
    is weaker than its retrievers on some corpus: weight 1 is retrieval order, 0 the model's alone."""
    if weight == 0.0:
        return ranking
    order = np.asarray(ranking.order)
    model = np.empty(len(order))
    model[order] = ranking.scores
    mixed = (1.0 - weight) * _scaled(model) + weight * _scaled(np.asarray(retrieval, dtype=float))
    # Candidates come in retrieval order, so a candidate's position is its retrieval rank.
    tie_order = np.arange(len(order)) if weight > 0.5 else order
    ranked = tie_order[np.argsort(-mixed[tie_order], kind="stable")]
    return replace(ranking, order=ranked.tolist(), scores=mixed[ranked].tolist())


def backend_class(name: str) -> type[RerankerModel]:
    module_name, _, class_name = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
