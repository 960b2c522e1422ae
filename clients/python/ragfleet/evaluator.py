"""Blocking client for the Evaluator service: score runs and answers, run experiment sweeps.

    with ragfleet.EvaluatorClient("127.0.0.1:50091") as evaluator:
        scores = evaluator.score_retrieval(run, qrels)          # pytrec_eval nDCG@10, Recall@100, MRR@10
        for event in evaluator.run_experiment(Path("sweep.yaml")):
            print(event)

Scoring calls are idempotent and retried on UNAVAILABLE; an experiment is not.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ragfleet.client import SyncClientBase, relay_stream
from ragfleet.v1 import evaluator_pb2, evaluator_pb2_grpc


class EvaluatorClient(SyncClientBase):
    _stub_class = evaluator_pb2_grpc.EvaluatorStub
    _service = "ragfleet.v1.Evaluator"
    _idempotent = ("ScoreRetrieval", "ScoreAnswers")

    def score_retrieval(
        self,
        run: Mapping[str, Mapping[str, float]],
        qrels: Mapping[str, Mapping[str, int]],
        measures: Sequence[str] = (),
        *,
        timeout: float | None = None,
    ) -> evaluator_pb2.ScoreRetrievalResponse:
        """`run` {query: {doc: score}}, `qrels` {query: {doc: grade}}; measures as pytrec_eval names."""
        request = evaluator_pb2.ScoreRetrievalRequest(
            run={q: evaluator_pb2.QueryRun(scores=scores) for q, scores in run.items()},
            qrels={q: evaluator_pb2.QueryJudgements(relevance=judged) for q, judged in qrels.items()},
            measures=list(measures),
        )
        return self._unary(self._stub.ScoreRetrieval, request, timeout)

    def score_answers(
        self,
        items: Iterable[Mapping[str, Any] | evaluator_pb2.AnswerItem],
        metrics: Sequence[str] = (),
        *,
        timeout: float | None = None,
    ) -> evaluator_pb2.ScoreAnswersResponse:
        """Items {id, question, prediction, gold_answers, contexts}; metrics such as "f1", "faithfulness"."""
        AnswerItem = evaluator_pb2.AnswerItem
        messages = [i if isinstance(i, AnswerItem) else AnswerItem(**i) for i in items]
        request = evaluator_pb2.ScoreAnswersRequest(items=messages, metrics=list(metrics))
        return self._unary(self._stub.ScoreAnswers, request, timeout)

    def run_experiment(
        self, config: str | Path, *, timeout: float | None = None
    ) -> Iterator[evaluator_pb2.ExperimentEvent]:
        """Streams progress events and ends with the report; `config` is YAML text or a path to it."""
        text = config.read_text("utf-8") if isinstance(config, Path) else config
        request = evaluator_pb2.RunExperimentRequest(config_yaml=text)
        return relay_stream(*self._start_stream(self._stub.RunExperiment, request, timeout))
