"""SEAL's constrained beam search and scoring (services/retriever/seal/search.py) against brute force,
on a tiny in-memory n-gram index with the FM-index's methods and a bigram LM defined here."""

from __future__ import annotations

import heapq
import itertools
import math
from collections import defaultdict

import numpy as np
import pytest

from services.retriever.seal.search import (
    Match,
    ScoredPassage,
    SealParams,
    constrained_beam_search,
    find_ngrams,
    ngram_weight,
    place,
    query_keys,
    score_passages,
    search,
)
from services.runtime.model_errors import ParamError


class BruteIndex:
    """SegmentedIndex's read methods by scanning the rows' token lists."""

    def __init__(self, rows: dict[int, list[int]]) -> None:
        self.rows = rows
        self.n_tokens = sum(map(len, rows.values()))

    def _starts(self, ngram):
        n = len(ngram)
        for rowid, toks in self.rows.items():
            for i in range(len(toks) - n + 1):
                if tuple(toks[i : i + n]) == tuple(ngram):
                    yield rowid, i

    def count(self, ngram) -> int:
        return sum(1 for _ in self._starts(ngram))

    def next_tokens(self, ngram):
        found: dict[int, int] = {}
        for rowid, i in self._starts(ngram):
            if i + len(ngram) < len(self.rows[rowid]):
                t = self.rows[rowid][i + len(ngram)]
                found[t] = found.get(t, 0) + 1
        tokens = np.array(sorted(found), dtype=np.int64)
        return tokens, np.array([found[t] for t in tokens.tolist()], dtype=np.int64)

    def locate(self, ngram, limit=None):
        return np.array(list(self._starts(ngram))[:limit], dtype=np.int64).reshape(-1, 2)

    def passages(self, rowids):
        texts = [self.rows[r] for r in np.asarray(rowids).tolist()]
        return np.array([t for text in texts for t in text], dtype=np.int64), np.array(list(map(len, texts)))


class BigramLM:
    """log P(next | last token) from a seeded table; the query is ignored unless `boost` names tokens
    it makes likely."""

    def __init__(self, vocab_size: int, seed: int = 0, boost: dict[int, float] | None = None) -> None:
        rng = np.random.default_rng(seed)
        logits = rng.normal(size=(vocab_size + 1, vocab_size))
        for token, value in (boost or {}).items():
            logits[:, token] += value
        self.table = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        self.vocab_size = vocab_size

    def next_logprobs(self, query, prefixes):
        return np.stack([self.table[p[-1] if p else self.vocab_size] for p in prefixes])

    def sequence_logprobs(self, query, ngrams):
        return np.array(
            [sum(self.table[([self.vocab_size, *n])[i], t] for i, t in enumerate(n)) for n in ngrams]
        )


def random_rows(seed: int, n_rows: int = 12, vocab: int = 8, length: int = 15) -> dict[int, list[int]]:
    rng = np.random.default_rng(seed)
    return {10 + r: rng.integers(0, vocab, size=int(rng.integers(1, length))).tolist() for r in range(n_rows)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_finds_every_corpus_ngram_with_its_logprob(seed):
    rows = random_rows(seed, n_rows=5, vocab=4, length=6)
    index, lm = BruteIndex(rows), BigramLM(4, seed)
    found = constrained_beam_search(lm, index, [1], beam=10_000, max_ngram=3)
    every = {tuple(t[i : i + n]) for t in rows.values() for n in (1, 2, 3) for i in range(len(t) - n + 1)}
    assert set(found) == every
    for ngram, logprob in found.items():
        assert logprob == pytest.approx(float(lm.sequence_logprobs([1], [ngram])[0]))


@pytest.mark.parametrize("seed", [3, 4])
def test_narrow_beam_keeps_the_best_corpus_continuations(seed):
    rows = random_rows(seed)
    index, lm = BruteIndex(rows), BigramLM(8, seed)
    beam, found = 3, constrained_beam_search(lm, index, [1], beam=3, max_ngram=4)
    assert all(index.count(n) > 0 for n in found)
    beams = [()]
    for step in range(1, 5):  # brute force: score every corpus extension of the kept beams
        options = [(*b, t) for b in beams for t in index.next_tokens(b)[0].tolist()]
        options.sort(key=lambda n: -float(lm.sequence_logprobs([1], [n])[0]))
        beams = options[:beam]
        assert set(beams) == {n for n in found if len(n) == step}


def test_ngram_weight_is_seals_formula():
    logprob, count, n, smoothing = math.log(0.2), 3, 1000, 5.0
    p = (count + smoothing) / (n + smoothing)
    expected = (math.log(0.2) + math.log(1 - p) - math.log(p) - math.log(0.8)) ** 2
    assert ngram_weight(logprob, count, n, smoothing, 2.0) == pytest.approx(expected)
    # An n-gram the LM finds less likely than the corpus does weighs nothing.
    assert ngram_weight(math.log(1e-6), 500, 1000, smoothing, 2.0) == 0.0
    assert math.isfinite(ngram_weight(0.0, 1, 1000, smoothing, 2.0))


def test_query_keys_are_whole_word_ngrams_up_to_three_words():
    tokens, words = [5, 6, 7, 8, 9], [0, 0, 1, 2, 3]
    keys = query_keys(tokens, words, max_words=3, max_ngram=10)
    assert (5, 6) in keys and (5, 6, 7, 8) in keys and (7, 8, 9) in keys
    assert (5,) not in keys and (6, 7) not in keys and (5, 6, 7, 8, 9) not in keys
    assert query_keys(tokens, words, max_words=3, max_ngram=2) == [(5, 6), (7,), (7, 8), (8,), (8, 9), (9,)]


def find_in(texts: list[list[int]], ngrams: list[tuple[int, ...]]) -> list[set[tuple[int, int]]]:
    """find_ngrams over `texts`: each text's set of (n-gram number, start)."""
    tokens = np.array([t for text in texts for t in text], dtype=np.int64)
    found = find_ngrams(tokens, np.array(list(map(len, texts))), ngrams)
    hits: list[set[tuple[int, int]]] = [set() for _ in texts]
    for passage, number, start in zip(*(column.tolist() for column in found), strict=True):
        hits[passage].add((number, start))
    assert len(found.passage) == sum(map(len, hits))  # no occurrence twice
    return hits


@pytest.mark.parametrize("seed", [5, 6])
def test_find_ngrams_matches_a_scan(seed):
    rows = random_rows(seed, vocab=3)
    texts = [*rows.values(), []]
    ngrams = sorted({tuple(t[i : i + n]) for t in texts for n in (1, 2, 4) for i in range(len(t) - n + 1)})
    ngrams.append((0, 0, 0, 0, 0, 0, 0))
    for text, hits in zip(texts, find_in(texts, ngrams), strict=True):
        expected = {
            (k, i)
            for k, ng in enumerate(ngrams)
            for i in range(len(text))
            if tuple(text[i : i + len(ng)]) == ng
        }
        assert hits == expected
    assert find_in([[], [1]], []) == [set(), set()]


def place_one(text: list[int], ngrams: list[tuple[int, ...]], weights: list[float], beta: float):
    """place for one passage: (score, its Placements as (start, end, weight) rows)."""
    found = find_ngrams(np.array(text, dtype=np.int64), np.array([len(text)]), ngrams)
    scores, placed = place(
        np.array([len(text)]), found, np.array(list(map(len, ngrams))), np.array(weights), beta
    )
    return float(scores[0]), list(zip(placed.start.tolist(), placed.end.tolist(), placed.weight.tolist()))


def test_place_covers_greedily_with_the_coverage_factor():
    ngrams = [(1, 2, 3), (2, 3, 4, 5), (9,)]
    # text: 1 2 3 4 5 ; (2,3,4,5) overlaps the placed (1,2,3) on two tokens: 2 new of 4.
    score, matches = place_one([1, 2, 3, 4, 5], ngrams, [4.0, 2.0, 1.0], beta=0.8)
    assert score == pytest.approx(4.0 + 2.0 * (0.2 + 0.8 * 2 / 4))
    assert matches == [(0, 3, 4.0), (1, 5, pytest.approx(2.0 * 0.6))]
    # An n-gram twice: placed once, where it is new; one adding nothing is dropped.
    score, matches = place_one([7, 8, 7, 1, 7, 8], [(7, 8, 7), (7, 8), (7,)], [3.0, 2.0, 1.0], 0.8)
    assert [(start, end) for start, end, _ in matches] == [(0, 3), (4, 6)] and score == pytest.approx(
        3.0 + 2.0
    )


def reference_score_passages(index, ngrams, k, params, allowed=None):
    """score_passages as a loop over passages and n-grams (the implementation before it was vectorised)."""
    keys, weights, counts = [], [], []
    for ngram, logprob in ngrams.items():
        count = index.count(ngram)
        weight = ngram_weight(logprob, count, index.n_tokens, params.smoothing, params.alpha)
        if 0 < count <= params.max_occurrences and weight > 0:
            keys.append(ngram)
            weights.append(weight)
            counts.append(count)
    proposed: dict[int, float] = defaultdict(float)
    for ngram, weight, count in zip(keys, weights, counts, strict=True):
        if count <= params.max_hits:
            for rowid in {r for r, _ in index.locate(ngram).tolist()}:
                if allowed is None or rowid in allowed:
                    proposed[rowid] += weight
    candidates = heapq.nlargest(params.fully_score, proposed, key=lambda r: (proposed[r], -r))
    scored = []
    for rowid in candidates:
        text = index.rows[rowid]
        covered, score, matches = [0] * len(text), 0.0, []
        for number in sorted(range(len(keys)), key=lambda n: (-weights[n], n)):
            size = len(keys[number])
            places = [s for s in range(len(text) - size + 1) if tuple(text[s : s + size]) == keys[number]]
            if not places:
                continue
            new, start = max((size - sum(covered[s : s + size]), -s) for s in places)
            if new == 0:
                continue
            weight = weights[number] * (1 - params.beta + params.beta * new / size)
            covered[-start : -start + size] = [1] * size
            score += weight
            matches.append(Match(-start, -start + size, weight))
        scored.append(ScoredPassage(rowid, score, tuple(sorted(matches, key=lambda m: m.start))))
    return heapq.nlargest(k, scored, key=lambda s: (s.score, -s.rowid))


@pytest.mark.parametrize("seed", range(8))
def test_score_passages_equals_the_loop_exactly(seed):
    """Same passages, scores and matches to the last bit, ties (equal weights, an n-gram at one start as
    another) included."""
    rng = np.random.default_rng(seed)
    rows = random_rows(seed, n_rows=30, vocab=4, length=25)
    index = BruteIndex(rows)
    corpus = [tuple(t[i : i + n]) for t in rows.values() for n in (1, 2, 3, 5) for i in range(len(t) - n + 1)]
    chosen = sorted(set(corpus[i] for i in rng.integers(0, len(corpus), 25)))
    logprobs = rng.choice([math.log(0.3), math.log(0.05)], size=len(chosen))  # ties on purpose
    ngrams = dict(zip(chosen, logprobs.tolist(), strict=True))
    for params, allowed in (
        (SealParams(), None),
        (SealParams(max_hits=8, fully_score=7), None),
        (SealParams(beta=0.3), set(rows) - {10, 11, 12}),
    ):
        assert score_passages(index, ngrams, 12, params, allowed) == reference_score_passages(
            index, ngrams, 12, params, allowed
        )


@pytest.mark.parametrize("seed", range(4))
def test_uncovered_positions_add_the_lms_likeliest_unigrams(seed):
    """With the LM's first-token log-probabilities, each passage gains, past its placed n-grams (the same
    as without them), the weight of every distinct likely token at an uncovered position, times
    1 - beta when a placed n-gram holds that token; a one-token n-gram is no unigram."""
    rng = np.random.default_rng(seed)
    rows = random_rows(seed, n_rows=30, vocab=12, length=25)
    index = BruteIndex(rows)
    corpus = [tuple(t[i : i + n]) for t in rows.values() for n in (2, 3) for i in range(len(t) - n + 1)]
    ngrams = {corpus[i]: math.log(0.2) for i in rng.integers(0, len(corpus), 6)} | {(0,): math.log(0.5)}
    logits = rng.normal(size=14) * 2
    first = logits - np.log(np.exp(logits).sum())
    params = SealParams(unigrams=5)
    plain = {h.rowid: h for h in score_passages(index, ngrams, 30, params)}
    mixed = score_passages(index, ngrams, 30, params, first=first)
    present = sorted({t for text in rows.values() for t in text} - {0})
    top = sorted(present, key=lambda t: -first[t])[: params.unigrams]
    weight = {
        t: ngram_weight(first[t], index.count((t,)), index.n_tokens, params.smoothing, 1.0) for t in top
    }
    gained = []
    assert {h.rowid for h in mixed} == set(plain)
    for hit in mixed:
        text, alone = rows[hit.rowid], plain[hit.rowid]
        assert hit.matches == alone.matches
        covered = {i for m in hit.matches for i in range(m.start, m.end)}
        held = {text[i] for i in covered}
        free = {text[i] for i in range(len(text)) if i not in covered}
        extra = sum(weight[t] * (1 - params.beta if t in held else 1.0) for t in free & set(weight))
        assert hit.score == pytest.approx(alone.score + extra)
        gained.append(extra)
    assert max(gained) > 0
    assert score_passages(index, ngrams, 30, SealParams(unigrams=0), first=first) == list(
        sorted(plain.values(), key=lambda h: (-h.score, h.rowid))
    )


def test_intersective_scoring_ranks_the_passage_with_the_rare_ngram_first():
    rows = {1: [1, 2, 3, 4, 5], 2: [1, 2, 9, 9, 9], 3: [7, 7, 7, 7], 4: [1, 2, 3, 0, 0]}
    index = BruteIndex(rows)
    ngrams = {(3, 4, 5): math.log(0.5), (1, 2): math.log(0.6), (7,): math.log(1e-9)}
    hits = score_passages(index, ngrams, k=10, params=SealParams())
    # Ties go by rowid; (7,) weighs nothing, so passage 3 is never proposed.
    assert [h.rowid for h in hits] == [1, 2, 4]
    assert hits[0].matches[0] == Match(0, 2, pytest.approx(hits[0].matches[0].weight))
    assert score_passages(index, ngrams, k=10, params=SealParams(), allowed={2, 3})[0].rowid == 2
    # An n-gram past max_hits proposes nothing, but still scores a proposed passage.
    params = SealParams(max_hits=1)
    only_rare = score_passages(index, ngrams, k=10, params=params)
    assert [h.rowid for h in only_rare] == [1]
    assert only_rare[0].score == pytest.approx(hits[0].score)


def test_search_uses_generated_and_query_ngrams():
    rows = {1: [1, 2, 3, 4], 2: [5, 6, 7, 0], 3: [0, 1, 0, 1]}
    index = BruteIndex(rows)
    lm = BigramLM(8, 0, boost={6: 8.0, 7: 8.0})  # the LM wants 6 and 7
    hits = search(lm, index, [3, 4], [0, 1], k=2, params=SealParams(beam=2, max_ngram=3))
    assert hits[0].rowid == 2
    with pytest.raises(ParamError) as err:
        search(lm, index, [], [], k=2, params=SealParams())
    assert err.value.field == "query"


def test_params_check_names_the_field():
    SealParams().check(max_beam=64, max_ngram=16)
    for params, field in ((SealParams(beam=65), "beam"), (SealParams(max_ngram=0), "ngram_length")):
        with pytest.raises(ParamError) as err:
            params.check(max_beam=64, max_ngram=16)
        assert err.value.field == field


def test_all_ngram_weights_positive_for_likely_rare_ngrams():
    for count, logprob in itertools.product([1, 10], [math.log(0.1), math.log(0.9)]):
        assert ngram_weight(logprob, count, 10_000, 5.0, 2.0) > 0
