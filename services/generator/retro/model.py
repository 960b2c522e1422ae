"""The Retro model: a decoder-only transformer with chunked cross-attention (CCA) to retrieved neighbours.

Layout (RETRO, Borgeaud et al. 2022; the alignment rules are in ../shared/design/REFERENCES.md):

* The decoder is a pre-norm transformer (RMSNorm, causal RoPE self-attention, GELU MLP) with a CCA sublayer
  (after self-attention, before the MLP) in the layers `RetroConfig.cca_layers`; the LM head is tied to the
  token embedding.
* The sequence is cut into chunks of m tokens. Chunk u has k neighbours of r tokens each (a retrieved chunk
  and its continuation). The `NeighbourEncoder` (bidirectional, its own RoPE positions 0..r−1) encodes
  each neighbour while cross-attending to the decoder hidden states of chunk u, taken where the first
  CCA sublayer reads them (after that layer's self-attention). It runs once per chunk; every CCA layer
  attends to its output.
* `ChunkedCrossAttention`: token p ≥ m−1 belongs to attending group u = (p − m + 1) // m, i.e. group u runs
  from the last token of chunk u to the second-to-last token of chunk u+1 and sees only chunk u's k·r
  neighbour tokens. The first m−1 tokens get no CCA. Query rotary positions are the position within the
  group plus m−1, key positions are each neighbour's token positions 0..r−1, so a query lines up with
  the neighbour token that continues the retrieved chunk.
* With `RetroConfig.copy_head`, the output is a pointer-generator mixture (See et al. 2017): a one-head
  CCA over the same groups gives a distribution over the group's neighbour tokens, which a per-position
  gate mixes with the LM head's softmax; `logits` are then the mixture's log-probabilities. The pointer
  also matches the decoder state against the token before each neighbour token, so copying walks through
  a span in order. Without a copy head a small model has to carry a token's identity through CCA's values
  to copy it, which it learns far more slowly than remembering facts; with it, copying only takes knowing
  where to look.

Every attention goes through `ragfleet_kernels.attention.attention` (flash attention on a GPU, its PyTorch
reference elsewhere). That kernel masks keys by length only, so arbitrary key masks (padding inside the
flattened k·r neighbour tokens) are handled by moving the valid keys to the front (`pack_keys`); attention
does not depend on key order once the rotary phases are applied.

`RetroCache` makes decoding incremental: self-attention keys/values per layer, the hidden states of the
current (incomplete) chunk at the first CCA layer, and the encoded neighbours of every completed chunk.
Cached decoding computes the same logits as one full forward pass.

Written by hand because no maintained library implements RETRO's chunked cross-attention.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ragfleet_kernels.attention import attention
from services.runtime.artifacts import write_directory

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class RetroConfig:
    vocab_size: int
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    d_ff: int = 1024
    max_seq_len: int = 2048  # longest position any rotary embedding may take
    rope_base: float = 10000.0
    chunk_size: int = 64  # m
    num_neighbours: int = 2  # k
    neighbour_len: int = 128  # r = retrieved chunk + its continuation
    cca_start: int = 5  # 0-based index of the first decoder layer with CCA; then every `cca_every`
    cca_every: int = 3
    encoder_layers: int = 2
    encoder_d_model: int | None = None  # None = d_model
    pad_token_id: int = 0
    tie_embeddings: bool = True
    copy_head: bool = False  # pointer-generator output over the neighbour tokens (module docstring)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "chunk_size")
        positive += ("num_neighbours", "neighbour_len", "encoder_layers", "cca_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.encoder_d_model is not None and self.encoder_d_model < 1:
            raise ValueError(f"encoder_d_model: must be at least 1 or None, got {self.encoder_d_model}")
        for name, dim in (("d_model", self.d_model), ("encoder_d_model", self.d_encoder)):
            if dim % self.n_heads or (dim // self.n_heads) % 2:
                raise ValueError(f"{name}: {dim} must split into {self.n_heads} heads of an even size (RoPE)")
        if 2 * self.chunk_size - 1 > self.max_seq_len or self.neighbour_len > self.max_seq_len:
            raise ValueError(
                f"max_seq_len: {self.max_seq_len} is shorter than the CCA query positions (2·chunk_size − 1"
                f" = {2 * self.chunk_size - 1}) or the neighbour length ({self.neighbour_len})"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id: {self.pad_token_id} is not a token id (vocab_size {self.vocab_size})"
            )
        self.cca_layers  # noqa: B018 - validates cca_start / cca_every

    @property
    def d_encoder(self) -> int:
        return self.encoder_d_model or self.d_model

    @property
    def cca_layers(self) -> list[int]:
        """Indices of the decoder layers that carry CCA: cca_start, cca_start + cca_every, … < n_layers."""
        if self.cca_start < 0 or self.cca_every < 1:
            raise ValueError(
                f"cca_start/cca_every: need cca_start ≥ 0 and cca_every ≥ 1, got "
                f"{self.cca_start}/{self.cca_every}"
            )
        if self.cca_start >= self.n_layers:
            raise ValueError(
                f"cca_start: {self.cca_start} leaves no CCA layer in a {self.n_layers}-layer decoder"
            )
        return list(range(self.cca_start, self.n_layers, self.cca_every))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RetroConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {', '.join(unknown)}")
        return cls(**d)


@dataclass
class RetroOutput:
    logits: torch.Tensor  # (B, n, vocab)
    # (B, n_chunks, k): the attention mass each neighbour got from the tokens of this call it conditions
    # (last CCA layer, averaged over heads and tokens); zero rows for chunks that condition none of them.
    # None unless asked for, or when no retrieval is in effect.
    neighbour_weights: torch.Tensor | None = None
    # (B, n, k, r), copy head only: the pointer mass (1 − gate) · attention each position puts on each
    # neighbour token of its attending group (zero where it has none), what its output copies from where.
    # None unless asked for (`output_neighbour_weights`), or without a copy head or retrieval.
    copy_weights: torch.Tensor | None = None


@dataclass
class RetroCache:
    """Decoding state of one batch; create with `RetroModel.new_cache` and pass to every forward call.

    Opaque to callers except `length` (tokens consumed so far).
    """

    batch_size: int
    keys: list[torch.Tensor | None]  # per decoder layer: (B, H, length, head_dim), rotated
    values: list[torch.Tensor | None]
    length: int = 0
    # Hidden states at the first CCA layer of the tokens of the current, incomplete chunk: (B, length % m, d).
    chunk_hidden: torch.Tensor | None = None
    # Encoded neighbours of every completed chunk: (B, length // m, k, r, d_enc) and their mask.
    encoded: torch.Tensor | None = None
    encoded_mask: torch.Tensor | None = None
    # Per CCA layer (and -1 for the copy head's pointer): `ChunkedCrossAttention.project` of `encoded`, so
    # each chunk is projected once.
    cca_projected: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class Encoded:
    """Encoded neighbours of chunks 0…C−1 as a CCA sublayer reads them: `states` (B, C, k, r, d_enc), their
    `mask` (B, C, k, r), and `projected`, that sublayer's `project(states)` when already computed (a
    decoding cache keeps them, so each chunk is projected once)."""

    states: torch.Tensor
    mask: torch.Tensor
    projected: tuple[torch.Tensor, torch.Tensor] | None = None


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """`x` (..., L, head_dim) rotated by RoPE at `positions` (L,), rotate-half layout."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(device=x.device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def pack_keys(
    k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys/values (B, H, L, d) with the valid ones (mask (B, L) True) moved to the front, and their counts.

    Turns an arbitrary key mask into the per-row key lengths `ragfleet_kernels.attention` takes; the
    lengths are None when every key is valid.
    """
    if bool(mask.all()):
        return k, v, None
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    index = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
    return k.gather(2, index), v.gather(2, index), mask.sum(-1).to(torch.int32)


class Attention(nn.Module):
    """Multi-head attention with rotary positions: queries from `d_model` inputs, keys/values from
    `d_context` inputs (the same stream for self-attention), output back to `d_model`."""

    def __init__(self, d_model: int, n_heads: int, rope_base: float, d_context: int | None = None) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.rope_base = rope_base
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_context or d_model, 2 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        return x.view(b, length, self.n_heads, d // self.n_heads).transpose(1, 2)

    def queries(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, L, d_model) → rotated queries (B, H, L, head_dim)."""
        return rotary(self._split_heads(self.q_proj(x)), positions, self.rope_base)

    def keys_values(
        self, context: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, d_context) → rotated keys and values, each (B, H, L, head_dim)."""
        k, v = self.kv_proj(context).chunk(2, dim=-1)
        return rotary(self._split_heads(k), positions, self.rope_base), self._split_heads(v)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output projected back to (B, Lq, d_model); `key_mask` (B, Lk) False = ignore that key."""
        k_lengths = None
        if key_mask is not None:
            k, v, k_lengths = pack_keys(k, v, key_mask)
        out = attention(q, k, v, causal=causal, k_lengths=k_lengths)
        b, h, length, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, length, h * d))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class ChunkedCrossAttention(nn.Module):
    """RETRO's CCA sublayer (module docstring): returns the residual update for `hidden`.

    Holds its own pre-norm, so it can be added after any block of a residual stream (RETRO-fitting).
    """

    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        self.chunk_size = config.chunk_size
        self.norm = nn.RMSNorm(config.d_model)
        self.attn = Attention(config.d_model, config.n_heads, config.rope_base, d_context=config.d_encoder)

    def _groups(self, hidden: torch.Tensor, offset: int) -> tuple[torch.Tensor, int, int, int]:
        """Lays the tokens that get CCA out as attending groups.

        Returns (groups (B, G, m, d), start, first_group, lead): tokens hidden[:, start:] fill the groups
        first_group … first_group+G−1 from row `lead` of the first one on; the rest of the rows are zeros.
        """
        m = self.chunk_size
        n = hidden.shape[1]
        start = min(n, max(0, m - 1 - offset))
        shifted = offset + start - (m - 1)  # position of hidden[:, start] counted from the first group
        first_group, lead = divmod(shifted, m)
        used = n - start
        n_groups = -(-(lead + used) // m)
        padded = F.pad(hidden[:, start:], (0, 0, lead, n_groups * m - lead - used))
        return padded.view(hidden.shape[0], n_groups, m, hidden.shape[-1]), start, first_group, lead

    def project(self, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values of encoded neighbours (B, C, k, r, d_enc), each (B, C, H, k·r, head_dim).

        A decoder with a cache projects each chunk's neighbours once and passes them as `Encoded.projected`.
        """
        b, c, k, r, d_enc = encoded.shape
        positions = torch.arange(r, device=encoded.device).repeat(k)
        keys, values = self.attn.keys_values(encoded.reshape(b * c, k * r, d_enc), positions)
        return keys.view(b, c, *keys.shape[1:]), values.view(b, c, *values.shape[1:])

    def _queries_keys(
        self, hidden: torch.Tensor, encoded: Encoded, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
        m = self.chunk_size
        b, n, d = hidden.shape
        groups, start, first, lead = self._groups(self.norm(hidden), offset)
        n_groups = groups.shape[1]
        if first + n_groups > encoded.mask.shape[1]:
            raise ValueError(
                f"neighbours: tokens up to position {offset + n - 1} need {first + n_groups} encoded chunks, "
                f"got {encoded.mask.shape[1]}"
            )
        q_pos = torch.arange(m, device=hidden.device) + (m - 1)
        q = self.attn.queries(groups.reshape(b * n_groups, m, d), q_pos)
        if encoded.projected is None:
            keys, values = self.project(encoded.states[:, first : first + n_groups])
        else:
            keys, values = (t[:, first : first + n_groups] for t in encoded.projected)
        keys, values = (t.reshape(b * n_groups, *t.shape[2:]) for t in (keys, values))
        key_mask = encoded.mask[:, first : first + n_groups].reshape(b * n_groups, -1)
        return q, keys, values, key_mask, start, first, lead

    def forward(self, hidden: torch.Tensor, encoded: Encoded, offset: int = 0) -> torch.Tensor:
        """hidden (B, n, d) at absolute positions offset…offset+n−1; `encoded`: the neighbours of chunks
        0…C−1. Returns the CCA update (B, n, d): zero for the first m−1 positions and for groups whose
        neighbours are all masked."""
        b, n, d = hidden.shape
        if offset + n < self.chunk_size:
            return torch.zeros_like(hidden)
        q, keys, values, key_mask, start, _, lead = self._queries_keys(hidden, encoded, offset)
        out = self.attn.attend(q, keys, values, key_mask=key_mask).view(b, -1, d)[:, lead : lead + n - start]
        return F.pad(out, (0, 0, start, 0))

    def probabilities(
        self, hidden: torch.Tensor, encoded: Encoded, offset: int = 0, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, int, int, int]:
        """The attention of the tokens that get CCA over their group's k·r neighbour tokens, in plain torch
        (the kernel returns no probabilities): (probs (B, G, H, m, k·r), start, first_group, lead) with the
        layout of `_groups`; a group whose neighbours are all masked has all-zero rows. `bias` (B·G, 1 or H,
        m, k·r) is added to the attention scores."""
        q, keys, _, key_mask, start, first, lead = self._queries_keys(hidden, encoded, offset)
        scores = (q.float() @ keys.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if bias is not None:
            scores = scores + bias.float()
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # a fully masked group attends to nothing
        return probs.view(hidden.shape[0], -1, *probs.shape[1:]), start, first, lead

    @torch.no_grad()
    def neighbour_weights(self, hidden: torch.Tensor, encoded: Encoded, offset: int = 0) -> torch.Tensor:
        """(B, C, k): softmax mass each neighbour of chunk u got from the tokens of `hidden` in group u,
        averaged over heads and those tokens."""
        b, n, _ = hidden.shape
        c, k, r = encoded.mask.shape[1:4]
        weights = hidden.new_zeros(b, c, k, dtype=torch.float32)
        if offset + n < self.chunk_size:
            return weights
        probs, start, first, lead = self.probabilities(hidden, encoded, offset)
        m = self.chunk_size
        per_neighbour = probs.view(*probs.shape[:4], k, r).sum(-1).mean(2)  # (B, G, m, k)
        rows = torch.arange(per_neighbour.shape[1] * m, device=hidden.device).view(-1, m)
        in_call = ((rows >= lead) & (rows < lead + n - start)).to(torch.float32)  # (G, m)
        summed = (per_neighbour * in_call[None, :, :, None]).sum(2)
        weights[:, first : first + per_neighbour.shape[1]] = (
            summed / in_call.sum(1).clamp(min=1)[None, :, None]
        )
        return weights


class CopyHead(nn.Module):
    """The pointer-generator output (module docstring): log of g·softmax(logits) + (1 − g)·copy, where copy
    puts a one-head CCA's attention over the group's neighbour tokens onto their ids. Positions without
    neighbours (the first m−1, or a group whose neighbours are all padding) keep the LM head's softmax.

    The pointer's scores get a "follow" term: a bilinear match between the decoder state and the embedding
    of the token *before* each neighbour token. A decoder that has just written token x then finds the
    neighbour token that follows x, so a multi-piece name is copied piece after piece instead of finding
    the right word and repeating or skipping a piece. A learned prior per neighbour rank is added too:
    neighbours arrive best first, and the pointer itself is blind to their order.

    `pointer` is a one-head CCA used for its queries, keys and alignment; its values are never read.
    `embed` is the decoder's token embedding (shared, not copied).
    """

    def __init__(self, config: RetroConfig, embed: nn.Embedding) -> None:
        super().__init__()
        self.pointer = ChunkedCrossAttention(dataclasses.replace(config, n_heads=1))
        self.gate = nn.Linear(config.d_model, 1)
        self.embed = embed
        self.pad_token_id = config.pad_token_id
        self.follow_query = nn.Linear(config.d_model, config.d_model, bias=False)
        self.follow_key = nn.Linear(embed.embedding_dim, config.d_model, bias=False)
        self.rank_bias = nn.Parameter(torch.zeros(config.num_neighbours))

    def _follow(self, hidden: torch.Tensor, neighbours: torch.Tensor, offset: int) -> torch.Tensor:
        """The follow scores plus the rank prior, (B·G, 1, m, k·r) in the group layout of
        `ChunkedCrossAttention._groups`."""
        groups, _, first, _ = self.pointer._groups(hidden, offset)
        b, n_groups, m, d = groups.shape
        ids = neighbours[:, first : first + n_groups]
        previous = F.pad(ids, (1, -1), value=self.pad_token_id)  # each neighbour token's predecessor
        keys = self.follow_key(self.embed(previous)).flatten(2, 3)  # (B, G, k·r, d)
        scores = self.follow_query(groups) @ keys.transpose(-1, -2) / math.sqrt(d)
        scores = scores + self.rank_bias.repeat_interleave(ids.shape[-1])
        return scores.reshape(b * n_groups, 1, m, -1)

    def forward(
        self,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        neighbours: torch.Tensor,
        encoded: Encoded,
        offset: int = 0,
        select: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, n, d) final states; logits (B, n, V), or (P, V) for the positions `select` (B, n)
        picks; neighbours (B, C, k, r) ids; encoded/offset as for CCA (`projected` by the pointer) →
        (log-probabilities shaped like `logits`, in float32; the pointer mass (1 − gate) · attention over
        each position's k·r group tokens, (B, n, k·r) or (P, k·r), zero where it has no neighbours)."""
        b, n, _ = hidden.shape
        m = self.pointer.chunk_size
        log_probs = logits.float().log_softmax(-1)
        kr = neighbours.shape[2] * neighbours.shape[3]
        if offset + n < m:
            return log_probs, log_probs.new_zeros(*log_probs.shape[:-1], kr)
        follow = self._follow(hidden, neighbours, offset)
        probs, start, first, lead = self.pointer.probabilities(hidden, encoded, offset, follow)
        groups = probs.shape[1]
        rows = slice(lead, lead + n - start)  # the group rows of this call's tokens hidden[:, start:]
        attention = probs[:, :, 0].reshape(b, groups * m, -1)[:, rows]
        ids = neighbours[:, first : first + groups].reshape(b, groups, 1, -1).expand(-1, -1, m, -1)
        ids = ids.reshape(b, groups * m, -1)[:, rows].long()
        has_neighbours = encoded.mask[:, first : first + groups].flatten(2).any(-1)
        has_neighbours = has_neighbours.repeat_interleave(m, dim=1)
        # Every position gets a row; the first `start` get no pointer.
        attention, ids = (F.pad(t, (0, 0, start, 0)) for t in (attention, ids))
        has_neighbours = F.pad(has_neighbours[:, rows], (start, 0))
        gate = torch.sigmoid(self.gate(hidden).float())
        if select is not None:
            attention, ids, has_neighbours, gate = (t[select] for t in (attention, ids, has_neighbours, gate))
        copying = has_neighbours.nonzero(as_tuple=True)  # the vocabulary-sized work is done only there
        generated = log_probs[copying].exp()
        copy = torch.zeros_like(generated).scatter_add_(-1, ids[copying], attention[copying])
        mixed = gate[copying] * generated + (1 - gate[copying]) * copy
        pointer = torch.zeros_like(attention).index_put(copying, (1 - gate[copying]) * attention[copying])
        return log_probs.index_put(copying, mixed.clamp_min(1e-12).log()), pointer


class EncoderLayer(nn.Module):
    """Bidirectional self-attention over a neighbour, cross-attention to its chunk, MLP (all pre-norm)."""

    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        d = config.d_encoder
        self.self_norm = nn.RMSNorm(d)
        self.self_attn = Attention(d, config.n_heads, config.rope_base)
        self.cross_norm = nn.RMSNorm(d)
        self.cross_attn = Attention(d, config.n_heads, config.rope_base, d_context=config.d_model)
        self.mlp_norm = nn.RMSNorm(d)
        self.mlp = MLP(d, config.d_ff * d // config.d_model)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, chunk: torch.Tensor, num_neighbours: int
    ) -> torch.Tensor:
        """x (B·C·k, r, d_enc) neighbour states, mask (B·C·k, r), chunk (B·C, m, d) normed decoder states."""
        positions = torch.arange(x.shape[1], device=x.device)
        h = self.self_norm(x)
        k, v = self.self_attn.keys_values(h, positions)
        x = x + self.self_attn.attend(self.self_attn.queries(h, positions), k, v, key_mask=mask)
        chunk_positions = torch.arange(chunk.shape[1], device=x.device)
        k, v = self.cross_attn.keys_values(chunk, chunk_positions)
        k, v = k.repeat_interleave(num_neighbours, dim=0), v.repeat_interleave(num_neighbours, dim=0)
        x = x + self.cross_attn.attend(self.cross_attn.queries(self.cross_norm(x), positions), k, v)
        return x + self.mlp(self.mlp_norm(x))


class NeighbourEncoder(nn.Module):
    """Encodes each chunk's neighbours, conditioned on that chunk's decoder hidden states.

    `embed` is the decoder's token embedding (shared, not copied).
    """

    def __init__(self, config: RetroConfig, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed = embed
        d_embed = embed.embedding_dim
        self.embed_proj = (
            nn.Identity() if d_embed == config.d_encoder else nn.Linear(d_embed, config.d_encoder)
        )
        self.chunk_norm = nn.RMSNorm(config.d_model)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.norm = nn.RMSNorm(config.d_encoder)

    def forward(
        self, neighbours: torch.Tensor, mask: torch.Tensor, chunk_hidden: torch.Tensor
    ) -> torch.Tensor:
        """neighbours (B, C, k, r) ids, mask (B, C, k, r), chunk_hidden (B, C, m, d) → (B, C, k, r, d_enc)."""
        b, c, k, r = neighbours.shape
        x = self.embed_proj(self.embed(neighbours.reshape(b * c * k, r)))
        chunk = self.chunk_norm(chunk_hidden).reshape(b * c, chunk_hidden.shape[2], chunk_hidden.shape[3])
        flat_mask = mask.reshape(b * c * k, r)
        for layer in self.layers:
            x = layer(x, flat_mask, chunk, k)
        return self.norm(x).view(b, c, k, r, -1)


class DecoderLayer(nn.Module):
    def __init__(self, config: RetroConfig, with_cca: bool) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model)
        self.attn = Attention(config.d_model, config.n_heads, config.rope_base)
        self.cca = ChunkedCrossAttention(config) if with_cca else None
        self.mlp_norm = nn.RMSNorm(config.d_model)
        self.mlp = MLP(config.d_model, config.d_ff)

    def self_attention(
        self, x: torch.Tensor, positions: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The causal self-attention update of x, and the keys/values of everything seen so far."""
        h = self.attn_norm(x)
        k, v = self.attn.keys_values(h, positions)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        return self.attn.attend(self.attn.queries(h, positions), k, v, causal=True), k, v


def encode_chunks(
    encoder: NeighbourEncoder,
    hidden: torch.Tensor,
    neighbours: torch.Tensor | None,
    mask: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Encoded neighbours (B, C, k, r, d_enc) and their mask for the C = n // m chunks of `hidden` (B, n, d)
    that are complete; (None, None) without neighbours or complete chunks."""
    b, n, d = hidden.shape
    done = n // chunk_size
    if neighbours is None or done == 0:
        return None, None
    chunks = hidden[:, : done * chunk_size].reshape(b, done, chunk_size, d)
    return encoder(neighbours[:, :done], mask[:, :done], chunks), mask[:, :done]


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: normal(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def check_neighbours(
    config: RetroConfig,
    batch_size: int,
    total_len: int,
    neighbours: torch.Tensor | None,
    neighbour_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """Validates `neighbours` for a sequence of `total_len` tokens and returns their mask (or None)."""
    if neighbours is None:
        if neighbour_mask is not None:
            raise ValueError("neighbour_mask: given without neighbours")
        return None
    expected = (config.num_neighbours, config.neighbour_len)
    if neighbours.dim() != 4 or neighbours.shape[0] != batch_size or tuple(neighbours.shape[2:]) != expected:
        raise ValueError(
            f"neighbours: expected shape (batch {batch_size}, n_chunks, k {expected[0]}, r {expected[1]}), "
            f"got {tuple(neighbours.shape)}"
        )
    if neighbours.shape[1] < total_len // config.chunk_size:
        raise ValueError(
            f"neighbours: {total_len} tokens complete {total_len // config.chunk_size} chunks, "
            f"but neighbours are given for {neighbours.shape[1]}"
        )
    if neighbour_mask is None:
        return neighbours != config.pad_token_id
    if neighbour_mask.shape != neighbours.shape or neighbour_mask.dtype != torch.bool:
        raise ValueError(f"neighbour_mask: expected a bool tensor of shape {tuple(neighbours.shape)}")
    return neighbour_mask


class RetroModel(nn.Module):
    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        self.config = config
        cca_layers = set(config.cca_layers)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config, i in cca_layers) for i in range(config.n_layers))
        self.encoder = NeighbourEncoder(config, self.embed)
        self.norm = nn.RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.copy = CopyHead(config, self.embed) if config.copy_head else None
        self.apply(init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers))

    def new_cache(self, batch_size: int) -> RetroCache:
        n = self.config.n_layers
        return RetroCache(batch_size=batch_size, keys=[None] * n, values=[None] * n)

    def forward(
        self,
        input_ids: torch.LongTensor,
        neighbours: torch.LongTensor | None = None,
        *,
        neighbour_mask: torch.BoolTensor | None = None,
        cache: RetroCache | None = None,
        output_neighbour_weights: bool = False,
        select: torch.BoolTensor | None = None,
    ) -> RetroOutput:
        """Logits for `input_ids` (B, n); with a cache, `input_ids` are the tokens after `cache.length`.

        `neighbours` (B, n_chunks, k, r) are the neighbours of chunks 0, 1, … of the whole sequence so far
        (rows of chunks whose last token is not reached are not read, nor with a cache rows already encoded,
        unless the model has a copy head); None = no retrieval. `neighbour_mask` defaults to
        `neighbours != pad_token_id`. With a copy head and neighbours, `logits` are log-probabilities (their
        softmax is the same distribution). `output_neighbour_weights` asks for `RetroOutput.neighbour_weights`
        and, with a copy head, `copy_weights`. `select` (B, n) limits the output to the positions it marks:
        `logits` is then (P, vocab), P positions in row-major order, so training pays for the
        vocabulary-sized head only where it takes a loss (answer tokens).
        """
        cfg = self.config
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids: expected a non-empty (batch, length) tensor, got {tuple(input_ids.shape)}"
            )
        b, n = input_ids.shape
        offset = 0
        if cache is not None:
            if cache.batch_size != b:
                raise ValueError(f"input_ids: batch {b} does not match the cache's batch {cache.batch_size}")
            offset = cache.length
        total = offset + n
        if total > cfg.max_seq_len:
            raise ValueError(f"input_ids: {total} tokens exceed max_seq_len {cfg.max_seq_len}")
        mask = check_neighbours(cfg, b, total, neighbours, neighbour_mask)
        if select is not None and (select.shape != input_ids.shape or select.dtype != torch.bool):
            raise ValueError(
                f"select: expected a bool tensor shaped like input_ids {tuple(input_ids.shape)}, "
                f"got {select.dtype} {tuple(select.shape)}"
            )

        positions = torch.arange(offset, total, device=input_ids.device)
        x = self.embed(input_ids)
        first_cca, last_cca = cfg.cca_layers[0], cfg.cca_layers[-1]
        encoded = encoded_mask = weights = None
        for i, layer in enumerate(self.layers):
            past = None if cache is None or cache.keys[i] is None else (cache.keys[i], cache.values[i])
            update, k, v = layer.self_attention(x, positions, past)
            if cache is not None:
                cache.keys[i], cache.values[i] = k, v
            x = x + update
            if layer.cca is not None:
                if i == first_cca:
                    encoded, encoded_mask = self._encode(x, neighbours, mask, cache, offset)
                if encoded is not None:
                    projected = None if cache is None else self._projected(i, layer.cca, encoded, cache)
                    reads = Encoded(encoded, encoded_mask, projected)
                    if i == last_cca and output_neighbour_weights:
                        weights = layer.cca.neighbour_weights(x, reads, offset)
                    x = x + layer.cca(x, reads, offset)
            x = x + layer.mlp(layer.mlp_norm(x))
        if cache is not None:
            cache.length = total
        if weights is not None:
            weights = F.pad(weights, (0, 0, 0, -(-total // cfg.chunk_size) - weights.shape[1]))
        x = self.norm(x)
        logits = self.lm_head(x if select is None else x[select])
        copy_weights = None
        if self.copy is not None and encoded is not None:
            if neighbours is None:
                raise ValueError("neighbours: a copy-head model needs the neighbour ids of every chunk")
            projected = None if cache is None else self._projected(-1, self.copy.pointer, encoded, cache)
            reads = Encoded(encoded, encoded_mask, projected)
            logits, pointer = self.copy(x, logits, neighbours, reads, offset, select)
            if output_neighbour_weights:
                copy_weights = pointer.view(*pointer.shape[:-1], cfg.num_neighbours, cfg.neighbour_len)
        return RetroOutput(logits=logits, neighbour_weights=weights, copy_weights=copy_weights)

    @staticmethod
    def _projected(
        index: int, cca: ChunkedCrossAttention, encoded: torch.Tensor, cache: RetroCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s CCA keys/values of every encoded chunk, projecting only chunks new to the cache."""
        done = cache.cca_projected[index][0].shape[1] if index in cache.cca_projected else 0
        if done < encoded.shape[1]:
            new = cca.project(encoded[:, done:])
            if done:
                new = tuple(torch.cat([old, t], dim=1) for old, t in zip(cache.cca_projected[index], new))
            cache.cca_projected[index] = new
        return cache.cca_projected[index]

    def _encode(
        self,
        hidden: torch.Tensor,
        neighbours: torch.Tensor | None,
        mask: torch.Tensor | None,
        cache: RetroCache | None,
        offset: int,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Encoded neighbours (and mask) of every chunk completed so far, running the encoder for the chunks
        this call completes; (None, None) when no retrieval is in effect."""
        m = self.config.chunk_size
        b, n, d = hidden.shape
        if cache is None:
            return encode_chunks(self.encoder, hidden, neighbours, mask, m)

        pending = hidden if cache.chunk_hidden is None else torch.cat([cache.chunk_hidden, hidden], dim=1)
        first, done = offset // m, (offset + n) // m
        if done > first:
            chunks = pending[:, : (done - first) * m].reshape(b, done - first, m, d)
            if neighbours is None:
                k, r = self.config.num_neighbours, self.config.neighbour_len
                new = hidden.new_zeros(b, done - first, k, r, self.config.d_encoder)
                new_mask = torch.zeros(b, done - first, k, r, dtype=torch.bool, device=hidden.device)
            else:
                new_mask = mask[:, first:done]
                new = self.encoder(neighbours[:, first:done], new_mask, chunks)
            if cache.encoded is not None:
                new = torch.cat([cache.encoded, new], dim=1)
                new_mask = torch.cat([cache.encoded_mask, new_mask], dim=1)
            cache.encoded, cache.encoded_mask = new, new_mask
        cache.chunk_hidden = pending[:, (done - first) * m :]
        if cache.encoded_mask is None or not bool(cache.encoded_mask.any()):
            return None, None
        return cache.encoded, cache.encoded_mask

    def files(self) -> dict[str, bytes]:
        """The model folder's files: config.json and model.safetensors (what `load` reads)."""
        weights = {name: p.detach().cpu().contiguous() for name, p in self.named_parameters()}
        return {
            CONFIG_FILE: json.dumps(self.config.to_dict(), indent=2, sort_keys=True).encode(),
            WEIGHTS_FILE: safetensors_bytes(weights),
        }

    def save(self, path: Path) -> None:
        """Writes the model folder `path` (config.json, model.safetensors), replacing it as a whole."""
        write_directory(path, self.files())

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> RetroModel:
        path = Path(path)
        config = RetroConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
        model = cls(config)
        load_parameters(model, dict(model.named_parameters()), path / WEIGHTS_FILE)
        return model.to(device)


def load_parameters(module: nn.Module, params: dict[str, nn.Parameter], weights_path: Path) -> None:
    """Copies the safetensors file at `weights_path` into `params`; the names must match exactly."""
    tensors = load_file(str(weights_path))
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path}: does not match {type(module).__name__} (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ValueError(
                    f"{weights_path}: {name} has shape {tuple(tensors[name].shape)}, "
                    f"expected {tuple(p.shape)}"
                )
            p.copy_(tensors[name])
