"""The selective scan: the Triton kernel against the sequential torch reference and the chunked torch scan.

Shapes are the Mamba encoder's: batch 16, dim 768 (d_inner of a 384-wide model), dstate 16, lengths
128-2048, with D, the z gate and delta_bias + softplus, as a Mamba block calls it. Every implementation runs
on the same tensors, forward alone and forward + backward (gradients of every input), and each row gives
its median time, its GB/s and its speedup over the reference (`torch`: reference time / its time). GB/s
counts the bytes that must move: forward reads u, delta, z, B, C and writes y; the backward reads them and
dy again and writes du, d delta, dz, dB, dC (A, D, delta_bias and the states are small and not counted).
Each row also gives the largest difference from the reference in y and in the gradients (a check, not a
benchmark).

On a CUDA GPU (`make bench-gpu`) the rows are triton, torch and torch-chunked in fp32 and fp16, timed with
`triton.testing.do_bench`, and go to bench/results/selective_scan.json. Without one the Triton path cannot
run (it says so) and the torch paths are measured in fp32 on the CPU, timed with perf_counter over
`--repeats` runs after a warm-up: that is the measurement behind
`ragfleet_kernels.selective_scan.CPU_BACKEND`, which "auto" runs on CPUs. CPU results go to
bench/results/selective_scan_cpu.json.
`python -m bench.selective_scan --lengths 128 256 --dim 512` shrinks it; `--threads N` sets torch's CPU
threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from bench.common import write_bench_results
from ragfleet_kernels.selective_scan import CPU_BACKEND, selective_scan

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch: int, dim: int, dstate: int, length: int, dtype: torch.dtype, device: str) -> dict:
    """Mamba-like inputs: A = -exp(A_log) with A_log = log(1..dstate), delta around softplus's knee."""
    gen = torch.Generator().manual_seed(length)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    a_log = torch.log(torch.arange(1, dstate + 1, dtype=torch.float32)).repeat(dim, 1)
    return {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length, scale=0.5),
        "A": (-torch.exp(a_log)).to(device),
        "B": randn(batch, dstate, length),
        "C": randn(batch, dstate, length),
        "D": torch.ones(dim, device=device),
        "z": randn(batch, dim, length),
        "delta_bias": torch.full((dim,), -2.0, device=device),
    }


def moved_bytes(inputs: dict, backward: bool) -> int:
    streamed = sum(
        inputs[name].numel() * inputs[name].element_size() for name in ("u", "delta", "z", "B", "C")
    )
    y = inputs["u"].numel() * inputs["u"].element_size()
    forward = streamed + y
    return forward + (streamed + y + streamed) if backward else forward


def median_ms(fn: Callable[[], object], repeats: int, on_gpu: bool) -> float:
    if on_gpu:
        from triton.testing import do_bench

        return float(do_bench(fn, return_mode="median"))
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def bench_length(args: argparse.Namespace, length: int, dtype_name: str, backends: list[str]) -> list[dict]:
    on_gpu = args.device == "cuda"
    inputs = make_inputs(args.batch, args.dim, args.dstate, length, DTYPES[dtype_name], args.device)
    leaves = {name: t.requires_grad_(True) for name, t in inputs.items()}
    dy = torch.randn_like(inputs["u"])

    def forward(backend: str) -> torch.Tensor:
        return selective_scan(**leaves, delta_softplus=True, backend=backend)

    def forward_backward(backend: str) -> None:
        torch.autograd.grad(forward(backend), list(leaves.values()), dy)

    # One run of each, compared with the reference (computed from fp32 copies for fp16).
    exact = {name: t.detach().float().requires_grad_(True) for name, t in inputs.items()}
    ref_y = selective_scan(**exact, delta_softplus=True, backend="torch")
    ref = (ref_y.detach(), *torch.autograd.grad(ref_y, list(exact.values()), dy.float()))
    diffs = {}
    for backend in backends:
        y = forward(backend)
        got = (y.detach(), *torch.autograd.grad(y, list(leaves.values()), dy))
        errs = [(a.float() - b).abs().max().item() for a, b in zip(got, ref)]
        diffs[backend] = (errs[0], max(errs[1:]))
        del y, got

    rows = []
    base = {
        "batch": args.batch,
        "dim": args.dim,
        "dstate": args.dstate,
        "length": length,
        "dtype": dtype_name,
    }
    for backward in (False, True):
        times = {}
        for backend in backends:
            with torch.set_grad_enabled(backward):
                run = (lambda b=backend: forward_backward(b)) if backward else (lambda b=backend: forward(b))
                times[backend] = median_ms(run, args.repeats, on_gpu)
        work = moved_bytes(inputs, backward)
        for backend in backends:
            ms = times[backend]
            rows.append(
                {
                    **base,
                    "pass": "fwd+bwd" if backward else "fwd",
                    "impl": backend,
                    "ms": round(ms, 3),
                    "GB_s": float(f"{work / ms / 1e6:.3g}"),
                    "speedup_vs_torch": round(times["torch"] / ms, 2),
                    "max_diff_y": diffs[backend][0],
                    "max_diff_grad": diffs[backend][1],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dstate", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default 128-2048 (CPU 128-512)")
    parser.add_argument(
        "--dtype", nargs="+", default=None, choices=list(DTYPES), help="default fp32 fp16 (CPU fp32)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs on a CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        name, backends = "selective_scan", ["triton", "torch", "torch-chunked"]
        lengths, dtypes = args.lengths or [128, 512, 2048], args.dtype or ["fp32", "fp16"]
        where = torch.cuda.get_device_name()
    else:
        print(
            "bench.selective_scan: the Triton path needs a CUDA GPU; none is visible, so only the torch paths"
        )
        print(
            f"are measured, on the CPU ({torch.get_num_threads()} threads); 'auto' runs {CPU_BACKEND!r} there"
        )
        name, backends = "selective_scan_cpu", ["torch", "torch-chunked"]
        lengths, dtypes = args.lengths or [128, 256, 512], args.dtype or ["fp32"]
        where = f"cpu ({torch.get_num_threads()} threads)"

    rows = []
    for dtype_name in dtypes:
        for length in lengths:
            config = {"length": length, "dtype": dtype_name}
            try:
                rows.extend(bench_length(args, length, dtype_name, backends))
            except torch.cuda.OutOfMemoryError:
                rows.append({**config, "error": "out of memory"})
            except Exception as exc:  # a failed configuration is reported, and the others still run
                rows.append({**config, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(json.dumps(rows[-1]), flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    for row in rows:
        row["device"] = where
    write_bench_results(name, rows)


if __name__ == "__main__":
    main()
