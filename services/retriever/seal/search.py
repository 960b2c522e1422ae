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
  dropped; a passage's placed n-grams are its matches (token spans, for highlights). Then, with
  `unigrams` set, as SEAL's reference code does, every distinct token at the positions no n-gram
  covers adds its unigram weight (`unigram_weights`: the `unigrams` tokens of the corpus the LM finds
  likeliest as an n-gram's first, weighed as an n-gram is but without the alpha power), with the
  coverage factor of a one-token n-gram: 1 when no placed n-gram holds that token, 1 - beta when one
  does, so that the words the LM would generate count wherever a passage has them. The candidates are
  scored together, in numpy (`find_ngrams`, `place`, `uncovered_unigrams`): the index work of a query
  is mostly this step.

Model code: no gRPC; bad arguments are `ParamError`s naming the field.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from services.retriever.seal.fmindex import concat_ranges
from services.runtime.model_errors import ParamError

Ngram = tuple[int, ...]
# Multiplier of the polynomial hash that finds n-grams in passages (64-bit, wrapping).
_HASH_BASE = np.uint64(1_000_003)


class NgramIndex(Protocol):
    """What the search reads of an index of token ids (services.retriever.seal.segments.SegmentedIndex)."""

    n_tokens: int

    def count(self, ngram: Sequence[int]) -> int: ...

    def next_tokens(self, ngram: Sequence[int]) -> tuple[np.ndarray, np.ndarray]: ...

    def locate(self, ngram: Sequence[int], limit: int | None = None) -> np.ndarray: ...

    def passages(self, rowids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


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
    # The LM's likeliest first tokens weighed at uncovered positions (SEAL's reference code offers 1000).
    # Off by default: with the default LM (1,000 steps on SciFact train) 1000 gave SciFact test nDCG@10
    # 0.1319 against 0.1362 without.
    unigrams: int = 0

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


def ngram_weight(logprob: Any, count: Any, n_tokens: int, smoothing: float, alpha: float) -> Any:
    """SEAL's weight of an n-gram from its conditional log-probability and its corpus count (floats, or
    numpy arrays of them n-gram by n-gram)."""
    unconditional = (count + smoothing) / (n_tokens + smoothing)
    logprob = np.minimum(logprob, -1e-6)  # P(n|q) = 1 would make log(1 - P(n|q)) infinite
    weight = logprob + np.log1p(-unconditional) - np.log(unconditional) - np.log(-np.expm1(logprob))
    return np.maximum(0.0, weight) ** alpha


def unigram_weights(
    first: np.ndarray, index: NgramIndex, ngrams: dict[Ngram, float], params: SealParams
) -> dict[int, float]:
    """The positive weights of the `params.unigrams` tokens of the corpus likeliest under `first` (the LM's
    log-probabilities of an n-gram's first token): `ngram_weight` with alpha 1; none for a token that
    is a one-token n-gram of `ngrams` (it is scored as one)."""
    if params.unigrams <= 0:
        return {}
    tokens, counts = index.next_tokens(())
    keep = ~np.isin(tokens, [g[0] for g in ngrams if len(g) == 1])
    tokens, counts = tokens[keep], counts[keep]
    if not len(tokens):
        return {}
    logprob = np.asarray(first, np.float64)[tokens]
    top = np.argpartition(-logprob, min(params.unigrams, len(tokens)) - 1)[: params.unigrams]
    tokens = tokens[top]
    weight = ngram_weight(logprob[top], counts[top], index.n_tokens, params.smoothing, 1.0)
    positive = weight > 0
    return dict(zip(tokens[positive].tolist(), weight[positive].tolist(), strict=True))


class Occurrences(NamedTuple):
    """Where n-grams occur in passages given back to back: parallel int64 arrays."""

    passage: np.ndarray  # the passage's position among them
    ngram: np.ndarray  # the n-gram's number
    start: np.ndarray  # the offset of its first token in the passage


class Placements(NamedTuple):
    """The n-grams `place` kept, by passage, then start: parallel arrays."""

    passage: np.ndarray
    start: np.ndarray
    end: np.ndarray
    weight: np.ndarray  # float64


def _ngram_hash(ngram: Ngram) -> int:
    """The hash `find_ngrams` gives a window holding `ngram` (uint64 arithmetic, in Python ints)."""
    h = 0
    for token in ngram:
        h = (h * int(_HASH_BASE) + token) % 2**64
    return h


def find_ngrams(tokens: np.ndarray, lengths: np.ndarray, ngrams: Sequence[Ngram]) -> Occurrences:
    """Every occurrence of the distinct, non-empty `ngrams` in the passages whose token ids are back to back
    in `tokens`, passage i holding lengths[i]; ordered by n-gram length, then position.

    Windows are narrowed token by token to those whose j-th token is the j-th of some n-gram of their
    length; the rest are hashed (64-bit polynomial hashes, compared against the n-grams'; a collision
    would need ~2^32 windows)."""
    tokens, lengths = np.asarray(tokens, np.int64), np.asarray(lengths, np.int64)
    by_length: dict[int, list[int]] = defaultdict(list)
    for number, ngram in enumerate(ngrams):
        by_length[len(ngram)].append(number)
    if not len(tokens) or not ngrams:
        return Occurrences(*[np.zeros(0, np.int64)] * 3)
    ends = np.cumsum(lengths)
    passage_of = np.repeat(np.arange(len(lengths)), lengths)
    vocab = max(int(tokens.max()), max(max(g) for g in ngrams)) + 1
    allowed = np.zeros(vocab, bool)
    allowed[[g[0] for g in ngrams]] = True
    at = np.flatnonzero(allowed[tokens])  # where any n-gram may begin
    first, room = tokens[at], ends[passage_of[at]] - at  # its token, and the tokens left in its passage
    numbers, positions = [], []
    for length, group in sorted(by_length.items()):
        here = None
        for j in range(length):
            allowed[:] = False
            allowed[[ngrams[i][j] for i in group]] = True
            here = at[allowed[first] & (room >= length)] if j == 0 else here[allowed[tokens[here + j]]]
        hashes = np.zeros(len(here), np.uint64)
        for j in range(length):
            hashes = hashes * _HASH_BASE + tokens[here + j].astype(np.uint64)
        table = np.array([_ngram_hash(ngrams[i]) for i in group], np.uint64)
        order = np.argsort(table)
        table, group_numbers = table[order], np.array(group, np.int64)[order]
        slot = np.minimum(np.searchsorted(table, hashes), len(table) - 1)
        hit = table[slot] == hashes
        numbers.append(group_numbers[slot[hit]])
        positions.append(here[hit])
    positions = np.concatenate(positions)
    passage = passage_of[positions]
    return Occurrences(passage, np.concatenate(numbers), positions - (ends - lengths)[passage])


def place(
    lengths: np.ndarray, found: Occurrences, sizes: np.ndarray, weights: np.ndarray, beta: float
) -> tuple[np.ndarray, Placements]:
    """Each passage's full score, and its matches: the n-grams `found` in it (`sizes` and `weights` by
    n-gram number) placed greedily by weight, each once, where it adds the most uncovered tokens (the
    first such place), scaled by its coverage factor; an n-gram that adds nothing is dropped. Each
    n-gram's occurrences in `found` come in passage, then start order (as find_ngrams gives them).

    All passages are placed at once, one n-gram at a time: a passage's placements never touch
    another's tokens."""
    sizes, weights = np.asarray(sizes, np.int64), np.asarray(weights, np.float64)
    rank = np.empty(len(weights), np.int64)
    rank[np.lexsort((np.arange(len(weights)), -weights))] = np.arange(len(weights))
    order = np.argsort(rank[found.ngram], kind="stable")  # keeps each n-gram's passage, start order
    ngram, passage, start = found.ngram[order], found.passage[order], found.start[order]
    at = (np.cumsum(lengths) - lengths)[passage] + start  # offset in all passages back to back
    covered = np.zeros(int(np.sum(lengths)), bool)
    scores = np.zeros(len(lengths))
    placed: list[tuple[np.ndarray, ...]] = []  # (passage, start, end, weight, step) of each step
    firsts = np.flatnonzero(np.diff(ngram, prepend=-1)).tolist()  # where each n-gram's occurrences begin
    for lo, hi in itertools.pairwise([*firsts, len(ngram)]):
        number = int(ngram[lo])
        size = int(sizes[number])
        inside = np.arange(size)  # a window's offsets
        new = size - covered[at[lo:hi, None] + inside].sum(axis=1)
        owner = passage[lo:hi]
        opens = np.diff(owner, prepend=-1) != 0  # the passage's first occurrence
        most = np.maximum.reduceat(new, np.flatnonzero(opens))
        best = np.flatnonzero(new == most[np.cumsum(opens) - 1])
        best = best[np.diff(owner[best], prepend=-1) != 0]  # the first best place in each passage
        best = best[new[best] > 0]
        if not len(best):
            continue
        weight = weights[number] * (1 - beta + beta * new[best] / size)
        covered[(at[lo:hi][best, None] + inside).ravel()] = True
        scores[owner[best]] += weight
        begin = start[lo:hi][best]
        placed.append((owner[best], begin, begin + size, weight, np.full(len(best), lo)))
    if not placed:
        return scores, Placements(*[np.zeros(0, np.int64)] * 3, np.zeros(0))
    owner, begin, end, weight, step = (np.concatenate(column) for column in zip(*placed, strict=True))
    order = np.lexsort((step, begin, owner))
    return scores, Placements(owner[order], begin[order], end[order], weight[order])


def uncovered_unigrams(
    tokens: np.ndarray, lengths: np.ndarray, placed: Placements, weights: dict[int, float], beta: float
) -> np.ndarray:
    """Each passage's unigram score: every distinct token of its positions outside the `placed` n-grams
    adds weights[token], times 1 - beta when a placed n-gram of the passage holds that token."""
    scores = np.zeros(len(lengths))
    if not weights or not len(tokens):
        return scores
    tokens = np.asarray(tokens, np.int64)
    passage_of = np.repeat(np.arange(len(lengths)), lengths)
    covered = np.zeros(len(tokens), bool)
    first = (np.cumsum(lengths) - lengths)[placed.passage] + placed.start
    covered[concat_ranges(first, placed.end - placed.start)] = True
    vocab = int(max(tokens.max(), max(weights))) + 1
    weight_of = np.zeros(vocab)
    weight_of[list(weights)] = list(weights.values())
    pair = passage_of * vocab + tokens  # (passage, token) as one number
    free = np.unique(pair[~covered & (weight_of[tokens] > 0)])
    held = np.isin(free, pair[covered])
    scores += np.bincount(
        free // vocab, weights=weight_of[free % vocab] * np.where(held, 1 - beta, 1.0), minlength=len(lengths)
    )
    return scores


def score_passages(
    index: NgramIndex,
    ngrams: dict[Ngram, float],
    k: int,
    params: SealParams,
    allowed: set[int] | None = None,
    first: np.ndarray | None = None,
) -> list[ScoredPassage]:
    """The top `k` passages for n-grams with their log P(n|q), by SEAL's intersective scoring; `first`
    (the LM's log-probabilities of an n-gram's first token) gives the unigram scores of uncovered
    positions (`unigram_weights`), none when it is None."""
    counted = [(g, logprob, index.count(g)) for g, logprob in ngrams.items()]
    counted = [(g, logprob, count) for g, logprob, count in counted if 0 < count <= params.max_occurrences]
    logprobs = np.array([logprob for _, logprob, _ in counted], np.float64)
    all_counts = np.array([count for _, _, count in counted], np.int64)
    all_weights = ngram_weight(logprobs, all_counts, index.n_tokens, params.smoothing, params.alpha)
    positive = np.flatnonzero(all_weights > 0).tolist()
    keys = [counted[i][0] for i in positive]
    weight_of, counts = all_weights[positive], all_counts[positive].tolist()
    rare = [i for i, count in enumerate(counts) if count <= params.max_hits]
    holders = [np.unique(index.locate(keys[i])[:, 0]) for i in rare]
    rowids = np.concatenate(holders) if holders else np.zeros(0, np.int64)
    votes = np.repeat(weight_of[rare], [len(h) for h in holders])
    if allowed is not None:
        keep = np.isin(rowids, np.fromiter(allowed, np.int64, len(allowed)))
        rowids, votes = rowids[keep], votes[keep]
    # bincount adds each rowid's votes in key order, so the sums equal a loop's
    proposed, slot = np.unique(rowids, return_inverse=True)
    totals = np.bincount(slot, weights=votes, minlength=len(proposed))
    candidates = proposed[np.lexsort((proposed, -totals))[: params.fully_score]]
    tokens, lengths = index.passages(candidates)
    found = find_ngrams(tokens, lengths, keys)
    scores, placed = place(lengths, found, np.array([len(g) for g in keys]), weight_of, params.beta)
    if first is not None:
        unigrams = unigram_weights(first, index, ngrams, params)
        scores += uncovered_unigrams(tokens, lengths, placed, unigrams, params.beta)
    hits = []
    for i in np.lexsort((candidates, -scores))[:k].tolist():
        lo, hi = np.searchsorted(placed.passage, [i, i + 1]).tolist()
        matches = map(
            Match, placed.start[lo:hi].tolist(), placed.end[lo:hi].tolist(), placed.weight[lo:hi].tolist()
        )
        hits.append(ScoredPassage(int(candidates[i]), float(scores[i]), tuple(matches)))
    return hits


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
    first = lm.next_logprobs(query, [()])[0] if params.unigrams > 0 else None
    return score_passages(index, ngrams, k, params, allowed, first)
