"""Concurrent ingest / upsert / delete / drop / search on one index, and the invariants after each round.

`run_races` drives a RetrieverService in-process (real bm25 backend, real threads): each round gathers
many calls in random order, then checks, with nothing in flight,
- the index is absent (no manifest, no version folder) or at a complete version: the manifest names an
  existing folder and no other version folder is left;
- the passage store's live rows at that version are the backend's rows;
- the service serves what is on disk (DescribeIndex gives the manifest's version and passage count);
- every passage is where the acknowledged calls put it (see `_check_passages`);
and at the end that a fresh RetrieverService on the same home serves the index. Some calls are
cancelled part way, as a deadline would (neither acknowledged nor failed: either outcome is right).
A call that fails with anything but NOT_FOUND or FAILED_PRECONDITION (absent or empty index) is a
broken call.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ragfleet.v1 import common_pb2, retriever_pb2
from services.retriever.bm25 import BM25Backend
from services.retriever.passages import DB_NAME
from services.retriever.service import RetrieverService
from services.runtime.context import CallContext
from services.runtime.errors import ServiceError
from services.runtime.settings import Settings
from services.runtime.storage import load_manifest, version_dir_name

INDEX = "race"
POOL = [f"p{i}" for i in range(8)]  # the ids that upserts and deletes fight over
EXPECTED_CODES = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}
WRITES = ("upsert", "add")
REMOVALS = ("delete", "drop")
CANCELLED = 0.1  # the share of calls cancelled part way


@dataclass
class Op:
    kind: str
    passage_id: str | None
    token: str | None
    start: float
    end: float = 0.0
    ok: bool = False


@dataclass
class Report:
    rounds: int = 0
    calls: int = 0
    broken_calls: list[str] = field(default_factory=list)
    broken_invariants: list[str] = field(default_factory=list)

    @property
    def broken(self) -> int:
        return len(self.broken_calls) + len(self.broken_invariants)


async def _one(*requests: retriever_pb2.IngestRequest) -> AsyncIterator[retriever_pb2.IngestRequest]:
    for request in requests:
        yield request


def _ingest(passage_id: str, token: str, upsert: bool) -> AsyncIterator[retriever_pb2.IngestRequest]:
    passage = common_pb2.Passage(id=passage_id, text=f"alpha {token}", metadata={"token": token})
    return _one(retriever_pb2.IngestRequest(index=INDEX, passages=[passage], upsert=upsert, last=True))


async def _call(service: RetrieverService, op: Op, ctx: CallContext, report: Report) -> None:
    await asyncio.sleep(random.random() * 0.003)
    op.start = time.monotonic()
    cancel_after = random.uniform(0.001, 0.05) if random.random() < CANCELLED else None
    try:
        await asyncio.wait_for(_send(service, op, ctx), timeout=cancel_after)
        op.ok = True
    except TimeoutError:
        pass
    except ServiceError as err:
        if err.code not in EXPECTED_CODES:
            report.broken_calls.append(f"{op.kind}: {err}")
    except Exception as err:  # what the server would turn into INTERNAL
        report.broken_calls.append(f"{op.kind}: {type(err).__name__}: {err}")
    op.end = time.monotonic()


async def _send(service: RetrieverService, op: Op, ctx: CallContext) -> None:
    if op.kind in WRITES:
        await service.Ingest(_ingest(op.passage_id, op.token, op.kind == "upsert"), ctx)
    elif op.kind == "delete":
        await service.Delete(retriever_pb2.DeleteRequest(index=INDEX, ids=[op.passage_id]), ctx)
    elif op.kind == "drop":
        await service.Delete(retriever_pb2.DeleteRequest(index=INDEX, drop_index=True), ctx)
    elif op.kind == "search":
        await service.Search(retriever_pb2.SearchRequest(index=INDEX, query="alpha", top_k=50), ctx)
    elif op.kind == "batch":
        request = retriever_pb2.SearchBatchRequest(index=INDEX, queries=["alpha", "w1 w2"], top_k=5)
        await service.SearchBatch(request, ctx)
    elif op.kind == "describe":
        await service.DescribeIndex(retriever_pb2.DescribeIndexRequest(index=INDEX), ctx)
    elif op.kind == "list":
        await service.ListIndexes(retriever_pb2.ListIndexesRequest(), ctx)


def _plan(n: int, counter: list[int]) -> list[Op]:
    kinds = ["upsert"] * 6 + ["add"] * 2 + ["delete"] * 2 + ["drop"] + ["search"] * 3 + ["batch", "describe"]
    kinds += ["list"]
    ops = []
    for _ in range(n):
        kind = random.choice(kinds)
        counter[0] += 1
        token = f"w{counter[0]}"
        passage_id = {"upsert": random.choice(POOL), "add": f"new{counter[0]}", "delete": random.choice(POOL)}
        ops.append(Op(kind, passage_id.get(kind), token if kind in WRITES else None, 0.0))
    return ops


def disk_passages(directory: Path) -> dict[str, str] | None:
    """id -> token of the passages live at the committed version; None when the index is absent."""
    manifest = load_manifest(directory)
    if manifest is None:
        return None
    db = sqlite3.connect(f"file:{directory / DB_NAME}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT id, json_extract(metadata, '$.token') FROM passages WHERE added_version <= ?"
            " AND (deleted_version IS NULL OR deleted_version > ?)",
            (manifest.version, manifest.version),
        ).fetchall()
    finally:
        db.close()
    return dict(rows)


def _check_disk(directory: Path, settings: Settings) -> list[str]:
    """The on-disk invariants of the index directory, with no call in flight."""
    problems = []
    manifest = load_manifest(directory)
    versions = sorted(p.name for p in directory.glob("v0*") if p.is_dir()) if directory.is_dir() else []
    if manifest is None:
        if versions:
            problems.append(f"no manifest, yet version folders {versions}")
        return problems
    live = version_dir_name(manifest.version)
    if versions != [live]:
        problems.append(f"manifest names {live}, folders on disk {versions}")
        if live not in versions:
            return problems
    db = sqlite3.connect(f"file:{directory / DB_NAME}?mode=ro", uri=True)
    try:
        rowids = {
            r
            for (r,) in db.execute(
                "SELECT rowid FROM passages WHERE added_version <= ?"
                " AND (deleted_version IS NULL OR deleted_version > ?)",
                (manifest.version, manifest.version),
            )
        }
    finally:
        db.close()
    backend = BM25Backend.open(directory, manifest.spec, settings, directory / live)
    if set(backend.rowids.tolist()) != rowids or len(backend.rowids) != len(rowids):
        problems.append(f"passage store rows {sorted(rowids)} != bm25 rows {sorted(backend.rowids.tolist())}")
    return problems


def _check_passages(ops: list[Op], state: dict[str, str] | None) -> list[str]:
    """Each passage's final state against the calls' real-time order (a call that ended before another
    began took effect first):
    - a passage present with a write's token: no acknowledged upsert, delete or drop of it began
      after that write ended (else the later call was lost, or the write came back);
    - a passage absent: some delete or drop (of any outcome) did not end before its last
      acknowledged write began (else that write was lost).
    """
    state = state or {}
    problems = []
    writes = {op.token: op for op in ops if op.kind in WRITES}
    for passage_id in {op.passage_id for op in ops if op.kind in WRITES}:
        affecting = [
            op for op in ops if op.kind == "drop" or (op.passage_id == passage_id and op.kind != "add")
        ]
        token = state.get(passage_id)
        if token is not None:
            write = writes.get(token)
            if write is None:
                problems.append(f"{passage_id} holds {token}, which no call wrote")
                continue
            later = [op for op in affecting if op.ok and op is not write and op.start > write.end]
            if later:
                problems.append(f"{passage_id} holds {token}, yet a later acknowledged {later[0].kind} began")
            continue
        acked = [op for op in ops if op.kind in WRITES and op.passage_id == passage_id and op.ok]
        for write in acked:
            if all(op.end < write.start for op in affecting if op.kind in REMOVALS):
                problems.append(f"{passage_id}: acknowledged {write.kind} of {write.token} was lost")
                break
    return problems


async def _describe_matches(service: RetrieverService, ctx: CallContext, directory: Path) -> list[str]:
    manifest = load_manifest(directory)
    try:
        described = await service.DescribeIndex(retriever_pb2.DescribeIndexRequest(index=INDEX), ctx)
    except ServiceError as err:
        if err.code == grpc.StatusCode.NOT_FOUND and manifest is None:
            return []
        return [f"DescribeIndex: {err}"]
    except Exception as err:
        return [f"DescribeIndex: {type(err).__name__}: {err}"]
    if manifest is None:
        return [f"the service serves version {described.version.version} of an index absent on disk"]
    on_disk = len(disk_passages(directory) or {})
    if (described.version.version, described.passages) != (manifest.version, on_disk):
        return [
            f"the service serves v{described.version.version} ({described.passages} passages), "
            f"disk v{manifest.version} ({on_disk})"
        ]
    return []


async def _reopen(settings: Settings, ctx: CallContext, directory: Path) -> list[str]:
    """A fresh service on the same home serves the index (or finds it absent), and takes an ingest."""
    fresh = RetrieverService(settings, ["bm25"])
    problems = await _describe_matches(fresh, ctx, directory)
    try:
        await fresh.Ingest(_ingest("after-restart", "restart", True), ctx)
        await fresh.Search(retriever_pb2.SearchRequest(index=INDEX, query="restart", top_k=1), ctx)
        await fresh.Delete(retriever_pb2.DeleteRequest(index=INDEX, ids=["after-restart"]), ctx)
    except Exception as err:
        problems.append(f"after a restart: {type(err).__name__}: {err}")
    return problems


async def run_races(
    home: Path, *, rounds: int, calls_per_round: int, seconds: float, seed: int = 0
) -> Report:
    """Runs up to `rounds` rounds (stopping early once `seconds` have passed) and reports what broke."""
    random.seed(seed)
    settings = Settings(home=home)
    service = RetrieverService(settings, ["bm25"])
    ctx = CallContext(tenant="racer")
    directory = home / "indexes" / ctx.tenant / INDEX / "bm25"
    report = Report()
    counter = [0]
    history: list[Op] = []
    deadline = time.monotonic() + seconds
    while report.rounds < rounds and time.monotonic() < deadline:
        ops = _plan(calls_per_round, counter)
        await asyncio.gather(*(_call(service, op, ctx, report) for op in ops))
        report.rounds += 1
        report.calls += len(ops)
        history += ops
        problems = _check_disk(directory, settings)
        if not problems:
            problems += _check_passages(history, disk_passages(directory))
            problems += await _describe_matches(service, ctx, directory)
        report.broken_invariants += [f"round {report.rounds}: {p}" for p in problems]
    report.broken_invariants += [f"reopen: {p}" for p in await _reopen(settings, ctx, directory)]
    return report
