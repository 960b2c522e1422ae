"""Retrieval evaluation of a running fleet on a BEIR dataset (`ragfleet eval retrieval`).

`run_retrieval_eval` drives the Pipeline through the SDK client:

1. ingest the corpus into `index` (default `eval-<folder name>`), by default with each document as
   one passage (`{"chunking": {"whole_documents": True}}`), into just the retrievers being evaluated
   — unless `reuse_index`, which searches an index built earlier from the same corpus as it is;
2. for each retriever name, send every judged query of the split through `search_batch`, in batches
   — `"hybrid"` is dense + bm25 fused with RRF, any other name is that retriever alone;
3. turn each ranked passage list into document scores (`ir.passages_to_docs`: a document scores its
   best passage) and score the run with `ir.evaluate_run` (nDCG@10, Recall@100, MRR@10, averaged
   over all judged queries);
4. drop the index it ingested (an index given with `reuse_index` is left alone); when that fails,
   a warning names the index left behind and the results are still returned.

`top_k` counts passages; with whole documents that is also the number of documents per query.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.evaluator.beir import BeirDataset, iter_corpus, load_beir
from services.evaluator.metrics import ir
from services.evaluator.report import markdown_table as _table
from services.runtime.storage import atomic_write_json

HYBRID = "hybrid"
HYBRID_RETRIEVERS = ("dense", "bm25")
HYBRID_FUSION = "rrf"
DEFAULT_SPEC: dict[str, Any] = {"chunking": {"whole_documents": True}}
TIMINGS = "timings"

logger = logging.getLogger(__name__)


class PipelineClient(Protocol):
    """The part of `ragfleet.Client` the evaluation uses."""

    def ingest(
        self,
        source: Any,
        *,
        index: str,
        spec: Mapping[str, Any] | None = None,
        upsert: bool = False,
        batch_size: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> Any: ...

    def search_batch(
        self,
        queries: list[str],
        *,
        index: str,
        top_k: int = 10,
        retrievers: list[str] | None = None,
        fusion: str | None = None,
        candidates: int = 0,
    ) -> Any: ...

    def delete(self, *, index: str, drop_index: bool = True) -> Any: ...


def _search_args(name: str) -> tuple[list[str], str | None]:
    """The retrievers and fusion a retriever name stands for."""
    if name == HYBRID:
        return list(HYBRID_RETRIEVERS), HYBRID_FUSION
    return [name], None


def _backends(retrievers: Sequence[str]) -> list[str]:
    """The retriever backends the named retrievers search, each once, in order."""
    return list(dict.fromkeys(b for name in retrievers for b in _search_args(name)[0]))


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )


def _ingest(client: PipelineClient, dataset_dir: Path, index: str, spec: dict[str, Any], show: bool) -> float:
    """Ingests the corpus into a new index; returns the seconds it took."""
    documents = list(iter_corpus(dataset_dir))
    with _progress_bar(show) as bar:
        task = bar.add_task(f"ingest {index}", total=len(documents))
        start = time.perf_counter()
        # The client reports the number of documents sent so far.
        client.ingest(
            documents, index=index, spec=spec, progress=lambda sent: bar.update(task, completed=sent)
        )
        elapsed = time.perf_counter() - start
        bar.update(task, completed=len(documents))
    return elapsed


def _search(
    client: PipelineClient,
    dataset: BeirDataset,
    index: str,
    name: str,
    top_k: int,
    batch_size: int,
    show: bool,
) -> tuple[dict[str, dict[str, float]], float]:
    """Runs every query through one retriever; returns the document run and the seconds it took."""
    retrievers, fusion = _search_args(name)
    query_ids = list(dataset.queries)
    run: dict[str, dict[str, float]] = {}
    with _progress_bar(show) as bar:
        task = bar.add_task(f"search {name}", total=len(query_ids))
        start = time.perf_counter()
        for offset in range(0, len(query_ids), batch_size):
            batch = query_ids[offset : offset + batch_size]
            response = client.search_batch(
                [dataset.queries[q] for q in batch],
                index=index,
                top_k=top_k,
                retrievers=retrievers,
                fusion=fusion,
            )
            if len(response.responses) != len(batch):
                raise RuntimeError(
                    f"search_batch answered {len(response.responses)} of {len(batch)} queries ({name})"
                )
            for qid, answer in zip(batch, response.responses):
                run[qid] = ir.passages_to_docs(answer.results)
            bar.advance(task, len(batch))
        elapsed = time.perf_counter() - start
    return run, elapsed


def _drop(client: PipelineClient, index: str) -> None:
    """Drops the index the evaluation made. A failure is logged, not raised: it must neither discard
    the results nor hide the error that ended the evaluation."""
    try:
        client.delete(index=index, drop_index=True)
    except Exception as error:  # noqa: BLE001 - cleanup only
        logger.warning(
            "could not drop index %r (`ragfleet delete --index %s --drop` does): %s", index, index, error
        )


def default_index_name(dataset_dir: str | Path) -> str:
    """`eval-<folder name>`, with characters other than letters, digits, `_` and `-` as `-`."""
    return "eval-" + re.sub(r"[^A-Za-z0-9_-]+", "-", Path(dataset_dir).resolve().name)


def run_retrieval_eval(
    client: PipelineClient,
    dataset_dir: str | Path,
    *,
    split: str = "test",
    retrievers: Sequence[str] = ("dense", "bm25", HYBRID),
    index: str | None = None,
    top_k: int = 100,
    batch_size: int = 64,
    spec: Mapping[str, Any] | None = None,
    reuse_index: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, float | None]]:
    """Evaluates each retriever of a fleet on a BEIR split (see the module docstring).

    Returns `{retriever: {"ndcg@10", "recall@100", "mrr@10"}, "timings": {"ingest_s",
    "<retriever>_search_s", "<retriever>_qps"}}`; `ingest_s` is None with `reuse_index`.
    `spec` replaces the default index spec (whole documents); unless it names `retrievers`, the
    corpus is ingested into just the retrievers being evaluated.
    """
    retrievers = list(dict.fromkeys(retrievers))
    if not retrievers:
        raise ValueError("retrievers: name at least one retriever")
    if TIMINGS in retrievers:
        raise ValueError(f"retrievers: {TIMINGS!r} is not a retriever name")
    if top_k < 1 or batch_size < 1:
        raise ValueError("top_k and batch_size must be at least 1")
    dataset_dir = Path(dataset_dir)
    dataset = load_beir(dataset_dir, split)
    index = index or default_index_name(dataset_dir)
    index_spec = dict(DEFAULT_SPEC if spec is None else spec)
    index_spec.setdefault("retrievers", _backends(retrievers))

    timings: dict[str, float | None] = {"ingest_s": None}
    if not reuse_index:
        timings["ingest_s"] = _ingest(client, dataset_dir, index, index_spec, show=progress)
    results: dict[str, dict[str, float | None]] = {}
    try:
        for name in retrievers:
            run, seconds = _search(client, dataset, index, name, top_k, batch_size, progress)
            results[name], _ = ir.evaluate_run(run, dataset.qrels)
            timings[f"{name}_search_s"] = seconds
            timings[f"{name}_qps"] = len(dataset.queries) / seconds if seconds > 0 else None
    finally:
        if not reuse_index:
            _drop(client, index)
    results[TIMINGS] = timings
    return results


def write_results(results: Mapping[str, Any], json_path: str | Path) -> Path:
    """Writes the results of `run_retrieval_eval` as JSON, atomically (temporary file + rename)."""
    atomic_write_json(json_path, results)
    return Path(json_path)


def markdown_table(results: Mapping[str, Mapping[str, float | None]]) -> str:
    """One row per retriever: its metrics, search seconds and queries per second; then ingest time."""
    timings = results.get(TIMINGS, {})
    names = [name for name in results if name != TIMINGS]
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
    return table
