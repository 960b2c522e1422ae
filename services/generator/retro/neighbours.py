"""Retro's neighbours for training: the Retro database behind a `Retrieval`, and the cache of what it found.

The database is an index of ~64-token passages built through the Retriever (`prepare_index`);
`PipelineRetrieval` searches it through a running fleet with the SDK, every hit with its continuation.
`search_blocks` turns the hits of many queries into neighbour token blocks (`data.neighbour_ids`:
passage + continuation, r tokens), leaving out hits from a given document per query. A training run
fetches the blocks once and keeps them in a `NeighbourCache` (`<out>/neighbours/<key>.npz`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from transformers import PreTrainedTokenizerBase

from services.generator.retro.data import neighbour_ids
from services.runtime.storage import atomic_write_bytes

RETRO_CHUNKING = {"chunk_tokens": 48, "overlap_tokens": 0}  # 48 words ≈ 64 WordPiece tokens
NEIGHBOURS_DIR = "neighbours"  # the cache, inside a training run's output folder


@dataclass(frozen=True)
class Hit:
    """A retrieved passage as a neighbour needs it."""

    doc_id: str
    text: str
    continuation: str


class Retrieval(Protocol):
    """The Retro database: `search` returns each query's hits, best first."""

    @property
    def fingerprint(self) -> str:
        """Changes whenever the database's content does (e.g. index versions)."""
        ...

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]: ...


class PipelineRetrieval:
    """Searches `index` through a running Pipeline (`ragfleet.Client`), with continuations."""

    def __init__(self, client: Any, index: str, retrievers: Sequence[str] | None = ("dense",)):
        self.client, self.index = client, index
        self.retrievers = list(retrievers) if retrievers else None

    @property
    def fingerprint(self) -> str:
        described = self.client.describe_index(self.index)
        versions = sorted(
            f"{r.version.retriever}@{r.version.version}"
            for r in described.retrievers
            if self.retrievers is None or r.version.retriever in self.retrievers
        )
        return f"{self.index}:{','.join(versions)}:{','.join(self.retrievers or ['all'])}"

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        found = self.client.search_batch(
            list(queries), index=self.index, top_k=top_k, retrievers=self.retrievers, with_continuation=True
        )
        return [
            [Hit(r.passage.doc_id, r.passage.text, r.continuation.text) for r in response.results]
            for response in found.responses
        ]


def prepare_index(client: Any, index: str, documents: Sequence[dict], retrievers: Sequence[str]) -> bool:
    """Ingests `documents` into `index` as Retro's ~64-token passages unless the index exists.

    Returns whether it ingested.
    """
    import ragfleet

    try:
        client.describe_index(index)
        return False
    except ragfleet.errors.NotFound:
        pass
    client.ingest(documents, index=index, spec={"chunking": RETRO_CHUNKING, "retrievers": list(retrievers)})
    return True


def _neighbour_block(tokenizer: PreTrainedTokenizerBase, hits: Sequence[Hit], k: int, r: int) -> np.ndarray:
    """(k, r) neighbour ids from the first k hits; missing ones are all pad (masked by the model)."""
    block = np.full((k, r), tokenizer.pad_token_id, np.int32)
    for i, hit in enumerate(hits[:k]):
        block[i] = neighbour_ids(tokenizer, hit.text, hit.continuation, r)
    return block


def search_blocks(
    tokenizer: PreTrainedTokenizerBase,
    retrieval: Retrieval,
    queries: list[str],
    exclude_docs: list[str | None],
    top_k: int,
    k: int,
    r: int,
    progress: Callable[[int, int], None] | None = None,
    batch: int = 64,
) -> np.ndarray:
    """(len(queries), k, r) neighbour blocks from the top `top_k` hits of each query, without the hits of
    `exclude_docs[i]`; a blank query (a chunk of only [SEP] and pads) gets none. `progress(done, total)`
    follows the queries asked."""
    blocks = np.full((len(queries), k, r), tokenizer.pad_token_id, np.int32)
    asked = [i for i, q in enumerate(queries) if q.strip()]
    for start in range(0, len(asked), batch):
        rows = asked[start : start + batch]
        for i, hits in zip(rows, retrieval.search([queries[i] for i in rows], top_k), strict=True):
            kept = [h for h in hits if h.doc_id != exclude_docs[i]]
            blocks[i] = _neighbour_block(tokenizer, kept, k, r)
        if progress:
            progress(start + len(rows), len(asked))
    return blocks


class NeighbourCache:
    """Neighbour blocks of every chunk and question, fetched once per key and kept in an npz file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.path.exists():
            return None
        with np.load(self.path, allow_pickle=False) as data:
            return data["chunks"], data["questions"]

    def save(self, chunks: np.ndarray, questions: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, chunks=chunks, questions=questions)
        atomic_write_bytes(self.path, buffer.getvalue())
