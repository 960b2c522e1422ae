"""Information-retrieval metrics: thin wrappers over `pytrec_eval`, which computes every number.

Nothing here re-derives a metric; this module only prepares the run, names the measures and
averages with `pytrec_eval.compute_aggregated_measure`.

Conventions (the ones BEIR and Pyserini use, plus one made explicit):

- A run is `{query_id: {doc_id: score}}`, qrels are `{query_id: {doc_id: relevance}}`. trec_eval
  ranks a query's documents by score, descending, breaking ties by doc id in *decreasing* order;
  the order of the dict is ignored.
- Measures are named as `pytrec_eval` names them in its output (`ndcg_cut_10`, `recall_100`, `P_5`,
  `map`, ...) and reported under readable keys: `ndcg@10`, `recall@100`, `P@5`, `map@10` (for
  `map_cut_10`), `<family>@k` for any other cut-off family, the plain name otherwise.
- `recip_rank` is reported as `mrr@10`: pytrec_eval computes it on the run truncated to each query's
  top 10 (in trec_eval's own order), which is exactly MRR@10.
- Every query of the qrels counts. A query that is missing from the run is evaluated as an empty
  ranking (0 for every relevance measure) and is included in the mean; pytrec_eval on its own would
  skip it and so overstate a run that fails on some queries. Run queries absent from the qrels are
  ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import pytrec_eval

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

DEFAULT_MEASURES: tuple[str, ...] = ("ndcg_cut_10", "recall_100", "recip_rank")
MRR_CUTOFF = 10

_CUTOFF_MEASURE = re.compile(r"^(?P<family>.+)_(?P<k>\d+)$")
_READABLE_FAMILY = {"ndcg_cut": "ndcg", "map_cut": "map"}


class _PassageLike(Protocol):
    id: str
    doc_id: str


class ScoredPassageLike(Protocol):
    """What `passages_to_docs` reads of a `ragfleet.v1.ScoredPassage`."""

    passage: _PassageLike


def parse_measure(measure: str) -> tuple[str, str]:
    """Returns (the pytrec_eval request string, the readable output key) of an output-style name."""
    if measure == "recip_rank":
        return "recip_rank", f"mrr@{MRR_CUTOFF}"
    if measure in pytrec_eval.supported_measures:
        return measure, measure
    match = _CUTOFF_MEASURE.fullmatch(measure)
    if match and match["family"] in pytrec_eval.supported_measures:
        family, k = match["family"], match["k"]
        return f"{family}.{k}", f"{_READABLE_FAMILY.get(family, family)}@{k}"
    raise ValueError(
        f"measures: unknown measure {measure!r}; use pytrec_eval output names such as "
        "'ndcg_cut_10', 'recall_100', 'P_5', 'map' or 'recip_rank'"
    )


def pytrec_measure(key: str) -> str:
    """The pytrec_eval measure name of an output key: the inverse of the keys `evaluate_run` reports
    (`ndcg@10` -> `ndcg_cut_10`, `mrr@10` -> `recip_rank`, `P@5` -> `P_5`, `map` -> `map`)."""
    if key == f"mrr@{MRR_CUTOFF}":
        return "recip_rank"
    family, at, k = key.partition("@")
    if not at:
        return key
    pytrec_family = next((p for p, readable in _READABLE_FAMILY.items() if readable == family), family)
    return f"{pytrec_family}_{k}"


def _trec_order(ranking: Mapping[str, float]) -> list[str]:
    """Doc ids in the order trec_eval ranks them: score descending, then doc id descending."""
    return sorted(ranking, key=lambda doc: (ranking[doc], doc), reverse=True)


def truncate_run(run: Run, k: int) -> dict[str, dict[str, float]]:
    """Keeps each query's top k documents, in trec_eval's ranking order."""
    return {qid: {doc: ranking[doc] for doc in _trec_order(ranking)[:k]} for qid, ranking in run.items()}


def _evaluate(
    qrels: Qrels, run: Run, measures: Mapping[str, str]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Runs pytrec_eval for `measures` ({output key: request string}) over every qrels query."""
    per_query: dict[str, dict[str, float]] = {qid: {} for qid in qrels}
    if not measures:
        return {}, per_query
    evaluator = pytrec_eval.RelevanceEvaluator(
        {qid: dict(judged) for qid, judged in qrels.items()}, set(measures.values())
    )
    # Empty rankings make pytrec_eval score the queries the run misses instead of skipping them.
    complete_run = {qid: {doc: float(s) for doc, s in run.get(qid, {}).items()} for qid in qrels}
    results = evaluator.evaluate(complete_run)
    aggregate: dict[str, float] = {}
    for output_key, request in measures.items():
        pytrec_key = request.replace(".", "_")
        values = [results[qid][pytrec_key] for qid in qrels]
        aggregate[output_key] = pytrec_eval.compute_aggregated_measure(pytrec_key, values)
        for qid, value in zip(qrels, values):
            per_query[qid][output_key] = value
    return aggregate, per_query


def evaluate_run(
    run: Run, qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Scores a run against qrels with pytrec_eval.

    Returns `(aggregate, per_query)`: `{key: mean over all qrels queries}` and
    `{query_id: {key: value}}`, keys as in the module docstring (`ndcg@10`, `recall@100`, `mrr@10`).
    """
    if not qrels:
        raise ValueError("qrels: no judged queries to evaluate")
    full: dict[str, str] = {}
    top_k: dict[str, str] = {}
    for measure in measures:
        request, key = parse_measure(measure)
        (top_k if measure == "recip_rank" else full)[key] = request
    aggregate, per_query = _evaluate(qrels, run, full)
    mrr_aggregate, mrr_per_query = _evaluate(qrels, truncate_run(run, MRR_CUTOFF), top_k)
    aggregate.update(mrr_aggregate)
    for qid, values in mrr_per_query.items():
        per_query[qid].update(values)
    return aggregate, per_query


def passages_to_docs(scored_passages: Iterable[ScoredPassageLike]) -> dict[str, float]:
    """Turns a ranked list of passages into document scores that keep the list's order exactly.

    A document ranks where its first (best-ranked) passage is, and scores by that rank (the first
    document scores the number of documents, the last 1). The passages' own scores are not used: they
    can tie (reciprocal-rank fusion ties often), and trec_eval would then reorder the tied documents
    by doc id rather than keep the order the fleet returned. A passage without `doc_id` gets its
    document from its id, `<doc_id>#<n>`.
    """
    order: dict[str, None] = {}
    for scored in scored_passages:
        order.setdefault(scored.passage.doc_id or scored.passage.id.rpartition("#")[0] or scored.passage.id)
    return {doc: float(len(order) - rank) for rank, doc in enumerate(order)}
