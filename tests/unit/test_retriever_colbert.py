"""The colbert backend through RetrieverService, on a tiny ColBERT checkpoint the tests write: ingest,
PLAID and exhaustive search, filters, deletes, versions, rebuild, search options and input errors; and
the gateway's check of its default ingest retrievers."""

import os

import grpc
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from colbert_fixtures import WORDS, make_tiny_checkpoint
from test_retriever_service import CTX, expect, stream

from ragfleet.v1 import common_pb2, pipeline_pb2, retriever_pb2
from services.gateway.service import PipelineService
from services.retriever.colbert import backend as colbert_backend
from services.retriever.colbert.encoder import ColbertEncoder
from services.retriever.service import RetrieverService
from services.runtime.model_errors import ParamError
from services.runtime.settings import GatewaySettings, RetrieverSettings, Settings
from services.runtime.storage import load_manifest

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DOCS = {
    "bio": ["the cell protein gene", "cancer tumour therapy patients"],
    "city": ["paris tower river city", "weather rain river"],
    "fun": ["music song football goal"],
    "med": ["virus vaccine blood"],
}
TEXTS = {f"{doc}#{n}": text for doc, texts in DOCS.items() for n, text in enumerate(texts)}


def passages(docs=DOCS):
    return [
        common_pb2.Passage(id=f"{doc}#{n}", doc_id=doc, position=n, text=text, metadata={"topic": doc})
        for doc, texts in docs.items()
        for n, text in enumerate(texts)
    ]


def ingest_req(index="idx", items=None, **kw):
    return retriever_pb2.IngestRequest(index=index, passages=passages() if items is None else items, **kw)


def search_req(query, index="idx", top_k=3, **kw):
    return retriever_pb2.SearchRequest(query=query, index=index, top_k=top_k, **kw)


EXHAUSTIVE = common_pb2.SearchOptions(exhaustive=True)
COMPRESSED = common_pb2.SearchOptions(compressed_rerank=True)  # PLAID's stage 4 on decompressed residuals


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("colbert") / "tiny"
    make_tiny_checkpoint(path, passthrough=True)
    return str(path)


@pytest.fixture
def settings(tmp_path, checkpoint):
    return Settings(home=tmp_path, retriever=RetrieverSettings(colbert_model=checkpoint))


@pytest.fixture
async def colbert(settings):
    service = RetrieverService(settings, ["colbert"])
    await service.Ingest(stream(ingest_req()), CTX)
    return service


async def hits(service, query, **kw):
    response = await service.Search(search_req(query, **kw), CTX)
    return [(r.passage.id, r.score) for r in response.results]


async def ids(service, query, **kw):
    return [pid for pid, _ in await hits(service, query, **kw)]


def maxsim(encoder, query, text):
    q, _ = encoder.encode_queries([query])
    (d,) = encoder.encode_documents([text])
    return float((q[0].numpy() @ d.astype(np.float32).T).max(axis=1).sum())


async def test_plaid_and_exhaustive_find_the_same_passages(colbert, checkpoint):
    encoder = colbert_backend.load_encoder(checkpoint, 220, "cpu")
    for pid, text in TEXTS.items():
        plaid = await hits(colbert, text)
        exact = await hits(colbert, text, options=EXHAUSTIVE)
        assert plaid[0][0] == exact[0][0] == pid
        assert [p for p, _ in plaid] == [p for p, _ in exact]
        # PLAID scores decompressed tokens, exhaustive search the stored ones: both are MaxSim.
        np.testing.assert_allclose([s for _, s in plaid], [s for _, s in exact], atol=0.05)
        for hit_id, score in exact:
            assert score == pytest.approx(maxsim(encoder, text, TEXTS[hit_id]), abs=1e-3)
    tuned = common_pb2.SearchOptions(ncells=4, ndocs=8, centroid_score_threshold=-1.0)
    assert await ids(colbert, "weather rain", options=tuned) == await ids(colbert, "weather rain")
    response = await colbert.Search(search_req("paris city", filters={"topic": "fun"}), CTX)
    assert [r.passage.id for r in response.results] == ["fun#0"]
    assert response.version.retriever == "colbert" and response.version.model_id == checkpoint
    batch = await colbert.SearchBatch(
        retriever_pb2.SearchBatchRequest(
            queries=["music goal", "virus"], index="idx", top_k=1, options=EXHAUSTIVE
        ),
        CTX,
    )
    assert [r.results[0].passage.id for r in batch.responses] == ["fun#0", "med#0"]


async def test_queries_are_cut_to_query_maxlen_tokens(colbert):
    # [CLS] [Q] ... [SEP] leave 29 of the 32 query tokens for the text.
    first = " ".join(WORDS[:29])
    assert await hits(colbert, first + " " + " ".join(WORDS[29:]), top_k=6) == await hits(
        colbert, first, top_k=6
    )


async def test_deletes_and_upserts_are_visible_at_once_and_persisted(colbert, settings):
    deleted = await colbert.Delete(retriever_pb2.DeleteRequest(index="idx", ids=["bio#0"]), CTX)
    assert deleted.deleted == 1 and deleted.version.version == 2
    assert "bio#0" not in await ids(colbert, TEXTS["bio#0"], top_k=6)
    assert "bio#0" not in await ids(colbert, TEXTS["bio#0"], top_k=6, options=EXHAUSTIVE)
    old_score = dict(await hits(colbert, TEXTS["fun#0"], options=EXHAUSTIVE))["fun#0"]
    new = common_pb2.Passage(id="fun#0", doc_id="fun", text="drug risk")
    report = await colbert.Ingest(stream(ingest_req(items=[new], upsert=True)), CTX)
    assert (report.replaced, report.total_passages, report.version.version) == (1, 5, 3)
    # Exact scores: PLAID compresses words the codec was not trained on coarsely (until a rebuild).
    top = (await colbert.Search(search_req("drug risk", options=EXHAUSTIVE), CTX)).results[0]
    assert (top.passage.id, top.passage.text) == ("fun#0", "drug risk")
    assert dict(await hits(colbert, TEXTS["fun#0"], top_k=6, options=EXHAUSTIVE))["fun#0"] < old_score - 1.0
    restarted = RetrieverService(settings, ["colbert"])
    for query in ("drug risk", TEXTS["city#1"]):
        assert await hits(restarted, query) == await hits(colbert, query)
    described = await restarted.DescribeIndex(retriever_pb2.DescribeIndexRequest(index="idx"), CTX)
    assert (described.version.version, described.passages, described.dimension) == (3, 5, 16)
    assert (described.spec.colbert_model, described.spec.nbits, described.spec.doc_maxlen) == (
        settings.retriever.colbert_model,
        2,
        220,
    )
    index_dir = settings.home / "indexes" / "acme" / "idx" / "colbert"
    assert sorted(p.name for p in index_dir.iterdir() if p.is_dir()) == ["v000003"]


async def test_rebuild_retrains_the_codec_on_what_the_index_holds(colbert, settings):
    # The codec is trained on the first ingest; words it never saw compress coarsely.
    more = [common_pb2.Passage(id="extra#0", doc_id="extra", text="drug risk heart brain")]
    await colbert.Ingest(stream(ingest_req(items=more)), CTX)
    await colbert.Delete(retriever_pb2.DeleteRequest(index="idx", doc_ids=["med"]), CTX)
    queries = [*TEXTS.values(), "drug risk heart brain", "drug heart"]
    exact = [await hits(colbert, q, options=EXHAUSTIVE) for q in queries]
    compressed = await hits(colbert, "drug risk heart brain", options=COMPRESSED)
    (drifted,) = [h for h in compressed if h[0] == "extra#0"]
    assert drifted[1] < exact[-2][0][1] - 1.0
    index_dir = settings.home / "indexes" / "acme" / "idx" / "colbert"
    assert load_manifest(index_dir).extra["segments"] == 2
    rebuilt = await colbert.Rebuild(retriever_pb2.RebuildRequest(index="idx"), CTX)
    assert rebuilt.version.version == 4 and rebuilt.timings[0].stage == "rebuild"
    manifest = load_manifest(index_dir)
    assert (manifest.version, manifest.extra["segments"], manifest.extra["passages"]) == (4, 1, 6)
    restarted = RetrieverService(settings, ["colbert"])
    for service in (colbert, restarted):
        for query, expected in zip(queries, exact):
            found = await hits(service, query, options=COMPRESSED)
            assert [p for p, _ in found] == [p for p, _ in expected]
            np.testing.assert_allclose([s for _, s in found], [s for _, s in expected], atol=0.02)
    assert await hits(restarted, "drug risk heart brain", options=EXHAUSTIVE) == exact[-2]


async def test_exact_backends_and_empty_indexes_have_nothing_to_rebuild(colbert, settings):
    await colbert.Ingest(stream(ingest_req(index="empty", items=[])), CTX)
    unchanged = await colbert.Rebuild(retriever_pb2.RebuildRequest(index="empty"), CTX)
    assert unchanged.version.version == 1
    bm25 = RetrieverService(settings, ["bm25"])
    await bm25.Ingest(stream(ingest_req()), CTX)
    unchanged = await bm25.Rebuild(retriever_pb2.RebuildRequest(index="idx"), CTX)
    assert (unchanged.version.retriever, unchanged.version.version) == ("bm25", 1)
    await expect(grpc.StatusCode.NOT_FOUND, colbert.Rebuild(retriever_pb2.RebuildRequest(index="nope"), CTX))
    await expect(INVALID, colbert.Rebuild(retriever_pb2.RebuildRequest(index="a/b"), CTX), "index")


async def test_bad_input_is_rejected_and_changes_nothing(colbert, settings):
    limits = settings.limits
    await expect(INVALID, colbert.Search(search_req(" "), CTX), "query")
    await expect(INVALID, colbert.Search(search_req("q" * (limits.max_query_chars + 1)), CTX), "query")
    for options, field in [
        (common_pb2.SearchOptions(ncells=-1), "options.ncells"),
        (common_pb2.SearchOptions(ndocs=-5), "options.ndocs"),
        (common_pb2.SearchOptions(centroid_score_threshold=float("nan")), "options.centroid_score_threshold"),
        (common_pb2.SearchOptions(exhaustive=True, ndocs=10), "options.ndocs"),
    ]:
        await expect(INVALID, colbert.Search(search_req("cell", options=options), CTX), field)
    for spec, field in [
        (common_pb2.IndexSpec(nbits=3), "spec.nbits"),
        (common_pb2.IndexSpec(nbits=-1), "spec.nbits"),
        (common_pb2.IndexSpec(doc_maxlen=4), "spec.doc_maxlen"),
        (common_pb2.IndexSpec(doc_maxlen=513), "spec.doc_maxlen"),
        (common_pb2.IndexSpec(doc_maxlen=300), "spec.doc_maxlen"),  # the tiny model has 256 positions
    ]:
        await expect(INVALID, colbert.Ingest(stream(ingest_req(index="new", spec=spec)), CTX), field)
    missing = common_pb2.IndexSpec(colbert_model=str(settings.home / "no-such-checkpoint"))
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION, colbert.Ingest(stream(ingest_req("new", spec=missing)), CTX)
    )
    await expect(grpc.StatusCode.NOT_FOUND, colbert.Search(search_req("cell", index="new"), CTX))
    await expect(grpc.StatusCode.NOT_FOUND, colbert.Search(search_req("cell", index="nope"), CTX))
    described = await colbert.DescribeIndex(retriever_pb2.DescribeIndexRequest(index="idx"), CTX)
    assert (described.version.version, described.passages) == (1, 6)
    # Search options are for colbert only: bm25 rejects a set one and accepts the defaults.
    bm25 = RetrieverService(settings, ["bm25"])
    await bm25.Ingest(stream(ingest_req()), CTX)
    await expect(INVALID, bm25.Search(search_req("cell", options=EXHAUSTIVE), CTX), "options.exhaustive")
    assert await ids(bm25, "cell", options=common_pb2.SearchOptions()) == ["bio#0"]


async def test_spec_fields_of_other_backends_are_ignored(settings):
    shared = common_pb2.IndexSpec(
        vector_store="chroma", faiss_index="hnsw", model="m", nbits=4, doc_maxlen=64
    )
    colbert = RetrieverService(settings, ["colbert"])
    await colbert.Ingest(stream(ingest_req(spec=shared)), CTX)
    described = await colbert.DescribeIndex(retriever_pb2.DescribeIndexRequest(index="idx"), CTX)
    assert (described.spec.nbits, described.spec.doc_maxlen, described.spec.vector_store) == (4, 64, "")
    assert (await ids(colbert, TEXTS["city#0"]))[0] == "city#0"
    bm25 = RetrieverService(settings, ["bm25"])
    odd = common_pb2.IndexSpec(colbert_model="/nowhere", nbits=3, doc_maxlen=1)
    assert (await bm25.Ingest(stream(ingest_req(spec=odd)), CTX)).version.version == 1


async def test_the_encoder_is_loaded_once_per_process(settings, monkeypatch):
    monkeypatch.setattr(colbert_backend, "_encoders", {})
    loads = []
    original = ColbertEncoder.load.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(ColbertEncoder, "load", classmethod(counting))
    service = RetrieverService(settings, ["colbert"])
    await service.Ingest(stream(ingest_req()), CTX)
    await service.Delete(retriever_pb2.DeleteRequest(index="idx", ids=["bio#1"]), CTX)
    await service.Rebuild(retriever_pb2.RebuildRequest(index="idx"), CTX)
    await ids(RetrieverService(settings, ["colbert"]), "cell")
    assert len(loads) == 1


async def test_gateway_default_retrievers_must_be_configured(tmp_path):
    gateway = GatewaySettings(
        retrievers={"bm25": {"address": "127.0.0.1:1"}}, default_retrievers=["bm25", "colbert"]
    )
    pipeline = PipelineService(Settings(home=tmp_path, gateway=gateway))

    async def requests():
        yield pipeline_pb2.PipelineIngestRequest(
            index="idx", documents=[common_pb2.Document(id="d", text="cell")], last=True
        )

    error = await expect(grpc.StatusCode.FAILED_PRECONDITION, pipeline.Ingest(requests(), CTX))
    assert "gateway.default_retrievers" in error.message and "'colbert'" in error.message


async def test_a_broken_invariant_is_not_the_callers_error(settings, monkeypatch):
    """The backend's own mistake (here: embeddings of the wrong width) is no INVALID_ARGUMENT: it stays a
    plain error, which the server turns into INTERNAL and logs."""

    def wrong_width(self, texts, batch_size=32):
        return [np.zeros((3, 1), np.float16) for _ in texts]

    monkeypatch.setattr(ColbertEncoder, "encode_documents", wrong_width)
    with pytest.raises(ParamError, match=r"embeddings\[0\]"):
        await RetrieverService(settings, ["colbert"]).Ingest(stream(ingest_req()), CTX)
