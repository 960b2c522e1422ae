"""Hostile input against running services: every RPC's fields, and raw bytes as request bodies.

`run_hostile` calls each RPC of the Pipeline and of a Retriever over a generic gRPC channel (bytes in,
bytes out), with
- structured requests (hypothesis): mostly a valid request (`bases`) with one or two fields, at any
  depth, set to hostile values, else every field drawn from the message's descriptor. Hostile values
  are strings with control characters, huge strings, names that are almost valid, negative and huge
  ints, NaN and infinite floats, unknown retrievers and fusion methods, thousands of filters or
  queries. A third get a string field overwritten on the wire with bytes that are not UTF-8 (a
  protobuf parser keeps the last value of a field and merges repeated sub-messages, so one appended
  record reaches any string at any depth);
- raw bodies: random bytes, and valid requests cut short;
- now and then hostile call metadata: binary values that are not UTF-8, malformed deadlines and
  tokens, unknown retriever names.
Every call must end OK or with a documented code (`probes.DOCUMENTED_CODES`), never UNKNOWN or
INTERNAL. Writes (Ingest, Delete) name other indexes than the fixed one that reads use, so that
`attack_fleet` can check that the fixed index's folder is byte for byte what it was.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import ragfleet
from ragfleet.v1 import common_pb2, pipeline_pb2, retriever_pb2
from services.runtime.calls import RpcMethod, rpc_methods
from tests.reliability.probes import DOCUMENTED_CODES, WORDS, corpus, serving, tree_digest
from tools.fleet import LocalFleet

CALL_TIMEOUT = 20.0
HUGE = 300_000  # characters of a huge string (the Pipeline's documents may hold 2 MiB)
WRITES = frozenset({"Ingest", "Delete"})
WRITTEN = "written"  # the index that valid writes go to
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
LIMITS = (0, 1, 2, 5, 64, 65, 128, 129, 512, 513, 1000, 1001, 4096, 4097, 8192, 8193, 10_000, 100_000)


@dataclass
class RpcTally:
    structured: int = 0
    raw: int = 0
    codes: Counter = field(default_factory=Counter)


@dataclass
class Report:
    rpcs: dict[str, RpcTally] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)  # calls that ended with an undocumented code
    seconds: float = 0.0

    @property
    def calls(self) -> int:
        return sum(t.structured + t.raw for t in self.rpcs.values())

    def summary(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "broken": len(self.broken),
            "seconds": round(self.seconds, 1),
            "rpcs": {
                name: {"structured": t.structured, "raw": t.raw, "codes": dict(sorted(t.codes.items()))}
                for name, t in self.rpcs.items()
            },
            "first_broken": self.broken[:5],
        }


# --- strategies -------------------------------------------------------------------------------------


def _huge(chars: str) -> st.SearchStrategy[str]:
    return st.builds(lambda c, n: c * n, st.sampled_from(chars), st.integers(1, HUGE))


_TEXT = st.one_of(
    st.text(max_size=24),  # any code point but surrogates: control characters, NUL, RTL marks
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=24),
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join),
    _huge(["a", "a. ", " ", "\x00", "é", "文", "\n", "#"]),
    st.sampled_from(["", " ", "\n", "x" * 4097, "../../etc", "a\n", ".", "..", "a/b", "-", "\ud7ff"]),
)


def _index(fixed: str, writes: bool) -> st.SearchStrategy[str]:
    names = [WRITTEN, "no-such-index", "x" * 128, "x" * 129, "bad name", "a\n", ".."]
    return st.one_of(st.sampled_from(names if writes else [fixed, fixed, *names]), _TEXT)


# Field names whose values mean something: drawn mostly from values close to what a caller sends.
_HINTS: dict[str, st.SearchStrategy[str]] = {
    "retrievers": st.sampled_from(["bm25", "dense", "colbert", "sparse", "BM25", ""]) | _TEXT,
    "method": st.sampled_from(["rrf", "weighted", "RRF", "borda", ""]) | _TEXT,
    "backend": st.sampled_from(["cross_encoder", "first", "nope", ""]) | _TEXT,
    "vector_store": st.sampled_from(["faiss", "chroma", "milvus", ""]) | _TEXT,
    "faiss_index": st.sampled_from(["flat", "ivf", "hnsw", "lsh", ""]) | _TEXT,
    "id": st.sampled_from(["d1", "d1#0", "#", "a#b#c", "x" * 513]) | _TEXT,
}


def _ints(bounds: tuple[int, int]) -> st.SearchStrategy[int]:
    low, high = bounds
    edges = [low, low + 1, -1, high - 1, high] + [v for v in LIMITS if v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


_FLOATS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 3.4e38, -1.0]), st.floats(width=32)
)
_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: _ints(INT32),
    FieldDescriptor.TYPE_INT64: _ints(INT64),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FLOAT: _FLOATS,
    FieldDescriptor.TYPE_DOUBLE: _FLOATS,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
}


def _string(f: FieldDescriptor, fixed: str, writes: bool) -> st.SearchStrategy[str]:
    if f.name == "index":
        return _index(fixed, writes)
    return _HINTS.get(f.name, _TEXT)


def _value(f: FieldDescriptor, fixed: str, writes: bool, depth: int) -> st.SearchStrategy[Any]:
    """One (non-repeated) value of field `f`."""
    if f.type == FieldDescriptor.TYPE_STRING:
        return _string(f, fixed, writes)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if f.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in f.enum_type.values] + [-1, 99])
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return _message(f.message_type, fixed, writes, depth + 1)
    return _SCALARS[f.type]


def _many(f: FieldDescriptor, fixed: str, writes: bool, depth: int) -> st.SearchStrategy[Any]:
    """A repeated field's or map's values: a few, or thousands (filters, queries, documents)."""
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        key, value = (
            _value(f.message_type.fields_by_name[n], fixed, writes, depth) for n in ("key", "value")
        )
        thousands = st.integers(60, 3000).map(lambda n: {f"k{i}": "v" for i in range(n)})
        if f.message_type.fields_by_name["value"].type != FieldDescriptor.TYPE_STRING:
            thousands = st.integers(60, 3000).map(lambda n: {f"k{i}": 1.0 for i in range(n)})
        return st.one_of(st.dictionaries(key, value, max_size=6), thousands)
    one = _value(f, fixed, writes, depth)
    few = st.lists(one, max_size=6 if depth < 2 else 2)
    if f.type == FieldDescriptor.TYPE_STRING:
        return st.one_of(few, st.integers(4000, 5000).map(lambda n: ["tide"] * n))
    return few


def _message(descriptor: Descriptor, fixed: str, writes: bool, depth: int = 0) -> st.SearchStrategy[Message]:
    cls = GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    optional = {
        f.name: _many(f, fixed, writes, depth) if f.is_repeated else _value(f, fixed, writes, depth)
        for f in descriptor.fields
    }
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _build(cls, values))


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        _set(message, cls.DESCRIPTOR.fields_by_name[name], value)
    return message


def _set(message: Message, f: FieldDescriptor, value: Any) -> None:
    if f.is_repeated or f.message_type is not None:
        message.ClearField(f.name)
    target = getattr(message, f.name)
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        target.update(value)
    elif f.is_repeated and f.message_type is not None:
        for item in value:
            target.add().CopyFrom(item)
    elif f.is_repeated:
        target.extend(value)
    elif f.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(message, f.name, value)


def bases(fixed: str) -> dict[str, Message]:
    """A valid request of each RPC ("Pipeline.Search"), which mutations start from: reads name the
    fixed index, writes another one. An RPC left out starts from its empty request."""
    spec = common_pb2.RetrievalSpec(index=fixed, top_k=5)
    document = common_pb2.Document(id="d1", title="t", text="tide keeper. granite reef.", metadata={"g": "1"})
    passage = common_pb2.Passage(id="p1#0", doc_id="p1", text="tide keeper", metadata={"g": "1"})
    chunking = common_pb2.IndexSpec(chunking=common_pb2.ChunkingSpec(chunk_tokens=16))
    ask = pipeline_pb2.AskRequest(question="who keeps the tide?", retrieval=spec)
    return {
        "Pipeline.Ingest": pipeline_pb2.PipelineIngestRequest(
            index=WRITTEN, documents=[document], spec=chunking, upsert=True, last=True
        ),
        "Pipeline.Search": pipeline_pb2.PipelineSearchRequest(query="keeper tide", retrieval=spec),
        "Pipeline.SearchBatch": pipeline_pb2.PipelineSearchBatchRequest(
            queries=["keeper", "reef"], retrieval=spec
        ),
        "Pipeline.Ask": ask,
        "Pipeline.AskStream": ask,
        "Pipeline.Delete": retriever_pb2.DeleteRequest(index=WRITTEN, ids=["d1#0"]),
        "Pipeline.Rebuild": pipeline_pb2.PipelineRebuildRequest(index=fixed),
        "Pipeline.DescribeIndex": retriever_pb2.DescribeIndexRequest(index=fixed),
        "Retriever.Ingest": retriever_pb2.IngestRequest(
            index=WRITTEN, passages=[passage], upsert=True, last=True
        ),
        "Retriever.Search": retriever_pb2.SearchRequest(query="keeper", index=fixed, top_k=5),
        "Retriever.SearchBatch": retriever_pb2.SearchBatchRequest(
            queries=["keeper", "reef"], index=fixed, top_k=5
        ),
        "Retriever.Delete": retriever_pb2.DeleteRequest(index=WRITTEN, ids=["p1#0"]),
        "Retriever.DescribeIndex": retriever_pb2.DescribeIndexRequest(index=fixed),
        "Retriever.Rebuild": retriever_pb2.RebuildRequest(index=fixed),
    }


def _field_paths(descriptor: Descriptor, depth: int = 0) -> list[tuple[FieldDescriptor, ...]]:
    """Every field, and every field of sub-messages (the first element of a repeated one)."""
    paths: list[tuple[FieldDescriptor, ...]] = []
    for f in descriptor.fields:
        paths.append((f,))
        nested = f.message_type is not None and not f.message_type.GetOptions().map_entry
        if nested and depth < 2:
            paths += [(f, *rest) for rest in _field_paths(f.message_type, depth + 1)]
    return paths


def _mutate(base: Message, changes: list[tuple[tuple[FieldDescriptor, ...], Any]]) -> Message:
    message = type(base)()
    message.CopyFrom(base)
    for path, value in changes:
        target = message
        for f in path[:-1]:
            held = getattr(target, f.name)
            target = (held[0] if len(held) else held.add()) if f.is_repeated else held
        _set(target, path[-1], value)
    return message


def _mutated(base: Message, fixed: str, writes: bool) -> st.SearchStrategy[Message]:
    """The valid `base` with one or two fields (at any depth) set to hostile values."""

    def change(path: tuple[FieldDescriptor, ...]) -> st.SearchStrategy[tuple[Any, Any]]:
        last, depth = path[-1], len(path) - 1
        values = _many(last, fixed, writes, depth) if last.is_repeated else _value(last, fixed, writes, depth)
        return values.map(lambda v: (path, v))

    paths = _field_paths(base.DESCRIPTOR)
    if not paths:
        return st.just(base)
    changes = st.lists(st.sampled_from(paths).flatmap(change), min_size=1, max_size=2)
    return changes.map(lambda c: _mutate(base, c))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string_paths(descriptor: Descriptor, depth: int = 0) -> list[tuple[int, ...]]:
    """Field-number paths to every string field, through sub-messages (and map entries)."""
    paths: list[tuple[int, ...]] = []
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            paths.append((f.number,))
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth < 3:
            paths += [(f.number, *rest) for rest in _string_paths(f.message_type, depth + 1)]
    return paths


def _record(path: tuple[int, ...], raw: bytes) -> bytes:
    """The wire record that sets the string at `path` to `raw` when appended to a message."""
    payload = raw
    for number in reversed(path):
        payload = _varint(number << 3 | 2) + _varint(len(payload)) + payload
    return payload


_NOT_UTF8 = st.sampled_from(
    [b"\xff", b"\xc3", b"\xed\xa0\x80", b"ok\xfe\xfe", b"\x80" * 100, b"\xf4\x90\x80\x80"]
)


def _wire(base: Message, fixed: str, writes: bool) -> st.SearchStrategy[bytes]:
    """A structured request as bytes: mostly `base` mutated, else every field drawn; a third of them
    with one string overwritten by bytes that are not UTF-8."""
    descriptor = base.DESCRIPTOR
    paths = _string_paths(descriptor)
    drawn = _message(descriptor, fixed, writes)
    mutated = _mutated(base, fixed, writes)
    messages = st.one_of(mutated, mutated, mutated, drawn).map(lambda m: m.SerializeToString())
    if not paths:
        return messages
    spliced = st.builds(
        lambda body, path, raw: body + _record(path, raw), messages, st.sampled_from(paths), _NOT_UTF8
    )
    return st.one_of(messages, messages, spliced)


def _raw(descriptor: Descriptor, fixed: str) -> st.SearchStrategy[bytes]:
    """Bodies that are not a request: random bytes, or a valid request cut short."""
    valid = _message(descriptor, fixed, writes=True).map(lambda m: m.SerializeToString())
    cut = st.builds(lambda body, r: body[: int(len(body) * r)], valid, st.floats(0.0, 0.999))
    return st.one_of(st.binary(max_size=512), st.binary(min_size=1, max_size=16), cut)


_ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
_METADATA = st.one_of(
    st.just([]),
    st.just([]),
    st.just([]),
    st.lists(
        st.one_of(
            st.tuples(st.just("x-a-bin"), st.binary(max_size=16)),
            st.tuples(st.just("authorization"), st.one_of(_ASCII, st.just("Bearer "), st.just("bearer x"))),
            st.tuples(
                st.just("x-ragfleet-deadline"),
                st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e309", "abc", "9" * 40]) | _ASCII,
            ),
            st.tuples(st.just("x-ragfleet-retriever"), st.sampled_from(["dense", "bm25", ""]) | _ASCII),
            st.tuples(st.just("x-request-id"), _ASCII),
        ),
        min_size=1,
        max_size=3,
    ),
)


# --- calling --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A service to attack: its proto name and address."""

    service: str  # "ragfleet.v1.Pipeline"
    address: str


def _invoke(
    channel: grpc.Channel,
    service: str,
    method: RpcMethod,
    bodies: list[bytes],
    metadata: list[tuple[str, Any]],
) -> grpc.StatusCode:
    path = f"/{service}/{method.name}"
    try:
        if method.client_streaming:
            channel.stream_unary(path)(iter(bodies), timeout=CALL_TIMEOUT, metadata=metadata)
        elif method.server_streaming:
            for _ in channel.unary_stream(path)(bodies[0], timeout=CALL_TIMEOUT, metadata=metadata):
                pass
        else:
            channel.unary_unary(path)(bodies[0], timeout=CALL_TIMEOUT, metadata=metadata)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


class Attack:
    """Calls of one RPC, counted into its tally; undocumented codes go into the report."""

    def __init__(
        self, channel: grpc.Channel, target: Target, method: RpcMethod, tally: RpcTally, report: Report
    ) -> None:
        self.channel, self.target, self.method = channel, target, method
        self.tally, self.report = tally, report
        self.name = f"{target.service.rsplit('.', 1)[-1]}.{method.name}"

    def run(
        self, kind: str, bodies: st.SearchStrategy[list[bytes]], examples: int, stop_at: float, rng_seed: int
    ) -> None:
        """Up to `examples` calls with bodies of `kind` ("structured" or "raw"), none after `stop_at`."""

        @seed(rng_seed)
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(bodies, _METADATA)
        def one(requests: list[bytes], metadata: list[tuple[str, Any]]) -> None:
            if time.monotonic() > stop_at:
                return
            code = _invoke(self.channel, self.target.service, self.method, requests, metadata)
            setattr(self.tally, kind, getattr(self.tally, kind) + 1)
            self.tally.codes[code.name] += 1
            if code not in DOCUMENTED_CODES:
                what = f"{self.name} ({kind}, {[len(b) for b in requests]} bytes, metadata {metadata})"
                self.report.broken.append(f"{what}: {code.name}: {requests[0][:160]!r}")

        one()


def run_hostile(
    targets: list[Target], *, fixed_index: str, examples: int, seconds: float, seed_value: int = 0
) -> Report:
    """Sends up to `examples` structured requests and `examples` raw bodies to every RPC of every
    target, stopping early once `seconds` have passed (shared out evenly between the RPCs)."""
    report = Report()
    start = time.monotonic()
    plan = [(t, m) for t in targets for m in rpc_methods(t.service)]
    share = seconds / max(1, len(plan))
    rng = random.Random(seed_value)
    starts = bases(fixed_index)
    for i, (target, method) in enumerate(plan):
        name = f"{target.service.rsplit('.', 1)[-1]}.{method.name}"
        tally = report.rpcs.setdefault(name, RpcTally())
        base = starts.get(name) or method.request_cls()
        single = _wire(base, fixed_index, method.name in WRITES)
        raw = _raw(base.DESCRIPTOR, fixed_index)
        if method.client_streaming:
            structured = st.builds(lambda first, rest: [first, *rest], single, st.lists(single, max_size=2))
            raws = st.lists(raw, min_size=1, max_size=2)
        else:
            structured, raws = single.map(lambda b: [b]), raw.map(lambda b: [b])
        stop_at = start + share * (i + 1)
        with ragfleet.make_channel(target.address) as channel:
            attack = Attack(channel, target, method, tally, report)
            attack.run("structured", structured, examples, stop_at - share / 2, rng.getrandbits(32))
            attack.run("raw", raws, examples, stop_at, rng.getrandbits(32))
    report.seconds = time.monotonic() - start
    return report


def attack_fleet(fleet: LocalFleet, *, examples: int, seconds: float, seed_value: int = 0) -> Report:
    """`run_hostile` against a fleet's Pipeline and bm25 Retriever, around a fixed index that the
    attack only reads: afterwards its folder must be unchanged, both servers healthy, and a search of
    it must give what it gave before."""
    fixed = "fixed"
    with ragfleet.Client(fleet.address, timeout=60) as client:
        client.ingest(corpus(40), index=fixed, spec={"chunking": {"chunk_tokens": 16, "overlap_tokens": 4}})
        before = [hit.passage.id for hit in client.search("keeper tide", index=fixed, top_k=10).results]
        folder = fleet.home / "indexes" / "default" / fixed
        digest = tree_digest(folder)
        targets = [
            Target("ragfleet.v1.Pipeline", fleet.address),
            Target("ragfleet.v1.Retriever", fleet.services["retriever-bm25"].address),
        ]
        report = run_hostile(
            targets, fixed_index=fixed, examples=examples, seconds=seconds, seed_value=seed_value
        )
        if tree_digest(folder) != digest:
            report.broken.append(f"the folder of index {fixed!r}, only read, changed")
        for name, service in fleet.services.items():
            if not serving(service.address):
                report.broken.append(f"{name} is not serving after the attack")
        after = [hit.passage.id for hit in client.search("keeper tide", index=fixed, top_k=10).results]
        if after != before:
            report.broken.append(f"a search of {fixed!r} gave {after[:3]}..., before {before[:3]}...")
    return report
