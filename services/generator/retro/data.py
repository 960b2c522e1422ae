"""Retro's data format: the tokenizer, the prompt layout, neighbours and chunks, shared by training
(`retro.examples`), decoding (`retro.decode`) and the demo, so the model is served exactly as it was trained.

Tokens are WordPiece ids of MiniLM's tokenizer (bert-base-uncased vocabulary, offline) unless a path to
another Hugging Face tokenizer is given. No [CLS] is used; the tokenizer's pad id pads.

* A **prompt** is the tokens of ``"question: {q} answer:"``, LEFT-padded to a multiple of the chunk size
  m. The answer therefore starts on a chunk boundary: the prompt's last chunk ends at position u·m+m−1,
  and in RETRO's alignment every token from there on is conditioned by the neighbours of the prompt
  chunks. Every prompt chunk's neighbours are the passages retrieved for the question (the Pipeline's top
  passages, in rank order).
* An **answer** is its tokens followed by the tokenizer's [SEP] as end-of-answer; the decoder stops when it
  emits [SEP] (`end_of_answer_id`).
* A **neighbour** is a retrieved passage's tokens followed by its continuation's (the next passage of
  the same document), cut or right-padded to r tokens, as in RETRO's [N, F].
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.runtime.models import resolve_model

PROMPT_TEMPLATE = "question: {question} answer:"
# The padded prompt may hold at most this many tokens: room is left for the answer in the sequence.
MAX_PROMPT_TOKENS = 256

# WordPiece decoding puts a space after every punctuation mark, so "4,500" comes back as "4, 500";
# digits around a comma or point with no space in the source are rejoined.
_SPLIT_NUMBER = re.compile(r"(?<=\d)([,.]) (?=\d)")


def load_tokenizer(name_or_path: str = "all-MiniLM-L6-v2") -> PreTrainedTokenizerBase:
    """MiniLM's WordPiece tokenizer (shipped offline), or any Hugging Face tokenizer by path or id."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token_id is None or tokenizer.sep_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r}: Retro needs a pad token and a [SEP] token")
    return tokenizer


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` without special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_answer_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends an answer ([SEP]); the decoder stops on it."""
    return tokenizer.sep_token_id


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, question: str, chunk_size: int, *, max_tokens: int = MAX_PROMPT_TOKENS
) -> list[int]:
    """The prompt for `question`, left-padded with pad ids to a multiple of `chunk_size` (module docstring).

    Raises ValueError naming `question` when it is empty or its padded prompt exceeds `max_tokens`.
    """
    if not question.strip():
        raise ValueError("question: must not be empty")
    ids = encode(tokenizer, PROMPT_TEMPLATE.format(question=question.strip()))
    padded = -(-len(ids) // chunk_size) * chunk_size
    if padded > max_tokens:
        raise ValueError(
            f"question: too long ({len(ids)} prompt tokens; at most {max_tokens // chunk_size * chunk_size})"
        )
    return [tokenizer.pad_token_id] * (padded - len(ids)) + ids


def answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """The training target after a prompt: the answer's tokens then end-of-answer."""
    return encode(tokenizer, " " + answer.strip()) + [end_of_answer_id(tokenizer)]


def decode_answer(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Text of generated answer ids: up to the first end-of-answer, special tokens dropped."""
    end = end_of_answer_id(tokenizer)
    ids = list(ids)
    if end in ids:
        ids = ids[: ids.index(end)]
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return _SPLIT_NUMBER.sub(r"\1", text).strip()


def neighbour_ids(tokenizer: PreTrainedTokenizerBase, text: str, continuation: str, length: int) -> list[int]:
    """A neighbour: `text`'s tokens then `continuation`'s, cut or right-padded (pad id) to `length`."""
    ids = encode(tokenizer, text)
    if continuation:
        ids += encode(tokenizer, continuation)
    ids = ids[:length]
    return ids + [tokenizer.pad_token_id] * (length - len(ids))


def chunk_tokens(ids: Sequence[int], chunk_size: int) -> list[list[int]]:
    """Consecutive chunks of `chunk_size` ids; the last may be shorter."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: must be positive, got {chunk_size}")
    return [list(ids[i : i + chunk_size]) for i in range(0, len(ids), chunk_size)]
