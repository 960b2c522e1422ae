"""SEAL's retrieval over an n-gram index: constrained beam search, n-gram weights, intersective scoring.

Bevilacqua et al. (2022), "Autoregressive Search Engines: Generating Substrings as Document Identifiers".
A language model conditioned on the query generates n-grams of the corpus; the passages that hold the
best of them are the hits.

- `constrained_beam_search`: beam search (beam 15, up to 10 tokens) where a step may only emit a token
  that continues an n-gram present in the corpus (`NgramIndex.next_tokens`). Every n-gram a beam held at
  some step is kept with its log-probability log P(n|q), as SEAL keeps the beams' history.
- `query_keys`: the query's own n-grams (up to 3 words) are keys too, scored by the LM (`sequence_logprobs`).
- `ngram_weight`: w(n) = max(0, log P(n|q) + log(1 - P(n)) - log P(n) - log(1 - P(n|q)))^alpha with the
  unconditional P(n) = (F(n) + smoothing) / (N + smoothing) from the corpus counts.
- `score_passages`, intersective scoring: n-grams with at most `max_hits` occurrences propose passages
  (the sum of their weights ranks them); the best `fully_score` are scored in full: the n-grams found in
  each passage are placed greedily by weight, each n-gram once, where it adds the most uncovered tokens,
  with a coverage factor 1 - beta + beta * (new tokens / n-gram length). An n-gram that adds nothing is
  dropped; a passage's placed n-grams are its matches (token spans, for highlights).

Model code: no gRPC; bad arguments are `ParamError`s naming the field.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.runtime.model_errors import ParamError

Ngram = tuple[int, ...]
# Multiplier of the polynomial hash that finds n-grams in passages (64-bit, wrapping).
_HASH_BASE = np.uint64(1_000_003)


class NgramIndex(Protocol):
    """What the search reads of an index of token ids (services.retriever.seal.segments.SegmentedIndex)."""

    n_tokens: int

    def count(self, ngram: Sequence[int]) -> int: ...

    def next_tokens(self, ngram: Sequence[int]) -> tuple[np.ndarray, np.ndarray]: ...

    def locate(self, ngram: Sequence[int], limit: int | None = None) -> list[tuple[int, int]]: ...

    def tokens(self, rowid: int) -> np.ndarray: ...


class ConditionalLM(Protocol):
    """A language model of n-grams given a query (services.retriever.seal.lm.SealLM)."""

    vocab_size: int

    def next_logprobs(self, query: Sequence[int], prefixes: Sequence[Sequence[int]]) -> np.ndarray:
        """(len(prefixes), vocab_size) log-probabilities of the token after each prefix."""
        ...

    def sequence_logprobs(self, query: Sequence[int], ngrams: Sequence[Sequence[int]]) -> np.ndarray:
        """(len(ngrams),) log-probability of each n-gram as a whole."""
        ...


@dataclass(frozen=True)
class SealParams:
    """Search settings; the defaults are SEAL's."""

    beam: int = 15
    max_ngram: int = 10
    max_hits: int = 1500  # n-grams with more occurrences only count when a passage is fully scored
    fully_score: int = 1500  # passages scored in full
    max_occurrences: int = 10_000_000  # n-grams more frequent than this are dropped
    smoothing: float = 5.0
    alpha: float = 2.0
    beta: float = 0.8
    query_ngram_words: int = 3

    def check(self, max_beam: int, max_ngram: int) -> None:
        """ParamError naming `beam` or `ngram_length` when out of 1..the limit."""
        for field, value, limit in (
            ("beam", self.beam, max_beam),
            ("ngram_length", self.max_ngram, max_ngram),
        ):
            if not 1 <= value <= limit:
                raise ParamError(field, f"must be between 1 and {limit}, got {value}")


@dataclass(frozen=True)
class Match:
    """An n-gram placed in a passage: token positions [start, end) of its indexed tokens."""

    start: int
    end: int
    weight: float


@dataclass(frozen=True)
class ScoredPassage:
    rowid: int
    score: float
    matches: tuple[Match, ...]


def constrained_beam_search(
    lm: ConditionalLM, index: NgramIndex, query: Sequence[int], beam: int, max_ngram: int
) -> dict[Ngram, float]:
    """Every n-gram the beams held at some step, with its log-probability under the LM."""
    beams: list[tuple[Ngram, float]] = [((), 0.0)]
    found: dict[Ngram, float] = {}
    for _ in range(max_ngram):
        logprobs = lm.next_logprobs(query, [prefix for prefix, _ in beams])
        candidates: list[tuple[float, Ngram]] = []
        for (prefix, score), row in zip(beams, logprobs, strict=True):
            tokens, _ = index.next_tokens(prefix)
            if len(tokens) == 0:
                continue
            scores = row[tokens]
            best = np.argpartition(-scores, beam)[:beam] if len(tokens) > beam else range(len(tokens))
            candidates += [(score + float(scores[i]), (*prefix, int(tokens[i]))) for i in best]
        if not candidates:
            break
        beams = [(ngram, score) for score, ngram in heapq.nlargest(beam, candidates)]
        for ngram, score in beams:
            found[ngram] = max(score, found.get(ngram, -math.inf))
    return found


def query_keys(tokens: Sequence[int], word_ids: Sequence[int], max_words: int, max_ngram: int) -> list[Ngram]:
    """The query's n-grams of 1 to `max_words` whole words (at most `max_ngram` tokens), in order;
    `word_ids[i]` is the word of token i."""
    starts = [i for i in range(len(tokens)) if i == 0 or word_ids[i] != word_ids[i - 1]]
    bounds = [*starts, len(tokens)]
    keys: dict[Ngram, None] = {}
    for w in range(len(starts)):
        for n in range(1, max_words + 1):
            if w + n >= len(bounds):
                break
            ngram = tuple(tokens[bounds[w] : bounds[w + n]])
            if len(ngram) <= max_ngram:
                keys[ngram] = None
    return list(keys)


def ngram_weight(logprob: float, count: int, n_tokens: int, smoothing: float, alpha: float) -> float:
    """SEAL's weight of an n-gram from its conditional log-probability and its corpus count."""
    unconditional = (count + smoothing) / (n_tokens + smoothing)
    logprob = min(logprob, -1e-6)  # P(n|q) = 1 would make log(1 - P(n|q)) infinite
    weight = logprob + math.log1p(-unconditional) - math.log(unconditional) - math.log(-math.expm1(logprob))
    return max(0.0, weight) ** alpha


def _hashes(tokens: np.ndarray, length: int, previous: np.ndarray | None) -> np.ndarray:
    """Polynomial hashes of the windows of `length` tokens, from those of `length - 1`."""
    values = tokens.astype(np.uint64)
    if previous is None:
        return values
    return previous[:-1] * _HASH_BASE + values[length - 1 :]


def _ngram_hash(ngram: Ngram) -> int:
    """The hash `_hashes` gives a window holding `ngram` (uint64 arithmetic, in Python ints)."""
    h = 0
    for token in ngram:
        h = (h * int(_HASH_BASE) + token) % 2**64
    return h


def find_ngrams(texts: Sequence[np.ndarray], ngrams: Sequence[Ngram]) -> list[list[tuple[int, int]]]:
    """[(n-gram number, start)] of every occurrence of `ngrams` in each of `texts` (token id arrays).

    The texts are laid end to end with a separator and every window hashed per length at once (64-bit
    polynomial hashes; a collision would need ~2^32 windows)."""
    texts = [np.asarray(t, dtype=np.int64) for t in texts]
    starts = np.cumsum([0] + [len(t) + 1 for t in texts])
    stream = np.concatenate([np.append(t, -1) for t in texts]) if texts else np.zeros(0, np.int64)
    by_length: dict[int, dict[int, int]] = defaultdict(dict)
    for number, ngram in enumerate(ngrams):
        by_length[len(ngram)][_ngram_hash(ngram)] = number
    found: list[list[tuple[int, int]]] = [[] for _ in texts]
    hashes = None
    for length in range(1, max(by_length, default=0) + 1):
        if length > len(stream):
            break
        hashes = _hashes(stream, length, hashes)
        if length not in by_length:
            continue
        table = by_length[length]
        keys = np.fromiter(table, dtype=np.uint64, count=len(table))
        positions = np.flatnonzero(np.isin(hashes, keys))
        docs = np.searchsorted(starts, positions, side="right") - 1
        for pos, doc in zip(positions.tolist(), docs.tolist()):
            found[doc].append((table[int(hashes[pos])], pos - int(starts[doc])))
    return found


def place(
    length: int,
    occurrences: Iterable[tuple[int, int]],
    ngrams: Sequence[Ngram],
    weights: Sequence[float],
    beta: float,
) -> tuple[float, tuple[Match, ...]]:
    """A passage's full score and matches: its n-grams placed greedily by weight, each once, where it
    adds the most uncovered tokens (the first such place), scaled by its coverage factor."""
    places: dict[int, list[int]] = defaultdict(list)
    for number, start in occurrences:
        places[number].append(start)
    covered = bytearray(length)
    score, matches = 0.0, []
    for number in sorted(places, key=lambda n: (-weights[n], n)):
        size = len(ngrams[number])
        new, start = max((size - covered[s : s + size].count(1), -s) for s in places[number])
        if new == 0:
            continue
        start = -start
        weight = weights[number] * (1 - beta + beta * new / size)
        covered[start : start + size] = b"\x01" * size
        score += weight
        matches.append(Match(start, start + size, weight))
    return score, tuple(sorted(matches, key=lambda m: m.start))


def score_passages(
    index: NgramIndex,
    ngrams: dict[Ngram, float],
    k: int,
    params: SealParams,
    allowed: set[int] | None = None,
) -> list[ScoredPassage]:
    """The top `k` passages for n-grams with their log P(n|q), by SEAL's intersective scoring."""
    keys: list[Ngram] = []
    weights: list[float] = []
    counts: list[int] = []
    for ngram, logprob in ngrams.items():
        count = index.count(ngram)
        if count == 0 or count > params.max_occurrences:
            continue
        weight = ngram_weight(logprob, count, index.n_tokens, params.smoothing, params.alpha)
        if weight > 0:
            keys.append(ngram)
            weights.append(weight)
            counts.append(count)
    proposed: dict[int, float] = defaultdict(float)
    for ngram, weight, count in zip(keys, weights, counts, strict=True):
        if count <= params.max_hits:
            for rowid in {r for r, _ in index.locate(ngram)}:
                if allowed is None or rowid in allowed:
                    proposed[rowid] += weight
    candidates = heapq.nlargest(params.fully_score, proposed, key=lambda r: (proposed[r], -r))
    texts = [index.tokens(rowid) for rowid in candidates]
    scored = []
    for rowid, text, found in zip(candidates, texts, find_ngrams(texts, keys), strict=True):
        score, matches = place(len(text), found, keys, weights, params.beta)
        scored.append(ScoredPassage(rowid, score, matches))
    return heapq.nlargest(k, scored, key=lambda s: (s.score, -s.rowid))


def search(
    lm: ConditionalLM,
    index: NgramIndex,
    query: Sequence[int],
    word_ids: Sequence[int],
    k: int,
    params: SealParams,
    allowed: set[int] | None = None,
) -> list[ScoredPassage]:
    """SEAL's search for one tokenised query: the generated n-grams and the query's own as keys."""
    if not query:
        raise ParamError("query", "has no tokens the model knows")
    ngrams = constrained_beam_search(lm, index, query, params.beam, params.max_ngram)
    own = [
        key
        for key in query_keys(query, word_ids, params.query_ngram_words, params.max_ngram)
        if key not in ngrams and index.count(key) > 0
    ]
    if own:
        ngrams.update(zip(own, lm.sequence_logprobs(query, own).tolist(), strict=True))
    return score_passages(index, ngrams, k, params, allowed)
