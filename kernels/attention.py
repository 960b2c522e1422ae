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

Backends: "torch" is `attention_reference` (matmul, mask, softmax in fp32, matmul; it is what models run
on a CPU, and the independent check for the kernel). "triton" is the kernel (CUDA tensors, or CPU tensors
when TRITON_INTERPRET=1 was set before triton was first imported). "auto" picks the kernel for CUDA
tensors it supports (fp16/bf16/fp32, head dim 32/64/128) and the reference otherwise.

The kernel is written here rather than taken from torch because the project's point is to own it (issue
#3); torch's `scaled_dot_product_attention` is the baseline it is benchmarked against (bench/attention.py).
It follows FlashAttention-2 (see REFERENCES.md): the forward keeps a Q tile on chip and streams K/V tiles
with an online softmax in base 2, skipping key blocks no query of the tile sees and masking only the
blocks that need it; it stores the log-sum-exp per row. The backward recomputes the probabilities from
it: one program per K/V block accumulates dK and dV over the query blocks, and a separate kernel
accumulates dQ over the key blocks (no atomics, so gradients are deterministic).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from services.runtime.errors import failed_precondition, invalid_argument

BACKENDS = ("auto", "triton", "torch")
TRITON_HEAD_DIMS = (32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Whether the kernels run in Triton's CPU interpreter. Triton binds its own tl.* helpers to compiled or
# interpreted code when it is imported, and our kernels when they are decorated below; the interpreter works
# only if TRITON_INTERPRET was set before both.
_INTERPRET_SET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
INTERPRETED = _INTERPRET_SET and not isinstance(tl.max, triton.runtime.JITFunction)

__all__ = [
    "BACKENDS",
    "INTERPRETED",
    "TRITON_DTYPES",
    "TRITON_HEAD_DIMS",
    "attention",
    "attention_reference",
    "flash_attention",
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
    if resolve_backend(backend, q) == "triton":
        return flash_attention(q, k, v, causal=causal, scale=scale, k_lengths=k_lengths)
    return attention_reference(q, k, v, causal=causal, scale=scale, k_lengths=k_lengths)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend ("triton" or "torch") that `attention(q, ..., backend=backend)` runs."""
    if backend not in BACKENDS:
        raise invalid_argument("backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        supported = q.is_cuda and q.dtype in TRITON_DTYPES and q.ndim == 4 and q.shape[-1] in TRITON_HEAD_DIMS
        return "triton" if supported else "torch"
    return backend


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    k_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention in plain PyTorch: scores, mask, softmax, weighted sum, all in fp32 (fp64 stays fp64).
    Differentiable."""
    _check_inputs(q, k, v, k_lengths)
    scale = _default_scale(q, scale)
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


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    k_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention by the Triton kernels (forward and backward). Same contract as `attention_reference`."""
    _check_inputs(q, k, v, k_lengths)
    if q.dtype not in TRITON_DTYPES:
        raise invalid_argument("q", f"the Triton kernel takes float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise invalid_argument(
            "q",
            f"the Triton kernel takes head dims {TRITON_HEAD_DIMS}, got {q.shape[-1]}; use backend 'torch'",
        )
    if not (q.is_cuda or INTERPRETED):
        raise failed_precondition(
            "backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is first imported"
        )
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        raise failed_precondition("Triton's CPU interpreter computes bfloat16 wrongly; cast to float32")
    if k_lengths is not None:
        k_lengths = k_lengths.to(device=q.device, dtype=torch.int32)
    return _FlashAttention.apply(q, k, v, causal, _default_scale(q, scale), k_lengths)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lengths: torch.Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise invalid_argument(name, f"must be (batch, heads, length, head_dim), got {tuple(t.shape)}")
        if t.numel() == 0:
            raise invalid_argument(name, f"must be non-empty, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise invalid_argument(name, f"must be a floating-point tensor, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise invalid_argument("k, v", "must have q's dtype and device")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise invalid_argument(
            "k, v",
            f"shapes {tuple(k.shape)}, {tuple(v.shape)} do not fit q's {tuple(q.shape)}: "
            "need (batch, heads, Lk, head_dim) with q's batch, heads and head_dim",
        )
    if k_lengths is not None:
        if k_lengths.shape != (q.shape[0],) or k_lengths.is_floating_point() or k_lengths.is_complex():
            raise invalid_argument("k_lengths", f"must be integers of shape ({q.shape[0]},)")
        # Reading values off a GPU would stall every call (decoding makes thousands), so only host
        # tensors are range-checked; the kernel and the reference clamp device values into [0, Lk].
        if k_lengths.device.type == "cpu" and bool(((k_lengths < 0) | (k_lengths > k.shape[2])).any()):
            raise invalid_argument("k_lengths", f"values must lie in [0, {k.shape[2]}]")


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


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


# The autotuners key on the head dim, masks and lengths rounded up to a power of two (LQ_BUCKET, LK_BUCKET,
# otherwise unused): keying on exact lengths would re-tune at every step of KV-cached decoding.
_TUNING_KEY = ["HEAD_DIM", "CAUSAL", "HAS_KLEN", "LQ_BUCKET", "LK_BUCKET"]


@triton.jit
def _key_range(
    KLEN,
    b,
    start_m,
    LQ,
    LK,
    CAUSAL: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """For the query rows [start_m, start_m + BLOCK_M): keys below `full_end` (a multiple of BLOCK_N) are
    visible to every row; keys from `end` on to none."""
    end = LK
    if HAS_KLEN:
        end = tl.maximum(tl.minimum(tl.load(KLEN + b), LK), 0)
    full_end = end
    if CAUSAL:
        end = tl.minimum(end, start_m + BLOCK_M + LK - LQ)
        full_end = tl.minimum(full_end, start_m + 1 + LK - LQ)
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    return end, full_end


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    offs_m,
    lo,
    hi,
    end,
    shift,
    qk_scale,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            present = offs_n < end
            k = tl.load(k_ptrs, mask=present[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=present[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = present[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = m_new
        if MASKED:
            # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_configs([(128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4)]),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _fp32_takes_the_smallest},
)
@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    KLEN,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    H,
    LQ,
    LK,
    LQ_BUCKET,
    LK_BUCKET,
    CAUSAL: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < LQ
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=rows[:, None], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    end, full_end = _key_range(KLEN, b, start_m, LQ, LK, CAUSAL, HAS_KLEN, BLOCK_M, BLOCK_N)
    shift = LK - LQ
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        offs_m,
        0,
        full_end,
        end,
        shift,
        qk_scale,
        CAUSAL,
        False,
        BLOCK_N,
        HEAD_DIM,
        DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        offs_m,
        full_end,
        end,
        end,
        shift,
        qk_scale,
        CAUSAL,
        True,
        BLOCK_N,
        HEAD_DIM,
        DOT_PRECISION,
    )

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + bh * LQ + offs_m, lse, mask=rows)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=rows[:, None])


@triton.jit
def _delta_kernel(
    Out,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    H,
    LQ,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Delta = rowsum(O ∘ dO), the softmax backward's per-row correction."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < LQ
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
        mask=rows[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
        mask=rows[:, None],
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * LQ + offs_m, delta, mask=rows)


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qm,
    stride_dom,
    offs_n,
    lo,
    hi,
    end,
    LQ,
    shift,
    qk_scale,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_d[None, :]
        if MASKED:
            rows = offs_m < LQ
            q = tl.load(q_ptrs, mask=rows[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=rows[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=rows, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # Transposed tiles (keys x queries), so dK and dV accumulate without transposing back.
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            visible = (offs_n[:, None] < end) & rows[None, :]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + shift)
            p_t = tl.where(visible, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(
    configs=_configs([(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)]),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _fp32_takes_the_smallest},
)
@triton.jit
def _dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    KLEN,
    scale,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    H,
    LQ,
    LK,
    LQ_BUCKET,
    LK_BUCKET,
    CAUSAL: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per key block: dV = Pᵀ dO and dK = scale · dSᵀ Q, summed over the query blocks."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = offs_n < LK
    k = tl.load(
        K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
        mask=keys[:, None],
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
        mask=keys[:, None],
        other=0.0,
    )
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + bh * LQ
    delta_base = DELTA + bh * LQ

    end = LK
    if HAS_KLEN:
        end = tl.maximum(tl.minimum(tl.load(KLEN + b), LK), 0)
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
    dk, dv = _dkdv_inner(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        lse_base,
        delta_base,
        stride_qm,
        stride_dom,
        offs_n,
        lo,
        mid_lo,
        end,
        LQ,
        shift,
        qk_scale,
        CAUSAL,
        True,
        BLOCK_M,
        HEAD_DIM,
        DOT_PRECISION,
    )
    dk, dv = _dkdv_inner(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        lse_base,
        delta_base,
        stride_qm,
        stride_dom,
        offs_n,
        mid_lo,
        mid_hi,
        end,
        LQ,
        shift,
        qk_scale,
        CAUSAL,
        False,
        BLOCK_M,
        HEAD_DIM,
        DOT_PRECISION,
    )
    dk, dv = _dkdv_inner(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        lse_base,
        delta_base,
        stride_qm,
        stride_dom,
        offs_n,
        mid_hi,
        LQ,
        end,
        LQ,
        shift,
        qk_scale,
        CAUSAL,
        True,
        BLOCK_M,
        HEAD_DIM,
        DOT_PRECISION,
    )

    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=keys[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=keys[:, None])


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    offs_m,
    lo,
    hi,
    end,
    shift,
    qk_scale,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            present = offs_n < end
            k = tl.load(k_ptrs, mask=present[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=present[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            visible = present[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(
    configs=_configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)]),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _fp32_takes_the_smallest},
)
@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    KLEN,
    scale,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    H,
    LQ,
    LK,
    LQ_BUCKET,
    LK_BUCKET,
    CAUSAL: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per query block: dQ = scale · dS K, summed over the key blocks it sees."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < LQ
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=rows[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
        mask=rows[:, None],
        other=0.0,
    )
    lse = tl.load(LSE + bh * LQ + offs_m, mask=rows, other=float("inf"))
    delta = tl.load(DELTA + bh * LQ + offs_m, mask=rows, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    end, full_end = _key_range(KLEN, b, start_m, LQ, LK, CAUSAL, HAS_KLEN, BLOCK_M, BLOCK_N)
    shift = LK - LQ
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        offs_m,
        0,
        full_end,
        end,
        shift,
        qk_scale,
        CAUSAL,
        False,
        BLOCK_N,
        HEAD_DIM,
        DOT_PRECISION,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        offs_m,
        full_end,
        end,
        end,
        shift,
        qk_scale,
        CAUSAL,
        True,
        BLOCK_N,
        HEAD_DIM,
        DOT_PRECISION,
    )
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=rows[:, None])


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/head/row strides but need the head dim contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


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
        # fp32 inputs get exact fp32 products rather than TF32, matching the reference.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, k_lengths):
        q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
        batch, heads, lq, _ = q.shape
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((batch * heads, lq), dtype=torch.float32, device=q.device)
        args = _shape_args(q, k, causal, k_lengths)
        grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _fwd_kernel[grid](
            q,
            k,
            v,
            o,
            lse,
            k_lengths,
            scale / math.log(2),
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *o.stride()[:3],
            **args,
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
        qk_scale = ctx.scale / math.log(2)

        delta = torch.empty((batch * heads, lq), dtype=torch.float32, device=q.device)
        delta_block = 32
        _delta_kernel[(triton.cdiv(lq, delta_block), batch * heads)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], heads, lq, HEAD_DIM=head_dim, BLOCK_M=delta_block
        )
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
        dkdv_grid = lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), batch * heads)  # noqa: E731
        _dkdv_kernel[dkdv_grid](
            q,
            k,
            v,
            do,
            dk,
            dv,
            lse,
            delta,
            k_lengths,
            ctx.scale,
            qk_scale,
            *strides,
            *dk.stride()[:3],
            *dv.stride()[:3],
            **args,
        )
        dq_grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _dq_kernel[dq_grid](
            q, k, v, do, dq, lse, delta, k_lengths, ctx.scale, qk_scale, *strides, *dq.stride()[:3], **args
        )
        return dq, dk, dv, None, None, None
