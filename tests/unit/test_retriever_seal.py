"""The seal backend through RetrieverService: ingest, search with highlights, filters, deletes, rebuild,
search options, bad input and the token budget; with a tiny GPT-2 trained here on the test corpus (a
random LM finds every n-gram too unlikely to weigh anything). The LM learns the four real passages;
the index also holds filler passages it never saw, which the search must pass over."""

from __future__ import annotations

import json
import os

import grpc
import numpy as np
import pytest
from rich.text import Text

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from seal_fixtures import make_tiny_lm
from test_retriever_service import CTX, expect, stream

from ragfleet.v1 import common_pb2, generator_pb2, retriever_pb2
from services.retriever.seal.backend import load_model
from services.retriever.seal.train import train_seal
from services.retriever.service import RetrieverService
from services.runtime.settings import RetrieverSettings, Settings

INVALID = grpc.StatusCode.INVALID_ARGUMENT
TEXTS = {
    "heart#0": ("Heart", "Blood pressure raises the risk of heart disease in older adults."),
    "gene#0": ("Genes", "Gene therapy repairs broken genes inside muscle cells."),
    "city#0": ("", "The river floods the old city every spring after heavy rain."),
    "music#0": ("", "Jazz musicians improvise melodies over swing rhythms at night."),
}

# Filler passages make the corpus large enough that a rare n-gram is unlikely a priori, as in a real one:
# SEAL's smoothed P(n) = (F(n) + 5) / (N + 5) is ~10% for a single occurrence among 60 tokens.
FILLER = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike oscar papa".split()


def filler(n: int = 120) -> list[common_pb2.Passage]:
    rng = np.random.default_rng(0)
    sentence = lambda: " ".join(rng.choice(FILLER, size=6)) + "."  # noqa: E731
    return [common_pb2.Passage(id=f"fill#{i}", text=f"{sentence()} {sentence()}") for i in range(n)]


def passages(ids=TEXTS):
    return [
        common_pb2.Passage(
            id=pid,
            doc_id=pid.split("#")[0],
            title=TEXTS[pid][0],
            text=TEXTS[pid][1],
            metadata={"topic": pid[:4]},
        )
        for pid in ids
    ]


def ingest_req(items=None, **kw):
    return retriever_pb2.IngestRequest(index="idx", passages=passages() if items is None else items, **kw)


def search_req(query, top_k=3, **kw):
    return retriever_pb2.SearchRequest(query=query, index="idx", top_k=top_k, **kw)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("seal")
    corpus = root / "corpus.jsonl"
    docs = [{"id": pid, "title": t, "text": f"{x} {x}"} for pid, (t, x) in TEXTS.items()]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    base = make_tiny_lm(root / "base")
    train_seal(out=root / "lm", corpus=corpus, base=str(base), steps=40, batch_size=8, lr=0.1, progress=False)
    return str(root / "lm")


@pytest.fixture
def settings(tmp_path, model):
    return Settings(home=tmp_path, retriever=RetrieverSettings(seal_model=model))


@pytest.fixture
async def seal(settings):
    service = RetrieverService(settings, ["seal"])
    await service.Ingest(stream(ingest_req(items=passages() + filler())), CTX)
    return service


async def results(service, query, **kw):
    return list((await service.Search(search_req(query, **kw), CTX)).results)


async def test_hits_carry_their_matched_ngrams_as_highlights(seal, model):
    tokenizer = load_model(model, "cpu").tokenizer
    for query, expected in (("gene therapy for muscle cells", "gene#0"), ("river floods the city", "city#0")):
        hits = await results(seal, query)
        # The LM never saw the filler passages, so their n-grams weigh nothing next to the real ones.
        assert (
            hits and {h.passage.id for h in hits} <= set(TEXTS) and expected in [h.passage.id for h in hits]
        )
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1)) and hits[0].retriever == "seal"
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        for hit in hits:
            text = hit.passage.text
            passage_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert hit.highlights
            for span in hit.highlights:
                assert 0 <= span.start < span.end <= len(text) and span.score > 0
                piece = tokenizer(text[span.start : span.end], add_special_tokens=False)["input_ids"]
                assert any(passage_ids[i : i + len(piece)] == piece for i in range(len(passage_ids)))
            starts = [s.start for s in hit.highlights]
            assert starts == sorted(starts)
    filtered = await results(seal, "gene therapy for muscle cells", filters={"topic": "city"})
    assert {h.passage.id for h in filtered} <= {"city#0"}


async def test_deletes_rebuild_and_restart(seal, settings):
    deleted = await seal.Delete(retriever_pb2.DeleteRequest(index="idx", ids=["gene#0"]), CTX)
    assert deleted.deleted == 1
    assert "gene#0" not in [h.passage.id for h in await results(seal, "gene therapy for muscle cells")]
    rebuilt = await seal.Rebuild(retriever_pb2.RebuildRequest(index="idx"), CTX)
    assert rebuilt.version.version == 3
    before = await results(seal, "river floods the city")
    restarted = RetrieverService(settings, ["seal"])
    after = await results(restarted, "river floods the city")
    assert [(h.passage.id, h.score) for h in after] == [(h.passage.id, h.score) for h in before]
    again = await restarted.Rebuild(retriever_pb2.RebuildRequest(index="idx"), CTX)
    assert again.version.version == 3  # one segment, no tombstones: nothing to merge


async def test_bad_options_and_queries_name_the_field(seal):
    await expect(
        INVALID,
        seal.Search(search_req("rain", options=common_pb2.SearchOptions(beam=65)), CTX),
        "options.beam",
    )
    await expect(
        INVALID,
        seal.Search(search_req("rain", options=common_pb2.SearchOptions(ngram_length=33)), CTX),
        "options.ngram_length",
    )
    await expect(
        INVALID,
        seal.Search(search_req("rain", options=common_pb2.SearchOptions(beam=-1)), CTX),
        "options.beam",
    )
    await expect(
        INVALID,
        seal.Search(search_req("rain", options=common_pb2.SearchOptions(ncells=2)), CTX),
        "options.ncells",
    )
    await expect(INVALID, seal.Search(search_req("\u200b\u200b"), CTX), "query")
    narrow = common_pb2.SearchOptions(beam=2, ngram_length=3)
    assert (await results(seal, "river floods the city", options=narrow))[0].passage.id == "city#0"


async def test_no_model_and_the_token_budget_change_nothing(tmp_path, model):
    untrained = RetrieverService(Settings(home=tmp_path / "a"), ["seal"])
    err = await expect(grpc.StatusCode.FAILED_PRECONDITION, untrained.Ingest(stream(ingest_req()), CTX))
    assert "ragfleet train seal" in err.message
    listed = await untrained.ListIndexes(retriever_pb2.ListIndexesRequest(), CTX)
    assert list(listed.indexes) == []

    budget = Settings(
        home=tmp_path / "b", retriever=RetrieverSettings(seal_model=model, seal_token_budget=25)
    )
    service = RetrieverService(budget, ["seal"])
    first = await service.Ingest(stream(ingest_req(items=passages(["heart#0"]))), CTX)
    before = await service.Search(search_req("blood pressure heart disease"), CTX)
    more = stream(ingest_req(items=passages(["gene#0", "city#0"])))
    err = await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, service.Ingest(more, CTX))
    assert "retriever.seal_token_budget" in err.message
    described = await service.DescribeIndex(retriever_pb2.DescribeIndexRequest(index="idx"), CTX)
    assert (described.version.version, described.passages) == (first.version.version, 1)
    after = await service.Search(search_req("blood pressure heart disease"), CTX)
    assert (after.results, after.version) == (before.results, before.version)


def scored(pid, retriever, *spans):
    highlights = [common_pb2.Highlight(start=s, end=e, score=1.0) for s, e in spans]
    passage = common_pb2.Passage(id=pid, text="gene therapy [repairs] genes")
    return common_pb2.ScoredPassage(passage=passage, score=1.0, retriever=retriever, highlights=highlights)


def test_fusion_answers_and_tables_keep_the_highlights():
    from services.gateway.fusion import fuse
    from services.gateway.service import _retrieval_only_answer, _with_highlights
    from services.ui import highlighted

    seal_hits = [scored("a", "seal", (13, 22), (0, 4)), scored("b", "seal", (5, 12))]
    bm25_hits = [scored("b", "bm25"), scored("c", "bm25")]
    for method in ("rrf", "weighted"):
        fused = fuse({"seal": seal_hits, "bm25": bm25_hits}, common_pb2.Fusion(method=method), 3, 60)
        spans = {r.passage.id: [(h.start, h.end) for h in r.highlights] for r in fused}
        assert spans == {"a": [(0, 4), (13, 22)], "b": [(5, 12)], "c": []}
    (alone,) = fuse({"seal": seal_hits}, common_pb2.Fusion(), 1, 60)
    assert [(h.start, h.end) for h in alone.highlights] == [(0, 4), (13, 22)]

    answer = _retrieval_only_answer(seal_hits, [], [], [], [])
    assert [len(c.highlights) for c in answer.citations] == [2, 1]
    (cited,) = _with_highlights([generator_pb2.Citation(passage_id="b")], seal_hits)
    assert [(h.start, h.end) for h in cited.highlights] == [(5, 12)]

    text = seal_hits[0].passage.text
    marked = Text.from_markup(
        highlighted(text, [*seal_hits[0].highlights, common_pb2.Highlight(start=2, end=8)], 200)
    )
    assert marked.plain == text  # brackets in the text are text, not markup
    assert [(s.start, s.end) for s in marked.spans] == [(0, 8), (13, 22)]  # overlapping spans merged
    cut = Text.from_markup(highlighted(text, seal_hits[0].highlights, 10))
    assert cut.plain == "gene th..." and [(s.start, s.end) for s in cut.spans] == [(0, 4)]
