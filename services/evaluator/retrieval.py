"""`ragfleet eval retrieval`: the experiment runner's preset for scoring retrievers on a BEIR split.

`run_retrieval_eval` runs one experiment (`experiments.run_experiment`) with one run per retriever
name — `"hybrid"` is dense + bm25 fused with RRF, `"a+b"` a and b fused (`"hybrid+seal"`: dense, bm25
and seal), any other name is that retriever alone — all
searching one index of whole documents (or of `chunk_tokens`-token chunks), every judged query asked
for `top_k` passages and scored with nDCG@10, Recall@100 and MRR@10 over all judged queries. Each
reranker backend named in `rerank` adds one run per retriever (the sweep's `rerank` dimension, on the
same index): the Pipeline reranks the retriever's best `rerank_depth` passages through the Reranker
(with the backend's checkpoint in `reranker_models`, else the Reranker's default) and the rest of the
list follows. The run records land under `<home>/runs` as every experiment's do (`ragfleet eval
report` reads them); what it returns sums them up as `{name: {metric: value}, "timings": {...},
"dataset": {...}}`, where a name is the retriever's, or `"<retriever>+<reranker>"` for a reranked run,
and "dataset" counts the queries asked, the documents the loader skipped (neither title nor text:
their judgements stay, so they count as misses) and the queries without qrels (not asked).

Queries go `batch_size` at a time through the Pipeline's SearchBatch (reranked runs too: the
Pipeline reranks each query's list on its own), which gives the same lists as one search per query,
several times faster; `batch_size=1` searches one query a call, timing each on its own.

`top_k` counts passages; with whole documents that is also the number of documents per query.

Leakage. A split may share documents with the one models were trained on (SciFact's train and test
do): a model can have memorised those documents as relevant. With `unseen_by` (a split of the same
folder), the summary also scores every run on the queries none of whose relevant documents is relevant
in that split, under `"unseen"`: `{name: {metric: value}, "queries": count, "by": split}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from services.datasets import beir
from services.evaluator import experiments
from services.evaluator.report import markdown_table as _table
from services.runtime.settings import GatewaySettings

HYBRID = "hybrid"
HYBRID_RETRIEVERS = ("dense", "bm25")
TIMINGS = "timings"
DATASET = "dataset"
UNSEEN = "unseen"
# Queries per SearchBatch: 64 queries of 100 whole SciFact documents (1.5 kB a scored passage on the wire,
# on average) make a reply of about 10 MB, under the fleet's 16 MiB default (limits.max_reply_bytes; a
# batch refused as larger is searched in halves).
BATCH_SIZE = 64
# The gateway's own rule for a chunk size given alone: its default overlap, at most a fifth of a window.
_DEFAULT_OVERLAP = GatewaySettings.model_fields["overlap_tokens"].default


def _retrievers_of(name: str) -> list[str]:
    """A run's retrievers: "hybrid" is dense + bm25, and "a+b" fuses a and b ("hybrid+seal" is dense,
    bm25 and seal)."""
    return [r for part in name.split("+") for r in (HYBRID_RETRIEVERS if part == HYBRID else (part,))]


def _name_of(config: Mapping[str, Any]) -> str:
    """A run's name in the summary: its retriever's, then `+<reranker>` when it reranks."""
    retrievers = config["retrievers"]
    name = HYBRID if tuple(retrievers) == HYBRID_RETRIEVERS else "+".join(retrievers)
    rerank = config.get("rerank")
    if not rerank:
        return name
    return f"{name}+{'rerank' if rerank is True else rerank}"


def reranker_models(items: Sequence[str]) -> dict[str, str]:
    """`{backend: checkpoint}` from BACKEND=PATH_OR_ID items (`--reranker-model`). A path that exists
    here is made absolute, since the Reranker need not run in this working directory."""
    models: dict[str, str] = {}
    for item in items:
        backend, sep, model = (part.strip() for part in item.partition("="))
        if not sep or not backend or not model:
            raise ValueError(f"reranker_models: expected BACKEND=PATH_OR_ID, got {item!r}")
        path = Path(model).expanduser()
        models[backend] = str(path.resolve()) if path.exists() else model
    return models


def retrieval_experiment(
    dataset_dir: str | Path,
    *,
    split: str = "test",
    retrievers: Sequence[str] = ("dense", "bm25", HYBRID),
    top_k: int = 100,
    chunk_tokens: int | None = None,
    vector_store: str | None = None,
    colbert_model: str | None = None,
    mamba_model: str | None = None,
    seal_model: str | None = None,
    index: str | None = None,
    keep_index: bool = False,
    rerank: Sequence[str] = (),
    rerank_depth: int = 30,
    reranker_models: Mapping[str, str] | None = None,
    retrieval_weight: float | None = None,
    batch_size: int = BATCH_SIZE,
) -> experiments.ExperimentConfig:
    """The experiment behind `ragfleet eval retrieval` (see the module docstring); `index` names an
    existing index to search instead of ingesting the corpus."""
    retrievers = list(dict.fromkeys(retrievers))
    if not retrievers:
        raise ValueError("retrievers: name at least one retriever")
    for reserved in (TIMINGS, DATASET):
        if reserved in retrievers:
            raise ValueError(f"retrievers: {reserved!r} is not a retriever name")
    rerank = list(dict.fromkeys(rerank))
    if rerank_depth < 1:
        raise ValueError(f"rerank_depth: must be at least 1, got {rerank_depth}")
    sweep: dict[str, Any] = {
        "retrievers": [_retrievers_of(name) for name in retrievers],  # fused with RRF, the default
        "top_k": top_k,
        "whole_documents": chunk_tokens is None,
        "rerank": [False, *rerank],
        "rerank_depth": rerank_depth,
    }
    if chunk_tokens is not None:
        sweep["chunk_tokens"] = chunk_tokens
        sweep["overlap_tokens"] = max(1, min(_DEFAULT_OVERLAP, chunk_tokens // 5))
    if vector_store:
        sweep["vector_store"] = vector_store
    if colbert_model:
        sweep["colbert_model"] = colbert_model
    if mamba_model:
        sweep["mamba_model"] = mamba_model
    if seal_model:
        sweep["seal_model"] = seal_model
    dataset_dir = Path(dataset_dir)
    return experiments.ExperimentConfig(
        name=f"retrieval-{dataset_dir.resolve().name}",
        dataset={"kind": "beir", "path": str(dataset_dir), "split": split},
        sweep=sweep,
        index=index,
        keep_index=keep_index,
        reranker_models=dict(reranker_models or {}),
        retrieval_weight=retrieval_weight,
        batch_size=batch_size,
    )


def unseen_queries(folder: str | Path, split: str, by: str) -> list[str]:
    """The `split` queries none of whose relevant documents is relevant to a query of split `by`."""
    seen = {doc for judged in beir.load_qrels(folder, by).values() for doc, rel in judged.items() if rel > 0}
    qrels = beir.load_qrels(folder, split)
    return [qid for qid, judged in qrels.items() if not {d for d, rel in judged.items() if rel > 0} & seen]


def summary(
    records: Sequence[Mapping[str, Any]], unseen: tuple[str, Sequence[str]] | None = None
) -> dict[str, Any]:
    """`{name: aggregate metrics, "timings": {"ingest_s", "<name>_search_s", "<name>_qps"}, "dataset":
    {"queries", "skipped_documents", "queries_without_qrels"}}` of the runs' records (a name as in the
    module docstring); `ingest_s` is None when no index was built. With `unseen` (the split `by` and
    its `unseen_queries`), also the metrics' means over those queries under "unseen"."""
    results: dict[str, Any] = {}
    timings: dict[str, float | None] = {"ingest_s": records[0]["ingest_s"] if records else None}
    for record in records:
        name = _name_of(record["config"])
        results[name] = {m: record["aggregate"][m] for m in experiments.IR_DEFAULT_METRICS}
        seconds = sum(ms["total"] for ms in record["latency_ms"]["per_query"].values()) / 1000.0
        timings[f"{name}_search_s"] = seconds
        timings[f"{name}_qps"] = record["dataset"]["queries"] / seconds if seconds > 0 else None
    results[TIMINGS] = timings
    if records:
        counted = ("queries", "skipped_documents", "queries_without_qrels")
        results[DATASET] = {key: records[0]["dataset"][key] for key in counted}
    if unseen is not None:
        by, judged = unseen
        asked = records[0]["per_query"] if records else {}
        qids = [q for q in judged if q in asked]  # max_queries may have asked only some
        subset: dict[str, Any] = {"by": by, "queries": len(qids)}
        for record in records:
            per_query = record["per_query"]
            subset[_name_of(record["config"])] = {
                m: sum(per_query[q][m] for q in qids) / len(qids) if qids else None
                for m in experiments.IR_DEFAULT_METRICS
            }
        results[UNSEEN] = subset
    return results


def run_retrieval_eval(
    client: experiments.ExperimentClient,
    config: experiments.ExperimentConfig,
    *,
    home: str | Path,
    unseen_by: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs a `retrieval_experiment` and returns its `summary` (with the `unseen_by` split's unseen
    queries scored apart, see the module docstring)."""
    unseen = None
    if unseen_by is not None:
        dataset = config.dataset
        if not isinstance(dataset, dict) or dataset.get("kind") != "beir":
            raise ValueError("unseen_by: needs the experiment of a BEIR folder (retrieval_experiment)")
        unseen = (unseen_by, unseen_queries(dataset["path"], dataset["split"], unseen_by))
    with experiments.progress_display(progress) as show:
        run_ids = experiments.run_experiment(client, config, home=home, progress=show)
    return summary([experiments.load_run(home, run_id) for run_id in run_ids], unseen)


def markdown_table(results: Mapping[str, Mapping[str, float | None]]) -> str:
    """One row per run (retriever, reranked or not): its metrics, search seconds and queries per second;
    then ingest time and what the loader left out."""
    timings = results.get(TIMINGS, {})
    names = [name for name in results if name not in (TIMINGS, DATASET, UNSEEN)]
    metrics = list(dict.fromkeys(key for name in names for key in results[name]))
    rows = [
        {
            "retriever": name,
            **results[name],
            "search s": timings.get(f"{name}_search_s"),
            "QPS": timings.get(f"{name}_qps"),
        }
        for name in names
    ]
    table = _table(rows, ["retriever", *metrics, "search s", "QPS"])
    if timings.get("ingest_s") is not None:
        table += f"\n\ningest: {timings['ingest_s']:.1f} s"
    counts = results.get(DATASET)
    if counts:
        table += (
            f"\n\nqueries: {counts['queries']:.0f} asked, {counts['queries_without_qrels']:.0f} without "
            "qrels not asked; documents with neither title nor text skipped: "
            f"{counts['skipped_documents']:.0f} (where judged, misses)"
        )
    unseen = results.get(UNSEEN)
    if unseen:
        rows = [{"retriever": name, **unseen[name]} for name in names]
        table += (
            f"\n\nthe {unseen['queries']} queries whose relevant documents are never relevant in "
            f"{unseen['by']}:\n\n" + _table(rows, ["retriever", *metrics])
        )
    return table
