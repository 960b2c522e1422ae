"""Tenant isolation: tenant b never sees or changes tenant a's index, by any route.

`run_tenants` needs a fleet whose services all map the bearer tokens `TOKENS` to tenants. Tenant a
ingests an index; then tenant b calls every Pipeline RPC and every Retriever RPC (directly, on the
retriever's own port) on that index name, with its own token, with forged tenant headers beside it,
and without a token. b must get NOT_FOUND (or, without a token, UNAUTHENTICATED) for every call that
names the index, never see it listed, and its own ingest under the same name must make its own
index. Afterwards a's folder is byte for byte what it was and a's search gives what it gave.

`pipeline_only_trap` is the same probe against a fleet whose retrievers were started without the
tokens: b, calling a retriever directly, must still not reach a's index.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

import ragfleet
from ragfleet.v1 import (
    common_pb2,
    pipeline_pb2,
    pipeline_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from tests.reliability.probes import corpus, tree_digest
from tools.fleet import LocalFleet

TOKENS = {"ta": "a", "tb": "b"}
FLEET_ENV = {"RAGFLEET_AUTH__TOKENS": json.dumps(TOKENS)}
SECRET = "secret"
# Metadata a caller might hope names its tenant; ragfleet reads the tenant from the token alone.
FORGED = [
    ("x-ragfleet-tenant", "a"),
    ("tenant", "a"),
    ("x-tenant", "a"),
    ("x-tenant-id", "a"),
    ("x-ragfleet-tenant-bin", b"a"),
]


@dataclass
class TenantReport:
    # "Retriever (forged tenant)" -> status code name -> calls
    calls: dict[str, Counter] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "calls": sum(sum(c.values()) for c in self.calls.values()),
            "codes": {where: dict(codes) for where, codes in self.calls.items()},
            "broken": self.broken[:10],
        }


def _bearer(token: str | None) -> list[tuple[str, Any]]:
    return [("authorization", f"Bearer {token}")] if token else []


def _pipeline_routes(stub: pipeline_pb2_grpc.PipelineStub) -> dict[str, Callable[[list], Any]]:
    spec = common_pb2.RetrievalSpec(index=SECRET, top_k=3)
    ask = pipeline_pb2.AskRequest(question="keeper", retrieval=spec)
    first = pipeline_pb2.PipelineIngestRequest(
        index=SECRET,
        documents=[common_pb2.Document(id="doc-0", text="overwritten by b")],
        upsert=True,
        last=True,
    )
    return {
        "Search": lambda md: stub.Search(
            pipeline_pb2.PipelineSearchRequest(query="keeper", retrieval=spec), metadata=md
        ),
        "SearchBatch": lambda md: stub.SearchBatch(
            pipeline_pb2.PipelineSearchBatchRequest(queries=["keeper"], retrieval=spec), metadata=md
        ),
        "Ask": lambda md: stub.Ask(ask, metadata=md),
        "AskStream": lambda md: list(stub.AskStream(ask, metadata=md)),
        "DescribeIndex": lambda md: stub.DescribeIndex(
            retriever_pb2.DescribeIndexRequest(index=SECRET), metadata=md
        ),
        "Rebuild": lambda md: stub.Rebuild(pipeline_pb2.PipelineRebuildRequest(index=SECRET), metadata=md),
        "Delete ids": lambda md: stub.Delete(
            retriever_pb2.DeleteRequest(index=SECRET, ids=["doc-0#0"]), metadata=md
        ),
        "Delete doc_ids": lambda md: stub.Delete(
            retriever_pb2.DeleteRequest(index=SECRET, doc_ids=["doc-0"]), metadata=md
        ),
        "Delete drop_index": lambda md: stub.Delete(
            retriever_pb2.DeleteRequest(index=SECRET, drop_index=True), metadata=md
        ),
        "ListIndexes": lambda md: stub.ListIndexes(retriever_pb2.ListIndexesRequest(), metadata=md),
        "Ingest": lambda md: stub.Ingest(iter([first]), metadata=md),
    }


def _retriever_routes(stub: retriever_pb2_grpc.RetrieverStub) -> dict[str, Callable[[list], Any]]:
    passage = common_pb2.Passage(id="doc-0#0", text="overwritten by b")
    return {
        "Search": lambda md: stub.Search(
            retriever_pb2.SearchRequest(query="keeper", index=SECRET, top_k=3), metadata=md
        ),
        "SearchBatch": lambda md: stub.SearchBatch(
            retriever_pb2.SearchBatchRequest(queries=["keeper"], index=SECRET, top_k=3), metadata=md
        ),
        "DescribeIndex": lambda md: stub.DescribeIndex(
            retriever_pb2.DescribeIndexRequest(index=SECRET), metadata=md
        ),
        "Rebuild": lambda md: stub.Rebuild(retriever_pb2.RebuildRequest(index=SECRET), metadata=md),
        "Delete ids": lambda md: stub.Delete(
            retriever_pb2.DeleteRequest(index=SECRET, ids=["doc-0#0"]), metadata=md
        ),
        "Delete doc_ids": lambda md: stub.Delete(
            retriever_pb2.DeleteRequest(index=SECRET, doc_ids=["doc-0"]), metadata=md
        ),
        "Delete drop_index": lambda md: stub.Delete(
            retriever_pb2.DeleteRequest(index=SECRET, drop_index=True), metadata=md
        ),
        "ListIndexes": lambda md: stub.ListIndexes(retriever_pb2.ListIndexesRequest(), metadata=md),
        "Ingest": lambda md: stub.Ingest(
            iter([retriever_pb2.IngestRequest(index=SECRET, passages=[passage], upsert=True, last=True)]),
            metadata=md,
        ),
    }


def _lists_secret(reply: Any) -> bool:
    names = [getattr(i, "index", "") or i.version.index for i in reply.indexes]
    return SECRET in names


def _probe(
    where: str,
    routes: dict[str, Callable[[list], Any]],
    metadata: list,
    report: TenantReport,
    expect: grpc.StatusCode,
    undo: Callable[[], None],
) -> None:
    """Every route with `metadata`: each call naming a's index must fail with `expect`, except
    ListIndexes (which must not list it) and Ingest (which, with a token, makes b's own index: `undo`
    drops it again)."""
    for route, call in routes.items():
        try:
            reply = call(metadata)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
        report.calls.setdefault(where, Counter())[code.name] += 1
        if route == "ListIndexes" and code == grpc.StatusCode.OK:
            if _lists_secret(reply):
                report.broken.append(f"{where} {route}: b was shown a's index")
        elif route == "Ingest" and code == grpc.StatusCode.OK and expect != grpc.StatusCode.UNAUTHENTICATED:
            undo()
        elif code != expect:
            report.broken.append(f"{where} {route}: {code.name}, expected {expect.name}")


def probe_fleet(
    fleet: LocalFleet, *, retriever_token: bool = True, forged: list[tuple[str, Any]] = FORGED
) -> TenantReport:
    """Tenant a's index against tenant b on every route (see the module docstring), plainly and with
    each of the `forged` headers. Without `retriever_token`, the direct retriever calls carry no
    token (the retriever runs open)."""
    report = TenantReport()
    folder = fleet.home / "indexes" / "a" / SECRET
    with (
        ragfleet.Client(fleet.address, token="ta", timeout=60) as a,
        ragfleet.Client(fleet.address, token="tb", timeout=60) as b,
        ragfleet.make_channel(fleet.address) as pipeline_channel,
        ragfleet.make_channel(fleet.services["retriever-bm25"].address) as retriever_channel,
    ):
        a.ingest(corpus(10), index=SECRET)
        before = [h.passage.id for h in a.search("keeper tide", index=SECRET, top_k=5).results]
        digest = tree_digest(folder)

        def undo() -> None:
            b.delete(index=SECRET, drop_index=True)

        pipeline = _pipeline_routes(pipeline_pb2_grpc.PipelineStub(pipeline_channel))
        retriever = _retriever_routes(retriever_pb2_grpc.RetrieverStub(retriever_channel))
        not_found, unauthenticated = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED
        for header in [None, *forged]:
            extra = [header] if header else []
            label = f"forged {header[0]}" if header else "b"
            _probe(f"Pipeline ({label})", pipeline, _bearer("tb") + extra, report, not_found, undo)
            _probe(f"Pipeline ({label}, no token)", pipeline, extra, report, unauthenticated, undo)
            direct = _bearer("tb") if retriever_token else []
            _probe(f"Retriever ({label})", retriever, direct + extra, report, not_found, undo)
            if retriever_token:
                _probe(f"Retriever ({label}, no token)", retriever, extra, report, unauthenticated, undo)
        try:
            after = [h.passage.id for h in a.search("keeper tide", index=SECRET, top_k=5).results]
        except ragfleet.errors.RagfleetError as err:
            after = [f"{type(err).__name__}: {err.details[:80]}"]
    if not folder.is_dir() or tree_digest(folder) != digest:
        report.broken.append(f"tenant a's index folder {folder} changed or is missing")
    if after != before:
        report.broken.append(f"a's search gave {after}, before {before}")
    return report


def pipeline_only_trap(fleet: LocalFleet) -> TenantReport:
    """Tenant a ingests while every service has the tokens; then the retriever restarts without them
    (the Pipeline keeps them). A retriever that refuses to start that way holds. Otherwise the Pipeline
    must refuse to use it: every Pipeline route, for a and for b, is FAILED_PRECONDITION; b calling the
    open retriever directly finds no index of a's; a's folder is unchanged, and once the retriever has
    its tokens back a's search gives what it gave."""
    report = TenantReport()
    folder = fleet.home / "indexes" / "a" / SECRET
    service = fleet.services["retriever-bm25"]
    with ragfleet.Client(fleet.address, token="ta", timeout=60) as a:
        a.ingest(corpus(10), index=SECRET)
        before = [h.passage.id for h in a.search("keeper tide", index=SECRET, top_k=5).results]
        with_tokens = dict(service.env)
        service.env = {k: v for k, v in with_tokens.items() if k != "RAGFLEET_AUTH__TOKENS"}
        try:
            fleet.restart("retriever-bm25")
        except RuntimeError:  # it refused to run open: the safe outcome
            report.calls["Retriever started without tokens"] = Counter({"refused to start": 1})
            return report
        # Taken once a's index is closed: closing it checkpoints SQLite's write-ahead log into its file.
        digest = tree_digest(folder)
        with (
            ragfleet.make_channel(fleet.address) as pipeline_channel,
            ragfleet.make_channel(service.address) as retriever_channel,
        ):
            retriever = retriever_pb2_grpc.RetrieverStub(retriever_channel)

            def went_through() -> None:
                report.broken.append("an ingest went through the Pipeline to a retriever that runs open")

            def undo() -> None:  # b's ingest on the open retriever made tenant default's index
                retriever.Delete(retriever_pb2.DeleteRequest(index=SECRET, drop_index=True))

            pipeline = _pipeline_routes(pipeline_pb2_grpc.PipelineStub(pipeline_channel))
            refused = grpc.StatusCode.FAILED_PRECONDITION
            for token in ("ta", "tb"):
                _probe(
                    f"Pipeline ({token}, retriever open)",
                    pipeline,
                    _bearer(token),
                    report,
                    refused,
                    went_through,
                )
            _probe(
                "Retriever (open)", _retriever_routes(retriever), [], report, grpc.StatusCode.NOT_FOUND, undo
            )
        if not folder.is_dir() or tree_digest(folder) != digest:
            report.broken.append(f"tenant a's index folder {folder} changed or is missing")
        service.env = with_tokens
        fleet.restart("retriever-bm25")
        after = [h.passage.id for h in a.search("keeper tide", index=SECRET, top_k=5).results]
    if after != before:
        report.broken.append(f"a's search gave {after}, before {before}")
    return report
