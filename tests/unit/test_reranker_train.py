"""`ragfleet train cross-encoder` on a tiny model and a tiny corpus, with a stand-in for the fleet's
search: pseudo-queries and BEIR qrels become examples with mined negatives, the loss drops, a resumed
run ends with the weights of an uninterrupted one, and the published model loads in the Reranker."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from reranker_fixtures import FakeFleet, make_tiny_bi_encoder, make_tiny_cross_encoder
from safetensors.torch import load_file

from ragfleet.v1 import common_pb2, reranker_pb2
from services.datasets import mining, pairs
from services.demo.corpus import demo_documents
from services.reranker import train, trainer
from services.reranker.backend import Ranking, RerankerModel
from services.reranker.service import RerankerService
from services.runtime import training
from services.runtime.context import CallContext
from services.runtime.model_errors import ParamError
from services.runtime.settings import RerankerSettings, Settings

DOCUMENTS = demo_documents()[:24]
TINY = {"steps": 60, "batch_size": 4, "negatives": 2, "max_length": 64, "lr": 5e-3, "warmup": 3}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models train much faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bi_encoder(tmp_path_factory.mktemp("base") / "bert")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    return path


def test_mined_negatives_skip_excluded_documents_and_alternate_retrievers() -> None:
    fleet = FakeFleet()
    mining.prepare_index(fleet, "kb", DOCUMENTS)
    source = DOCUMENTS[0]
    query = pairs.Query(source["text"].split(".")[0], ["the positive"], *[frozenset([source["id"]])] * 2)
    (example,) = mining.mine_examples(fleet, "kb", [query], depth=10, negatives=4, progress=False)
    texts = {pairs.document_text(d["title"], d["text"]): d["id"] for d in DOCUMENTS}
    assert example.texts[0] == "the positive" and len(example.texts) == 5
    assert source["id"] not in {texts[t] for t in example.texts[1:]}
    assert fleet.searches == [("dense", 10), ("bm25", 10)]
    assert not mining.prepare_index(fleet, "kb", DOCUMENTS)


def test_a_batch_the_fleet_refuses_as_too_large_is_mined_in_halves() -> None:
    queries = [
        pairs.Query(d["text"].split(".")[0], ["p"], *[frozenset([d["id"]])] * 2) for d in DOCUMENTS[:3]
    ]
    whole, split = FakeFleet(), FakeFleet(max_batch=1)
    for fleet in (whole, split):
        mining.prepare_index(fleet, "kb", DOCUMENTS)
    expected = mining.mine_examples(whole, "kb", queries, depth=10, negatives=2, progress=False)
    assert mining.mine_examples(split, "kb", queries, depth=10, negatives=2, progress=False) == expected
    assert len(whole.searches) == 2 and len(split.searches) == 2 * len(queries)


def test_held_out_queries_share_no_relevant_document_with_training_queries() -> None:
    # Chains of queries sharing documents: q0-q1 share d0, q1-q2 share d1; the rest stand alone.
    relevant = [{"d0"}, {"d0", "d1"}, {"d1"}] + [{f"e{i}"} for i in range(17)]
    queries = [pairs.Query(f"q{i}", ["p"], frozenset(r), frozenset(r)) for i, r in enumerate(relevant)]
    for seed in range(20):
        kept, held = trainer.split_off(queries, 0.25, seed)
        assert len(kept) + len(held) == 20 and len(held) == 5
        trained = set().union(*(q.relevant for q in kept))
        assert not trained & set().union(*(q.relevant for q in held))
    assert any("q1" in {q.text for q in trainer.split_off(queries, 0.25, s)[1]} for s in range(20))


def test_pseudo_queries_are_sized_to_the_steps_with_enough_held_out() -> None:
    assert trainer.pseudo_query_budget(800, 0.1) == (900, pytest.approx(100 / 900))
    assert trainer.pseudo_query_budget(200, 0.1) == (300, pytest.approx(1 / 3))
    assert trainer.pseudo_query_budget(2000, 0.2) == (2500, pytest.approx(0.2))
    assert trainer.pseudo_query_budget(200, 0.0) == (200, 0.0)


def test_training_lowers_the_loss_and_the_model_loads_in_the_reranker(
    tmp_path: Path, base: Path, corpus: Path
) -> None:
    out = tmp_path / "home" / "models" / "cross-encoder"
    fleet = FakeFleet()
    metrics = train.train_cross_encoder(
        fleet, out=out, corpus=corpus, base=str(base), progress=False, **(TINY | {"steps": 100})
    )
    assert metrics["steps"] == 100 and metrics["final_loss"] < 0.8 * metrics["initial_loss"]
    # Mined in an index of the documents with each pseudo-query's sentence cut out.
    saved = json.loads((out / "checkpoints" / trainer.EXAMPLES_FILE).read_text())
    queries = {ex["query"] for ex in saved["examples"]} | {h["query"] for h in saved["held_out"]}
    assert not any(q in d["text"] for q in queries for d in fleet.indexes["corpus-cloze0"])
    record = json.loads((out / training.TRAIN_FILE).read_text())
    assert record["max_length"] == 64 and record["examples"] == metrics["examples"]
    assert (out / "checkpoints" / "step-00000100").is_dir()
    # The 400 queries 100 steps train on and 100 beside them were asked for (pseudo_query_budget),
    # so of the 24 the corpus gives a fifth was held out, searched fused, and tuned the retrieval weight.
    held = {h["query"] for h in saved["held_out"]}
    assert len(queries) == 24 and len(held) == record["validation"]["queries"] == 4
    assert not held & {ex["query"] for ex in saved["examples"]}
    assert ("dense,bm25", 30) in fleet.searches
    assert record["retrieval_weight"] == metrics["retrieval_weight"] in trainer.WEIGHTS
    curve = record["validation"]["ndcg@10"]
    assert list(curve) == [str(w) for w in trainer.WEIGHTS]
    assert curve[str(record["retrieval_weight"])] == max(curve.values())
    assert "ndcg@10_reversed" not in record["validation"]  # a pointwise score ignores the order
    assert record["warnings"] == metrics["warnings"] == trainer.tuning_warnings(record)

    service = RerankerService(Settings(home=tmp_path / "home"))
    doc = DOCUMENTS[0]
    candidates = [
        common_pb2.ScoredPassage(
            passage=common_pb2.Passage(id=f"{d['id']}#0", title=d["title"], text=d["text"])
        )
        for d in DOCUMENTS[:5]
    ]
    request = reranker_pb2.RerankRequest(query=doc["text"].split(".")[0], candidates=candidates, top_k=5)
    reply = asyncio.run(service.Rerank(request, CallContext()))
    assert reply.model_id.startswith(f"cross_encoder:{out}@") and reply.max_length == 64
    assert len(reply.results) == 5


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(
    tmp_path: Path, base: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {**TINY, "steps": 12, "checkpoint_every": 5, "base": str(base), "progress": False}
    train.train_cross_encoder(FakeFleet(), out=tmp_path / "whole", corpus=corpus, **settings)

    real_loss, calls = train.group_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "group_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train_cross_encoder(FakeFleet(), out=tmp_path / "resumed", corpus=corpus, **settings)
    monkeypatch.setattr(train, "group_loss", real_loss)
    with pytest.raises(ParamError, match="resume"):
        train.train_cross_encoder(FakeFleet(), out=tmp_path / "resumed", corpus=corpus, **settings)
    # The mined examples were kept: resuming needs no fleet.
    metrics = train.train_cross_encoder(
        None, out=tmp_path / "resumed", corpus=corpus, resume=True, **settings
    )
    assert metrics["start_step"] == 5
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.allclose(whole[k], resumed[k]) for k in whole)
    # A finished run trains on when given more steps.
    more = {**settings, "steps": 14}
    metrics = train.train_cross_encoder(None, out=tmp_path / "resumed", corpus=corpus, resume=True, **more)
    assert (metrics["start_step"], metrics["steps"]) == (12, 14)


def test_beir_qrels_with_a_cross_encoder_teacher(tmp_path: Path, base: Path) -> None:
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    corpus = [{"_id": d["id"], "title": d["title"], "text": d["text"]} for d in DOCUMENTS]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    queries = [{"_id": f"q{i}", "text": d["text"].split(".")[0]} for i, d in enumerate(DOCUMENTS[:8])]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    qrels = "".join(f"q{i}\t{d['id']}\t1\n" for i, d in enumerate(DOCUMENTS[:8]))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    teacher = make_tiny_cross_encoder(tmp_path / "teacher")

    out = tmp_path / "out"
    settings = {**TINY, "steps": 4, "base": str(base), "progress": False}
    metrics = train.train_cross_encoder(
        FakeFleet(), out=out, beir=folder, teacher=f"cross-encoder:{teacher}", **settings
    )
    assert metrics["examples"] == 8
    saved = json.loads((out / "checkpoints" / trainer.EXAMPLES_FILE).read_text())["examples"]
    assert all(len(ex["teacher"]) == 3 for ex in saved)
    assert json.loads((out / training.TRAIN_FILE).read_text())["split"] == "train"


def test_bad_settings_name_the_parameter(tmp_path: Path, corpus: Path) -> None:
    for kwargs, field in [
        ({}, "beir"),
        ({"corpus": corpus, "steps": 0}, "steps"),
        ({"corpus": corpus, "negatives": 5, "mine_depth": 3}, "mine_depth"),
        ({"corpus": corpus, "teacher": "oracle"}, "teacher"),
        ({"corpus": corpus, "validation": 1.0}, "validation"),
    ]:
        with pytest.raises(ParamError) as err:
            train.train_cross_encoder(FakeFleet(), out=tmp_path / "x", progress=False, **kwargs)
        assert err.value.field == field


class _ListwiseFake(RerankerModel):
    """A listwise model that ranks by content (the texts naming the query first) or by position alone."""

    DEFAULT_FOLDER, TRAIN_COMMAND, ORDER_SENSITIVE = "fake", None, True

    def __init__(self, by_content: bool) -> None:
        self.by_content = by_content

    @classmethod
    def configured_model(cls, settings: RerankerSettings) -> str | None:
        return None

    @classmethod
    def load(cls, name_or_path: str, settings: RerankerSettings) -> _ListwiseFake:
        raise NotImplementedError

    @property
    def max_length(self) -> int:
        return 64

    def rerank(self, query: str, texts: Sequence[str]) -> Ranking:
        order = list(range(len(texts)))
        if self.by_content:
            order.sort(key=lambda i: query not in texts[i])
        return Ranking(order=order, scores=[1.0 - i / len(order) for i in range(len(order))], truncated=0)


def test_a_listwise_model_is_also_scored_on_reversed_lists() -> None:
    # The relevant document is retrieved first, so ranking by position scores 1 on the lists as given.
    lists = [
        trainer.HeldOut(
            query=f"q{n}",
            doc_ids=[f"d{n}", "x1", "x2", "x3"],
            texts=[f"about q{n}", "other", "more", "still more"],
            scores=[4.0, 3.0, 2.0, 1.0],
            relevant=[f"d{n}"],
        )
        for n in range(3)
    ]
    by_content = trainer.tune_retrieval_weight(_ListwiseFake(True), lists, progress=False)["validation"]
    by_position = trainer.tune_retrieval_weight(_ListwiseFake(False), lists, progress=False)["validation"]
    assert by_content["ndcg@10"]["0.0"] == by_content["ndcg@10_reversed"] == 1.0
    assert by_position["ndcg@10"]["0.0"] == 1.0
    assert by_position["ndcg@10_reversed"] == pytest.approx(1 / math.log2(5), abs=1e-5)  # the positive last


def test_the_tuning_warns_of_a_model_that_adds_nothing_or_ranks_by_position() -> None:
    lists = [
        trainer.HeldOut(
            query=f"q{n}",
            doc_ids=["x0", f"d{n}", *(f"x{i}" for i in range(2, 12))],
            texts=["other", f"about q{n}", *(f"other {i}" for i in range(2, 12))],
            scores=[float(12 - i) for i in range(12)],
            relevant=[f"d{n}"],
        )
        for n in range(3)
    ]
    # Reading the texts finds the positive that retrieval put second; keeping the order adds nothing,
    # and reversed, that order puts the positive 11th.
    by_content = trainer.tune_retrieval_weight(_ListwiseFake(True), lists, progress=False)
    by_position = trainer.tune_retrieval_weight(_ListwiseFake(False), lists, progress=False)
    assert by_content["retrieval_weight"] < 1.0 and trainer.tuning_warnings(by_content) == []
    adds_nothing, positional = trainer.tuning_warnings(by_position)
    retrieved = by_position["validation"]["ndcg@10"]["1.0"]
    assert f"retrieval order of the 3 held-out lists ({retrieved} nDCG@10)" in adds_nothing
    reversed_ = by_position["validation"]["ndcg@10_reversed"]
    assert "ranks by position" in positional and f"{reversed_} on the same lists reversed" in positional
    assert trainer.tuning_warnings({"retrieval_weight": 0.0, "validation": None}) == []
