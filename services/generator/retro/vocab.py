"""Cutting a Retro checkpoint's vocabulary to the tokens of the texts it serves.

MiniLM's WordPiece vocabulary has 30,522 tokens. A model made for one corpus (the demo's) reads and
writes a few thousand of them, and at d_model 128 the unused rows of its tied embedding are most of its
bytes. `kept_token_ids` keeps the special tokens and every token of the given texts, in their original
order; `cut_weights` and `cut_config` slice the embedding (and an untied LM head) to those rows, and
`cut_tokenizer_files` is a WordPiece tokenizer of exactly those tokens, written into the checkpoint
folder, where the Generator finds it (`checkpoint_tokenizer`).

On the given texts the cut tokenizer yields the same tokens as the full one: WordPiece takes the longest
piece of its vocabulary at each step, every piece the full tokenizer took is kept, and the cut vocabulary
holds no piece the full one lacks. So the model sees the same inputs and computes the same logits over
the kept tokens; its softmax now runs over those alone. Text outside those texts may need a piece that
was cut, and such a word becomes [UNK].
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from services.generator.retro.data import encode, load_tokenizer

VOCAB_FILE = "vocab.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILES = (VOCAB_FILE, TOKENIZER_CONFIG_FILE)
# The rows of these parameters are token ids (the encoder and copy head hold the embedding as
# `encoder.embed.weight`, `copy.embed.weight` in a full state dict).
_VOCAB_ROWS = ("embed.weight", "lm_head.weight")
_SPECIAL = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def kept_token_ids(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> list[int]:
    """The special tokens' ids and those of every token of `texts`, ascending."""
    kept = set(tokenizer.all_special_ids)
    for text in texts:
        kept.update(encode(tokenizer, text))
    return sorted(kept)


def cut_tokenizer_files(tokenizer: PreTrainedTokenizerBase, kept: list[int]) -> dict[str, bytes]:
    """The files of a WordPiece tokenizer over the tokens `kept` (ids of `tokenizer`), in that order:
    `vocab.txt` and a `tokenizer_config.json` with `tokenizer`'s casing and special tokens.

    Raises ValueError naming `tokenizer` when it is not a WordPiece (BERT) tokenizer.
    """
    if type(tokenizer).__name__ not in ("BertTokenizer", "BertTokenizerFast"):
        raise ValueError(
            f"tokenizer: only a WordPiece (BERT) tokenizer can be cut, got {type(tokenizer).__name__}"
        )
    tokens = tokenizer.convert_ids_to_tokens(kept)
    init = tokenizer.init_kwargs
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": bool(init.get("do_lower_case", True)),
        "tokenize_chinese_chars": bool(init.get("tokenize_chinese_chars", True)),
        "strip_accents": init.get("strip_accents"),
        "model_max_length": int(tokenizer.model_max_length),
        **{name: str(getattr(tokenizer, name)) for name in _SPECIAL},
    }
    return {
        VOCAB_FILE: "".join(f"{token}\n" for token in tokens).encode(),
        TOKENIZER_CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }


def cut_weights(weights: dict[str, torch.Tensor], kept: list[int]) -> dict[str, torch.Tensor]:
    """`weights` (a Retro state dict) with the token rows of the embedding and LM head cut to `kept`."""
    index = torch.tensor(kept, dtype=torch.long)
    return {
        name: t.index_select(0, index) if name.endswith(_VOCAB_ROWS) else t for name, t in weights.items()
    }


def cut_config(config: dict, kept: list[int]) -> dict:
    """A Retro config dict for the cut vocabulary: its size and the pad token's new id."""
    return {**config, "vocab_size": len(kept), "pad_token_id": kept.index(config["pad_token_id"])}


def checkpoint_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer a Retro checkpoint folder holds (written by a vocabulary cut), or None."""
    if not (Path(folder) / TOKENIZER_CONFIG_FILE).is_file():
        return None
    return load_tokenizer(str(folder))
