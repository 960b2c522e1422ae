"""What the kernels share: their error, the backend names and checks, and the fp32-exact dot product.

Kernels know nothing of gRPC. Bad arguments raise `KernelInputError`, a ValueError that names the argument;
the service whose model called the kernel decides what that means to its client. A model builds the
tensors itself, so for a service it is usually its own fault (INTERNAL).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["BACKENDS", "INTERPRETED", "KernelInputError", "check_backend", "check_triton_device", "dot"]

BACKENDS = ("auto", "triton", "torch")

# Whether the kernels run in Triton's CPU interpreter. Triton binds its own tl.* helpers to compiled or
# interpreted code when it is imported, and our kernels when they are decorated; the interpreter works only
# if TRITON_INTERPRET was set before both.
_INTERPRET_SET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
INTERPRETED = _INTERPRET_SET and not isinstance(tl.max, triton.runtime.JITFunction)


class KernelInputError(ValueError):
    """An argument a kernel cannot take here; `field` names it (e.g. "k_lengths"), `problem` says why."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise KernelInputError("backend", f"expected one of {', '.join(BACKENDS)}, got {backend!r}")


def check_triton_device(x: torch.Tensor, name: str) -> None:
    """The Triton kernels run on CUDA tensors, and on CPU ones only in the interpreter (not in bf16)."""
    if not (x.is_cuda or INTERPRETED):
        raise KernelInputError(
            "backend",
            f"'triton' needs CUDA tensors (got {x.device}); on a CPU it runs only when TRITON_INTERPRET=1 "
            "was set before triton was first imported",
        )
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        raise KernelInputError(name, "Triton's CPU interpreter computes bfloat16 wrongly; cast to float32")


@triton.jit
def dot(a, b):
    """a @ b accumulated in fp32. fp32 inputs are multiplied exactly ("ieee") rather than rounded to TF32,
    matching the references; for fp16 and bf16 inputs the setting does not apply."""
    precision: tl.constexpr = "ieee" if a.dtype == tl.float32 else "tf32"
    return tl.dot(a, b, input_precision=precision)
