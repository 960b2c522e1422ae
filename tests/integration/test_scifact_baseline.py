"""SciFact test with an in-process BM25 (bm25s), scored by services.evaluator.metrics.ir: the BEIR figure.

Needs ../shared/data/scifact beside the repository; skipped when it is absent. Takes a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.datasets.collections import load_beir
from services.evaluator.baseline import bm25_run
from services.evaluator.metrics.ir import evaluate_run

SCIFACT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "scifact"

pytestmark = [
    pytest.mark.data,
    pytest.mark.skipif(not SCIFACT.is_dir(), reason=f"{SCIFACT} is absent (public data beside the repo)"),
]

BEIR_PAPER_NDCG10 = 0.665


def test_scifact_bm25_matches_the_beir_paper():
    dataset = load_beir(SCIFACT, split="test")
    assert (len(dataset.corpus), len(dataset.queries)) == (5183, 300)
    assert sum(len(judged) for judged in dataset.qrels.values()) == 339

    aggregate, per_query = evaluate_run(bm25_run(dataset, top_k=100), dataset.qrels)

    assert len(per_query) == 300
    assert aggregate["ndcg@10"] == pytest.approx(BEIR_PAPER_NDCG10, abs=0.02)
    assert aggregate["recall@100"] > 0.85
    assert 0.5 < aggregate["mrr@10"] <= 1.0
