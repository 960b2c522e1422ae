"""`run_experiment` against a real fleet (`ragfleet serve` processes on loopback, BM25 only).

Checks the run records' schema, that per-query metrics equal an independent pytrec_eval computation
over what the pipeline returns, and that runs with the same ingest settings share one index.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytrec_eval

import ragfleet
from services.demo.corpus import demo_documents, demo_questions
from services.evaluator.experiments import RUN_RECORD_KEYS, ExperimentConfig, list_runs, run_experiment
from tools.fleet import start_local_fleet

pytestmark = pytest.mark.integration


class CountingClient:
    """A real `ragfleet.Client` that counts ingests and remembers the passages each question got."""

    def __init__(self, client: ragfleet.Client) -> None:
        self._client = client
        self.ingested: list[str] = []
        self.passages: dict[tuple[str, str], list] = {}

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def ingest(self, source, *, index, **options):
        self.ingested.append(index)
        return self._client.ingest(source, index=index, **options)

    def ask(self, question, *, index, **options):
        for event in self._client.ask(question, index=index, **options):
            if event.WhichOneof("event") == "retrieved":
                self.passages[(index, question)] = list(event.retrieved.passages)
            yield event

    def search(self, query, *, index, **options):
        response = self._client.search(query, index=index, **options)
        self.passages[(index, query)] = list(response.results)
        return response


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CountingClient]:
    fleet = start_local_fleet(tmp_path_factory.mktemp("fleet"), names=("retriever-bm25", "pipeline"))
    try:
        with ragfleet.Client(fleet.address, timeout=120.0) as sdk:
            yield CountingClient(sdk)
    finally:
        fleet.stop()


def independent_scores(passages: list, qrels: dict[str, int]) -> dict[str, float]:
    """nDCG@10 and Recall@100 of one ranked passage list by pytrec_eval directly, a document ranked at its
    first passage (scored minus that position, so ties cannot reorder it)."""
    docs: dict[str, float] = {}
    for position, hit in enumerate(passages):
        docs.setdefault(hit.passage.doc_id, -float(position))
    evaluator = pytrec_eval.RelevanceEvaluator({"q": qrels}, {"ndcg_cut.10", "recall.100"})
    scores = evaluator.evaluate({"q": docs})["q"]
    return {"ndcg@10": scores["ndcg_cut_10"], "recall@100": scores["recall_100"]}


def test_demo_sweep_over_chunk_sizes(client: CountingClient, tmp_path: Path) -> None:
    config = ExperimentConfig(
        name="demo-chunks",
        dataset="demo",
        sweep={"chunk_tokens": [32, 64], "overlap_tokens": [8], "retrievers": ["bm25"], "top_k": [5]},
    )
    seen = []
    run_ids = run_experiment(client, config, home=tmp_path, progress=seen.append)

    assert len(run_ids) == 2 and len(client.ingested) == 2 and len(set(client.ingested)) == 2
    assert {p.stage for p in seen} == {"ingest", "query", "done"}
    records = {r["run_id"]: r for r in list_runs(tmp_path, "demo-chunks")}
    assert sorted(records) == sorted(run_ids)
    questions = {f"q{n}": q for n, q in enumerate(demo_questions(), start=1)}
    for run_id, index in zip(run_ids, client.ingested):
        record = records[run_id]
        assert tuple(record) == tuple(sorted(RUN_RECORD_KEYS))
        assert json.loads((tmp_path / "runs" / f"{run_id}.json").read_text()) == record
        assert record["dataset"] == {
            "name": "demo",
            "kind": "qa",
            "queries": 8,
            "skipped_documents": 0,
            "queries_without_qrels": 0,
        }
        assert record["config"]["retrievers"] == ["bm25"] and record["config"]["top_k"] == 5
        assert record["retrieval_only"] is True and record["ingest_s"] > 0
        (version,) = record["versions"]
        assert version["index"] == index and version["retriever"] == "bm25" and version["version"] >= 1
        assert set(record["aggregate"]) == {"exact_match", "f1", "ndcg@10", "recall@100", "mrr@10"}
        for qid in ("q1", "q4"):
            passages = client.passages[(index, questions[qid]["question"])]
            expected = independent_scores(passages, {questions[qid]["doc_id"]: 1})
            for metric, value in expected.items():
                assert record["per_query"][qid][metric] == pytest.approx(value, abs=1e-9)
        # BM25 finds the answering document of most demo questions within the top 5 passages.
        assert record["aggregate"]["recall@100"] >= 0.75
        latency = record["latency_ms"]
        assert set(latency["per_query"]) == set(questions)
        assert all(ms["total"] >= ms["retrieve"] > 0 for ms in latency["per_query"].values())
        assert 0 < latency["p50_total"] <= latency["p99_total"]
    assert record["config"]["chunk_tokens"] == 64
    # Both indexes were dropped after their runs.
    assert not {d.index for d in client.list_indexes()} & set(client.ingested)


def test_top_k_sweep_ingests_once_and_searches_ir_datasets(client: CountingClient, tmp_path: Path) -> None:
    folder = tmp_path / "demo-beir"
    (folder / "qrels").mkdir(parents=True)
    rows = [{"_id": d["id"], "title": d["title"], "text": d["text"]} for d in demo_documents()]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    questions = demo_questions()
    queries = [{"_id": f"q{n}", "text": q["question"]} for n, q in enumerate(questions, start=1)]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), "utf-8")
    qrels = "".join(f"q{n}\t{q['doc_id']}\t1\n" for n, q in enumerate(questions, start=1))
    (folder / "qrels" / "test.tsv").write_text(qrels, "utf-8")
    config = ExperimentConfig(
        name="demo-topk",
        dataset=str(folder),
        sweep={"whole_documents": [True], "retrievers": ["bm25"], "top_k": [1, 10]},
        max_queries=5,
        keep_index=True,
    )
    client.ingested.clear()
    run_ids = run_experiment(client, config, home=tmp_path / "home")

    assert len(run_ids) == 2 and len(client.ingested) == 1
    (index,) = client.ingested
    first, second = (list_runs(tmp_path / "home", "demo-topk")[i] for i in (0, 1))
    assert first["ingest_s"] == second["ingest_s"] > 0
    assert first["dataset"] == {
        "name": "demo-beir-test",
        "kind": "ir",
        "queries": 5,
        "skipped_documents": 0,
        "queries_without_qrels": 0,
    }
    assert set(first["aggregate"]) == {"ndcg@10", "recall@100", "mrr@10"}
    # Search depth is max(top_k, 100) for recall@100, so top_k changes no metric of an IR run.
    assert first["per_query"] == second["per_query"]
    for n in (1, 2):
        passages = client.passages[(index, questions[n - 1]["question"])]
        assert len(passages) > 10
        expected = independent_scores(passages, {questions[n - 1]["doc_id"]: 1})
        for metric, value in expected.items():
            assert first["per_query"][f"q{n}"][metric] == pytest.approx(value, abs=1e-9)
    assert set(first["latency_ms"]["mean"]) == {"retrieve", "fuse", "total"}
    # keep_index left the index; running again reuses it instead of ingesting.
    assert index in {d.index for d in client.list_indexes()}
    client.ingested.clear()
    again = run_experiment(client, config.model_copy(update={"keep_index": False}), home=tmp_path / "home")
    assert client.ingested == [] and load_ingest_s(tmp_path / "home", again) == [None, None]
    assert index not in {d.index for d in client.list_indexes()}


def load_ingest_s(home: Path, run_ids: list[str]) -> list[float | None]:
    return [json.loads((home / "runs" / f"{r}.json").read_text())["ingest_s"] for r in run_ids]
