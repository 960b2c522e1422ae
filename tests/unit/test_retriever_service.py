"""RetrieverService called directly: ingest, search, delete, validation, versions, recovery."""

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ragfleet.v1 import common_pb2, retriever_pb2
from services.retriever.service import RetrieverService
from services.runtime.context import CallContext
from services.runtime.errors import ServiceError
from services.runtime.settings import Settings
from tests.reliability.races import run_races

ROOT = Path(__file__).resolve().parents[2]
CTX = CallContext(tenant="acme")
DOCS = {
    "cats": ["Cats purr when they are content.", "A kitten is a young cat."],
    "space": ["The Moon orbits the Earth.", "Mars is called the red planet."],
    "food": ["Bread is baked from flour and water."],
}


def passages(docs=DOCS):
    out = []
    for doc_id, texts in docs.items():
        for n, text in enumerate(texts):
            out.append(
                common_pb2.Passage(
                    id=f"{doc_id}#{n}",
                    doc_id=doc_id,
                    position=n,
                    title=doc_id,
                    text=text,
                    metadata={"topic": doc_id, "n": str(n)},
                )
            )
    return out


async def stream(*requests):
    """The requests as a client stream, the final one marked last as clients must."""
    for i, r in enumerate(requests):
        if i == len(requests) - 1:
            r = retriever_pb2.IngestRequest(
                last=True, index=r.index, spec=r.spec, passages=r.passages, upsert=r.upsert
            )
        yield r


def ingest_req(index="idx", items=None, **kw):
    return retriever_pb2.IngestRequest(index=index, passages=passages() if items is None else items, **kw)


def search_req(query="cat", index="idx", top_k=5, **kw):
    return retriever_pb2.SearchRequest(query=query, index=index, top_k=top_k, **kw)


@pytest.fixture
def settings(tmp_path):
    return Settings(home=tmp_path)


@pytest.fixture
async def bm25(settings):
    service = RetrieverService(settings, ["bm25"])
    await service.Ingest(
        stream(ingest_req(items=passages()[:3]), ingest_req(index="", items=passages()[3:])), CTX
    )
    return service


async def expect(code, coro, field=None):
    with pytest.raises(ServiceError) as err:
        await coro
    assert err.value.code == code, err.value
    if field is not None:
        assert err.value.message.startswith(field + ":") or repr(field) in err.value.message, (
            err.value.message
        )
    return err.value


async def ids(service, query="cat", ctx=CTX, **kw):
    response = await service.Search(search_req(query, **kw), ctx)
    return [r.passage.id for r in response.results]


async def test_ingest_search_and_metadata(bm25):
    report = await bm25.Ingest(stream(ingest_req(index="other", items=passages()[:1])), CTX)
    assert report.version.version == 1 and report.added == 1 and report.total_passages == 1
    response = await bm25.Search(search_req("cat kitten", with_continuation=True), CTX)
    assert [r.passage.id for r in response.results] == ["cats#1", "cats#0"]
    assert [r.rank for r in response.results] == [1, 2] and response.results[0].retriever == "bm25"
    assert response.results[1].continuation.id == "cats#1" and not response.results[0].HasField(
        "continuation"
    )
    assert response.version.retriever == "bm25" and response.version.version == 1
    assert response.version.model_id.startswith("bm25s")
    assert await ids(bm25, "planet moon", filters={"n": "1"}) == ["space#1"]
    batch = await bm25.SearchBatch(
        retriever_pb2.SearchBatchRequest(queries=["moon", "bread"], index="idx", top_k=1), CTX
    )
    assert [r.results[0].passage.id for r in batch.responses] == ["space#0", "food#0"]


async def test_add_delete_upsert_visible_at_once_and_persisted(bm25, settings):
    await expect(
        grpc.StatusCode.ALREADY_EXISTS, bm25.Ingest(stream(ingest_req(items=passages()[:1])), CTX), "cats#0"
    )
    new = common_pb2.Passage(id="cats#0", doc_id="cats", text="Lions are big cats that roar.")
    report = await bm25.Ingest(stream(ingest_req(items=[new], upsert=True)), CTX)
    assert (report.added, report.replaced, report.total_passages, report.version.version) == (0, 1, 5, 2)
    assert await ids(bm25, "lions roar") == ["cats#0"]
    deleted = await bm25.Delete(
        retriever_pb2.DeleteRequest(index="idx", doc_ids=["space"], ids=["food#0"]), CTX
    )
    assert deleted.deleted == 3 and deleted.version.version == 3
    assert await ids(bm25, "moon planet bread") == []
    restarted = RetrieverService(settings, ["bm25"])
    assert await ids(restarted, "lions cat") == await ids(bm25, "lions cat") == ["cats#0", "cats#1"]
    described = await restarted.DescribeIndex(retriever_pb2.DescribeIndexRequest(index="idx"), CTX)
    assert (described.passages, described.documents, described.version.version) == (2, 1, 3)
    assert described.bytes_on_disk > 0 and described.created_at
    index_dir = settings.home / "indexes" / "acme" / "idx" / "bm25"
    assert sorted(p.name for p in index_dir.iterdir() if p.is_dir()) == ["v000003"]


async def test_validation_errors(bm25, settings):
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    limits = settings.limits
    for bad in ["", "a/b", "..", "idx\n", "x" * (limits.max_index_name_chars + 1)]:
        await expect(INVALID, bm25.Search(search_req(index=bad), CTX), "index")
    await expect(INVALID, bm25.Search(search_req(query=""), CTX), "query")
    await expect(INVALID, bm25.Search(search_req(query="q" * (limits.max_query_chars + 1)), CTX), "query")
    await expect(INVALID, bm25.Search(search_req(top_k=0), CTX), "top_k")
    await expect(INVALID, bm25.Search(search_req(top_k=limits.max_top_k + 1), CTX), "top_k")
    await expect(
        INVALID,
        bm25.SearchBatch(retriever_pb2.SearchBatchRequest(queries=["ok", ""], index="idx", top_k=1), CTX),
        "queries[1]",
    )
    await expect(grpc.StatusCode.NOT_FOUND, bm25.Search(search_req(index="nope"), CTX))
    await expect(
        grpc.StatusCode.NOT_FOUND, bm25.Delete(retriever_pb2.DeleteRequest(index="nope", ids=["x"]), CTX)
    )
    await expect(INVALID, bm25.Search(search_req(), CallContext(tenant="../etc")), "tenant")

    def item(i, **kw):
        return common_pb2.Passage(**{"id": f"new#{i}", "text": "fresh text", **kw})

    cases = [
        ([item(0), item(1, id="")], INVALID, "passages[1].id"),
        ([item(0), item(1), item(2, text=" ")], INVALID, "passages[2].text"),
        ([item(0, text="x" * (limits.max_document_bytes + 1))], INVALID, "passages[0].text"),
        ([item(0), item(0)], grpc.StatusCode.ALREADY_EXISTS, "new#0"),
        ([item(0), item(1, id="cats#1")], grpc.StatusCode.ALREADY_EXISTS, "cats#1"),
    ]
    for items, code, field in cases:
        await expect(code, bm25.Ingest(stream(ingest_req(items=items)), CTX), field)
    await expect(
        INVALID,
        bm25.Ingest(stream(ingest_req(items=[item(0)]), ingest_req(index="other", items=[item(1)])), CTX),
        "index",
    )
    # Nothing above changed the index.
    described = await bm25.DescribeIndex(retriever_pb2.DescribeIndexRequest(index="idx"), CTX)
    assert (described.version.version, described.passages) == (1, 5)
    # An index's spec is shared by all its retrievers: bm25 ignores the dense-only fields.
    shared = common_pb2.IndexSpec(model="m", vector_store="chroma")
    report = await bm25.Ingest(stream(ingest_req(index="fresh", spec=shared)), CTX)
    assert report.version.version == 1
    await expect(grpc.StatusCode.NOT_FOUND, bm25.Search(search_req(index="never-made"), CTX))


async def test_failed_commit_leaves_version_and_results(bm25, monkeypatch):
    from services.retriever import service as service_module

    before = await ids(bm25, "cat moon")

    def disk_full(*args):
        raise OSError("disk full")

    monkeypatch.setattr(service_module, "write_manifest", disk_full)
    with pytest.raises(OSError):
        await bm25.Ingest(
            stream(ingest_req(items=[common_pb2.Passage(id="x#0", text="cat moon cat moon")])), CTX
        )
    monkeypatch.undo()
    assert await ids(bm25, "cat moon") == before
    report = await bm25.Ingest(
        stream(ingest_req(items=[common_pb2.Passage(id="x#0", text="cat moon cat moon")])), CTX
    )
    assert report.version.version == 2 and (await ids(bm25, "cat moon"))[0] == "x#0"


def test_crash_before_manifest_switch_serves_previous_version(tmp_path):
    """The process dies (os._exit) after the new version's files are written, before the switch."""
    script = textwrap.dedent(f"""
        import asyncio, os
        from ragfleet.v1 import common_pb2, retriever_pb2
        from services.retriever import service as module
        from services.runtime.context import CallContext
        from services.runtime.settings import Settings

        async def stream(*items):
            yield retriever_pb2.IngestRequest(index="idx", passages=items, last=True)

        async def main():
            svc = module.RetrieverService(Settings(home={str(tmp_path)!r}), ["bm25"])
            await svc.Ingest(stream(common_pb2.Passage(id="a#0", text="old apples")), CallContext())
            module.write_manifest = lambda *a: os._exit(3)
            await svc.Ingest(stream(common_pb2.Passage(id="b#0", text="new apples apples")), CallContext())

        asyncio.run(main())
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    index_dir = tmp_path / "indexes" / "default" / "idx" / "bm25"
    assert (index_dir / "v000002" / "tokens.npz").exists()  # the new files were written

    async def check():
        service = RetrieverService(Settings(home=tmp_path), ["bm25"])
        response = await service.Search(search_req("apples", top_k=5), CallContext())
        assert [r.passage.id for r in response.results] == ["a#0"] and response.version.version == 1
        report = await service.Ingest(
            stream(ingest_req(items=[common_pb2.Passage(id="b#0", text="new apples apples")])), CallContext()
        )
        assert report.version.version == 2 and report.total_passages == 2

    import asyncio

    asyncio.run(check())
    assert sorted(p.name for p in index_dir.iterdir() if p.is_dir()) == ["v000002"]


async def test_empty_index_is_failed_precondition_and_drop(bm25):
    await bm25.Ingest(stream(ingest_req(index="empty", items=[])), CTX)
    await expect(grpc.StatusCode.FAILED_PRECONDITION, bm25.Search(search_req(index="empty"), CTX))
    await bm25.Delete(retriever_pb2.DeleteRequest(index="idx", doc_ids=list(DOCS)), CTX)
    await expect(grpc.StatusCode.FAILED_PRECONDITION, bm25.Search(search_req(), CTX))
    listed = await bm25.ListIndexes(retriever_pb2.ListIndexesRequest(), CTX)
    assert [d.version.index for d in listed.indexes] == ["empty", "idx"]
    dropped = await bm25.Delete(retriever_pb2.DeleteRequest(index="empty", drop_index=True), CTX)
    assert dropped.version.index == "empty"
    await expect(grpc.StatusCode.NOT_FOUND, bm25.Search(search_req(index="empty"), CTX))
    listed = await bm25.ListIndexes(retriever_pb2.ListIndexesRequest(), CTX)
    assert [d.version.index for d in listed.indexes] == ["idx"]


async def test_tenants_are_isolated(bm25):
    other = CallContext(tenant="globex")
    await expect(grpc.StatusCode.NOT_FOUND, bm25.Search(search_req(), other))
    assert not (await bm25.ListIndexes(retriever_pb2.ListIndexesRequest(), other)).indexes
    await bm25.Ingest(stream(ingest_req(items=passages()[:1])), other)
    assert await ids(bm25, "cat", ctx=other) == ["cats#0"]
    assert len(await ids(bm25, "cat")) == 2


@pytest.mark.parametrize(
    "spec",
    [
        common_pb2.IndexSpec(),
        common_pb2.IndexSpec(vector_store="faiss", faiss_index="hnsw"),
        common_pb2.IndexSpec(vector_store="chroma"),
    ],
    ids=["flat", "hnsw", "chroma"],
)
async def test_multi_backend_service_dense(settings, spec):
    service = RetrieverService(settings, ["dense", "bm25"])
    await expect(grpc.StatusCode.INVALID_ARGUMENT, service.Search(search_req(), CTX), "x-ragfleet-retriever")
    dense_ctx = CallContext(tenant="acme", metadata={"x-ragfleet-retriever": "dense"})
    bad_ctx = CallContext(tenant="acme", metadata={"x-ragfleet-retriever": "colbert"})
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT, service.Search(search_req(), bad_ctx), "x-ragfleet-retriever"
    )
    report = await service.Ingest(stream(ingest_req(spec=spec)), dense_ctx)
    assert report.version.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    await expect(
        grpc.StatusCode.NOT_FOUND,
        service.Search(search_req(), CallContext(tenant="acme", metadata={"x-ragfleet-retriever": "bm25"})),
    )
    assert (await ids(service, "Which planet is red?", ctx=dense_ctx))[0] == "space#1"
    assert sorted(await ids(service, "kitty", ctx=dense_ctx, filters={"topic": "space"}, top_k=10)) == [
        "space#0",
        "space#1",
    ]
    await service.Delete(retriever_pb2.DeleteRequest(index="idx", ids=["space#1"]), dense_ctx)
    assert "space#1" not in await ids(service, "Which planet is red?", ctx=dense_ctx)
    restarted = RetrieverService(settings, ["dense"])
    assert await ids(restarted, "Which planet is red?", ctx=CTX) == await ids(
        service, "Which planet is red?", ctx=dense_ctx
    )
    described = await restarted.DescribeIndex(retriever_pb2.DescribeIndexRequest(index="idx"), CTX)
    assert described.dimension == 384 and described.passages == 4
    assert described.spec.vector_store == (spec.vector_store or "faiss")
    await restarted.Delete(retriever_pb2.DeleteRequest(index="idx", drop_index=True), CTX)
    assert not (settings.home / "indexes" / "acme" / "idx").exists()


async def test_a_stream_without_its_last_message_commits_nothing(bm25):
    svc = bm25
    before = await svc.DescribeIndex(retriever_pb2.DescribeIndexRequest(index="idx"), CTX)

    async def cut_short():
        yield ingest_req(items=[common_pb2.Passage(id="late#0", text="a late cat")])

    with pytest.raises(ServiceError) as err:
        await svc.Ingest(cut_short(), CTX)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "last" in err.value.message
    after = await svc.DescribeIndex(retriever_pb2.DescribeIndexRequest(index="idx"), CTX)
    assert after.version.version == before.version.version and after.passages == before.passages


async def test_concurrent_changes_keep_every_index_whole(tmp_path):
    report = await run_races(tmp_path, rounds=6, calls_per_round=40, seconds=20)
    assert report.rounds >= 2
    assert report.broken == 0, report.broken_calls[:5] + report.broken_invariants[:5]


async def test_a_deadline_or_a_cancel_stops_a_search_between_slices(bm25, monkeypatch):
    from services.retriever.bm25 import BM25Backend

    searched = []
    search = BM25Backend.search

    def slow(self, query):
        time.sleep(0.02)
        searched.append(len(query.texts))
        return search(self, query)

    monkeypatch.setattr(BM25Backend, "search", slow)
    request = retriever_pb2.SearchBatchRequest(index="idx", queries=["cat"] * 640, top_k=1)
    late = CallContext(tenant="acme", deadline=time.time() + 0.05)
    await expect(grpc.StatusCode.DEADLINE_EXCEEDED, bm25.SearchBatch(request, late))
    assert sum(searched) < 640 / 2
    searched.clear()
    task = asyncio.create_task(bm25.SearchBatch(request, CTX))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    done = sum(searched)  # the call ended only once its thread did: no work goes on behind it
    await asyncio.sleep(0.1)
    assert sum(searched) == done < 640 / 2


async def test_request_sizes_are_limited(bm25, settings):
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    limits = settings.limits
    filters = {f"k{i}": "v" for i in range(limits.max_filters + 1)}
    err = await expect(INVALID, bm25.Search(search_req(filters=filters), CTX), "filters")
    assert "limits.max_filters" in err.message
    queries = ["cat"] * (limits.max_batch_results // limits.max_top_k + 1)
    request = retriever_pb2.SearchBatchRequest(index="idx", queries=queries, top_k=limits.max_top_k)
    err = await expect(INVALID, bm25.SearchBatch(request, CTX), "top_k")
    assert "limits.max_batch_results" in err.message
    cases = [
        (common_pb2.Passage(id="t#0", text="x", title="t" * (limits.max_title_bytes + 1)), "title"),
        (common_pb2.Passage(id="t#0", text="x", metadata={"k": "v" * limits.max_metadata_bytes}), "metadata"),
    ]
    for passage, field in cases:
        err = await expect(
            INVALID, bm25.Ingest(stream(ingest_req(items=[passage])), CTX), f"passages[0].{field}"
        )
        assert f"limits.max_{field}_bytes" in err.message


async def test_a_reply_is_bounded_in_bytes_while_it_is_built(tmp_path):
    settings = Settings(home=tmp_path, limits={"max_reply_bytes": 2048})
    service = RetrieverService(settings, ["bm25"])
    await service.Ingest(stream(ingest_req(items=passages())), CTX)
    request = retriever_pb2.SearchBatchRequest(index="idx", queries=["cat", "moon"] * 20, top_k=5)
    err = await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, service.SearchBatch(request, CTX))
    assert "limits.max_reply_bytes" in err.message
    found = await service.Search(search_req(query="cat", top_k=1), CTX)
    assert found.results and found.ByteSize() <= 2048


async def test_ingest_streams_are_capped_as_they_arrive(tmp_path):
    settings = Settings(home=tmp_path, limits={"max_ingest_passages": 10, "max_ingest_bytes": 4096})
    service = RetrieverService(settings, ["bm25"])
    sent = []

    async def messages(n, words):
        for i in range(n):
            sent.append(i)
            passage = common_pb2.Passage(id=f"p{i}", text="word " * words)
            yield retriever_pb2.IngestRequest(index="capped", passages=[passage], last=i == n - 1)

    for words, limit, received in [(1, "max_ingest_passages", 11), (200, "max_ingest_bytes", 5)]:
        sent.clear()
        err = await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, service.Ingest(messages(50, words), CTX))
        assert f"limits.{limit}" in err.message and len(sent) == received, (err.message, len(sent))
    await expect(
        grpc.StatusCode.NOT_FOUND,
        service.DescribeIndex(retriever_pb2.DescribeIndexRequest(index="capped"), CTX),
    )
