"""Triton kernels, each beside a plain PyTorch reference and one dispatcher (`backend="auto"`).

On a CUDA device the dispatchers run the Triton kernel; elsewhere the fastest correct torch path (the
reference, or for the selective scan a chunked scan). Tests run the
Triton code itself on the CPU under `TRITON_INTERPRET=1` (small shapes, fp32/fp16). Kernels know nothing
of services: bad arguments raise `ragfleet_kernels.common.KernelInputError`, a ValueError naming the argument.
"""
