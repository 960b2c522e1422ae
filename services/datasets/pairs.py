"""Training queries for the trainers: judged queries from a BEIR folder's qrels, pseudo-queries from a
corpus without queries, and the seeded sampling that caps how many a run uses.

- `beir_queries(folder, split)`: the split's queries with a relevant document (relevance > 0) in the
  corpus; the relevant documents are the positives and no document judged for the query is a negative.
  `judged_queries` is the same list by document id, for a trainer that keeps its own rows of the corpus.
- `cloze_corpus(documents, seed)`: a pseudo-query cut out of each document. A title of at least
  MIN_QUERY_WORDS words is the query and the document's text the positive: a title says what its document
  is about, as a query does, and title-to-text pairs are the usual weak supervision of a corpus without
  queries. A document without such a title gives the inverse cloze task of Lee et al. (2019): one sentence
  (picked by the seed, at least MIN_QUERY_WORDS words) is the query and the document without it the
  positive. Either way a model cannot learn to find the query verbatim, and the source document is never a
  negative. Titles teach a reranker more: on SciFact's corpus, a cross-encoder after 100 steps on titles
  (of a 150-step schedule) ranked the top 30 of 100 SciFact train claims at 0.64 nDCG@10 alone, one after
  100 steps on sentences (of a 300-step schedule) at 0.44. The corpus it gives back holds every document
  as cut, so that negatives mined and held-out queries searched in it are searched as a real query is,
  with no copy of the query to find (in the whole corpus bm25 finds a sentence's own document nearly
  always, and a weight tuned there says nothing of real queries). `inverse_cloze` is the same split of any
  list of texts.
- `sample(items, limit, seed)`: at most `limit` of them, a seeded choice kept in order.

Texts are what the retrievers index and the rerankers score: `document_text(title, text)`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from services.datasets.collections import EvalDataset, load_beir

MIN_QUERY_WORDS = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

T = TypeVar("T")


def document_text(title: str, text: str) -> str:
    """The title and the text, as the retrievers index them and the rerankers score them."""
    return f"{title} {text}" if title else text


def read_corpus(path: str | Path) -> dict[str, dict[str, Any]]:
    """A JSONL file's or BEIR folder's documents (`{"id", "title", "text"}`) by id, as `ragfleet ingest`
    reads them."""
    from ragfleet._common import iter_documents

    return {d.id: {"id": d.id, "title": d.title, "text": d.text} for d in iter_documents(path)}


def sample(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """All of `items` if there are at most `limit`, else `limit` of them drawn from `seed`, in order."""
    if limit is None or len(items) <= limit:
        return list(items)
    keep = np.random.default_rng(seed).choice(len(items), size=limit, replace=False)
    return [items[i] for i in sorted(keep.tolist())]


@dataclass(frozen=True)
class JudgedQuery:
    """A query of the qrels with at least one relevant document in the corpus."""

    text: str
    relevant: list[str]  # ids of the documents judged relevant (> 0) that the corpus holds, in qrels order
    judged: frozenset[str]  # ids of every document judged for the query


def judged_queries(data: EvalDataset) -> list[JudgedQuery]:
    """The queries of `data` that have a relevant document in its corpus, in query order."""
    found = []
    for qid, text in data.queries.items():
        judged = data.qrels[qid]
        relevant = [d for d, rel in judged.items() if rel > 0 and d in data.corpus]
        if relevant:
            found.append(JudgedQuery(text, relevant, frozenset(judged)))
    return found


class Cloze(NamedTuple):
    """An inverse-cloze pair cut from texts[source]: one of its sentences and the rest of it."""

    source: int
    query: str
    rest: str


def inverse_cloze(texts: Sequence[str], seed: int) -> list[Cloze]:
    """A pair from each text of two or more sentences with one of at least MIN_QUERY_WORDS words."""
    rng = np.random.default_rng(seed)
    found = []
    for source, text in enumerate(texts):
        sentences = [s for s in _SENTENCE_END.split(text.strip()) if s]
        usable = [i for i, s in enumerate(sentences) if len(s.split()) >= MIN_QUERY_WORDS]
        if len(sentences) < 2 or not usable:
            continue
        pick = usable[int(rng.integers(len(usable)))]
        found.append(Cloze(source, sentences[pick], " ".join(sentences[:pick] + sentences[pick + 1 :])))
    return found


@dataclass(frozen=True)
class Query:
    """A training query: its positive texts, the documents that must not be its negatives, and the
    documents of the corpus that count as its relevant ones when it validates a model."""

    text: str
    positives: list[str]
    exclude: frozenset[str]
    relevant: frozenset[str]


def beir_queries(folder: str | Path, split: str) -> tuple[dict[str, dict[str, Any]], list[Query]]:
    """The corpus of a BEIR folder and its `split` queries that have a relevant document in it."""
    data = load_beir(folder, split)
    queries = []
    for judged in judged_queries(data):
        positives = [document_text(data.corpus[d]["title"], data.corpus[d]["text"]) for d in judged.relevant]
        queries.append(Query(judged.text, positives, judged.judged, frozenset(judged.relevant)))
    return data.corpus, queries


def cloze_corpus(
    documents: dict[str, dict[str, Any]], seed: int
) -> tuple[dict[str, dict[str, Any]], list[Query]]:
    """A pseudo-query cut out of each document that has one, in the documents' order, and the documents
    with them cut out: a title of at least MIN_QUERY_WORDS words, else an inverse-cloze sentence. A
    query's positive is its cut document, which is its relevant one and never its negative."""
    cut = dict(documents)
    query_of: dict[str, str] = {}
    untitled = []
    for doc_id, doc in documents.items():
        if len(doc["title"].split()) < MIN_QUERY_WORDS:
            untitled.append(doc_id)
        elif doc["text"].strip():
            cut[doc_id] = {**doc, "title": ""}
            query_of[doc_id] = doc["title"]
    for source, query, rest in inverse_cloze([documents[d]["text"] for d in untitled], seed):
        cut[untitled[source]] = {**documents[untitled[source]], "text": rest}
        query_of[untitled[source]] = query
    return cut, [
        Query(query_of[d], [document_text(cut[d]["title"], cut[d]["text"])], frozenset([d]), frozenset([d]))
        for d in documents
        if d in query_of
    ]
