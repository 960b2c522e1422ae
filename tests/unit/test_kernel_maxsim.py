"""MaxSim: the torch reference against a per-pair loop, the Triton kernel against the reference.

The kernel tests run on the GPU where there is one, and otherwise on the CPU under TRITON_INTERPRET=1, which
Triton reads when it is imported: this module sets it before importing anything that imports triton. bf16
is checked against the kernel on a GPU only (the interpreter computes bf16 wrongly).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402

import ragfleet_kernels.common  # noqa: E402
import ragfleet_kernels.maxsim as maxsim_module  # noqa: E402
from ragfleet_kernels.maxsim import maxsim, maxsim_reference  # noqa: E402

# (nq, Lq, nd, Ld, dim): ragged lengths are drawn below; Lq 20 / Ld 40 span several 16-wide tiles, dim 48
# is padded to 64 inside the kernel.
SHAPES = [(2, 5, 3, 7, 32), (3, 20, 6, 40, 64), (1, 32, 4, 37, 128), (2, 9, 3, 18, 48), (1, 16, 2, 16, 256)]


@pytest.fixture
def on_device() -> str:
    """Where the Triton kernel can run here."""
    if DEVICE == "cpu" and isinstance(triton.language.zeros, triton.runtime.JITFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; set it in the environment")
    return DEVICE


def random_batch(
    nq: int, lq: int, nd: int, ld: int, dim: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-norm token vectors (as ColBERT's), lengths in [0, L] with both ends present, zero padding."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(nq, lq, dim, generator=gen), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(nd, ld, dim, generator=gen), dim=-1)
    q_lengths = torch.randint(1, lq + 1, (nq,), generator=gen)
    q_lengths[0] = lq
    d_lengths = torch.randint(0, ld + 1, (nd,), generator=gen)
    d_lengths[0] = ld
    if nd > 1:
        d_lengths[1] = 0
    q[torch.arange(lq) >= q_lengths[:, None]] = 0
    d[torch.arange(ld) >= d_lengths[:, None]] = 0
    return q.to(dtype), q_lengths, d.to(dtype), d_lengths


def with_garbage(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x with NaN, inf and huge values in every padded position."""
    x = x.clone()
    pad = torch.arange(x.shape[1]) >= lengths[:, None]
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e4], dtype=x.dtype)
    x[pad] = garbage[torch.arange(int(pad.sum())) % 4][:, None].expand(-1, x.shape[2])
    return x


def per_pair(
    q: torch.Tensor, q_lengths: torch.Tensor, d: torch.Tensor, d_lengths: torch.Tensor
) -> torch.Tensor:
    """The definition, one pair at a time in float64."""
    out = torch.zeros(q.shape[0], d.shape[0], dtype=torch.float64)
    for i in range(q.shape[0]):
        for j in range(d.shape[0]):
            if d_lengths[j] > 0:
                sim = q[i, : q_lengths[i]].double() @ d[j, : d_lengths[j]].double().T
                out[i, j] = sim.max(dim=1).values.sum()
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_the_definition(shape: tuple[int, ...]) -> None:
    q, ql, d, dl = random_batch(*shape)
    scores = maxsim_reference(q, ql, d, dl)
    assert scores.shape == (shape[0], shape[2]) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), per_pair(q, ql, d, dl), atol=1e-5, rtol=1e-5)
    assert (scores[:, 1] == 0).all()  # the empty document


def test_reference_chunks_over_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    q, ql, d, dl = random_batch(3, 20, 6, 40, 64)
    whole = maxsim_reference(q, ql, d, dl)
    # Room for fewer similarities than one query batch against one document: a chunk of 1 document.
    monkeypatch.setattr(maxsim_module, "_REFERENCE_CHUNK_ELEMENTS", 100)
    torch.testing.assert_close(maxsim_reference(q, ql, d, dl), whole)
    monkeypatch.setattr(maxsim_module, "_REFERENCE_CHUNK_ELEMENTS", 3 * 20 * 40 * 4)  # 4 documents
    torch.testing.assert_close(maxsim_reference(q, ql, d, dl), whole)


def test_reference_bf16_accumulates_in_fp32() -> None:
    q, ql, d, dl = random_batch(3, 20, 6, 40, 64, dtype=torch.bfloat16)
    expected = maxsim_reference(q.float(), ql, d.float(), dl)
    torch.testing.assert_close(maxsim_reference(q, ql, d, dl), expected, atol=1e-5, rtol=1e-5)


def test_padding_never_contributes_to_the_reference() -> None:
    q, ql, d, dl = random_batch(3, 20, 6, 40, 64, seed=1)
    dirty = maxsim_reference(with_garbage(q, ql), ql, with_garbage(d, dl), dl)
    torch.testing.assert_close(dirty, maxsim_reference(q, ql, d, dl), atol=1e-5, rtol=1e-5)


def test_padding_never_contributes_to_the_kernel(on_device: str) -> None:
    q, ql, d, dl = random_batch(3, 20, 6, 40, 64, seed=1)
    dirty = [x.to(on_device) for x in (with_garbage(q, ql), ql, with_garbage(d, dl), dl)]
    expected = maxsim_reference(q, ql, d, dl)
    torch.testing.assert_close(maxsim(*dirty, backend="triton").cpu(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_fp32(shape: tuple[int, ...], on_device: str) -> None:
    q, ql, d, dl = random_batch(*shape, seed=2)
    expected = maxsim_reference(q, ql, d, dl)
    scores = maxsim(q.to(on_device), ql.to(on_device), d.to(on_device), dl.to(on_device), backend="triton")
    torch.testing.assert_close(scores.cpu(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE == "cpu", reason="interpreter: bf16")),
    ],
)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_triton_matches_reference_half(shape: tuple[int, ...], dtype: torch.dtype, on_device: str) -> None:
    q, ql, d, dl = random_batch(*shape, seed=3, dtype=dtype)
    expected = maxsim_reference(q, ql, d, dl)  # the same rounded inputs, in fp32
    scores = maxsim(q.to(on_device), ql.to(on_device), d.to(on_device), dl.to(on_device), backend="triton")
    scale = float(expected.abs().max())
    torch.testing.assert_close(scores.cpu(), expected, atol=2e-3 * scale, rtol=0)


def test_triton_lengths_at_the_edges(on_device: str) -> None:
    q, _, d, _ = random_batch(2, 20, 3, 40, 32, seed=4)
    ql = torch.tensor([0, 20])  # an empty query and a full one
    dl = torch.tensor([0, 1, 40], dtype=torch.int32)
    scores = maxsim(q.to(on_device), ql.to(on_device), d.to(on_device), dl.to(on_device), backend="triton")
    assert (scores[0] == 0).all() and (scores[:, 0] == 0).all()
    torch.testing.assert_close(scores.cpu(), maxsim_reference(q, ql, d, dl), atol=1e-4, rtol=1e-5)


def test_triton_reads_strided_inputs(on_device: str) -> None:
    q, ql, d, dl = random_batch(2, 20, 3, 40, 32, seed=5)
    q_t = q.to(on_device).transpose(1, 2).contiguous().transpose(1, 2)  # same values, token stride 1
    d_t = d.to(on_device).transpose(0, 1).contiguous().transpose(0, 1)  # same values, documents interleaved
    assert not q_t.is_contiguous() and not d_t.is_contiguous()
    scores = maxsim(q_t, ql.to(on_device), d_t, dl.to(on_device), backend="triton")
    torch.testing.assert_close(scores.cpu(), maxsim_reference(q, ql, d, dl), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batches(backend: str, on_device: str) -> None:
    q, ql, d, dl = (x.to(on_device) for x in random_batch(2, 5, 3, 7, 32))
    assert maxsim(q[:0], ql[:0], d, dl, backend=backend).shape == (0, 3)
    assert maxsim(q, ql, d[:0], dl[:0], backend=backend).shape == (2, 0)


def test_auto_runs_the_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kernel(*args: object) -> torch.Tensor:
        raise AssertionError("auto ran the Triton kernel on CPU tensors")

    monkeypatch.setattr(maxsim_module, "_maxsim_triton", no_kernel)
    q, ql, d, dl = random_batch(2, 5, 3, 7, 32)
    torch.testing.assert_close(maxsim(q, ql, d, dl), maxsim_reference(q, ql, d, dl))


@pytest.mark.skipif(DEVICE == "cpu", reason="needs a CUDA GPU")
def test_auto_runs_the_kernel_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    q, ql, d, dl = (x.cuda() for x in random_batch(2, 5, 3, 7, 32))
    expected = maxsim_reference(q, ql, d, dl)

    def no_reference(*args: object) -> torch.Tensor:
        raise AssertionError("auto ran the reference on CUDA tensors")

    monkeypatch.setattr(maxsim_module, "maxsim_reference", no_reference)
    torch.testing.assert_close(maxsim(q, ql, d, dl), expected, atol=1e-4, rtol=1e-5)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ragfleet_kernels.common, "INTERPRETED", False)
    q, ql, d, dl = random_batch(2, 5, 3, 7, 32)
    with pytest.raises(ValueError, match="^backend: 'triton' needs CUDA tensors .*TRITON_INTERPRET=1"):
        maxsim(q, ql, d, dl, backend="triton")


def _bad_inputs() -> list[tuple[str, dict, str]]:
    q, ql, d, dl = random_batch(2, 5, 3, 7, 32)
    good = {"q": q, "q_lengths": ql, "d": d, "d_lengths": dl}
    return [
        ("q 2-D", {**good, "q": q[0]}, "^q: expected a 3-D tensor"),
        ("q int", {**good, "q": q.long()}, "^q: dtype"),
        ("d float64", {**good, "d": d.double()}, "^d: dtype"),
        ("dtypes differ", {**good, "d": d.half()}, "^d: dtype .* differs"),
        ("dims differ", {**good, "d": d[:, :, :16]}, "^d: token dim"),
        ("devices differ", {**good, "d": d.to("meta")}, "^d: on meta"),
        ("q_lengths shape", {**good, "q_lengths": ql[:1]}, r"^q_lengths: expected a tensor of shape \(2,\)"),
        ("q_lengths list", {**good, "q_lengths": [5, 5]}, "^q_lengths: expected a tensor"),
        ("d_lengths float", {**good, "d_lengths": dl.float()}, "^d_lengths: expected an integer dtype"),
        ("d_lengths device", {**good, "d_lengths": dl.to("meta")}, "^d_lengths: on meta"),
        ("q_lengths too long", {**good, "q_lengths": torch.tensor([5, 6])}, r"^q_lengths: .*\[0, 5\]"),
        ("d_lengths negative", {**good, "d_lengths": torch.tensor([1, -1, 0])}, r"^d_lengths: .*\[0, 7\]"),
    ]


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: case[0])
def test_bad_inputs_name_the_argument(case: tuple[str, dict, str], backend: str) -> None:
    _, kwargs, message = case
    with pytest.raises(ValueError, match=message):
        maxsim(**kwargs, backend=backend)


def test_bad_backend_and_dim_name_the_argument(on_device: str) -> None:
    q, ql, d, dl = random_batch(1, 5, 1, 7, 32)
    with pytest.raises(ValueError, match="^backend: expected one of"):
        maxsim(q, ql, d, dl, backend="cuda")
    wide, length = torch.zeros(1, 5, 1024, device=on_device), torch.tensor([5], device=on_device)
    with pytest.raises(ValueError, match="^q: token dim 1024 is above"):
        maxsim(wide, length, wide, length, backend="triton")


@pytest.mark.skipif(DEVICE == "cpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_reference_at_colbert_shapes(dtype: torch.dtype) -> None:
    q, ql, d, dl = (x.cuda() for x in random_batch(3, 32, 300, 220, 128, seed=6, dtype=dtype))
    expected = maxsim(q, ql, d, dl, backend="torch")
    scale = float(expected.abs().max())
    atol = 1e-4 * scale if dtype == torch.float32 else 2e-3 * scale
    torch.testing.assert_close(maxsim(q, ql, d, dl, backend="triton"), expected, atol=atol, rtol=0)
