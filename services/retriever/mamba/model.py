"""The Mamba bi-encoder: Mamba-1 blocks in the Hugging Face `MambaModel` layout, and text embeddings.

A block is RMSNorm -> in-projection (to the SSM input x and the gate z) -> causal depthwise conv ->
SiLU -> selective scan (`ragfleet_kernels.selective_scan`, input-dependent delta, B, C; A = -exp(A_log); the
skip D; gated by SiLU(z)) -> out-projection, added to the residual. Parameter names are those of
transformers' `MambaModel` (embeddings, layers.N.norm, layers.N.mixer.{in_proj, conv1d, x_proj,
dt_proj, A_log, D, out_proj}, norm_f), so a `state-spaces/mamba-*-hf` folder (whose `MambaForCausalLM`
keys carry a "backbone." prefix and an `lm_head` we do not use) loads as is.

A text's embedding is the final hidden state (after norm_f) at an EOS token appended to it,
L2-normalised, as in the Mamba Retriever paper. Being causal, that position has read the whole text,
and right padding never reaches it, so texts of different lengths share a batch. Long texts run in
windows of `window` tokens: each layer hands the next window its scan state (`last_state` ->
`initial_state`) and the last conv_kernel - 1 inputs of its convolution, which gives exactly the
outputs of one pass while memory grows with the window, not the text.

Model code: errors are `model_errors` (ArtifactError for a checkpoint that is missing or does not fit,
ParamError for an input over `max_tokens`), never gRPC statuses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ragfleet_kernels.selective_scan import selective_scan
from services.runtime.model_errors import ArtifactError, ParamError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Tokens per forward pass of one batch (batch x window), which bounds the scan's (tokens, d_inner,
# d_state) intermediates.
TOKENS_PER_PASS = 4096
DEFAULT_WINDOW = 2048


@dataclass(frozen=True)
class MambaConfig:
    """The fields of transformers' MambaConfig this model reads (the defaults are transformers')."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: int = 0  # 0: ceil(hidden_size / 16), transformers' "auto"
    intermediate_size: int = 0  # 0: expand * hidden_size
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    eos_token_id: int = 0
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if not self.time_step_rank:
            object.__setattr__(self, "time_step_rank", math.ceil(self.hidden_size / 16))
        if not self.intermediate_size:
            object.__setattr__(self, "intermediate_size", self.expand * self.hidden_size)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> MambaConfig:
        """The config in a checkpoint's config.json; ArtifactError if it is not a Mamba-1 one."""
        if values.get("model_type", "mamba") != "mamba":
            raise ArtifactError(f"{where}: model_type is {values.get('model_type')!r}, not 'mamba'")
        if values.get("hidden_act", "silu") != "silu":
            raise ArtifactError(f"{where}: hidden_act {values['hidden_act']!r} is not supported (silu only)")
        missing = [name for name in ("vocab_size", "hidden_size", "num_hidden_layers") if name not in values]
        if missing:
            raise ArtifactError(f"{where}: config.json has no {missing[0]}")
        known = {f.name for f in fields(cls)}
        chosen = {k: v for k, v in values.items() if k in known}
        if chosen.get("time_step_rank") == "auto":
            chosen["time_step_rank"] = 0
        return cls(**chosen)

    def to_dict(self) -> dict[str, Any]:
        """config.json for transformers' MambaModel as well as for `MambaEncoder.load`."""
        return {"model_type": "mamba", "architectures": ["MambaModel"], "hidden_act": "silu", **asdict(self)}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MixerState(NamedTuple):
    """What a layer carries from one window to the next: its conv inputs and its scan state."""

    conv: torch.Tensor  # (batch, d_inner, conv_kernel - 1)
    ssm: torch.Tensor  # (batch, d_inner, d_state)


class Mixer(nn.Module):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        inner, rank, state = config.intermediate_size, config.time_step_rank, config.state_size
        self.in_proj = nn.Linear(config.hidden_size, 2 * inner, bias=config.use_bias)
        self.conv1d = nn.Conv1d(inner, inner, config.conv_kernel, groups=inner, bias=config.use_conv_bias)
        self.x_proj = nn.Linear(inner, rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=config.use_bias)
        self.rank, self.state = rank, state
        self.scan_backend = "auto"

    def forward(self, x: torch.Tensor, carry: MixerState | None) -> tuple[torch.Tensor, MixerState]:
        u, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (batch, d_inner, length) each
        width = self.conv1d.kernel_size[0] - 1
        before = carry.conv if carry is not None else u.new_zeros(u.shape[0], u.shape[1], width)
        padded = torch.cat([before, u], dim=2)  # causal: each output sees itself and `width` inputs back
        u = F.silu(F.conv1d(padded, self.conv1d.weight, self.conv1d.bias, groups=u.shape[1]))
        delta, B, C = torch.split(self.x_proj(u.transpose(1, 2)), [self.rank, self.state, self.state], dim=-1)
        y, last = selective_scan(
            u,
            self.dt_proj.weight @ delta.transpose(1, 2),
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            initial_state=carry.ssm if carry is not None else None,
            return_last_state=True,
            backend=self.scan_backend,
        )
        return self.out_proj(y.transpose(1, 2).to(x.dtype)), MixerState(
            padded[:, :, padded.shape[2] - width :], last
        )


class Block(nn.Module):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = Mixer(config)
        self.residual_in_fp32 = config.residual_in_fp32

    def forward(self, x: torch.Tensor, carry: MixerState | None) -> tuple[torch.Tensor, MixerState]:
        residual = x.float() if self.residual_in_fp32 else x
        out, carry = self.mixer(self.norm(x), carry)
        return residual + out, carry


class MambaModel(nn.Module):
    """Mamba-1 backbone; `forward` gives the final (norm_f) hidden states of every position."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def set_scan_backend(self, backend: str) -> None:
        """The scan backend ("auto", "triton" or "torch"), as `ragfleet_kernels.selective_scan` takes it."""
        for layer in self.layers:
            layer.mixer.scan_backend = backend

    def step(
        self, input_ids: torch.Tensor, carry: list[MixerState] | None = None
    ) -> tuple[torch.Tensor, list[MixerState]]:
        """The hidden states (before norm_f) of the window `input_ids` following the windows whose
        states are `carry`, and the states to hand to the next window."""
        x = self.embeddings(input_ids)
        states = []
        for i, layer in enumerate(self.layers):
            x, state = layer(x, carry[i] if carry is not None else None)
            states.append(state)
        return x, states

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm_f(self.step(input_ids)[0])


def _normalise_key(key: str) -> str:
    key = key.removeprefix("backbone.")
    return "embeddings." + key.removeprefix("embedding.") if key.startswith("embedding.") else key


def load_weights(model: MambaModel, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Loads a checkpoint's tensors (MambaModel or MambaForCausalLM names) into `model`; ArtifactError
    naming the first parameter that is missing, unexpected or of the wrong shape."""
    found = {_normalise_key(k): v for k, v in tensors.items() if not k.startswith("lm_head.")}
    expected = model.state_dict()
    for name, value in expected.items():
        if name not in found:
            raise ArtifactError(f"{where}: the checkpoint has no parameter {name!r}")
        if found[name].shape != value.shape:
            raise ArtifactError(
                f"{where}: parameter {name!r} has shape {tuple(found[name].shape)}, the config says "
                f"{tuple(value.shape)}"
            )
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ArtifactError(f"{where}: unexpected parameter {unexpected[0]!r} (not a Mamba-1 checkpoint?)")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in found.items()})


class MambaEncoder:
    """A Mamba backbone and its tokenizer as a text encoder: unit vectors at an appended EOS token."""

    def __init__(
        self,
        model: MambaModel,
        tokenizer: Any,
        *,
        max_tokens: int,
        window: int = DEFAULT_WINDOW,
        model_id: str = "mamba",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.window = window
        self.model_id = model_id

    @property
    def config(self) -> MambaConfig:
        return self.model.config

    @property
    def dimension(self) -> int:
        return self.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.weight.device

    @classmethod
    def load(
        cls, folder: str | Path, *, device: str = "cpu", max_tokens: int, window: int = DEFAULT_WINDOW
    ) -> MambaEncoder:
        """The checkpoint folder (config.json, model.safetensors, tokenizer files); ArtifactError when
        it is missing, incomplete or not a Mamba-1 model."""
        from transformers import AutoTokenizer

        folder = Path(folder).expanduser()
        where = str(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise ArtifactError(f"{where}: no Mamba checkpoint there (no {CONFIG_FILE})")
        try:
            values = json.loads((folder / CONFIG_FILE).read_text("utf-8"))
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{where}: {CONFIG_FILE} is unreadable ({err})") from err
        config = MambaConfig.from_dict(values, where)
        if not (folder / WEIGHTS_FILE).is_file():
            raise ArtifactError(f"{where}: no {WEIGHTS_FILE}")
        model = MambaModel(config)
        try:
            tensors = load_file(folder / WEIGHTS_FILE)
        except (OSError, ValueError, RuntimeError) as err:
            raise ArtifactError(f"{where}: {WEIGHTS_FILE} is unreadable ({err})") from err
        load_weights(model, tensors, where)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{where}: no usable tokenizer ({err})") from err
        if len(tokenizer) > config.vocab_size:
            raise ArtifactError(
                f"{where}: the tokenizer has {len(tokenizer)} tokens, the model {config.vocab_size}"
            )
        return cls(model.to(device).eval(), tokenizer, max_tokens=max_tokens, window=window, model_id=where)

    def save(self, folder: Path) -> None:
        """Writes the checkpoint into the (new) `folder`: what `load` and transformers' MambaModel read."""
        (folder / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2), "utf-8")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
            folder / WEIGHTS_FILE,
        )
        self.tokenizer.save_pretrained(folder)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids with the EOS appended; ParamError naming `texts[i]` for the first text
        over `max_tokens` (the EOS not counted)."""
        ids = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        for i, row in enumerate(ids):
            if len(row) > self.max_tokens:
                raise ParamError(
                    f"texts[{i}]",
                    f"has {len(row)} tokens, more than the {self.max_tokens} of retriever.mamba_max_tokens",
                )
        return [[*row, self.config.eos_token_id] for row in ids]

    def embed(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """(len(ids), hidden) unit vectors of token id lists (EOS included) run as one batch, in windows;
        differentiable."""
        lengths = torch.tensor([len(row) for row in ids], device=self.device)
        batch = torch.full((len(ids), int(lengths.max())), self.config.pad_token_id, dtype=torch.long)
        for i, row in enumerate(ids):
            batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        batch = batch.to(self.device)
        last = lengths - 1
        out = torch.zeros(len(ids), self.dimension, device=self.device)
        carry = None
        for start in range(0, batch.shape[1], self.window):
            hidden, carry = self.model.step(batch[:, start : start + self.window], carry)
            done = (last >= start) & (last < start + hidden.shape[1])
            rows = done.nonzero().flatten()
            if len(rows):
                picked = self.model.norm_f(hidden[rows, last[rows] - start])
                out = out.index_put((rows,), picked.to(out.dtype))
        return F.normalize(out, dim=-1)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), hidden) float32 unit vectors; batches hold texts of similar length, at most
        `batch_size` of them and TOKENS_PER_PASS tokens per window."""
        ids = self.tokenize(texts)
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        start = 0
        while start < len(order):
            width = min(len(ids[order[start]]), self.window)
            size = max(1, min(batch_size, TOKENS_PER_PASS // width))
            chosen = order[start : start + size]
            out[chosen] = self.embed([ids[i] for i in chosen]).float().cpu().numpy()
            start += size
        return out
