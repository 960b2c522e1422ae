"""services.evaluator.retrieval: the `eval retrieval` preset of the experiment runner, with an in-memory
fake of ragfleet.Client."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from ragfleet.errors import NotFound, ResourceExhausted
from services.evaluator.experiments import list_runs
from services.evaluator.retrieval import (
    markdown_table,
    reranker_models,
    retrieval_experiment,
    run_retrieval_eval,
    unseen_queries,
)

QUERIES = {"q1": "find one", "q2": "find two and three", "q3": "find four"}
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq2\td3\t1\nq3\td4\t1\n"
DOCS = ["d1", "d2", "d3", "d4", "d5", "d6"]

# Passage ids each retriever (or fused pair) returns per query, best first.
RANKINGS = {
    ("dense",): {  # perfect
        "q1": ["d1#0", "d5#0"],
        "q2": ["d2#0", "d3#0", "d6#0"],
        "q3": ["d4#0"],
    },
    ("bm25",): {  # every relevant document one place too low
        "q1": ["d5#0", "d1#0"],
        "q2": ["d6#0", "d2#0", "d3#0"],
        "q3": ["d6#0", "d4#0"],
    },
    ("dense", "bm25"): {  # several passages per document; nothing for q3
        "q1": ["d1#2", "d5#0", "d1#0"],
        "q2": ["d3#1", "d2#0", "d3#0"],
        "q3": [],
    },
}
RANKINGS[("colbert",)] = RANKINGS[("dense",)]


class FakeClient:
    """Implements what an experiment calls of ragfleet.Client, in memory; its reranker reverses the
    best `depth` passages. `search_batch` answers each query as `search` does (and records it so), and
    refuses a batch of more than `max_batch` queries as the fleet refuses a reply too large."""

    def __init__(self, fail_on: str | None = None, max_batch: int | None = None) -> None:
        self.indexes: dict[str, dict] = {}  # name -> {"retrievers": [...], "documents": [...]}
        self.calls: list[tuple] = []
        self.fail_on = fail_on
        self.max_batch = max_batch

    def describe(self):
        return SimpleNamespace(retrievers=["dense", "bm25", "colbert"], reranker=True)

    def describe_index(self, index):
        if index not in self.indexes:
            raise NotFound(index)
        retrievers = self.indexes[index]["retrievers"]
        return SimpleNamespace(
            retrievers=[SimpleNamespace(version=SimpleNamespace(retriever=r)) for r in retrievers]
        )

    def ingest(self, source, *, index, spec=None, progress=None):
        assert index not in self.indexes
        self.calls.append(("ingest", index, spec))
        self.indexes[index] = {"retrievers": spec["retrievers"], "documents": list(source)}
        progress(len(source))

    def search(self, query, *, index, top_k, retrievers, fusion, rerank=None):
        assert index in self.indexes
        if self.fail_on in retrievers:
            raise ConnectionError(f"{self.fail_on} is down")
        by_text = {text: qid for qid, text in QUERIES.items()}
        ranking = RANKINGS[tuple(retrievers)][by_text[query]]
        report = None
        if rerank is None:
            self.calls.append(("search", tuple(retrievers), fusion, top_k))
            ranking = ranking[:top_k]
        else:
            self.calls.append(("rerank", tuple(retrievers), top_k, rerank))
            ranking = ranking[: rerank["depth"]][::-1][:top_k]
            report = SimpleNamespace(
                model_id=rerank["backend"], candidates=len(ranking), truncated=0, retrieval_weight=0.0
            )
        return SimpleNamespace(
            rerank=report,
            results=[
                SimpleNamespace(passage=SimpleNamespace(id=pid, doc_id=pid.split("#")[0]), score=1.0 / rank)
                for rank, pid in enumerate(ranking, start=1)
            ],
            timings=[SimpleNamespace(stage="retrieve", millis=1.0)],
            versions=[SimpleNamespace(index=index, retriever=r, version=1, model_id="") for r in retrievers],
        )

    def search_batch(self, queries, *, index, top_k, retrievers, fusion, rerank=None):
        if self.max_batch is not None and len(queries) > self.max_batch:
            self.calls.append(("refused", len(queries)))
            raise ResourceExhausted("reply too large")
        self.calls.append(("search_batch", len(queries)))
        options = {"index": index, "top_k": top_k, "retrievers": retrievers, "fusion": fusion}
        responses = [self.search(query, **options, rerank=rerank) for query in queries]
        for response in responses:
            response.timings = []  # SearchBatch reports no per-query retrieval stages
        return SimpleNamespace(responses=responses, versions=responses[0].versions if responses else [])

    def delete(self, *, index, drop_index=False):
        self.calls.append(("delete", index, drop_index))
        del self.indexes[index]


@pytest.fixture
def beir_dir(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "tiny set")


def write_beir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": d.upper(), "text": f"text of {d}"}) + "\n" for d in DOCS)
    )
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items())
    )
    (root / "qrels" / "test.tsv").write_text(QRELS)
    return root


def evaluate(client, beir_dir: Path, **kwargs):
    return run_retrieval_eval(
        client, retrieval_experiment(beir_dir, **kwargs), home=beir_dir.parent / "home", progress=False
    )


def test_known_metrics_for_each_retriever(beir_dir: Path):
    results = evaluate(FakeClient(), beir_dir)

    assert results["dense"] == {"ndcg@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0}
    one_low = 1 / math.log2(3)  # DCG of one relevant document at rank 2
    q2 = (one_low + 1 / math.log2(4)) / (1 + one_low)
    assert results["bm25"]["ndcg@10"] == pytest.approx((2 * one_low + q2) / 3, abs=1e-9)
    assert results["bm25"]["mrr@10"] == pytest.approx(0.5)
    assert results["bm25"]["recall@100"] == 1.0
    # Hybrid: perfect on q1 and q2 once passages become documents; q3 got nothing and counts as 0.
    assert results["hybrid"] == pytest.approx({"ndcg@10": 2 / 3, "recall@100": 2 / 3, "mrr@10": 2 / 3})

    timings = results["timings"]
    assert timings["ingest_s"] >= 0
    for name in ("dense", "bm25", "hybrid"):
        assert timings[f"{name}_search_s"] > 0
        assert timings[f"{name}_qps"] == pytest.approx(3 / timings[f"{name}_search_s"])


def test_queries_unseen_by_another_split_are_scored_apart(beir_dir: Path):
    # d2 is relevant in train, so q2 (d2, d3) is seen; q1 (d1) and q3 (d4) are not.
    (beir_dir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq9\td2\t1\nq8\td4\t0\n")
    assert unseen_queries(beir_dir, "test", "train") == ["q1", "q3"]
    results = run_retrieval_eval(
        FakeClient(), retrieval_experiment(beir_dir), home=beir_dir.parent / "home", unseen_by="train",
        progress=False,
    )  # fmt: skip
    unseen = results["unseen"]
    assert (unseen["by"], unseen["queries"]) == ("train", 2)
    # hybrid: q1 perfect, q3 got nothing.
    assert unseen["hybrid"] == pytest.approx({"ndcg@10": 0.5, "recall@100": 0.5, "mrr@10": 0.5})
    assert unseen["dense"]["ndcg@10"] == 1.0
    assert "never relevant in train" in markdown_table(results)


def test_one_index_of_whole_documents_every_query_at_depth_top_k_then_dropped(beir_dir: Path):
    client = FakeClient()
    evaluate(client, beir_dir, retrievers=("bm25", "hybrid"), top_k=7)
    (ingest,) = [c for c in client.calls if c[0] == "ingest"]
    index = ingest[1]
    assert index.startswith("eval-tiny-set-test-")
    assert ingest[2] == {
        "chunking": {"whole_documents": True},
        "retrievers": ["bm25", "dense"],
        "vector_store": "faiss",
    }
    searches = [c for c in client.calls if c[0] == "search"]
    # recall@100 needs 100 documents, so the depth is at least 100.
    assert (
        searches == [("search", ("bm25",), "rrf", 100)] * 3 + [("search", ("dense", "bm25"), "rrf", 100)] * 3
    )
    assert client.calls[-1] == ("delete", index, True) and client.indexes == {}


def test_reranked_runs_add_a_key_per_retriever_and_reranker_on_one_index(beir_dir: Path, tmp_path: Path):
    client = FakeClient()
    model = tmp_path / "ce"
    model.mkdir()
    models = reranker_models([f"cross_encoder={model}", "first=hub/first"])
    results = evaluate(
        client,
        beir_dir,
        retrievers=("bm25",),
        rerank=("cross_encoder", "first"),
        rerank_depth=2,
        reranker_models=models,
    )
    assert list(results) == ["bm25", "bm25+cross_encoder", "bm25+first", "timings", "dataset"]
    # Reversing bm25's best two puts every first relevant document on top; q2's d3 stays third.
    q2 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    expected = {"ndcg@10": pytest.approx((2 + q2) / 3), "recall@100": 1.0, "mrr@10": 1.0}
    assert results["bm25+cross_encoder"] == results["bm25+first"] == expected
    assert {"bm25+first_search_s", "bm25+first_qps", "bm25+cross_encoder_qps"} <= set(results["timings"])
    assert [c[0] for c in client.calls].count("ingest") == 1
    reranked = [c for c in client.calls if c[0] == "rerank"]
    assert len(reranked) == 6 and reranked[0] == (
        "rerank",
        ("bm25",),
        2,
        {"backend": "cross_encoder", "model": str(model), "depth": 2, "required": True},
    )
    assert reranked[-1][3]["model"] == "hub/first"
    assert markdown_table(results).splitlines()[3].startswith("| bm25+cross_encoder | 0.9732 | 1 | 1 | ")


@pytest.mark.parametrize("items", [["cross_encoder"], ["=m"], ["first="]])
def test_bad_reranker_models(items):
    with pytest.raises(ValueError, match="BACKEND=PATH_OR_ID"):
        reranker_models(items)


def test_the_runs_are_recorded(beir_dir: Path):
    evaluate(FakeClient(), beir_dir, retrievers=("dense",))
    (record,) = list_runs(beir_dir.parent / "home")
    assert record["experiment"] == "retrieval-tiny set" and record["config"]["retrievers"] == ["dense"]


@pytest.mark.parametrize(
    ("options", "sent"),
    [
        (
            {"vector_store": "chroma", "chunk_tokens": 64},
            {
                "vector_store": "chroma",
                "chunking": {"chunk_tokens": 64, "overlap_tokens": 12},
                "retrievers": ["dense"],
            },
        ),
        (
            {"retrievers": ("colbert",), "colbert_model": "ckpt"},
            {"chunking": {"whole_documents": True}, "retrievers": ["colbert"], "colbert_model": "ckpt"},
        ),
    ],
)
def test_options_shape_the_index_spec(beir_dir: Path, options, sent):
    client = FakeClient()
    evaluate(client, beir_dir, **{"retrievers": ("dense",), **options})
    assert client.calls[0][2] == sent


def test_ingested_documents_are_the_corpus(beir_dir: Path):
    client = FakeClient()
    client.delete = lambda **kwargs: None  # keep the index to look at it
    evaluate(client, beir_dir, retrievers=("dense",))
    (index,) = client.indexes.values()
    assert index["documents"][0] == {"id": "d1", "title": "D1", "text": "text of d1", "metadata": {}}
    assert [d["id"] for d in index["documents"]] == DOCS


def test_a_named_index_is_searched_neither_ingested_nor_dropped(beir_dir: Path):
    client = FakeClient()
    client.indexes["existing"] = {"retrievers": ["dense"], "documents": []}
    results = evaluate(client, beir_dir, retrievers=("dense",), index="existing")
    assert {call[0] for call in client.calls} == {"search_batch", "search"}
    assert results["timings"]["ingest_s"] is None
    assert "existing" in client.indexes


def test_a_kept_index_is_reused_by_the_next_run(beir_dir: Path):
    client = FakeClient()
    first = evaluate(client, beir_dir, retrievers=("dense",), keep_index=True)
    again = evaluate(client, beir_dir, retrievers=("dense",), keep_index=True)
    assert [call[0] for call in client.calls].count("ingest") == 1 and len(client.indexes) == 1
    assert first["timings"]["ingest_s"] >= 0 and again["timings"]["ingest_s"] is None


def test_two_experiments_at_once_never_drop_the_index_the_other_searches(beir_dir: Path):
    client, inner = FakeClient(), []
    search = client.search

    def search_then_run_another(*args, **kwargs):
        if not inner:  # a second experiment of the same settings starts, runs and ends meanwhile
            inner.append(None)
            inner[0] = evaluate(client, beir_dir, retrievers=("dense",))
        return search(*args, **kwargs)

    client.search = search_then_run_another
    outer = evaluate(client, beir_dir, retrievers=("dense",))
    ingested = [call[1] for call in client.calls if call[0] == "ingest"]
    assert len(set(ingested)) == 2 and not client.indexes
    assert outer["dense"] == inner[0]["dense"] == {"ndcg@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0}


def test_index_is_dropped_when_a_search_fails(beir_dir: Path):
    client = FakeClient(fail_on="bm25")
    with pytest.raises(ConnectionError):
        evaluate(client, beir_dir, retrievers=("dense", "bm25"))
    assert client.calls[-1][0] == "delete" and client.indexes == {}


def test_a_failed_drop_is_logged_and_keeps_the_results(beir_dir: Path, caplog):
    client = FakeClient()

    def broken_delete(**kwargs):
        raise ConnectionError("pipeline went away")

    client.delete = broken_delete
    results = evaluate(client, beir_dir, retrievers=("dense",))
    assert results["dense"]["ndcg@10"] == 1.0
    assert "could not drop index 'eval-tiny-set-test-" in caplog.text and "pipeline went away" in caplog.text


@pytest.mark.parametrize("retrievers", [(), ("timings",), ("dense", "dataset")])
def test_bad_retriever_names(beir_dir: Path, retrievers):
    with pytest.raises(ValueError, match="retrievers"):
        retrieval_experiment(beir_dir, retrievers=retrievers)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rerank": ("cross_encoder",), "rerank_depth": 0}, "rerank_depth: must be at least 1"),
        ({"rerank": ("",)}, "must not be empty"),
        (
            {"rerank": ("first",), "reranker_models": {"cross_encoder": "m"}},
            r"reranker_models: \['cross_encoder'\]",
        ),
    ],
)
def test_bad_rerank_options(beir_dir: Path, options, message):
    with pytest.raises(ValueError, match=message):
        retrieval_experiment(beir_dir, **options)


def test_progress_bar_renders(beir_dir: Path, capsys):
    config = retrieval_experiment(beir_dir, retrievers=("dense",))
    run_retrieval_eval(FakeClient(), config, home=beir_dir.parent / "home", progress=True)
    out = capsys.readouterr().out
    assert "retrieval-tiny-set-" in out and "done" in out


def test_markdown_table(beir_dir: Path):
    table = markdown_table(evaluate(FakeClient(), beir_dir)).splitlines()
    assert table[0] == "| retriever | ndcg@10 | recall@100 | mrr@10 | search s | QPS |"
    assert table[2].startswith("| dense | 1 | 1 | 1 | ")
    assert table[4].startswith("| hybrid | 0.6667 | 0.6667 | 0.6667 | ")
    assert table[-3].startswith("ingest: ")
    assert table[-1] == (
        "queries: 3 asked, 0 without qrels not asked; documents with neither title nor text skipped: 0 "
        "(where judged, misses)"
    )


# --- batches ------------------------------------------------------------------------------------


def comparable(record: dict) -> dict:
    """What a run found, without its ids (its index's name among them), times and latencies."""
    found = {key: record[key] for key in ("config", "dataset", "aggregate", "per_query", "rerank")}
    return found | {
        "versions": [{k: v for k, v in ver.items() if k != "index"} for ver in record["versions"]]
    }


def runs(client: FakeClient, beir_dir: Path, home: str, batch_size: int) -> list[dict]:
    config = retrieval_experiment(
        beir_dir, rerank=("cross_encoder",), rerank_depth=2, top_k=7, batch_size=batch_size
    )
    run_retrieval_eval(client, config, home=beir_dir.parent / home, progress=False)
    return [comparable(r) for r in list_runs(beir_dir.parent / home)]


def test_batches_find_what_one_search_a_query_finds(beir_dir: Path):
    one_by_one, batched = FakeClient(), FakeClient()
    single = runs(one_by_one, beir_dir, "single", batch_size=1)
    # 3 queries in batches of 2: a full batch and a short one, for plain runs, reranked runs and the
    # reranked runs' retrieval tails.
    assert runs(batched, beir_dir, "batched", batch_size=2) == single
    assert len(single) == 6 and {r["config"]["rerank"] for r in single} == {False, "cross_encoder"}
    assert not [c for c in one_by_one.calls if c[0] == "search_batch"]
    sizes = [c[1] for c in batched.calls if c[0] == "search_batch"]
    assert sorted(sizes) == [1] * 9 + [2] * 9  # 3 plain runs; 3 reranked ones, each with its tail


def test_a_batch_the_fleet_refuses_as_too_large_is_searched_in_halves(beir_dir: Path):
    client = FakeClient(max_batch=1)
    results = evaluate(client, beir_dir, retrievers=("bm25",), batch_size=3)
    assert results["bm25"] == evaluate(FakeClient(), beir_dir, retrievers=("bm25",), batch_size=1)["bm25"]
    tried = [c for c in client.calls if c[0] in ("refused", "search_batch")]
    assert tried == [("refused", 3), ("search_batch", 1), ("refused", 2), *[("search_batch", 1)] * 2]


def test_batched_latency_shares_the_batch_time_and_sums_to_the_search_time(beir_dir: Path):
    results = evaluate(FakeClient(), beir_dir, retrievers=("dense",), batch_size=2)
    (record,) = list_runs(beir_dir.parent / "home")
    per_query = record["latency_ms"]["per_query"]
    assert set(per_query) == {"q1", "q2", "q3"} and per_query["q1"] == per_query["q2"]
    assert all(set(ms) == {"total"} for ms in per_query.values())
    seconds = sum(ms["total"] for ms in per_query.values()) / 1000.0
    assert results["timings"]["dense_search_s"] == pytest.approx(seconds)


# --- collections as they come ------------------------------------------------------------------


def test_empty_documents_are_skipped_and_counted_and_judged_ones_are_misses(tmp_path: Path):
    root = write_beir(tmp_path / "gaps")
    with (root / "corpus.jsonl").open("a") as corpus:
        corpus.write(json.dumps({"_id": "d7", "title": "", "text": ""}) + "\n")
    with (root / "queries.jsonl").open("a") as queries:
        queries.write(json.dumps({"_id": "q9", "text": "never judged"}) + "\n")
    with (root / "qrels" / "test.tsv").open("a") as qrels:
        qrels.write("q3\td7\t1\n")
    client = FakeClient()
    client.delete = lambda **kwargs: None  # keep the index to look at it
    results = evaluate(client, root, retrievers=("dense",))
    (index,) = client.indexes.values()
    assert [d["id"] for d in index["documents"]] == DOCS
    assert results["dataset"] == {"queries": 3, "skipped_documents": 1, "queries_without_qrels": 1}
    # dense finds d4 for q3 but d7 could not be found: half of q3's relevant documents.
    assert results["dense"]["recall@100"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert "skipped: 1 (where judged, misses)" in markdown_table(results)


def test_a_named_index_serves_runs_of_different_retrievers(beir_dir: Path):
    # A bm25 run sets no vector store and a dense one does: they still search the same index.
    config = retrieval_experiment(
        beir_dir, retrievers=("dense", "bm25", "hybrid"), index="kb", rerank=["first"]
    )
    assert config.index == "kb" and len(config.runs()) == 6
