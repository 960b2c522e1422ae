"""Attention on a GPU: the Triton kernel (ragfleet_kernels.attention) against torch's
scaled_dot_product_attention.

For every sequence length, head dim, mask and dtype both implementations run on the same tensors, forward
alone and forward + backward, and each row gives both times, both TFLOP/s and their ratio (triton / sdpa
throughput; above 1 means the kernel is faster). Sizes follow the FlashAttention-2 paper: batch x seq =
16k tokens and heads x head_dim = 2048. FLOPs: 4·B·H·N²·D forward, halved when causal; the backward
counts 2.5x the forward. Times are medians of `triton.testing.do_bench` (CUDA events, L2 flushed between
runs). Each row also gives the largest difference from SDPA in the output and in the gradients (a check
that the kernel computed the right thing, not a benchmark).

Run with `python -m bench.attention` (or `make bench-gpu`); `--seq 1024 4096 --dtype fp16` shrinks it.
Results go to bench/results/attention.json. Without a CUDA GPU it measures nothing: it says so and writes a
result that says skipped and why. A configuration that runs out of memory or fails is reported as such.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import RESULTS_DIR, write_bench_results
from ragfleet_kernels.attention import attention
from services.runtime.storage import atomic_write_json

NAME = "attention"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, backward: bool) -> float:
    forward = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)


def time_ms(fn: Callable[[], Any], grads_of: list[torch.Tensor]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, grad_to_none=grads_of, return_mode="median"))


def bench_config(
    seq: int, head_dim: int, causal: bool, dtype_name: str, tokens: int, model_dim: int
) -> list[dict]:
    batch, heads = max(1, tokens // seq), max(1, model_dim // head_dim)
    gen = torch.Generator(device="cuda").manual_seed(seq + head_dim)
    shape = (batch, heads, seq, head_dim)
    dtype = DTYPES[dtype_name]
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    impls: dict[str, Callable[[], torch.Tensor]] = {
        "triton": lambda: attention(q, k, v, causal=causal, backend="triton"),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }

    # Runs each once (which also autotunes the kernel) and compares them.
    results = {}
    for name, fn in impls.items():
        out = fn()
        results[name] = (out.detach(), *torch.autograd.grad(out, (q, k, v), do))
    diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(results["triton"], results["sdpa"])]
    del results

    base = {
        "seq": seq,
        "head_dim": head_dim,
        "batch": batch,
        "heads": heads,
        "causal": causal,
        "dtype": dtype_name,
    }
    rows = []
    for backward in (False, True):
        ms = {}
        for name, fn in impls.items():
            run = (lambda fn=fn: fn().backward(do)) if backward else (lambda fn=fn: fn())
            ms[name] = time_ms(run, [q, k, v])
        work = flops(batch, heads, seq, head_dim, causal, backward)
        rows.append(
            {
                **base,
                "pass": "fwd+bwd" if backward else "fwd",
                "triton_ms": round(ms["triton"], 4),
                "sdpa_ms": round(ms["sdpa"], 4),
                "triton_tflops": round(work / ms["triton"] / 1e9, 1),
                "sdpa_tflops": round(work / ms["sdpa"] / 1e9, 1),
                "ratio": round(ms["sdpa"] / ms["triton"], 3),
                "max_diff_out": diffs[0],
                "max_diff_grad": max(diffs[1:]),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128], choices=[32, 64, 128])
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--tokens", type=int, default=16384, help="batch x seq")
    parser.add_argument("--model-dim", type=int, default=2048, help="heads x head_dim")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU; none is visible, so nothing was measured"
        print(f"bench.attention: {reason}")
        atomic_write_json(RESULTS_DIR / f"{NAME}.json", {"name": NAME, "skipped": reason, "rows": []})
        return

    rows = []
    for dtype_name in args.dtype:
        for head_dim in args.head_dim:
            for causal in (False, True):
                for seq in args.seq:
                    config = {"seq": seq, "head_dim": head_dim, "causal": causal, "dtype": dtype_name}
                    try:
                        rows.extend(
                            bench_config(seq, head_dim, causal, dtype_name, args.tokens, args.model_dim)
                        )
                    except torch.cuda.OutOfMemoryError:
                        rows.append({**config, "error": "out of memory"})
                    except Exception as exc:  # a failed configuration is reported, and the others still run
                        rows.append({**config, "error": f"{type(exc).__name__}: {exc}"[:300]})
                    torch.cuda.empty_cache()
                    print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name()
    for row in rows:
        row["device"] = device
    write_bench_results(NAME, rows)


if __name__ == "__main__":
    main()
