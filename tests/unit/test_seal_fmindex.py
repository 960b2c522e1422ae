"""The SEAL FM-index and its segments against a brute-force scan of the token stream.

Random corpora over a vocabulary of 1-4 tokens, so that n-grams repeat; n-grams are random (often absent),
taken from the corpus, or empty. Every answer of `FMIndex` and of `SegmentedIndex` after random
add / remove / merge / save / open sequences must equal the scan's, and saving must never change the
folder an index was opened from.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.retriever.seal import fmindex
from services.retriever.seal.fmindex import FMIndex
from services.retriever.seal.segments import SegmentedIndex
from services.runtime.model_errors import ArtifactError, ParamError

Corpus = dict[int, list[int]]  # rowid (or passage number) -> token ids


def occurrences(corpus: Corpus, ngram: list[int]) -> list[tuple[int, int]]:
    """Every (key, offset) where `ngram` starts; the empty n-gram starts before every token."""
    m = len(ngram)
    return sorted(
        (key, offset)
        for key, tokens in corpus.items()
        for offset in range(len(tokens) - max(m, 1) + 1)
        if tokens[offset : offset + m] == ngram
    )


def following(corpus: Corpus, ngram: list[int]) -> dict[int, int]:
    """The scan's next_tokens: token -> count of ngram + [token]."""
    m = len(ngram)
    return dict(
        Counter(
            corpus[key][offset + m]
            for key, offset in occurrences(corpus, ngram)
            if offset + m < len(corpus[key])
        )
    )


def check(index: FMIndex | SegmentedIndex, corpus: Corpus, ngrams: list[list[int]]) -> None:
    for ngram in ngrams:
        expected = occurrences(corpus, ngram)
        assert index.count(ngram) == len(expected), ngram
        tokens, counts = index.next_tokens(ngram)
        assert tokens.dtype == counts.dtype == np.int64
        assert list(tokens) == sorted(tokens)
        assert dict(zip(tokens.tolist(), counts.tolist())) == following(corpus, ngram), ngram
        found = index.locate(ngram)
        found = sorted(map(tuple, found.tolist() if isinstance(found, np.ndarray) else found))
        assert found == expected, ngram
        for limit in (0, 1, 2):
            some = index.locate(ngram, limit=limit)
            some = list(map(tuple, some.tolist() if isinstance(some, np.ndarray) else some))
            assert len(some) == min(limit, len(expected)) and set(some) <= set(expected), (ngram, limit)


def queries(corpus: Corpus, vocab: int, draw: st.DrawFn) -> list[list[int]]:
    """The empty n-gram, random ones (mostly absent when long) and substrings of the corpus."""
    ngrams = [[]] + draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4), max_size=6))
    texts = [t for t in corpus.values() if t]
    for _ in range(draw(st.integers(0, 6)) if texts else 0):
        text = draw(st.sampled_from(texts))
        start = draw(st.integers(0, len(text) - 1))
        ngrams.append(text[start : start + draw(st.integers(1, 5))])
    return ngrams


passages_of = st.lists(st.lists(st.integers(0, 3), max_size=10), max_size=6)


@st.composite
def fm_cases(draw: st.DrawFn) -> tuple[int, list[list[int]], list[list[int]]]:
    vocab = draw(st.integers(1, 4))
    passages = draw(st.lists(st.lists(st.integers(0, vocab - 1), max_size=10), max_size=6))
    corpus = dict(enumerate(passages))
    return vocab, passages, queries(corpus, vocab, draw)


@settings(max_examples=60, deadline=None)
@given(fm_cases())
def test_fmindex_equals_a_scan(case: tuple[int, list[list[int]], list[list[int]]]) -> None:
    vocab, passages, ngrams = case
    index = FMIndex.build(passages, vocab)
    corpus = dict(enumerate(passages))
    assert (index.n_passages, index.n_tokens) == (len(passages), sum(map(len, passages)))
    check(index, corpus, ngrams)
    for number, tokens in corpus.items():
        assert index.passage(number).tolist() == tokens
    numbers = [*reversed(corpus), *corpus][:7]  # any order, repeats allowed
    tokens, lengths = index.passages(np.array(numbers, np.int64))
    assert tokens.tolist() == [t for n in numbers for t in corpus[n]]
    assert lengths.tolist() == [len(corpus[n]) for n in numbers]
    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp) / "fm")
        loaded = FMIndex.load(Path(tmp) / "fm")
        assert loaded.nbytes == index.nbytes
        check(loaded, corpus, ngrams)


@st.composite
def segment_cases(draw: st.DrawFn) -> tuple[int, list[tuple], list[list[int]]]:
    """A vocabulary, a random sequence of operations and the n-grams to check after each."""
    vocab = draw(st.integers(1, 4))
    ops: list[tuple] = []
    added: list[int] = []
    for step in range(draw(st.integers(2, 8))):
        kind = "add" if step == 0 else draw(st.sampled_from(["add", "remove", "remove", "merge", "save"]))
        if kind == "add":
            passages = draw(st.lists(st.lists(st.integers(0, vocab - 1), max_size=8), min_size=1, max_size=5))
            # rowids need not be in order, and a removed one may come back
            fresh = [len(added) + 1000 + i for i in range(len(passages))]
            rowids = draw(st.permutations(fresh))
            if added and draw(st.booleans()):
                rowids = [*rowids[:-1], draw(st.sampled_from(added))]
            added.extend(rowids)
            ops.append(("add", list(zip(rowids, passages))))
        elif kind == "remove":  # mostly rowids that were added, some never seen
            ops.append(("remove", draw(st.lists(st.sampled_from([*added, -1, 5]), min_size=1, max_size=3))))
        else:
            ops.append((kind,))
    corpus_tokens = [t for op in ops if op[0] == "add" for _, t in op[1]]
    return vocab, ops, queries(dict(enumerate(corpus_tokens)), vocab, draw)


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in path.rglob("*")
        if p.is_file()
    }


@settings(max_examples=50, deadline=None)
@given(segment_cases())
def test_segmented_index_equals_a_scan(case: tuple[int, list[tuple], list[list[int]]]) -> None:
    vocab, ops, ngrams = case
    index = SegmentedIndex.empty(vocab)
    live: Corpus = {}
    saved: list[tuple[Path, dict[str, str], Corpus]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for step, op in enumerate(ops):
            if op[0] == "add":
                rows = [(r, t) for r, t in op[1] if r not in live]  # a live rowid is rejected: tested below
                index.add(rows)
                live.update((r, list(t)) for r, t in rows)
            elif op[0] == "remove":
                index.remove(op[1])
                for rowid in op[1]:
                    live.pop(rowid, None)
            elif op[0] == "merge":
                index.merge()
                assert index.n_segments <= 1 and not index.merge()
            else:
                folder = Path(tmp) / f"v{step}"
                index.save(folder)
                saved.append((folder, tree_digest(folder), dict(live)))
                index = SegmentedIndex.open(folder)
            assert len(index) == len(live)
            assert index.n_tokens == sum(map(len, live.values()))
            check(index, live, ngrams)
            for rowid, tokens in live.items():
                assert index.tokens(rowid).tolist() == tokens
            asked = list(reversed(live))  # across segments, out of their order
            tokens, lengths = index.passages(asked)
            assert tokens.tolist() == [t for r in asked for t in live[r]]
            assert lengths.tolist() == [len(live[r]) for r in asked]
        for folder, digest, then in saved:  # copy-on-write: what was opened from stays as it was saved
            assert tree_digest(folder) == digest
            check(SegmentedIndex.open(folder), then, ngrams)


@pytest.mark.parametrize("vocab", [3, 150])
def test_wide_ranges_count_next_tokens_alike(vocab: int) -> None:
    """Ranges past the tiny corpora's: Python counting, numpy unique, bincount and the cache."""
    rng = np.random.default_rng(0)
    passages = [rng.integers(0, vocab, 200).tolist() for _ in range(70)]  # vocab 3: each token ~4700 times
    index = FMIndex.build(passages, vocab)
    corpus = dict(enumerate(passages))
    for ngram in ([0], [1], [2], [0, 1]):
        expected = following(corpus, ngram)
        for _ in range(2):  # the second answer comes from the cache; changing the first must not harm it
            tokens, counts = index.next_tokens(ngram)
            assert dict(zip(tokens.tolist(), counts.tolist())) == expected
            counts[:] = 0


def test_cached_and_evicted_ranges_answer_alike(monkeypatch) -> None:
    """Suffix-array ranges are cached (a tiny cache here, emptied every other n-gram): long n-grams, their
    prefixes and extensions, asked cold, warm and after the cache starts afresh, answer as the scan."""
    monkeypatch.setattr(fmindex, "CACHED_PREFIXES", 2)
    passages = [[0] * 100, [0] * 40 + [1] + [0] * 50]
    index = FMIndex.build(passages, 2)
    corpus = dict(enumerate(passages))
    long = [0] * 70
    check(index, corpus, [long, long[:45], long[:46], [0] * 40 + [1], long, [1, 0, 0], [1, 0, 0, 1]])


def test_segments_survive_tombstones_and_merge(tmp_path: Path) -> None:
    index = SegmentedIndex.empty(5)
    index.add([(10, [1, 2, 3]), (11, [1, 2, 4]), (12, [2, 3])])
    index.add([(20, [1, 2, 3, 1, 2])])
    index.remove([11, 99])
    assert index.count([1, 2]) == 3
    assert index.next_tokens([1, 2])[0].tolist() == [3]
    assert index.locate([1, 2]).tolist() == [[10, 0], [20, 0], [20, 3]]
    index.save(tmp_path / "v1")
    before = tree_digest(tmp_path / "v1")
    reopened = SegmentedIndex.open(tmp_path / "v1")
    reopened.remove([10])
    reopened.add([(11, [4, 4])])
    assert reopened.merge() and reopened.n_segments == 1 and not reopened.merge()
    reopened.save(tmp_path / "v2")
    assert tree_digest(tmp_path / "v1") == before
    assert SegmentedIndex.open(tmp_path / "v1").count([1, 2]) == 3
    v2 = SegmentedIndex.open(tmp_path / "v2")
    assert (len(v2), v2.n_tokens, v2.count([1, 2]), v2.count([4])) == (3, 9, 2, 2)
    assert v2.tokens(11).tolist() == [4, 4]


def test_unchanged_segments_are_hard_linked(tmp_path: Path) -> None:
    index = SegmentedIndex.empty(3)
    index.add([(1, [0, 1, 2])])
    index.save(tmp_path / "v1")
    index = SegmentedIndex.open(tmp_path / "v1")
    index.add([(2, [2, 2])])
    index.save(tmp_path / "v2")
    old, new = tmp_path / "v1" / "seg000000" / "sa.npy", tmp_path / "v2" / "seg000000" / "sa.npy"
    assert old.stat().st_ino == new.stat().st_ino


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: FMIndex.build([[0, 1], [5]], 5), "passages"),
        (lambda: FMIndex.build([[0, -1]], 5), "passages"),
        (lambda: FMIndex.build([[0.5]], 5), "passages"),
        (lambda: FMIndex.build([[0]], 0), "vocab_size"),
        (lambda: FMIndex.build([[0, 1]], 5).count([7]), "ngram"),
        (lambda: FMIndex.build([[0, 1]], 5).next_tokens([-1]), "ngram"),
        (lambda: FMIndex.build([[0, 1]], 5).locate([1], limit=-1), "limit"),
        (lambda: SegmentedIndex.empty(-2), "vocab_size"),
        (lambda: SegmentedIndex.empty(5).add([(1, [0, 5])]), "rows"),
        (lambda: SegmentedIndex.empty(5).add([(1, [0]), (1, [1])]), "rows"),
        (lambda: SegmentedIndex.empty(5).add([("x", [0])]), "rows"),
        (lambda: SegmentedIndex.empty(5).count([5]), "ngram"),
        (lambda: SegmentedIndex.empty(5).next_tokens([0, -3]), "ngram"),
        (lambda: SegmentedIndex.empty(5).locate([9]), "ngram"),
        (lambda: SegmentedIndex.empty(5).remove([1.5]), "rowids"),
        (lambda: SegmentedIndex.empty(5).tokens(3), "rowid"),
        (lambda: SegmentedIndex.empty(5).passages([3]), "rowids"),
    ],
)
def test_bad_input_names_the_argument(call, field: str) -> None:
    with pytest.raises(ParamError) as caught:
        call()
    assert caught.value.field == field


def test_a_live_rowid_cannot_be_added_again_and_nothing_changes() -> None:
    index = SegmentedIndex.empty(4)
    index.add([(7, [1, 2])])
    with pytest.raises(ParamError) as caught:
        index.add([(8, [3]), (7, [3])])
    assert caught.value.field == "rows"
    assert (len(index), index.count([3]), index.n_segments) == (1, 0, 1)


def test_missing_or_broken_folders_are_artifact_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError):
        SegmentedIndex.open(tmp_path)
    with pytest.raises(ArtifactError):
        FMIndex.load(tmp_path)
    FMIndex.build([[1, 2]], 3).save(tmp_path / "fm")
    (tmp_path / "fm" / "psi.npy").unlink()
    with pytest.raises(ArtifactError):
        FMIndex.load(tmp_path / "fm")
    index = SegmentedIndex.empty(3)
    index.add([(1, [0, 1])])
    index.add([(2, [2])])
    index.save(tmp_path / "v1")
    (tmp_path / "v1" / "seg000001.rowids.npy").unlink()
    with pytest.raises(ArtifactError):
        SegmentedIndex.open(tmp_path / "v1")
