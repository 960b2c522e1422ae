"""services.evaluator.retrieval: the orchestration, with an in-memory fake of ragfleet.Client."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.evaluator.retrieval import (
    default_index_name,
    markdown_table,
    run_retrieval_eval,
    write_results,
)

QUERIES = {"q1": "find one", "q2": "find two and three", "q3": "find four"}
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq2\td3\t1\nq3\td4\t1\n"
DOCS = ["d1", "d2", "d3", "d4", "d5", "d6"]

# Passage ids each (retrievers, fusion) returns per query, best first.
RANKINGS = {
    (("dense",), None): {  # perfect
        "q1": ["d1#0", "d5#0"],
        "q2": ["d2#0", "d3#0", "d6#0"],
        "q3": ["d4#0"],
    },
    (("bm25",), None): {  # every relevant document one place too low
        "q1": ["d5#0", "d1#0"],
        "q2": ["d6#0", "d2#0", "d3#0"],
        "q3": ["d6#0", "d4#0"],
    },
    (("dense", "bm25"), "rrf"): {  # several passages per document; nothing for q3
        "q1": ["d1#2", "d5#0", "d1#0"],
        "q2": ["d3#1", "d2#0", "d3#0"],
        "q3": [],
    },
}


class FakeClient:
    """Implements ingest / search_batch / delete of ragfleet.Client in memory."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.indexes: dict[str, list[dict]] = {}
        self.calls: list[tuple] = []
        self.progress_seen: list[int] = []
        self.fail_on = fail_on

    def ingest(self, source, *, index, spec=None, upsert=False, batch_size=256, progress=None):
        assert index not in self.indexes and not upsert
        self.calls.append(("ingest", index, spec))
        self.indexes[index] = []
        for start in range(0, len(source), 4):
            self.indexes[index].extend(source[start : start + 4])
            if progress:
                self.progress_seen.append(len(self.indexes[index]))
                progress(len(self.indexes[index]))

    def search_batch(self, queries, *, index, top_k=10, retrievers=None, fusion=None, candidates=0):
        assert index in self.indexes
        if self.fail_on in retrievers:
            raise ConnectionError(f"{self.fail_on} is down")
        self.calls.append(("search", tuple(retrievers), fusion, len(queries), top_k))
        by_text = {text: qid for qid, text in QUERIES.items()}
        ranking = RANKINGS[(tuple(retrievers), fusion)]
        return SimpleNamespace(
            responses=[
                SimpleNamespace(
                    results=[
                        SimpleNamespace(
                            passage=SimpleNamespace(id=pid, doc_id=pid.split("#")[0]),
                            score=1.0 / rank,
                            rank=rank,
                            retriever="x",
                        )
                        for rank, pid in enumerate(ranking[by_text[text]][:top_k], start=1)
                    ]
                )
                for text in queries
            ]
        )

    def delete(self, *, index, drop_index=True):
        self.calls.append(("delete", index, drop_index))
        del self.indexes[index]


@pytest.fixture
def beir_dir(tmp_path: Path) -> Path:
    root = tmp_path / "tiny set"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": d.upper(), "text": f"text of {d}"}) + "\n" for d in DOCS)
    )
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items())
    )
    (root / "qrels" / "test.tsv").write_text(QRELS)
    return root


def test_known_metrics_for_each_retriever(beir_dir: Path):
    client = FakeClient()
    results = run_retrieval_eval(client, beir_dir, batch_size=2, progress=False)

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


def test_ingests_whole_documents_searches_in_batches_and_drops_the_index(beir_dir: Path):
    client = FakeClient()
    run_retrieval_eval(client, beir_dir, retrievers=("bm25", "hybrid"), batch_size=2, top_k=7, progress=False)
    index = "eval-tiny-set"
    assert client.calls == [
        ("ingest", index, {"chunking": {"whole_documents": True}, "retrievers": ["bm25", "dense"]}),
        ("search", ("bm25",), None, 2, 7),
        ("search", ("bm25",), None, 1, 7),
        ("search", ("dense", "bm25"), "rrf", 2, 7),
        ("search", ("dense", "bm25"), "rrf", 1, 7),
        ("delete", index, True),
    ]
    assert client.progress_seen == [4, 6]
    assert client.indexes == {}


@pytest.mark.parametrize(
    ("spec", "sent"),
    [
        (
            {"vector_store": "chroma", "chunking": {"chunk_tokens": 64}},
            {"vector_store": "chroma", "chunking": {"chunk_tokens": 64}, "retrievers": ["dense"]},
        ),
        ({"retrievers": ["dense", "colbert"]}, {"retrievers": ["dense", "colbert"]}),
    ],
)
def test_a_given_spec_replaces_the_default(beir_dir: Path, spec, sent):
    client = FakeClient()
    run_retrieval_eval(client, beir_dir, retrievers=("dense",), spec=spec, progress=False)
    assert client.calls[0] == ("ingest", "eval-tiny-set", sent)


def test_ingested_documents_are_the_corpus(beir_dir: Path):
    client = FakeClient()
    client.delete = lambda **kwargs: None  # keep the index to look at it
    run_retrieval_eval(client, beir_dir, retrievers=("dense",), index="mine", progress=False)
    assert client.indexes["mine"][0] == {"id": "d1", "title": "D1", "text": "text of d1", "metadata": {}}
    assert [d["id"] for d in client.indexes["mine"]] == DOCS


def test_reuse_index_neither_ingests_nor_drops(beir_dir: Path):
    client = FakeClient()
    client.indexes["existing"] = []
    results = run_retrieval_eval(
        client, beir_dir, retrievers=("dense",), index="existing", reuse_index=True, progress=False
    )
    assert [call[0] for call in client.calls] == ["search"]
    assert results["timings"]["ingest_s"] is None
    assert "existing" in client.indexes


def test_index_is_dropped_when_a_search_fails(beir_dir: Path):
    client = FakeClient(fail_on="bm25")
    with pytest.raises(ConnectionError):
        run_retrieval_eval(client, beir_dir, retrievers=("dense", "bm25"), progress=False)
    assert client.calls[-1] == ("delete", "eval-tiny-set", True)


def test_a_failed_drop_is_logged_and_keeps_the_results(beir_dir: Path, caplog):
    client = FakeClient()

    def broken_delete(**kwargs):
        raise ConnectionError("pipeline went away")

    client.delete = broken_delete
    results = run_retrieval_eval(client, beir_dir, retrievers=("dense",), progress=False)
    assert results["dense"]["ndcg@10"] == 1.0
    assert "could not drop index 'eval-tiny-set'" in caplog.text and "pipeline went away" in caplog.text


def test_a_short_batch_answer_is_an_error(beir_dir: Path):
    client = FakeClient()
    answer = client.search_batch
    client.search_batch = lambda queries, **kw: SimpleNamespace(
        responses=answer(queries, **kw).responses[:-1]
    )
    with pytest.raises(RuntimeError, match="answered 1 of 2 queries"):
        run_retrieval_eval(client, beir_dir, retrievers=("dense",), batch_size=2, progress=False)


@pytest.mark.parametrize("retrievers", [(), ("timings",)])
def test_bad_retriever_names(beir_dir: Path, retrievers):
    with pytest.raises(ValueError, match="retrievers"):
        run_retrieval_eval(FakeClient(), beir_dir, retrievers=retrievers, progress=False)


def test_progress_bars_render(beir_dir: Path, capsys):
    run_retrieval_eval(FakeClient(), beir_dir, retrievers=("dense",), progress=True)
    out = capsys.readouterr().out
    assert "ingest eval-tiny-set" in out and "search dense" in out


def test_write_results_and_markdown_table(beir_dir: Path, tmp_path: Path):
    results = run_retrieval_eval(FakeClient(), beir_dir, progress=False)
    path = write_results(results, tmp_path / "out" / "scifact.json")
    assert json.loads(path.read_text()) == results
    assert [p.name for p in path.parent.iterdir()] == ["scifact.json"]

    table = markdown_table(results).splitlines()
    assert table[0] == "| retriever | ndcg@10 | recall@100 | mrr@10 | search s | QPS |"
    assert table[2].startswith("| dense | 1 | 1 | 1 | ")
    assert table[4].startswith("| hybrid | 0.6667 | 0.6667 | 0.6667 | ")
    assert table[-1].startswith("ingest: ")


def test_default_index_name():
    assert default_index_name("/data/BEIR sets/scifact") == "eval-scifact"
    assert default_index_name("/data/nfcorpus v1.0") == "eval-nfcorpus-v1-0"
