"""RETRO-fitting: a frozen pretrained Hugging Face causal LM given Retro's chunked cross-attention.

As in the RETRO paper, every weight of the base model is frozen; only the new parts train: a
`ChunkedCrossAttention` after each chosen decoder block (`RetroConfig.cca_layers`, every `cca_every`-th
from `cca_start`) and a `NeighbourEncoder` that embeds neighbours with the base model's (frozen) input
embedding and reads the hidden states leaving the first chosen block. The CCA modules are added to the
residual stream by forward hooks on the base model's blocks, so the base model's code runs unchanged.
Their output projections start at zero: a freshly retro-fitted model computes exactly the base model's
logits, and training moves away from it only as far as retrieval helps.

The base model is kept in eval mode (no dropout) whatever `train()` is called with: it is a fixed
feature extractor. There is no KV cache: every forward call recomputes the whole sequence (use
`RetroModel` for incremental decoding). A forward call is not re-entrant (the hooks read the call's
neighbours from the module). GPT-2-family checkpoints are tested; any causal LM whose blocks sit in one
`nn.ModuleList` of `num_hidden_layers` entries and return the hidden states first works the same way.

A checkpoint is a directory with `retrofit.json` (the base model's path and the RetroConfig) and
`retrofit.safetensors` (the trainable parameters only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from services.generator.retro.model import (
    ChunkedCrossAttention,
    Encoded,
    NeighbourEncoder,
    RetroConfig,
    RetroOutput,
    check_neighbours,
    encode_chunks,
    init_weights,
    load_parameters,
)
from services.runtime.artifacts import write_directory

CONFIG_FILE = "retrofit.json"
WEIGHTS_FILE = "retrofit.safetensors"
# RetroConfig fields that must describe the base model as it is.
BASE_FIELDS = ("vocab_size", "d_model", "n_layers")


def retro_config_for(base: PretrainedConfig, **overrides: Any) -> RetroConfig:
    """The RetroConfig for retro-fitting a model with config `base`; `overrides` set the Retro fields
    (chunk_size, num_neighbours, neighbour_len, cca_start, cca_every, encoder_layers, …)."""
    hidden = base.hidden_size
    pad = getattr(base, "pad_token_id", None)
    if pad is None:
        pad = getattr(base, "eos_token_id", None)
    derived = dict(
        vocab_size=base.vocab_size,
        d_model=hidden,
        n_layers=base.num_hidden_layers,
        n_heads=base.num_attention_heads,
        d_ff=getattr(base, "intermediate_size", None) or getattr(base, "n_inner", None) or 4 * hidden,
        max_seq_len=getattr(base, "max_position_embeddings", None) or RetroConfig.max_seq_len,
        pad_token_id=pad if isinstance(pad, int) else 0,
    )
    if overrides.get("copy_head"):
        raise ValueError("copy_head: a retro-fitted model keeps its base model's LM head")
    for name in BASE_FIELDS:
        if name in overrides and overrides[name] != derived[name]:
            raise ValueError(
                f"{name}: the base model has {derived[name]}, cannot be set to {overrides[name]}"
            )
    return RetroConfig.from_dict({**derived, **overrides})


def decoder_blocks(base: PreTrainedModel) -> nn.ModuleList:
    """The base model's list of decoder blocks (GPT-2: `transformer.h`)."""
    n_layers = base.config.num_hidden_layers
    found = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(found) != 1:
        raise ValueError(
            f"model: cannot tell its decoder blocks apart ({len(found)} module lists of {n_layers} entries)"
        )
    return found[0]


@dataclass
class _Call:
    """What the hooks of one forward call need and leave behind."""

    neighbours: torch.Tensor
    mask: torch.Tensor
    output_weights: bool
    encoded: torch.Tensor | None = None
    encoded_mask: torch.Tensor | None = None
    weights: torch.Tensor | None = None


class RetrofitModel(nn.Module):
    def __init__(self, base: PreTrainedModel, config: RetroConfig, base_path: str) -> None:
        super().__init__()
        if config.d_model != base.config.hidden_size or config.n_layers != base.config.num_hidden_layers:
            raise ValueError("config: d_model and n_layers must match the base model (use retro_config_for)")
        self.base = base.eval().requires_grad_(False)
        self.config = config
        self.base_path = base_path
        self.encoder = NeighbourEncoder(config, base.get_input_embeddings())
        self.cca = nn.ModuleDict({str(i): ChunkedCrossAttention(config) for i in config.cca_layers})
        for module in (self.cca, self.encoder.layers, self.encoder.embed_proj):
            module.apply(init_weights)
        for cca in self.cca.values():
            nn.init.zeros_(cca.attn.out_proj.weight)
        self.to(dtype=base.dtype, device=base.device)
        blocks = decoder_blocks(base)
        for i in config.cca_layers:
            blocks[i].register_forward_hook(self._hook(i))
        self._call: _Call | None = None

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str = "cpu", **retro_overrides: Any
    ) -> RetrofitModel:
        """Loads the causal LM at `path` (a local directory or hub id) and retro-fits it."""
        base_path = str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else str(path)
        base = AutoModelForCausalLM.from_pretrained(base_path).to(device)
        return cls(base, retro_config_for(base.config, **retro_overrides), base_path)

    def train(self, mode: bool = True) -> RetrofitModel:
        super().train(mode)
        self.base.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The CCA and neighbour-encoder parameters (the base model's, its embedding included, are frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    def _trainable_named(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def _hook(self, index: int):
        first, last = self.config.cca_layers[0], self.config.cca_layers[-1]

        def after_block(module: nn.Module, args: tuple, output: Any) -> Any:
            call = self._call
            if call is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            if index == first:
                call.encoded, call.encoded_mask = encode_chunks(
                    self.encoder, hidden, call.neighbours, call.mask, self.config.chunk_size
                )
            if call.encoded is None:
                return None
            cca, reads = self.cca[str(index)], Encoded(call.encoded, call.encoded_mask)
            if index == last and call.output_weights:
                call.weights = cca.neighbour_weights(hidden, reads)
            hidden = hidden + cca(hidden, reads)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return after_block

    def forward(
        self,
        input_ids: torch.LongTensor,
        neighbours: torch.LongTensor | None = None,
        *,
        neighbour_mask: torch.BoolTensor | None = None,
        output_neighbour_weights: bool = False,
    ) -> RetroOutput:
        """Same contract as `RetroModel.forward` without a cache."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids: expected a non-empty (batch, length) tensor, got {tuple(input_ids.shape)}"
            )
        b, n = input_ids.shape
        if n > self.config.max_seq_len:
            raise ValueError(f"input_ids: {n} tokens exceed max_seq_len {self.config.max_seq_len}")
        mask = check_neighbours(self.config, b, n, neighbours, neighbour_mask)
        self._call = None if neighbours is None else _Call(neighbours, mask, output_neighbour_weights)
        try:
            logits = self.base(input_ids=input_ids, use_cache=False).logits
            call = self._call
        finally:
            self._call = None
        weights = None if call is None else call.weights
        if weights is not None:
            weights = F.pad(weights, (0, 0, 0, -(-n // self.config.chunk_size) - weights.shape[1]))
        return RetroOutput(logits=logits, neighbour_weights=weights)

    def save(self, path: Path) -> None:
        """Writes `path`/retrofit.json and `path`/retrofit.safetensors (trainable parameters only)."""
        meta = {"base_path": self.base_path, "retro": self.config.to_dict()}
        weights = {name: p.detach().cpu().contiguous() for name, p in self._trainable_named().items()}
        write_directory(
            Path(path),
            {
                CONFIG_FILE: json.dumps(meta, indent=2, sort_keys=True).encode(),
                WEIGHTS_FILE: safetensors_bytes(weights),
            },
        )

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> RetrofitModel:
        """The base model from its recorded path, with the saved CCA and encoder parameters."""
        path = Path(path)
        meta = json.loads((path / CONFIG_FILE).read_text())
        model = cls.from_pretrained(meta["base_path"], device=device, **meta["retro"])
        load_parameters(model, model._trainable_named(), path / WEIGHTS_FILE)
        return model
