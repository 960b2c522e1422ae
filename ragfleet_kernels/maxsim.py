"""ColBERT late interaction (MaxSim): a Triton kernel, its PyTorch reference and one dispatcher.

MaxSim scores a query against a document by matching every query token with its most similar document
token and adding up those best matches:

    score(q, d) = sum over query tokens i < q_len of  max over document tokens j < d_len of  <q_i, d_j>

Layout: queries are a padded batch `q (nq, Lq, dim)` with true lengths `q_lengths (nq,)`, documents a
padded batch `d (nd, Ld, dim)` with `d_lengths (nd,)`; the result is `(nq, nd)` float32 for every
query/document pair. Padded positions never contribute, whatever they hold. A document of length 0 scores 0
(there is nothing to match, so every query token contributes 0). Inputs may be fp32, fp16 or bf16 (q and d
alike); products are accumulated in fp32.

Why a custom kernel: the obvious torch code materialises the full `nq x nd x Lq x Ld` similarity tensor
(one query of 32 tokens against 64k documents of 220 tokens is 460M floats) only to reduce it right away.
The kernel keeps one query's token vectors on chip, streams a document's tokens through in tiles, holds a
running max per query token in registers and writes one float per pair, so it reads each document once and
writes almost nothing. It also stops at each document's true length instead of its padded one.

On a CPU the kernel runs only in Triton's interpreter, for tests: TRITON_INTERPRET=1 must be set before
triton is first imported. Bad input raises `KernelInputError` (a ValueError) with a message that starts with
the argument's name.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ragfleet_kernels.common import (
    BACKENDS,
    INTERPRETED,
    KernelInputError,
    check_backend,
    check_triton_device,
    dot,
)

__all__ = ["BACKENDS", "DTYPES", "maxsim", "maxsim_reference"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The reference computes this many similarities (fp32) at most at once; documents are taken in chunks.
_REFERENCE_CHUNK_ELEMENTS = 1 << 25
# Larger token dimensions would not fit a tile in registers; ColBERT uses 128.
_MAX_TRITON_DIM = 512


def _check_inputs(q: torch.Tensor, q_lengths: torch.Tensor, d: torch.Tensor, d_lengths: torch.Tensor) -> None:
    for name, x in (("q", q), ("d", d)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise KernelInputError(name, "expected a 3-D tensor (count, tokens, dim)")
        if x.dtype not in DTYPES:
            raise KernelInputError(name, f"dtype {x.dtype} is not one of {DTYPES}")
    if d.dtype != q.dtype:
        raise KernelInputError("d", f"dtype {d.dtype} differs from q's {q.dtype}")
    if d.shape[2] != q.shape[2]:
        raise KernelInputError("d", f"token dim {d.shape[2]} differs from q's {q.shape[2]}")
    if d.device != q.device:
        raise KernelInputError("d", f"on {d.device}, q on {q.device}")
    for name, lengths, x in (("q_lengths", q_lengths, q), ("d_lengths", d_lengths, d)):
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (x.shape[0],):
            raise KernelInputError(name, f"expected a tensor of shape ({x.shape[0]},)")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise KernelInputError(name, f"expected an integer dtype, got {lengths.dtype}")
        if lengths.device != q.device:
            raise KernelInputError(name, f"on {lengths.device}, q on {q.device}")
        if lengths.numel() and ((lengths < 0) | (lengths > x.shape[1])).any():
            raise KernelInputError(name, f"every length must be in [0, {x.shape[1]}]")


def maxsim_reference(
    q: torch.Tensor, q_lengths: torch.Tensor, d: torch.Tensor, d_lengths: torch.Tensor
) -> torch.Tensor:
    """MaxSim in plain torch: similarities by einsum, padding masked out, max over document tokens, sum
    over query tokens. Documents are taken in chunks so that no more than ~32M similarities exist at once."""
    _check_inputs(q, q_lengths, d, d_lengths)
    nq, lq, _ = q.shape
    nd, ld, _ = d.shape
    q_pad = torch.arange(lq, device=q.device) >= q_lengths[:, None]  # (nq, Lq)
    d_pad = torch.arange(ld, device=d.device) >= d_lengths[:, None]  # (nd, Ld)
    q32 = q.float()
    scores = torch.zeros(nq, nd, dtype=torch.float32, device=q.device)
    chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // max(1, nq * lq * ld))
    for start in range(0, nd, chunk):
        end = min(start + chunk, nd)
        sim = torch.einsum("aie,bje->abij", q32, d[start:end].float())  # (nq, chunk, Lq, Ld)
        sim = sim.masked_fill(d_pad[None, start:end, None, :], float("-inf"))
        best = sim.amax(dim=3)  # (nq, chunk, Lq); -inf where the document is empty
        empty = (d_lengths[start:end] == 0)[None, :, None]
        best = best.masked_fill(q_pad[:, None, :] | empty, 0.0)
        scores[:, start:end] = best.sum(dim=2)
    return scores


# On a GPU the tile over document tokens and the launch shape are tuned per dtype and tile size; the
# interpreter runs one small tile (it costs per operation, and small tiles exercise the tiling in tests).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_T": block_t}, num_warps=warps, num_stages=stages)
    for block_t in (32, 64, 128)
    for warps in (2, 4, 8)
    for stages in (2, 3, 4)
]
_INTERPRETER_CONFIGS = [triton.Config({"BLOCK_T": 16})]


@triton.jit
def _load_tokens(base, offs, length, stride_t, cols, dim, stride_e):
    """The token vectors `offs` of one (tokens, dim) matrix: zeros past `length` tokens and `dim` columns."""
    return tl.load(
        base + offs[:, None] * stride_t + cols[None, :] * stride_e,
        mask=(offs < length)[:, None] & (cols < dim)[None, :],
        other=0.0,
    )


@triton.autotune(configs=_INTERPRETER_CONFIGS if INTERPRETED else _GPU_CONFIGS, key=["BLOCK_Q", "BLOCK_DIM"])
@triton.jit
def _maxsim_kernel(
    q_ptr,
    q_len_ptr,
    d_ptr,
    d_len_ptr,
    out_ptr,
    nq,
    nd,
    dim,
    stride_qn,
    stride_qt,
    stride_qe,
    stride_dn,
    stride_dt,
    stride_de,
    BLOCK_Q: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    # One program scores one (query, document) pair. Neighbouring programs share the document, so it is
    # read from memory once and from L2 by the other queries of a batch.
    pid = tl.program_id(0).to(tl.int64)
    qi = pid % nq
    di = pid // nq
    q_len = tl.load(q_len_ptr + qi).to(tl.int32)
    d_len = tl.load(d_len_ptr + di).to(tl.int32)
    cols = tl.arange(0, BLOCK_DIM)
    total = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for q_start in range(0, q_len, BLOCK_Q):
        rows = q_start + tl.arange(0, BLOCK_Q)
        q_tile = _load_tokens(q_ptr + qi * stride_qn, rows, q_len, stride_qt, cols, dim, stride_qe)
        best = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
        for t_start in range(0, d_len, BLOCK_T):
            toks = t_start + tl.arange(0, BLOCK_T)
            d_tile = _load_tokens(d_ptr + di * stride_dn, toks, d_len, stride_dt, cols, dim, stride_de)
            sim = dot(q_tile, tl.trans(d_tile))  # (BLOCK_Q, BLOCK_T) fp32
            sim = tl.where((toks < d_len)[None, :], sim, float("-inf"))
            best = tl.maximum(best, tl.max(sim, axis=1))
        # An empty document leaves best at -inf; it scores 0, like padded query tokens.
        total += tl.where((rows < q_len) & (d_len > 0), best, 0.0)
    tl.store(out_ptr + qi * nd + di, tl.sum(total, axis=0))


def _maxsim_triton(
    q: torch.Tensor, q_lengths: torch.Tensor, d: torch.Tensor, d_lengths: torch.Tensor
) -> torch.Tensor:
    check_triton_device(q, "q")
    nq, lq, dim = q.shape
    nd = d.shape[0]
    if dim > _MAX_TRITON_DIM:
        raise KernelInputError(
            "q", f"token dim {dim} is above the Triton kernel's limit {_MAX_TRITON_DIM} (use 'torch')"
        )
    out = torch.empty(nq, nd, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    # tl.dot needs tiles of at least 16 rows/columns; the dim tile is padded (masked) to a power of two.
    block_q = 16 if INTERPRETED else min(64, max(16, triton.next_power_of_2(lq)))
    block_dim = max(16, triton.next_power_of_2(dim))
    _maxsim_kernel[(nq * nd,)](
        q,
        q_lengths.contiguous(),
        d,
        d_lengths.contiguous(),
        out,
        nq,
        nd,
        dim,
        *q.stride(),
        *d.stride(),
        BLOCK_Q=block_q,
        BLOCK_DIM=block_dim,
    )
    return out


def maxsim(
    q: torch.Tensor,
    q_lengths: torch.Tensor,
    d: torch.Tensor,
    d_lengths: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """MaxSim scores `(nq, nd)` float32 of padded queries `q (nq, Lq, dim)` against padded documents
    `d (nd, Ld, dim)` (see the module docstring). backend: "auto" runs the Triton kernel on CUDA tensors
    and the torch reference elsewhere; "triton" forces the kernel (on a CPU only under TRITON_INTERPRET=1);
    "torch" forces the reference. Raises KernelInputError naming the argument on bad input."""
    check_backend(backend)
    if backend == "torch" or (backend == "auto" and not (isinstance(q, torch.Tensor) and q.is_cuda)):
        return maxsim_reference(q, q_lengths, d, d_lengths)
    _check_inputs(q, q_lengths, d, d_lengths)
    return _maxsim_triton(q, q_lengths, d, d_lengths)
