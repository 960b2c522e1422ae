"""SEAL's FM-index (services.retriever.seal): build, size, load and query latency against a brute-force scan.

For every corpus size (`--tokens`, default 1M, 10M and 50M) a corpus of Zipfian token ids (s = 1.1) over a
30k vocabulary is cut into passages of 50-150 tokens, and one row each gives:
  build      build time (wall and the process's CPU time, which a busy machine does not inflate), bytes
             of the index per corpus token (arrays; and the saved folder on disk), save time and load time
             (a memory-map: no structure is rebuilt on load)
  count, next_tokens, locate
             latency of one call (p50 / p99 µs) on n-grams of 1, 2, 4 and 8 tokens taken from the corpus at
             random positions (so frequent n-grams are drawn more often, as a decoder's beams tend to be),
             beside the same answer from a brute-force numpy scan of the token stream (fewer repetitions;
             every scan answer is checked against the index's). `locate` is timed on the n-grams with at
             most 1,500 occurrences only, the ones SEAL locates.
  decode_step
             one constrained decoding step: `next_tokens` of 15 beams, n-grams of the step's length (0-9)
             taken from the corpus; p50 / p99 ms per step. The goal for SEAL is <= 1 ms of index work.
  segments_add_remove, merge, and decode_step with `segments` (sizes up to --segment-tokens)
             the same corpus added to a SegmentedIndex in `--segments` batches and 1% of its passages
             removed: add, remove and merge times, and decode steps over the segments and tombstones, then
             over the merged index.
  query (with `--seal-model DIR --beir DIR`, e.g. SciFact; `end_to_end_rows`)
             the BEIR corpus indexed with the LM's tokenizer (build time, tokens), then `--e2e-queries`
             test queries searched as the retriever searches them (`search.search`, SEAL's defaults):
             p50 / p99 ms of a whole query, of the LM's part (its forward passes) and of the rest (index
             work: next_tokens, counts, locate, scoring), and of one constrained decoding step with the
             LM (the beam search's time over its steps: the LM's `next_logprobs` of up to 15 beams plus
             their `next_tokens`) and without it (`e2e_step_index`: the step's index work alone). The
             goals are <= 50 ms of index work per query beside the LM's time and <= 1 ms per step.

Run with `python -m bench.seal` (`--tokens 1000000` for a quick run, `--only e2e` for the query rows
alone); results go to bench/results/seal.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import percentiles, write_bench_results
from services.retriever.seal.fmindex import FMIndex
from services.retriever.seal.search import SealParams, constrained_beam_search, search
from services.retriever.seal.segments import SegmentedIndex
from services.runtime.storage import tree_size

NAME = "seal"
VOCAB = 30_000
NGRAM_LENGTHS = (1, 2, 4, 8)
BEAM = 15
LOCATE_MAX = 1500  # SEAL proposes passages from n-grams with at most this many occurrences
PARTS = ("index", "segments", "e2e")  # what --only picks: index_rows, segment_rows, end_to_end_rows


def zipf_corpus(n_tokens: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens back to back, passage lengths): Zipfian ids over `vocab` in passages of 50-150 tokens."""
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(vocab)  # the most frequent token is not always id 0
    flat = ranks[(rng.zipf(1.1, size=n_tokens) - 1) % vocab].astype(np.int64)
    lengths = rng.integers(50, 151, size=n_tokens // 50 + 1)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), n_tokens)) + 1]
    lengths[-1] -= int(lengths.sum()) - n_tokens
    return flat, lengths


def sample_ngrams(
    flat: np.ndarray, lengths: np.ndarray, m: int, k: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """`k` n-grams of `m` tokens that occur, each at a random position inside a passage."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    long_enough = np.flatnonzero(lengths >= m)
    passages = rng.choice(long_enough, size=k)
    offsets = (rng.random(k) * (lengths[passages] - m + 1)).astype(np.int64)
    return [flat[s : s + m] for s in starts[passages] + offsets]


class Scan:
    """Brute-force answers from the token stream with -1 between passages (no n-gram crosses it)."""

    def __init__(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        cuts = np.cumsum(lengths)[:-1]
        self.stream = np.insert(flat, cuts, -1)
        self.passage_starts = np.concatenate([[0], cuts + np.arange(1, len(cuts) + 1)])

    def positions(self, ngram: np.ndarray) -> np.ndarray:
        m = len(ngram)
        found = np.flatnonzero(self.stream[: len(self.stream) - m + 1] == ngram[0])
        for i in range(1, m):
            found = found[self.stream[found + i] == ngram[i]]
        return found

    def count(self, ngram: np.ndarray) -> int:
        return len(self.positions(ngram))

    def next_tokens(self, ngram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        after = self.positions(ngram) + len(ngram)
        following = self.stream[after[after < len(self.stream)]]
        return np.unique(following[following >= 0], return_counts=True)

    def locate(self, ngram: np.ndarray) -> np.ndarray:
        at = self.positions(ngram)
        passages = np.searchsorted(self.passage_starts, at, side="right") - 1
        return np.stack([passages, at - self.passage_starts[passages]], axis=1)


def _latencies_us(call: Callable[[np.ndarray], Any], ngrams: list[np.ndarray]) -> list[float]:
    samples = []
    for ngram in ngrams:
        start = time.perf_counter()
        call(ngram)
        samples.append(max((time.perf_counter() - start) * 1e6, 1e-3))
    return samples


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return all(np.array_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(np.unique(a, axis=0), np.unique(b, axis=0))
    return a == b


def index_rows(n_tokens: int, queries: int, scans: int, seed: int = 0) -> list[dict[str, Any]]:
    """The build, query and decode-step rows of one corpus size."""
    rng = np.random.default_rng(seed)
    flat, lengths = zipf_corpus(n_tokens, VOCAB, seed)
    passages = np.split(flat, np.cumsum(lengths)[:-1])
    start, cpu = time.perf_counter(), time.process_time()
    index = FMIndex.build(passages, VOCAB)
    build_s, build_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    del passages
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        index.save(Path(tmp) / "fm")
        save_s = time.perf_counter() - start
        disk = tree_size(Path(tmp) / "fm")
        start = time.perf_counter()
        index = FMIndex.load(Path(tmp) / "fm")
        load_s = time.perf_counter() - start
        base = {"tokens": n_tokens, "passages": len(lengths)}
        rows: list[dict[str, Any]] = [
            {
                **base,
                "part": "build",
                "build_s": round(build_s, 2),
                "build_cpu_s": round(build_cpu_s, 2),  # the build's own CPU time, on a busy machine too
                "save_s": round(save_s, 2),
                "load_s": round(load_s, 4),
                "bytes_per_token": round(index.nbytes / n_tokens, 2),
                "disk_bytes_per_token": round(disk / n_tokens, 2),
            }
        ]
        rows.extend(_query_rows(index, Scan(flat, lengths), flat, lengths, base, queries, scans, rng))
        rows.extend(_decode_rows(index, flat, lengths, base, queries, rng))
    return rows


def _query_rows(
    index: FMIndex,
    scan: Scan,
    flat: np.ndarray,
    lengths: np.ndarray,
    base: dict[str, Any],
    queries: int,
    scans: int,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    rows = []
    for m in NGRAM_LENGTHS:
        sampled = sample_ngrams(flat, lengths, m, queries, rng)
        rare = [g for g in sampled if index.count(g) <= LOCATE_MAX]
        for part, ngrams in (("count", sampled), ("next_tokens", sampled), ("locate", rare)):
            if not ngrams:
                continue
            ours, brute = getattr(index, part), getattr(scan, part)
            checked = ngrams[:scans]
            for ngram in checked:
                if not _same(ours(ngram), brute(ngram)):
                    raise AssertionError(f"{part}({ngram.tolist()}) differs from the scan")
            fast = percentiles(_latencies_us(ours, ngrams))
            slow = percentiles(_latencies_us(brute, checked))
            rows.append(
                {
                    **base,
                    "part": part,
                    "ngram": m,
                    "ngrams": len(ngrams),
                    "p50_us": round(fast["p50"], 1),
                    "p99_us": round(fast["p99"], 1),
                    "scan_p50_us": round(slow["p50"], 1),
                    "speedup_p50": round(slow["p50"] / fast["p50"], 1),
                    "mean_count": round(float(np.mean([index.count(g) for g in ngrams])), 1),
                }
            )
    return rows


def _decode_rows(
    index: FMIndex | SegmentedIndex,
    flat: np.ndarray,
    lengths: np.ndarray,
    base: dict[str, Any],
    steps: int,
    rng: np.random.Generator,
    ngram_lengths: Sequence[int] = range(10),
) -> list[dict[str, Any]]:
    rows = []
    for m in ngram_lengths:
        samples = []
        for _ in range(max(steps // 10, 5)):
            beams = sample_ngrams(flat, lengths, m, BEAM, rng)
            start = time.perf_counter()
            for beam in beams:
                index.next_tokens(beam)
            samples.append((time.perf_counter() - start) * 1e3)
        summary = percentiles(samples)
        rows.append(
            {
                **base,
                "part": "decode_step",
                "ngram": m,
                "p50_ms": round(summary["p50"], 3),
                "p99_ms": round(summary["p99"], 3),
            }
        )
    return rows


class _TimedLM:
    """An LM whose calls add their seconds to `seconds`, so the index's share of a query is the rest."""

    def __init__(self, lm: Any) -> None:
        self.lm, self.vocab_size, self.seconds, self.calls = lm, lm.vocab_size, 0.0, 0

    def _timed(self, name: str, *args: Any) -> np.ndarray:
        start = time.perf_counter()
        try:
            return getattr(self.lm, name)(*args)
        finally:
            self.seconds += time.perf_counter() - start

    def next_logprobs(self, query: Any, prefixes: Any) -> np.ndarray:
        self.calls += 1  # one decoding step
        return self._timed("next_logprobs", query, prefixes)

    def sequence_logprobs(self, query: Any, ngrams: Any) -> np.ndarray:
        return self._timed("sequence_logprobs", query, ngrams)


def end_to_end_rows(model: Path, beir: Path, queries: int, split: str = "test") -> list[dict[str, Any]]:
    """The BEIR corpus in a SegmentedIndex, searched with the LM at `model` (see the module docstring)."""
    from services.datasets.collections import load_beir
    from services.datasets.pairs import document_text
    from services.retriever.seal.lm import SealLM
    from services.retriever.seal.segments import SegmentedIndex

    lm = SealLM.load(model)
    data = load_beir(beir, split)
    texts = [document_text(d["title"], d["text"]) for d in data.corpus.values()]
    start = time.perf_counter()
    tokens = lm.encode_passages(texts)
    tokenize_s = time.perf_counter() - start
    start = time.perf_counter()
    index = SegmentedIndex.empty(lm.vocab_size)
    index.add(list(enumerate(tokens)))
    build_s = time.perf_counter() - start
    base = {"corpus": beir.name, "passages": len(texts), "tokens": index.n_tokens, "model": str(model)}
    rows = [{**base, "part": "e2e_build", "tokenize_s": round(tokenize_s, 2), "build_s": round(build_s, 2)}]

    timed, params = _TimedLM(lm), SealParams()
    total, lm_part, step, step_index = [], [], [], []
    for text in list(data.queries.values())[:queries]:
        ids, words = lm.encode_query(text)
        if not ids:
            continue
        timed.seconds = 0.0
        start = time.perf_counter()
        search(timed, index, ids, words, 10, params)
        total.append((time.perf_counter() - start) * 1e3)
        lm_part.append(timed.seconds * 1e3)
        timed.calls, timed.seconds = 0, 0.0
        start = time.perf_counter()
        constrained_beam_search(timed, index, ids, params.beam, params.max_ngram)
        beam_s, steps = time.perf_counter() - start, max(1, timed.calls)
        step.append(beam_s * 1e3 / steps)
        step_index.append((beam_s - timed.seconds) * 1e3 / steps)
    index_part = [t - m for t, m in zip(total, lm_part, strict=True)]
    for part, samples in (
        ("e2e_query", total),
        ("e2e_lm", lm_part),
        ("e2e_index", index_part),
        ("e2e_step", step),
        ("e2e_step_index", step_index),
    ):
        summary = percentiles(samples)
        rows.append(
            {
                **base,
                "part": part,
                "queries": len(samples),
                "p50_ms": round(summary["p50"], 2),
                "p99_ms": round(summary["p99"], 2),
            }
        )
    return rows


def segment_rows(n_tokens: int, steps: int, segments: int, seed: int = 0) -> list[dict[str, Any]]:
    """The same corpus added to a SegmentedIndex in `segments` batches, 1% of its passages removed: the
    add, remove and merge times, and decode steps before and after the merge."""
    rng = np.random.default_rng(seed)
    flat, lengths = zipf_corpus(n_tokens, VOCAB, seed)
    passages = np.split(flat, np.cumsum(lengths)[:-1])
    index = SegmentedIndex.empty(VOCAB)
    start = time.perf_counter()
    for batch in np.array_split(np.arange(len(passages)), segments):
        index.add([(int(i), passages[i]) for i in batch])
    add_s = time.perf_counter() - start
    removed = rng.choice(len(passages), size=len(passages) // 100, replace=False)
    start = time.perf_counter()
    index.remove(removed.tolist())
    remove_s = time.perf_counter() - start
    base = {"tokens": n_tokens, "passages": len(lengths), "segments": segments, "tombstones": len(removed)}
    rows = [
        {**base, "part": "segments_add_remove", "build_s": round(add_s, 2), "remove_s": round(remove_s, 2)}
    ]
    rows.extend(_decode_rows(index, flat, lengths, base, steps, rng, (1, 4, 8)))
    start = time.perf_counter()
    index.merge()
    merge_s = time.perf_counter() - start
    base = {**base, "segments": 1, "tombstones": 0}
    rows.append({**base, "part": "merge", "build_s": round(merge_s, 2)})
    rows.extend(_decode_rows(index, flat, lengths, base, steps, rng, (1, 4, 8)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000])
    parser.add_argument("--queries", type=int, default=500, help="n-grams timed per length")
    parser.add_argument("--scans", type=int, default=10, help="of which checked and timed by the scan")
    parser.add_argument("--seal-model", type=Path, help="an LM folder (`ragfleet train seal`): query rows")
    parser.add_argument("--beir", type=Path, help="the BEIR folder the query rows search (e.g. SciFact)")
    parser.add_argument("--e2e-queries", type=int, default=50, help="queries searched end to end")
    parser.add_argument("--segments", type=int, default=8, help="segments of the SegmentedIndex rows")
    parser.add_argument(
        "--segment-tokens", type=int, default=10_000_000, help="SegmentedIndex rows for sizes up to this"
    )
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, default=PARTS, help="the kinds of rows to measure (default: all)"
    )
    args = parser.parse_args()
    rows = []
    for n_tokens in args.tokens:
        if "index" in args.only:
            rows.extend(index_rows(n_tokens, args.queries, args.scans))
        if "segments" in args.only and n_tokens <= args.segment_tokens:
            rows.extend(segment_rows(n_tokens, args.queries, args.segments))
    if "e2e" in args.only and args.seal_model and args.beir:
        rows.extend(end_to_end_rows(args.seal_model, args.beir, args.e2e_queries))
    write_bench_results(NAME, rows)


if __name__ == "__main__":
    main()
