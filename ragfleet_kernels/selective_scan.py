"""Mamba-1's selective scan: a Triton kernel (chunked parallel scan), two PyTorch paths, one dispatcher.

`selective_scan(u, delta, A, B, C, ...)` is what the Mamba encoder calls; it follows mamba_ssm's
`selective_scan_fn`. Shapes: u, delta and z `(batch, dim, L)`; A `(dim, dstate)`, real (the caller passes
A = -exp(A_log)); B and C `(batch, dstate, L)` (input-dependent); D and delta_bias `(dim,)`; the state
`(batch, dim, dstate)`. Per channel d and state n:

    dt_t = softplus(delta_t + delta_bias)  (or delta_t + delta_bias without delta_softplus)
    x_t  = exp(dt_t A) x_{t-1} + dt_t B_t u_t        x_{-1} = initial_state (zeros by default)
    y_t  = sum_n C_t x_t + D u_t,   then y *= silu(z)

Everything is computed in fp32 (fp64 inputs stay fp64); y comes back in u's dtype, the last state
x_{L-1} (`return_last_state`, for streaming encode: scanning [a; b] equals scanning b from a's last state)
in fp32 (fp64 for fp64 inputs). Gradients flow through every backend to every tensor argument, the state
included.

Backends:
  torch          the reference, also named `selective_scan_ref`: the recurrence one step at a time.
  torch-chunked  a blocked recurrence for CPUs: the sequence is cut into chunks of T steps; all chunks run
                 their local scans at once from a zero state (T vectorised steps), the states entering the
                 chunks are carried across the L/T chunks with the decay through a whole chunk, exp(sum of
                 dt·A) <= 1 (no overflow), and all chunks run again from their true entering states,
                 reading out y. About 2T + L/T Python steps instead of L, each on L/T times more data;
                 T is a power of two near sqrt(L/2).
  triton         the kernel (CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before triton was
                 first imported): one program per (batch row, block of channels) holds the state of its
                 channels and walks the sequence chunk by chunk; inside a chunk the recurrence is a
                 parallel associative scan over time of the pairs (exp(dt A), dt B u). The forward keeps the
                 state at every chunk boundary; the backward walks the chunks in reverse, recomputes each
                 chunk's states from its boundary and runs the adjoint recurrence g_t = C_t dy_t +
                 exp(dt_{t+1} A) g_{t+1} as a reverse scan. Reductions over channels (dB, dC) and over time
                 (dA, dD, d delta_bias) are written per program and summed by torch: no atomics, so the
                 gradients are deterministic.
  auto           triton for CUDA tensors, else the torch path measured fastest on CPUs (`CPU_BACKEND`;
                 bench/selective_scan.py measures it).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ragfleet_kernels.common import INTERPRETED, KernelInputError, check_triton_device

__all__ = [
    "CPU_BACKEND",
    "SCAN_BACKENDS",
    "resolve_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
]

SCAN_BACKENDS = ("auto", "triton", "torch", "torch-chunked")
# What "auto" runs on tensors that are not on a CUDA device; bench/selective_scan.py is the measurement.
CPU_BACKEND = "torch-chunked"
# Chunk length of the torch-chunked path; None picks about sqrt(L/2), which minimises its 2T + L/T steps.
_TORCH_CHUNK: int | None = None
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y `(batch, dim, L)` in u's dtype, and with `return_last_state` also the last state `(batch, dim,
    dstate)` in fp32 (fp64 for fp64 inputs), by the backend `resolve_backend(backend, u)` names (see the
    module docstring)."""
    chosen = resolve_backend(backend, u)
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if chosen == "triton":
        for name, t in _named(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias):
            check_triton_device(t, name)
        if u.dtype == torch.float64:
            raise KernelInputError("u", "the Triton kernel computes in fp32; use a torch backend for float64")
        y, last = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    else:
        scan = _scan_sequential if chosen == "torch" else _scan_chunked
        y, last = _scan_torch(scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return (y, last) if return_last_state else y


# The paths under their own names: what the kernel is checked against, and what CPUs train with.
selective_scan_ref = functools.partial(selective_scan, backend="torch")
selective_scan_chunked = functools.partial(selective_scan, backend="torch-chunked")


def resolve_backend(backend: str, u: torch.Tensor) -> str:
    """The backend ("triton", "torch" or "torch-chunked") that `selective_scan(u, ..., backend=backend)`
    runs."""
    if backend not in SCAN_BACKENDS:
        raise KernelInputError("backend", f"expected one of {', '.join(SCAN_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        on_gpu = isinstance(u, torch.Tensor) and u.is_cuda and u.dtype in _TRITON_DTYPES
        return "triton" if on_gpu else CPU_BACKEND
    return backend


# ----------------------------------------------------------------------------------------------------------
# Checks


def _named(**tensors: torch.Tensor | None) -> list[tuple[str, torch.Tensor]]:
    return [(name, t) for name, t in tensors.items() if t is not None]


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    if not isinstance(u, torch.Tensor) or u.ndim != 3 or u.numel() == 0:
        shape = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise KernelInputError("u", f"must be a non-empty (batch, dim, L) tensor, got {shape}")
    batch, dim, length = u.shape
    if not isinstance(A, torch.Tensor) or A.ndim != 2 or A.shape[0] != dim or A.shape[1] == 0:
        shape = tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__
        raise KernelInputError("A", f"must be (dim, dstate) with dim {dim} and dstate >= 1, got {shape}")
    dstate = A.shape[1]
    expected = {
        "delta": (batch, dim, length),
        "B": (batch, dstate, length),
        "C": (batch, dstate, length),
        "D": (dim,),
        "z": (batch, dim, length),
        "delta_bias": (dim,),
        "initial_state": (batch, dim, dstate),
    }
    optional = _named(D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    for name, t in [("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), *optional]:
        if not isinstance(t, torch.Tensor):
            raise KernelInputError(name, f"must be a tensor, got {type(t).__name__}")
        if name in expected and tuple(t.shape) != expected[name]:
            raise KernelInputError(name, f"must have shape {expected[name]}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise KernelInputError(name, f"must be a real floating-point tensor, got {t.dtype}")
        if t.device != u.device:
            raise KernelInputError(name, f"is on {t.device}, u on {u.device}")


# ----------------------------------------------------------------------------------------------------------
# The torch paths. Both compute dt and the discretised terms the same way and differ only in how they run
# the recurrence: `scan(dt, A, B, C, u_dt_term, x0) -> (sum_n C_t x_t, x_{L-1})`.


def _scan_torch(scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    compute = torch.promote_types(u.dtype, torch.float32)
    u_, delta_, A_, B_, C_ = (t.to(compute) for t in (u, delta, A, B, C))
    dt = delta_ if delta_bias is None else delta_ + delta_bias.to(compute)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    batch, dim, _ = u.shape
    if initial_state is None:
        x0 = torch.zeros(batch, dim, A.shape[1], dtype=compute, device=u.device)
    else:
        x0 = initial_state.to(compute)
    # (batch, dim, L, dstate): the log decay dt·A and the input term dt·B·u.
    log_decay = dt[..., None] * A_[:, None, :]
    inputs = (dt * u_)[..., None] * B_.transpose(1, 2)[:, None]
    y, last = scan(log_decay, inputs, C_.transpose(1, 2), x0)
    if D is not None:
        y = y + D.to(compute)[:, None] * u_
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(u.dtype), last


def _scan_sequential(
    log_decay: torch.Tensor, inputs: torch.Tensor, C: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step at a time. log_decay, inputs (batch, dim, L, dstate); C (batch, L, dstate); x the state."""
    # The steps are taken apart by unbind, not by indexing: the backward of `t[:, :, i]` would write a
    # zero tensor of t's full size for every step.
    ys = []
    for decay_t, input_t, c_t in zip(torch.exp(log_decay).unbind(2), inputs.unbind(2), C.unbind(1)):
        x = decay_t * x + input_t
        ys.append(torch.einsum("bdn,bn->bd", x, c_t))
    return torch.stack(ys, dim=2), x


def _scan_chunked(
    log_decay: torch.Tensor, inputs: torch.Tensor, C: torch.Tensor, x0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocked recurrence of the module docstring; arguments as for `_scan_sequential`."""
    batch, dim, length, dstate = inputs.shape
    chunk = _TORCH_CHUNK or 2 ** round(math.log2(math.sqrt(length / 2)) if length > 2 else 0)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    if pad:  # padded steps are the identity: no decay (log 0), no input, read by no output
        log_decay, inputs = (F.pad(t, (0, 0, 0, pad)) for t in (log_decay, inputs))
        C = F.pad(C, (0, 0, 0, pad))
    log_decay, inputs = (t.view(batch, dim, chunks, chunk, dstate) for t in (log_decay, inputs))
    # The chunks' steps, (batch, dim, chunks, dstate) each (unbind: see _scan_sequential).
    steps = list(zip(torch.exp(log_decay).unbind(3), inputs.unbind(3)))
    # 1. Every chunk's last state from a zero start, all chunks at once.
    local = steps[0][1]
    for decay_t, input_t in steps[1:]:
        local = torch.addcmul(input_t, decay_t, local)
    # 2. The state entering each chunk: the one before, decayed through the chunk, plus its local end state.
    # The decay through a chunk is exp of a sum of dt·A <= 0: it cannot overflow.
    through = torch.exp(log_decay.sum(dim=3))
    x = x0
    entering = []
    for through_c, local_c in zip(through.unbind(2), local.unbind(2)):
        entering.append(x)
        x = torch.addcmul(local_c, through_c, x)
    # 3. Every chunk again from its true entering state, all at once, reading out y at each step.
    state = torch.stack(entering, dim=2)
    ys = []
    for (decay_t, input_t), c_t in zip(steps, C.view(batch, chunks, chunk, dstate).unbind(2)):
        state = torch.addcmul(input_t, decay_t, state)
        ys.append(torch.einsum("bdcn,bcn->bdc", state, c_t))
    y = torch.stack(ys, dim=3).reshape(batch, dim, chunks * chunk)
    return y[..., :length], x


# ----------------------------------------------------------------------------------------------------------
# The Triton kernels. A program owns batch row `b` and the channels `offs_d` (BLOCK_D of them) with all their
# states `offs_n` (BLOCK_N >= dstate; padded states have A = B = C = 0 and stay 0). Time goes through in
# chunks of CHUNK steps; a chunk's tiles are (channels, states, time). Steps past L, channels past dim are
# masked to dt = 0: exp(0·A) = 1 and no input, so they pass the state through unchanged. Each (batch, row,
# time) tensor comes with its three strides as one tuple.


def _tile_shape(dstate: int) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_N, CHUNK, num_warps); the interpreter gets small tiles, which it runs faster."""
    block_n = triton.next_power_of_2(dstate)
    if INTERPRETED:
        return 4, block_n, 16, 1
    return 8, block_n, 32, 4


@triton.jit
def _linear_combine(a_left, b_left, a_right, b_right):
    """Composes x -> a_left x + b_left, then x -> a_right x + b_right (earlier step on the left)."""
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _load(X, strides, b, rows, row_ok, t, t_ok):
    """The tile X[b, rows, t] in fp32, zeros where masked."""
    ptrs = X + b * strides[0] + rows[:, None] * strides[1] + t[None, :] * strides[2]
    return tl.load(ptrs, mask=row_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store(X, strides, b, rows, row_ok, t, t_ok, tile):
    ptrs = X + b * strides[0] + rows[:, None] * strides[1] + t[None, :] * strides[2]
    tl.store(ptrs, tile.to(X.dtype.element_ty), mask=row_ok[:, None] & t_ok[None, :])


@triton.jit
def _step_size(DELTA, delta_strides, b, offs_d, d_ok, t, t_ok, bias, SOFTPLUS: tl.constexpr):
    """(delta + bias, dt) for the tile's steps; dt is 0 where masked."""
    raw = _load(DELTA, delta_strides, b, offs_d, d_ok, t, t_ok) + bias[:, None]
    dt = raw
    if SOFTPLUS:  # log(1 + e^x), written so that neither branch overflows
        dt = tl.maximum(raw, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(raw)))
    return raw, tl.where(d_ok[:, None] & t_ok[None, :], dt, 0.0)


@triton.jit
def _last_along_time(tile, index):
    """tile[:, :, index] of a (channels, states, time) tile."""
    steps = tl.arange(0, tile.shape[2])
    return tl.sum(tl.where(steps[None, None, :] == index, tile, 0.0), axis=2)


@triton.jit
def _chunk_states(U, DELTA, B, u_strides, delta_strides, b_strides, b, offs_d, d_ok, offs_n, n_ok, A, bias,
                  t, t_ok, entering, SOFTPLUS: tl.constexpr):  # fmt: skip
    """A chunk's states x (channels, states, time) from the state entering it, by an associative scan over
    time of the steps (exp(dt A), dt B u); with the chunk's inputs u, raw delta, dt, B, the decays and the
    input terms."""
    u = _load(U, u_strides, b, offs_d, d_ok, t, t_ok)
    raw, dt = _step_size(DELTA, delta_strides, b, offs_d, d_ok, t, t_ok, bias, SOFTPLUS)
    Bt = _load(B, b_strides, b, offs_n, n_ok, t, t_ok)
    decay = tl.exp(dt[:, None, :] * A[:, :, None])
    inputs = (dt * u)[:, None, :] * Bt[None, :, :]
    cumulative, local = tl.associative_scan((decay, inputs), 2, _linear_combine)
    x = local + cumulative * entering[:, :, None]
    return x, u, raw, dt, Bt, decay, inputs


@triton.jit
def _program(DIM, DSTATE, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch row (int64), channels and states, with their masks."""
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    return b, offs_d, offs_d < DIM, offs_n, offs_n < DSTATE


@triton.jit
def _channel_params(A, D, BIAS, offs_d, d_ok, offs_n, n_ok, DSTATE,
                    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """A (channels, states), D and delta_bias (channels) in fp32; absent ones are 0."""
    a_ok = d_ok[:, None] & n_ok[None, :]
    a = tl.load(A + offs_d[:, None] * DSTATE + offs_n[None, :], mask=a_ok, other=0.0).to(tl.float32)
    d = tl.zeros([offs_d.shape[0]], dtype=tl.float32)
    bias = tl.zeros([offs_d.shape[0]], dtype=tl.float32)
    if HAS_D:
        d = tl.load(D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    return a, d, bias


@triton.jit
def _state_ptrs(X, b, offs_d, offs_n, DIM, DSTATE):
    """Where the (channels, states) block of a contiguous (batch, dim, dstate) tensor lies."""
    return X + (b * DIM + offs_d[:, None]) * DSTATE + offs_n[None, :]


@triton.jit
def _fwd_kernel(
    U, DELTA, A, B, C, D, Z, BIAS, X0, OUT, LAST, STATES,
    u_strides, delta_strides, b_strides, c_strides, z_strides, out_strides,
    DIM, L, DSTATE, CHUNKS,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_X0: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """y for this program's channels, their last state, and the state entering every chunk (for the
    backward)."""
    b, offs_d, d_ok, offs_n, n_ok = _program(DIM, DSTATE, BLOCK_D, BLOCK_N)
    a, d, bias = _channel_params(A, D, BIAS, offs_d, d_ok, offs_n, n_ok, DSTATE, HAS_D, HAS_BIAS)
    state_ok = d_ok[:, None] & n_ok[None, :]
    state = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_X0:
        state = tl.load(_state_ptrs(X0, b, offs_d, offs_n, DIM, DSTATE), mask=state_ok, other=0.0)
        state = state.to(tl.float32)
    for c in range(CHUNKS):
        t = c * CHUNK + tl.arange(0, CHUNK)
        t_ok = t < L
        tl.store(STATES + ((b * DIM + offs_d[:, None]) * CHUNKS + c) * DSTATE + offs_n[None, :], state,
                 mask=state_ok)  # fmt: skip
        x, u, _, _, _, _, _ = _chunk_states(
            U, DELTA, B, u_strides, delta_strides, b_strides, b, offs_d, d_ok, offs_n, n_ok, a, bias,
            t, t_ok, state, SOFTPLUS,
        )  # fmt: skip
        Ct = _load(C, c_strides, b, offs_n, n_ok, t, t_ok)
        y = tl.sum(x * Ct[None, :, :], axis=1) + d[:, None] * u
        if HAS_Z:
            z = _load(Z, z_strides, b, offs_d, d_ok, t, t_ok)
            y = y * z * tl.sigmoid(z)
        _store(OUT, out_strides, b, offs_d, d_ok, t, t_ok, y)
        state = _last_along_time(x, CHUNK - 1)
    tl.store(_state_ptrs(LAST, b, offs_d, offs_n, DIM, DSTATE), state, mask=state_ok)


@triton.jit
def _bwd_kernel(
    U, DELTA, A, B, C, D, Z, BIAS, STATES, DOUT, DLAST,
    DU, DDELTA, DZ, DA, DB, DC, DD, DBIAS, DX0,
    u_strides, delta_strides, b_strides, c_strides, z_strides, dout_strides,
    du_strides, ddelta_strides, dz_strides, dbc_strides,
    DIM, L, DSTATE, CHUNKS, BATCH,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DLAST: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Gradients for this program's channels, chunks from last to first. g_t = dLoss/dx_t comes from the
    reverse scan g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}, starting from the last state's gradient. dB and
    dC are this program's share (summed over its channels), dA, dD and d delta_bias this batch row's."""
    b, offs_d, d_ok, offs_n, n_ok = _program(DIM, DSTATE, BLOCK_D, BLOCK_N)
    a, d, bias = _channel_params(A, D, BIAS, offs_d, d_ok, offs_n, n_ok, DSTATE, HAS_D, HAS_BIAS)
    state_ok = d_ok[:, None] & n_ok[None, :]
    g_next = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # g at the first step of the chunk after
    if HAS_DLAST:
        g_next = tl.load(_state_ptrs(DLAST, b, offs_d, offs_n, DIM, DSTATE), mask=state_ok, other=0.0)
    da = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dx0 = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dd = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbc_row = tl.program_id(0) * BATCH + b  # this program's row of the (channel blocks x batch) partials
    for i in range(CHUNKS):
        c = CHUNKS - 1 - i
        t = c * CHUNK + tl.arange(0, CHUNK)
        t_ok = t < L
        entering = tl.load(STATES + ((b * DIM + offs_d[:, None]) * CHUNKS + c) * DSTATE + offs_n[None, :],
                           mask=state_ok, other=0.0)  # fmt: skip
        x, u, raw, dt, Bt, decay, inputs = _chunk_states(
            U, DELTA, B, u_strides, delta_strides, b_strides, b, offs_d, d_ok, offs_n, n_ok, a, bias,
            t, t_ok, entering, SOFTPLUS,
        )  # fmt: skip
        Ct = _load(C, c_strides, b, offs_n, n_ok, t, t_ok)
        dy = _load(DOUT, dout_strides, b, offs_d, d_ok, t, t_ok)
        if HAS_Z:
            y = tl.sum(x * Ct[None, :, :], axis=1) + d[:, None] * u
            z = _load(Z, z_strides, b, offs_d, d_ok, t, t_ok)
            sig = tl.sigmoid(z)
            _store(DZ, dz_strides, b, offs_d, d_ok, t, t_ok, dy * y * sig * (1.0 + z * (1.0 - sig)))
            dy = dy * z * sig
        # The adjoint recurrence runs backwards in time with the next step's decay; past L it is 1.
        _, dt_next = _step_size(DELTA, delta_strides, b, offs_d, d_ok, t + 1, t + 1 < L, bias, SOFTPLUS)
        decay_next = tl.exp(dt_next[:, None, :] * a[:, :, None])
        cumulative, local = tl.associative_scan(
            (decay_next, dy[:, None, :] * Ct[None, :, :]), 2, _linear_combine, reverse=True
        )
        g = local + cumulative * g_next[:, :, None]
        g_next = _last_along_time(g, 0)
        dx0 = _last_along_time(decay * g, 0)  # what is left after the first chunk: d initial_state
        # x_t - dt B u = exp(dt A) x_{t-1}: the decayed previous state, without dividing by the decay.
        decayed = x - inputs
        ddt = tl.sum(g * (a[:, :, None] * decayed + Bt[None, :, :] * u[:, None, :]), axis=1)
        da += tl.sum(g * decayed * dt[:, None, :], axis=2)
        du = tl.sum(g * Bt[None, :, :], axis=1) * dt + d[:, None] * dy
        dd += tl.sum(dy * u, axis=1)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(t_ok[None, :], ddt, 0.0)
        dbias += tl.sum(ddt, axis=1)
        _store(DU, du_strides, b, offs_d, d_ok, t, t_ok, du)
        _store(DDELTA, ddelta_strides, b, offs_d, d_ok, t, t_ok, ddt)
        _store(DB, dbc_strides, dbc_row, offs_n, n_ok, t, t_ok, tl.sum(g * (dt * u)[:, None, :], axis=0))
        _store(DC, dbc_strides, dbc_row, offs_n, n_ok, t, t_ok, tl.sum(x * dy[:, None, :], axis=0))
    tl.store(_state_ptrs(DA, b, offs_d, offs_n, DIM, DSTATE), da, mask=state_ok)
    tl.store(_state_ptrs(DX0, b, offs_d, offs_n, DIM, DSTATE), dx0, mask=state_ok)
    tl.store(DD + b * DIM + offs_d, dd, mask=d_ok)
    tl.store(DBIAS + b * DIM + offs_d, dbias, mask=d_ok)


def _strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else t.stride()


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus: bool):
        batch, dim, length = u.shape
        dstate = A.shape[1]
        block_d, block_n, chunk, warps = _tile_shape(dstate)
        chunks = triton.cdiv(length, chunk)
        A = A.contiguous()
        x0 = None if initial_state is None else initial_state.contiguous()
        out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        last = torch.empty(batch, dim, dstate, dtype=torch.float32, device=u.device)
        states = torch.empty(batch, dim, chunks, dstate, dtype=torch.float32, device=u.device)
        flags = {"HAS_D": D is not None, "HAS_Z": z is not None, "HAS_BIAS": delta_bias is not None}
        _fwd_kernel[(triton.cdiv(dim, block_d), batch)](
            u, delta, A, B, C, D, z, delta_bias, x0, out, last, states,
            u.stride(), delta.stride(), B.stride(), C.stride(), _strides(z), out.stride(),
            dim, length, dstate, chunks,
            **flags, HAS_X0=x0 is not None, SOFTPLUS=softplus,
            BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk, num_warps=warps,
        )  # fmt: skip
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.softplus, ctx.flags, ctx.has_x0 = softplus, flags, initial_state is not None
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        batch, dim, length = u.shape
        dstate = A.shape[1]
        block_d, block_n, chunk, warps = _tile_shape(dstate)
        blocks = triton.cdiv(dim, block_d)
        f32 = {"dtype": torch.float32, "device": u.device}
        dout = torch.zeros_like(u) if dout is None else dout
        dlast = None if dlast is None else dlast.float().contiguous()
        du, ddelta = torch.empty(u.shape, dtype=u.dtype, device=u.device), torch.empty_like(delta)
        dz = None if z is None else torch.empty(z.shape, dtype=z.dtype, device=z.device)
        dA, dx0 = torch.empty(batch, dim, dstate, **f32), torch.empty(batch, dim, dstate, **f32)
        dB, dC = (torch.empty(blocks * batch, dstate, length, **f32) for _ in range(2))
        dD, dbias = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
        _bwd_kernel[(blocks, batch)](
            u, delta, A, B, C, D, z, delta_bias, states, dout, dlast,
            du, ddelta, dz, dA, dB, dC, dD, dbias, dx0,
            u.stride(), delta.stride(), B.stride(), C.stride(), _strides(z), dout.stride(),
            du.stride(), ddelta.stride(), _strides(dz), dB.stride(),
            dim, length, dstate, states.shape[2], batch,
            **ctx.flags, HAS_DLAST=dlast is not None, SOFTPLUS=ctx.softplus,
            BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk, num_warps=warps,
        )  # fmt: skip
        sum_over = lambda t, like: t.view(blocks, batch, dstate, length).sum(0).to(like.dtype)  # noqa: E731
        return (
            du,
            ddelta,
            dA.sum(0).to(A.dtype),
            sum_over(dB, B),
            sum_over(dC, C),
            None if D is None else dD.sum(0).to(D.dtype),
            dz,
            None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
            dx0 if ctx.has_x0 else None,
            None,
        )
