"""The Retriever service: ingest, search and manage indexes of one or more backends.

Layout: `<home>/indexes/<tenant>/<index>/<backend>/` holds `manifest.json`, `passages.sqlite3`
(the passage store) and one folder per version (`v000003/`) with the backend's files.

Versions and recovery. Every change (an Ingest stream, a Delete, a Rebuild that changes something) is
one transaction that moves the index from version V to V+1:
1. the passage store stages the new rows and the deletions under version V+1 (readers at V do not
   see them);
2. a fresh backend instance is opened from the V folder (copy-on-write), changed, and saved into
   the new V+1 folder, which is fsynced;
3. the manifest is switched to V+1 atomically: this is the commit point;
4. the new backend instance replaces the old one for searches; the V folder is removed once no
   search reads V.
If anything fails before step 3, the passage store is rolled back to V and the V+1 folder removed.
If the process dies before step 3, the manifest still names V: the next open rolls the passage
store back to V (`PassageStore.recover`) and removes version folders the manifest does not name.
Searches read the last committed version (a `Snapshot`: manifest, backend instance, passage store),
so they never see a half-applied change.

Concurrency. Each (tenant, index, backend) has one `IndexHandle` for the life of the service; its lock
serialises every change of that index (ingest, delete, rebuild, drop), and a drop empties the handle
rather than forgetting it, so an index dropped and made again is still changed by one writer at a
time. A snapshot counts the searches reading it: the version a commit replaced is freed (its folder
removed, `Backend.discard`) only once they are done, and a drop, which makes the index absent for
every later call at once, closes the passage store and removes the folder only once they are done.

Deadlines. Work runs in worker threads through `runtime.threads.run_in_thread`: a search checks
between slices of its queries whether its call was cancelled or is past its deadline, a commit checks
before its commit point, and a cancelled call returns only once its thread has stopped (so it never
releases the index's lock under a running commit).

Limits (settings `Limits`). A passage's id, text, title and metadata are checked as it arrives; an
Ingest stream past `max_ingest_bytes` or `max_ingest_passages` fails with RESOURCE_EXHAUSTED as soon as
it is, having committed nothing. A SearchBatch may ask for `max_batch_results` (queries x top_k) and
a search may filter on `max_filters` pairs; more is INVALID_ARGUMENT before any work starts.

Backend choice. The retriever.proto requests do not name a backend. A service serving one backend
uses it; one serving several reads the `x-ragfleet-retriever` call metadata.

Search options. Set SearchOptions fields must be ones the backend uses (`Backend.SEARCH_OPTIONS`);
others are INVALID_ARGUMENT naming `options.<field>`, as are negative counts and a non-finite threshold.

Highlights. A backend whose hits carry matches (seal's n-grams) turns them into character spans of each
hit's passage text (`Backend.highlights`), sent as `ScoredPassage.highlights`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from ragfleet.metadata import RETRIEVER_KEY
from ragfleet.v1 import common_pb2, retriever_pb2
from services.retriever.backend import BACKENDS, Backend, Query, SearchOptions, backend_class
from services.retriever.passages import Passage, PassageStore
from services.runtime import validation
from services.runtime.context import CallContext
from services.runtime.errors import (
    ServiceError,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    resource_exhausted,
)
from services.runtime.settings import Settings
from services.runtime.storage import (
    Manifest,
    fsync_tree,
    load_manifest,
    tree_size,
    utc_now,
    version_dir_name,
    write_manifest,
)
from services.runtime.threads import Stop, run_in_thread, uninterrupted

_VERSION_DIR = re.compile(r"v\d{6,}")
# A search hands its backend SEARCH_SLICE queries at once, fewer when top_k is large (a slice asks for
# at most SLICE_RESULTS results); between slices it checks whether its call is over.
SEARCH_SLICE = 32
SLICE_RESULTS = 2048


class Snapshot:
    """A committed version: what searches use. It counts its readers, so that a version that a commit
    replaced (or a drop removed) is freed only once no search reads it any more."""

    def __init__(self, manifest: Manifest, backend: Backend, store: PassageStore) -> None:
        self.manifest = manifest
        self.backend = backend
        self.store = store
        self._readers = 0
        self._released = asyncio.Event()
        self._released.set()

    @contextlib.contextmanager
    def reading(self) -> Iterator[Snapshot]:
        """Holds this version for the block (on the event loop)."""
        self._readers += 1
        self._released.clear()
        try:
            yield self
        finally:
            self._readers -= 1
            if self._readers == 0:
                self._released.set()

    async def released(self) -> None:
        await self._released.wait()


@dataclass
class IndexHandle:
    """One backend index of one tenant, for as long as the service runs. A drop empties the handle and
    does not forget it, so its lock serialises every change of the index's folder, across drops too."""

    tenant: str
    index: str
    backend_name: str
    directory: Path
    loaded: bool = False  # the folder was read, once, on first use
    snapshot: Snapshot | None = None  # None: the index does not exist
    retired: list[Snapshot] = field(default_factory=list)  # replaced, freed once released
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def absent(self) -> ServiceError:
        return _absent(self.index, self.backend_name)

    def reading(self) -> contextlib.AbstractContextManager[Snapshot]:
        """The committed version, held for a search or a description; NOT_FOUND when there is none."""
        if self.snapshot is None:
            raise self.absent()
        return self.snapshot.reading()

    def version(self) -> common_pb2.IndexVersion:
        manifest = self.snapshot.manifest if self.snapshot else None
        return common_pb2.IndexVersion(
            index=self.index,
            retriever=self.backend_name,
            version=manifest.version if manifest else 0,
            model_id=manifest.model_id if manifest else "",
        )


def _absent(index: str, backend: str) -> ServiceError:
    return not_found(f"index {index!r} does not exist for retriever {backend!r}")


def _timing(stage: str, start: float) -> common_pb2.Timing:
    return common_pb2.Timing(stage=stage, millis=(time.perf_counter() - start) * 1000.0)


def _spec_dict(spec: common_pb2.IndexSpec) -> dict[str, Any]:
    """The backend's part of an IndexSpec (chunking and retrievers are the gateway's) as a dict."""
    fields = json_format.MessageToDict(
        spec, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return {name: value for name, value in fields.items() if name not in ("chunking", "retrievers")}


def _existing(handle: IndexHandle) -> Snapshot:
    """The handle's committed version, for a change that waited for the lock (a drop may have run)."""
    if handle.snapshot is None:
        raise handle.absent()
    return handle.snapshot


def _passage_pb(p: Passage) -> common_pb2.Passage:
    return common_pb2.Passage(
        id=p.id, doc_id=p.doc_id, position=p.position, title=p.title, text=p.text, metadata=p.metadata
    )


class RetrieverService:
    """The Retriever RPCs as plain async methods; server adapters map ServiceError to a status."""

    def __init__(self, settings: Settings, backends: list[str] | None = None) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.backends = list(backends if backends is not None else settings.retriever.backends)
        unknown = [b for b in self.backends if b not in BACKENDS]
        if not self.backends or unknown:
            raise ValueError(f"unknown retriever backends {unknown}; known: {sorted(BACKENDS)}")
        self._handles: dict[tuple[str, str, str], IndexHandle] = {}

    # -- request checks ------------------------------------------------------------------

    def _backend(self, ctx: CallContext) -> str:
        if len(self.backends) == 1:
            return self.backends[0]
        name = ctx.metadata.get(RETRIEVER_KEY, "")
        if name not in self.backends:
            raise invalid_argument(
                RETRIEVER_KEY,
                f"{name!r} is not a retriever of this service; choose one of {', '.join(self.backends)}"
                if name
                else f"required: this service serves {', '.join(self.backends)}",
            )
        return name

    @staticmethod
    def _options(backend_name: str, proto: common_pb2.SearchOptions) -> SearchOptions:
        """The request's search options, checked against what the backend uses."""
        validation.search_options(proto, "options")
        options = SearchOptions(
            exhaustive=proto.exhaustive,
            ncells=proto.ncells,
            centroid_score_threshold=proto.centroid_score_threshold,
            ndocs=proto.ndocs,
            compressed_rerank=proto.compressed_rerank,
            beam=proto.beam,
            ngram_length=proto.ngram_length,
        )
        set_fields = options.set_fields()
        usable = backend_class(backend_name).SEARCH_OPTIONS
        for name in set_fields:
            if name not in usable:
                raise invalid_argument(f"options.{name}", f"not used by the {backend_name} retriever")
        if options.exhaustive and len(set_fields) > 1:
            tuned = next(name for name in set_fields if name != "exhaustive")
            raise invalid_argument(f"options.{tuned}", "tunes the approximate search that exhaustive skips")
        return options

    def _passage(self, i: int, p: common_pb2.Passage) -> Passage:
        name = f"passages[{i}]"
        validation.identifier(p.id, f"{name}.id", self.limits)
        if not p.text.strip():
            raise invalid_argument(f"{name}.text", "is empty")
        validation.text_size(p.text, f"{name}.text", self.limits, f"passage {p.id!r}")
        validation.title_size(p.title, f"{name}.title", self.limits)
        validation.metadata_size(p.metadata, f"{name}.metadata", self.limits)
        doc_id = p.doc_id or p.id.rpartition("#")[0] or p.id
        return Passage(p.id, doc_id, p.position, p.title, p.text, dict(p.metadata))

    # -- index handles -------------------------------------------------------------------

    async def _requested(self, request: Any, ctx: CallContext) -> IndexHandle:
        """The handle of the index a request names, for the backend the call is for."""
        backend_name = self._backend(ctx)
        return await self._handle(ctx, validation.name(request.index, "index", self.limits), backend_name)

    def _directory(self, tenant: str, index: str, backend: str) -> Path:
        return Path(self.settings.home) / "indexes" / tenant / index / backend

    async def _handle(self, ctx: CallContext, index: str, backend: str, create: bool = False) -> IndexHandle:
        """The handle of an index, loaded from disk on first use; NOT_FOUND unless `create`."""
        tenant = validation.name(ctx.tenant, "tenant", self.limits)
        key = (tenant, index, backend)
        handle = self._handles.get(key)
        if handle is None:
            directory = self._directory(tenant, index, backend)
            if not create and load_manifest(directory) is None:
                raise _absent(index, backend)
            handle = self._handles.setdefault(key, IndexHandle(tenant, index, backend, directory))
        if not handle.loaded:
            async with handle.lock:
                if not handle.loaded:
                    await run_in_thread(Stop(), self._load, handle)
        if handle.snapshot is None and not create:
            raise handle.absent()
        return handle

    def _load(self, handle: IndexHandle) -> None:
        """Opens a committed index and clears what a writer that died left behind."""
        manifest = load_manifest(handle.directory)
        if manifest is not None:
            store = PassageStore(handle.directory, manifest.version)
            live = handle.directory / manifest.version_dir_name
            backend = backend_class(handle.backend_name).open(
                handle.directory, manifest.spec, self.settings, live
            )
            backend.collect_garbage(live)
            self._remove_versions(handle.directory, keep=live.name)
            handle.snapshot = Snapshot(manifest, backend, store)
        handle.loaded = True

    @staticmethod
    def _remove_versions(directory: Path, keep: str | None) -> None:
        for path in directory.iterdir():
            if path.is_dir() and _VERSION_DIR.fullmatch(path.name) and path.name != keep:
                shutil.rmtree(path, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def _changing(self, handle: IndexHandle) -> AsyncIterator[None]:
        """Holds the index's lock for one change; before letting go, frees the version it replaced
        (even when the call was cancelled)."""
        async with handle.lock:
            try:
                yield
            finally:
                await uninterrupted(self._retire(handle))

    async def _retire(self, handle: IndexHandle) -> None:
        """Frees each replaced version once no search reads it."""
        while handle.retired:
            old = handle.retired[0]
            await old.released()
            await run_in_thread(Stop(), self._free, handle.directory / old.manifest.version_dir_name, old)
            handle.retired.pop(0)

    @staticmethod
    def _free(version_dir: Path, snapshot: Snapshot) -> None:
        snapshot.backend.discard(version_dir)
        shutil.rmtree(version_dir, ignore_errors=True)

    def _commit(
        self,
        stop: Stop,
        handle: IndexHandle,
        spec: dict[str, Any],
        add: list[Passage],
        delete: list[int],
        *,
        rebuild: bool = False,
    ) -> None:
        """Moves the index to its next version (see the module docstring); runs in a worker thread,
        under the index's lock. A call that is over by the commit point commits nothing.

        With `rebuild`, the backend rebuilds its search structure first, and when that changes nothing
        (`Backend.rebuild` is False) nothing is committed.
        """
        old = handle.snapshot
        version = old.manifest.version if old else 0
        new_version = version + 1
        directory = handle.directory
        if old is None:  # a new index
            directory.mkdir(parents=True, exist_ok=True)
            self._remove_versions(directory, keep=None)
            store = PassageStore(directory, version)
        else:
            store = old.store
        old_dir = directory / version_dir_name(version) if old else None
        new_dir = directory / version_dir_name(new_version)
        backend: Backend | None = None
        try:
            shutil.rmtree(new_dir, ignore_errors=True)
            backend = backend_class(handle.backend_name).open(directory, spec, self.settings, old_dir)
            if rebuild and not backend.rebuild():
                return
            rows = store.stage(new_version, add, delete)
            backend.remove(delete)
            backend.add(rows)
            new_dir.mkdir()
            extra = backend.save(new_dir)
            fsync_tree(new_dir)
            stop.check("the change")
            now = utc_now()
            manifest = Manifest(
                version=new_version,
                spec=spec,
                model_id=backend.model_id,
                created_at=old.manifest.created_at if old else now,
                updated_at=now,
                extra=extra,
            )
            write_manifest(directory, manifest)
        except BaseException:
            store.recover(version)
            if old is None:
                store.close()
            if backend is not None:
                backend.discard(new_dir)
            shutil.rmtree(new_dir, ignore_errors=True)
            raise
        # Rows deleted at `version` or before: no search reads an older version (`_changing` freed it).
        store.purge(before=version)
        handle.snapshot = Snapshot(manifest, backend, store)
        if old is not None:
            handle.retired.append(old)

    async def _drop(self, handle: IndexHandle) -> None:
        """Removes the index once no search reads it; calls from the start on find no index."""
        dropped = _existing(handle)
        handle.snapshot = None
        await dropped.released()
        await asyncio.to_thread(self._remove, handle.directory, dropped)

    @staticmethod
    def _remove(directory: Path, dropped: Snapshot) -> None:
        try:
            dropped.backend.collect_garbage(None)
        finally:  # the folder goes whatever happens: the next ingest starts a new index there
            dropped.store.close()
            shutil.rmtree(directory, ignore_errors=True)
        # Other backends' processes share the parent folder and may be dropping theirs right now.
        with contextlib.suppress(OSError):
            directory.parent.rmdir()

    # -- RPCs ----------------------------------------------------------------------------

    async def Ingest(
        self, requests: AsyncIterator[retriever_pb2.IngestRequest], ctx: CallContext
    ) -> retriever_pb2.IngestReport:
        backend_name = self._backend(ctx)
        start = time.perf_counter()
        limits = self.limits
        index: str | None = None
        spec = common_pb2.IndexSpec()
        upsert = False
        passages: list[Passage] = []
        seen: set[str] = set()
        received = 0
        finished = False
        async for request in requests:
            if finished:
                raise invalid_argument("last", "a message followed the one marked last")
            finished = request.last
            received += request.ByteSize()
            if received > limits.max_ingest_bytes:
                raise resource_exhausted(
                    f"the stream is past {limits.max_ingest_bytes} bytes (limits.max_ingest_bytes); "
                    "nothing was committed: ingest the passages in several calls"
                )
            if len(passages) + len(request.passages) > limits.max_ingest_passages:
                raise resource_exhausted(
                    f"the stream is past {limits.max_ingest_passages} passages (limits.max_ingest_passages); "
                    "nothing was committed: ingest the passages in several calls"
                )
            if index is None:
                index = validation.name(request.index, "index", limits)
                spec.CopyFrom(request.spec)
                upsert = request.upsert
            elif request.index and request.index != index:
                raise invalid_argument("index", f"{request.index!r} differs from the stream's {index!r}")
            for p in request.passages:
                passage = self._passage(len(passages), p)
                if passage.id in seen:
                    raise already_exists(f"passage {passage.id!r} appears more than once in this ingest")
                seen.add(passage.id)
                passages.append(passage)
        if index is None:
            raise invalid_argument("index", "is required (the stream carried no message)")
        if not finished:
            raise invalid_argument(
                "last", "the stream ended without a message marked last; nothing was committed"
            )
        timings = [_timing("receive", start)]

        stop = Stop(ctx.deadline)
        handle = await self._handle(ctx, index, backend_name, create=True)
        async with self._changing(handle):
            if handle.snapshot is None:
                resolved = backend_class(backend_name).resolve_spec(_spec_dict(spec), self.settings)
                existing: dict[str, int] = {}
            else:
                resolved = handle.snapshot.manifest.spec
                version = handle.snapshot.manifest.version
                ids = [p.id for p in passages]
                existing = await run_in_thread(stop, handle.snapshot.store.rowids_of_ids, version, ids)
                if existing and not upsert:
                    first = next(p.id for p in passages if p.id in existing)
                    raise already_exists(f"passage {first!r} is already in index {index!r}")
            if passages or handle.snapshot is None:
                start = time.perf_counter()
                rowids = list(existing.values())
                await run_in_thread(stop, self._commit, stop, handle, resolved, passages, rowids)
                timings.append(_timing("index", start))
            snapshot = _existing(handle)
            total = await run_in_thread(stop, snapshot.store.count, snapshot.manifest.version)
            return retriever_pb2.IngestReport(
                version=handle.version(),
                added=len(passages) - len(existing),
                replaced=len(existing),
                total_passages=total,
                timings=timings,
            )

    async def Search(
        self, request: retriever_pb2.SearchRequest, ctx: CallContext
    ) -> retriever_pb2.SearchResponse:
        query = validation.query(request.query, "query", self.limits)
        top_k = validation.top_k(request.top_k, "top_k", self.limits)
        (response,) = await self._search_queries([query], top_k, request, ctx)
        return response

    async def SearchBatch(
        self, request: retriever_pb2.SearchBatchRequest, ctx: CallContext
    ) -> retriever_pb2.SearchBatchResponse:
        queries = validation.queries(request.queries, "queries", self.limits)
        top_k = validation.top_k(request.top_k, "top_k", self.limits)
        validation.batch_results(len(queries), top_k, "top_k", self.limits)
        responses = await self._search_queries(queries, top_k, request, ctx)
        return retriever_pb2.SearchBatchResponse(responses=responses, version=responses[0].version)

    async def _search_queries(
        self,
        queries: list[str],
        top_k: int,
        request: retriever_pb2.SearchRequest | retriever_pb2.SearchBatchRequest,
        ctx: CallContext,
    ) -> list[retriever_pb2.SearchResponse]:
        """Search and SearchBatch after their queries and top_k are checked: one response per query."""
        backend_name = self._backend(ctx)
        index = validation.name(request.index, "index", self.limits)
        filters = validation.filters(request.filters, "filters", self.limits)
        options = self._options(backend_name, request.options)
        handle = await self._handle(ctx, index, backend_name)
        start = time.perf_counter()
        stop = Stop(ctx.deadline)
        with handle.reading() as snapshot:
            results = await run_in_thread(
                stop,
                self._search,
                stop,
                handle,
                snapshot,
                queries,
                top_k,
                filters,
                request.with_continuation,
                options,
            )
        version = self._version(handle, snapshot)
        timing = _timing("search", start)
        return [retriever_pb2.SearchResponse(results=r, version=version, timings=[timing]) for r in results]

    @staticmethod
    def _version(handle: IndexHandle, snapshot: Snapshot) -> common_pb2.IndexVersion:
        return common_pb2.IndexVersion(
            index=handle.index,
            retriever=handle.backend_name,
            version=snapshot.manifest.version,
            model_id=snapshot.manifest.model_id,
        )

    def _search(
        self,
        stop: Stop,
        handle: IndexHandle,
        snapshot: Snapshot,
        queries: list[str],
        top_k: int,
        filters: Mapping[str, str],
        with_continuation: bool,
        options: SearchOptions,
    ) -> list[list[common_pb2.ScoredPassage]]:
        """The queries searched a slice at a time, until done or the call is over."""
        store, version = snapshot.store, snapshot.manifest.version
        if store.count(version) == 0:
            raise failed_precondition(f"index {handle.index!r} is empty")
        allowed = store.rowids_matching(version, filters) if filters else None
        results = []
        budget = validation.ReplyBudget(self.limits)
        size = max(1, min(SEARCH_SLICE, SLICE_RESULTS // top_k))
        for first in range(0, len(queries), size):
            stop.check("the search")
            texts = queries[first : first + size]
            hits = snapshot.backend.search(Query(texts, top_k, allowed, options))
            passages = store.by_rowids(version, sorted({hit[0] for h in hits for hit in h}))
            for query_hits in hits:
                scored = []
                for rowid, score, *matches in query_hits:
                    passage = passages[rowid]
                    item = common_pb2.ScoredPassage(
                        passage=_passage_pb(passage),
                        score=score,
                        retriever=handle.backend_name,
                        rank=len(scored) + 1,
                        highlights=[
                            common_pb2.Highlight(start=s.start, end=s.end, score=s.score)
                            for s in snapshot.backend.highlights(passage, *matches)
                        ],
                    )
                    if with_continuation:
                        following = store.continuation(version, passage)
                        if following is not None:
                            item.continuation.CopyFrom(_passage_pb(following))
                    budget.add(item)
                    scored.append(item)
                results.append(scored)
        return results

    async def Delete(
        self, request: retriever_pb2.DeleteRequest, ctx: CallContext
    ) -> retriever_pb2.DeleteResponse:
        if not request.drop_index and not request.ids and not request.doc_ids:
            raise invalid_argument("ids", "give ids, doc_ids or drop_index")
        handle = await self._requested(request, ctx)
        stop = Stop(ctx.deadline)
        async with self._changing(handle):
            snapshot = _existing(handle)
            version, store = snapshot.manifest.version, snapshot.store
            if request.drop_index:
                deleted = await run_in_thread(stop, store.count, version)
                reply_version = handle.version()
                await uninterrupted(self._drop(handle))
                return retriever_pb2.DeleteResponse(deleted=deleted, version=reply_version)
            found = await run_in_thread(stop, store.rowids_of_ids, version, list(request.ids))
            rowids = set(found.values())
            rowids |= set(await run_in_thread(stop, store.rowids_of_docs, version, list(request.doc_ids)))
            if rowids:
                spec = snapshot.manifest.spec
                await run_in_thread(stop, self._commit, stop, handle, spec, [], sorted(rowids))
            return retriever_pb2.DeleteResponse(deleted=len(rowids), version=handle.version())

    async def Rebuild(
        self, request: retriever_pb2.RebuildRequest, ctx: CallContext
    ) -> retriever_pb2.RebuildResponse:
        handle = await self._requested(request, ctx)
        start = time.perf_counter()
        stop = Stop(ctx.deadline)
        async with self._changing(handle):
            spec = _existing(handle).manifest.spec
            await run_in_thread(stop, self._commit, stop, handle, spec, [], [], rebuild=True)
            return retriever_pb2.RebuildResponse(
                version=handle.version(), timings=[_timing("rebuild", start)]
            )

    async def DescribeIndex(
        self, request: retriever_pb2.DescribeIndexRequest, ctx: CallContext
    ) -> retriever_pb2.IndexDescription:
        handle = await self._requested(request, ctx)
        with handle.reading() as snapshot:
            return await run_in_thread(Stop(ctx.deadline), self._describe, handle, snapshot)

    def _describe(self, handle: IndexHandle, snapshot: Snapshot) -> retriever_pb2.IndexDescription:
        manifest = snapshot.manifest
        spec = manifest.spec
        return retriever_pb2.IndexDescription(
            version=self._version(handle, snapshot),
            passages=snapshot.store.count(manifest.version),
            documents=snapshot.store.count_documents(manifest.version),
            spec=json_format.ParseDict(
                {**spec, "retrievers": [handle.backend_name]},
                common_pb2.IndexSpec(),
                ignore_unknown_fields=True,
            ),
            dimension=snapshot.backend.dimension,
            bytes_on_disk=tree_size(handle.directory),
            created_at=manifest.created_at,
            updated_at=manifest.updated_at,
        )

    async def ListIndexes(
        self, request: retriever_pb2.ListIndexesRequest, ctx: CallContext
    ) -> retriever_pb2.ListIndexesResponse:
        backend_name = self._backend(ctx)
        tenant = validation.name(ctx.tenant, "tenant", self.limits)
        root = Path(self.settings.home) / "indexes" / tenant
        names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        described = []
        for name in filter(validation.is_name, names):
            try:
                handle = await self._handle(ctx, name, backend_name)
            except ServiceError:  # not an index of this backend, or dropped meanwhile
                continue
            with handle.reading() as snapshot:
                described.append(await run_in_thread(Stop(ctx.deadline), self._describe, handle, snapshot))
        return retriever_pb2.ListIndexesResponse(indexes=described)
