"""Evaluator service: scores runs and answers, and runs experiment sweeps against the live Pipeline.

ScoreRetrieval goes through pytrec_eval (`metrics.ir`); ScoreAnswers through the SQuAD semantics
(`metrics.qa`, reported on the official 0-100 scale) and the RAG metrics (`metrics.rag`, 0-1).
RunExperiment drives the Pipeline through the `ragfleet` SDK (like any other client), streams
progress, persists one record per run under RAGFLEET_HOME/runs and ends with the report.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import yaml
from pydantic import ValidationError

import ragfleet
from ragfleet.v1 import evaluator_pb2
from services.evaluator import experiments
from services.evaluator.metrics import qa, rag
from services.evaluator.metrics.ir import DEFAULT_MEASURES, evaluate_run
from services.evaluator.report import build_report, load_records
from services.runtime.context import CallContext
from services.runtime.errors import ServiceError, invalid_argument, unavailable
from services.runtime.settings import Settings


class EvaluatorService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def ScoreRetrieval(
        self, request: evaluator_pb2.ScoreRetrievalRequest, ctx: CallContext
    ) -> evaluator_pb2.ScoreRetrievalResponse:
        if not request.qrels:
            raise invalid_argument("qrels", "is empty")
        run = {qid: dict(scores.scores) for qid, scores in request.run.items()}
        qrels = {qid: dict(judged.relevance) for qid, judged in request.qrels.items()}
        measures = list(request.measures) or list(DEFAULT_MEASURES)
        try:
            aggregate, per_query = await asyncio.to_thread(evaluate_run, run, qrels, measures)
        except ValueError as err:
            raise invalid_argument("measures", str(err).removeprefix("measures: ")) from err
        return evaluator_pb2.ScoreRetrievalResponse(
            aggregate=aggregate,
            per_query={qid: evaluator_pb2.MeasureValues(values=v) for qid, v in per_query.items()},
        )

    async def ScoreAnswers(
        self, request: evaluator_pb2.ScoreAnswersRequest, ctx: CallContext
    ) -> evaluator_pb2.ScoreAnswersResponse:
        if not request.items:
            raise invalid_argument("items", "is empty")
        known = [*experiments.QA_METRICS, *rag.ALL_METRICS]
        metrics = list(request.metrics) or known
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise invalid_argument("metrics", f"unknown metric {unknown[0]!r}; known: {known}")
        ids = [item.id or str(i) for i, item in enumerate(request.items)]
        if len(set(ids)) != len(ids):
            raise invalid_argument("items.id", "ids must be unique")
        per_item: dict[str, dict[str, float]] = {i: {} for i in ids}
        for item_id, item in zip(ids, request.items):
            # No gold answers means a no-answer question, scored as SQuAD 2.0 does (empty is right).
            golds, version = (list(item.gold_answers), "1.1") if item.gold_answers else ([""], "2.0")
            if "exact_match" in metrics:
                per_item[item_id]["exact_match"] = 100.0 * qa.exact_match(item.prediction, golds)
            if "f1" in metrics:
                per_item[item_id]["f1"] = 100.0 * qa.f1_score(item.prediction, golds, version=version)
        rag_metrics = [m for m in metrics if m in rag.ALL_METRICS]
        if rag_metrics:
            samples = [
                rag.RagSample(
                    question=item.question,
                    answer=item.prediction,
                    contexts=[p.text for p in item.contexts],
                    ground_truths=list(item.gold_answers),
                )
                for item in request.items
            ]
            _, rag_scores = await asyncio.to_thread(rag.score_samples, samples, rag_metrics)
            for item_id, scores in zip(ids, rag_scores):
                per_item[item_id].update({k: v for k, v in scores.items() if v is not None})
        aggregate = {
            m: sum(v[m] for v in per_item.values() if m in v) / n
            for m in metrics
            if (n := sum(m in v for v in per_item.values()))
        }
        return evaluator_pb2.ScoreAnswersResponse(
            aggregate=aggregate,
            per_item={i: evaluator_pb2.MeasureValues(values=v) for i, v in per_item.items()},
        )

    async def RunExperiment(
        self, request: evaluator_pb2.RunExperimentRequest, ctx: CallContext
    ) -> AsyncIterator[evaluator_pb2.ExperimentEvent]:
        try:
            config = experiments.ExperimentConfig.model_validate(yaml.safe_load(request.config_yaml) or {})
        except (yaml.YAMLError, ValidationError) as err:
            raise invalid_argument("config_yaml", str(err)) from err

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[experiments.ExperimentProgress | None] = asyncio.Queue()
        home = self.settings.home
        endpoint = self.settings.evaluator.pipeline

        def run() -> list[str]:
            timeout = ctx.timeout(24 * 3600.0)
            token = (ctx.authorization or "").removeprefix("Bearer ") or None
            with ragfleet.Client(
                endpoint.address, application=endpoint.application, token=token, timeout=timeout
            ) as client:
                return experiments.run_experiment(
                    client,
                    config,
                    home=home,
                    progress=lambda p: loop.call_soon_threadsafe(events.put_nowait, p),
                )

        task = asyncio.ensure_future(asyncio.to_thread(run))
        task.add_done_callback(lambda _: events.put_nowait(None))
        while (progress := await events.get()) is not None:
            yield evaluator_pb2.ExperimentEvent(
                progress=evaluator_pb2.ExperimentProgress(
                    run_id=progress.run_id, done=progress.done, total=progress.total, stage=progress.stage
                )
            )
        try:
            run_ids = await task
        except ragfleet.errors.RagfleetError as err:
            raise ServiceError(err.code, f"pipeline: {err.details}") from err
        except (ValueError, FileNotFoundError) as err:
            raise invalid_argument("config_yaml", str(err)) from err
        if not run_ids:
            raise unavailable("the experiment produced no runs")
        out_dir = report_dir(home, config.name)
        paths = await asyncio.to_thread(build_report, load_records(run_ids, home / "runs"), out_dir)
        yield evaluator_pb2.ExperimentEvent(
            report=evaluator_pb2.ExperimentReport(
                run_ids=run_ids, report_path=str(paths["markdown"]), markdown=paths["markdown"].read_text()
            )
        )


def report_dir(home: Path, experiment: str) -> Path:
    """Where an experiment's report goes: RAGFLEET_HOME/runs/reports/<experiment>-<UTC time>."""
    return home / "runs" / "reports" / f"{experiment}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
