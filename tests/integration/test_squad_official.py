"""Published SQuAD v1.1 dev predictions, scored by services.evaluator.metrics.qa: the leaderboard figures.

Needs ../shared/data/squad_v1.1_dev beside the repository; skipped when it is absent. About two seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.evaluator.metrics.qa import score_squad_files

SQUAD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "squad_v1.1_dev"
DEV = SQUAD / "dev-v1.1.json"
PREDICTIONS = SQUAD / "model_predictions"

pytestmark = [
    pytest.mark.data,
    pytest.mark.skipif(not DEV.is_file(), reason=f"{DEV} is absent (public data beside the repo)"),
]


def _score(system: str) -> dict[str, float]:
    result = score_squad_files(DEV, PREDICTIONS / f"{system}.json")
    print(f"{system}: EM {result['exact_match']:.2f} / F1 {result['f1']:.2f}")
    return result


def test_bert_ensemble_scores_the_official_figures():
    result = _score("BERT (ensemble) (Google AI Language)")
    assert round(result["exact_match"], 2) == 86.21
    assert round(result["f1"], 2) == 92.20


def test_logistic_regression_baseline_is_far_lower():
    # The SQuAD paper's baseline: about EM 40 / F1 51 on dev.
    result = _score("Logistic Regression Baseline (Stanford University)")
    assert 35 < result["exact_match"] < 45
    assert 45 < result["f1"] < 55
