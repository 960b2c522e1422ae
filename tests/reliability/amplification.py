"""Requests at the documented limits (settings `Limits`, README "Configuration") and the memory they
cost the servers.

`run_amplification` sends each case of `cases(limits)` to a fleet whose servers run with `limits`:
the longest query, the largest top_k, filters, batches and documents the limits allow, documents cut
to just under `max_chunked_document_bytes` and `max_passages_per_document`; documents and Retriever
Ingest streams just past their limits, which must be refused; and a SearchBatch within the limits
over passages whose title and metadata are at theirs. Each case runs on a freshly started Pipeline and
Retriever whose peak resident memory is reset (/proc/PID/clear_refs) just before it: a case's cost
in a process is the peak during the case over the memory before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

import ragfleet
from ragfleet.v1 import common_pb2, pipeline_pb2, retriever_pb2
from services.runtime.settings import Limits, ServerSettings
from tests.reliability.probes import WORDS, memory_mb, reset_peak
from tools.fleet import LocalFleet

MIB = 1024 * 1024
INDEX = "amp"  # max_top_k light passages, each with max_filters metadata pairs
HEAVY = "amp-heavy"  # max_top_k passages whose title and metadata are at their limits
WRITTEN = "amp-written"  # what the ingest cases write
CALL_TIMEOUT = 300.0
PROCESSES = ("pipeline", "retriever-bm25")
OK = frozenset({grpc.StatusCode.OK})
REFUSED = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT})


def _words(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i * 3) % len(WORDS)] for i in range(n))


@dataclass(frozen=True)
class Case:
    name: str
    service: str  # the fleet's name of the service called
    method: str  # "/ragfleet.v1.Pipeline/Search"
    bodies: Callable[[], Iterable[bytes]]  # one body, or a client stream's
    expect: frozenset[grpc.StatusCode]  # OK, or the refusals the limit documents
    streaming: bool = False


def _unary(name: str, request: Message, expect: frozenset[grpc.StatusCode] = OK) -> Case:
    pipeline = isinstance(
        request, (pipeline_pb2.PipelineSearchRequest, pipeline_pb2.PipelineSearchBatchRequest)
    )
    service, proto = ("pipeline", "Pipeline") if pipeline else ("retriever-bm25", "Retriever")
    method = f"/ragfleet.v1.{proto}/{type(request).__name__.removeprefix('Pipeline').removesuffix('Request')}"
    return Case(name, service, method, lambda: [request.SerializeToString()], expect)


def _document(name: str, expect: frozenset[grpc.StatusCode], text: str, **fields: Any) -> Case:
    """A Pipeline Ingest of one document: `fields` are its title and metadata and the chunking."""
    metadata = fields.pop("metadata", {})
    document = common_pb2.Document(id="big", title=fields.pop("title", ""), text=text, metadata=metadata)
    spec = common_pb2.IndexSpec(chunking=common_pb2.ChunkingSpec(**fields))
    request = pipeline_pb2.PipelineIngestRequest(
        index=WRITTEN, spec=spec, documents=[document], upsert=True, last=True
    )
    return Case(
        name,
        "pipeline",
        "/ragfleet.v1.Pipeline/Ingest",
        lambda: [request.SerializeToString()],
        expect,
        streaming=True,
    )


def _passages(
    n: int, *, title: str = "", metadata_bytes: int = 0, id_chars: int = 0
) -> Iterator[common_pb2.Passage]:
    """`n` short passages; with `metadata_bytes`, metadata of that size; ids padded to `id_chars`."""
    pad = {"m": "x" * (metadata_bytes - 1)} if metadata_bytes else {}
    for i in range(n):
        passage_id = f"s{i}".rjust(id_chars, "0")
        yield common_pb2.Passage(
            id=passage_id, text=f"tide {WORDS[i % len(WORDS)]}", title=title, metadata=pad
        )


def _stream(index: str, passages: Iterable[common_pb2.Passage], per_message: int) -> Iterator[bytes]:
    """A Retriever Ingest stream of `passages`, `per_message` to a message, the last marked last."""
    batch: list[common_pb2.Passage] = []
    name = index
    for passage in passages:
        batch.append(passage)
        if len(batch) == per_message:
            yield retriever_pb2.IngestRequest(index=name, passages=batch).SerializeToString()
            batch, name = [], ""
    yield retriever_pb2.IngestRequest(index=name, passages=batch, last=True).SerializeToString()


def _ingest_stream(
    name: str,
    passages: Callable[[], Iterable[common_pb2.Passage]],
    per_message: int,
    expect: frozenset[grpc.StatusCode] = REFUSED,
    index: str = WRITTEN,
) -> Case:
    return Case(
        name,
        "retriever-bm25",
        "/ragfleet.v1.Retriever/Ingest",
        lambda: _stream(index, passages(), per_message),
        expect,
        streaming=True,
    )


def cases(limits: Limits) -> list[Case]:
    """Each documented limit, reached or just passed."""
    top_k = limits.max_top_k
    query = _words(limits.max_query_chars)[: limits.max_query_chars].strip()
    filters = {f"f{i}": "1" for i in range(limits.max_filters)}
    wide = [_words(4, i) for i in range(limits.max_batch_queries)]
    wide_top_k = max(1, limits.max_batch_results // limits.max_batch_queries)
    deep = [_words(3, i) for i in range(limits.max_batch_results // top_k)]
    # Over heavy passages, enough queries for a reply of twice server.max_message_bytes (the limits
    # may allow many more: a reply of gigabytes), at most len(deep).
    heavy_passage = limits.max_title_bytes + limits.max_metadata_bytes
    heavy_queries = deep[: -(-2 * ServerSettings().max_message_bytes // (top_k * heavy_passage))]
    # The largest document, cut into as many passages as fit max_chunked_document_bytes with the
    # title and metadata (at their limits) copied into each.
    text = ("tide " * (limits.max_document_bytes // 5))[: limits.max_document_bytes - limits.max_title_bytes]
    heavy = {"title": "t" * limits.max_title_bytes, "metadata": {"m": "x" * (limits.max_metadata_bytes - 1)}}
    fitting = (limits.max_chunked_document_bytes - len(text)) // (
        limits.max_title_bytes + limits.max_metadata_bytes + 64
    ) - 10  # margin: windows overlap by a few tokens
    max_passages = _words(limits.max_passages_per_document)
    sentences = ("a. " * (limits.max_document_bytes // 3)).rstrip()
    past_bytes = limits.max_ingest_bytes // limits.max_metadata_bytes + 2
    pipeline_search = pipeline_pb2.PipelineSearchRequest
    spec = common_pb2.RetrievalSpec
    return [
        _unary(
            "Search: max_query_chars, max_top_k",
            pipeline_search(query=query, retrieval=spec(index=INDEX, top_k=top_k)),
        ),
        _unary(
            "Search: max_filters filters, max_top_k",
            pipeline_search(query="tide keeper", retrieval=spec(index=INDEX, top_k=top_k, filters=filters)),
        ),
        _unary(
            f"SearchBatch: max_batch_queries x top_k {wide_top_k}",
            pipeline_pb2.PipelineSearchBatchRequest(
                queries=wide, retrieval=spec(index=INDEX, top_k=wide_top_k)
            ),
            OK | REFUSED,
        ),
        _unary(
            f"SearchBatch: {len(deep)} queries x max_top_k",
            pipeline_pb2.PipelineSearchBatchRequest(queries=deep, retrieval=spec(index=INDEX, top_k=top_k)),
            OK | REFUSED,
        ),
        _unary(
            f"Retriever SearchBatch: {len(deep)} queries x max_top_k",
            retriever_pb2.SearchBatchRequest(queries=deep, index=INDEX, top_k=top_k),
            OK | REFUSED,
        ),
        _unary(
            f"Retriever SearchBatch: {len(heavy_queries)} queries x max_top_k over passages with title and "
            "metadata at their limits",
            retriever_pb2.SearchBatchRequest(queries=heavy_queries, index=HEAVY, top_k=top_k),
            OK | REFUSED,
        ),
        _document(
            f"Ingest: max_document_bytes with title and metadata at their limits, in {fitting} passages",
            OK,
            text,
            chunk_tokens=len(text) // 5 // fitting + 2,
            overlap_tokens=1,
            **heavy,
        ),
        _document("Ingest: max_passages_per_document passages", OK, max_passages, chunk_tokens=1),
        _document(
            "Ingest: max_document_bytes sentence-aware, max_chunk_tokens",
            OK,
            sentences,
            chunk_tokens=limits.max_chunk_tokens,
            sentence_aware=True,
        ),
        _document("Ingest: past max_passages_per_document", REFUSED, text, chunk_tokens=1),
        _document("Ingest: past max_chunked_document_bytes", REFUSED, max_passages, chunk_tokens=1, **heavy),
        _ingest_stream(
            "Retriever Ingest: max_top_k passages, ids of max_id_chars, index name of max_index_name_chars",
            lambda: _passages(top_k, id_chars=limits.max_id_chars),
            256,
            OK,
            "n" * limits.max_index_name_chars,
        ),
        _ingest_stream(
            "Retriever Ingest: a stream just past max_ingest_bytes",
            lambda: _passages(past_bytes, metadata_bytes=limits.max_metadata_bytes - 16),
            64,
        ),
        _ingest_stream(
            "Retriever Ingest: a stream just past max_ingest_passages",
            lambda: _passages(limits.max_ingest_passages + 1),
            4096,
        ),
    ]


@dataclass
class Row:
    """What one case did: its status, sizes, time, and each process's resident MiB before, at the
    peak and after."""

    case: str
    code: str
    detail: str
    seconds: float
    request_mb: float
    reply_mb: float
    memory: dict[str, dict[str, float]] = field(default_factory=dict)

    def growth(self, process: str) -> float:
        return self.memory[process]["peak"] - self.memory[process]["before"]

    def summary(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "code": self.code,
            "detail": self.detail[:200],
            "seconds": round(self.seconds, 2),
            "request_mb": round(self.request_mb, 2),
            "reply_mb": round(self.reply_mb, 2),
            **{f"{p}_growth_mb": round(self.growth(p), 1) for p in self.memory},
            **{f"{p}_rss_after_mb": self.memory[p]["after"] for p in self.memory},
        }


def problems(case: Case, row: Row, bound_mb: float) -> list[str]:
    """A case holds when it ends as its limit documents, a refusal names the limit (it was checked
    before the work, not hit by gRPC's message cap after it), and no process grew past `bound_mb`."""
    found = []
    if grpc.StatusCode[row.code] not in case.expect:
        found.append(f"{row.code} ({row.detail[:160]}), expected {sorted(c.name for c in case.expect)}")
    elif row.code != "OK" and "limits." not in row.detail:
        found.append(f"refused without naming a limit: {row.code} ({row.detail[:160]})")
    for process in row.memory:
        if row.growth(process) > bound_mb:
            found.append(f"{process} grew {row.growth(process):.0f} MiB, over {bound_mb:.0f} MiB")
    return found


def prepare(fleet: LocalFleet, limits: Limits) -> None:
    """The indexes the searches read: max_top_k passages each, light ones and heavy ones."""
    retriever = fleet.services["retriever-bm25"].address
    metadata = {f"f{i}": "1" for i in range(limits.max_filters)}
    light = (
        common_pb2.Passage(id=f"s{i}", text=_words(12, i), metadata=metadata) for i in range(limits.max_top_k)
    )
    heavy = _passages(
        limits.max_top_k, title="t" * limits.max_title_bytes, metadata_bytes=limits.max_metadata_bytes
    )
    with ragfleet.make_channel(retriever) as channel:
        ingest = channel.stream_unary("/ragfleet.v1.Retriever/Ingest")
        ingest(_stream(INDEX, light, 256), timeout=CALL_TIMEOUT)
        ingest(_stream(HEAVY, heavy, 32), timeout=CALL_TIMEOUT)


def _fresh(fleet: LocalFleet) -> None:
    """Restarts the servers (so that memory another case freed is not reused unseen) and loads the
    indexes the cases read."""
    for name in PROCESSES:
        fleet.restart(name)
    with ragfleet.Client(fleet.address, timeout=CALL_TIMEOUT) as client:
        for index in (INDEX, HEAVY):
            client.search("tide", index=index, top_k=1)


def run_case(fleet: LocalFleet, case: Case, *, fresh: bool = True) -> Row:
    """The case, measured; on freshly started servers unless `fresh` is False (quicker, but memory
    that an earlier case freed may be reused unseen)."""
    if fresh:
        _fresh(fleet)
    pids = {name: fleet.pid(name) for name in PROCESSES}
    before = {}
    for name, pid in pids.items():
        reset_peak(pid)
        before[name] = memory_mb(pid)["rss"]
    sent = 0

    def counted(bodies: Iterable[bytes]) -> Iterator[bytes]:
        nonlocal sent
        for body in bodies:
            sent += len(body)
            yield body

    start = time.monotonic()
    reply = b""
    code, detail = grpc.StatusCode.OK, ""
    with ragfleet.make_channel(fleet.services[case.service].address) as channel:
        try:
            if case.streaming:
                reply = channel.stream_unary(case.method)(counted(case.bodies()), timeout=CALL_TIMEOUT)
            else:
                (body,) = counted(case.bodies())
                reply = channel.unary_unary(case.method)(body, timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            code, detail = err.code(), err.details() or ""
    seconds = time.monotonic() - start
    memory = {}
    for name, pid in pids.items():
        now = memory_mb(pid)
        memory[name] = {"before": before[name], "peak": now["hwm"], "after": now["rss"]}
    return Row(case.name, code.name, detail, seconds, sent / MIB, len(reply) / MIB, memory)


def run_amplification(fleet: LocalFleet, limits: Limits, bound_mb: float) -> list[tuple[Row, list[str]]]:
    """Every case against `fleet` (whose servers run with `limits`), on servers started once: each
    row and its problems."""
    prepare(fleet, limits)
    rows = []
    for case in cases(limits):
        row = run_case(fleet, case, fresh=False)
        rows.append((row, problems(case, row, bound_mb)))
    return rows
