"""Retro's training rows: token windows with labels and the neighbours of each of their chunks.

Documents are tokenised (`retro.data`), each ended by [SEP] and cut into chunks of m tokens inside the
document (its last chunk is padded; pads are never predicted). Consecutive chunks make windows of
`seq_len` tokens. Every chunk is a query to the Retro database; its top hits, **excluding passages of the
chunk's own document** as RETRO does (held-out documents always; training ones unless
`exclude_own_document` is off), become its k neighbours. Optional question/answer pairs add rows laid out
as served (`data.prompt_ids` + `data.answer_ids`, loss on the answer only) whose every chunk has the
question's top hits as neighbours, its own document included: the Pipeline hands the Generator the
passages it retrieved for the question. The neighbours are cached (`neighbours.NeighbourCache`), keyed by
the database, the chunks, the questions and the layout, so a resumed or repeated run does not search again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from services.generator.retro.data import answer_ids, chunk_tokens, encode, end_of_answer_id, prompt_ids
from services.generator.retro.model import RetroConfig
from services.generator.retro.neighbours import NeighbourCache, Retrieval, search_blocks

IGNORE = -100  # label of positions that are not predicted


@dataclass
class Examples:
    """Fixed-length examples: tokens and labels (N, seq_len), neighbours (N, seq_len / m, k, r)."""

    tokens: np.ndarray
    labels: np.ndarray
    neighbours: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(self.tokens[rows]).long(),
            torch.from_numpy(self.labels[rows]).long(),
            torch.from_numpy(self.neighbours[rows]).long(),
        )

    @staticmethod
    def concat(parts: Sequence[Examples], seq_len: int, k: int, r: int) -> Examples:
        parts = [p for p in parts if len(p)]
        if not parts:
            empty = np.zeros((0, seq_len), np.int32)
            return Examples(empty, empty.copy(), np.zeros((0, 0, k, r), np.int32))
        return Examples(
            *(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Examples))
        )


@dataclass
class _Chunk:
    doc_id: str
    ids: list[int]  # exactly m tokens, pads at the end of a document's last chunk
    labels: list[int]


def _document_chunks(tokenizer: PreTrainedTokenizerBase, doc: dict, m: int) -> list[_Chunk]:
    ids = encode(tokenizer, doc["text"]) + [end_of_answer_id(tokenizer)]
    pad = tokenizer.pad_token_id
    return [
        _Chunk(doc["id"], piece + [pad] * (m - len(piece)), piece + [IGNORE] * (m - len(piece)))
        for piece in chunk_tokens(ids, m)
    ]


def _split_documents(documents: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded `fraction` of the documents (at least one when fraction > 0)."""
    if fraction == 0 or len(documents) < 2:
        return list(documents), []
    order = np.random.default_rng(seed).permutation(len(documents))
    held = set(order[: max(1, round(fraction * len(documents)))].tolist())
    return (
        [d for i, d in enumerate(documents) if i not in held],
        [d for i, d in enumerate(documents) if i in held],
    )


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def build_examples(
    tokenizer: PreTrainedTokenizerBase,
    retrieval: Retrieval,
    documents: Sequence[dict],
    qa: Sequence[tuple[str, str]],
    config: RetroConfig,
    *,
    seq_len: int,
    eval_fraction: float,
    seed: int,
    extra_hits: int,
    exclude_own_document: bool,
    cache_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Examples, Examples, dict[str, Any]]:
    """(train examples, held-out LM examples, data summary) of `documents` (dicts with "id" and "text") and
    `qa` pairs; a seeded `eval_fraction` of the documents is held out. Chunks search `extra_hits` beyond k,
    so hits from their own document can be dropped. Neighbours come from `retrieval` (`progress(done,
    total)` follows the searches) or the cache in `cache_dir`."""
    m, k, r, n = config.chunk_size, config.num_neighbours, config.neighbour_len, seq_len
    train_docs, eval_docs = _split_documents(documents, eval_fraction, seed)
    splits = [
        [c for d in docs for c in _document_chunks(tokenizer, d, m)] for docs in (train_docs, eval_docs)
    ]
    chunks = splits[0] + splits[1]
    prompts, skipped = [], 0
    for question, answer in qa:
        ids = prompt_ids(tokenizer, question, m)
        target = answer_ids(tokenizer, answer)
        if len(ids) + len(target) > n:
            skipped += 1
            continue
        prompts.append((question, ids, target))

    key = _sha(
        {
            "retrieval": retrieval.fingerprint,
            "tokenizer": tokenizer.name_or_path,
            "layout": [m, k, r, extra_hits, exclude_own_document],
            "chunks": _sha([(c.doc_id, c.ids) for c in chunks]),
            "questions": _sha([q for q, _, _ in prompts]),
        }
    )
    cache = NeighbourCache(cache_dir / f"{key[:24]}.npz")
    cached = cache.load()
    if cached is None:
        excluded = [c.doc_id if exclude_own_document else None for c in splits[0]]
        chunk_blocks = search_blocks(
            tokenizer,
            retrieval,
            [tokenizer.decode(c.ids, skip_special_tokens=True) for c in chunks],
            excluded + [c.doc_id for c in splits[1]],
            k + extra_hits,
            k,
            r,
            progress,
        )
        question_blocks = search_blocks(
            tokenizer, retrieval, [q for q, _, _ in prompts], [None] * len(prompts), k, k, r, progress
        )
        cache.save(chunk_blocks, question_blocks)
    else:
        chunk_blocks, question_blocks = cached

    per_window = n // m
    pad = tokenizer.pad_token_id
    lm = []
    offset = 0
    for split in splits:
        windows = len(split) // per_window
        rows = range(offset, offset + windows * per_window)
        tokens = np.array([chunks[i].ids for i in rows], np.int32).reshape(windows, n)
        labels = np.array([chunks[i].labels for i in rows], np.int32).reshape(windows, n)
        neighbours = chunk_blocks[offset : offset + windows * per_window].reshape(windows, per_window, k, r)
        lm.append(Examples(tokens, labels, neighbours))
        offset += len(split)

    qa_tokens = np.full((len(prompts), n), pad, np.int32)
    qa_labels = np.full((len(prompts), n), IGNORE, np.int32)
    for row, (_, ids, target) in enumerate(prompts):
        qa_tokens[row, : len(ids) + len(target)] = ids + target
        qa_labels[row, len(ids) : len(ids) + len(target)] = target
    qa_neighbours = np.repeat(question_blocks[:, None], per_window, axis=1)

    train = Examples.concat([lm[0], Examples(qa_tokens, qa_labels, qa_neighbours)], n, k, r)
    if len(train) == 0:
        raise ValueError(f"seq_len: the corpus has no window of {n} tokens and there are no QA examples")
    summary = {
        "documents": len(train_docs),
        "held_out_documents": len(eval_docs),
        "lm_windows": len(lm[0]),
        "eval_windows": len(lm[1]),
        "qa_examples": len(prompts),
        "qa_skipped_too_long": skipped,
        "neighbour_cache": cache.path.name,
        "neighbours_cached": cached is not None,
    }
    return train, lm[1], summary
