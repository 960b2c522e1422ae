"""SQuAD answer metrics: exact match and token F1, scored as the official SQuAD scripts score them.

An independent implementation of the semantics of the official evaluation scripts of SQuAD v1.1
(`evaluate-v1.1.py`) and SQuAD v2.0 (`evaluate-v2.0.py`); on the same files it gives the same
numbers, to the last bit (same normalisation, same formulas, same summation order).

Normalisation (both versions): lowercase, drop every character of `string.punctuation`, drop the
articles "a", "an", "the" as whole words, collapse whitespace.

Per question, a prediction is compared with each gold answer and the best score is kept:

- EM is 1 when the normalised prediction equals a normalised gold answer, else 0.
- F1 is the harmonic mean of token precision and recall, with common tokens counted as a multiset.
  v1.1: 0 whenever no token is shared (so an answer that normalises to nothing never scores F1).
  v2.0: when either side has no tokens, F1 is 1 if both have none, else 0.

v2.0 specifics: gold answers that normalise to "" are dropped; a question with no gold answer left
is a no-answer question and its only gold is "" (so the empty prediction scores 1). Whether a
question *has an answer* (the HasAns / NoAns split) is `bool(qa["answers"])`, as in the official
script. With `na_probs`, a question whose no-answer probability exceeds `na_prob_threshold` is
taken as answered "no answer": it scores 1 if it has no answer, 0 otherwise. With `na_probs` the
result also carries the best threshold for EM and for F1 (the official `find_best_thresh`: walk the
questions by increasing no-answer probability, answering each in turn, and keep the best total).

Outputs are means × 100 over every question of the dataset, with the official keys:
v1.1 `{"exact_match", "f1"}`; v2.0 `exact, f1, total, HasAns_exact, HasAns_f1, HasAns_total,
NoAns_exact, NoAns_f1, NoAns_total` (each split only when it has questions), then `best_exact,
best_exact_thresh, best_f1, best_f1_thresh` when `na_probs` is given.

Missing predictions: a question without a prediction scores 0 (EM and F1) and counts in every
total. This is what the official v1.1 script does; the official v2.0 script cannot score such a
run (it fails on the HasAns / NoAns split), so ragfleet applies the v1.1 rule to both versions. For
the best-threshold search an unanswered question is never credited, whatever the threshold.

Version: `version=` when given ("1.1", "v1.1", "2.0", "v2.0"); otherwise the dataset's "version"
field when it names v2.0, or any question carrying `is_impossible`, means v2.0; anything else v1.1.

Why not import the official scripts: they are not a library. `evaluate-v1.1.py` and
`evaluate-v2.0.py` are command-line files from the SQuAD site (the Hugging Face `evaluate` package
fetches its copies from the hub when a metric is loaded, which an offline fleet cannot do); they
return only dataset-wide totals, while the experiment runner and the Evaluator service score each
question; and the v2.0 one cannot score a run that lacks predictions. So the semantics are written
here, and tests/integration/test_squad_official.py checks them against the official figures of
published SQuAD v1.1 dev predictions.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

V1 = "1.1"
V2 = "2.0"
_VERSION_NAMES = {"1.1": V1, "v1.1": V1, "2.0": V2, "v2.0": V2}

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lowercases, removes punctuation and the articles a/an/the, and collapses whitespace."""
    text = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _resolve_version(version: str) -> str:
    try:
        return _VERSION_NAMES[version]
    except KeyError:
        known = sorted(_VERSION_NAMES)
        raise ValueError(f"unknown SQuAD version {version!r}; expected one of {known}") from None


def _token_f1(prediction_tokens: list[str], gold_tokens: list[str], version: str) -> float:
    if version == V2 and (not prediction_tokens or not gold_tokens):
        return float(prediction_tokens == gold_tokens)
    num_same = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def _check_golds(golds: Sequence[str]) -> None:
    if not golds:
        raise ValueError("no gold answers to compare with")


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals some normalised gold answer, else 0.0."""
    _check_golds(golds)
    normalized = normalize_answer(prediction)
    return max(float(normalized == normalize_answer(gold)) for gold in golds)


def f1_score(prediction: str, golds: Sequence[str], *, version: str = V1) -> float:
    """The best token F1 of the prediction against the gold answers, in [0, 1].

    `version` only matters for empty token lists (see the module docstring): "1.1" scores them 0,
    "2.0" scores 1 when both prediction and gold are empty.
    """
    _check_golds(golds)
    version = _resolve_version(version)
    prediction_tokens = normalize_answer(prediction).split()
    return max(_token_f1(prediction_tokens, normalize_answer(gold).split(), version) for gold in golds)


@dataclass(frozen=True)
class _Question:
    id: str
    golds: list[str]
    has_answer: bool


def _articles(dataset: Mapping[str, Any]) -> list[Any]:
    if "data" not in dataset:
        raise ValueError('not a SQuAD dataset: no "data" field')
    return dataset["data"]


def detect_version(dataset: Mapping[str, Any]) -> str:
    """The dataset's SQuAD version: "2.0" by its "version" field or `is_impossible` questions, else "1.1"."""
    if _VERSION_NAMES.get(str(dataset.get("version"))) == V2:
        return V2
    for article in _articles(dataset):
        for paragraph in article["paragraphs"]:
            if any("is_impossible" in qa for qa in paragraph["qas"]):
                return V2
    return V1


def _questions(dataset: Mapping[str, Any], version: str) -> Iterator[_Question]:
    """Every question of the dataset in file order, with the gold answers it is scored against."""
    for article in _articles(dataset):
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                texts = [answer["text"] for answer in qa["answers"]]
                if version == V2:
                    texts = [text for text in texts if normalize_answer(text)] or [""]
                yield _Question(id=qa["id"], golds=texts, has_answer=bool(qa["answers"]))


def _raw_scores(
    questions: list[_Question], predictions: Mapping[str, str], version: str
) -> tuple[dict[str, float], dict[str, float]]:
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    for question in questions:
        prediction = predictions.get(question.id)
        if prediction is None:
            exact[question.id] = f1[question.id] = 0.0
            continue
        exact[question.id] = exact_match(prediction, question.golds)
        f1[question.id] = f1_score(prediction, question.golds, version=version)
    return exact, f1


def _apply_no_answer_threshold(
    scores: dict[str, float],
    questions: list[_Question],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float],
    threshold: float,
) -> dict[str, float]:
    """Scores with every answered question whose no-answer probability is above `threshold` abstaining."""
    thresholded = dict(scores)
    for question in questions:
        if question.id in predictions and na_probs[question.id] > threshold:
            thresholded[question.id] = float(not question.has_answer)
    return thresholded


def _best_threshold(
    scores: dict[str, float],
    questions: list[_Question],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float],
) -> tuple[float, float]:
    """(best score × 100, its threshold): the official `find_best_thresh`.

    Start with every question abstaining (each answered no-answer question is right), then answer
    questions by increasing no-answer probability (ties in `na_probs` order), keeping the best total.
    """
    has_answer = {question.id: question.has_answer for question in questions}
    answered = [qid for qid in na_probs if qid in has_answer and qid in predictions]
    current = best = sum(1 for qid in answered if not has_answer[qid])
    best_threshold = 0.0
    for qid in sorted(answered, key=lambda qid: na_probs[qid]):
        if has_answer[qid]:
            current += scores[qid]
        elif predictions[qid]:
            current -= 1
        if current > best:
            best, best_threshold = current, na_probs[qid]
    return 100.0 * best / len(questions), best_threshold


def _check_na_probs(
    na_probs: Mapping[str, float], questions: list[_Question], predictions: Mapping[str, str]
) -> None:
    missing = [q.id for q in questions if q.id in predictions and q.id not in na_probs]
    if missing:
        raise ValueError(
            f"na_probs has no probability for {len(missing)} answered question(s), e.g. {missing[0]!r}"
        )


def _mean_percent(scores: dict[str, float], ids: list[str]) -> float:
    return 100.0 * sum(scores[qid] for qid in ids) / len(ids)


def score_squad(
    dataset: Mapping[str, Any],
    predictions: Mapping[str, str],
    *,
    na_probs: Mapping[str, float] | None = None,
    na_prob_threshold: float = 1.0,
    version: str | None = None,
) -> dict[str, float | int]:
    """The official v1.1 or v2.0 result for `predictions` ({question id: answer}) on a SQuAD dataset.

    `dataset` is the parsed dataset file ({"version", "data"}). `na_probs` ({question id: probability
    of no answer}) and `na_prob_threshold` are the v2.0 script's `--na-prob-file` / `--na-prob-thresh`.
    """
    version = _resolve_version(version) if version is not None else detect_version(dataset)
    if na_probs is not None and version != V2:
        raise ValueError("na_probs apply to SQuAD v2.0 only")
    questions = list(_questions(dataset, version))
    if not questions:
        raise ValueError("the dataset has no questions")
    exact_raw, f1_raw = _raw_scores(questions, predictions, version)
    exact, f1 = exact_raw, f1_raw
    if na_probs is not None:
        _check_na_probs(na_probs, questions, predictions)
        exact = _apply_no_answer_threshold(exact_raw, questions, predictions, na_probs, na_prob_threshold)
        f1 = _apply_no_answer_threshold(f1_raw, questions, predictions, na_probs, na_prob_threshold)
    all_ids = [question.id for question in questions]
    if version == V1:
        return {"exact_match": _mean_percent(exact, all_ids), "f1": _mean_percent(f1, all_ids)}

    result: dict[str, float | int] = {
        "exact": _mean_percent(exact, all_ids),
        "f1": _mean_percent(f1, all_ids),
        "total": len(all_ids),
    }
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        ids = [question.id for question in questions if question.has_answer is wanted]
        if ids:
            result[f"{prefix}_exact"] = _mean_percent(exact, ids)
            result[f"{prefix}_f1"] = _mean_percent(f1, ids)
            result[f"{prefix}_total"] = len(ids)
    if na_probs is not None:
        result["best_exact"], result["best_exact_thresh"] = _best_threshold(
            exact_raw, questions, predictions, na_probs
        )
        result["best_f1"], result["best_f1_thresh"] = _best_threshold(
            f1_raw, questions, predictions, na_probs
        )
    return result


def _load_json(path: Path, what: str) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except OSError as error:
        raise ValueError(f"cannot read the {what} file {path}: {error.strerror or error}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"the {what} file {path} is not valid JSON: {error}") from error


def _load_mapping(path: Path, what: str, value_type: type | tuple[type, ...], value_name: str) -> dict:
    loaded = _load_json(path, what)
    if not isinstance(loaded, dict):
        raise ValueError(
            f"the {what} file {path} must hold a JSON object {{question id: {value_name}}}, "
            f"not a {type(loaded).__name__}"
        )
    for qid, value in loaded.items():
        if not isinstance(value, value_type) or isinstance(value, bool):
            raise ValueError(
                f"the {what} file {path} must map question ids to {value_name}s; "
                f"{qid!r} maps to {type(value).__name__}"
            )
    return loaded


def score_squad_files(
    dataset_path: str | Path,
    predictions_path: str | Path,
    na_probs_path: str | Path | None = None,
    *,
    na_prob_threshold: float = 1.0,
) -> dict[str, float | int]:
    """`score_squad` on a dataset file, a predictions file and (v2.0) an optional na_probs file.

    Raises ValueError naming the file and the problem when a file is unreadable, not JSON, not a
    SQuAD dataset, or (predictions, na_probs) not a JSON object of the right values.
    """
    dataset_path = Path(dataset_path)
    dataset = _load_json(dataset_path, "dataset")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("data"), list):
        raise ValueError(f'the dataset file {dataset_path} is not a SQuAD dataset: no "data" list')
    predictions = _load_mapping(Path(predictions_path), "predictions", str, "answer string")
    na_probs = (
        None
        if na_probs_path is None
        else _load_mapping(Path(na_probs_path), "na_probs", (int, float), "probability")
    )
    return score_squad(dataset, predictions, na_probs=na_probs, na_prob_threshold=na_prob_threshold)
