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
4. the new backend instance replaces the old one for searches; the V folder is removed.
If anything fails before step 3, the passage store is rolled back to V and the V+1 folder removed.
If the process dies before step 3, the manifest still names V: the next open rolls the passage
store back to V (`PassageStore.recover`) and removes version folders the manifest does not name.
Searches read the last committed (backend instance, manifest) pair and the passage store at that
version, so they never see a half-applied change; writers of one index are serialised by a lock.

Backend choice. The retriever.proto requests do not name a backend. A service serving one backend
uses it; one serving several reads the `x-ragfleet-retriever` call metadata.

Search options. Set SearchOptions fields must be ones the backend uses (`Backend.SEARCH_OPTIONS`);
others are INVALID_ARGUMENT naming `options.<field>`, as are negative counts and a non-finite threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from collections.abc import AsyncIterator, Mapping
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
)
from services.runtime.settings import Settings
from services.runtime.storage import (
    Manifest,
    fsync_tree,
    load_manifest,
    utc_now,
    version_dir_name,
    write_manifest,
)

_VERSION_DIR = re.compile(r"^v\d{6,}$")


@dataclass(frozen=True)
class Snapshot:
    """A committed version: what searches use."""

    manifest: Manifest
    backend: Backend


@dataclass
class IndexHandle:
    tenant: str
    index: str
    backend_name: str
    directory: Path
    store: PassageStore | None = None
    snapshot: Snapshot | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def version(self) -> common_pb2.IndexVersion:
        manifest = self.snapshot.manifest if self.snapshot else None
        return common_pb2.IndexVersion(
            index=self.index,
            retriever=self.backend_name,
            version=manifest.version if manifest else 0,
            model_id=manifest.model_id if manifest else "",
        )


def _timing(stage: str, start: float) -> common_pb2.Timing:
    return common_pb2.Timing(stage=stage, millis=(time.perf_counter() - start) * 1000.0)


def _spec_dict(spec: common_pb2.IndexSpec) -> dict[str, Any]:
    """The backend's part of an IndexSpec (chunking and retrievers are the gateway's) as a dict."""
    fields = json_format.MessageToDict(
        spec, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return {name: value for name, value in fields.items() if name not in ("chunking", "retrievers")}


def _check_not_dropped(handle: IndexHandle) -> None:
    """For calls that waited for the index's lock: a drop may have finished meanwhile."""
    if handle.snapshot is None:
        raise not_found(f"index {handle.index!r} does not exist for retriever {handle.backend_name!r}")


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
        self._open_lock = asyncio.Lock()

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
        )
        set_fields = options.set_fields()
        usable = backend_class(backend_name).SEARCH_OPTIONS
        for name in set_fields:
            if name not in usable:
                raise invalid_argument(
                    f"options.{name}", f"not used by the {backend_name} retriever (applies to colbert only)"
                )
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
        async with self._open_lock:
            handle = self._handles.get(key)
            if handle is None:
                handle = IndexHandle(tenant, index, backend, self._directory(tenant, index, backend))
                if load_manifest(handle.directory) is not None:
                    await asyncio.to_thread(self._load, handle)
                self._handles[key] = handle
        if handle.snapshot is None and not create:
            raise not_found(f"index {index!r} does not exist for retriever {backend!r}")
        return handle

    def _load(self, handle: IndexHandle) -> None:
        """Opens a committed index and clears what a writer that died left behind."""
        manifest = load_manifest(handle.directory)
        assert manifest is not None
        handle.store = PassageStore(handle.directory, manifest.version)
        live = handle.directory / manifest.version_dir_name
        backend = backend_class(handle.backend_name).open(
            handle.directory, manifest.spec, self.settings, live
        )
        backend.collect_garbage(live)
        self._remove_versions(handle.directory, keep=live.name)
        handle.snapshot = Snapshot(manifest, backend)

    @staticmethod
    def _remove_versions(directory: Path, keep: str | None) -> None:
        for path in directory.iterdir():
            if path.is_dir() and _VERSION_DIR.match(path.name) and path.name != keep:
                shutil.rmtree(path, ignore_errors=True)

    def _commit(
        self,
        handle: IndexHandle,
        spec: dict[str, Any],
        add: list[Passage],
        delete: list[int],
        *,
        rebuild: bool = False,
    ) -> None:
        """Moves the index to its next version (see the module docstring); runs in a worker thread.

        With `rebuild`, the backend rebuilds its search structure first, and when that changes nothing
        (`Backend.rebuild` is False) nothing is committed.
        """
        old = handle.snapshot
        version = old.manifest.version if old else 0
        new_version = version + 1
        directory = handle.directory
        if handle.store is None:  # a new index
            directory.mkdir(parents=True, exist_ok=True)
            handle.store = PassageStore(directory, version)
            self._remove_versions(directory, keep=None)
        old_dir = directory / version_dir_name(version) if old else None
        new_dir = directory / version_dir_name(new_version)
        backend: Backend | None = None
        try:
            shutil.rmtree(new_dir, ignore_errors=True)
            backend = backend_class(handle.backend_name).open(directory, spec, self.settings, old_dir)
            if rebuild and not backend.rebuild():
                return
            rows = handle.store.stage(new_version, add, delete)
            backend.remove(delete)
            backend.add(rows)
            new_dir.mkdir()
            extra = backend.save(new_dir)
            fsync_tree(new_dir)
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
            handle.store.recover(version)
            if backend is not None:
                backend.discard(new_dir)
            shutil.rmtree(new_dir, ignore_errors=True)
            raise
        handle.snapshot = Snapshot(manifest, backend)
        handle.store.purge(before=version)
        if old is not None and old_dir is not None:
            old.backend.discard(old_dir)
            shutil.rmtree(old_dir, ignore_errors=True)

    # -- RPCs ----------------------------------------------------------------------------

    async def Ingest(
        self, requests: AsyncIterator[retriever_pb2.IngestRequest], ctx: CallContext
    ) -> retriever_pb2.IngestReport:
        backend_name = self._backend(ctx)
        start = time.perf_counter()
        index: str | None = None
        spec = common_pb2.IndexSpec()
        upsert = False
        passages: list[Passage] = []
        seen: set[str] = set()
        finished = False
        async for request in requests:
            if finished:
                raise invalid_argument("last", "a message followed the one marked last")
            finished = request.last
            if index is None:
                index = validation.name(request.index, "index", self.limits)
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

        handle = await self._handle(ctx, index, backend_name, create=True)
        async with handle.lock:
            if handle.snapshot is None:
                resolved = backend_class(backend_name).resolve_spec(_spec_dict(spec), self.settings)
                existing: dict[str, int] = {}
            else:
                resolved = handle.snapshot.manifest.spec
                version = handle.snapshot.manifest.version
                existing = handle.store.rowids_of_ids(version, [p.id for p in passages])
                if existing and not upsert:
                    first = next(p.id for p in passages if p.id in existing)
                    raise already_exists(f"passage {first!r} is already in index {index!r}")
            if passages or handle.snapshot is None:
                start = time.perf_counter()
                await asyncio.to_thread(self._commit, handle, resolved, passages, list(existing.values()))
                timings.append(_timing("index", start))
            total = await asyncio.to_thread(handle.store.count, handle.snapshot.manifest.version)
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
        (response,) = await self._search_queries([query], request, ctx)
        return response

    async def SearchBatch(
        self, request: retriever_pb2.SearchBatchRequest, ctx: CallContext
    ) -> retriever_pb2.SearchBatchResponse:
        queries = validation.queries(request.queries, "queries", self.limits)
        responses = await self._search_queries(queries, request, ctx)
        return retriever_pb2.SearchBatchResponse(responses=responses, version=responses[0].version)

    async def _search_queries(
        self,
        queries: list[str],
        request: retriever_pb2.SearchRequest | retriever_pb2.SearchBatchRequest,
        ctx: CallContext,
    ) -> list[retriever_pb2.SearchResponse]:
        """Search and SearchBatch after their queries are checked: one response per query."""
        backend_name = self._backend(ctx)
        index = validation.name(request.index, "index", self.limits)
        top_k = validation.top_k(request.top_k, "top_k", self.limits)
        options = self._options(backend_name, request.options)
        handle = await self._handle(ctx, index, backend_name)
        start = time.perf_counter()
        snapshot, results = await asyncio.to_thread(
            self._search, handle, queries, top_k, request.filters, request.with_continuation, options
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
        handle: IndexHandle,
        queries: list[str],
        top_k: int,
        filters: Mapping[str, str],
        with_continuation: bool,
        options: SearchOptions,
    ) -> tuple[Snapshot, list[list[common_pb2.ScoredPassage]]]:
        snapshot = handle.snapshot
        assert snapshot is not None and handle.store is not None
        version = snapshot.manifest.version
        if handle.store.count(version) == 0:
            raise failed_precondition(f"index {handle.index!r} is empty")
        allowed = handle.store.rowids_matching(version, filters) if filters else None
        hits = snapshot.backend.search(Query(queries, top_k, allowed, options))
        passages = handle.store.by_rowids(version, sorted({r for h in hits for r, _ in h}))
        results = []
        for query_hits in hits:
            scored = []
            for rowid, score in query_hits:
                passage = passages.get(rowid)
                if passage is None:  # purged by a commit that finished after this search began
                    continue
                item = common_pb2.ScoredPassage(
                    passage=_passage_pb(passage),
                    score=score,
                    retriever=handle.backend_name,
                    rank=len(scored) + 1,
                )
                if with_continuation:
                    following = handle.store.continuation(version, passage)
                    if following is not None:
                        item.continuation.CopyFrom(_passage_pb(following))
                scored.append(item)
            results.append(scored)
        return snapshot, results

    async def Delete(
        self, request: retriever_pb2.DeleteRequest, ctx: CallContext
    ) -> retriever_pb2.DeleteResponse:
        if not request.drop_index and not request.ids and not request.doc_ids:
            raise invalid_argument("ids", "give ids, doc_ids or drop_index")
        handle = await self._requested(request, ctx)
        async with handle.lock:
            _check_not_dropped(handle)
            version = handle.snapshot.manifest.version
            store = handle.store
            if request.drop_index:
                deleted = await asyncio.to_thread(store.count, version)
                reply_version = handle.version()
                await asyncio.to_thread(self._drop, handle)
                return retriever_pb2.DeleteResponse(deleted=deleted, version=reply_version)
            rowids = set((await asyncio.to_thread(store.rowids_of_ids, version, list(request.ids))).values())
            rowids |= set(await asyncio.to_thread(store.rowids_of_docs, version, list(request.doc_ids)))
            if rowids:
                await asyncio.to_thread(
                    self._commit, handle, handle.snapshot.manifest.spec, [], sorted(rowids)
                )
            return retriever_pb2.DeleteResponse(deleted=len(rowids), version=handle.version())

    async def Rebuild(
        self, request: retriever_pb2.RebuildRequest, ctx: CallContext
    ) -> retriever_pb2.RebuildResponse:
        handle = await self._requested(request, ctx)
        start = time.perf_counter()
        async with handle.lock:
            _check_not_dropped(handle)
            await asyncio.to_thread(self._commit, handle, handle.snapshot.manifest.spec, [], [], rebuild=True)
            return retriever_pb2.RebuildResponse(
                version=handle.version(), timings=[_timing("rebuild", start)]
            )

    def _drop(self, handle: IndexHandle) -> None:
        assert handle.snapshot is not None and handle.store is not None
        handle.snapshot.backend.collect_garbage(None)
        handle.store.close()
        handle.snapshot = None
        handle.store = None
        self._handles.pop((handle.tenant, handle.index, handle.backend_name), None)
        shutil.rmtree(handle.directory, ignore_errors=True)
        # Other backends' processes share the parent folder and may be dropping theirs right now.
        with contextlib.suppress(OSError):
            handle.directory.parent.rmdir()

    async def DescribeIndex(
        self, request: retriever_pb2.DescribeIndexRequest, ctx: CallContext
    ) -> retriever_pb2.IndexDescription:
        return await asyncio.to_thread(self._describe, await self._requested(request, ctx))

    def _describe(self, handle: IndexHandle) -> retriever_pb2.IndexDescription:
        snapshot = handle.snapshot
        assert snapshot is not None and handle.store is not None
        manifest = snapshot.manifest
        spec = manifest.spec
        size = sum(p.stat().st_size for p in handle.directory.rglob("*") if p.is_file())
        return retriever_pb2.IndexDescription(
            version=self._version(handle, snapshot),
            passages=handle.store.count(manifest.version),
            documents=handle.store.count_documents(manifest.version),
            spec=json_format.ParseDict(
                {**spec, "retrievers": [handle.backend_name]},
                common_pb2.IndexSpec(),
                ignore_unknown_fields=True,
            ),
            dimension=snapshot.backend.dimension,
            bytes_on_disk=size,
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
        for name in names:
            if validation.is_name(name) and load_manifest(root / name / backend_name) is not None:
                try:
                    handle = await self._handle(ctx, name, backend_name)
                except ServiceError:  # dropped meanwhile
                    continue
                described.append(await asyncio.to_thread(self._describe, handle))
        return retriever_pb2.ListIndexesResponse(indexes=described)
