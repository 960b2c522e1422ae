"""Experiments: a sweep over pipeline settings, run through the live services, one record per run.

An experiment config (YAML, `ExperimentConfig.from_yaml`) names a dataset (a `load_dataset` spec;
relative paths are read from the config file's folder) and a sweep: a list of values per setting,
whose cartesian product gives the runs (`RunConfig`). A single value may stand for a one-item list;
in `retrievers`, an item is a list of retriever names (fused) or one name.

    name: scifact-chunking
    dataset: {kind: beir, path: ../../../shared/data/scifact, split: test}
    sweep:
      chunk_tokens: [100, 200]
      retrievers: [bm25, dense, [dense, bm25]]
      rerank: [false, cross_encoder]
      rerank_depth: 30
    reranker_models: {cross_encoder: /models/my-cross-encoder}
    max_queries: 100
    batch_size: 64      # IR queries per SearchBatch call (default 1: each query timed on its own)

In `rerank`, false is no reranking, true the Reranker's default backend and a name that backend;
`reranker_models` names the checkpoint (path or id) of a backend, else the Reranker's default is used;
`retrieval_weight` (0 to 1) sets the weight of the retrieval scores in every reranked order, else each
model's own is used.

`run_experiment` drives the Pipeline through the SDK client:

1. Runs are grouped by their ingest settings (chunking; the vector store when a run uses the dense
   retriever, the checkpoint when it uses colbert); each group shares one index, named
   `eval-<dataset>-<hash>` from a hash of the settings, the retrievers it feeds and the documents.
   The index is ingested once (into every retriever any run of the group uses) and dropped after the
   group's runs unless `keep_index` (a failed drop is logged, not raised). An index of that name that
   already exists in every one of those retrievers is the same corpus built the same way and is
   reused (`ingest_s` is then None); a partial one is dropped and rebuilt when `keep_index`. Without
   `keep_index` a new index gets the experiment's own suffix (`eval-<dataset>-<hash>-<id>`), so two
   experiments of the same settings at once never search an index the other drops. With `index:` the
   experiment searches that existing index instead (needed for a QA set without contexts) and never
   drops it.
2. Every query (the first `max_queries` in dataset order) goes through the pipeline:
   - IR datasets: `client.search` with depth `max(top_k, largest @k of the metrics)` — or, with
     `batch_size` above 1, `client.search_batch` of that many queries at a time (the same lists,
     faster; a batch the fleet refuses as too large, RESOURCE_EXHAUSTED, is searched in halves) —
     and the ranked passages become document scores (`ir.passages_to_docs`: a document ranks at its
     first passage and scores by that rank, so trec_eval keeps the fleet's order, ties and all),
     scored per query with `ir.evaluate_run` (pytrec_eval). A reranked run searches
     with the Pipeline's reranking: the best `rerank_depth` passages (0: the whole depth) are
     rescored by the Reranker; when that is fewer than the depth, the rest of the retrieval list
     (a second, untimed search without reranking, batched alike) follows them in retrieval order,
     the usual way to score a reranker over a deeper cut-off such as recall@100.
   - QA datasets: `client.ask` (streamed) with top_k, retrievers, fusion, rerank and the sampling
     temperature; the answer text is scored with EM/F1 (`metrics.qa`, SQuAD v2.0 rules: a question
     without gold answers expects the empty answer) and, where the dataset has qrels, the passages
     the answer was given with are scored with IR metrics. While the fleet has no generator the
     answer is retrieval-only (the gateway's "Retrieval only ..." text, so EM/F1 are near 0); the
     record says so in `retrieval_only`. Reranking, when the run asks for it, rescores
     `rerank_depth` passages (0: top_k; otherwise at least top_k) and the best top_k are kept.
   Reranking is always `required`: a fleet whose Reranker has no model fails the run (naming the
   command that trains one) rather than recording retrieval order as a reranked run.
3. Each run's record is written atomically to `<home>/runs/<run id>.json` as soon as the run
   ends; run ids are `<experiment>-<UTC time>-<random>-<position in the sweep>`. A record holds
   exactly `RUN_RECORD_KEYS`: `config` (the RunConfig), `dataset` ({name, kind, queries: how many
   were asked, skipped_documents and queries_without_qrels: how many the loader left out}),
   `versions` (every index version that answered), `ingest_s` (seconds to build the run's index,
   the same for every run sharing it; None when it already existed), `aggregate` and `per_query`
   metrics, `latency_ms` ({per_query: {qid: {stage: ms, total: ms}}, mean: {stage:
   ms}, p50_total, p99_total}), `retrieval_only` (true unless every answer was generated;
   always true for IR datasets) and `rerank` (None for a run without reranking, else {model_ids:
   the reranker checkpoints that answered, candidates: passages sent to it, truncated: how many of
   those were cut to the model's input length}).

Metrics are named `ndcg@10`, `recall@100`, `mrr@10`, `P@5`, `map`, ... (as `ir.evaluate_run`
reports them) and `exact_match`, `f1` (QA). The default is the IR trio for IR datasets and
EM/F1 plus the IR trio (when the dataset has qrels) for QA datasets.

Latencies, in milliseconds per query: the stages the pipeline reports (`retrieve`, `fuse` for a
search, and `rerank` when it reranks; `retrieve`, `rerank`, `generate` for an ask — the first timing
of each name) and `total`, the client-side wall time of the call including reading the whole stream.
With `batch_size` above 1 a query's `total` is its batch's wall time shared equally among the batch's
queries (their sum is still the run's search time), and only `rerank` is timed per query: SearchBatch
reports no per-query retrieval stages.

Known gap: the gateway reads a zero `overlap_tokens` as "use the server default", so the sweep
rejects an overlap of 0 rather than silently running with another one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from itertools import product
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.datasets.collections import DEMO, EvalDataset, load_dataset
from services.datasets.mining import search_in_halves
from services.evaluator.metrics import ir
from services.runtime.storage import atomic_write_json, utc_now
from services.ui import progress_bar

RUNS_DIR = "runs"
# The index spec fields that apply to one retriever only, and that retriever: a run that does not use
# it leaves the field empty and shares an index built with any value of it.
RETRIEVER_FIELDS = {
    "vector_store": "dense",
    "colbert_model": "colbert",
    "mamba_model": "mamba",
    "seal_model": "seal",
}
STAGES = ("retrieve", "fuse", "rerank", "generate")
TOTAL = "total"
IR_DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10")
QA_METRICS = ("exact_match", "f1")
RUN_RECORD_KEYS = (
    "run_id",
    "experiment",
    "created_at",
    "config",
    "dataset",
    "versions",
    "ingest_s",
    "aggregate",
    "per_query",
    "latency_ms",
    "retrieval_only",
    "rerank",
)

_CUTOFF = re.compile(r"^(?P<family>[A-Za-z_]+)@(?P<k>\d+)$")

logger = logging.getLogger(__name__)


# --- configuration -----------------------------------------------------------------------------


def _check_ir_metric(metric: str) -> None:
    """Raises ValueError unless `ir.evaluate_run` reports `metric` under exactly this name."""
    try:
        _, reported = ir.parse_measure(ir.pytrec_measure(metric))
    except ValueError:
        raise ValueError(
            f"unknown metric {metric!r}; use names such as 'ndcg@10', 'recall@100', "
            f"'mrr@10', 'P@5', 'map', or {' / '.join(QA_METRICS)} for QA datasets"
        ) from None
    if metric != reported:
        raise ValueError(f"write {metric!r} as {reported!r}")


def _cutoff(metric: str) -> int:
    match = _CUTOFF.fullmatch(metric)
    return int(match["k"]) if match else 0


class Sweep(BaseModel):
    """The values to try for each pipeline setting; runs are their cartesian product."""

    model_config = ConfigDict(extra="forbid")

    vector_store: list[Literal["faiss", "chroma"]] = Field(["faiss"], min_length=1)
    # "" is the colbert retriever's default checkpoint.
    colbert_model: list[str] = Field([""], min_length=1)
    # "" is the mamba retriever's default checkpoint.
    mamba_model: list[str] = Field([""], min_length=1)
    # "" is the seal retriever's default language model.
    seal_model: list[str] = Field([""], min_length=1)
    chunk_tokens: list[int] = Field([200], min_length=1)
    overlap_tokens: list[int] = Field([40], min_length=1)
    whole_documents: list[bool] = Field([False], min_length=1)
    retrievers: list[list[str]] = Field([["dense", "bm25"]], min_length=1)
    fusion: list[Literal["rrf", "weighted"]] = Field(["rrf"], min_length=1)
    # False, True (the Reranker's default backend) or a backend name.
    rerank: list[bool | str] = Field([False], min_length=1)
    # Passages rescored per query by a reranked run; 0 means all that it retrieves.
    rerank_depth: list[int] = Field([0], min_length=1)
    top_k: list[int] = Field([10], min_length=1)
    temperature: list[float] = Field([0.0], min_length=1)

    @field_validator("*", mode="before")
    @classmethod
    def _one_value_is_a_list(cls, value: Any) -> Any:
        return value if isinstance(value, list) else [value]

    @field_validator("retrievers", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        return [[item] if isinstance(item, str) else item for item in items]

    @field_validator("retrievers")
    @classmethod
    def _names(cls, value: list[list[str]]) -> list[list[str]]:
        for names in value:
            if not names or any(not name.strip() for name in names):
                raise ValueError("each item must name at least one retriever, with no empty names")
            if len(set(names)) != len(names):
                raise ValueError(f"{names} names a retriever twice")
        return value

    @field_validator("rerank")
    @classmethod
    def _backend_names(cls, value: list[bool | str]) -> list[bool | str]:
        if any(isinstance(v, str) and not v.strip() for v in value):
            raise ValueError("a reranker backend name must not be empty (false: no reranking)")
        return value

    @field_validator("chunk_tokens", "overlap_tokens", "top_k")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError(
                "every value must be at least 1 (the gateway reads an overlap of 0 as its default)"
            )
        return value

    @field_validator("temperature", "rerank_depth")
    @classmethod
    def _not_negative(cls, value: list[float]) -> list[float]:
        if any(v < 0 for v in value):
            raise ValueError("every value must be at least 0")
        return value

    @model_validator(mode="after")
    def _overlap_below_window(self) -> Sweep:
        if False in self.whole_documents and max(self.overlap_tokens) >= min(self.chunk_tokens):
            raise ValueError(
                f"overlap_tokens {max(self.overlap_tokens)} is not below chunk_tokens "
                f"{min(self.chunk_tokens)}: every overlap must be smaller than every window"
            )
        return self

    def rerank_backends(self) -> list[str]:
        """The reranker backends the sweep names."""
        return [value for value in self.rerank if isinstance(value, str)]


@dataclass(frozen=True)
class IngestSettings:
    """What an index is built with. A RETRIEVER_FIELDS field is empty when no run of the index uses its
    retriever; runs share an index when their settings agree where both set them (`joins`)."""

    vector_store: str
    chunk_tokens: int
    overlap_tokens: int
    whole_documents: bool
    colbert_model: str = ""
    mamba_model: str = ""
    seal_model: str = ""

    def spec(self, retrievers: Sequence[str]) -> dict[str, Any]:
        """The SDK's index spec for these settings, ingesting into `retrievers`."""
        chunking: dict[str, Any] = (
            {"whole_documents": True}
            if self.whole_documents
            else {"chunk_tokens": self.chunk_tokens, "overlap_tokens": self.overlap_tokens}
        )
        spec: dict[str, Any] = {"chunking": chunking, "retrievers": list(retrievers)}
        for name, retriever in RETRIEVER_FIELDS.items():
            if retriever in retrievers and getattr(self, name):
                spec[name] = getattr(self, name)
        return spec

    def joins(self, other: IngestSettings) -> IngestSettings | None:
        """The settings of one index that serves runs of both, or None when they conflict."""
        merged = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name in RETRIEVER_FIELDS and not (mine and theirs):
                merged[f.name] = mine or theirs
            elif mine != theirs:
                return None
        return replace(self, **merged)


@dataclass(frozen=True)
class RunConfig:
    """One point of the sweep."""

    vector_store: str
    chunk_tokens: int
    overlap_tokens: int
    whole_documents: bool
    retrievers: tuple[str, ...]
    fusion: str
    # False, True (the Reranker's default backend) or a backend name.
    rerank: bool | str
    top_k: int
    temperature: float
    colbert_model: str = ""
    mamba_model: str = ""
    seal_model: str = ""
    # 0 / "" / None for a run without reranking; a None weight is each reranker model's own.
    rerank_depth: int = 0
    reranker_model: str = ""
    retrieval_weight: float | None = None

    @property
    def ingest(self) -> IngestSettings:
        """The index this run needs: window sizes do not matter for whole documents, nor a retriever's
        own field (RETRIEVER_FIELDS) for runs without that retriever."""
        own = {
            name: getattr(self, name) if retriever in self.retrievers else ""
            for name, retriever in RETRIEVER_FIELDS.items()
        }
        if self.whole_documents:
            return IngestSettings(chunk_tokens=0, overlap_tokens=0, whole_documents=True, **own)
        return IngestSettings(
            chunk_tokens=self.chunk_tokens, overlap_tokens=self.overlap_tokens, whole_documents=False, **own
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "retrievers": list(self.retrievers)}

    def rerank_spec(self, depth: int) -> dict[str, Any]:
        """The SDK's `rerank` argument of a reranked run that rescores `depth` passages: required, so a
        Reranker without a model fails the run instead of leaving retrieval order."""
        backend = "" if self.rerank is True else str(self.rerank)
        spec = {"backend": backend, "model": self.reranker_model, "depth": depth, "required": True}
        return spec if self.retrieval_weight is None else spec | {"retrieval_weight": self.retrieval_weight}


class ExperimentConfig(BaseModel):
    """An experiment: a dataset, a sweep, and how to evaluate it (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    dataset: str | dict[str, Any]
    sweep: Sweep = Sweep()
    max_queries: int | None = Field(None, ge=1)
    # IR queries per search call: 1 times each query on its own, more searches faster (see the module
    # docstring for what latency then means).
    batch_size: int = Field(1, ge=1)
    metrics: list[str] | None = Field(None, min_length=1)
    # Search this existing index instead of ingesting the dataset; it is never dropped.
    index: str | None = Field(None, min_length=1)
    keep_index: bool = False
    # The checkpoint (path or id) of each reranker backend that sweep.rerank names; the Reranker's
    # default for the others.
    reranker_models: dict[str, str] = {}
    # The weight (0 to 1) of the retrieval scores in every reranked run's order; None: each reranker
    # model's own (the weight its trainer tuned).
    retrieval_weight: float | None = Field(None, ge=0, le=1)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[str] | None) -> list[str] | None:
        for metric in value or ():
            if metric not in QA_METRICS:
                _check_ir_metric(metric)
        return value

    @model_validator(mode="after")
    def _models_of_swept_backends(self) -> ExperimentConfig:
        unknown = sorted(set(self.reranker_models) - set(self.sweep.rerank_backends()))
        if unknown:
            raise ValueError(
                f"reranker_models: {unknown} not in sweep.rerank ({self.sweep.rerank_backends() or 'none'})"
            )
        return self

    @model_validator(mode="after")
    def _index_fixes_ingest_settings(self) -> ExperimentConfig:
        # Runs share an index when their settings agree where both set them (a bm25 run sets no store).
        if self.index is not None and len(index_groups(self.runs())) > 1:
            raise ValueError(
                "index: an existing index has fixed ingest settings, but the sweep varies "
                "vector_store / chunk_tokens / overlap_tokens / whole_documents / colbert_model / "
                "mamba_model / seal_model"
            )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExperimentConfig:
        """Reads a config file; ValueError names the file and the offending field or line."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such experiment config")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ValueError(
                f"{where}: not valid YAML ({getattr(error, 'problem', None) or error})"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        try:
            config = cls.model_validate(data)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()
            )
            raise ValueError(f"{path}: {problems}") from None
        return config.model_copy(update={"dataset": _relative_to(config.dataset, path.parent)})

    def runs(self) -> list[RunConfig]:
        """The sweep's cartesian product, in the order of the config's lists, without repeats."""
        s = self.sweep
        points = product(
            s.vector_store,
            s.chunk_tokens,
            s.overlap_tokens,
            s.whole_documents,
            s.retrievers,
            s.fusion,
            s.rerank,
            s.top_k,
            s.temperature,
            s.colbert_model,
            s.mamba_model,
            s.seal_model,
            s.rerank_depth,
        )
        runs = (
            RunConfig(
                store,
                chunk,
                overlap,
                whole,
                tuple(names),
                fusion,
                rerank,
                top_k,
                float(temp),
                colbert,
                mamba,
                seal,
                rerank_depth=depth if rerank is not False else 0,
                reranker_model=self.reranker_models.get(rerank, "") if isinstance(rerank, str) else "",
                retrieval_weight=self.retrieval_weight if rerank is not False else None,
            )
            for (
                store,
                chunk,
                overlap,
                whole,
                names,
                fusion,
                rerank,
                top_k,
                temp,
                colbert,
                mamba,
                seal,
                depth,
            ) in points
        )
        return list(dict.fromkeys(runs))


def _relative_to(dataset: str | dict[str, Any], folder: Path) -> str | dict[str, Any]:
    """The dataset spec with a relative path read from `folder`."""
    if isinstance(dataset, dict):
        path = dataset.get("path")
        if isinstance(path, str) and not Path(path).is_absolute():
            return {**dataset, "path": str(folder / path)}
        return dataset
    if dataset == DEMO or Path(dataset).is_absolute():
        return dataset
    return str(folder / dataset)


# --- progress, records -------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentProgress:
    """A progress report: `stage` "ingest" (documents sent), "query" (queries done) or "done"."""

    run_id: str
    done: int
    total: int
    stage: str


def runs_dir(home: str | Path) -> Path:
    return Path(home) / RUNS_DIR


def _record_path(home: str | Path, run_id: str) -> Path:
    if not run_id or run_id.startswith(".") or Path(run_id).name != run_id:
        raise ValueError(f"run_id: {run_id!r} is not a run id")
    return runs_dir(home) / f"{run_id}.json"


def load_run(home: str | Path, run_id: str) -> dict[str, Any]:
    """The record of one run; FileNotFoundError when there is none."""
    path = _record_path(home, run_id)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no record of run {run_id!r}")
    return json.loads(path.read_text(encoding="utf-8"))


def list_runs(home: str | Path, experiment: str | None = None) -> list[dict[str, Any]]:
    """Every run record under `home` (of one experiment when named), oldest first."""
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(runs_dir(home).glob("*.json"))]
    if experiment is not None:
        records = [r for r in records if r["experiment"] == experiment]
    return sorted(records, key=lambda r: (r["created_at"], r["run_id"]))


# --- running -----------------------------------------------------------------------------------


class ExperimentClient(Protocol):
    """The part of `ragfleet.Client` an experiment uses."""

    def ingest(self, source: Any, *, index: str, spec: Any = None, progress: Any = None) -> Any: ...
    def search(
        self, query: str, *, index: str, top_k: int, retrievers: Any, fusion: Any, **options: Any
    ) -> Any: ...
    def search_batch(
        self, queries: list[str], *, index: str, top_k: int, retrievers: Any, fusion: Any, **options: Any
    ) -> Any: ...
    def ask(self, question: str, *, index: str, **options: Any) -> Any: ...
    def delete(self, *, index: str, drop_index: bool = False) -> Any: ...
    def describe_index(self, index: str) -> Any: ...
    def describe(self) -> Any: ...


Progress = Callable[[ExperimentProgress], None]


@contextmanager
def progress_display(enabled: bool = True) -> Iterator[Progress]:
    """A `Progress` callback that draws one bar for the run in progress and its stage."""
    with progress_bar(enabled=enabled) as bar:
        task = bar.add_task("experiment", total=None)

        def show(p: ExperimentProgress) -> None:
            bar.update(task, completed=p.done, total=p.total, description=f"{p.run_id} {p.stage}")

        yield show


@dataclass
class _QueryResult:
    """What one query through the pipeline gave."""

    passages: list[Any]
    answer: str | None
    retrieval_only: bool
    timings: dict[str, float]
    versions: list[Any]
    # The RerankReport of a reranked call.
    rerank: Any = None


@dataclass
class _Experiment:
    """The state shared by the runs of one `run_experiment` call."""

    client: ExperimentClient
    config: ExperimentConfig
    dataset: EvalDataset
    query_ids: list[str]
    metrics: list[str]
    home: Path
    progress: Progress | None
    experiment_id: str = field(init=False)

    def __post_init__(self) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        self.experiment_id = f"{_slug(self.config.name)}-{stamp}-{secrets.token_hex(2)}"

    def report(self, run_id: str, done: int, total: int, stage: str) -> None:
        if self.progress is not None:
            self.progress(ExperimentProgress(run_id, done, total, stage))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _metrics(config: ExperimentConfig, dataset: EvalDataset) -> list[str]:
    """The metrics to compute: the config's, checked against the dataset, or the kind's defaults."""
    if config.metrics is None:
        ir_metrics = list(IR_DEFAULT_METRICS) if dataset.qrels else []
        return [*QA_METRICS, *ir_metrics] if dataset.kind == "qa" else ir_metrics
    qa_asked = [m for m in config.metrics if m in QA_METRICS]
    if qa_asked and dataset.kind != "qa":
        raise ValueError(f"metrics: {qa_asked[0]!r} needs a QA dataset; {dataset.name!r} has no answers")
    if len(qa_asked) < len(config.metrics) and not dataset.qrels:
        raise ValueError(f"metrics: IR metrics need qrels; {dataset.name!r} has none (no contexts)")
    return list(dict.fromkeys(config.metrics))


def _check_fleet(client: ExperimentClient, runs: Sequence[RunConfig]) -> None:
    """Fails before any work when the sweep names retrievers or a reranker the fleet lacks."""
    described = client.describe()
    missing = sorted({name for run in runs for name in run.retrievers} - set(described.retrievers))
    if missing:
        raise ValueError(
            f"sweep.retrievers: the fleet has no {missing} (it has {list(described.retrievers)})"
        )
    if any(run.rerank for run in runs) and not described.reranker:
        raise ValueError("sweep.rerank: reranked runs, but the fleet has no reranker")


def _fingerprint(dataset: EvalDataset) -> str:
    digest = hashlib.sha256()
    for document in dataset.documents():
        digest.update(json.dumps(document, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def index_name(
    dataset: EvalDataset, settings: IngestSettings, retrievers: Sequence[str], fingerprint: str
) -> str:
    """`eval-<dataset>-<hash of the settings, the retrievers and the documents>`."""
    key = json.dumps(
        {
            "dataset": dataset.name,
            "settings": asdict(settings),
            "retrievers": sorted(retrievers),
            "docs": fingerprint,
        },
        sort_keys=True,
    )
    return f"eval-{_slug(dataset.name)[:60]}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:10]}"


def index_groups(runs: Sequence[RunConfig]) -> dict[IngestSettings, list[tuple[int, RunConfig]]]:
    """The runs (with their 1-based position in the sweep) by the index they share.

    A run joins the first index its settings agree with (`IngestSettings.joins`), so a sweep over
    `[bm25, dense, [dense, bm25]]` builds one index per chunking, not two.
    """
    groups: list[tuple[IngestSettings, list[tuple[int, RunConfig]]]] = []
    for position, run in enumerate(runs, start=1):
        for n, (settings, members) in enumerate(groups):
            joined = settings.joins(run.ingest)
            if joined is not None:
                groups[n] = (joined, [*members, (position, run)])
                break
        else:
            groups.append((run.ingest, [(position, run)]))
    return dict(groups)


def _choose_index(exp: _Experiment, shared: str, retrievers: list[str]) -> tuple[str, bool]:
    """(the index to search, whether it is complete already): `shared` when it exists in every one of
    `retrievers`, else one to build: `shared` when the experiment keeps it (a partial one dropped first),
    else a name of this experiment's own, which no concurrent experiment of the same settings reuses,
    or drops while this one searches it."""
    from ragfleet.errors import NotFound

    try:
        described = exp.client.describe_index(shared)
    except NotFound:
        described = None
    if described is not None and set(retrievers) <= {d.version.retriever for d in described.retrievers}:
        return shared, True
    if not exp.config.keep_index:
        return f"{shared}-{exp.experiment_id.rsplit('-', 1)[1]}", False
    if described is not None:
        exp.client.delete(index=shared, drop_index=True)
    return shared, False


def _ingest(
    exp: _Experiment, index: str, settings: IngestSettings, retrievers: list[str], run_id: str
) -> float:
    """Ingests the dataset's documents into `index`; returns the seconds it took."""
    documents = list(exp.dataset.documents())
    start = time.perf_counter()
    exp.client.ingest(
        documents,
        index=index,
        spec=settings.spec(retrievers),
        progress=lambda sent: exp.report(run_id, sent, len(documents), "ingest"),
    )
    return time.perf_counter() - start


def _drop(client: ExperimentClient, index: str) -> None:
    """Drops an index the experiment made. A failure is logged, not raised: it must neither hide the
    error that ended the experiment nor lose the runs after it."""
    from ragfleet.errors import NotFound

    try:
        client.delete(index=index, drop_index=True)
    except NotFound:
        pass
    except Exception as error:  # noqa: BLE001 - cleanup only
        logger.warning(
            "could not drop index %r (`ragfleet delete --index %s --drop` does): %s", index, index, error
        )


def _first_timings(timings: Iterable[Any]) -> dict[str, float]:
    """{stage: ms} of the pipeline stages in `timings`, the first timing of each name."""
    found: dict[str, float] = {}
    for timing in timings:
        if timing.stage in STAGES and timing.stage not in found:
            found[timing.stage] = float(timing.millis)
    return found


def _retrieval(run: RunConfig, index: str, depth: int) -> dict[str, Any]:
    """The search arguments for `depth` passages; a reranked run's are its best of `rerank_depth`
    (fewer when that is less)."""
    retrieval: dict[str, Any] = {"index": index, "retrievers": list(run.retrievers), "fusion": run.fusion}
    if run.rerank:
        reranked = run.rerank_depth or depth
        retrieval |= {"top_k": min(depth, reranked), "rerank": run.rerank_spec(reranked)}
    else:
        retrieval["top_k"] = depth
    return retrieval


def _search_result(run: RunConfig, response: Any, versions: Iterable[Any]) -> _QueryResult:
    return _QueryResult(
        passages=list(response.results),
        answer=None,
        retrieval_only=True,
        timings=_first_timings(response.timings),
        versions=list(versions),
        rerank=response.rerank if run.rerank else None,
    )


def _search(exp: _Experiment, run: RunConfig, index: str, texts: list[str], depth: int) -> list[_QueryResult]:
    """Each query's `depth` passages (see `_retrieval`): one `search` per query with a batch size of 1,
    else one `search_batch`, split in halves while the fleet refuses it as too large."""
    retrieval = _retrieval(run, index, depth)
    if exp.config.batch_size == 1:
        responses = [exp.client.search(text, **retrieval) for text in texts]
        return [_search_result(run, r, r.versions) for r in responses]
    return [
        _search_result(run, r, versions) for r, versions in search_in_halves(exp.client, texts, **retrieval)
    ]


def _ask(exp: _Experiment, run: RunConfig, index: str, text: str, top_k: int, generate: bool) -> _QueryResult:
    passages: list[Any] = []
    answer = rerank = None
    events = exp.client.ask(
        text,
        index=index,
        top_k=top_k,
        retrievers=list(run.retrievers),
        fusion=run.fusion,
        rerank=run.rerank_spec(run.rerank_depth or top_k) if run.rerank else None,
        generate=generate,
        params={"temperature": run.temperature},
    )
    for event in events:
        kind = event.WhichOneof("event")
        if kind in ("retrieved", "reranked"):
            passages = list(getattr(event, kind).passages)
            if kind == "reranked":
                rerank = event.reranked.rerank
        elif kind == "answer":
            answer = event.answer
    if answer is None:
        raise RuntimeError(f"the pipeline's answer stream ended without an answer (question {text!r})")
    return _QueryResult(
        passages=passages,
        answer=answer.text,
        retrieval_only=answer.retrieval_only,
        timings=_first_timings(answer.timings),
        versions=list(answer.versions),
        rerank=rerank,
    )


def _rerank_summary(reports: Sequence[Any]) -> dict[str, Any]:
    """What a run's RerankReports add up to (see the module docstring)."""
    return {
        "model_ids": sorted({r.model_id for r in reports if r.model_id}),
        "candidates": sum(r.candidates for r in reports),
        "truncated": sum(r.truncated for r in reports),
        "retrieval_weights": sorted({round(r.retrieval_weight, 4) for r in reports if r.model_id}),
    }


def _qa_scores(prediction: str, golds: list[str]) -> dict[str, float]:
    from services.evaluator.metrics.qa import V2, exact_match, f1_score, normalize_answer

    golds = [gold for gold in golds if normalize_answer(gold)] or [""]
    return {"exact_match": exact_match(prediction, golds), "f1": f1_score(prediction, golds, version=V2)}


def _latency(per_query: dict[str, dict[str, float]]) -> dict[str, Any]:
    stages = [stage for stage in (*STAGES, TOTAL) if any(stage in ms for ms in per_query.values())]
    mean = {
        stage: float(np.mean([ms[stage] for ms in per_query.values() if stage in ms])) for stage in stages
    }
    totals = [ms[TOTAL] for ms in per_query.values()]
    return {
        "per_query": per_query,
        "mean": mean,
        "p50_total": float(np.percentile(totals, 50)),
        "p99_total": float(np.percentile(totals, 99)),
    }


def _execute(
    exp: _Experiment, run: RunConfig, run_id: str, index: str, ingest_s: float | None
) -> dict[str, Any]:
    """Sends every query of one run through the pipeline and returns its record."""
    created_at = utc_now()
    dataset = exp.dataset
    ir_metrics = [m for m in exp.metrics if m not in QA_METRICS]
    qa_metrics = [m for m in exp.metrics if m in QA_METRICS]
    depth = max([run.top_k, *(_cutoff(m) for m in ir_metrics)])
    doc_run: dict[str, dict[str, float]] = {}
    per_query: dict[str, dict[str, float]] = {}
    latency: dict[str, dict[str, float]] = {}
    versions: set[tuple[str, str, int, str]] = set()
    reports: list[Any] = []
    retrieval_only = True
    size = exp.config.batch_size if dataset.kind == "ir" else 1
    for offset in range(0, len(exp.query_ids), size):
        qids = exp.query_ids[offset : offset + size]
        texts = [dataset.queries[qid] for qid in qids]
        start = time.perf_counter()
        if dataset.kind == "qa":
            results = [_ask(exp, run, index, texts[0], run.top_k, generate=True)]
        else:
            results = _search(exp, run, index, texts, depth)
        millis = (time.perf_counter() - start) * 1000.0 / len(qids)
        tails: list[list[Any]] = [[] for _ in qids]
        if run.rerank and dataset.kind == "ir" and (run.rerank_depth or depth) < depth:
            tails = [r.passages for r in _search(exp, replace(run, rerank=False), index, texts, depth)]
        for qid, result, tail in zip(qids, results, tails):
            latency[qid] = {**result.timings, TOTAL: millis}
            doc_run[qid] = ir.passages_to_docs([*result.passages, *tail])
            if result.rerank is not None:
                reports.append(result.rerank)
            versions |= {(v.index, v.retriever, v.version, v.model_id) for v in result.versions}
            retrieval_only = retrieval_only and result.retrieval_only
            per_query[qid] = _qa_scores(result.answer, dataset.answers[qid]) if qa_metrics else {}
        exp.report(run_id, offset + len(qids), len(exp.query_ids), "query")

    aggregate = {m: float(np.mean([per_query[qid][m] for qid in exp.query_ids])) for m in qa_metrics}
    qrels = {qid: dataset.qrels[qid] for qid in exp.query_ids if qid in dataset.qrels}
    if ir_metrics and qrels:
        ir_aggregate, ir_per_query = ir.evaluate_run(
            doc_run, qrels, [ir.pytrec_measure(m) for m in ir_metrics]
        )
        aggregate.update(ir_aggregate)
        for qid, values in ir_per_query.items():
            per_query[qid].update(values)
    return {
        "run_id": run_id,
        "experiment": exp.config.name,
        "created_at": created_at,
        "config": run.as_dict(),
        "dataset": {
            "name": dataset.name,
            "kind": dataset.kind,
            "queries": len(exp.query_ids),
            "skipped_documents": len(dataset.skipped_documents),
            "queries_without_qrels": len(dataset.queries_without_qrels),
        },
        "versions": [
            {"index": i, "retriever": r, "version": v, "model_id": m} for i, r, v, m in sorted(versions)
        ],
        "ingest_s": ingest_s,
        "aggregate": aggregate,
        "per_query": per_query,
        "latency_ms": _latency(latency),
        "retrieval_only": retrieval_only,
        "rerank": _rerank_summary(reports) if run.rerank else None,
    }


def run_experiment(
    client: ExperimentClient,
    config: ExperimentConfig,
    *,
    home: str | Path,
    progress: Progress | None = None,
) -> list[str]:
    """Runs every point of the sweep (see the module docstring); returns the run ids in the order run.

    Each record is written as soon as its run ends, so the runs before a failure are kept.
    """
    dataset = load_dataset(config.dataset)
    if config.index is None and not dataset.has_corpus:
        raise ValueError(f"dataset {dataset.name!r} has no documents to ingest; name an existing `index`")
    exp = _Experiment(
        client=client,
        config=config,
        dataset=dataset,
        query_ids=list(dataset.queries)[: config.max_queries],
        metrics=_metrics(config, dataset),
        home=Path(home),
        progress=progress,
    )
    runs = config.runs()
    if dataset.kind == "qa" and any(run.rerank and 0 < run.rerank_depth < run.top_k for run in runs):
        raise ValueError("sweep.rerank_depth: a QA run reranks at least its top_k passages (0: top_k)")
    _check_fleet(client, runs)
    groups = index_groups(runs)
    fingerprint = _fingerprint(dataset) if config.index is None else ""

    run_ids: list[str] = []
    for settings, members in groups.items():
        first_id = f"{exp.experiment_id}-{members[0][0]:02d}"
        retrievers = list(dict.fromkeys(name for _, run in members for name in run.retrievers))
        if config.index is not None:
            index, complete = config.index, True
        else:
            index, complete = _choose_index(
                exp, index_name(dataset, settings, retrievers, fingerprint), retrievers
            )
        try:
            ingest_s = None if complete else _ingest(exp, index, settings, retrievers, first_id)
            for position, run in members:
                run_id = f"{exp.experiment_id}-{position:02d}"
                record = _execute(exp, run, run_id, index, ingest_s)
                atomic_write_json(_record_path(exp.home, run_id), record)
                run_ids.append(run_id)
                exp.report(run_id, len(exp.query_ids), len(exp.query_ids), "done")
        finally:
            if config.index is None and not config.keep_index:
                _drop(client, index)
    return run_ids
