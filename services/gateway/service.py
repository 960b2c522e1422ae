"""Pipeline service (the gateway): what users talk to.

Ingest chunks each document once (in worker threads, within the chunking limits) and streams the
passages to every chosen retriever (those the spec names, else `gateway.default_retrievers`, else all),
each on its own client-streaming call of messages bounded in passages and bytes, so every retriever
commits one new index version or none. Search fans out to
the chosen retrievers concurrently and fuses their lists; Ask adds generation when a generator is
configured, and otherwise answers plainly that it is retrieval-only. Other services are reached only
through the generated `ragfleet` stubs.

Reranking (Search, SearchBatch and Ask, when their RerankSpec is enabled): the fused list is retrieved
`depth` deep and the Reranker returns its best top_k. When no reranker is configured, or it has no
model yet (FAILED_PRECONDITION), the list keeps retrieval order and the RerankReport (Ask: the answer)
says why, unless the spec is `required`, which makes that an error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

import ragfleet
from ragfleet.v1 import (
    common_pb2,
    generator_pb2,
    generator_pb2_grpc,
    pipeline_pb2,
    reranker_pb2,
    reranker_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from services.gateway.chunking import ChunkSettings, chunk_document
from services.gateway.fusion import fuse
from services.runtime import validation
from services.runtime.context import CallContext
from services.runtime.errors import ServiceError, failed_precondition, invalid_argument
from services.runtime.remote import Remote, relay
from services.runtime.settings import GatewaySettings, Settings
from services.runtime.threads import Stop, run_in_thread

T = TypeVar("T")


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


@dataclass(frozen=True)
class _Remotes:
    """The services the gateway calls, connected once."""

    retrievers: dict[str, Remote]
    reranker: Remote | None
    generator: Remote | None


class PipelineService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self._connected: _Remotes | None = None

    # Channels are made on first use: a grpc.aio channel belongs to the event loop that serves calls.
    def _remotes(self) -> _Remotes:
        if self._connected is None:
            gateway = self.settings.gateway
            self._connected = _Remotes(
                retrievers={
                    name: Remote(
                        ep,
                        retriever_pb2_grpc.RetrieverStub,
                        retriever=name,
                        require_token=bool(self.settings.auth.tokens),
                    )
                    for name, ep in gateway.retrievers.items()
                },
                reranker=Remote(gateway.reranker, reranker_pb2_grpc.RerankerStub)
                if gateway.reranker
                else None,
                generator=(
                    Remote(gateway.generator, generator_pb2_grpc.GeneratorStub) if gateway.generator else None
                ),
            )
        return self._connected

    def _retrievers(self) -> dict[str, Remote]:
        return self._remotes().retrievers

    def _choose(self, names: Any, field: str) -> dict[str, Remote]:
        remotes = self._retrievers()
        if not names:
            return remotes
        unknown = [n for n in names if n not in remotes]
        if unknown:
            raise invalid_argument(field, f"unknown retriever {unknown[0]!r}; configured: {sorted(remotes)}")
        return {n: remotes[n] for n in dict.fromkeys(names)}

    def _ingest_targets(self, names: Any) -> dict[str, Remote]:
        """The retrievers an ingest goes to: those its spec names, else the configured default ones."""
        defaults = self.settings.gateway.default_retrievers
        if names or not defaults:
            return self._choose(names, "spec.retrievers")
        remotes = self._retrievers()
        unknown = [n for n in defaults if n not in remotes]
        if unknown:
            raise failed_precondition(
                f"gateway.default_retrievers names {unknown[0]!r}, which is not configured: {sorted(remotes)}"
            )
        return {n: remotes[n] for n in dict.fromkeys(defaults)}

    def _timeout(self, ctx: CallContext) -> float:
        return ctx.timeout(self.settings.gateway.default_timeout)

    def _candidates(self, spec: common_pb2.RetrievalSpec, retrievers: int) -> int:
        """How deep each retriever searches: fusion needs more than top_k from each list, a single
        retriever's list is the answer as it is."""
        if spec.candidates == 0 and retrievers == 1:
            return spec.top_k
        return min(max(spec.candidates or 100, spec.top_k), self.limits.max_top_k)

    async def _check_closed(self, remotes: dict[str, Remote], ctx: CallContext) -> None:
        """Tenants stay apart only if every retriever checks tokens too (see runtime.remote)."""
        timeout = min(self._timeout(ctx), 5.0)
        await asyncio.gather(*(remote.check_closed(timeout) for remote in remotes.values()))

    async def _fan_out(
        self, remotes: dict[str, Remote], call: Callable[[str, Remote], Awaitable[T]], ctx: CallContext
    ) -> dict[str, T]:
        """Calls every remote at once. NOT_FOUND from some is fine while another has the index."""
        await self._check_closed(remotes, ctx)
        names = list(remotes)
        outcomes = await asyncio.gather(*(call(n, remotes[n]) for n in names), return_exceptions=True)
        found: dict[str, T] = {}
        missing: list[ServiceError] = []
        for name, outcome in zip(names, outcomes):
            if isinstance(outcome, grpc.aio.AioRpcError):
                outcome = relay(outcome, f"retriever {name}")
            if isinstance(outcome, ServiceError) and outcome.code == grpc.StatusCode.NOT_FOUND:
                missing.append(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                found[name] = outcome
        if not found and missing:
            raise missing[0]
        return found

    # --- Ingest -----------------------------------------------------------------------------------

    async def Ingest(
        self, requests: AsyncIterator[pipeline_pb2.PipelineIngestRequest], ctx: CallContext
    ) -> pipeline_pb2.PipelineIngestReport:
        """Checks and chunks the documents in worker threads, a batch at a time, so that other calls
        are served meanwhile, and streams the passages on to the retrievers."""
        start = time.perf_counter()
        stream = aiter(requests)
        first = await anext(stream, None)
        if first is None:
            raise invalid_argument("documents", "the ingest stream was empty")
        index = validation.name(first.index, "index", self.limits)
        chunking = ChunkSettings.from_spec(first.spec.chunking, self.settings.gateway, self.limits)
        remotes = self._ingest_targets(first.spec.retrievers)
        if first.spec.mamba_model and "mamba" not in remotes:
            raise invalid_argument(
                "spec.mamba_model", f"is for the mamba retriever; this ingest goes to {', '.join(remotes)}"
            )
        if first.spec.seal_model and "seal" not in remotes:
            raise invalid_argument(
                "spec.seal_model", f"is for the seal retriever; this ingest goes to {', '.join(remotes)}"
            )
        await self._check_closed(remotes, ctx)
        streams = _IngestStreams(remotes, first, ctx, self._timeout(ctx), self.settings.gateway)
        stop = Stop(ctx.deadline)
        seen: set[str] = set()
        documents = passages = 0
        try:
            message = first
            finished = False
            while message is not None:
                if finished:
                    raise invalid_argument("last", "a message followed the one marked last")
                if message.index and message.index != index:
                    raise invalid_argument("index", f"{message.index!r} differs from the stream's {index!r}")
                finished = message.last
                done = 0
                while done < len(message.documents):
                    batch, cut = await run_in_thread(
                        stop, self._chunk, message.documents[done:], documents, chunking, seen, stop
                    )
                    done += cut
                    documents += cut
                    passages += len(batch)
                    await streams.send(batch)
                message = await anext(stream, None)
            if not finished:
                raise invalid_argument(
                    "last", "the stream ended without a message marked last; nothing was committed"
                )
            if documents == 0:
                raise invalid_argument("documents", "no documents were sent")
            calls = await streams.finish()
            reports = await self._fan_out(remotes, lambda name, _: calls[name], ctx)
        except BaseException:
            streams.cancel()
            raise
        return pipeline_pb2.PipelineIngestReport(
            documents=documents,
            passages=passages,
            retrievers=list(reports.values()),
            timings=[common_pb2.Timing(stage="ingest", millis=_ms(start))],
        )

    def _chunk(
        self,
        docs: Sequence[common_pb2.Document],
        numbered_from: int,
        chunking: ChunkSettings,
        seen: set[str],
        stop: Stop,
    ) -> tuple[list[common_pb2.Passage], int]:
        """Checks and chunks documents from the start of `docs` (the first is the stream's document
        `numbered_from`) until their passages fill a message (`gateway.ingest_batch_bytes`); returns
        those passages and how many documents they came from. Runs in a worker thread."""
        passages: list[common_pb2.Passage] = []
        size = cut = 0
        for doc in docs:
            stop.check("Ingest")
            self._check_document(doc, f"documents[{numbered_from + cut}]", seen)
            cut += 1
            for passage in chunk_document(doc, chunking, self.limits):
                passages.append(passage)
                size += passage.ByteSize()
            if size >= self.settings.gateway.ingest_batch_bytes:
                break
        return passages, cut

    def _check_document(self, doc: common_pb2.Document, field: str, seen: set[str]) -> None:
        validation.identifier(doc.id, f"{field}.id", self.limits)
        if "#" in doc.id:
            raise invalid_argument(f"{field}.id", "must not contain '#' (it separates passage numbers)")
        if doc.id in seen:
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS, f"{field}.id: {doc.id!r} appears twice in this ingest"
            )
        seen.add(doc.id)
        if not doc.text.strip():
            raise invalid_argument(f"{field}.text", f"document {doc.id!r} has no text")
        validation.text_size(doc.title + doc.text, f"{field}.text", self.limits, f"document {doc.id!r}")
        validation.title_size(doc.title, f"{field}.title", self.limits)
        validation.metadata_size(doc.metadata, f"{field}.metadata", self.limits)

    # --- Search -----------------------------------------------------------------------------------

    async def _retrieve(
        self, queries: list[str], spec: common_pb2.RetrievalSpec, ctx: CallContext
    ) -> tuple[list[list[common_pb2.ScoredPassage]], list[common_pb2.IndexVersion], list[common_pb2.Timing]]:
        """Every query searched in the spec's retrievers (a checked spec), fused: the one retrieval
        path of Search, SearchBatch and Ask. Returns the fused lists, the index versions and timings."""
        remotes = self._choose(spec.retrievers, "retrieval.retrievers")
        depth = self._candidates(spec, len(remotes))
        # Each retriever is asked for `depth` per query: the batch must fit what the retrievers accept.
        validation.batch_results(len(queries), depth, "queries", self.limits)
        start = time.perf_counter()

        async def search(name: str, remote: Remote) -> retriever_pb2.SearchBatchResponse:
            request = retriever_pb2.SearchBatchRequest(
                queries=queries,
                index=spec.index,
                top_k=depth,
                filters=spec.filters,
                with_continuation=spec.with_continuation,
                options=spec.options,
            )
            return await remote.stub.SearchBatch(
                request, metadata=remote.metadata(ctx), timeout=self._timeout(ctx)
            )

        batches = await self._fan_out(remotes, search, ctx)
        retrieved = _ms(start)
        rrf_k = self.settings.gateway.rrf_k
        fused = [fuse(_lists(batches, i), spec.fusion, spec.top_k, rrf_k) for i in range(len(queries))]
        budget = validation.ReplyBudget(self.limits)  # fused lists may take the largest of every list
        for item in (item for results in fused for item in results):
            budget.add(item)
        timings = [common_pb2.Timing(stage="retrieve", millis=retrieved)]
        timings += [t for b in batches.values() for t in b.responses[0].timings]
        timings.append(common_pb2.Timing(stage="fuse", millis=_ms(start) - retrieved))
        return fused, [b.version for b in batches.values()], timings

    async def _rerank(
        self,
        query: str,
        passages: list[common_pb2.ScoredPassage],
        top_k: int,
        rerank: pipeline_pb2.RerankSpec,
        ctx: CallContext,
    ) -> tuple[list[common_pb2.ScoredPassage], pipeline_pb2.RerankReport, list[common_pb2.Timing]]:
        """The Reranker's best `top_k` of `passages` (a checked, enabled spec), what it did, and timings;
        retrieval order with a note when there is no reranker or no model and the spec is not required."""
        reranker = self._remotes().reranker
        if reranker is None:
            note = "no reranker is configured, so passages are in retrieval order"
            if rerank.required:
                raise failed_precondition(f"reranking.required: {note}")
            return passages[:top_k], pipeline_pb2.RerankReport(note=note), []
        if not passages:
            return [], pipeline_pb2.RerankReport(), []
        start = time.perf_counter()
        request = reranker_pb2.RerankRequest(
            query=query,
            candidates=passages,
            top_k=min(top_k, len(passages)),
            model=rerank.model,
            backend=rerank.backend,
        )
        if rerank.HasField("retrieval_weight"):
            request.retrieval_weight = rerank.retrieval_weight
        try:
            reply = await reranker.stub.Rerank(
                request, metadata=reranker.metadata(ctx), timeout=self._timeout(ctx)
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION and not rerank.required:
                note = f"the reranker has no model ({err.details()}), so passages are in retrieval order"
                return passages[:top_k], pipeline_pb2.RerankReport(note=note), []
            field, _, problem = (err.details() or "").partition(": ")
            caller_fields = ("model", "backend", "retrieval_weight")
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in caller_fields:
                raise invalid_argument(f"reranking.{field}", f"{problem} (reranker)") from err
            raise relay(err, "reranker") from err
        report = pipeline_pb2.RerankReport(
            model_id=reply.model_id,
            backend=reply.backend,
            candidates=len(passages),
            truncated=reply.truncated,
            max_length=reply.max_length,
            retrieval_weight=reply.retrieval_weight,
        )
        timings = [common_pb2.Timing(stage="rerank", millis=_ms(start)), *reply.timings]
        return list(reply.results), report, timings

    async def Search(
        self, request: pipeline_pb2.PipelineSearchRequest, ctx: CallContext
    ) -> pipeline_pb2.PipelineSearchResponse:
        query = validation.query(request.query, "query", self.limits)
        (response,), _, timings = await self._search([query], request.retrieval, request.reranking, ctx)
        reranked = list(response.timings)
        del response.timings[:]
        response.timings.extend([*timings, *reranked])
        return response

    async def SearchBatch(
        self, request: pipeline_pb2.PipelineSearchBatchRequest, ctx: CallContext
    ) -> pipeline_pb2.PipelineSearchBatchResponse:
        queries = validation.queries(request.queries, "queries", self.limits)
        responses, versions, _ = await self._search(queries, request.retrieval, request.reranking, ctx)
        return pipeline_pb2.PipelineSearchBatchResponse(responses=responses, versions=versions)

    async def _search(
        self,
        queries: list[str],
        retrieval: common_pb2.RetrievalSpec,
        reranking: pipeline_pb2.RerankSpec,
        ctx: CallContext,
    ) -> tuple[
        list[pipeline_pb2.PipelineSearchResponse], list[common_pb2.IndexVersion], list[common_pb2.Timing]
    ]:
        """Search and SearchBatch after their queries are checked: a response per query (with its rerank
        report and timings when reranked), the index versions, and the retrieval's timings."""
        spec = validation.retrieval(retrieval, self.limits)
        rerank = validation.reranking(reranking, spec.top_k, self.limits)
        fused, versions, timings = await self._retrieve(queries, _deepened(spec, rerank), ctx)
        responses = [pipeline_pb2.PipelineSearchResponse(versions=versions) for _ in queries]
        if rerank is None:
            for response, results in zip(responses, fused):
                response.results.extend(results)
            return responses, versions, timings
        reranked = await asyncio.gather(
            *(self._rerank(q, r, spec.top_k, rerank, ctx) for q, r in zip(queries, fused))
        )
        for response, (results, report, more) in zip(responses, reranked):
            response.results.extend(results)
            response.rerank.CopyFrom(report)
            response.timings.extend(more)
        return responses, versions, timings

    # --- Ask --------------------------------------------------------------------------------------

    async def Ask(self, request: pipeline_pb2.AskRequest, ctx: CallContext) -> pipeline_pb2.AskResponse:
        response = pipeline_pb2.AskResponse()
        async for event in self.AskStream(request, ctx):
            kind = event.WhichOneof("event")
            if kind in ("retrieved", "reranked"):
                del response.passages[:]
                response.passages.extend(getattr(event, kind).passages)
            elif kind == "answer":
                response.answer.CopyFrom(event.answer)
        return response

    async def AskStream(
        self, request: pipeline_pb2.AskRequest, ctx: CallContext
    ) -> AsyncIterator[pipeline_pb2.AskEvent]:
        question = validation.query(request.question, "question", self.limits)
        spec = validation.retrieval(request.retrieval, self.limits, default_top_k=5)
        rerank = validation.reranking(request.reranking, spec.top_k, self.limits, enabled=request.rerank)
        # Retro's neighbours are a passage followed by its continuation.
        spec.with_continuation |= request.generate
        start = time.perf_counter()
        (passages,), versions, _ = await self._retrieve([question], _deepened(spec, rerank), ctx)
        timings = [common_pb2.Timing(stage="retrieve", millis=_ms(start))]
        yield pipeline_pb2.AskEvent(retrieved=pipeline_pb2.PassageList(passages=passages, timings=timings))
        notes: list[str] = []
        model_ids = sorted({v.model_id for v in versions if v.model_id})

        if rerank is not None:
            passages, report, more = await self._rerank(question, passages, spec.top_k, rerank, ctx)
            if report.model_id:
                model_ids.append(report.model_id)
                timings += more
                yield pipeline_pb2.AskEvent(
                    reranked=pipeline_pb2.PassageList(passages=passages, timings=more, rerank=report)
                )
            elif report.note:
                notes.append(report.note)

        generator = self._remotes().generator
        if request.generate and generator is not None and passages:
            generate = generator_pb2.GenerateRequest(
                question=question, context=passages, retrieval=spec, params=request.params
            )
            async for event in self._generate(generator, generate, timings, versions, model_ids, ctx):
                yield event
            return
        if request.generate and generator is None:
            notes.append("no generator is configured")
        answer = _retrieval_only_answer(passages, notes, timings, versions, model_ids)
        yield pipeline_pb2.AskEvent(answer=answer)

    async def _generate(
        self,
        generator: Remote,
        request: generator_pb2.GenerateRequest,
        timings: list[common_pb2.Timing],
        versions: list[common_pb2.IndexVersion],
        model_ids: list[str],
        ctx: CallContext,
    ) -> AsyncIterator[pipeline_pb2.AskEvent]:
        start = time.perf_counter()
        call = generator.stub.GenerateStream(
            request, metadata=generator.metadata(ctx), timeout=self._timeout(ctx)
        )
        try:
            async for event in call:
                if event.WhichOneof("event") == "token":
                    yield pipeline_pb2.AskEvent(token=event.token)
                    continue
                done = event.done
                timings.append(common_pb2.Timing(stage="generate", millis=_ms(start)))
                yield pipeline_pb2.AskEvent(
                    answer=pipeline_pb2.Answer(
                        text=done.text,
                        citations=_with_highlights(done.citations, request.context),
                        timings=timings + list(done.timings),
                        versions=versions,
                        model_ids=model_ids + [done.model_id],
                    )
                )
                return
        except grpc.aio.AioRpcError as err:
            raise relay(err, "generator") from err
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "generator: the stream ended without an answer")

    # --- Index management -------------------------------------------------------------------------

    async def Delete(
        self, request: retriever_pb2.DeleteRequest, ctx: CallContext
    ) -> pipeline_pb2.PipelineDeleteResponse:
        validation.name(request.index, "index", self.limits)
        if not (request.ids or request.doc_ids or request.drop_index):
            raise invalid_argument("ids", "give ids, doc_ids or drop_index")

        async def delete(name: str, remote: Remote) -> retriever_pb2.DeleteResponse:
            return await remote.stub.Delete(
                request, metadata=remote.metadata(ctx), timeout=self._timeout(ctx)
            )

        done = await self._fan_out(self._retrievers(), delete, ctx)
        return pipeline_pb2.PipelineDeleteResponse(retrievers=list(done.values()))

    async def Rebuild(
        self, request: pipeline_pb2.PipelineRebuildRequest, ctx: CallContext
    ) -> pipeline_pb2.PipelineRebuildResponse:
        validation.name(request.index, "index", self.limits)
        remotes = self._choose(request.retrievers, "retrievers")

        async def rebuild(name: str, remote: Remote) -> retriever_pb2.RebuildResponse:
            return await remote.stub.Rebuild(
                retriever_pb2.RebuildRequest(index=request.index),
                metadata=remote.metadata(ctx),
                timeout=self._timeout(ctx),
            )

        done = await self._fan_out(remotes, rebuild, ctx)
        return pipeline_pb2.PipelineRebuildResponse(retrievers=list(done.values()))

    async def DescribeIndex(
        self, request: retriever_pb2.DescribeIndexRequest, ctx: CallContext
    ) -> pipeline_pb2.PipelineIndexDescription:
        validation.name(request.index, "index", self.limits)

        async def describe(name: str, remote: Remote) -> retriever_pb2.IndexDescription:
            return await remote.stub.DescribeIndex(
                request, metadata=remote.metadata(ctx), timeout=self._timeout(ctx)
            )

        found = await self._fan_out(self._retrievers(), describe, ctx)
        return pipeline_pb2.PipelineIndexDescription(index=request.index, retrievers=list(found.values()))

    async def ListIndexes(
        self, request: retriever_pb2.ListIndexesRequest, ctx: CallContext
    ) -> pipeline_pb2.PipelineListIndexesResponse:
        async def list_indexes(name: str, remote: Remote) -> retriever_pb2.ListIndexesResponse:
            return await remote.stub.ListIndexes(
                request, metadata=remote.metadata(ctx), timeout=self._timeout(ctx)
            )

        by_index: dict[str, pipeline_pb2.PipelineIndexDescription] = {}
        for listing in (await self._fan_out(self._retrievers(), list_indexes, ctx)).values():
            for description in listing.indexes:
                name = description.version.index
                entry = by_index.setdefault(name, pipeline_pb2.PipelineIndexDescription(index=name))
                entry.retrievers.append(description)
        return pipeline_pb2.PipelineListIndexesResponse(indexes=[by_index[n] for n in sorted(by_index)])

    async def Describe(
        self, request: pipeline_pb2.DescribeRequest, ctx: CallContext
    ) -> pipeline_pb2.DescribeResponse:
        remotes = self._retrievers()

        async def probe(name: str, remote: Remote) -> pipeline_pb2.ServiceEndpoint:
            endpoint = pipeline_pb2.ServiceEndpoint(name=f"retriever {name}", address=remote.endpoint.address)
            try:
                await remote.stub.ListIndexes(
                    retriever_pb2.ListIndexesRequest(),
                    metadata=remote.metadata(ctx),
                    timeout=min(self._timeout(ctx), 5.0),
                )
                endpoint.healthy = True
            except grpc.aio.AioRpcError as err:
                endpoint.detail = f"{err.code().name}: {err.details()}"
            return endpoint

        endpoints = await asyncio.gather(*(probe(n, r) for n, r in remotes.items()))
        return pipeline_pb2.DescribeResponse(
            version=ragfleet.__version__,
            services=endpoints,
            retrievers=list(remotes),
            reranker=self.settings.gateway.reranker is not None,
            generator=self.settings.gateway.generator is not None,
        )


def _deepened(
    spec: common_pb2.RetrievalSpec, rerank: pipeline_pb2.RerankSpec | None
) -> common_pb2.RetrievalSpec:
    """The spec to retrieve with: `rerank.depth` results deep when reranking follows."""
    if rerank is None or rerank.depth == spec.top_k:
        return spec
    deeper = common_pb2.RetrievalSpec()
    deeper.CopyFrom(spec)
    deeper.top_k = rerank.depth
    return deeper


def _lists(
    batches: dict[str, retriever_pb2.SearchBatchResponse], i: int
) -> dict[str, list[common_pb2.ScoredPassage]]:
    """Each retriever's ranked list for the i-th query of a batch."""
    return {name: list(batch.responses[i].results) for name, batch in batches.items()}


class _IngestStreams:
    """One client-streaming Ingest call per retriever, fed batches of at most `gateway.ingest_batch`
    passages and `gateway.ingest_batch_bytes` bytes (a larger passage goes alone). The first message
    to each carries the stream's index and spec."""

    def __init__(
        self,
        remotes: dict[str, Remote],
        first: pipeline_pb2.PipelineIngestRequest,
        ctx: CallContext,
        timeout: float,
        gateway: GatewaySettings,
    ) -> None:
        self._first = first
        self._most_passages = gateway.ingest_batch
        self._most_bytes = gateway.ingest_batch_bytes
        self._queues: dict[str, asyncio.Queue] = {name: asyncio.Queue(maxsize=4) for name in remotes}
        self._calls = {
            name: remote.stub.Ingest(self._outgoing(name), metadata=remote.metadata(ctx), timeout=timeout)
            for name, remote in remotes.items()
        }
        self._batch: list[common_pb2.Passage] = []
        self._bytes = 0
        self._header_sent = False

    async def _outgoing(self, name: str) -> AsyncIterator[retriever_pb2.IngestRequest]:
        while (message := await self._queues[name].get()) is not None:
            yield message

    async def send(self, passages: list[common_pb2.Passage]) -> None:
        for passage in passages:
            size = passage.ByteSize()
            full = len(self._batch) >= self._most_passages or self._bytes + size > self._most_bytes
            if self._batch and full:
                await self._flush(last=False)
            self._batch.append(passage)
            self._bytes += size

    async def finish(self) -> dict[str, grpc.aio.StreamUnaryCall]:
        """Sends the last batch and ends every stream; returns the calls, to await their reports."""
        await self._flush(last=True)
        for name, call in self._calls.items():
            await _put(self._queues[name], None, call, name)
        return self._calls

    def cancel(self) -> None:
        for call in self._calls.values():
            call.cancel()

    async def _flush(self, last: bool) -> None:
        for name, call in self._calls.items():
            message = retriever_pb2.IngestRequest(passages=self._batch, upsert=self._first.upsert, last=last)
            if not self._header_sent:
                message.index = self._first.index
                message.spec.CopyFrom(self._first.spec)
            await _put(self._queues[name], message, call, name)
        self._header_sent = True
        self._batch, self._bytes = [], 0


async def _put(queue: asyncio.Queue, message: Any, call: grpc.aio.StreamUnaryCall, name: str) -> None:
    """Queues a message for a retriever, failing fast if that retriever already ended the call."""
    while True:
        if call.done():
            try:
                await call
            except grpc.aio.AioRpcError as err:
                raise relay(err, f"retriever {name}") from err
            raise ServiceError(grpc.StatusCode.INTERNAL, f"retriever {name} ended the ingest early")
        try:
            await asyncio.wait_for(queue.put(message), timeout=0.5)
            return
        except TimeoutError:
            continue


def _with_highlights(
    citations: Sequence[generator_pb2.Citation], context: Sequence[common_pb2.ScoredPassage]
) -> list[generator_pb2.Citation]:
    """The generator's citations, each with the highlights its passage had in the context it was given
    (when the generator reported none)."""
    spans = {p.passage.id: p.highlights for p in context}
    cited = []
    for citation in citations:
        copy = generator_pb2.Citation()
        copy.CopyFrom(citation)
        if not copy.highlights:
            copy.highlights.extend(spans.get(citation.passage_id, []))
        cited.append(copy)
    return cited


def _retrieval_only_answer(
    passages: list[common_pb2.ScoredPassage],
    notes: list[str],
    timings: list[common_pb2.Timing],
    versions: list[common_pb2.IndexVersion],
    model_ids: list[str],
) -> pipeline_pb2.Answer:
    reason = "; ".join(notes) or "generation was not requested"
    if passages:
        top = passages[0].passage
        text = f"Retrieval only ({reason}). The best matching passage is {top.id}: {top.text}"
    else:
        text = f"Retrieval only ({reason}). No passage matched."
    citations = [
        generator_pb2.Citation(
            passage_id=p.passage.id,
            doc_id=p.passage.doc_id,
            weight=p.score,
            title=p.passage.title,
            highlights=p.highlights,
        )
        for p in passages
    ]
    return pipeline_pb2.Answer(
        text=text,
        citations=citations,
        timings=timings,
        retrieval_only=True,
        versions=versions,
        model_ids=model_ids,
    )
