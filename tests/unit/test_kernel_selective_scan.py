"""ragfleet_kernels.selective_scan: the torch paths against a loop written from the definition, the Triton
kernel and the chunked torch scan against the reference (outputs and every gradient), state chaining, and
bad input.

The kernel runs on the GPU where there is one and otherwise in Triton's CPU interpreter; tests/conftest.py
sets TRITON_INTERPRET=1 before anything imports triton. Shapes are small and deliberately ragged: dim 6 is
not a multiple of the kernel's channel block, dstate 5 not a power of two, L 37 not a multiple of either
path's chunk.
"""

import pytest
import torch
import torch.nn.functional as F

import ragfleet_kernels.common
import ragfleet_kernels.selective_scan as ss
from ragfleet_kernels.common import KernelInputError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _inputs(batch=2, dim=6, dstate=5, length=37, dtype=torch.float32, seed=0):
    """Every argument, on DEVICE: activations in `dtype`, parameters (A, D, delta_bias) and the state fp32."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    raw = {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length, scale=0.5),
        "A": -torch.rand(dim, dstate, generator=gen) * 2 - 0.1,
        "B": randn(batch, dstate, length),
        "C": randn(batch, dstate, length),
        "D": randn(dim),
        "z": randn(batch, dim, length),
        "delta_bias": randn(dim, scale=0.3),
        "initial_state": randn(batch, dim, dstate),
    }
    activations = {"u", "delta", "B", "C", "z"}
    return {k: v.to(DEVICE, dtype if k in activations else torch.float32) for k, v in raw.items()}


def _loop(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """The recurrence of the module docstring, one channel and one step at a time (fp64)."""
    batch, dim, length = u.shape
    y = torch.zeros_like(u)
    last = torch.zeros_like(initial_state)
    for b in range(batch):
        for d in range(dim):
            x = initial_state[b, d].clone()
            for t in range(length):
                dt = F.softplus(delta[b, d, t] + delta_bias[d])
                x = torch.exp(dt * A[d]) * x + dt * B[b, :, t] * u[b, d, t]
                y[b, d, t] = (C[b, :, t] * x).sum() + D[d] * u[b, d, t]
            last[b, d] = x
    return y * F.silu(z), last


def _run(backend, args, dy, dlast):
    """y, the last state and the gradients of sum(y·dy) + sum(last·dlast) for every argument."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}
    y, last = ss.selective_scan(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
    loss = (y.float() * dy).sum() + (last * dlast).sum()
    return {"y": y, "last_state": last, **dict(zip(NAMES, torch.autograd.grad(loss, list(leaves.values()))))}


def _upstream(args, seed=1, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(args["u"].shape, generator=gen) * scale
    dlast = torch.randn(args["initial_state"].shape, generator=gen) * scale
    return dy.to(DEVICE), dlast.to(DEVICE)


@pytest.mark.parametrize("backend", ["torch", "torch-chunked"])
def test_torch_paths_match_the_definition(backend):
    args = {k: v.cpu().double() for k, v in _inputs(batch=2, dim=3, dstate=4, length=11).items()}
    y, last = ss.selective_scan(**args, delta_softplus=True, return_last_state=True, backend=backend)
    want_y, want_last = _loop(**args)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(last, want_last)


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_chunked_scan_at_any_chunk_length(monkeypatch, chunk):
    # 37 steps: chunks of 4 and 16 leave a partial last chunk, 64 is one padded chunk, 1 is the recurrence.
    monkeypatch.setattr(ss, "_TORCH_CHUNK", chunk)
    args = {k: v.cpu().double() for k, v in _inputs().items()}
    dy, dlast = (t.cpu().double() for t in _upstream(args))
    got, want = _run("torch-chunked", args, dy, dlast), _run("torch", args, dy, dlast)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


@pytest.mark.parametrize("backend", ["triton", "torch-chunked"])
def test_outputs_and_gradients_match_the_reference_fp32(backend):
    args = _inputs()
    dy, dlast = _upstream(args)
    got = _run(backend, args, dy, dlast)
    want = _run("torch", {k: v.double() for k, v in args.items()}, dy.double(), dlast.double())
    for name in want:
        assert got[name].dtype == torch.float32 and got[name].shape == want[name].shape, name
        assert (got[name].double() - want[name]).abs().max().item() <= 1e-4, name


def test_triton_matches_the_reference_in_fp16():
    args = _inputs(dtype=torch.float16)
    dy, dlast = _upstream(args, scale=0.1)
    got = _run("triton", args, dy, dlast)
    want = _run("torch", {k: v.double() for k, v in args.items()}, dy.double(), dlast.double())
    assert got["y"].dtype == torch.float16 and got["last_state"].dtype == torch.float32
    for name in want:  # gradients come in their input's dtype
        assert name not in args or got[name].dtype == args[name].dtype, name
        assert (got[name].double() - want[name]).abs().max().item() <= 2e-2, name


@pytest.mark.parametrize("backend", ["triton", "torch", "torch-chunked"])
def test_scanning_in_two_parts_chains_through_the_state(backend):
    # Streaming encode: scan [a; b] == scan b from a's last state, in y, the last state and the gradients.
    args = _inputs(dim=3, dstate=3, length=37)
    u = args["u"].requires_grad_(True)
    first = 21

    def scan(steps: slice, initial_state=None):
        seq = {k: args[k][..., steps] for k in ("u", "delta", "B", "C", "z")}
        return ss.selective_scan(
            **seq, A=args["A"], D=args["D"], delta_bias=args["delta_bias"], delta_softplus=True,
            initial_state=initial_state, return_last_state=True, backend=backend,
        )  # fmt: skip

    whole, whole_last = scan(slice(None))
    y1, state = scan(slice(None, first))
    y2, last = scan(slice(first, None), initial_state=state)
    torch.testing.assert_close(torch.cat([y1, y2], dim=-1), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, whole_last, atol=1e-5, rtol=1e-5)
    # The gradient of the last state alone (none reaches y) flows back through both parts.
    (whole_grad,) = torch.autograd.grad(whole_last.sum(), u)
    (chained_grad,) = torch.autograd.grad(last.sum(), u)
    torch.testing.assert_close(chained_grad, whole_grad, atol=1e-5, rtol=1e-5)
    assert (chained_grad[..., :first] != 0).any()


@pytest.mark.parametrize("backend", ["triton", "torch-chunked"])
def test_optional_arguments_may_be_left_out_and_b_c_may_be_strided(backend):
    args = _inputs(length=19)
    core = {k: args[k] for k in ("u", "A", "B", "C")} | {"delta": args["delta"].abs()}  # no softplus: dt > 0
    # B and C as the encoder makes them: (batch, L, dstate) projections, transposed (strided views).
    core |= {k: core[k].transpose(1, 2).contiguous().transpose(1, 2) for k in ("B", "C")}
    assert not core["B"].is_contiguous()
    y = ss.selective_scan(**core, backend=backend)
    want = ss.selective_scan_ref(**{k: v.double() for k, v in core.items()})
    assert not isinstance(y, tuple) and y.shape == args["u"].shape
    assert (y.double() - want).abs().max().item() <= 1e-4


def test_triton_runs_the_kernel_and_auto_on_cpu_the_measured_torch_path(monkeypatch):
    args = _inputs(length=16)
    want = ss.selective_scan_ref(**args)
    calls = []
    torch_scan = ss._scan_torch
    monkeypatch.setattr(ss, "_scan_torch", lambda scan, *a: calls.append(scan) or torch_scan(scan, *a))
    got = ss.selective_scan(**args, backend="triton")
    assert calls == []
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    cpu = args["u"].cpu()
    assert ss.resolve_backend("auto", cpu) == ss.CPU_BACKEND
    ss.selective_scan(**{k: v.cpu() for k, v in args.items()})
    assert calls == [ss._scan_chunked if ss.CPU_BACKEND == "torch-chunked" else ss._scan_sequential]
    if DEVICE == "cuda":
        assert ss.resolve_backend("auto", args["u"]) == "triton"


def _raises(field, **overrides):
    args = {**_inputs(length=8), **overrides}
    with pytest.raises(KernelInputError) as err:
        ss.selective_scan(**args)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")
    return err.value.problem


def test_bad_arguments_are_rejected_by_name(monkeypatch):
    args = _inputs(length=8)
    _raises("backend", backend="cuda")
    _raises("u", u=args["u"][0])
    _raises("u", u=args["u"][:, :, :0])
    _raises("delta", delta=args["delta"][:, :, :5])
    _raises("A", A=args["A"][:3])
    _raises("B", B=args["B"][:, :4])
    _raises("C", C=args["C"][..., :7])
    _raises("D", D=args["D"][None])
    _raises("z", z=args["z"].transpose(1, 2))
    _raises("delta_bias", delta_bias=args["delta_bias"][:2])
    _raises("initial_state", initial_state=args["initial_state"][..., :2])
    assert "floating-point" in _raises("B", B=args["B"].long())
    assert "floating-point" in _raises("A", A=torch.complex(args["A"], args["A"]))
    assert "tensor" in _raises("delta", delta=None)
    assert "float64" in _raises(
        "u", **{k: args[k].double() for k in ("u", "delta", "B", "C", "z")}, backend="triton"
    )
    cpu = {k: v.cpu() for k, v in args.items()}
    if ragfleet_kernels.common.INTERPRETED:
        assert "bfloat16" in _raises("u", **(cpu | {"u": cpu["u"].bfloat16()}), backend="triton")
    monkeypatch.setattr(ragfleet_kernels.common, "INTERPRETED", False)
    assert "CUDA" in _raises("backend", **cpu, backend="triton")
