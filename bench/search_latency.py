"""Search latency: in-process vs loopback gRPC (standalone `ragfleet serve`) vs Ray Serve's gRPC proxy.

The same queries run against the same corpus three ways, one request at a time:
  in-process   RetrieverService.Search called directly (no network, no serialization)
  grpc         SDK -> Pipeline -> Retriever, each a plain grpc.aio process on loopback
  serve        SDK -> Serve proxy -> Pipeline deployment -> Serve proxy -> Retriever deployment
Rows give p50/p99 per retriever and the ratio of each mode's p50 to in-process. Run with `make bench`
(or `python -m bench.search_latency --docs 2000 --queries 200`); prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import percentiles, write_bench_results
from services.demo.corpus import demo_documents, demo_questions

RETRIEVERS = ("bm25", "dense")


def corpus(n_docs: int) -> list[dict[str, Any]]:
    """The demo knowledge base, repeated with fresh ids until it has n_docs documents."""
    base = demo_documents()
    return [
        {**doc, "id": f"{doc['id']}-r{i // len(base)}"}
        for i, doc in enumerate(base[i % len(base)] for i in range(n_docs))
    ]


def queries(n: int) -> list[str]:
    qs = [q["question"] for q in demo_questions()]
    return [qs[i % len(qs)] for i in range(n)]


def time_calls(call, qs: list[str]) -> list[float]:
    call(qs[0])  # warm-up
    samples = []
    for q in qs:
        start = time.perf_counter()
        call(q)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _time_service(service: Any, passages: list[Any], qs: list[str], top_k: int) -> list[float]:
    from ragfleet.v1 import retriever_pb2
    from services.runtime.context import CallContext

    async def requests():
        for i in range(0, len(passages), 256):
            batch = passages[i : i + 256]
            yield retriever_pb2.IngestRequest(index="bench", passages=batch, last=i + 256 >= len(passages))

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(service.Ingest(requests(), CallContext()))

        def search(q: str) -> Any:
            request = retriever_pb2.SearchRequest(query=q, index="bench", top_k=top_k)
            return loop.run_until_complete(service.Search(request, CallContext()))

        return time_calls(search, qs)
    finally:
        loop.close()


def bench_in_process(home: Path, docs: list[dict], qs: list[str], top_k: int) -> dict[str, list[float]]:
    from ragfleet.v1 import common_pb2
    from services.gateway.chunking import ChunkSettings, chunk_document
    from services.retriever.service import RetrieverService
    from services.runtime.settings import Settings

    settings = Settings(home=home / "in-process")
    chunking = ChunkSettings.from_spec(common_pb2.ChunkingSpec(), settings.gateway, settings.limits)
    passages = [p for d in docs for p in chunk_document(common_pb2.Document(**d), chunking, settings.limits)]
    return {
        name: _time_service(RetrieverService(settings, backends=[name]), passages, qs, top_k)
        for name in RETRIEVERS
    }


def bench_client(client: Any, docs: list[dict], qs: list[str], top_k: int) -> dict[str, list[float]]:
    client.ingest(docs, index="bench")
    return {
        name: time_calls(lambda q, n=name: client.search(q, index="bench", top_k=top_k, retrievers=[n]), qs)
        for name in RETRIEVERS
    }


def bench_grpc(home: Path, docs: list[dict], qs: list[str], top_k: int) -> dict[str, list[float]]:
    import ragfleet
    from tools.fleet import start_local_fleet

    fleet = start_local_fleet(home / "grpc")
    try:
        with ragfleet.Client(fleet.address, timeout=600) as client:
            return bench_client(client, docs, qs, top_k)
    finally:
        fleet.stop()


def bench_serve(home: Path, docs: list[dict], qs: list[str], top_k: int) -> dict[str, list[float]]:
    import ragfleet
    from tools.fleet import RAGFLEET, free_port, service_env

    port = free_port()
    env = service_env(
        home / "serve", RAGFLEET_RAY__GRPC_PORT=str(port), RAGFLEET_RAY__HTTP_PORT=str(free_port())
    )
    subprocess.run([RAGFLEET, "up"], env=env, check=True, capture_output=True)
    try:
        with ragfleet.Client(f"127.0.0.1:{port}", application="pipeline", timeout=600) as client:
            return bench_client(client, docs, qs, top_k)
    finally:
        subprocess.run([RAGFLEET, "down"], env=env, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--skip-serve", action="store_true", help="Leave out the Ray Serve mode.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    docs, qs = corpus(args.docs), queries(args.queries)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        modes = {
            "in-process": bench_in_process(home, docs, qs, args.top_k),
            "grpc": bench_grpc(home, docs, qs, args.top_k),
        }
        if not args.skip_serve:
            modes["serve"] = bench_serve(home, docs, qs, args.top_k)
    rows = []
    for name in RETRIEVERS:
        base = percentiles(modes["in-process"][name])
        for mode, samples in modes.items():
            stats = percentiles(samples[name])
            rows.append(
                {
                    "retriever": name,
                    "mode": mode,
                    "p50_ms": round(stats["p50"], 3),
                    "p99_ms": round(stats["p99"], 3),
                    "qps": round(stats["qps"], 1),
                    "p50_vs_in_process": round(stats["p50"] / base["p50"], 2),
                    "p99_vs_in_process": round(stats["p99"] / base["p99"], 2),
                    "docs": args.docs,
                    "queries": args.queries,
                }
            )
    write_bench_results("search_latency", rows)


if __name__ == "__main__":
    main()
