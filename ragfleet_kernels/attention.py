"""Scaled dot-product attention: a FlashAttention-2-style Triton kernel and the plain PyTorch reference.

`attention(q, k, v, ...)` is what models call. q is `(batch, heads, Lq, d)`, k and v `(batch, heads, Lk, d)`;
the result is `(batch, heads, Lq, d)` in q's dtype. Lq may differ from Lk (cross-attention, or decoding
against a KV cache).

Masking:
  causal     bottom-right aligned: query i sits at absolute position Lk - Lq + i and sees the keys
             j <= Lk - Lq + i. With Lq == Lk this is the usual lower triangle; with Lq < Lk the queries are
             the last Lq positions of the sequence, which is what KV-cached decoding needs (Lq = 1 sees
             every key). With Lq > Lk the first Lq - Lk queries see no key.
  k_lengths  `(batch,)` integers in [0, Lk]; in batch row b the keys at positions >= k_lengths[b] are padding.
             Host tensors out of range are rejected; device ones are clamped (checking would sync).
A query that sees no key at all gets a zero output row and zero gradients (never NaN).

Backends: "torch" is the reference, also named `attention_reference` (matmul, mask, softmax in fp32,
matmul; it is what models run on a CPU, and the independent check for the kernel). "triton" is the kernel
(CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before triton was first imported). "auto"
picks the kernel for CUDA tensors it supports (fp16/bf16/fp32, head dim 32/64/128), else the reference.

The kernel is written here rather than taken from torch because owning it is the point of the project;
torch's `scaled_dot_product_attention` is the baseline it is benchmarked against (bench/attention.py).
It follows FlashAttention-2 (Dao, 2023): the forward keeps a Q tile on chip and streams K/V tiles
with an online softmax in base 2, skipping key blocks no query of the tile sees and masking only the
blocks that need it; it stores the log-sum-exp per row. The backward recomputes the probabilities from
it: one program per K/V block accumulates dK and dV over the query blocks, and a separate kernel
accumulates dQ over the key blocks (no atomics, so gradients are deterministic).
"""

from __future__ import annotations

import functools
import math

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

TRITON_HEAD_DIMS = (32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = [
    "BACKENDS",
    "INTERPRETED",
    "TRITON_DTYPES",
    "TRITON_HEAD_DIMS",
    "attention",
    "attention_reference",
    "resolve_backend",
]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    k_lengths: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v, by the backend `resolve_backend(backend, q)` names.

    scale defaults to 1/sqrt(d). See the module docstring for the masks and the backends.
    """
    run_triton = resolve_backend(backend, q) == "triton"
    _check_inputs(q, k, v, k_lengths)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not run_triton:
        return _attention_torch(q, k, v, causal, scale, k_lengths)
    _check_triton_inputs(q)
    if k_lengths is not None:
        k_lengths = k_lengths.to(device=q.device, dtype=torch.int32)
    return _FlashAttention.apply(q, k, v, causal, scale, k_lengths)


# The reference under its own name: what models run on a CPU, and what the kernel is checked against.
attention_reference = functools.partial(attention, backend="torch")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend ("triton" or "torch") that `attention(q, ..., backend=backend)` runs."""
    check_backend(backend)
    if backend == "auto":
        supported = q.is_cuda and q.dtype in TRITON_DTYPES and q.ndim == 4 and q.shape[-1] in TRITON_HEAD_DIMS
        return "triton" if supported else "torch"
    return backend


def _attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    k_lengths: torch.Tensor | None,
) -> torch.Tensor:
    """Scores, mask, softmax and weighted sum in plain PyTorch, in fp32 (fp64 stays fp64). Differentiable."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * scale
    visible = _visibility(q.shape[2], k.shape[2], causal, k_lengths, q.device)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    # The softmax is spelled out so that a row with no visible key yields zeros with zero gradients:
    # its weights are exp(-inf) = 0 and its normaliser 0 is replaced by 1 (every other row's is >= 1).
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))
    return torch.matmul(probs, v.to(compute)).to(q.dtype)


def _check_triton_inputs(q: torch.Tensor) -> None:
    if q.dtype not in TRITON_DTYPES:
        raise KernelInputError("q", f"the Triton kernel takes float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise KernelInputError(
            "q",
            f"the Triton kernel takes head dims {TRITON_HEAD_DIMS}, got {q.shape[-1]}; use backend 'torch'",
        )
    check_triton_device(q, "q")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lengths: torch.Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise KernelInputError(name, f"must be (batch, heads, length, head_dim), got {tuple(t.shape)}")
        if t.numel() == 0:
            raise KernelInputError(name, f"must be non-empty, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise KernelInputError(name, f"must be a floating-point tensor, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise KernelInputError("k, v", "must have q's dtype and device")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise KernelInputError(
            "k, v",
            f"shapes {tuple(k.shape)}, {tuple(v.shape)} do not fit q's {tuple(q.shape)}: "
            "need (batch, heads, Lk, head_dim) with q's batch, heads and head_dim",
        )
    if k_lengths is not None:
        if k_lengths.shape != (q.shape[0],) or k_lengths.is_floating_point() or k_lengths.is_complex():
            raise KernelInputError("k_lengths", f"must be integers of shape ({q.shape[0]},)")
        # Reading values off a GPU would stall every call (decoding makes thousands), so only host
        # tensors are range-checked; the kernel and the reference clamp device values into [0, Lk].
        if k_lengths.device.type == "cpu" and bool(((k_lengths < 0) | (k_lengths > k.shape[2])).any()):
            raise KernelInputError("k_lengths", f"values must lie in [0, {k.shape[2]}]")


def _visibility(
    lq: int, lk: int, causal: bool, k_lengths: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Which keys each query sees, broadcastable to (batch, heads, Lq, Lk); None when all of them."""
    visible = None
    keys = torch.arange(lk, device=device)
    if causal:
        positions = torch.arange(lq, device=device) + (lk - lq)
        visible = keys[None, :] <= positions[:, None]
    if k_lengths is not None:
        present = (keys[None, :] < k_lengths.to(device)[:, None])[:, None, None, :]
        visible = present if visible is None else present & visible
    return visible


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. Scores are kept in base 2: qk_scale = scale / ln 2, so exp(s) == exp2(qk · qk_scale), and
# LSE holds m + log2(l) per query row (+inf for a row that sees no key, which makes its probabilities 0).
# Each tensor comes with its (batch, head, row) strides as one tuple; its head dim is contiguous. Inside a
# program, one head's rows of a tensor are `(start, step)`: its first row and the stride between rows.


def _configs(gpu: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotuning candidates (BLOCK_M, BLOCK_N, warps, stages); the interpreter gets one small tile."""
    if INTERPRETED:
        gpu = [(16, 16, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]


def _fp32_takes_the_smallest(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """fp32 tiles take twice the shared memory and registers of fp16 ones, and exact fp32 dots are slow to
    compile and to run; fp32 is there for checking, so it gets the smallest tile instead of a tuning run."""
    if named_args["Q"].dtype != torch.float32:
        return configs
    return [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], -c.num_stages))]


def _autotune(configs: list[tuple[int, int, int, int]]):
    # The key is the head dim, masks and lengths rounded up to a power of two (LQ_BUCKET, LK_BUCKET,
    # otherwise unused): keying on exact lengths would re-tune at every step of KV-cached decoding.
    return triton.autotune(
        configs=_configs(configs),
        key=["HEAD_DIM", "CAUSAL", "HAS_KLEN", "LQ_BUCKET", "LK_BUCKET"],
        prune_configs_by={"early_config_prune": _fp32_takes_the_smallest},
    )


@triton.jit
def _program_block(H, BLOCK: tl.constexpr):
    """This program's block of rows (grid axis 0): its first row and its rows; and its row bh of the
    (batch x heads) axis 1, with its batch and head (int64 for the offsets)."""
    start = tl.program_id(0) * BLOCK
    bh = tl.program_id(1)
    return start, start + tl.arange(0, BLOCK), bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _head_rows(X, strides, b, h):
    """The rows of head h of batch row b of X (batch, heads, length, HEAD_DIM), as (start, step)."""
    return X + b * strides[0] + h * strides[1], strides[2]


@triton.jit
def _row_ptrs(rows, offs, HEAD_DIM: tl.constexpr):
    start, step = rows
    return start + offs[:, None] * step + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _load_rows(rows, offs, limit, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The rows `offs` of one head, (len(offs), HEAD_DIM); with MASKED, rows from `limit` on read as zeros."""
    if MASKED:
        tile = tl.load(_row_ptrs(rows, offs, HEAD_DIM), mask=(offs < limit)[:, None], other=0.0)
    else:
        tile = tl.load(_row_ptrs(rows, offs, HEAD_DIM))
    return tile


@triton.jit
def _store_rows(rows, offs, limit, tile):
    """Writes tile (len(offs), HEAD_DIM) into the rows `offs` below `limit`, in the tensor's dtype."""
    ptrs = _row_ptrs(rows, offs, tile.shape[1])
    tl.store(ptrs, tile.to(rows[0].dtype.element_ty), mask=(offs < limit)[:, None])


@triton.jit
def _keys_present(KLEN, b, LK, HAS_KLEN: tl.constexpr):
    """How many keys batch row b has: its k_lengths value clamped into [0, LK], or LK."""
    end = LK
    if HAS_KLEN:
        end = tl.maximum(tl.minimum(tl.load(KLEN + b), LK), 0)
    return end


@triton.jit
def _key_range(KLEN, b, start_m, LQ, LK, CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, BLOCK_M, BLOCK_N):
    """For the query rows [start_m, start_m + BLOCK_M): keys below `full_end` (a multiple of BLOCK_N) are
    visible to every row; keys from `end` on to none."""
    end = _keys_present(KLEN, b, LK, HAS_KLEN)
    full_end = end
    if CAUSAL:
        end = tl.minimum(end, start_m + BLOCK_M + LK - LQ)
        full_end = tl.minimum(full_end, start_m + 1 + LK - LQ)
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    return end, full_end


@triton.jit
def _visible(q_pos, k_pos, end, shift, CAUSAL: tl.constexpr):
    """Which (query, key) pairs of a masked tile count, from query and key positions that broadcast: the
    key is not padding (below `end`) and, when causal, not after the query (k_pos <= q_pos + LK - LQ)."""
    visible = k_pos < end
    if CAUSAL:
        visible = visible & (k_pos <= q_pos + shift)
    return visible


@triton.jit
def _key_block(q, k_rows, v_rows, offs_n, end, MASKED: tl.constexpr):
    """The keys and values at `offs_n` (zeros from `end` on when MASKED) and the query tile's raw scores."""
    k = _load_rows(k_rows, offs_n, end, MASKED, q.shape[1])
    v = _load_rows(v_rows, offs_n, end, MASKED, q.shape[1])
    return k, v, dot(q, tl.trans(k))


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, k_rows, v_rows, offs_m, start_n, end, shift, qk_scale, CAUSAL, MASKED, BLOCK_N
):
    """Folds one key block into the online softmax: running row max m_i, row sum l_i, output acc."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    _, v, qk = _key_block(q, k_rows, v_rows, offs_n, end, MASKED)
    qk = qk * qk_scale
    if MASKED:
        qk = tl.where(_visible(offs_m[:, None], offs_n[None, :], end, shift, CAUSAL), qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_ref = m_new
    if MASKED:
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
    return acc, l_i, m_new


# The kernels' parameters stand one group a line: tensors and scales, their strides, sizes, compile-time
# constants.
@_autotune([(128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4)])
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, KLEN, qk_scale,
    q_strides, k_strides, v_strides, o_strides,
    H, LQ, LK, LQ_BUCKET, LK_BUCKET,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program per query block: its output rows and their LSE."""
    start_m, offs_m, bh, b, h = _program_block(H, BLOCK_M)
    q = _load_rows(_head_rows(Q, q_strides, b, h), offs_m, LQ, True, HEAD_DIM)
    k_rows, v_rows = _head_rows(K, k_strides, b, h), _head_rows(V, v_strides, b, h)
    end, full_end = _key_range(KLEN, b, start_m, LQ, LK, CAUSAL, HAS_KLEN, BLOCK_M, BLOCK_N)
    shift = LK - LQ
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_rows, v_rows, offs_m, start_n, end, shift, qk_scale, CAUSAL, False, BLOCK_N
        )
    for start_n in range(full_end, end, BLOCK_N):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_rows, v_rows, offs_m, start_n, end, shift, qk_scale, CAUSAL, True, BLOCK_N
        )
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + bh * LQ + offs_m, lse, mask=offs_m < LQ)
    _store_rows(_head_rows(Out, o_strides, b, h), offs_m, LQ, acc / l_safe[:, None])


@triton.jit
def _delta_kernel(
    Out, DO, DELTA, o_strides, do_strides, H, LQ, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr
):
    """Delta = rowsum(O ∘ dO), the softmax backward's per-row correction."""
    _, offs_m, bh, b, h = _program_block(H, BLOCK_M)
    o = _load_rows(_head_rows(Out, o_strides, b, h), offs_m, LQ, True, HEAD_DIM)
    do = _load_rows(_head_rows(DO, do_strides, b, h), offs_m, LQ, True, HEAD_DIM)
    tl.store(DELTA + bh * LQ + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < LQ)


@triton.jit
def _query_block(queries, offs_m, LQ, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows `offs_m` of one head as the backward needs them, (Q, dO, LSE, Delta), from where `queries` says
    their rows are: (Q rows, dO rows, LSE row, Delta row)."""
    q_rows, do_rows, lse_row, delta_row = queries
    q = _load_rows(q_rows, offs_m, LQ, MASKED, HEAD_DIM)
    do = _load_rows(do_rows, offs_m, LQ, MASKED, HEAD_DIM)
    if MASKED:
        lse = tl.load(lse_row + offs_m, mask=offs_m < LQ, other=float("inf"))
        delta = tl.load(delta_row + offs_m, mask=offs_m < LQ, other=0.0)
    else:
        lse = tl.load(lse_row + offs_m)
        delta = tl.load(delta_row + offs_m)
    return q, do, lse, delta


@triton.jit
def _backward_rows(Q, DO, LSE, DELTA, q_strides, do_strides, bh, b, h, LQ):
    """Where the rows of one head's Q, dO, LSE and Delta are, for `_query_block`."""
    return _head_rows(Q, q_strides, b, h), _head_rows(DO, do_strides, b, h), LSE + bh * LQ, DELTA + bh * LQ


@triton.jit
def _dkdv_step(dk, dv, k, v, queries, offs_n, start_m, end, LQ, shift, qk_scale, CAUSAL, MASKED, BLOCK_M):
    """Adds one query block's share to the key block's dK and dV."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q, do, lse, delta = _query_block(queries, offs_m, LQ, MASKED, k.shape[1])
    # Transposed tiles (keys x queries), so dK and dV accumulate without transposing back.
    p_t = tl.math.exp2(dot(k, tl.trans(q)) * qk_scale - lse[None, :])
    if MASKED:
        visible = _visible(offs_m[None, :], offs_n[:, None], end, shift, CAUSAL) & (offs_m < LQ)[None, :]
        p_t = tl.where(visible, p_t, 0.0)
    dv += dot(p_t.to(do.dtype), do)
    ds_t = p_t * (dot(v, tl.trans(do)) - delta[None, :])
    dk += dot(ds_t.to(q.dtype), q)
    return dk, dv


@_autotune([(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)])
@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KLEN, scale, qk_scale,
    q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
    H, LQ, LK, LQ_BUCKET, LK_BUCKET,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program per key block: dV = Pᵀ dO and dK = scale · dSᵀ Q, summed over the query blocks."""
    start_n, offs_n, bh, b, h = _program_block(H, BLOCK_N)
    queries = _backward_rows(Q, DO, LSE, DELTA, q_strides, do_strides, bh, b, h, LQ)
    k = _load_rows(_head_rows(K, k_strides, b, h), offs_n, LK, True, HEAD_DIM)
    v = _load_rows(_head_rows(V, v_strides, b, h), offs_n, LK, True, HEAD_DIM)
    end = _keys_present(KLEN, b, LK, HAS_KLEN)
    shift = LK - LQ
    # Query blocks [lo, mid_lo) and [mid_hi, LQ) need masks; in [mid_lo, mid_hi) every query exists and sees
    # every key of this block. Causal: query i sees key j when j <= i + shift.
    lo = 0
    all_visible_from = 0
    if CAUSAL:
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        all_visible_from = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
    full_rows_end = LQ // BLOCK_M * BLOCK_M
    if start_n + BLOCK_N > end:  # the block holds padding keys: mask every query block
        all_visible_from = full_rows_end
    mid_lo = tl.maximum(lo, tl.minimum(all_visible_from, full_rows_end))
    mid_hi = tl.maximum(mid_lo, full_rows_end)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(lo, mid_lo, BLOCK_M):
        dk, dv = _dkdv_step(
            dk, dv, k, v, queries, offs_n, start_m, end, LQ, shift, qk_scale, CAUSAL, True, BLOCK_M
        )
    for start_m in range(mid_lo, mid_hi, BLOCK_M):
        dk, dv = _dkdv_step(
            dk, dv, k, v, queries, offs_n, start_m, end, LQ, shift, qk_scale, CAUSAL, False, BLOCK_M
        )
    for start_m in range(mid_hi, LQ, BLOCK_M):
        dk, dv = _dkdv_step(
            dk, dv, k, v, queries, offs_n, start_m, end, LQ, shift, qk_scale, CAUSAL, True, BLOCK_M
        )
    _store_rows(_head_rows(DK, dk_strides, b, h), offs_n, LK, dk * scale)
    _store_rows(_head_rows(DV, dv_strides, b, h), offs_n, LK, dv)


@triton.jit
def _dq_step(dq, query, k_rows, v_rows, offs_m, start_n, end, shift, qk_scale, CAUSAL, MASKED, BLOCK_N):
    """Adds one key block's share to the query block's dQ; `query` is its (Q, dO, LSE, Delta)."""
    q, do, lse, delta = query
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v, qk = _key_block(q, k_rows, v_rows, offs_n, end, MASKED)
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(_visible(offs_m[:, None], offs_n[None, :], end, shift, CAUSAL), p, 0.0)
    ds = p * (dot(do, tl.trans(v)) - delta[:, None])
    return dq + dot(ds.to(k.dtype), k)


@_autotune([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)])
@triton.jit
def _dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KLEN, scale, qk_scale,
    q_strides, k_strides, v_strides, do_strides, dq_strides,
    H, LQ, LK, LQ_BUCKET, LK_BUCKET,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program per query block: dQ = scale · dS K, summed over the key blocks it sees."""
    start_m, offs_m, bh, b, h = _program_block(H, BLOCK_M)
    k_rows, v_rows = _head_rows(K, k_strides, b, h), _head_rows(V, v_strides, b, h)
    queries = _backward_rows(Q, DO, LSE, DELTA, q_strides, do_strides, bh, b, h, LQ)
    query = _query_block(queries, offs_m, LQ, True, HEAD_DIM)
    end, full_end = _key_range(KLEN, b, start_m, LQ, LK, CAUSAL, HAS_KLEN, BLOCK_M, BLOCK_N)
    shift = LK - LQ
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_step(
            dq, query, k_rows, v_rows, offs_m, start_n, end, shift, qk_scale, CAUSAL, False, BLOCK_N
        )
    for start_n in range(full_end, end, BLOCK_N):
        dq = _dq_step(dq, query, k_rows, v_rows, offs_m, start_n, end, shift, qk_scale, CAUSAL, True, BLOCK_N)
    _store_rows(_head_rows(DQ, dq_strides, b, h), offs_m, LQ, dq * scale)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/head/row strides but need the head dim contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride()[:3]


def _shape_args(q: torch.Tensor, k: torch.Tensor, causal: bool, k_lengths: torch.Tensor | None) -> dict:
    lq, lk = q.shape[2], k.shape[2]
    return {
        "H": q.shape[1],
        "LQ": lq,
        "LK": lk,
        "LQ_BUCKET": triton.next_power_of_2(lq),
        "LK_BUCKET": triton.next_power_of_2(lk),
        "CAUSAL": causal,
        "HAS_KLEN": k_lengths is not None,
        "HEAD_DIM": q.shape[-1],
    }


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, k_lengths):
        q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
        batch, heads, lq, _ = q.shape
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((batch * heads, lq), dtype=torch.float32, device=q.device)
        grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        strides = (_strides(q), _strides(k), _strides(v), _strides(o))
        _fwd_kernel[grid](
            q, k, v, o, lse, k_lengths, scale / math.log(2), *strides, **_shape_args(q, k, causal, k_lengths)
        )
        ctx.save_for_backward(q, k, v, o, lse, k_lengths)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, k_lengths = ctx.saved_tensors
        do = _rows_contiguous(do)
        batch, heads, lq, head_dim = q.shape
        lk = k.shape[2]
        args = _shape_args(q, k, ctx.causal, k_lengths)
        scales = (ctx.scale, ctx.scale / math.log(2))

        delta = torch.empty((batch * heads, lq), dtype=torch.float32, device=q.device)
        delta_block = 32
        _delta_kernel[(triton.cdiv(lq, delta_block), batch * heads)](
            o, do, delta, _strides(o), _strides(do), heads, lq, HEAD_DIM=head_dim, BLOCK_M=delta_block
        )
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        strides = (_strides(q), _strides(k), _strides(v), _strides(do))
        dkdv_grid = lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), batch * heads)  # noqa: E731
        _dkdv_kernel[dkdv_grid](
            q, k, v, do, dk, dv, lse, delta, k_lengths, *scales, *strides, _strides(dk), _strides(dv), **args
        )
        dq_grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _dq_kernel[dq_grid](q, k, v, do, dq, lse, delta, k_lengths, *scales, *strides, _strides(dq), **args)
        return dq, dk, dv, None, None, None
