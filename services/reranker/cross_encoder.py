"""The cross-encoder backend: a sentence-transformers `CrossEncoder` scores each (query, passage) pair.

A checkpoint is a Hugging Face sequence-classification model with one output (a relevance score) and
its tokenizer, in a local folder or a hub id (offline with HF_HUB_OFFLINE=1); `ragfleet train
cross-encoder` writes one to <home>/models/cross-encoder. Anything else (a bi-encoder such as MiniLM
itself, a classifier with several labels, a causal LM) is refused rather than scored by a randomly
initialised head.

Truncation is counted, not silent: before scoring, each pair's full token count is compared with the
model's input length (`max_seq_length`), and the candidates over it are reported. `predict` scores in
batches of `reranker.batch_size` pairs (by default sized for the device: `RerankerSettings.pairs_per_batch`),
the pairs sorted by length so that a batch pads little; `rerank_many` puts the pairs of several calls
(concurrent calls the service batched) into the same batches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from services.reranker.backend import Ranking, RerankerModel, find_checkpoint, trained_retrieval_weight
from services.runtime.model_errors import ArtifactError
from services.runtime.settings import RerankerSettings


class CrossEncoderReranker(RerankerModel):
    DEFAULT_FOLDER = "cross-encoder"
    TRAIN_COMMAND = "ragfleet train cross-encoder"
    BATCHES_CALLS = True

    def __init__(self, model: object, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size

    @classmethod
    def configured_model(cls, settings: RerankerSettings) -> str | None:
        return settings.cross_encoder_model

    @classmethod
    def load(cls, name_or_path: str, settings: RerankerSettings) -> CrossEncoderReranker:
        from sentence_transformers import CrossEncoder

        found = find_checkpoint(name_or_path, ("ForSequenceClassification",), "a cross-encoder")
        labels = found.config.num_labels
        if labels != 1:
            raise ArtifactError(
                f"{name_or_path!r} is not a cross-encoder: it has {labels} labels, not one score"
            )
        try:
            model = CrossEncoder(found.path, device=settings.device, local_files_only=found.local_files_only)
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{name_or_path!r} cannot be loaded as a cross-encoder ({err})") from err
        model.eval()
        loaded = cls(model, settings.pairs_per_batch())
        loaded.retrieval_weight = trained_retrieval_weight(found.path)
        return loaded

    @property
    def max_length(self) -> int:
        return int(self.model.max_seq_length)

    def rerank(self, query: str, texts: Sequence[str]) -> Ranking:
        return self.rerank_many([(query, texts)])[0]

    def rerank_many(self, calls: Sequence[tuple[str, Sequence[str]]]) -> list[Ranking]:
        """The pairs of every call scored by one `predict`, in batches of `batch_size` pairs."""
        start = time.perf_counter()
        queries = [query for query, texts in calls for _ in texts]
        texts = [text for _, call_texts in calls for text in call_texts]
        encoded = self.model.tokenizer(queries, texts, truncation=False, verbose=False)
        lengths = np.array([len(ids) for ids in encoded["input_ids"]])
        too_long = lengths > self.max_length
        measured = time.perf_counter()
        # Pairs of like length share a batch, so a batch pads to little more than its own inputs.
        by_length = np.argsort(np.minimum(lengths, self.max_length), kind="stable")
        scores = np.empty(len(texts), dtype=np.float32)
        scores[by_length] = self.model.predict(
            [(queries[i], texts[i]) for i in by_length], batch_size=self.batch_size, show_progress_bar=False
        )
        scored = time.perf_counter()
        timings = [
            ("rerank.measure", (measured - start) * 1000),
            ("rerank.score", (scored - measured) * 1000),
        ]
        rankings, first = [], 0
        for _, call_texts in calls:
            end = first + len(call_texts)
            order = np.argsort(-scores[first:end], kind="stable")
            rankings.append(
                Ranking(
                    order=order.tolist(),
                    scores=scores[first:end][order].astype(float).tolist(),
                    truncated=int(too_long[first:end].sum()),
                    timings=timings,
                )
            )
            first = end
        return rankings
