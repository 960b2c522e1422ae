"""ColBERT search latency: the PLAID index vs exhaustive MaxSim, same corpus, same MaxSim backend, same run.

The corpus is synthetic, not encoded text (encoding 50k passages with MiniLM on 2 CPU cores takes ~40
minutes): `topic_mixture` draws ColBERT-like token embeddings. Topics are random unit vectors; each topic
has 64 "terms" spread around it; a passage picks 1-3 topics and draws every token from their terms
(skewed towards each topic's first terms, like word frequencies) plus per-token noise, L2-normalised. A
query is drawn from one passage: most of its tokens repeat that passage's terms, the rest are other terms
of its topics, each with fresh noise, so the exact top 10 are passages sharing many of those terms.

One index per `--nbits` is built with `PlaidIndex.add` (centroids and codec trained on the whole corpus),
saved and loaded back memory-mapped, as the Retriever serves it. Every query runs exhaustive MaxSim over the
uncompressed tokens (`search_exhaustive`), then PLAID with the Retriever's defaults (`SearchParams.for_k(k)`:
stage 4 on the stored fp16 tokens), with PLAID's published ndocs (a quarter of ours), and on every index
with stage 4 on decompressed residuals (`compressed_rerank`) at both ndocs, the last being PLAID as
published. Rows give p50/p99 per query, the speed-ups over exhaustive search and the mean top-k overlap
with it. Run:
`python -m bench.colbert [--passages 50000 --queries 100 --tokens 40]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import percentiles, write_bench_results
from services.retriever.colbert.plaid import PlaidIndex, SearchParams

TERMS_PER_TOPIC = 64
PASSAGES_PER_TOPIC = 50
TERM_SPREAD = 1.0  # a term's distance from its topic (norm of the Gaussian offset)
TOKEN_NOISE = 0.5  # a token's distance from its term
QUERY_OWN_TERMS = 0.75  # share of query tokens that repeat the source passage's terms
DATA = "synthetic topic-mixture token embeddings (not encoded text)"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _noisy(rng: np.random.Generator, centres: np.ndarray, scale: float) -> np.ndarray:
    """Unit vectors at Gaussian offsets of norm ~`scale` from `centres` (n, dim)."""
    dim = centres.shape[1]
    noise = rng.standard_normal(centres.shape, dtype=np.float32) * np.float32(scale / np.sqrt(dim))
    return _unit(centres + noise)


def topic_mixture(
    n_passages: int, n_queries: int, tokens: int, dim: int = 128, query_tokens: int = 32, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`n_passages` float16 token matrices (about `tokens` tokens each, from tokens/2 to 3·tokens/2) and
    `n_queries` float32 (query_tokens, dim) queries, every row unit length (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n_topics = max(4, n_passages // PASSAGES_PER_TOPIC)
    topics = _unit(rng.standard_normal((n_topics, dim), dtype=np.float32))
    terms = _noisy(rng, np.repeat(topics, TERMS_PER_TOPIC, axis=0), TERM_SPREAD)
    lengths = rng.integers(max(1, tokens // 2), tokens * 3 // 2 + 1, n_passages)
    passage_topics = rng.integers(0, n_topics, (n_passages, 3))
    topic_counts = rng.integers(1, 4, n_passages)

    def draw_terms(owners: np.ndarray) -> np.ndarray:
        """A term of one of each owner passage's topics; squaring a uniform skews towards a topic's first
        terms."""
        slot = (rng.random(len(owners)) * topic_counts[owners]).astype(np.int64)
        rank = (rng.random(len(owners)) ** 2 * TERMS_PER_TOPIC).astype(np.int64)
        return passage_topics[owners, slot] * TERMS_PER_TOPIC + rank

    token_terms = draw_terms(np.repeat(np.arange(n_passages), lengths))
    flat = np.empty((len(token_terms), dim), np.float16)
    step = 1 << 18  # tokens generated at once (bounds the float32 temporaries)
    for start in range(0, len(flat), step):
        flat[start : start + step] = _noisy(rng, terms[token_terms[start : start + step]], TOKEN_NOISE)
    passages = np.split(flat, np.cumsum(lengths)[:-1])

    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    queries = []
    for source in rng.integers(0, n_passages, n_queries):
        own = token_terms[starts[source] + rng.integers(0, lengths[source], query_tokens)]
        other = draw_terms(np.full(query_tokens, source))
        chosen = np.where(rng.random(query_tokens) < QUERY_OWN_TERMS, own, other)
        queries.append(_noisy(rng, terms[chosen], TOKEN_NOISE))
    return passages, queries


def overlap(a: list[tuple[int, float]], b: list[tuple[int, float]], k: int) -> float:
    """|top-k of a ∩ top-k of b| / k."""
    return len({r for r, _ in a[:k]} & {r for r, _ in b[:k]}) / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=40, help="Mean tokens per passage.")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--nbits", type=int, nargs="+", default=[2, 4], help="One PLAID index per value.")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    passages, queries = topic_mixture(args.passages, args.queries, args.tokens, args.dim, seed=args.seed)
    qs = [torch.from_numpy(q) for q in queries]
    params = SearchParams.for_k(args.top_k)
    with tempfile.TemporaryDirectory() as tmp:
        indexes, facts, build_s = {}, {}, {}
        for nbits in args.nbits:
            index = PlaidIndex.empty(args.dim, nbits)
            start = time.perf_counter()
            index.add(range(len(passages)), passages)
            build_s[nbits] = time.perf_counter() - start
            # Searched as the Retriever serves it: loaded back from its version folder, memory-mapped.
            facts[nbits] = index.save(Path(tmp) / f"nbits{nbits}")
            indexes[nbits] = PlaidIndex.load(Path(tmp) / f"nbits{nbits}")
        del passages, index
        # (method, nbits, params). Stages 1-3 use centroids only and fp16 tokens are the same in every
        # index, so only the compressed stage 4 differs by nbits.
        first = args.nbits[0]
        published = dataclasses.replace(params, ndocs=params.ndocs // 4)
        variants = [("plaid", first, params), (f"plaid-ndocs{published.ndocs}", first, published)]
        for n in args.nbits:
            for suffix, base in (("compressed", params), ("as-published", published)):
                compressed = dataclasses.replace(base, compressed_rerank=True)
                variants.append((f"plaid-{n}bit-{suffix}", n, compressed))
        # The exhaustive baseline reads the uncompressed tokens, the same in every index.
        baseline = indexes[first]
        for _name, nbits, variant in variants:
            indexes[nbits].search(qs[0], args.top_k, variant)  # warm-up
        baseline.search_exhaustive(qs[0], args.top_k)
        times: dict[str, list[float]] = {"exhaustive": [], **{name: [] for name, _, _ in variants}}
        overlaps: dict[str, list[float]] = {name: [] for name in times}
        for q in qs:
            start = time.perf_counter()
            exact = baseline.search_exhaustive(q, args.top_k)
            times["exhaustive"].append((time.perf_counter() - start) * 1000)
            overlaps["exhaustive"].append(1.0)
            for name, nbits, variant in variants:
                start = time.perf_counter()
                found = indexes[nbits].search(q, args.top_k, variant)
                times[name].append((time.perf_counter() - start) * 1000)
                overlaps[name].append(overlap(found, exact, args.top_k))

    stats = {name: percentiles(samples) for name, samples in times.items()}
    rows = []
    for name, nbits, variant in [("exhaustive", first, None), *variants]:
        plaid = variant is not None
        rows.append(
            {
                "method": name,
                "p50_ms": round(stats[name]["p50"], 3),
                "p99_ms": round(stats[name]["p99"], 3),
                "qps": round(stats[name]["qps"], 2),
                "p50_speedup": round(stats["exhaustive"]["p50"] / stats[name]["p50"], 2),
                "p99_speedup": round(stats["exhaustive"]["p99"] / stats[name]["p99"], 2),
                f"top{args.top_k}_overlap": round(float(np.mean(overlaps[name])), 4),
                "ncells/threshold/ndocs": (
                    f"{variant.ncells}/{variant.centroid_score_threshold}/{variant.ndocs}" if plaid else "-"
                ),
                "passages": facts[nbits]["passages"],
                "embeddings": facts[nbits]["embeddings"],
                "centroids": facts[nbits]["centroids"],
                "index_bytes": facts[nbits]["bytes"],
                # Of which the fp16 tokens (read by exhaustive search, and by stage 4 unless compressed).
                "fp16_bytes": facts[nbits]["vector_bytes"],
                "build_s": round(build_s[nbits], 1) if plaid else "-",
                "queries": args.queries,
                "torch_threads": torch.get_num_threads(),
                "data": DATA,
            }
        )
    write_bench_results("colbert", rows)


if __name__ == "__main__":
    main()
