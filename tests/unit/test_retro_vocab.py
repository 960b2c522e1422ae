"""A Retro checkpoint's vocabulary cut to the tokens of some texts (`retro.vocab`): the cut tokenizer
reads those texts as the full one does, under the new ids; the embedding and an untied LM head keep
exactly the kept rows; a tokenizer that is not WordPiece is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from services.generator.retro.data import encode, load_tokenizer
from services.generator.retro.model import RetroConfig, RetroModel
from services.generator.retro.vocab import (
    checkpoint_tokenizer,
    cut_config,
    cut_tokenizer_files,
    cut_weights,
    kept_token_ids,
)
from services.runtime.artifacts import write_directory
from tests.unit.test_retro_model import tiny_config

TEXTS = ["The lighthouse of Daikra flashes green every 7 seconds.", "question: who keeps it? answer:"]


def test_the_cut_tokenizer_reads_the_texts_as_the_full_one(tmp_path: Path) -> None:
    full = load_tokenizer()
    kept = kept_token_ids(full, TEXTS)
    assert kept == sorted(kept) and set(full.all_special_ids) <= set(kept)
    write_directory(tmp_path, cut_tokenizer_files(full, kept))
    cut = checkpoint_tokenizer(tmp_path)
    assert cut is not None and len(cut) == len(kept)
    for text in TEXTS:
        assert encode(cut, text) == [kept.index(i) for i in encode(full, text)]
    assert [kept[i] for i in (cut.pad_token_id, cut.sep_token_id, cut.unk_token_id)] == [
        full.pad_token_id,
        full.sep_token_id,
        full.unk_token_id,
    ]
    assert checkpoint_tokenizer(tmp_path / "elsewhere") is None


def test_the_embedding_and_an_untied_head_keep_the_kept_rows() -> None:
    config = tiny_config(vocab_size=12, pad_token_id=2, tie_embeddings=False)
    model = RetroModel(config)
    kept = [0, 2, 5, 11]
    state = model.state_dict()
    weights = cut_weights(state, kept)
    for name in ("embed.weight", "lm_head.weight"):
        torch.testing.assert_close(weights[name], state[name][kept])
    assert weights["norm.weight"] is state["norm.weight"]
    cut = cut_config(config.to_dict(), kept)
    assert (cut["vocab_size"], cut["pad_token_id"]) == (4, 1)
    RetroModel(RetroConfig.from_dict(cut)).load_state_dict(weights)


def test_a_tokenizer_that_is_not_wordpiece_is_refused() -> None:
    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])))
    with pytest.raises(ValueError, match="tokenizer: only a WordPiece"):
        cut_tokenizer_files(bpe, [0, 1])
