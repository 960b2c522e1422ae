"""Retro's data format: prompt alignment to chunk boundaries, answers, neighbours, chunks."""

from __future__ import annotations

import pytest

from services.generator.retro.data import (
    answer_ids,
    chunk_tokens,
    decode_answer,
    encode,
    end_of_answer_id,
    load_tokenizer,
    neighbour_ids,
    prompt_ids,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.mark.parametrize("chunk_size", [4, 16, 64])
def test_prompt_is_left_padded_to_a_chunk_boundary(tokenizer, chunk_size: int) -> None:
    question = "How tall is the highest peak on Braithas?"
    ids = prompt_ids(tokenizer, question, chunk_size)
    body = encode(tokenizer, f"question: {question} answer:")
    assert len(ids) % chunk_size == 0
    assert len(ids) - len(body) < chunk_size
    assert ids[len(ids) - len(body) :] == body
    assert set(ids[: len(ids) - len(body)]) <= {tokenizer.pad_token_id}
    assert tokenizer.cls_token_id not in ids and tokenizer.sep_token_id not in ids


def test_prompt_of_exactly_a_chunk_has_no_padding(tokenizer) -> None:
    body = encode(tokenizer, "question: who? answer:")
    assert prompt_ids(tokenizer, "who?", len(body)) == body


def test_answer_ends_with_the_terminator_and_decodes_back(tokenizer) -> None:
    ids = answer_ids(tokenizer, "4,500 metres")
    assert ids[-1] == end_of_answer_id(tokenizer) == tokenizer.sep_token_id
    assert decode_answer(tokenizer, ids + encode(tokenizer, "ignored after the end")) == "4,500 metres"
    assert decode_answer(tokenizer, encode(tokenizer, "Mount Braithas")) == "mount braithas"


@pytest.mark.parametrize("question", ["", "   ", "word " * 300])
def test_bad_questions_raise_naming_the_field(tokenizer, question: str) -> None:
    with pytest.raises(ValueError, match="^question: "):
        prompt_ids(tokenizer, question, 64)


def test_prompt_limit_is_configurable(tokenizer) -> None:
    question = "word " * 25  # 29 prompt tokens: 32 when padded to chunks of 8
    assert len(prompt_ids(tokenizer, question, 8, max_tokens=32)) == 32
    with pytest.raises(ValueError, match="question"):
        prompt_ids(tokenizer, question, 8, max_tokens=24)


def test_neighbour_is_passage_then_continuation_cut_or_padded(tokenizer) -> None:
    passage, continuation = "The lighthouse shows a red flash.", "Its keeper lives at its foot."
    full = encode(tokenizer, passage) + encode(tokenizer, continuation)
    long = neighbour_ids(tokenizer, passage, continuation, len(full) + 5)
    assert long == full + [tokenizer.pad_token_id] * 5
    assert neighbour_ids(tokenizer, passage, continuation, 6) == full[:6]
    alone = neighbour_ids(tokenizer, passage, "", 32)
    assert len(alone) == 32 and alone[: len(encode(tokenizer, passage))] == encode(tokenizer, passage)


def test_chunk_tokens() -> None:
    assert chunk_tokens(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_tokens([1, 2, 3, 4], 2) == [[1, 2], [3, 4]]
    assert chunk_tokens([], 4) == []
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_tokens([1], 0)
