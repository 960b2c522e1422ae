"""`ragfleet eval qa`, `eval report` and `eval retrieval` as a user runs them (typer's runner, real files;
`eval retrieval` against an in-memory fake of the fleet)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from test_eval_retrieval import FakeClient, write_beir
from test_report_build import make_record
from typer.testing import CliRunner

from services.cli import app

runner = CliRunner()


def squad_v2(tmp_path: Path) -> Path:
    paragraph = {
        "context": "The keeper lit the amber lamp in 1858.",
        "qas": [
            {"id": "when", "question": "When?", "answers": [{"text": "1858", "answer_start": 34}]},
            {"id": "who", "question": "Who built it?", "answers": [], "is_impossible": True},
        ],
    }
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "T", "paragraphs": [paragraph]}]}))
    return path


def test_eval_qa_prints_and_writes_the_official_v2_scores(tmp_path: Path) -> None:
    predictions = tmp_path / "pred.json"
    predictions.write_text(json.dumps({"when": "in 1858", "who": ""}))
    out = tmp_path / "scores.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "qa",
            "--squad",
            str(squad_v2(tmp_path)),
            "--predictions",
            str(predictions),
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    assert scores["total"] == 2 and scores["NoAns_exact"] == 100.0 and scores["HasAns_exact"] == 0.0
    assert scores["HasAns_f1"] == pytest.approx(100.0 * 2 / 3)
    assert json.loads(result.output.strip().splitlines()[-1]) == scores


def test_eval_qa_names_a_malformed_file(tmp_path: Path) -> None:
    predictions = tmp_path / "pred.json"
    predictions.write_text("{not json")
    result = runner.invoke(
        app, ["eval", "qa", "--squad", str(squad_v2(tmp_path)), "--predictions", str(predictions)]
    )
    assert result.exit_code == 1 and "pred.json" in result.output


def test_eval_report_builds_from_run_ids(tmp_path: Path, monkeypatch) -> None:
    runs = tmp_path / "home" / "runs"
    runs.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for run_id, shift in (("r1", 0.0), ("r2", 0.2)):
        record = make_record(
            run_id,
            vector_store="faiss",
            chunk_tokens=128 + int(shift * 640),
            ndcg=rng.uniform(0, 0.5, 30) + shift,
            latency={"retrieve": 4.0},
        )
        (runs / f"{run_id}.json").write_text(json.dumps(record))
    monkeypatch.setenv("RAGFLEET_HOME", str(tmp_path / "home"))
    from services.runtime.settings import get_settings

    get_settings.cache_clear()
    out = tmp_path / "report"
    result = runner.invoke(app, ["eval", "report", "r1", "r2", "--out", str(out)])
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    assert "r1" in markdown and "r2" in markdown and "significantly better" in markdown
    assert len(list(out.glob("*.png"))) >= 2
    missing = runner.invoke(app, ["eval", "report", "nope", "--out", str(out)])
    assert missing.exit_code == 1 and "nope" in missing.output


def test_eval_retrieval_prints_and_writes_the_scores(tmp_path: Path, monkeypatch) -> None:
    client = FakeClient()
    monkeypatch.setattr("services.cli._client", lambda *args, **kwargs: nullcontext(client))
    monkeypatch.setenv("RAGFLEET_HOME", str(tmp_path / "home"))
    from services.runtime.settings import get_settings

    get_settings.cache_clear()
    out, table = tmp_path / "scores.json", tmp_path / "scores.md"
    dataset = write_beir(tmp_path / "tiny set")
    args = ["--beir", str(dataset), "--retrievers", "dense,hybrid", "--chunk-tokens", "100"]
    result = runner.invoke(app, ["eval", "retrieval", *args, "--json", str(out), "--markdown", str(table)])
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    assert set(scores) == {"dense", "hybrid", "timings", "dataset"} and scores["dense"]["ndcg@10"] == 1.0
    assert set(scores["hybrid"]) == {"ndcg@10", "recall@100", "mrr@10"}
    timings = {"ingest_s", "dense_search_s", "dense_qps", "hybrid_search_s", "hybrid_qps"}
    assert set(scores["timings"]) == timings
    assert table.read_text().startswith("| retriever | ndcg@10 | recall@100 | mrr@10 | search s | QPS |")
    assert client.calls[0][2]["chunking"] == {"chunk_tokens": 100, "overlap_tokens": 20}
    assert len(list((tmp_path / "home" / "runs").glob("*.json"))) == 2


def test_eval_retrieval_reranks_each_retriever_with_each_backend(tmp_path: Path, monkeypatch) -> None:
    client = FakeClient()
    monkeypatch.setattr("services.cli._client", lambda *args, **kwargs: nullcontext(client))
    monkeypatch.setenv("RAGFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    from services.runtime.settings import get_settings

    get_settings.cache_clear()
    (tmp_path / "ce").mkdir()
    out = tmp_path / "scores.json"
    dataset = write_beir(tmp_path / "tiny set")
    args = ["--beir", str(dataset), "--retrievers", "dense,hybrid", "--rerank", "cross_encoder,first"]
    args += ["--rerank-depth", "5", "--reranker-model", "cross_encoder=ce", "--json", str(out)]
    result = runner.invoke(app, ["eval", "retrieval", *args])
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    names = ["dense", "dense+cross_encoder", "dense+first", "hybrid", "hybrid+cross_encoder", "hybrid+first"]
    assert list(scores) == ["dataset", *names, "timings"]
    assert all(set(scores[name]) == {"ndcg@10", "recall@100", "mrr@10"} for name in names)
    assert {f"{name}_qps" for name in names} <= set(scores["timings"])
    specs = {call[3]["backend"]: call[3] for call in client.calls if call[0] == "rerank"}
    assert specs["cross_encoder"]["model"] == str(tmp_path / "ce") and specs["first"]["model"] == ""
    assert specs["first"]["depth"] == 5
    bad = runner.invoke(app, ["eval", "retrieval", "--beir", str(dataset), "--reranker-model", "first"])
    assert bad.exit_code == 1 and "BACKEND=PATH_OR_ID" in bad.output
