"""services.evaluator.significance: paired t-test, randomization test, run comparison."""

from __future__ import annotations

import numpy as np
import pytest

from services.evaluator.significance import compare_runs, paired_t_test, randomization_test


def _record(run_id: str, scores: dict[str, float], metric: str = "ndcg@10") -> dict:
    return {"run_id": run_id, "per_query": {qid: {metric: s} for qid, s in scores.items()}}


def test_clearly_different_samples_are_significant():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.3, 0.9, size=50)
    b = a - 0.1 + rng.normal(0, 0.02, size=50)
    assert paired_t_test(a, b) < 0.01
    assert randomization_test(a, b) < 0.01


def test_identical_samples_give_p_one():
    a = [0.1, 0.5, 0.7, 0.2]
    assert paired_t_test(a, a) == 1.0
    assert randomization_test(a, a) == 1.0


def test_degenerate_t_test_cases_are_not_nan():
    assert paired_t_test([0.5], [0.2]) == 1.0  # one pair: no evidence either way
    assert paired_t_test([0.5, 0.6, 0.7], [0.4, 0.5, 0.6]) == pytest.approx(0.0)  # constant gain


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomization_p_approximates_t_test_p_on_normal_data(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.5, 0.2, size=200)
    b = a + rng.normal(0.02, 0.2, size=200)
    t_p = paired_t_test(a, b)
    assert 0.01 < t_p < 0.9  # a p-value in the range where the two tests should agree
    assert randomization_test(a, b, trials=20_000) == pytest.approx(t_p, abs=0.03)


def test_randomization_test_is_deterministic_with_seed():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, size=30), rng.normal(0.3, 1, size=30)
    assert randomization_test(a, b, seed=7) == randomization_test(a, b, seed=7)
    assert randomization_test(a, b, seed=7) != randomization_test(a, b, seed=8)


def test_randomization_p_is_never_zero():
    a, b = np.ones(40), np.zeros(40)
    # No random sign pattern is as extreme as the observed one, which counts as one of the 999 + 1:
    # each one-sided p is 1/1000, the two-sided p twice that.
    assert randomization_test(a, b, trials=999) == pytest.approx(2 / 1000)


@pytest.mark.parametrize("a, b", [([], []), ([1.0, 2.0], [1.0])])
def test_rejects_empty_or_unpaired_samples(a, b):
    with pytest.raises(ValueError):
        paired_t_test(a, b)
    with pytest.raises(ValueError):
        randomization_test(a, b)


def test_compare_runs_pairs_only_shared_queries():
    run_a = _record("a", {"q1": 0.9, "q2": 0.8, "q3": 0.7, "only_a": 0.0})
    run_b = _record("b", {"q1": 0.1, "q2": 0.2, "q3": 0.3, "only_b": 1.0})
    result = compare_runs(run_a, run_b, "ndcg@10")
    assert result["n"] == 3
    assert result["mean_a"] == pytest.approx(0.8)
    assert result["mean_b"] == pytest.approx(0.2)
    assert result["diff"] == pytest.approx(0.6)
    assert result["t_test_p"] < 0.05
    assert result["randomization_p"] == pytest.approx(0.25)  # exact: 2 of the 2^3 sign patterns
    assert result["significant"] is False  # 3 pairs: 2**3 sign patterns, p >= 1/4 at best
    expected = {"metric": "ndcg@10", "run_a": "a", "run_b": "b", "alpha": 0.05}
    assert {key: result[key] for key in expected} == expected


def test_compare_runs_significance_follows_the_randomization_test():
    rng = np.random.default_rng(4)
    base = rng.uniform(0.2, 0.8, size=60)
    run_a = _record("a", {f"q{i}": s for i, s in enumerate(base)})
    run_b = _record("b", {f"q{i}": s - 0.05 + rng.normal(0, 0.05) for i, s in enumerate(base)})
    strict = compare_runs(run_a, run_b, "ndcg@10", alpha=1e-9)
    assert strict["significant"] is False
    loose = compare_runs(run_a, run_b, "ndcg@10")
    assert loose["significant"] is True
    assert loose["randomization_p"] < 0.05
    same = compare_runs(run_a, run_a, "ndcg@10")
    assert (same["significant"], same["t_test_p"], same["randomization_p"]) == (False, 1.0, 1.0)


def test_compare_runs_without_shared_queries_is_an_error():
    with pytest.raises(ValueError, match="share no query"):
        compare_runs(_record("a", {"q1": 1.0}), _record("b", {"q2": 1.0}), "ndcg@10")
    with pytest.raises(ValueError, match="share no query"):
        compare_runs(_record("a", {"q1": 1.0}), _record("b", {"q1": 1.0}, metric="f1"), "ndcg@10")
