"""services.evaluator.report and bench.common."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import bench.common
from bench.common import percentiles, write_bench_results
from services.evaluator.report import markdown_table


def test_percentiles():
    samples = list(range(1, 101))  # 1..100 ms
    stats = percentiles(samples)
    assert stats["p50"] == pytest.approx(np.percentile(samples, 50))
    assert stats["p99"] == pytest.approx(np.percentile(samples, 99))
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["qps"] == pytest.approx(1000 / 50.5)


@pytest.mark.parametrize("samples", [[], [1.0, 0.0]])
def test_percentiles_rejects_empty_or_non_positive(samples):
    with pytest.raises(ValueError, match="samples_ms"):
        percentiles(samples)


def test_markdown_table():
    rows = [{"name": "grpc", "p50": 1.23456, "qps": 12345.678, "n": 3}, {"name": "a|b", "p50": None}]
    assert markdown_table(rows, ["name", "p50", "qps", "n"]).splitlines() == [
        "| name | p50 | qps | n |",
        "|---|---:|---:|---:|",
        "| grpc | 1.235 | 12345.7 | 3 |",
        "| a\\|b | – | – | – |",
    ]


def test_write_bench_results(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path / "results")
    rows = [{"target": "in-process", **percentiles([1.0, 2.0])}, {"target": "grpc", "p50": 3.0}]
    path = write_bench_results("latency", rows)
    assert path == tmp_path / "results" / "latency.json"
    assert json.loads(path.read_text()) == {"name": "latency", "rows": rows}
    out = capsys.readouterr().out
    assert '"name": "latency"' in out
    assert "| target | p50 | p99 | mean | qps |" in out
