"""What the benchmarks share: latency summaries and result files.

A benchmark measures, then calls `write_bench_results(name, rows)`, which writes
`bench/results/<name>.json` atomically and prints the JSON and a markdown table to stdout.
Benchmarks report numbers; tests never assert on timings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.evaluator.report import markdown_table
from services.runtime.storage import atomic_write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS_DIR", "markdown_table", "percentiles", "write_bench_results"]


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50, p99 and mean of per-request latencies (ms), and the QPS of one client issuing them back
    to back (1000 / mean). Percentiles interpolate linearly between samples (numpy's default)."""
    samples = np.asarray(samples_ms, dtype=np.float64)
    if samples.size == 0 or (samples <= 0).any():
        raise ValueError("samples_ms: need at least one sample, all positive")
    mean = float(samples.mean())
    return {
        "p50": float(np.percentile(samples, 50)),
        "p99": float(np.percentile(samples, 99)),
        "mean": mean,
        "qps": 1000.0 / mean,
    }


def write_bench_results(name: str, rows: list[Mapping[str, Any]]) -> Path:
    """Writes `{"name", "rows"}` to bench/results/<name>.json and prints it and a markdown table.

    The table's columns are the rows' keys, in the order they first appear.
    """
    path = RESULTS_DIR / f"{name}.json"
    atomic_write_json(path, {"name": name, "rows": rows})
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print(json.dumps({"name": name, "rows": rows}, indent=2))
    print()
    print(markdown_table(rows, columns))
    return path
