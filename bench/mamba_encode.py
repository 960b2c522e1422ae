"""Encoding one long text: the Mamba encoder against MiniLM chunked at 512 tokens, in the same run.

Mamba reads the whole text in one pass (in windows of `--window` tokens, the scan state carried), so its
cost grows linearly with the length; MiniLM (all-MiniLM-L6-v2, attention quadratic within a chunk)
reads a long text as ceil(L / 510) chunks of at most 512 tokens ([CLS] + 510 + [SEP]) in one batch,
mean-pooled, as a chunking pipeline would. The Mamba model is the default recipe's size (`ragfleet
train mamba`: 2 layers, d_model 384, d_inner 384, d_state 8, MiniLM's vocabulary) with the untrained
initial weights; weights do not change the time. Inputs are token ids (tokenising is not timed), the
same ids for both models. Times are medians of `--repeats` runs after one warm-up, in milliseconds,
on the CPU threads torch uses (or a CUDA GPU when there is one; the scan then runs the Triton kernel).

Reported: per length, both times and their ratio; Mamba's 8k/512 time ratio (linear growth is 16x);
the crossover: the shortest measured length from which Mamba is cheaper at every longer one.
Run `python -m bench.mamba_encode` (writes bench/results/mamba_encode.json and prints a table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from bench.common import RESULTS_DIR, write_bench_results
from services.retriever.mamba.model import MambaEncoder
from services.retriever.mamba.train import initial_model
from services.runtime.models import resolve_model
from services.runtime.storage import atomic_write_json

LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192)
MINILM_CHUNK = 510  # content tokens of one 512-token MiniLM input


def timed(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median milliseconds of `run` over `repeats` calls after one warm-up."""
    run()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=2048, help="Mamba tokens per pass")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--state-size", type=int, default=8)
    parser.add_argument("--expand", type=int, default=1)
    args = parser.parse_args()
    from transformers import AutoModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = initial_model(args.layers, args.state_size, args.expand, seed=0)
    mamba = MambaEncoder(model.to(device).eval(), tokenizer, max_tokens=max(args.lengths), window=args.window)
    minilm = AutoModel.from_pretrained(resolve_model("all-MiniLM-L6-v2")).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    # Ordinary wordpieces (ids past the special and unused ones), the same for both models.
    vocabulary = torch.arange(1996, tokenizer.vocab_size)

    def minilm_encode(ids: torch.Tensor) -> torch.Tensor:
        chunks = list(ids.split(MINILM_CHUNK))
        width = max(len(c) for c in chunks) + 2
        batch = torch.zeros(len(chunks), width, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, chunk in enumerate(chunks):
            row = torch.cat(
                [torch.tensor([tokenizer.cls_token_id]), chunk, torch.tensor([tokenizer.sep_token_id])]
            )
            batch[i, : len(row)], mask[i, : len(row)] = row, 1
        batch, mask = batch.to(device), mask.to(device)
        hidden = minilm(input_ids=batch, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(pooled.mean(0), dim=0)

    rows = []
    with torch.inference_mode():
        for length in args.lengths:
            ids = vocabulary[torch.randint(len(vocabulary), (length,), generator=generator)]
            mamba_ids = [[*ids.tolist(), mamba.config.eos_token_id]]
            mamba_ms = timed(lambda ids=mamba_ids: mamba.embed(ids), args.repeats, device)
            minilm_ms = timed(lambda ids=ids: minilm_encode(ids), args.repeats, device)
            rows.append(
                {
                    "tokens": length,
                    "mamba_ms": round(mamba_ms, 1),
                    "minilm_ms": round(minilm_ms, 1),
                    "minilm_chunks": -(-length // MINILM_CHUNK),
                    "mamba/minilm": round(mamba_ms / minilm_ms, 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    by_length = {row["tokens"]: row for row in rows}
    cheaper = [row["mamba/minilm"] < 1 for row in rows]
    crossover = next((rows[i]["tokens"] for i in range(len(rows)) if all(cheaper[i:])), None)
    summary = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "mamba": {
            "layers": args.layers,
            "d_model": mamba.dimension,
            "d_inner": mamba.config.intermediate_size,
            "d_state": args.state_size,
        },
        "window": args.window,
        "mamba_8k_over_512": (
            round(by_length[8192]["mamba_ms"] / by_length[512]["mamba_ms"], 2)
            if {512, 8192} <= by_length.keys()
            else None
        ),
        "crossover_tokens": crossover,
    }
    path = write_bench_results("mamba_encode", rows)
    atomic_write_json(RESULTS_DIR / path.name, {"name": "mamba_encode", "summary": summary, "rows": rows})
    print()
    print(json.dumps({"summary": summary}, indent=2))


if __name__ == "__main__":
    main()
