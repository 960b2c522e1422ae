"""SQuAD EM / F1 (services.evaluator.metrics.qa) on tiny hand-made datasets, every number worked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.evaluator.metrics.qa import (
    exact_match,
    f1_score,
    normalize_answer,
    score_squad,
    score_squad_files,
)


def _dataset(questions: list[dict], version: str | None) -> dict:
    dataset: dict = {"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": questions}]}]}
    if version is not None:
        dataset["version"] = version
    return dataset


def _qa(qid: str, *answers: str, impossible: bool | None = None) -> dict:
    qa: dict = {"id": qid, "question": "?", "answers": [{"text": a, "answer_start": 0} for a in answers]}
    if impossible is not None:
        qa["is_impossible"] = impossible
    return qa


# v1.1: q1 exact after normalisation; q2 partial; q3 best of two golds; q4 has no prediction.
V1 = _dataset(
    [
        _qa("q1", "The Eiffel Tower", "Eiffel Tower"),
        _qa("q2", "Denver Broncos"),
        _qa("q3", "Paris", "in Paris, France"),
        _qa("q4", "1066"),
    ],
    "1.1",
)
V1_PREDICTIONS = {"q1": "eiffel tower!", "q2": "the Broncos", "q3": "Paris France"}
# q2: "broncos" vs "denver broncos": P 1, R 1/2 -> 2/3.
# q3: vs "paris": P 1/2, R 1 -> 2/3; vs "in paris france": P 1, R 2/3 -> 0.8; the max is 0.8.
V1_F1 = [1.0, 2 / 3, 0.8, 0.0]

# v2.0: two answerable questions, two without an answer.
V2 = _dataset(
    [
        _qa("q1", "Normans", "the Normans", impossible=False),
        _qa("q2", "10th century", impossible=False),
        _qa("q3", impossible=True),
        _qa("q4", impossible=True),
    ],
    "v2.0",
)
V2_PREDICTIONS = {"q1": "Normans", "q2": "in the 10th century", "q3": "", "q4": "France"}
# q2: "in 10th century" vs "10th century": P 2/3, R 1 -> 0.8. q3: empty vs empty -> EM 1, F1 1.
V2_NA_PROBS = {"q1": 0.1, "q2": 0.2, "q4": 0.3, "q3": 0.8}


class TestNormalizeAnswer:
    def test_lowercases_strips_punctuation_and_collapses_spaces(self):
        assert normalize_answer("  Hello,   World!! ") == "hello world"

    def test_punctuation_is_deleted_not_replaced_by_a_space(self):
        assert normalize_answer("brown-fox's") == "brownfoxs"

    def test_removes_articles_only_as_whole_words(self):
        assert normalize_answer("The theory of an Apple and a banana") == "theory of apple and banana"
        assert normalize_answer("Anthem, Thea") == "anthem thea"

    def test_punctuation_goes_first_so_it_can_glue_an_article_to_a_word(self):
        assert normalize_answer("(the)end") == "theend"
        assert normalize_answer("the-end") == "theend"
        assert normalize_answer("the. end") == "end"

    def test_only_ascii_punctuation_is_removed(self):
        assert normalize_answer("“Quoted” — text") == "“quoted” — text"


class TestExactMatchAndF1:
    def test_exact_match_takes_the_best_gold(self):
        assert exact_match("the Eiffel Tower.", ["Paris", "Eiffel tower"]) == 1.0
        assert exact_match("Eiffel", ["Paris", "Eiffel tower"]) == 0.0

    def test_f1_counts_common_tokens_as_a_multiset(self):
        # pred [x, x, y] vs gold [x, y, y]: common {x: 1, y: 1} = 2; P 2/3, R 2/3 -> 2/3.
        assert f1_score("x x y", ["x y y"]) == pytest.approx(2 / 3)

    def test_f1_takes_the_best_gold(self):
        assert f1_score("Paris France", ["Paris", "in Paris, France"]) == pytest.approx(0.8)

    def test_f1_is_zero_without_common_tokens(self):
        assert f1_score("Berlin", ["Paris"]) == 0.0

    def test_empty_answers_score_f1_zero_in_v1_and_one_in_v2(self):
        # "The" and "a" both normalise to "": equal (EM 1), but v1.1 never gives F1 without tokens.
        assert exact_match("a", ["The"]) == 1.0
        assert f1_score("a", ["The"]) == 0.0
        assert f1_score("a", ["The"], version="2.0") == 1.0
        assert f1_score("", ["Paris"], version="v2.0") == 0.0

    def test_no_gold_answers_is_an_error(self):
        with pytest.raises(ValueError, match="no gold"):
            exact_match("x", [])
        with pytest.raises(ValueError, match="no gold"):
            f1_score("x", [])


class TestScoreSquadV1:
    def test_means_over_every_question_with_missing_predictions_scoring_zero(self):
        result = score_squad(V1, V1_PREDICTIONS)
        assert list(result) == ["exact_match", "f1"]
        assert result["exact_match"] == pytest.approx(100 * 1 / 4)
        assert result["f1"] == pytest.approx(100 * sum(V1_F1) / 4)

    def test_predictions_for_unknown_questions_are_ignored(self):
        assert score_squad(V1, {**V1_PREDICTIONS, "other": "x"}) == score_squad(V1, V1_PREDICTIONS)

    def test_na_probs_are_refused(self):
        with pytest.raises(ValueError, match="v2.0 only"):
            score_squad(V1, V1_PREDICTIONS, na_probs={"q1": 0.5})


class TestScoreSquadV2:
    def test_official_keys_and_the_hasans_noans_split(self):
        result = score_squad(V2, V2_PREDICTIONS)
        assert result == pytest.approx(
            {
                "exact": 50.0,
                "f1": 100 * (1 + 0.8 + 1 + 0) / 4,
                "total": 4,
                "HasAns_exact": 50.0,
                "HasAns_f1": 90.0,
                "HasAns_total": 2,
                "NoAns_exact": 50.0,
                "NoAns_f1": 50.0,
                "NoAns_total": 2,
            }
        )
        assert list(result) == [
            "exact", "f1", "total",
            "HasAns_exact", "HasAns_f1", "HasAns_total",
            "NoAns_exact", "NoAns_f1", "NoAns_total",
        ]  # fmt: skip

    def test_a_split_without_questions_is_left_out(self):
        result = score_squad(_dataset(V2["data"][0]["paragraphs"][0]["qas"][:2], "v2.0"), V2_PREDICTIONS)
        assert list(result) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total"]

    def test_golds_that_normalise_to_nothing_are_dropped(self):
        # "The" normalises to "": the only gold left is "", which only the empty answer matches; the
        # question still counts as answerable (it has an answer entry), as in the official script.
        dataset = _dataset([_qa("q", "The", impossible=False)], "v2.0")
        assert score_squad(dataset, {"q": ""})["HasAns_exact"] == 100.0
        assert score_squad(dataset, {"q": "the"})["exact"] == 100.0
        assert score_squad(dataset, {"q": "Normans"})["f1"] == 0.0

    def test_missing_prediction_scores_zero_even_on_a_no_answer_question(self):
        predictions = {k: v for k, v in V2_PREDICTIONS.items() if k != "q3"}
        result = score_squad(V2, predictions)
        assert (result["total"], result["NoAns_exact"], result["NoAns_f1"]) == (4, 0.0, 0.0)
        assert result["exact"] == 25.0

    def test_na_prob_threshold_turns_confident_no_answers_into_abstentions(self):
        # Above 0.25: q4 (0.3) and q3 (0.8) abstain -> both no-answer questions score 1.
        result = score_squad(V2, V2_PREDICTIONS, na_probs=V2_NA_PROBS, na_prob_threshold=0.25)
        assert result["exact"] == pytest.approx(75.0)
        assert result["f1"] == pytest.approx(95.0)
        assert (result["HasAns_exact"], result["HasAns_f1"]) == pytest.approx((50.0, 90.0))
        assert (result["NoAns_exact"], result["NoAns_f1"]) == (100.0, 100.0)

    def test_threshold_is_strict_and_abstaining_on_an_answerable_question_scores_zero(self):
        # At 0.1 everything but q1 (0.1, not above) abstains: q2 loses its 0.8, q4 gains 1.
        result = score_squad(V2, V2_PREDICTIONS, na_probs=V2_NA_PROBS, na_prob_threshold=0.1)
        assert (result["exact"], result["f1"]) == pytest.approx((75.0, 75.0))

    def test_best_thresholds(self):
        # Start from "all abstain" (2 no-answer questions right), answer by increasing na_prob:
        # q1 +1 -> 3; q2 EM +0 / F1 +0.8 -> 3 / 3.8; q4 "France" -1; q3 "" +-0.
        # EM peaks at 3 after q1 (0.1); F1 peaks at 3.8 after q2 (0.2).
        result = score_squad(V2, V2_PREDICTIONS, na_probs=V2_NA_PROBS)
        assert list(result)[-4:] == ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]
        assert result["best_exact"] == pytest.approx(75.0)
        assert result["best_exact_thresh"] == 0.1
        assert result["best_f1"] == pytest.approx(95.0)
        assert result["best_f1_thresh"] == 0.2
        # With the default threshold 1.0 nothing abstains: the headline numbers are the raw ones.
        assert result["exact"] == 50.0 and result["f1"] == pytest.approx(70.0)

    def test_na_probs_must_cover_every_answered_question(self):
        with pytest.raises(ValueError, match="q3"):
            score_squad(V2, V2_PREDICTIONS, na_probs={"q1": 0.1, "q2": 0.2, "q4": 0.3})


class TestVersion:
    def test_is_impossible_means_v2_without_a_version_field(self):
        assert "HasAns_total" in score_squad(_dataset(V2["data"][0]["paragraphs"][0]["qas"], None), {})

    def test_version_field_means_v2_without_is_impossible(self):
        dataset = _dataset([_qa("q1", "x"), _qa("q2")], "v2.0")
        assert score_squad(dataset, {"q1": "x", "q2": ""})["exact"] == 100.0

    def test_explicit_version_wins(self):
        dataset = _dataset([_qa("q", "The")], "1.1")
        assert score_squad(dataset, {"q": "a"}) == {"exact_match": 100.0, "f1": 0.0}
        assert score_squad(dataset, {"q": "a"}, version="v2.0")["f1"] == 100.0

    def test_unknown_version_and_missing_data_are_errors(self):
        with pytest.raises(ValueError, match="unknown SQuAD version"):
            score_squad(V1, {}, version="3")
        with pytest.raises(ValueError, match='"data"'):
            score_squad({"version": "1.1"}, {})


class TestScoreSquadFiles:
    @pytest.fixture
    def files(self, tmp_path: Path) -> dict[str, Path]:
        paths = {
            "v1": tmp_path / "v1.json",
            "v2": tmp_path / "v2.json",
            "predictions": tmp_path / "predictions.json",
            "v2_predictions": tmp_path / "v2_predictions.json",
            "na_probs": tmp_path / "na_probs.json",
        }
        contents = [V1, V2, V1_PREDICTIONS, V2_PREDICTIONS, V2_NA_PROBS]
        for path, content in zip(paths.values(), contents):
            path.write_text(json.dumps(content), encoding="utf-8")
        return paths

    def test_scores_like_score_squad(self, files: dict[str, Path]):
        assert score_squad_files(files["v1"], files["predictions"]) == score_squad(V1, V1_PREDICTIONS)
        assert score_squad_files(files["v2"], files["v2_predictions"], files["na_probs"]) == score_squad(
            V2, V2_PREDICTIONS, na_probs=V2_NA_PROBS
        )

    @pytest.mark.parametrize(
        ("which", "content", "problem"),
        [
            ("v1", "{not json", "not valid JSON"),
            ("v1", json.dumps({"version": "1.1"}), 'no "data"'),
            ("v1", json.dumps([1, 2]), 'no "data"'),
            ("predictions", json.dumps(["q1", "x"]), "must hold a JSON object"),
            ("predictions", json.dumps({"q1": 3}), "'q1' maps to int"),
            ("na_probs", json.dumps({"q1": "high"}), "'q1' maps to str"),
        ],
    )
    def test_malformed_files_name_the_file_and_the_problem(
        self, files: dict[str, Path], which: str, content: str, problem: str
    ):
        files[which].write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=problem) as error:
            if which == "na_probs":
                score_squad_files(files["v2"], files["v2_predictions"], files["na_probs"])
            else:
                score_squad_files(files["v1"], files["predictions"])
        assert str(files[which]) in str(error.value)

    def test_missing_file(self, files: dict[str, Path], tmp_path: Path):
        with pytest.raises(ValueError, match="cannot read the predictions file"):
            score_squad_files(files["v1"], tmp_path / "absent.json")
