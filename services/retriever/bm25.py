"""BM25 backend on bm25s: English stopwords, PyStemmer's English stemmer, Lucene scoring.

bm25s builds a static score matrix and cannot add documents to it. This backend therefore keeps
each passage's token ids (in `tokens.npz`: rowids, offsets, token ids; vocabulary in `vocab.json`;
never pickle) and, on every change, tokenises only the new passages and rebuilds the score matrix
from the stored tokens. Deleting passages drops their rows before the rebuild. A rebuild is linear
in the corpus (SciFact's 5k documents take well under a second).

Queries with no token in the vocabulary match nothing; only passages with a positive score are
returned.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
import Stemmer

from services.retriever.backend import Backend, Hits, Query, passage_text
from services.retriever.passages import Passage
from services.runtime.settings import Settings

K1 = 0.9
B = 0.4
METHOD = "lucene"
TOKENS_FILE = "tokens.npz"
VOCAB_FILE = "vocab.json"


class BM25Backend(Backend):
    def __init__(self, spec: dict[str, Any], settings: Settings) -> None:
        self.spec = spec
        self._stopwords = settings.retriever.bm25_stopwords
        self._stemmer = Stemmer.Stemmer("english")
        self.vocab: dict[str, int] = {}
        self.rowids = np.zeros(0, dtype=np.int64)
        self.tokens: list[np.ndarray] = []
        self._bm25: bm25s.BM25 | None = None

    @classmethod
    def resolve_spec(cls, spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
        # One IndexSpec serves every retriever of an index: its dense-only fields (vector_store,
        # faiss_index, model) and colbert-only ones (colbert_model, nbits, doc_maxlen) are not for
        # bm25 and are ignored here.
        return {
            "k1": K1,
            "b": B,
            "method": METHOD,
            "stemmer": "english",
            "stopwords": settings.retriever.bm25_stopwords,
        }

    @classmethod
    def open(
        cls, directory: Path, spec: dict[str, Any], settings: Settings, version_dir: Path | None
    ) -> BM25Backend:
        backend = cls(spec, settings)
        if version_dir is not None:
            backend.vocab = json.loads((version_dir / VOCAB_FILE).read_text("utf-8"))
            with np.load(version_dir / TOKENS_FILE) as data:
                backend.rowids = data["rowids"]
                offsets = data["offsets"]
                token_ids = data["token_ids"]
                backend.tokens = [token_ids[a:b] for a, b in itertools.pairwise(offsets)]
            backend._rebuild()
        return backend

    @property
    def model_id(self) -> str:
        return f"bm25s-{self.spec['method']}(k1={self.spec['k1']},b={self.spec['b']})"

    @property
    def dimension(self) -> int:
        return 0

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(
            texts,
            stopwords=self._stopwords,
            stemmer=self._stemmer,
            return_ids=False,
            show_progress=False,
            allow_empty=False,
        )

    def add(self, rows: Sequence[tuple[int, Passage]]) -> None:
        if not rows:
            return
        new_tokens = []
        for words in self._tokenize([passage_text(p) for _, p in rows]):
            ids = [self.vocab.setdefault(w, len(self.vocab)) for w in words if w]
            new_tokens.append(np.asarray(ids, dtype=np.int32))
        self.rowids = np.concatenate([self.rowids, np.asarray([r for r, _ in rows], dtype=np.int64)])
        self.tokens += new_tokens
        self._rebuild()

    def remove(self, rowids: Sequence[int]) -> None:
        keep = ~np.isin(self.rowids, np.asarray(list(rowids), dtype=np.int64))
        self.rowids = self.rowids[keep]
        self.tokens = [t for t, k in zip(self.tokens, keep) if k]
        self._rebuild()

    def _rebuild(self) -> None:
        if not self.tokens:
            self._bm25 = None
            return
        bm25 = bm25s.BM25(k1=self.spec["k1"], b=self.spec["b"], method=self.spec["method"])
        # The empty token gets the id after the vocabulary so that empty passages index cleanly.
        vocab = dict(self.vocab)
        vocab[""] = len(vocab)
        corpus = [t.tolist() if len(t) else [vocab[""]] for t in self.tokens]
        bm25.index((corpus, vocab), create_empty_token=False, show_progress=False)
        self._bm25 = bm25

    def search(self, query: Query) -> list[Hits]:
        if self._bm25 is None:
            return [[] for _ in query.texts]
        mask = None
        if query.allowed is not None:
            mask = np.isin(self.rowids, np.fromiter(query.allowed, dtype=np.int64)).astype(np.float32)
        results: list[Hits] = []
        for words in self._tokenize(list(query.texts)):
            ids = [self.vocab[w] for w in words if w in self.vocab]
            if not ids:
                results.append([])
                continue
            scores = self._bm25.get_scores_from_ids(ids)
            if mask is not None:
                scores = scores * mask
            results.append(_top_k(self.rowids, scores, query.k))
        return results

    def save(self, version_dir: Path) -> dict[str, Any]:
        lengths = np.asarray([len(t) for t in self.tokens], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        token_ids = np.concatenate(self.tokens) if self.tokens else np.zeros(0, dtype=np.int32)
        with open(version_dir / TOKENS_FILE, "wb") as f:
            np.savez(f, rowids=self.rowids, offsets=offsets, token_ids=token_ids.astype(np.int32))
        (version_dir / VOCAB_FILE).write_text(json.dumps(self.vocab), "utf-8")
        return {"passages": len(self.rowids), "vocabulary": len(self.vocab)}


def _top_k(rowids: np.ndarray, scores: np.ndarray, k: int) -> Hits:
    positive = np.flatnonzero(scores > 0)
    if len(positive) > k:
        positive = positive[np.argpartition(-scores[positive], k - 1)[:k]]
    order = sorted(positive.tolist(), key=lambda i: (-float(scores[i]), int(rowids[i])))
    return [(int(rowids[i]), float(scores[i])) for i in order]
