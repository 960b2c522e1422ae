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

Batching. Each loaded model scores in a worker thread, one model call at a time (the model already uses
every core), and the calls that arrive meanwhile wait in its queue (`Batcher`). The cross-encoder
scores all waiting calls together, up to `reranker.batch_pairs` candidates in one `predict` (in batches
of `reranker.batch_size` pairs); FIRST takes them one by one. A queue in the service rather than Ray
Serve's `@serve.batch`: it batches the same way in every deployment mode (`ragfleet serve`, compose,
Ray Serve), and `python -m bench.rerank --only batching,serve_batch` measures it against one call at a time
and, inside a Serve replica, against `@serve.batch`. The time a call waited is its `rerank.queue`
timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from ragfleet.v1 import common_pb2, reranker_pb2
from services.reranker.backend import BACKENDS, Ranking, RerankerModel, backend_class, blend
from services.runtime import validation
from services.runtime.context import CallContext
from services.runtime.errors import failed_precondition, invalid_argument
from services.runtime.model_errors import ArtifactError
from services.runtime.settings import Settings

Stamp = tuple[tuple[str, int, int], ...]


@dataclass
class _Call:
    query: str
    texts: list[str]
    done: asyncio.Future[Ranking]
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """The calls waiting for one model, scored one model call at a time in a worker thread.

    Calls that arrive while the model is busy wait in a queue; when it is free, a backend that scores
    several calls together (`BATCHES_CALLS`) takes every waiting call, up to `max_pairs` candidates
    (the first call goes in whatever its size), in one `rerank_many`; any other takes them one by one.
    So no call waits for a batch to fill: a lone call is scored at once, and under load the batches
    grow by themselves. A call cancelled while it waits is dropped from the queue.
    """

    def __init__(self, model: RerankerModel, max_pairs: int) -> None:
        self.model = model
        self.max_pairs = max_pairs if model.BATCHES_CALLS else 0
        self._queue: deque[_Call] = deque()
        # The task scoring the queue while it is not empty (referenced, so not garbage-collected).
        self._drainer: asyncio.Task[None] | None = None

    async def rank(self, query: str, texts: list[str]) -> Ranking:
        call = _Call(query, texts, asyncio.get_running_loop().create_future())
        self._queue.append(call)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())
        ranking = await call.done
        queued = (time.perf_counter() - call.queued) * 1000 - sum(ms for _, ms in ranking.timings)
        return replace(ranking, timings=[("rerank.queue", max(0.0, queued)), *ranking.timings])

    def _next_batch(self) -> list[_Call]:
        batch: list[_Call] = []
        pairs = 0
        while self._queue:
            call = self._queue[0]
            if call.done.done():  # cancelled while it waited
                self._queue.popleft()
                continue
            if batch and pairs + len(call.texts) > self.max_pairs:
                break
            batch.append(self._queue.popleft())
            pairs += len(call.texts)
        return batch

    async def _drain(self) -> None:
        while batch := self._next_batch():
            try:
                rankings = await asyncio.to_thread(
                    self.model.rerank_many, [(call.query, call.texts) for call in batch]
                )
            except Exception as err:  # each waiting call gets the error (a ServiceError too)
                for call in batch:
                    if not call.done.done():
                        call.done.set_exception(err)
                continue
            for call, ranking in zip(batch, rankings, strict=True):
                if not call.done.done():
                    call.done.set_result(ranking)


@dataclass
class _Loaded:
    model: RerankerModel
    model_id: str
    stamp: Stamp
    batcher: Batcher


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
                model = self._load(cls, name, requested)
                batcher = Batcher(model, self.config.batch_pairs)
                loaded = _Loaded(model, _model_id(backend, name, stamp), stamp, batcher)
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
        asked_weight = request.HasField("retrieval_weight")
        if asked_weight:
            validation.weight(request.retrieval_weight, "retrieval_weight")

        start = time.perf_counter()
        loaded = await asyncio.to_thread(self.model, backend, request.model)
        load_ms = (time.perf_counter() - start) * 1000
        ranking = await loaded.batcher.rank(query, texts)
        weight = request.retrieval_weight if asked_weight else loaded.model.retrieval_weight
        ranking = blend(ranking, [c.score for c in request.candidates], weight)
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
            retrieval_weight=weight,
        )
