"""The Generator service: Retro answers, streamed token by token, retrieving again every chunk.

`GenerateStream` turns a question and the Pipeline's passages into a Retro prompt (`retro.data`) and
decodes it (`retro.decode.generate`) in a worker thread, so the event loop keeps serving other calls; text
pieces come back through a queue as GenerateEvent{token}, and the stream ends with GenerateEvent{done}
(text, citations, finish reason, timings, model id). `Generate` is the same call collected into one reply.

Per-chunk retrieval. When the request's RetrievalSpec names an index, each completed chunk of 64 generated
tokens is a query to the configured Retriever (`generator.retriever`, the dense one by default) through the
ragfleet stubs, on behalf of the caller (its tenant token and deadline are forwarded). The search keeps the
spec's filters, and its options when the spec names that retriever or none; it asks for the model's
neighbour count with continuations. The index is checked once before decoding starts, so an unknown index
fails fast with NOT_FOUND.

The checkpoint (`generator.model`, default `<home>/models/retro`, written by `ragfleet train retro`) is
loaded on first use and again whenever its files change, so a fleet started before training picks the
model up without a restart. Its tokenizer is the one its folder holds (written by a vocabulary cut,
`retro.vocab`), else the one named in its train.json, else `generator.tokenizer`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import grpc
from safetensors import SafetensorError
from transformers import PreTrainedTokenizerBase

from ragfleet.v1 import common_pb2, generator_pb2, retriever_pb2, retriever_pb2_grpc
from services.generator.retro.data import load_tokenizer, prompt_ids
from services.generator.retro.decode import (
    DecodeEvent,
    DecodeParams,
    DecodeResult,
    Neighbour,
    Retrieve,
    generate,
)
from services.generator.retro.model import CONFIG_FILE, WEIGHTS_FILE, RetroModel
from services.generator.retro.train import TRAIN_FILE
from services.generator.retro.vocab import checkpoint_tokenizer
from services.runtime import validation
from services.runtime.context import CallContext
from services.runtime.errors import failed_precondition, invalid_argument
from services.runtime.model_errors import ParamError
from services.runtime.remote import Remote, relay
from services.runtime.settings import Settings

# Seconds a call to the Retriever may take when the caller sent no deadline.
RETRIEVE_TIMEOUT = 30.0


@dataclass(frozen=True)
class LoadedModel:
    model: RetroModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    # (mtime_ns, size) of the checkpoint's files when they were read.
    stamp: tuple[tuple[int, int], ...]


def _neighbour(p: common_pb2.ScoredPassage) -> Neighbour:
    return Neighbour(p.passage.id, p.passage.doc_id, p.passage.title, p.passage.text, p.continuation.text)


@lru_cache(maxsize=4)
def _tokenizer(name: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(name)


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:12]


class _Finished:
    """Marks the end of the worker's events; carries its exception when it failed."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class GeneratorService:
    """The Generator RPCs as plain async methods; server adapters map ServiceError to a status."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = settings.generator
        self.checkpoint = (
            Path(self.config.model) if self.config.model else Path(settings.home) / "models" / "retro"
        )
        self._loaded: LoadedModel | None = None
        self._load_lock = threading.Lock()
        self._retriever: Remote | None = None

    # -- the checkpoint ------------------------------------------------------------------

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        try:
            stats = [(self.checkpoint / name).stat() for name in (CONFIG_FILE, WEIGHTS_FILE)]
        except FileNotFoundError:
            raise failed_precondition(
                f"no Retro checkpoint at {self.checkpoint} ({CONFIG_FILE} and {WEIGHTS_FILE}); "
                "train one with `ragfleet train retro` or set generator.model"
            ) from None
        return tuple((s.st_mtime_ns, s.st_size) for s in stats)

    def model(self) -> LoadedModel:
        """The checkpoint's model, loaded now if it is new or its files changed (blocking: use a thread)."""
        stamp = self._stamp()
        with self._load_lock:
            if self._loaded is None or self._loaded.stamp != stamp:
                self._loaded = self._load(stamp)
            return self._loaded

    def _load(self, stamp: tuple[tuple[int, int], ...]) -> LoadedModel:
        try:
            model = RetroModel.load(self.checkpoint, self.config.device).eval()
            fingerprint = _fingerprint(self.checkpoint / WEIGHTS_FILE)
            record = self.checkpoint / TRAIN_FILE
            name = self.config.tokenizer
            if record.is_file():
                name = json.loads(record.read_text()).get("tokenizer", name)
            tokenizer = checkpoint_tokenizer(self.checkpoint)
        except (OSError, ValueError, SafetensorError) as err:
            raise failed_precondition(
                f"the Retro checkpoint at {self.checkpoint} cannot be loaded ({err}); "
                "retrain it with `ragfleet train retro`"
            ) from err
        if tokenizer is None:
            tokenizer = _tokenizer(name)
        else:
            name = str(self.checkpoint)
        if model.config.vocab_size < len(tokenizer) or model.config.pad_token_id != tokenizer.pad_token_id:
            raise failed_precondition(
                f"the Retro checkpoint at {self.checkpoint} does not match tokenizer {name!r} "
                f"(vocab {model.config.vocab_size} vs {len(tokenizer)}, pad id {model.config.pad_token_id} "
                f"vs {tokenizer.pad_token_id})"
            )
        return LoadedModel(model, tokenizer, f"retro:{self.checkpoint}@{fingerprint}", stamp)

    # -- requests ------------------------------------------------------------------------

    def _params(self, params: common_pb2.GenerationParams) -> DecodeParams:
        limit = self.config.max_tokens_limit
        if params.max_tokens < 0 or params.max_tokens > limit:
            raise invalid_argument(
                "params.max_tokens",
                f"must be between 1 and {limit} (0 means {self.config.default_max_tokens})"
                f", got {params.max_tokens}",
            )
        try:
            return DecodeParams(
                max_tokens=params.max_tokens or self.config.default_max_tokens,
                temperature=params.temperature,
                top_p=params.top_p or 1.0,  # 0: unset
                seed=params.seed if params.HasField("seed") else None,
                stop=tuple(params.stop),
            )
        except ParamError as err:
            raise invalid_argument(f"params.{err.field}", err.problem) from None

    def _chunk_search(self, spec: common_pb2.RetrievalSpec, k: int) -> retriever_pb2.SearchRequest:
        """The Retriever request each chunk's search fills in with its text (a checked spec)."""
        request = retriever_pb2.SearchRequest(
            index=spec.index, top_k=k, filters=spec.filters, with_continuation=True
        )
        if not spec.retrievers or self.config.retriever_backend in spec.retrievers:
            request.options.CopyFrom(spec.options)
        return request

    def _remote(self) -> Remote:
        # Made on first use: a grpc.aio channel belongs to the event loop that serves calls.
        if self._retriever is None:
            self._retriever = Remote(
                self.config.retriever,
                retriever_pb2_grpc.RetrieverStub,
                retriever=self.config.retriever_backend,
                require_token=bool(self.settings.auth.tokens),
            )
        return self._retriever

    def _timeout(self, ctx: CallContext) -> float:
        return ctx.timeout(RETRIEVE_TIMEOUT)

    async def _check_index(self, index: str, ctx: CallContext) -> None:
        remote = self._remote()
        await remote.check_closed(min(self._timeout(ctx), 5.0))
        try:
            await remote.stub.DescribeIndex(
                retriever_pb2.DescribeIndexRequest(index=index),
                metadata=remote.metadata(ctx),
                timeout=self._timeout(ctx),
            )
        except grpc.aio.AioRpcError as err:
            raise relay(err, "retriever") from err

    async def _search(
        self, query: str, request: retriever_pb2.SearchRequest, ctx: CallContext
    ) -> list[Neighbour]:
        remote = self._remote()
        await remote.check_closed(min(self._timeout(ctx), 5.0))
        search = retriever_pb2.SearchRequest()
        search.CopyFrom(request)
        search.query = query
        try:
            found = await remote.stub.Search(
                search, metadata=remote.metadata(ctx), timeout=self._timeout(ctx)
            )
        except grpc.aio.AioRpcError as err:
            raise relay(err, "retriever") from err
        return [_neighbour(r) for r in found.results]

    def _retrieve(
        self, request: retriever_pb2.SearchRequest, ctx: CallContext, loop: asyncio.AbstractEventLoop
    ) -> Retrieve:
        """A blocking `retrieve(chunk text)` for the decoding thread; the search runs on the event loop."""

        def retrieve(text: str) -> list[Neighbour]:
            return asyncio.run_coroutine_threadsafe(self._search(text, request, ctx), loop).result()

        return retrieve

    # -- RPCs ----------------------------------------------------------------------------

    async def Generate(
        self, request: generator_pb2.GenerateRequest, ctx: CallContext
    ) -> generator_pb2.GenerateResponse:
        events = [event async for event in self.GenerateStream(request, ctx)]
        return events[-1].done  # the stream always ends with its done event

    async def GenerateStream(
        self, request: generator_pb2.GenerateRequest, ctx: CallContext
    ) -> AsyncIterator[generator_pb2.GenerateEvent]:
        limits = self.settings.limits
        validation.query(request.question, "question", limits)
        params = self._params(request.params)
        spec = request.retrieval
        if spec.index:
            validation.name(spec.index, "retrieval.index", limits)
            validation.search_options(spec.options, "retrieval.options")
            await self._check_index(spec.index, ctx)
        loaded = await asyncio.to_thread(self.model)
        k = loaded.model.config.num_neighbours
        try:
            prompt = prompt_ids(loaded.tokenizer, request.question, loaded.model.config.chunk_size)
        except ValueError as err:
            raise invalid_argument("question", str(err).removeprefix("question: ")) from None
        first = [_neighbour(p) for p in request.context]
        loop = asyncio.get_running_loop()
        retrieve = self._retrieve(self._chunk_search(spec, k), ctx, loop) if spec.index else None

        def decode() -> Iterator[DecodeEvent]:
            return generate(loaded.model, loaded.tokenizer, prompt, first, retrieve, params)

        async for event in _in_thread(decode):
            if isinstance(event, DecodeResult):
                yield generator_pb2.GenerateEvent(done=_response(event, loaded.model_id))
            else:
                yield generator_pb2.GenerateEvent(token=event)


def _response(result: DecodeResult, model_id: str) -> generator_pb2.GenerateResponse:
    return generator_pb2.GenerateResponse(
        text=result.text,
        citations=[
            generator_pb2.Citation(passage_id=c.passage_id, doc_id=c.doc_id, weight=c.weight, title=c.title)
            for c in result.citations
        ],
        model_id=model_id,
        timings=[common_pb2.Timing(stage=stage, millis=ms) for stage, ms in result.timings.items()],
        finish_reason=result.finish_reason,
    )


async def _in_thread(events: Callable[[], Iterator[DecodeEvent]]) -> AsyncIterator[DecodeEvent]:
    """Runs the blocking iterator `events()` in a worker thread and yields its items on the event loop.

    When the consumer stops early (the client went away), the worker stops at its next item.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[DecodeEvent | _Finished] = asyncio.Queue()
    stop = threading.Event()

    def work() -> None:
        finished = _Finished()
        try:
            for event in events():
                if stop.is_set():
                    return
                loop.call_soon_threadsafe(queue.put_nowait, event)
        except BaseException as err:  # handed to the consumer, which re-raises it
            finished = _Finished(err)
        finally:
            if not stop.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, finished)

    worker = loop.run_in_executor(None, work)
    try:
        while not isinstance(item := await queue.get(), _Finished):
            yield item
        await worker
        if item.error is not None:
            raise item.error
    finally:
        stop.set()
