"""A tiny ColBERT checkpoint that tests write themselves: a 2-layer BERT over a small word vocabulary
plus a random projection, in the layout of colbert-ir/colbertv2.0 (what `ColbertEncoder.load` reads and
`ragfleet train colbert` writes).

A random BERT mixes every token with its context, so its rankings are noise. With `passthrough`, the
layers only normalise (attention and feed-forward outputs and the position embeddings are zero), so a
token's vector depends on its word alone and texts that share words match: retrieval tests can then
expect the passage a query was written for.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, BertTokenizer

WORDS = (
    "the a of is in and to with on for cell cells protein gene genes dna rna study cancer mouse human "
    "blood heart brain drug risk virus vaccine tumour growth patients therapy effect increase decrease "
    "paris tower river city music song football goal weather rain"
).split()
VOCAB = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *WORDS]
IDS = {token: i for i, token in enumerate(VOCAB)}
TINY_DIM = 16
TINY_METADATA: dict[str, Any] = {
    "query_maxlen": 32,
    "doc_maxlen": 220,
    "dim": TINY_DIM,
    "note": "kept on save",
}


def make_tiny_checkpoint(
    path: Path,
    *,
    metadata: dict[str, Any] | None = TINY_METADATA,
    pytorch_bin: bool = False,
    seed: int = 0,
    passthrough: bool = False,
) -> tuple[BertModel, torch.Tensor]:
    """Writes the checkpoint into the new folder `path`; returns (BertModel, linear weight (dim, hidden))."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    bert = BertModel(config, add_pooling_layer=False).eval()
    if passthrough:
        with torch.no_grad():
            bert.embeddings.position_embeddings.weight.zero_()
            bert.embeddings.token_type_embeddings.weight.zero_()
            for layer in bert.encoder.layer:
                for dense in (layer.attention.output.dense, layer.output.dense):
                    dense.weight.zero_()
                    dense.bias.zero_()
    linear = torch.randn(TINY_DIM, config.hidden_size)
    path.mkdir(parents=True)
    config.architectures = ["HF_ColBERT"]
    config.save_pretrained(path)
    BertTokenizer(vocab=IDS).save_pretrained(path)
    weights = {f"bert.{k}": v.contiguous() for k, v in bert.state_dict().items()}
    weights["linear.weight"] = linear
    if pytorch_bin:
        torch.save(weights, path / "pytorch_model.bin")
    else:
        save_file(weights, path / "model.safetensors")
    if metadata is not None:
        (path / "artifact.metadata").write_text(json.dumps(metadata))
    return bert, linear
