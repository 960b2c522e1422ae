"""Retro decoding: KV-cached vs full recompute, and the share of time spent retrieving every chunk.

A randomly initialised Retro model of the size `ragfleet train retro` trains by default (RetroConfig's
defaults on MiniLM's vocabulary: 6 layers, d_model 256, chunks of 64, k = 2 neighbours of 128 tokens)
decodes the answer to a demo question greedily, to --tokens tokens (512), three ways:
  recompute      every step runs the whole sequence again (no cache): the baseline
  kv-cache       prefill once, then one token per step (`retro.decode`, the served path)
  kv-cache+grpc  a `ragfleet serve generator` process, retrieving a fresh neighbour set through a
                 `ragfleet serve retriever-dense` process (demo corpus ingested) each time 64 tokens
                 complete, called over loopback gRPC and read as a stream
The first two run in this process with the question's two best passages (searched through the fleet) as
every chunk's neighbours, so they do the same model work, and must produce the same tokens (the run fails
otherwise). Rows give ms per generated token after the prompt, tokens/s end to end, the speed-up over
recompute and, for the served path, the share of the generator's time spent waiting for per-chunk
retrieval (from its own timings). Weights are random: this measures speed, not answers.

torch runs one thread by default (--threads), here and in the fleet's processes: on a shared CPU, more
threads than idle cores make every step wait on the others. Run `python -m bench.retro_decode`
(`--tokens 128` for a quick run).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import write_bench_results
from services.demo.corpus import demo_documents, demo_questions
from services.generator.retro.data import load_tokenizer, prompt_ids
from services.generator.retro.decode import DecodeParams, DecodeResult, Neighbour, generate
from services.generator.retro.model import RetroConfig, RetroModel
from services.generator.retro.neighbours import RETRO_CHUNKING

INDEX = "bench"


def bench_in_process(
    model: RetroModel,
    tokenizer: Any,
    prompt: list[int],
    passages: list[Neighbour],
    tokens: int,
    use_cache: bool,
) -> tuple[DecodeResult, float]:
    """One greedy generation; returns its result and the wall time in ms."""
    params = DecodeParams(max_tokens=tokens, use_cache=use_cache)
    start = time.perf_counter()
    *_, result = generate(model, tokenizer, prompt, passages, None, params)
    return result, (time.perf_counter() - start) * 1000


def bench_served(
    address: str, question: str, context: list[Any], tokens: int
) -> tuple[dict[str, float], float]:
    """The generation through a Generator process with per-chunk retrieval: its timings and the client's
    wall time (ms) to read the whole stream."""
    import grpc

    from ragfleet.v1 import common_pb2, generator_pb2, generator_pb2_grpc

    request = generator_pb2.GenerateRequest(
        question=question,
        context=context,
        retrieval=common_pb2.RetrievalSpec(index=INDEX),
        params=common_pb2.GenerationParams(max_tokens=tokens),
    )
    warm_up = generator_pb2.GenerateRequest(
        question=question, params=common_pb2.GenerationParams(max_tokens=2)
    )
    with grpc.insecure_channel(address) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        stub.Generate(warm_up, timeout=600)  # loads the checkpoint
        start = time.perf_counter()
        events = list(stub.GenerateStream(request, timeout=3600))
        wall = (time.perf_counter() - start) * 1000
    done = events[-1].done
    if done.finish_reason != "length":
        raise RuntimeError(
            f"the served generation stopped early ({done.finish_reason}); per-token times would lie"
        )
    return {t.stage: t.millis for t in done.timings}, wall


def _row(
    mode: str, tokens: int, prefill: float, decode: float, wall: float, baseline: float
) -> dict[str, Any]:
    per_token = decode / max(tokens - 1, 1)
    return {
        "mode": mode,
        "tokens": tokens,
        "prefill_ms": round(prefill, 1),
        "ms_per_token": round(per_token, 2),
        "tokens_per_s": round(tokens / (wall / 1000), 1),
        "speedup_vs_recompute": round(baseline / per_token, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="Tokens to generate.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in the generator.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    import ragfleet
    from tools.fleet import start_local_fleet

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = RetroModel(RetroConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).eval()
    m = model.config.chunk_size
    question = demo_questions()[0]["question"]
    prompt = prompt_ids(tokenizer, question, m)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        model.save(home / "models" / "retro")
        fleet = start_local_fleet(
            home, names=("retriever-dense", "generator", "pipeline"), OMP_NUM_THREADS=str(args.threads)
        )
        try:
            with ragfleet.Client(fleet.address, timeout=600) as client:
                client.ingest(demo_documents(), index=INDEX, spec={"chunking": RETRO_CHUNKING})
                found = client.search(
                    question, index=INDEX, top_k=model.config.num_neighbours, with_continuation=True
                )
            context = list(found.results)
            passages = [
                Neighbour(
                    p.passage.id, p.passage.doc_id, p.passage.title, p.passage.text, p.continuation.text
                )
                for p in context
            ]
            full, full_wall = bench_in_process(
                model, tokenizer, prompt, passages, args.tokens, use_cache=False
            )
            cached, cached_wall = bench_in_process(
                model, tokenizer, prompt, passages, args.tokens, use_cache=True
            )
            served, served_wall = bench_served(
                fleet.services["generator"].address, question, context, args.tokens
            )
        finally:
            fleet.stop()
    if full.token_ids != cached.token_ids:
        raise RuntimeError("the cached and the recomputed decoding produced different tokens")

    n = len(cached.token_ids)
    baseline = full.timings["decode"] / max(n - 1, 1)
    generator_ms = served["prefill"] + served["decode"] + served["chunk_retrieval"]
    rows = [
        _row("recompute", n, full.timings["prefill"], full.timings["decode"], full_wall, baseline),
        _row("kv-cache", n, cached.timings["prefill"], cached.timings["decode"], cached_wall, baseline),
        {
            **_row("kv-cache+grpc", args.tokens, served["prefill"], served["decode"], served_wall, baseline),
            "retrievals": (args.tokens - 1) // m,
            "retrieval_ms": round(served["chunk_retrieval"], 1),
            "retrieval_share": round(served["chunk_retrieval"] / generator_ms, 4),
        },
    ]
    params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    for row in rows:
        row.update(threads=args.threads, prompt_tokens=len(prompt), params_m=params_m)
    write_bench_results("retro_decode", rows)


if __name__ == "__main__":
    main()
