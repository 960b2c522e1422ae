"""MaxSim on a GPU: the Triton kernel against plain torch, in the same run.

Shapes are PLAID's last stage: one query of 32 tokens against 1k-64k candidate documents of at most 220
tokens (lengths drawn uniformly from 16..220), dim 128, fp16; plus a batch of 64 queries against 4k
documents. Three implementations score the same tensors:
  triton         ragfleet_kernels.maxsim, backend "triton"
  torch-ref      ragfleet_kernels.maxsim, backend "torch" (the fp32 reference, chunked over documents)
  torch-fp16     what ColBERT's own scorer does: one fp16 einsum over the padded tensors, masked max, sum
Times are medians of `triton.testing.do_bench` (CUDA events, L2 flushed between runs) and include the
inputs' checks that every `maxsim` call makes. GB/s counts the bytes that must be read (the real query and
document tokens, not the padding) plus the scores written; TFLOP/s counts 2·dim multiply-adds for every
real query-token/document-token pair. Run with `python -m bench.maxsim` (or `make bench-gpu`); without a
CUDA GPU it prints why it skipped and exits 0 without writing results.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from bench.common import write_bench_results
from ragfleet_kernels.maxsim import maxsim

PLAID_DOCS = (1024, 4096, 16384, 65536)
BATCH = (64, 4096)  # (queries, documents)
Q_TOKENS, DOC_TOKENS, DIM = 32, 220, 128


def make_inputs(nq: int, nd: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(nq, Q_TOKENS, DIM, device="cuda", generator=gen), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(nd, DOC_TOKENS, DIM, device="cuda", generator=gen), dim=-1)
    q_lengths = torch.full((nq,), Q_TOKENS, device="cuda")  # ColBERT pads queries with [MASK] and keeps them
    d_lengths = torch.randint(16, DOC_TOKENS + 1, (nd,), device="cuda", generator=gen)
    return q.half(), q_lengths, d.half(), d_lengths


def torch_fp16(
    q: torch.Tensor, q_lengths: torch.Tensor, d: torch.Tensor, d_lengths: torch.Tensor
) -> torch.Tensor:
    """ColBERT-style scoring in the inputs' dtype over the padded tensors (all queries are full length)."""
    sim = torch.einsum("aie,bje->abij", q, d)
    pad = torch.arange(d.shape[1], device=d.device) >= d_lengths[:, None]
    sim = sim.masked_fill(pad[None, :, None, :], float("-inf"))
    return sim.amax(dim=3).float().sum(dim=2)


def bench_case(case: str, nq: int, nd: int, seed: int) -> list[dict]:
    from triton.testing import do_bench

    q, ql, d, dl = make_inputs(nq, nd, seed)
    impls: dict[str, Callable[[], torch.Tensor]] = {
        "triton": lambda: maxsim(q, ql, d, dl, backend="triton"),
        "torch-ref": lambda: maxsim(q, ql, d, dl, backend="torch"),
        "torch-fp16": lambda: torch_fp16(q, ql, d, dl),
    }
    reference = impls["torch-ref"]()
    real_tokens = int(ql.sum()) + int(dl.sum())
    bytes_moved = real_tokens * DIM * q.element_size() + nq * nd * 4
    flops = 2 * DIM * int(ql.sum()) * int(dl.sum())
    times = {name: do_bench(fn, warmup=25, rep=200, return_mode="median") for name, fn in impls.items()}
    rows = []
    for name, fn in impls.items():
        ms = times[name]
        rows.append(
            {
                "case": case,
                "queries": nq,
                "docs": nd,
                "impl": name,
                "ms": round(ms, 4),
                "GB_s": round(bytes_moved / ms / 1e6, 1),
                "TFLOP_s": round(flops / ms / 1e9, 2),
                "speedup_vs_torch_ref": round(times["torch-ref"] / ms, 2),
                "max_abs_err_vs_ref": round((fn() - reference).abs().max().item(), 6),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        reason = (
            "needs a CUDA GPU (the Triton kernel runs on CPU only in the interpreter, which says nothing)"
        )
        print(f"bench.maxsim: skipped: {reason}")
        print(json.dumps({"name": "maxsim", "skipped": reason}))
        return
    rows = []
    for nd in PLAID_DOCS:
        rows += bench_case("plaid", 1, nd, args.seed)
    rows += bench_case("batch", *BATCH, args.seed)
    for row in rows:
        row["device"] = torch.cuda.get_device_name()
    write_bench_results("maxsim", rows)


if __name__ == "__main__":
    main()
