"""The Evaluator service over real gRPC: scoring equals pytrec_eval and SQuAD semantics, bad input gets
INVALID_ARGUMENT naming the field, and RunExperiment drives a live Pipeline and ends with a report."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest

import ragfleet
from ragfleet.v1 import common_pb2, evaluator_pb2, evaluator_pb2_grpc
from services.evaluator.metrics.ir import evaluate_run
from tools.fleet import LocalFleet, start_local_fleet

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    running = start_local_fleet(
        tmp_path_factory.mktemp("evaluator-home"), ("retriever-bm25", "pipeline", "evaluator")
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(fleet: LocalFleet):
    channel = ragfleet.make_channel(fleet.services["evaluator"].address)
    yield evaluator_pb2_grpc.EvaluatorStub(channel)
    channel.close()


def test_score_retrieval_equals_pytrec_eval(stub) -> None:
    rng = random.Random(7)
    qrels = {f"q{i}": {f"d{j}": rng.randint(0, 2) for j in rng.sample(range(30), 4)} for i in range(20)}
    run = {f"q{i}": {f"d{j}": rng.random() for j in range(30)} for i in range(18)}
    request = evaluator_pb2.ScoreRetrievalRequest(
        run={q: evaluator_pb2.QueryRun(scores=s) for q, s in run.items()},
        qrels={q: evaluator_pb2.QueryJudgements(relevance=r) for q, r in qrels.items()},
        measures=["ndcg_cut_10", "recall_100", "recip_rank", "P_5"],
    )
    reply = stub.ScoreRetrieval(request, timeout=60)
    aggregate, per_query = evaluate_run(run, qrels, ["ndcg_cut_10", "recall_100", "recip_rank", "P_5"])
    assert set(reply.aggregate) == set(aggregate)
    for key, value in aggregate.items():
        assert reply.aggregate[key] == pytest.approx(value, abs=1e-6)
    assert reply.per_query["q19"].values["ndcg@10"] == 0.0  # absent from the run: counts as zero
    assert reply.per_query["q3"].values["P@5"] == pytest.approx(per_query["q3"]["P@5"], abs=1e-6)


def test_bad_scoring_requests_name_the_field(stub) -> None:
    qrels = {"q": evaluator_pb2.QueryJudgements(relevance={"d": 1})}
    cases = [
        (evaluator_pb2.ScoreRetrievalRequest(qrels=qrels, measures=["ndcg_at_ten"]), "measures"),
        (evaluator_pb2.ScoreRetrievalRequest(), "qrels"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.ScoreRetrieval(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreAnswers(
            evaluator_pb2.ScoreAnswersRequest(items=[{"prediction": "x"}], metrics=["bleu"]), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "metrics" in err.value.details()


def test_score_answers_uses_squad_semantics_and_rag_metrics(stub) -> None:
    context = common_pb2.Passage(text="The lighthouse of Daikra was built in 1858 on Cape Kavu.")
    items = [
        {
            "id": "right",
            "question": "When was it built?",
            "prediction": "in 1858",
            "gold_answers": ["1858"],
            "contexts": [context],
        },
        {
            "id": "wrong",
            "question": "When was it built?",
            "prediction": "The year 1901",
            "gold_answers": ["1858"],
            "contexts": [context],
        },
    ]
    reply = stub.ScoreAnswers(
        evaluator_pb2.ScoreAnswersRequest(items=items, metrics=["exact_match", "f1", "faithfulness"]),
        timeout=120,
    )
    right, wrong = reply.per_item["right"].values, reply.per_item["wrong"].values
    assert right["exact_match"] == 0.0 and right["f1"] == pytest.approx(100 * 2 / 3)
    assert wrong["exact_match"] == 0.0 and wrong["f1"] == 0.0
    assert right["faithfulness"] > wrong["faithfulness"]
    assert reply.aggregate["f1"] == pytest.approx((right["f1"] + wrong["f1"]) / 2)


def test_run_experiment_streams_progress_and_ends_with_a_report(stub, fleet: LocalFleet) -> None:
    config = """
name: demo-chunks
dataset: demo
sweep:
  chunk_tokens: [32, 64]
  overlap_tokens: [8]
  retrievers: [[bm25]]
  top_k: [5]
"""
    events = list(stub.RunExperiment(evaluator_pb2.RunExperimentRequest(config_yaml=config), timeout=600))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "report" and kinds.count("report") == 1 and "progress" in kinds
    report = events[-1].report
    assert len(report.run_ids) == 2
    for run_id in report.run_ids:
        assert run_id in report.markdown
        assert (fleet.home / "runs" / f"{run_id}.json").is_file()
    assert "significant" in report.markdown
    pngs = list(Path(report.report_path).parent.glob("*.png"))
    assert len(pngs) >= 2
    with pytest.raises(grpc.RpcError) as err:
        list(
            stub.RunExperiment(evaluator_pb2.RunExperimentRequest(config_yaml="name: [unclosed"), timeout=60)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "config_yaml" in err.value.details()


def test_the_sdk_evaluator_client(fleet: LocalFleet) -> None:
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    run = {"q1": {"d1": 2.0, "d3": 1.0}, "q2": {"d3": 2.0, "d2": 1.0}}
    with ragfleet.EvaluatorClient(fleet.services["evaluator"].address, timeout=60) as evaluator:
        scored = evaluator.score_retrieval(run, qrels, ["recip_rank"])
        assert scored.aggregate["mrr@10"] == pytest.approx(0.75)
        items = [{"id": "a", "prediction": "the Nile", "gold_answers": ["Nile"]}]
        answers = evaluator.score_answers(items, ["exact_match"])
        assert answers.per_item["a"].values["exact_match"] == 100.0
        with pytest.raises(ragfleet.errors.InvalidArgument):
            list(evaluator.run_experiment("sweep: {top_k: [0]}"))
