"""The Reranker service: reorders a query's candidate passages with one of the backends.

Models. A call names its backend (`backend`, else `reranker.backend`) and may name a checkpoint
(`model`: a local path or hub id). Without one the backend's default is used: the checkpoint settings
name (`reranker.cross_encoder_model`), else `<home>/models/<backend's folder>`, which the backend's
train command (`ragfleet train cross-encoder`) writes. A checkpoint in a local folder is loaded on first
use and again whenever its files change, so a fleet started before training picks the model up without a
restart; at most `reranker.max_loaded_models` stay loaded, the least recently used dropped first.

Errors. A field the caller got wrong is INVALID_ARGUMENT naming it: an empty query, no candidates or
more than `reranker.max_candidates`, a candidate without text, top_k outside 1..candidates, an unknown
backend, a `model` that does not exist or is not a model of the backend. A default model that was never
trained, or cannot be loaded, is FAILED_PRECONDITION naming the command that trains it.

Scoring runs in a worker thread, one call per loaded model at a time: the model already uses every core.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ragfleet.v1 import common_pb2, reranker_pb2
from services.reranker.backend import BACKENDS, Ranking, RerankerModel, backend_class
from services.runtime import validation
from services.runtime.context import CallContext
from services.runtime.errors import failed_precondition, invalid_argument
from services.runtime.model_errors import ArtifactError
from services.runtime.settings import Settings

Stamp = tuple[tuple[str, int, int], ...]


@dataclass
class _Loaded:
    model: RerankerModel
    model_id: str
    stamp: Stamp
    # Held while the model scores: one call at a time per model.
    busy: threading.Lock = field(default_factory=threading.Lock)


def _stamp(path: Path) -> Stamp:
    """(name, mtime_ns, size) of a local checkpoint folder's files; () for a hub id."""
    if not path.is_dir():
        return ()
    return tuple(
        (entry.name, stat.st_mtime_ns, stat.st_size)
        for entry in sorted(path.iterdir())
        if entry.is_file() and (stat := entry.stat())
    )


def _model_id(backend: str, name: str, stamp: Stamp) -> str:
    if not stamp:
        return f"{backend}:{name}"
    return f"{backend}:{name}@{hashlib.sha256(repr(stamp).encode()).hexdigest()[:10]}"


def passage_text(passage: common_pb2.Passage) -> str:
    """What is scored: the title and the text, as the retrievers index them."""
    return f"{passage.title} {passage.text}" if passage.title else passage.text


class RerankerService:
    """The Reranker RPC as a plain async method; server adapters map ServiceError to a status."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = settings.reranker
        self.limits = settings.limits
        if self.config.backend not in BACKENDS:
            raise ValueError(f"reranker.backend: {self.config.backend!r} is not one of {sorted(BACKENDS)}")
        self._models: OrderedDict[tuple[str, str], _Loaded] = OrderedDict()
        self._load_lock = threading.Lock()

    # -- models --------------------------------------------------------------------------

    def model(self, backend: str, requested: str = "") -> _Loaded:
        """The loaded checkpoint a call asks for (blocking: call it in a thread)."""
        cls = backend_class(backend)
        name = requested or cls.configured_model(self.config)
        if not name:
            folder = Path(self.settings.home) / "models" / cls.DEFAULT_FOLDER
            if not (folder / cls.CHECKPOINT_FILE).is_file():
                fix = f"train one with `{cls.TRAIN_COMMAND}` or set" if cls.TRAIN_COMMAND else "set"
                raise failed_precondition(f"no {backend} model at {folder}; {fix} reranker.{backend}_model")
            name = str(folder)
        path = Path(name).expanduser()
        key = (backend, name)
        with self._load_lock:
            stamp = _stamp(path)
            loaded = self._models.get(key)
            if loaded is None or loaded.stamp != stamp:
                loaded = _Loaded(self._load(cls, name, requested), _model_id(backend, name, stamp), stamp)
                self._models[key] = loaded
            self._models.move_to_end(key)
            while len(self._models) > max(1, self.config.max_loaded_models):
                self._models.popitem(last=False)
            return loaded

    def _load(self, cls: type[RerankerModel], name: str, requested: str) -> RerankerModel:
        try:
            return cls.load(name, self.config)
        except ArtifactError as err:
            if requested:
                raise invalid_argument("model", str(err)) from err
            fix = f"retrain it with `{cls.TRAIN_COMMAND}`" if cls.TRAIN_COMMAND else "fix reranker settings"
            raise failed_precondition(f"the default reranker model cannot be used: {err}; {fix}") from err

    # -- the RPC -------------------------------------------------------------------------

    async def Rerank(
        self, request: reranker_pb2.RerankRequest, ctx: CallContext
    ) -> reranker_pb2.RerankResponse:
        backend = request.backend or self.config.backend
        if backend not in BACKENDS:
            raise invalid_argument("backend", f"{backend!r} is not one of {', '.join(sorted(BACKENDS))}")
        query = validation.query(request.query, "query", self.limits)
        validation.candidates(request.candidates, "candidates", self.limits, self.config.max_candidates)
        top_k = validation.top_k_of(request.top_k, "top_k", len(request.candidates), "candidates")
        texts = [passage_text(c.passage) for c in request.candidates]

        start = time.perf_counter()
        loaded = await asyncio.to_thread(self.model, backend, request.model)
        load_ms = (time.perf_counter() - start) * 1000
        ranking = await asyncio.to_thread(_rank, loaded, query, texts)
        results = []
        for rank, (i, score) in enumerate(zip(ranking.order[:top_k], ranking.scores), start=1):
            result = common_pb2.ScoredPassage()
            result.CopyFrom(request.candidates[i])
            result.score, result.rank, result.retriever = score, rank, backend
            results.append(result)
        timings = [common_pb2.Timing(stage="rerank.load", millis=load_ms)]
        timings += [common_pb2.Timing(stage=stage, millis=ms) for stage, ms in ranking.timings]
        return reranker_pb2.RerankResponse(
            results=results,
            model_id=loaded.model_id,
            timings=timings,
            truncated=ranking.truncated,
            max_length=loaded.model.max_length,
            backend=backend,
        )


def _rank(loaded: _Loaded, query: str, texts: list[str]) -> Ranking:
    with loaded.busy:
        return loaded.model.rerank(query, texts)
