"""services.evaluator.report: build_report, load_records, pareto_front, run labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from services.evaluator.report import build_report, load_records, pareto_front, run_labels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_record(
    run_id: str, *, vector_store: str, chunk_tokens: int, ndcg: np.ndarray, latency: dict[str, float]
) -> dict:
    """A run record with the given per-query ndcg@10 (recall@100 is ndcg@10 + 0.1) and stage latencies."""
    per_query = {f"q{i}": {"ndcg@10": float(n), "recall@100": float(n) + 0.1} for i, n in enumerate(ndcg)}
    total = sum(latency.values())
    return {
        "run_id": run_id,
        "experiment": "sweep-1",
        "created_at": "2025-01-01T00:00:00Z",
        "config": {
            "vector_store": vector_store,
            "chunk_tokens": chunk_tokens,
            "overlap_tokens": 16,
            "whole_documents": False,
            "retrievers": ["dense"],
            "fusion": "rrf",
            "rerank": None,
            "top_k": 10,
            "temperature": 0.0,
        },
        "dataset": {"name": "scifact", "kind": "beir", "queries": 40},
        "versions": [{"index": "scifact", "retriever": "dense", "version": 1, "model_id": "minilm"}],
        "ingest_s": 12.5,
        "aggregate": {"ndcg@10": float(ndcg.mean()), "recall@100": float(ndcg.mean()) + 0.1},
        "per_query": per_query,
        "latency_ms": {
            "per_query": {qid: {**latency, "total": total} for qid in per_query},
            "mean": {**latency, "total": total},
            "p50_total": total,
            "p99_total": total * 1.5,
        },
        "retrieval_only": True,
    }


@pytest.fixture
def records() -> list[dict]:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.7, size=40)
    wobble = 0.05 * (-1) ** np.arange(40)  # per-query differences that cancel exactly: p = 1
    better = base + 0.1 + rng.normal(0, 0.01, size=40)
    return [
        # fast: on the front
        make_record(
            "run-a", vector_store="faiss", chunk_tokens=128, ndcg=base, latency={"retrieve": 5, "fuse": 1}
        ),
        # same mean quality as run-a, slower: no significant difference, dominated
        make_record(
            "run-b",
            vector_store="faiss",
            chunk_tokens=256,
            ndcg=base + wobble,
            latency={"retrieve": 9, "fuse": 1},
        ),
        # clearly better and slowest: on the front
        make_record(
            "run-c",
            vector_store="chroma",
            chunk_tokens=128,
            ndcg=better,
            latency={"retrieve": 20, "rerank": 30},
        ),
    ]


def test_pareto_front_on_a_hand_made_case():
    points = [(10, 0.5), (20, 0.6), (15, 0.4), (30, 0.6), (5, 0.3), (20, 0.6)]
    # (15, 0.4) loses to (10, 0.5); (30, 0.6) to (20, 0.6); the two (20, 0.6) tie and both stay.
    assert pareto_front(points) == [4, 0, 1, 5]
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([]) == []


def test_run_labels_use_only_varying_fields(records):
    assert run_labels(records) == ["faiss, 128 tok", "faiss, 256 tok", "chroma, 128 tok"]
    assert run_labels(records[:1]) == ["run-a"]
    twins = [records[0], {**records[0], "run_id": "run-a2"}, records[2]]
    assert run_labels(twins) == ["faiss (run-a)", "faiss (run-a2)", "chroma"]


def test_build_report_writes_markdown_html_and_plots(records, tmp_path: Path):
    out = build_report(records, tmp_path / "report", title="Sweep <1>")

    assert out["markdown"] == tmp_path / "report" / "report.md"
    assert out["html"] == tmp_path / "report" / "report.html"
    assert [p.name for p in out["plots"]] == ["pareto.png", "latency_breakdown.png", "metrics.png"]
    for plot in out["plots"]:
        assert plot.read_bytes().startswith(PNG_SIGNATURE)
        pixels = imread(plot)
        assert pixels.shape[0] > 0 and pixels.shape[1] > 0
    assert not list((tmp_path / "report").glob("*.tmp"))  # atomic writes leave no temporaries

    markdown = out["markdown"].read_text()
    for run_id in ("run-a", "run-b", "run-c"):
        assert run_id in markdown
    assert "significant" in markdown
    assert (
        "run-c (chroma, 128 tok) is significantly better than run-a (faiss, 128 tok) on ndcg@10" in markdown
    )
    assert (
        "run-a (faiss, 128 tok) vs run-b (faiss, 256 tok): no significant difference on ndcg@10" in markdown
    )
    assert "![" in markdown and "(pareto.png)" in markdown
    # Summary: only the varying config fields become columns.
    header = next(line for line in markdown.splitlines() if line.startswith("| run_id"))
    assert (
        header
        == "| run_id | vector_store | chunk_tokens | ndcg@10 | recall@100 | p50 ms | p99 ms | ingest s |"
    )
    # Pareto-optimal runs: run-a and run-c, fastest first; run-b is dominated by run-a.
    pareto_section = markdown.split("## Pareto-optimal runs")[1].split("## ")[0]
    assert "run-a" in pareto_section and "run-c" in pareto_section and "run-b" not in pareto_section
    assert pareto_section.index("run-a") < pareto_section.index("run-c")

    page = out["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert '<img src="pareto.png"' in page
    assert '<img src="latency_breakdown.png"' in page and '<img src="metrics.png"' in page
    assert "<table>" in page and "significantly better" in page
    assert "Sweep &lt;1&gt;" in page and "Sweep <1>" not in page


def test_build_report_primary_metric(records, tmp_path: Path):
    markdown = build_report(records, tmp_path / "r1", metric="recall@100")["markdown"].read_text()
    assert "primary metric recall@100" in markdown
    with pytest.raises(ValueError, match="f1"):
        build_report(records, tmp_path / "r2", metric="f1")
    qa = [{**r, "aggregate": {"exact_match": 0.1, "f1": 0.2}} for r in records]
    assert "primary metric f1" in build_report(qa, tmp_path / "r3")["markdown"].read_text()


def test_build_report_single_run_and_bad_input(records, tmp_path: Path):
    markdown = build_report(records[:1], tmp_path / "one")["markdown"].read_text()
    assert "nothing to compare" in markdown
    with pytest.raises(ValueError, match="at least one"):
        build_report([], tmp_path / "none")
    with pytest.raises(ValueError, match="run-a"):
        build_report([records[0], records[0]], tmp_path / "dup")


def test_load_records_by_id_and_path(records, tmp_path: Path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    for record in records:
        (runs_dir / f"{record['run_id']}.json").write_text(json.dumps(record))
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(records[2]))

    loaded = load_records(["run-b", "run-a", str(elsewhere)], runs_dir)
    assert [r["run_id"] for r in loaded] == ["run-b", "run-a", "run-c"]

    with pytest.raises(FileNotFoundError, match=r"no run 'run-z' in .*runs there: run-a, run-b, run-c"):
        load_records(["run-z"], runs_dir)
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        load_records([str(tmp_path / "missing.json")], runs_dir)
    with pytest.raises(ValueError, match="no runs given"):
        load_records([], runs_dir)

    (runs_dir / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_records(["broken"], runs_dir)
    (runs_dir / "partial.json").write_text(json.dumps({"run_id": "partial", "config": {}}))
    with pytest.raises(ValueError, match="missing aggregate, per_query, latency_ms"):
        load_records(["partial"], runs_dir)
