"""The PLAID index: its search against exact MaxSim, compression, versions on disk, adds, deletes, rebuilds.

The corpus is the benchmark's synthetic topic mixture (queries repeat one passage's terms), small enough
that training and exhaustive search take well under a second.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.colbert import overlap, topic_mixture
from ragfleet_kernels.maxsim import maxsim_reference
from services.retriever.colbert.codec import ResidualCodec
from services.retriever.colbert.plaid import PlaidIndex, SearchParams
from services.runtime.model_errors import ArtifactError, ParamError

DIM = 64
N_PASSAGES = 400
NBITS = 2
# Every centroid probed, nothing pruned, every candidate kept: PLAID's stages 1-3 lose nothing.
GENEROUS = SearchParams(ncells=1 << 30, centroid_score_threshold=float("-inf"), ndocs=1 << 30)
GENEROUS_COMPRESSED = dataclasses.replace(GENEROUS, compressed_rerank=True)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[np.ndarray], list[torch.Tensor]]:
    passages, queries = topic_mixture(N_PASSAGES, 20, tokens=30, dim=DIM, seed=1)
    return passages, [torch.from_numpy(q) for q in queries]


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory) -> Path:
    """A folder holding the whole corpus as one trained index (rowid = 1000 + position)."""
    index = PlaidIndex.empty(DIM, NBITS)
    index.add(range(1000, 1000 + N_PASSAGES), corpus[0])
    folder = tmp_path_factory.mktemp("plaid") / "v1"
    index.save(folder)
    return folder


class Decompressed:
    """Every passage's tokens as the index's codec reproduces them, padded; brute-force MaxSim over them."""

    def __init__(self, index: PlaidIndex, passages: dict[int, np.ndarray]) -> None:
        self.rowids = sorted(passages)
        lengths = [len(passages[r]) for r in self.rowids]
        flat = np.concatenate([passages[r] for r in self.rowids]).astype(np.float32)
        tokens = index.codec.decompress(*index.codec.compress(flat))
        self.lengths = torch.tensor(lengths)
        self.d = torch.zeros(len(lengths), max(lengths), DIM)
        for i, chunk in enumerate(np.split(tokens, np.cumsum(lengths)[:-1])):
            self.d[i, : len(chunk)] = torch.from_numpy(chunk)

    def top(self, q: torch.Tensor, k: int) -> list[tuple[int, float]]:
        scores = maxsim_reference(q[None], torch.tensor([len(q)]), self.d, self.lengths)[0].numpy()
        order = sorted(range(len(self.rowids)), key=lambda i: (-scores[i], self.rowids[i]))[:k]
        return [(self.rowids[i], float(scores[i])) for i in order]


def assert_same_hits(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [r for r, _ in got] == [r for r, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5, atol=1e-4)


def as_dict(passages: list[np.ndarray], first_rowid: int = 1000) -> dict[int, np.ndarray]:
    return {first_rowid + i: p for i, p in enumerate(passages)}


def test_search_params_for_k_are_plaids_defaults_with_4x_ndocs():
    assert SearchParams.for_k(10) == SearchParams(1, 0.5, 1024)
    assert SearchParams.for_k(11) == SearchParams(2, 0.45, 4096)
    assert SearchParams.for_k(100) == SearchParams(2, 0.45, 4096)
    assert SearchParams.for_k(101) == SearchParams(4, 0.4, 16384)
    assert SearchParams.for_k(2000) == SearchParams(4, 0.4, 32000)
    with pytest.raises(ParamError, match="k"):
        SearchParams.for_k(0)


def test_generous_knobs_give_exhaustive_search_results(corpus, saved):
    index = PlaidIndex.load(saved)
    for q in corpus[1][:8]:
        assert_same_hits(index.search(q, 10, GENEROUS), index.search_exhaustive(q, 10))


def test_generous_knobs_give_exact_maxsim_of_the_compressed_tokens(corpus, saved):
    index = PlaidIndex.load(saved)
    exact = Decompressed(index, as_dict(corpus[0]))
    for q in corpus[1][:8]:
        assert_same_hits(index.search(q, 10, GENEROUS_COMPRESSED), exact.top(q, 10))


def test_default_knobs_find_the_exact_top10(corpus, saved):
    index = PlaidIndex.load(saved)
    params = SearchParams.for_k(10)
    compressed = dataclasses.replace(params, compressed_rerank=True)
    decompressed_overlaps, uncompressed_overlaps = [], []
    for q in corpus[1]:
        exact = index.search_exhaustive(q, 10)
        found = index.search(q, 10, compressed)
        assert found[0][0] == exact[0][0]
        decompressed_overlaps.append(overlap(found, exact, 10))
        uncompressed_overlaps.append(overlap(index.search(q, 10, params), exact, 10))
    # Scoring the decompressed tokens costs some of the exact top 10 (2-bit residuals); the pruning of
    # stages 1-3 costs almost nothing.
    assert np.mean(decompressed_overlaps) >= 0.9
    assert np.mean(uncompressed_overlaps) >= 0.95


def test_exhaustive_search_is_exact_maxsim_of_the_stored_tokens(corpus, saved):
    index = PlaidIndex.load(saved)
    q = corpus[1][0]
    hits = index.search_exhaustive(q, 5)
    for rowid, score in hits:
        d = torch.from_numpy(corpus[0][rowid - 1000].astype(np.float32))[None]
        want = maxsim_reference(q[None], torch.tensor([len(q)]), d, torch.tensor([d.shape[1]]))
        assert score == pytest.approx(float(want), rel=1e-5)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_compression_error_shrinks_with_more_bits(corpus):
    tokens = np.concatenate(corpus[0][:200]).astype(np.float32)
    errors = []
    for nbits in (1, 2, 4):
        codec = ResidualCodec.train(tokens, nbits)
        codes, packed = codec.compress(tokens)
        assert packed.shape == (len(tokens), DIM * nbits // 8) and packed.dtype == np.uint8
        errors.append(float(np.linalg.norm(codec.decompress(codes, packed) - tokens, axis=1).mean()))
    assert errors[0] > errors[1] > errors[2]


def test_save_and_load_give_identical_results(corpus, saved, tmp_path):
    index = PlaidIndex.load(saved)
    before = [(index.search(q, 10), index.search_exhaustive(q, 10)) for q in corpus[1][:5]]
    facts = index.save(tmp_path / "v2")
    assert facts["passages"] == N_PASSAGES and facts["nbits"] == NBITS and facts["bytes"] > 0
    assert facts["embeddings"] == sum(len(p) for p in corpus[0]) and facts["centroids"] == index.num_centroids
    again = PlaidIndex.load(tmp_path / "v2")
    assert [(again.search(q, 10), again.search_exhaustive(q, 10)) for q in corpus[1][:5]] == before
    # Unchanged files are hard links of the previous version's, not copies.
    for file in saved.glob("seg*.npy"):
        assert (tmp_path / "v2" / file.name).stat().st_ino == file.stat().st_ino


def test_adds_and_removes_are_visible_at_once_and_after_save(corpus, saved, tmp_path):
    index = PlaidIndex.load(saved)
    passages, queries = corpus
    q = queries[0]
    best = index.search(q, 1)[0][0]
    index.remove([best, 123456])  # an unknown rowid is ignored
    assert len(index) == N_PASSAGES - 1
    assert best not in {r for r, _ in index.search(q, 50, GENEROUS)}
    assert best not in {r for r, _ in index.search_exhaustive(q, 50)}
    # The removed passage comes back under a new rowid, in a new segment.
    index.add([7], [passages[best - 1000]])
    assert index.search(q, 1)[0][0] == 7 and index.search_exhaustive(q, 1)[0][0] == 7
    index.save(tmp_path / "v2")
    again = PlaidIndex.load(tmp_path / "v2")
    assert len(again) == N_PASSAGES and again.search(q, 1)[0][0] == 7
    assert best not in {r for r, _ in again.search_exhaustive(q, 50)}
    # The folder loaded first is untouched: it still serves the old version.
    assert PlaidIndex.load(saved).search(q, 1)[0][0] == best


def test_incremental_add_does_not_retrain(corpus, tmp_path):
    passages, queries = corpus
    index = PlaidIndex.empty(DIM, NBITS)
    index.add(range(300), passages[:300])
    codec = index.codec
    index.save(tmp_path / "v1")
    index.add(range(300, N_PASSAGES), passages[300:])
    assert index.codec is codec
    index.save(tmp_path / "v2")
    codec_files = sorted(p.name for p in (tmp_path / "v2").glob("codec*"))
    assert codec_files == sorted(p.name for p in (tmp_path / "v1").glob("codec*"))
    for name in codec_files:
        assert (tmp_path / "v2" / name).stat().st_ino == (tmp_path / "v1" / name).stat().st_ino
    loaded = PlaidIndex.load(tmp_path / "v2")
    np.testing.assert_array_equal(loaded.codec.centroids, codec.centroids)
    for q in queries[:5]:
        assert_same_hits(loaded.search(q, 10, GENEROUS), loaded.search_exhaustive(q, 10))


def test_rebuild_after_many_deletes(corpus, saved, tmp_path):
    passages, queries = corpus
    index = PlaidIndex.load(saved)
    gone = list(range(1000, 1000 + N_PASSAGES, 3)) + list(range(1001, 1000 + N_PASSAGES, 3))
    index.remove(gone)
    old_centroids = index.codec.centroids
    index.rebuild()
    remaining = {r: p for r, p in as_dict(passages).items() if r not in set(gone)}
    assert len(index) == len(remaining)
    assert index.num_embeddings == sum(len(p) for p in remaining.values())
    assert index.num_centroids < len(old_centroids)  # re-trained on a third of the tokens
    facts = index.save(tmp_path / "v2")
    assert facts["segments"] == 1
    assert not np.load(tmp_path / "v2" / "tombstones.npy").size
    again = PlaidIndex.load(tmp_path / "v2")
    for q in queries[:8]:
        exact = again.search_exhaustive(q, 10)
        assert {r for r, _ in exact} <= set(remaining)
        assert_same_hits(again.search(q, 10, GENEROUS), exact)


def test_allowed_restricts_results(corpus, saved):
    index = PlaidIndex.load(saved)
    q = corpus[1][0]
    top = [r for r, _ in index.search_exhaustive(q, 20)]
    small = set(top[5:15]) | {1000, 1001}  # fewer than ndocs: all of them are candidates
    assert_same_hits(index.search(q, 5, allowed=small), index.search_exhaustive(q, 5, allowed=small))
    assert {r for r, _ in index.search_exhaustive(q, 50, allowed=small)} == small
    large = set(range(1000, 1000 + N_PASSAGES, 2))  # more than ndocs: PLAID's stages, filtered
    narrow = dataclasses.replace(SearchParams.for_k(10), ndocs=64)
    assert {r for r, _ in index.search(q, 10, narrow, allowed=large)} <= large
    exact = index.search_exhaustive(q, 10, allowed=large)
    assert {r for r, _ in exact} <= large and len(exact) == 10
    assert index.search(q, 10, allowed=set()) == [] and index.search_exhaustive(q, 10, allowed=set()) == []
    index.remove([top[5]])
    assert top[5] not in {r for r, _ in index.search(q, 10, allowed=small)}


def test_empty_index_returns_nothing(corpus, tmp_path):
    q = corpus[1][0]
    index = PlaidIndex.empty(DIM, NBITS)
    assert index.search(q, 10) == [] and index.search_exhaustive(q, 10) == [] and len(index) == 0
    facts = index.save(tmp_path / "v1")
    assert facts["passages"] == 0 and facts["centroids"] == 0
    index = PlaidIndex.load(tmp_path / "v1")
    assert index.search(q, 10) == [] and index.num_embeddings == 0
    index.add([1, 2], corpus[0][:2])
    index.remove([1, 2])
    assert index.search(q, 10) == [] and index.search_exhaustive(q, 10) == []
    index.rebuild()
    assert index.codec is None and index.search(q, 10) == []


def test_a_tiny_first_add_trains_fewer_centroids(corpus):
    passages, queries = corpus
    index = PlaidIndex.empty(DIM, NBITS)
    index.add([5], [passages[0][:5]])
    assert index.num_centroids == 4  # 2^floor(log2(5)): k-means cannot have more centroids than points
    index.add(range(10, 60), passages[1:51])
    assert index.num_centroids == 4
    assert len(index.search(queries[0], 10)) == 10


def test_bad_input_changes_nothing(corpus, saved, tmp_path):
    index = PlaidIndex.load(saved)
    passages, queries = corpus
    cases = [
        (([1], [np.zeros((3, DIM + 1), np.float32)]), r"embeddings\[0\]"),
        (([1], [np.zeros((0, DIM), np.float32)]), r"embeddings\[0\]"),
        (([1], [np.full((3, DIM), np.nan, np.float32)]), r"embeddings\[0\]"),
        (([1, 2], [passages[0]]), "embeddings"),
        (([1, 1], passages[:2]), "rowids"),
        (([1, 1000], passages[:2]), "rowids"),
    ]
    for args, field in cases:
        with pytest.raises(ParamError, match=field):
            index.add(*args)
    assert len(index) == N_PASSAGES
    with pytest.raises(ParamError, match="q"):
        index.search(queries[0][:, :10], 10)
    with pytest.raises(ParamError, match="k"):
        index.search(queries[0], 0)
    with pytest.raises(ParamError, match="nbits"):
        PlaidIndex.empty(DIM, 3)
    with pytest.raises(ParamError, match="dim"):
        PlaidIndex.empty(12, 1)
    with pytest.raises(FileExistsError, match="empty folder"):
        index.save(saved)
    with pytest.raises(ArtifactError, match="no PLAID index"):
        PlaidIndex.load(tmp_path)
