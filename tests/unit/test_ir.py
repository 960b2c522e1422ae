"""services.evaluator.metrics.ir against direct pytrec_eval calls on random runs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import pytrec_eval

from services.evaluator.metrics.ir import evaluate_run, passages_to_docs, truncate_run


def random_case(seed: int, n_queries: int = 40, n_docs: int = 300):
    rng = np.random.default_rng(seed)
    docs = [f"d{i}" for i in range(n_docs)]
    qrels = {
        f"q{q}": {
            str(d): int(rng.integers(0, 3)) for d in rng.choice(docs, rng.integers(1, 8), replace=False)
        }
        for q in range(n_queries)
    }
    run = {
        qid: {str(d): float(s) for d, s in zip(rng.choice(docs, 150, replace=False), rng.random(150))}
        for qid in qrels
    }
    return qrels, run


def direct(qrels, run, measures):
    return pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_measures_match_pytrec_eval(seed):
    qrels, run = random_case(seed)
    aggregate, per_query = evaluate_run(run, qrels)
    reference = direct(qrels, run, {"ndcg_cut.10", "recall.100"})
    top10 = {qid: dict(sorted(r.items(), key=lambda kv: -kv[1])[:10]) for qid, r in run.items()}
    mrr = direct(qrels, top10, {"recip_rank"})

    assert set(aggregate) == {"ndcg@10", "recall@100", "mrr@10"}
    for qid in qrels:
        assert per_query[qid]["ndcg@10"] == pytest.approx(reference[qid]["ndcg_cut_10"], abs=1e-6)
        assert per_query[qid]["recall@100"] == pytest.approx(reference[qid]["recall_100"], abs=1e-6)
        assert per_query[qid]["mrr@10"] == pytest.approx(mrr[qid]["recip_rank"], abs=1e-6)
    assert aggregate["ndcg@10"] == pytest.approx(
        np.mean([v["ndcg_cut_10"] for v in reference.values()]), abs=1e-6
    )
    assert aggregate["mrr@10"] == pytest.approx(np.mean([v["recip_rank"] for v in mrr.values()]), abs=1e-6)
    # The random runs are long enough for MRR@10 to differ from the untruncated reciprocal rank.
    full_rr = direct(qrels, run, {"recip_rank"})
    assert any(full_rr[q]["recip_rank"] != mrr[q]["recip_rank"] for q in qrels)


def test_generic_measures_and_names():
    qrels, run = random_case(3)
    aggregate, _ = evaluate_run(run, qrels, measures=("P_5", "map", "map_cut_10", "ndcg", "success_1"))
    reference = direct(qrels, run, {"P.5", "map", "map_cut.10", "ndcg", "success.1"})
    for key, ref_key in [
        ("P@5", "P_5"),
        ("map", "map"),
        ("map@10", "map_cut_10"),
        ("ndcg", "ndcg"),
        ("success@1", "success_1"),
    ]:
        assert aggregate[key] == pytest.approx(np.mean([v[ref_key] for v in reference.values()]), abs=1e-6)


def test_queries_missing_from_the_run_count_as_zero():
    qrels, run = random_case(4)
    dropped = ["q0", "q5", "q7"]
    partial = {qid: r for qid, r in run.items() if qid not in dropped}
    aggregate, per_query = evaluate_run(partial, qrels)
    reference = direct(qrels, partial, {"ndcg_cut.10", "recall.100"})
    assert not set(dropped) & set(reference)  # pytrec_eval alone skips them
    for qid in dropped:
        assert per_query[qid] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    expected = sum(v["ndcg_cut_10"] for v in reference.values()) / len(qrels)
    assert aggregate["ndcg@10"] == pytest.approx(expected, abs=1e-6)


def test_run_queries_without_qrels_are_ignored():
    qrels, run = random_case(5)
    with_extra = {**run, "unjudged": {"d1": 1.0}}
    assert evaluate_run(with_extra, qrels) == evaluate_run(run, qrels)


def test_mrr_at_10_breaks_ties_like_trec_eval():
    # All scores tie: trec_eval ranks by doc id descending: d9, d8, ..., d1, d01, d00 (11th), d0.
    run = {"q": {f"d{i}": 1.0 for i in range(10)} | {"d00": 1.0, "d01": 1.0}}
    qrels = {"q": {"d00": 1}}
    assert direct(qrels, run, {"recip_rank"})["q"]["recip_rank"] == pytest.approx(1 / 11)
    assert evaluate_run(run, qrels)[0]["mrr@10"] == 0.0
    assert list(truncate_run(run, 3)["q"]) == ["d9", "d8", "d7"]
    qrels = {"q": {"d2": 1}}  # 8th in trec_eval's order
    assert evaluate_run(run, qrels)[0]["mrr@10"] == pytest.approx(1 / 8)


def test_perfect_and_empty_runs():
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 2}}
    perfect = {"q1": {"a": 2.0, "b": 1.0, "x": 0.5}, "q2": {"c": 1.0}}
    assert evaluate_run(perfect, qrels)[0] == {"ndcg@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0}
    assert evaluate_run({}, qrels)[0] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown measure 'ndcg@10'"):
        evaluate_run({}, {"q": {"a": 1}}, measures=("ndcg@10",))
    with pytest.raises(ValueError, match="qrels"):
        evaluate_run({}, {})


def scored(pid: str, score: float, doc_id: str | None = None):
    doc = pid.rpartition("#")[0] if doc_id is None else doc_id
    return SimpleNamespace(passage=SimpleNamespace(id=pid, doc_id=doc), score=score)


def test_passages_to_docs_ranks_a_document_at_its_first_passage():
    docs = passages_to_docs(
        [scored("b#1", 0.9), scored("a#0", 0.8), scored("b#0", 0.5), scored("c#2", 0.4), scored("a#3", 0.3)]
    )
    assert docs == {"b": 3.0, "a": 2.0, "c": 1.0}


def test_tied_scores_keep_the_order_of_the_list_not_trec_evals_doc_id_order():
    # Reciprocal-rank fusion ties often; trec_eval would put tied "a" below "b" (doc ids decreasing).
    qrels = {"q": {"a": 1}}
    tied = [scored("a#0", 0.5), scored("b#0", 0.5)]
    assert evaluate_run({"q": {"a": 0.5, "b": 0.5}}, qrels)[0]["mrr@10"] == 0.5
    assert evaluate_run({"q": passages_to_docs(tied)}, qrels)[0]["mrr@10"] == 1.0


def test_passages_to_docs_reads_the_document_from_the_id_when_doc_id_is_empty():
    assert passages_to_docs([scored("x#y#3", 1.0, doc_id=""), scored("plain", 0.5, doc_id="")]) == {
        "x#y": 2.0,
        "plain": 1.0,
    }


@pytest.mark.parametrize("measure", ["ndcg_cut_10", "recall_100", "recip_rank", "P_5", "map", "map_cut_20"])
def test_pytrec_measure_inverts_the_reported_keys(measure: str) -> None:
    from services.evaluator.metrics.ir import pytrec_measure

    (key,) = evaluate_run({"q": {"d": 1.0}}, {"q": {"d": 1}}, [measure])[0]
    assert pytrec_measure(key) == measure
