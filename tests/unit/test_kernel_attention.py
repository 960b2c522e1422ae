"""ragfleet_kernels.attention: the reference against a loop and SDPA, the Triton kernel against the
reference, and the dispatcher.

The kernel runs on the GPU where there is one and otherwise in Triton's CPU interpreter; tests/conftest.py
sets TRITON_INTERPRET=1 before anything imports triton. bf16 is compared on a GPU only (the interpreter
computes bf16 wrongly).
"""

import pytest
import torch
import torch.nn.functional as F

import ragfleet_kernels.attention as attn
import ragfleet_kernels.common
from ragfleet_kernels.common import KernelInputError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch, heads, lq, lk, d, dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, generator=gen).to(device, dtype) for n in (lq, lk, lk))
    do = torch.randn(batch, heads, lq, d, generator=gen).to(device, dtype)
    return q, k, v, do


def _lengths(k_lengths):
    return None if k_lengths is None else torch.tensor(k_lengths, device=DEVICE)


def _forward_backward(fn, q, k, v, do, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def _loop_attention(q, k, v, causal, scale, k_lengths):
    """Attention one query row at a time, straight from the definition (bottom-right causal)."""
    batch, heads, lq, _ = q.shape
    lk = k.shape[2]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(lq):
                last = lk if k_lengths is None else int(k_lengths[b])
                if causal:
                    last = min(last, lk - lq + i + 1)
                if last <= 0:
                    continue
                weights = torch.softmax((k[b, h, :last] @ q[b, h, i]) * scale, dim=0)
                out[b, h, i] = weights @ v[b, h, :last]
    return out


def test_reference_matches_a_loop_with_bottom_right_causal_and_ragged_keys():
    q, k, v, _ = _inputs(2, 2, 5, 9, 16, dtype=torch.float64, device="cpu")
    k_lengths = torch.tensor([9, 6])
    got = attn.attention_reference(q, k, v, causal=True, scale=0.3, k_lengths=k_lengths)
    torch.testing.assert_close(got, _loop_attention(q, k, v, True, 0.3, k_lengths))


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_sdpa(causal):
    q, k, v, do = _inputs(2, 3, 11, 11, 32, dtype=torch.float64, device="cpu")
    ours = _forward_backward(attn.attention_reference, q, k, v, do, causal=causal)
    sdpa = _forward_backward(F.scaled_dot_product_attention, q, k, v, do, is_causal=causal)
    for a, b in zip(ours, sdpa):
        torch.testing.assert_close(a, b)


# (batch, heads, Lq, Lk, head_dim, causal, k_lengths, scale). Lengths are not multiples of the interpreter's
# 16-row tiles, and the offsets Lk - Lq (1, 14, 30 mod 16) and k_lengths (15) put tile edges one row off the
# mask edges, where the kernels switch between masked and unmasked tiles.
CASES = {
    "plain": (1, 2, 20, 20, 32, False, None, None),
    "causal": (1, 2, 33, 33, 32, True, None, None),
    "decode": (2, 1, 6, 36, 64, True, None, None),
    "causal-offset": (1, 1, 34, 48, 32, True, None, None),
    "decode-one": (2, 2, 1, 23, 32, True, None, None),
    "cross": (1, 2, 19, 41, 32, False, None, 0.3),
    "ragged": (3, 1, 18, 29, 32, False, [15, 29, 0], None),
    "causal-ragged": (2, 1, 20, 21, 64, True, [21, 10], None),
    "causal-more-queries": (1, 1, 30, 12, 32, True, None, None),
    "head-dim-128": (1, 1, 17, 17, 128, True, None, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_matches_reference_fp32(case):
    batch, heads, lq, lk, d, causal, k_lengths, scale = case
    q, k, v, do = _inputs(batch, heads, lq, lk, d)
    kwargs = {"causal": causal, "scale": scale, "k_lengths": _lengths(k_lengths)}
    got = _forward_backward(attn.attention, q, k, v, do, backend="triton", **kwargs)
    want = _forward_backward(attn.attention_reference, q, k, v, do, **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-4, name


LOW_PRECISION = [
    pytest.param(torch.float16, 2e-2, id="fp16"),
    pytest.param(
        torch.bfloat16,
        6e-2,
        id="bf16",
        marks=pytest.mark.skipif(DEVICE == "cpu", reason="Triton's interpreter computes bfloat16 wrongly"),
    ),
]


@pytest.mark.parametrize("dtype, tolerance", LOW_PRECISION)
@pytest.mark.parametrize("case", ["causal", "decode", "ragged"])
def test_triton_matches_reference_in_half_precision(case, dtype, tolerance):
    batch, heads, lq, lk, d, causal, k_lengths, scale = CASES[case]
    q, k, v, do = _inputs(batch, heads, lq, lk, d, dtype=dtype)
    kwargs = {"causal": causal, "scale": scale, "k_lengths": _lengths(k_lengths)}
    got = _forward_backward(attn.attention, q, k, v, do, backend="triton", **kwargs)
    want = _forward_backward(attn.attention_reference, *(t.float() for t in (q, k, v, do)), **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype
        assert (a.float() - b).abs().max().item() <= tolerance, name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rows_that_see_no_key_are_zero_with_zero_gradients(backend):
    # Batch row 1 has no keys at all; with causal and Lq > Lk the first 3 queries of batch row 0 see none.
    q, k, v, do = _inputs(2, 1, 7, 4, 32)
    out, dq, dk, dv = _forward_backward(
        attn.attention, q, k, v, do, causal=True, k_lengths=torch.tensor([4, 0]), backend=backend
    )
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (out[0, :, :3] == 0).all() and (dq[0, :, :3] == 0).all()
    assert (out[0, :, 3:] != 0).any() and (dk[0] != 0).any()


def test_triton_takes_strided_views():
    # Models produce (batch, length, heads, d) and transpose; the kernel reads the strides as they are.
    q, k, v, do = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _inputs(2, 2, 18, 18, 32))
    assert not q.is_contiguous()
    got = _forward_backward(attn.attention, q, k, v, do, causal=True, backend="triton")
    want = _forward_backward(attn.attention_reference, q, k, v, do, causal=True)
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-4


def test_backend_triton_runs_the_kernel_not_the_reference(monkeypatch):
    q, k, v, _ = _inputs(1, 1, 16, 16, 32)
    want = attn.attention_reference(q, k, v)

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(attn, "_attention_torch", forbidden)
    assert attn.resolve_backend("triton", q) == "triton"
    got = attn.attention(q, k, v, backend="triton")
    assert not torch.equal(got, want)  # computed differently...
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # ...to the same result


def test_auto_on_cpu_runs_the_reference(monkeypatch):
    q, k, v, _ = _inputs(1, 1, 8, 8, 32, device="cpu")
    calls = []
    reference = attn._attention_torch
    monkeypatch.setattr(attn, "_attention_torch", lambda *a, **kw: calls.append(1) or reference(*a, **kw))
    assert attn.resolve_backend("auto", q) == "torch"
    attn.attention(q, k, v)
    assert calls == [1]


def _raises(field, fn, *args, **kwargs):
    with pytest.raises(KernelInputError) as err:
        fn(*args, **kwargs)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")
    return err.value.problem


def test_bad_arguments_are_rejected_by_name(monkeypatch):
    q, k, v, _ = _inputs(2, 1, 4, 6, 32)
    _raises("backend", attn.attention, q, k, v, backend="cuda")
    _raises("k, v", attn.attention, q, k[:, :, :, :16], v)
    _raises("k, v", attn.attention, q, k, v.double())
    _raises("k_lengths", attn.attention, q, k, v, k_lengths=torch.tensor([7, 1]))
    _raises("k_lengths", attn.attention, q, k, v, k_lengths=torch.tensor([1]))
    _raises("q", attn.attention, q[0], k, v)
    q48, k48, v48, _ = _inputs(1, 1, 4, 4, 48)
    assert "head dims" in _raises("q", attn.attention, q48, k48, v48, backend="triton")
    assert attn.attention(q48, k48, v48).shape == q48.shape  # auto falls back to the reference
    cpu = [t.cpu() for t in (q, k, v)]
    if ragfleet_kernels.common.INTERPRETED:
        bf16 = [t.bfloat16() for t in cpu]
        assert "bfloat16" in _raises("q", attn.attention, *bf16, backend="triton")
    monkeypatch.setattr(ragfleet_kernels.common, "INTERPRETED", False)
    assert "CUDA" in _raises("backend", attn.attention, *cpu, backend="triton")
