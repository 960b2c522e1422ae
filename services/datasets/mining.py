"""Hard negatives mined through the running fleet, for the trainers (the reranker's, the mamba retriever's).

`prepare_index` ingests a training corpus into an index (whole documents, dense and bm25) unless it
exists; `mine_examples` searches each query `depth` deep in dense and in bm25 through the Pipeline (the
SDK's `search_batch`, `client` a `ragfleet.Client`) and gives one `Example` per (query, positive) whose
negatives are the best hits of the two lists taken in turn, never a document the query excludes nor one
of its positives. Queries with fewer than `negatives` such hits are left out.

`search_in_halves` is the one `search_batch` loop of the trainers and the evaluator: a batch the fleet
refuses as too large (RESOURCE_EXHAUSTED: its reply would pass `limits.max_reply_bytes`) is searched in
halves, down to single queries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from services.datasets.pairs import Query, document_text
from services.ui import progress_bar

MINED_RETRIEVERS = ("dense", "bm25")
# Queries per search_batch call while mining.
SEARCH_CHUNK = 256


@dataclass
class Example:
    """One group of a step: `texts` is the positive, then the negatives; `teacher` scores them."""

    query: str
    texts: list[str]
    teacher: list[float] | None = None


def prepare_index(client: Any, index: str, documents: Iterable[dict[str, Any]]) -> bool:
    """Ingests `documents` into `index` (whole documents, dense and bm25) unless it exists; returns
    whether it ingested."""
    import ragfleet

    try:
        client.describe_index(index)
        return False
    except ragfleet.errors.NotFound:
        pass
    spec = {"chunking": {"whole_documents": True}, "retrievers": list(MINED_RETRIEVERS)}
    client.ingest(list(documents), index=index, spec=spec)
    return True


def search_in_halves(client: Any, texts: Sequence[str], **retrieval: Any) -> list[tuple[Any, Any]]:
    """(response, the batch's versions) for each of `texts`, in order, from `client.search_batch(texts,
    **retrieval)`, searched in halves while the fleet refuses a batch as too large."""
    from ragfleet.errors import ResourceExhausted

    try:
        batch = client.search_batch(list(texts), **retrieval)
    except ResourceExhausted:
        if len(texts) == 1:
            raise
        half = len(texts) // 2
        return search_in_halves(client, texts[:half], **retrieval) + search_in_halves(
            client, texts[half:], **retrieval
        )
    if len(batch.responses) != len(texts):
        raise RuntimeError(f"search_batch answered {len(batch.responses)} of {len(texts)} queries")
    return [(response, batch.versions) for response in batch.responses]


def search_chunks(
    client: Any, index: str, texts: Sequence[str], *, retrievers: list[str], depth: int
) -> Iterator[list[Any]]:
    """The fleet's responses to `texts`, `depth` deep in `retrievers` (fused when several): at most
    SEARCH_CHUNK queries at a time (`search_in_halves`), each chunk's responses in order."""
    for start in range(0, len(texts), SEARCH_CHUNK):
        chunk = texts[start : start + SEARCH_CHUNK]
        found = search_in_halves(client, chunk, index=index, retrievers=retrievers, top_k=depth)
        yield [response for response, _ in found]


def mine_examples(
    client: Any, index: str, queries: Sequence[Query], *, depth: int, negatives: int, progress: bool
) -> list[Example]:
    """One example per (query, positive) with `negatives` hard negatives from dense and bm25 in turn."""
    hits: dict[str, list[list[tuple[str, str]]]] = {name: [] for name in MINED_RETRIEVERS}
    texts = [q.text for q in queries]
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("mining negatives", total=len(queries) * len(MINED_RETRIEVERS))
        for name in MINED_RETRIEVERS:
            for responses in search_chunks(client, index, texts, retrievers=[name], depth=depth):
                for response in responses:
                    hits[name].append(
                        [
                            (h.passage.doc_id, document_text(h.passage.title, h.passage.text))
                            for h in response.results
                        ]
                    )
                bar.update(task, advance=len(responses))
    examples = []
    for i, query in enumerate(queries):
        found: dict[str, str] = {}
        for pair in zip(*(hits[name][i] for name in MINED_RETRIEVERS)):
            for doc_id, text in pair:
                if doc_id not in query.exclude and text not in query.positives:
                    found.setdefault(doc_id, text)
        mined = list(found.values())[:negatives]
        if len(mined) == negatives:
            examples.extend(Example(query.text, [positive, *mined]) for positive in query.positives)
    return examples
