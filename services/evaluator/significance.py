"""Paired significance tests between evaluation runs.

Two runs of a sweep answer the *same* queries, and per-query scores vary far more between queries
(easy vs hard) than between systems. A paired test looks only at the per-query differences
`a[i] - b[i]`, so that query difficulty cancels out; an unpaired test would drown a consistent
small gain in between-query variance.

Two paired tests are offered:

- `paired_t_test`: Student's paired t-test (scipy.stats.ttest_rel). Fast and familiar, but assumes
  the mean difference is roughly normal, which bounded, lumpy IR metrics (nDCG, exact match) can
  violate on small query sets.
- `randomization_test`: a paired sign-flip permutation test on the mean difference
  (scipy.stats.permutation_test with permutation_type="samples", which swaps a[i] and b[i], so
  flips the sign of each difference). Under the null hypothesis the two systems are exchangeable on
  every query, so each difference is equally likely to carry either sign. It makes no
  distributional assumption, which is why `compare_runs` lets it decide `significant` (Smucker,
  Allan & Carterette, CIKM 2007, recommend it for IR evaluation). The t-test p-value is reported
  beside it for reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

# Sign flips are scored in batches of at most this many cells, so memory stays bounded (a few tens of
# MB) however many queries and trials there are.
_MAX_BATCH_CELLS = 4_000_000

DEFAULT_ALPHA = 0.05
DEFAULT_TRIALS = 10_000


def _differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.ndim != 1 or a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples need equal 1-d shapes, got {a_arr.shape} and {b_arr.shape}")
    if a_arr.size == 0:
        raise ValueError("paired samples are empty")
    return a_arr - b_arr


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test that mean(a - b) = 0.

    Degenerate cases that make scipy return NaN get a definite answer instead: fewer than two pairs,
    or differences that are all equal to zero, give p = 1.0 (no evidence of a difference);
    differences that are all equal to the same non-zero value give p = 0.0 (the limit of t → ∞).
    """
    diffs = _differences(a, b)
    if diffs.size < 2 or np.all(diffs == 0):
        return 1.0
    if np.all(diffs == diffs[0]):
        return 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def randomization_test(
    a: Sequence[float], b: Sequence[float], *, trials: int = DEFAULT_TRIALS, seed: int = 0
) -> float:
    """Two-sided p-value of a paired sign-flip permutation test on the mean difference.

    With at most `trials` sign patterns (2^n for n pairs) every one is scored and p is exact;
    otherwise `trials` random ones are, and scipy counts the observed assignment among them, so p is
    never 0. Two-sided p is twice the smaller one-sided p. The same `seed` gives the same p-value.
    """
    if trials < 1:
        raise ValueError(f"trials must be positive, got {trials}")
    size = _differences(a, b).size
    result = stats.permutation_test(
        (np.asarray(a, dtype=float), np.asarray(b, dtype=float)),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=trials,
        batch=max(1, _MAX_BATCH_CELLS // size),
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def compare_runs(
    run_a: dict[str, Any], run_b: dict[str, Any], metric: str, alpha: float = DEFAULT_ALPHA
) -> dict:
    """Paired comparison of two run records on one per-query metric.

    Pairs the per-query scores of the queries both runs scored on `metric` (a ValueError when there
    are none) and runs both tests. `significant` is decided by the randomization test
    (`randomization_p < alpha`) because it does not assume normally distributed differences; the
    t-test p-value is reported beside it. Returns {"metric", "run_a", "run_b", "n", "mean_a",
    "mean_b", "diff" (mean_a - mean_b), "t_test_p", "randomization_p", "significant", "alpha"}.
    """
    scores_a, scores_b = run_a["per_query"], run_b["per_query"]
    shared = sorted(
        qid
        for qid in scores_a.keys() & scores_b.keys()
        if metric in scores_a[qid] and metric in scores_b[qid]
    )
    if not shared:
        raise ValueError(
            f"runs {run_a['run_id']!r} and {run_b['run_id']!r} share no query scored on {metric!r}"
        )
    a = [float(scores_a[qid][metric]) for qid in shared]
    b = [float(scores_b[qid][metric]) for qid in shared]
    mean_a, mean_b = float(np.mean(a)), float(np.mean(b))
    randomization_p = randomization_test(a, b)
    return {
        "metric": metric,
        "run_a": run_a["run_id"],
        "run_b": run_b["run_id"],
        "n": len(shared),
        "mean_a": mean_a,
        "mean_b": mean_b,
        "diff": mean_a - mean_b,
        "t_test_p": paired_t_test(a, b),
        "randomization_p": randomization_p,
        "significant": randomization_p < alpha,
        "alpha": alpha,
    }
