"""Reranker speed: the service against the model it serves, FIRST's single token against generation, and
what reranking adds to an Ask.

Five comparisons, each a ratio of measurements of this one run:
  throughput  (query, passage) pairs per second through a `ragfleet serve reranker` process over loopback
              gRPC (one Rerank call per query, back to back) against `CrossEncoder.predict` on the same
              pairs in this process, with the same model and batch size (goal: the service keeps >= 0.9x)
  first       one window of 20 passages ordered by FIRST's single forward pass (the identifiers' logits
              at the first answer position) against generating the permutation "[B] > [A] > ..." greedily
              with the same model (`FirstReranker.generate_order`; goal: >= 1.5x faster)
  ask         p50/p99 of Ask(generate=False) through the Pipeline (dense + bm25 over the demo corpus,
              top 10) without reranking, and reranked from `--depth` passages (20) by each backend
  batching    `--concurrency` (8) Rerank calls of `--candidates` passages at once on one in-process
              RerankerService (no gRPC, no Ray): the cross-encoder scoring all waiting calls together
              (`reranker.batch_pairs`) against one call at a time (batch_pairs 0), in pairs per second
  serve_batch the same concurrent calls inside one Ray Serve replica (a local Ray, no proxy, called
              through a DeploymentHandle): the service's queue against Ray Serve's `@serve.batch`
              (max_batch_size `--concurrency`, its default 10 ms wait for a batch to fill); run it in a
              loopback-only network namespace (`unshare -n`), as the Ray tests are
The modes of a comparison take turns call by call, so a busy machine slows them alike, and compare by the
median call (throughput: the pairs of a call over its median time), which a burst of load barely moves.

Models: `--cross-encoder DIR` and `--first-model DIR` take trained checkpoints (what `ragfleet train`
writes). Without them the bench makes its own, untrained: all-MiniLM-L6-v2's transformer under a fresh
one-score head (the model `ragfleet train cross-encoder` starts from) and a small GPT-2 (4 layers, 256
wide, 2048 positions) over MiniLM's vocabulary, with no end-of-text token, so generation always writes the
whole permutation (4 tokens a passage, as a trained model's "[B] > " does). Their rankings are noise: the
rows say "untrained" and the numbers are speed only.

Queries are the demo questions, passages the demo corpus's documents (about 55 tokens each). torch runs
`--threads` threads (1), here and in the fleet's processes: on a shared CPU more threads than idle cores
make every call wait on the others. Run `python -m bench.rerank` (`--only batching,first` runs those
alone; only throughput and ask start a fleet, serve_batch a local Ray); prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import percentiles, write_bench_results
from services.demo.corpus import demo_documents, demo_questions

INDEX = "bench"
TOP_K = 10
FIRST_WINDOW = 20
SERVICES = ("retriever-dense", "retriever-bm25", "pipeline", "reranker")


def untrained_cross_encoder(path: Path) -> Path:
    """MiniLM's transformer under a fresh one-score classification head, with its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from services.runtime.models import resolve_model

    base = resolve_model("all-MiniLM-L6-v2")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.model_max_length = 256  # what `ragfleet train cross-encoder` trains for
    tokenizer.save_pretrained(path)
    return path


def untrained_causal_lm(path: Path) -> Path:
    """A small GPT-2 over MiniLM's vocabulary (whose letters are single tokens), with the tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from services.runtime.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2"))
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_positions=2048,
        n_embd=256,
        n_layer=4,
        n_head=4,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def query_sets(n_queries: int, n_candidates: int) -> list[tuple[str, list[str]]]:
    """`n_queries` demo questions (cycled), each with `n_candidates` demo documents' texts."""
    questions = [q["question"] for q in demo_questions()]
    texts = [d["text"] for d in demo_documents()]
    return [
        (questions[i % len(questions)], [texts[(7 * i + j) % len(texts)] for j in range(n_candidates)])
        for i in range(n_queries)
    ]


def timed(call: Callable[..., object], *args: Any) -> float:
    """Milliseconds `call(*args)` took."""
    start = time.perf_counter()
    call(*args)
    return (time.perf_counter() - start) * 1000


def rerank_requests(sets: list[tuple[str, list[str]]]) -> list[Any]:
    """A cross-encoder RerankRequest of all its passages per (query, passages)."""
    from ragfleet.v1 import common_pb2, reranker_pb2

    return [
        reranker_pb2.RerankRequest(
            query=query,
            candidates=[
                common_pb2.ScoredPassage(passage=common_pb2.Passage(id=f"p{j}", text=text))
                for j, text in enumerate(texts)
            ],
            top_k=len(texts),
            backend="cross_encoder",
        )
        for query, texts in sets
    ]


# --- throughput: the service against CrossEncoder.predict ---------------------------------------


def bench_throughput(
    address: str, model_path: str, sets: list[tuple[str, list[str]]], rounds: int
) -> dict[str, list[float]]:
    """{mode: ms per call} for "in-process" and "grpc", call by call in turn, `rounds` times over `sets`."""
    import grpc

    from ragfleet.v1 import reranker_pb2_grpc
    from services.reranker.cross_encoder import CrossEncoderReranker
    from services.runtime.settings import RerankerSettings

    settings = RerankerSettings()
    cross_encoder = CrossEncoderReranker.load(model_path, settings).model
    pairs = [[(query, text) for text in texts] for query, texts in sets]
    requests = rerank_requests(sets)
    with grpc.insecure_channel(address) as channel:
        stub = reranker_pb2_grpc.RerankerStub(channel)
        calls: dict[str, Callable[[int], object]] = {
            "in-process": lambda i: cross_encoder.predict(
                pairs[i], batch_size=settings.pairs_per_batch(), show_progress_bar=False
            ),
            "grpc": lambda i: stub.Rerank(requests[i], timeout=600),
        }
        for call in calls.values():  # warm-up; the service loads its model on the first call
            call(0)
        samples: dict[str, list[float]] = {mode: [] for mode in calls}
        for _ in range(rounds):
            for i in range(len(sets)):
                for mode, call in calls.items():
                    samples[mode].append(timed(call, i))
    return samples


# --- batching: concurrent calls scored together against one at a time ---------------------------


def bench_batching(
    home: Path, model_path: str, sets: list[tuple[str, list[str]]], concurrency: int, rounds: int
) -> dict[str, list[float]]:
    """{mode: ms per round of `concurrency` concurrent Rerank calls} for "one call at a time" and
    "batched", round by round in turn, on in-process RerankerServices of the same model."""
    from services.reranker.service import RerankerService
    from services.runtime.context import CallContext
    from services.runtime.settings import Settings

    services = {
        mode: RerankerService(
            Settings(home=home, reranker={"cross_encoder_model": model_path, "batch_pairs": pairs})
        )
        for mode, pairs in (("one call at a time", 0), ("batched", concurrency * len(sets[0][1])))
    }
    requests = rerank_requests(sets)

    async def measure() -> dict[str, list[float]]:
        samples: dict[str, list[float]] = {mode: [] for mode in services}
        for r in range(-1, rounds):  # round -1 is the warm-up: each service loads its model
            for mode, service in services.items():
                start = time.perf_counter()
                calls = [requests[(r * concurrency + k) % len(requests)] for k in range(concurrency)]
                await asyncio.gather(*(service.Rerank(call, CallContext()) for call in calls))
                if r >= 0:
                    samples[mode].append((time.perf_counter() - start) * 1000)
        return samples

    return asyncio.run(measure())


def bench_serve_batch(
    home: Path, model_path: str, sets: list[tuple[str, list[str]]], concurrency: int, rounds: int
) -> dict[str, list[float]]:
    """{mode: ms per round of `concurrency` concurrent calls} for the service's queue ("batched") and
    Ray Serve's `@serve.batch` (max_batch_size `concurrency`, its default 10 ms wait) scoring the same
    model, both inside one Serve replica of a local Ray and called through the same DeploymentHandle."""
    import ray
    from ray import serve

    from services.reranker.service import RerankerService
    from services.runtime.settings import Settings

    pairs = concurrency * len(sets[0][1])

    @serve.deployment(max_ongoing_requests=4 * concurrency)
    class Modes:
        def __init__(self) -> None:
            torch.set_num_threads(1)
            reranker = {"cross_encoder_model": model_path, "batch_pairs": pairs}
            self.loaded = RerankerService(Settings(home=home, reranker=reranker)).model("cross_encoder")

        @serve.batch(max_batch_size=concurrency, batch_wait_timeout_s=0.01)
        async def serve_batched(self, queries: list[str], texts: list[list[str]]) -> list[list[int]]:
            calls = list(zip(queries, texts, strict=True))
            rankings = await asyncio.to_thread(self.loaded.model.rerank_many, calls)
            return [ranking.order for ranking in rankings]

        async def __call__(self, mode: str, query: str, texts: list[str]) -> list[int]:
            if mode == "@serve.batch":
                return await self.serve_batched(query, texts)
            return (await self.loaded.batcher.rank(query, texts)).order

    # Local Ray and Serve without a proxy: the calls come through the handle, nothing listens outside.
    # A new local ray.init() turns token auth on by default and leaves ~/.ray/auth_token behind, which
    # then fails every later `ray start` cluster of the fleet ("InvalidAuthToken"): keep it off.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(Modes.bind(), name="rerank-bench", route_prefix=None)

        async def measure() -> dict[str, list[float]]:
            samples: dict[str, list[float]] = {"batched": [], "@serve.batch": []}
            for r in range(-1, rounds):  # round -1 is the warm-up
                for mode in samples:
                    calls = [sets[(r * concurrency + k) % len(sets)] for k in range(concurrency)]
                    start = time.perf_counter()
                    await asyncio.gather(*(handle.remote(mode, q, texts) for q, texts in calls))
                    if r >= 0:
                        samples[mode].append((time.perf_counter() - start) * 1000)
            return samples

        return asyncio.run(measure())
    finally:
        serve.shutdown()
        ray.shutdown()


# --- FIRST: one forward pass against generating the permutation ---------------------------------


def bench_first(model_path: str, sets: list[tuple[str, list[str]]]) -> dict[str, list[float]]:
    """{mode: ms per window} for "single token" and "generate", query by query in turn."""
    from services.reranker.first import FirstReranker
    from services.runtime.settings import RerankerSettings

    model = FirstReranker.load(model_path, RerankerSettings(first_window=FIRST_WINDOW))
    modes: dict[str, Callable[[str, list[str]], object]] = {
        "single token": model.rerank,
        "generate": model.generate_order,
    }
    for rank in modes.values():  # warm-up
        rank(*sets[0])
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for query, texts in sets:
        for mode, rank in modes.items():
            samples[mode].append(timed(rank, query, texts))
    return samples


# --- Ask with and without reranking -------------------------------------------------------------


def bench_ask(address: str, n_asks: int, depth: int) -> dict[str, list[float]]:
    """{mode: ms per Ask(generate=False)} for "no rerank" and each backend, question by question in turn."""
    import ragfleet

    questions = [q["question"] for q in demo_questions()]
    modes: dict[str, Any] = {
        "no rerank": None,
        **{
            f"rerank {backend}": {"backend": backend, "depth": depth, "required": True}
            for backend in ("cross_encoder", "first")
        },
    }
    with ragfleet.Client(address, timeout=600) as client:
        client.ingest(demo_documents(), index=INDEX)

        def ask(question: str, rerank: Any) -> object:
            return client.ask_once(question, index=INDEX, top_k=TOP_K, rerank=rerank, generate=False)

        for rerank in modes.values():  # warm-up; the Reranker loads each model on its first call
            ask(questions[0], rerank)
        samples: dict[str, list[float]] = {mode: [] for mode in modes}
        for i in range(n_asks):
            for mode, rerank in modes.items():
                samples[mode].append(timed(ask, questions[i % len(questions)], rerank))
    return samples


# --- rows ---------------------------------------------------------------------------------------


COLUMNS = (
    "comparison",
    "mode",
    "p50_ms",
    "p99_ms",
    "pairs_per_s",
    "ratio",
    "p99_ratio",
    "goal",
    "met",
    "weights",
    "threads",
)


def _row(comparison: str, mode: str, samples_ms: list[float], **values: Any) -> dict[str, Any]:
    """A row of every column (None where one does not apply), with the samples' p50 and p99."""
    stats = percentiles(samples_ms)
    row = dict.fromkeys(COLUMNS) | {"comparison": comparison, "mode": mode}
    return row | {"p50_ms": round(stats["p50"], 1), "p99_ms": round(stats["p99"], 1)} | values


def _goal(ratio: float, least: float) -> dict[str, Any]:
    return {"goal": f">= {least}", "met": ratio >= least}


def throughput_rows(
    throughput: dict[str, list[float]], candidates: int, weights: str
) -> list[dict[str, Any]]:
    comparison = "cross-encoder throughput (ratio: pairs/s vs in-process)"
    pairs_per_s = {mode: candidates * 1000 / percentiles(ms)["p50"] for mode, ms in throughput.items()}
    ratio = pairs_per_s["grpc"] / pairs_per_s["in-process"]
    return [
        _row(
            comparison,
            label,
            throughput[mode],
            pairs_per_s=round(pairs_per_s[mode], 1),
            weights=weights,
            **extra,
        )
        for mode, label, extra in (
            ("in-process", "CrossEncoder.predict in-process", {"ratio": 1.0}),
            ("grpc", "Reranker over gRPC", {"ratio": round(ratio, 3), **_goal(ratio, 0.9)}),
        )
    ]


def batching_rows(
    batching: dict[str, list[float]], concurrency: int, candidates: int, weights: str, where: str
) -> list[dict[str, Any]]:
    """Pairs per second of each mode, as a ratio to the first mode's."""
    comparison = f"{concurrency} concurrent calls of {candidates}, {where} (ratio: pairs/s vs the first mode)"
    pairs = concurrency * candidates
    pairs_per_s = {mode: pairs * 1000 / percentiles(ms)["p50"] for mode, ms in batching.items()}
    base = next(iter(pairs_per_s.values()))
    return [
        _row(
            comparison,
            mode,
            samples,
            pairs_per_s=round(pairs_per_s[mode], 1),
            ratio=round(pairs_per_s[mode] / base, 3),
            weights=weights,
        )
        for mode, samples in batching.items()
    ]


def first_rows(first: dict[str, list[float]], weights: str) -> list[dict[str, Any]]:
    comparison = f"FIRST window of {FIRST_WINDOW} (ratio: p50 speed-up over generate)"
    speedup = percentiles(first["generate"])["p50"] / percentiles(first["single token"])["p50"]
    return [
        _row(comparison, mode, first[mode], weights=weights, **extra)
        for mode, extra in (
            ("generate", {"ratio": 1.0}),
            ("single token", {"ratio": round(speedup, 3), **_goal(speedup, 1.5)}),
        )
    ]


def ask_rows(ask: dict[str, list[float]], weights: dict[str, str]) -> list[dict[str, Any]]:
    comparison = "Ask generate=False (ratio: p50 vs no rerank)"
    plain = percentiles(ask["no rerank"])
    rows = []
    for mode, samples in ask.items():
        stats = percentiles(samples)
        rows.append(
            _row(
                comparison,
                mode,
                samples,
                ratio=round(stats["p50"] / plain["p50"], 3),
                p99_ratio=round(stats["p99"] / plain["p99"], 3),
                weights=weights.get(mode.removeprefix("rerank ")),
            )
        )
    return rows


COMPARISONS = ("throughput", "first", "ask", "batching", "serve_batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cross-encoder", help="A trained cross-encoder checkpoint (default: untrained).")
    parser.add_argument("--first-model", help="A trained FIRST causal LM checkpoint (default: untrained).")
    parser.add_argument("--queries", type=int, default=8, help="Queries for throughput, batching and FIRST.")
    parser.add_argument("--candidates", type=int, default=30, help="Passages per throughput/batching query.")
    parser.add_argument("--rounds", type=int, default=2, help="Throughput passes over the queries.")
    parser.add_argument("--asks", type=int, default=24, help="Asks per mode.")
    parser.add_argument("--depth", type=int, default=20, help="Passages a reranked Ask rescores.")
    parser.add_argument("--concurrency", type=int, default=8, help="Concurrent calls of a batching round.")
    parser.add_argument("--batch-rounds", type=int, default=6, help="Batching rounds per mode.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in the fleet.")
    parser.add_argument(
        "--only", default=",".join(COMPARISONS), help=f"Comparisons to run, of {','.join(COMPARISONS)}."
    )
    args = parser.parse_args()
    only = [name for name in args.only.split(",") if name]
    if unknown := set(only) - set(COMPARISONS):
        parser.error(f"--only: unknown comparisons {sorted(unknown)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from transformers.utils import logging

    from tools.fleet import start_local_fleet

    logging.set_verbosity_error()  # the untrained head's "newly initialized" warning is expected
    logging.disable_progress_bar()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        # Absolute: the fleet's processes read them too.
        cross_encoder = str(
            Path(args.cross_encoder or untrained_cross_encoder(home / "cross-encoder")).resolve()
        )
        weights = {
            "cross_encoder": "given" if args.cross_encoder else "untrained",
            "first": "given" if args.first_model else "untrained",
        }
        first_model = None
        if "first" in only or "ask" in only:
            first_model = str(Path(args.first_model or untrained_causal_lm(home / "first")).resolve())
        batchings = (
            ("batching", bench_batching, "in-process"),
            ("serve_batch", bench_serve_batch, "in one Ray Serve replica"),
        )
        for name, bench, where in batchings:
            if name in only:
                sets = query_sets(args.queries, args.candidates)
                samples = bench(home, cross_encoder, sets, args.concurrency, args.batch_rounds)
                rows += batching_rows(
                    samples, args.concurrency, args.candidates, weights["cross_encoder"], where
                )
        if "first" in only:
            first = bench_first(first_model, query_sets(args.queries, FIRST_WINDOW))
            rows += first_rows(first, weights["first"])
        if "throughput" in only or "ask" in only:
            fleet = start_local_fleet(
                home,
                SERVICES,
                OMP_NUM_THREADS=str(args.threads),
                RAGFLEET_RERANKER__CROSS_ENCODER_MODEL=cross_encoder,
                RAGFLEET_RERANKER__FIRST_MODEL=first_model or "",
            )
            try:
                if "throughput" in only:
                    sets = query_sets(args.queries, args.candidates)
                    throughput = bench_throughput(
                        fleet.services["reranker"].address, cross_encoder, sets, args.rounds
                    )
                    rows += throughput_rows(throughput, args.candidates, weights["cross_encoder"])
                if "ask" in only:
                    rows += ask_rows(bench_ask(fleet.address, args.asks, args.depth), weights)
            finally:
                fleet.stop()
    for row in rows:
        row.update(threads=args.threads)
    if "untrained" in weights.values():
        print("Untrained models (made by the bench): the numbers are speed only, not ranking quality.")
    full = set(only) == set(COMPARISONS)
    write_bench_results("rerank" if full else "rerank-" + "-".join(only), rows)


if __name__ == "__main__":
    main()
