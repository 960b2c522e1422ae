"""services.evaluator.experiments: config parsing, sweep expansion, run records (with a fake client)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ragfleet.errors import NotFound
from services.evaluator.experiments import (
    RUN_RECORD_KEYS,
    ExperimentConfig,
    ExperimentProgress,
    IngestSettings,
    index_groups,
    list_runs,
    load_run,
    run_experiment,
)

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text, "utf-8")
    return path


def test_defaults_give_one_run() -> None:
    config = ExperimentConfig(name="x", dataset="demo")
    (run,) = config.runs()
    assert run.as_dict() == {
        "vector_store": "faiss",
        "chunk_tokens": 200,
        "overlap_tokens": 40,
        "whole_documents": False,
        "retrievers": ["dense", "bm25"],
        "fusion": "rrf",
        "rerank": False,
        "top_k": 10,
        "temperature": 0.0,
        "colbert_model": "",
        "mamba_model": "",
        "seal_model": "",
        "rerank_depth": 0,
        "reranker_model": "",
        "retrieval_weight": None,
    }
    assert config.metrics is None and config.max_queries is None and not config.keep_index


def test_sweep_expands_to_the_cartesian_product_without_repeats(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
name: grid
dataset: demo
sweep:
  chunk_tokens: [32, 64]
  overlap_tokens: 8
  retrievers: [bm25, [dense, bm25], bm25]
  top_k: [5, 10]
""",
    )
    runs = ExperimentConfig.from_yaml(path).runs()
    assert len(runs) == 2 * 2 * 2
    assert runs[0].retrievers == ("bm25",) and runs[2].retrievers == ("dense", "bm25")
    assert [r.top_k for r in runs[:2]] == [5, 10]
    assert len(set(runs)) == len(runs)  # frozen and hashable
    # bm25-only runs join the dense runs' index of the same chunking: one index per chunk size.
    groups = index_groups(runs)
    assert list(groups) == [IngestSettings("faiss", 32, 8, False), IngestSettings("faiss", 64, 8, False)]
    assert [[position for position, _ in members] for members in groups.values()] == [
        [1, 2, 3, 4],
        [5, 6, 7, 8],
    ]


def test_rerank_is_a_sweep_dimension_with_a_depth_and_a_model_per_backend(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
name: rr
dataset: demo
sweep:
  rerank: [false, cross_encoder, first, true]
  rerank_depth: [10, 30]
reranker_models: {cross_encoder: /ckpt/ce}
""",
    )
    runs = ExperimentConfig.from_yaml(path).runs()
    # Without reranking the depth does not matter: one run, not two.
    assert [(r.rerank, r.rerank_depth, r.reranker_model) for r in runs] == [
        (False, 0, ""),
        ("cross_encoder", 10, "/ckpt/ce"),
        ("cross_encoder", 30, "/ckpt/ce"),
        ("first", 10, ""),
        ("first", 30, ""),
        (True, 10, ""),
        (True, 30, ""),
    ]
    assert len(index_groups(runs)) == 1  # reranking does not change the index
    assert runs[1].rerank_spec(10) == {
        "backend": "cross_encoder",
        "model": "/ckpt/ce",
        "depth": 10,
        "required": True,
    }
    assert runs[-1].rerank_spec(30)["backend"] == ""
    # A retrieval weight set for the experiment goes with every reranked run, and only with those.
    weighted = ExperimentConfig.from_yaml(path).model_copy(update={"retrieval_weight": 0.4}).runs()
    assert [r.retrieval_weight for r in weighted] == [None] + [0.4] * 6
    assert weighted[1].rerank_spec(10)["retrieval_weight"] == 0.4


def test_whole_documents_ignore_window_sizes_when_sharing_an_index() -> None:
    config = ExperimentConfig(
        name="x",
        dataset="demo",
        sweep={"whole_documents": [True, False], "chunk_tokens": [50, 100], "overlap_tokens": [10]},
    )
    ingests = {run.ingest for run in config.runs()}
    assert len(ingests) == 3  # one whole-document index, two windowed ones
    whole = next(i for i in ingests if i.whole_documents)
    assert whole.spec(["dense"]) == {
        "vector_store": "faiss",
        "chunking": {"whole_documents": True},
        "retrievers": ["dense"],
    }
    assert "vector_store" not in whole.spec(["bm25"])


def test_a_retrievers_own_setting_splits_indexes_only_between_runs_that_use_it() -> None:
    config = ExperimentConfig(
        name="x",
        dataset="demo",
        sweep={"retrievers": ["bm25", "colbert", "dense"], "colbert_model": ["a", "b"]},
    )
    groups = index_groups(config.runs())
    # bm25 and dense (once per checkpoint, as for every swept value) share the first checkpoint's
    # index; the second checkpoint needs its own.
    assert [key.colbert_model for key in groups] == ["a", "b"]
    assert [[run.retrievers[0] for _, run in members] for members in groups.values()] == [
        ["bm25", "bm25", "colbert", "dense", "dense"],
        ["colbert"],
    ]
    first = next(iter(groups))
    assert first.spec(["bm25", "colbert", "dense"])["colbert_model"] == "a"
    assert "colbert_model" not in first.spec(["bm25", "dense"])


def test_relative_dataset_paths_are_read_from_the_config_folder(tmp_path: Path) -> None:
    config = ExperimentConfig.from_yaml(
        write_config(tmp_path, "name: x\ndataset: {kind: beir, path: data/b}\n")
    )
    assert config.dataset == {"kind": "beir", "path": str(tmp_path / "data/b")}
    assert ExperimentConfig.from_yaml(write_config(tmp_path, "name: x\ndataset: q.jsonl\n")).dataset == str(
        tmp_path / "q.jsonl"
    )
    assert ExperimentConfig.from_yaml(write_config(tmp_path, "name: x\ndataset: demo\n")).dataset == "demo"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\ndataset: demo\nsweep:\n  top_k: [0]\n", r"sweep\.top_k: .*at least 1"),
        ("name: x\ndataset: demo\nsweep:\n  vector_store: [milvus]\n", r"sweep\.vector_store\.0: .*'faiss'"),
        ("name: x\ndataset: demo\nsweep:\n  chunk_tokens: [30]\n", r"sweep: .*overlap_tokens 40 is not"),
        ("name: x\ndataset: demo\nsweep:\n  retrievers: [[dense, dense]]\n", r"names a retriever twice"),
        ("name: x\ndataset: demo\nsweep:\n  topk: [5]\n", r"sweep\.topk: Extra inputs"),
        ("name: x\ndataset: demo\nmetrics: [ndcg_cut_10]\n", r"metrics: .*write 'ndcg_cut_10' as 'ndcg@10'"),
        ("name: x\ndataset: demo\nmetrics: [bleu]\n", r"metrics: .*unknown metric 'bleu'"),
        ("dataset: demo\n", r"name: Field required"),
        ("name: x\ndataset: demo\nindex: kb\nsweep:\n  chunk_tokens: [50, 100]\n", r"fixed ingest settings"),
        ("name: x\n\tdataset: demo\n", r"exp\.yaml:2: not valid YAML"),
        ("- just a list\n", r"expected a mapping"),
        ("name: x\ndataset: demo\nsweep:\n  rerank: ['']\n", r"sweep\.rerank: .*must not be empty"),
        ("name: x\ndataset: demo\nsweep:\n  rerank_depth: [-1]\n", r"sweep\.rerank_depth: .*at least 0"),
        ("name: x\ndataset: demo\nreranker_models: {first: m}\n", r"reranker_models: \['first'\] not in"),
    ],
)  # fmt: skip
def test_config_errors_name_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        ExperimentConfig.from_yaml(write_config(tmp_path, text))
    assert str(caught.value).startswith(str(tmp_path / "exp.yaml"))


def test_example_configs_parse() -> None:
    scifact = ExperimentConfig.from_yaml(ROOT / "deploy/eval/scifact-sweep.yaml")
    assert scifact.dataset["kind"] == "beir" and len(scifact.runs()) == 6
    demo = ExperimentConfig.from_yaml(ROOT / "deploy/eval/demo-sweep.yaml")
    assert demo.dataset == "demo" and len(index_groups(demo.runs())) == 2


# --- run_experiment with an in-memory fake of ragfleet.Client -----------------------------------


def passage(doc_id: str, n: int, score: float) -> SimpleNamespace:
    return SimpleNamespace(passage=SimpleNamespace(id=f"{doc_id}#{n}", doc_id=doc_id), score=score)


class FakeClient:
    """Search answers from a fixed ranking (reranking reverses its top_k); records every call."""

    RANKING = {"alpha?": [passage("d2", 0, 3.0), passage("d1", 1, 2.0), passage("d1", 0, 1.0)]}

    def __init__(self, reranker: bool = False) -> None:
        self.calls: list[tuple] = []
        self.indexes: set[str] = set()
        self.reranker = reranker

    def describe(self):
        return SimpleNamespace(retrievers=["bm25", "dense"], reranker=self.reranker)

    def describe_index(self, index):
        if index not in self.indexes:
            raise NotFound(index)
        return SimpleNamespace(retrievers=[])

    def ingest(self, source, *, index, spec=None, progress=None):
        self.calls.append(("ingest", index, spec, len(source)))
        self.indexes.add(index)
        progress(len(source))

    def search(self, query, *, index, top_k, retrievers, fusion, rerank=None):
        results = self.RANKING.get(query, [])
        timings = [SimpleNamespace(stage="retrieve", millis=2.0), SimpleNamespace(stage="search", millis=1.0)]
        report = None
        if rerank is None:
            self.calls.append(("search", index, top_k, tuple(retrievers)))
        else:
            self.calls.append(("rerank", index, top_k, rerank))
            candidates = results[: rerank["depth"]]
            results = [passage(p.passage.doc_id, 9, -1.0 * i) for i, p in enumerate(reversed(candidates))]
            results = results[:top_k]
            timings.append(SimpleNamespace(stage="rerank", millis=5.0))
            weight = rerank.get("retrieval_weight", 0.3)
            report = SimpleNamespace(
                model_id="ce@1", candidates=len(candidates), truncated=1, retrieval_weight=weight
            )
        return SimpleNamespace(
            results=results,
            timings=timings,
            versions=[SimpleNamespace(index=index, retriever=retrievers[0], version=1, model_id="")],
            rerank=report,
        )

    def delete(self, *, index, drop_index=False):
        self.calls.append(("delete", index))
        self.indexes.discard(index)


@pytest.fixture
def beir_dir(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    (root / "qrels").mkdir(parents=True)
    docs = [{"_id": "d1", "text": "alpha"}, {"_id": "d2", "text": "beta"}]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), "utf-8")
    queries = [{"_id": "q1", "text": "alpha?"}, {"_id": "q2", "text": "nothing"}]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), "utf-8")
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\nq2\td2\t1\n", "utf-8")
    return root


def test_ir_runs_share_an_index_and_write_records(tmp_path: Path, beir_dir: Path) -> None:
    client = FakeClient()
    config = ExperimentConfig(
        name="tiny",
        dataset=str(beir_dir),
        sweep={"retrievers": ["bm25"], "top_k": [5, 200], "chunk_tokens": [64], "overlap_tokens": [8]},
    )
    seen: list[ExperimentProgress] = []
    home = tmp_path / "home"
    run_ids = run_experiment(client, config, home=home, progress=seen.append)

    ingests = [c for c in client.calls if c[0] == "ingest"]
    assert len(ingests) == 1 and ingests[0][2]["chunking"] == {"chunk_tokens": 64, "overlap_tokens": 8}
    index = ingests[0][1]
    assert index.startswith("eval-tiny-test-") and client.calls[-1] == ("delete", index)
    # Depth: recall@100 needs 100 documents, a top_k above that is kept.
    assert [c[2] for c in client.calls if c[0] == "search"] == [100, 100, 200, 200]

    records = [load_run(home, run_id) for run_id in run_ids]
    assert [r["run_id"] for r in list_runs(home, "tiny")] == sorted(run_ids)
    for record in records:
        assert tuple(record) == tuple(sorted(RUN_RECORD_KEYS))
        assert record["dataset"] == {
            "name": "tiny-test",
            "kind": "ir",
            "queries": 2,
            "skipped_documents": 0,
            "queries_without_qrels": 0,
        }
        assert record["versions"] == [{"index": index, "retriever": "bm25", "version": 1, "model_id": ""}]
        assert record["retrieval_only"] is True and record["ingest_s"] >= 0
        # q1: d1 ranks second (its best passage scores 2.0); q2 finds nothing.
        assert record["per_query"]["q1"]["mrr@10"] == 0.5 and record["per_query"]["q2"]["ndcg@10"] == 0.0
        assert record["aggregate"] == {
            "ndcg@10": pytest.approx(0.5 * 0.6309297535714575),
            "recall@100": 0.5,
            "mrr@10": 0.25,
        }
        latency = record["latency_ms"]
        assert set(latency["per_query"]["q1"]) == {"retrieve", "total"}
        assert latency["mean"]["retrieve"] == 2.0 and latency["p50_total"] <= latency["p99_total"]
    assert seen[0] == ExperimentProgress(run_ids[0], 2, 2, "ingest")
    assert [p.stage for p in seen[1:4]] == ["query", "query", "done"]


def test_reranked_runs_put_the_reranked_head_before_the_retrieval_tail(
    tmp_path: Path, beir_dir: Path
) -> None:
    client = FakeClient(reranker=True)
    config = ExperimentConfig(
        name="tiny",
        dataset=str(beir_dir),
        sweep={"retrievers": ["bm25"], "rerank": [False, "cross_encoder"], "rerank_depth": [1, 300]},
        reranker_models={"cross_encoder": "/ckpt"},
    )
    home = tmp_path / "home"
    plain, shallow, deep = (load_run(home, r) for r in run_experiment(client, config, home=home))
    assert [c[0] for c in client.calls].count("ingest") == 1
    spec = {"backend": "cross_encoder", "model": "/ckpt", "required": True}
    reranked = [c for c in client.calls if c[0] == "rerank"]
    # Depth 1 of 100: the best passage reranked, then a search for the rest; depth 300: reranked only.
    assert (
        reranked
        == [("rerank", reranked[0][1], 1, {**spec, "depth": 1})] * 2
        + [("rerank", reranked[0][1], 100, {**spec, "depth": 300})] * 2
    )
    assert [c[0] for c in client.calls if c[0] in ("search", "rerank")] == [
        *["search"] * 2, *["rerank", "search"] * 2, *["rerank"] * 2
    ]  # fmt: skip
    # q1 retrieves d2, d1: reranking one passage keeps d2 first; reranking all puts d1 first.
    assert plain["per_query"]["q1"]["mrr@10"] == shallow["per_query"]["q1"]["mrr@10"] == 0.5
    assert deep["per_query"]["q1"]["mrr@10"] == 1.0
    assert plain["rerank"] is None and plain["config"]["rerank"] is False
    assert shallow["config"] | {"rerank": "cross_encoder", "rerank_depth": 1} == shallow["config"]
    assert deep["rerank"] == {
        "model_ids": ["ce@1"],
        "candidates": 3,
        "truncated": 2,
        "retrieval_weights": [0.3],
    }
    assert set(deep["latency_ms"]["per_query"]["q1"]) == {"retrieve", "rerank", "total"}


def test_fleet_and_dataset_mismatches_fail_before_any_work(tmp_path: Path, beir_dir: Path) -> None:
    client = FakeClient()
    cases = [
        ({"sweep": {"retrievers": ["colbert"]}}, r"the fleet has no \['colbert'\]"),
        ({"sweep": {"rerank": [True]}}, "no reranker"),
        ({"metrics": ["exact_match"]}, "needs a QA dataset"),
    ]
    for overrides, message in cases:
        config = ExperimentConfig(name="x", dataset=str(beir_dir), **overrides)
        with pytest.raises(ValueError, match=message):
            run_experiment(client, config, home=tmp_path)
    assert client.calls == []
    qa = tmp_path / "q.jsonl"
    qa.write_text('{"question": "q", "answers": ["a"]}\n', "utf-8")
    with pytest.raises(ValueError, match="name an existing `index`"):
        run_experiment(client, ExperimentConfig(name="x", dataset=str(qa)), home=tmp_path)
    shallow = {"rerank": [True], "rerank_depth": [2], "top_k": [5]}
    with pytest.raises(ValueError, match="sweep.rerank_depth: a QA run reranks at least its top_k"):
        run_experiment(
            client, ExperimentConfig(name="x", dataset=str(qa), index="kb", sweep=shallow), home=tmp_path
        )
    assert client.calls == []


def test_load_run_rejects_paths_and_missing_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a run id"):
        load_run(tmp_path, "../etc/passwd")
    with pytest.raises(FileNotFoundError, match="no record of run 'nope'"):
        load_run(tmp_path, "nope")
    assert list_runs(tmp_path) == []
