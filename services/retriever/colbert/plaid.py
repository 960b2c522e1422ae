"""PLAID: the compressed ColBERTv2 index of token embeddings and its four-stage MaxSim search.

Data. A passage is a (n_i, dim) matrix of unit-length token embeddings, keyed by an int64 rowid. Passages
live in immutable *segments*, one per `add` (one for everything after a `rebuild`). A segment holds, in
npy files memory-mapped once saved:
  rowids (n,) int64, doclens (n,) int32      the passages and their token counts
  codes (m,) int32, residuals (m, dim·nbits/8) uint8
                                             every token compressed (`codec.ResidualCodec`), passages
                                             back to back
  vectors (m, dim) float16                   the uncompressed tokens, for `search_exhaustive` and `rebuild`
  ivf_pids, ivf_offsets (C+1,)               the inverted lists: the passages (segment-local numbers)
                                             with a token in centroid c are
                                             ivf_pids[ivf_offsets[c] : ivf_offsets[c + 1]]
The codec (centroids, bucket cutoffs and values) is shared by all segments. It is trained by the first
`add` to an empty, untrained index on that batch alone (2^floor(log2(16·sqrt(#embeddings))) centroids,
fewer when the batch is tiny, see `codec.num_centroids`); later adds assign their tokens to the existing
centroids and compress them with the existing codec, never re-training. `rebuild` re-trains on every live
passage and rewrites them as one segment. A removal is a tombstone (segment id, passage number) that masks
the passage at once; `rebuild` drops tombstoned data. Searches visit every segment, so many small adds
slow them down until a `rebuild` merges the segments.

Versions. `save` writes into a new, empty folder: files of segments (and the codec) that came from the
folder the index was loaded from (or last saved to) are hard-linked (copied across filesystems), new ones
written atomically, plus `tombstones.npy` and the small `plaid.json`. Files are never changed in place, so
readers of an old version folder keep searching it while a writer builds the next one.

Search (PLAID, Santhanam et al. 2022), for a query Q (Lq, dim):
  1. S = centroids·Qᵀ; the top `ncells` centroids of every query token; candidates = the union of their
     inverted lists (live passages only, and only `allowed` rowids when given).
  2. Centroid pruning: of each candidate's tokens keep those whose centroid scores >= the threshold for
     some query token; approximate score = Σ over query tokens of the max of S over the kept centroids;
     keep the best `ndocs` (at least k).
  3. The same score over all of their tokens' centroids; keep the best ndocs/4 (at least k).
  4. Score those passages with exact MaxSim (`ragfleet_kernels.maxsim`) of their stored fp16 tokens, so
     returned scores equal `search_exhaustive`'s. With `SearchParams.compressed_rerank`, stage 4
     decompresses the residual codes instead, as PLAID does; its scores then carry the compression error.
Why fp16 by default: the index keeps those tokens anyway (exhaustive search needs them), reading a few
hundred passages' tokens costs no more than decompressing them, and on the 50k-passage bench
(`bench/colbert.py`) the compression error alone cost 8 points of top-10 overlap at 2 bits.
Ties go to the smaller rowid. With an `allowed` set of at most `ndocs` live passages, stage 1 is skipped
and all of them are candidates, so a selective filter cannot starve the result.

Searches read inverted lists and codes of candidates only; nothing loads a whole segment. In memory per
passage stay its live flag and its first token's offset.

Bad arguments raise `ParamError` naming the argument; a folder without a readable index, `ArtifactError`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragfleet_kernels.maxsim import maxsim
from services.retriever.colbert.codec import NBITS, ResidualCodec
from services.runtime.model_errors import ArtifactError, ParamError
from services.runtime.storage import atomic_write_json, fsync_dir

FORMAT = 1
META_FILE = "plaid.json"
TOMBSTONES_FILE = "tombstones.npy"
CODEC_ARRAYS = ("centroids", "cutoffs", "weights")
SEGMENT_ARRAYS = ("rowids", "doclens", "codes", "residuals", "vectors", "ivf_pids", "ivf_offsets")
# Exhaustive search scores this many (padded) tokens per MaxSim call.
EXHAUSTIVE_CHUNK_TOKENS = 1 << 18
_NO_PASSAGE = np.iinfo(np.int64).max


@dataclass(frozen=True)
class SearchParams:
    """PLAID's knobs: centroids probed per query token, the pruning threshold, and the stage-2 pool;
    `compressed_rerank` makes stage 4 decompress residuals (PLAID's way) instead of reading fp16 tokens.
    """

    ncells: int
    centroid_score_threshold: float
    ndocs: int
    compressed_rerank: bool = False

    def __post_init__(self) -> None:
        if self.ncells < 1:
            raise ParamError("ncells", "must be at least 1")
        if self.ndocs < 1:
            raise ParamError("ndocs", "must be at least 1")

    @classmethod
    def for_k(cls, k: int) -> SearchParams:
        """PLAID's defaults for a top-k search, with 4x its ndocs: on the 50k-passage bench the wider pool
        took the top-10 overlap with exhaustive search from 0.91 to 1.0 for 15 ms more per query."""
        if k < 1:
            raise ParamError("k", "must be at least 1")
        if k <= 10:
            return cls(1, 0.5, 1024)
        if k <= 100:
            return cls(2, 0.45, 4096)
        return cls(4, 0.4, max(16 * k, 16384))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(s, s + n) over pairs (s, n), without a Python loop."""
    lengths = np.asarray(lengths, np.int64)
    shift = np.asarray(starts, np.int64) - _offsets(lengths)  # where each run starts - where it lands
    return np.arange(int(lengths.sum())) + np.repeat(shift, lengths)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """(n,) int64 start of each of n back-to-back runs of the given lengths."""
    starts = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _best(scores: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n highest scores, best first, ties to the smaller key."""
    if len(scores) > n:
        kth = np.partition(scores, len(scores) - n)[len(scores) - n]
        pool = np.flatnonzero(scores >= kth)
    else:
        pool = np.arange(len(scores))
    return pool[np.lexsort((keys[pool], -scores[pool]))][:n]


def _centroid_interaction(
    scores: np.ndarray, codes: np.ndarray, lengths: np.ndarray, keep: np.ndarray | None = None
) -> np.ndarray:
    """(n,) Σ over query tokens of the max of `scores` (C, Lq) over each passage's centroid ids (back to
    back, `lengths`); with `keep`, over the kept ones only (-inf for a passage with none)."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    if keep is not None:
        codes, owner = codes[keep], owner[keep]
    best = np.full((len(lengths), scores.shape[1]), -np.inf, np.float32)
    if len(codes):
        first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        best[owner[first]] = np.maximum.reduceat(np.take(scores, codes, axis=0), first, axis=0)
    return best.sum(axis=1)


def _padded(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """(n, max length, dim) float32 from passages stored back to back in `tokens`; padding repeats a
    passage's last token (MaxSim ignores positions past a passage's length)."""
    width = int(lengths.max())
    index = starts[:, None] + np.minimum(np.arange(width), lengths[:, None] - 1)
    return torch.from_numpy(np.take(tokens, index, axis=0)).float()


def _write_npy(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary name in the same folder, fsync, rename (streams; no copy in memory)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or one without hard links
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def _store(arrays: dict[str, np.ndarray], prefix: str, source: Path | None, target: Path) -> None:
    """Puts `prefix.<name>.npy` files into `target`: linked from `source` when they are there already."""
    for name, array in arrays.items():
        file = f"{prefix}.{name}.npy"
        if source is not None:
            _link_or_copy(source / file, target / file)
        else:
            _write_npy(target / file, array)


def _open(directory: Path, prefix: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays memory-mapped read-only (as plain ndarray views: np.memmap's indexing is slower)."""
    return {name: np.asarray(np.load(directory / f"{prefix}.{name}.npy", mmap_mode="r")) for name in names}


def _codec_prefix(codec_id: int) -> str:
    return f"codec{codec_id:06d}"


def _segment_prefix(segment_id: int) -> str:
    return f"seg{segment_id:06d}"


@dataclass
class _Segment:
    """Passages added together: immutable arrays (memory-mapped once saved) and a live mask."""

    id: int
    arrays: dict[str, np.ndarray]  # SEGMENT_ARRAYS
    live: np.ndarray  # (n,) bool, in memory
    starts: np.ndarray  # (n,) int64 offset of each passage's first token
    source: Path | None  # the folder holding the arrays' files; None while they exist only in memory

    @classmethod
    def build(
        cls,
        segment_id: int,
        rowids: np.ndarray,
        vectors: np.ndarray,
        doclens: np.ndarray,
        codec: ResidualCodec,
    ) -> _Segment:
        """Compresses `vectors` (m, dim) float16, the tokens of passages `rowids` back to back."""
        codes, residuals = codec.compress(vectors)
        n = len(rowids)
        # Inverted lists: the distinct (centroid, passage) pairs, sorted by centroid then passage.
        pairs = np.unique(codes.astype(np.int64) * n + np.repeat(np.arange(n), doclens))
        counts = np.bincount(pairs // n, minlength=codec.num_centroids)
        arrays = {
            "rowids": rowids.astype(np.int64),
            "doclens": doclens.astype(np.int32),
            "codes": codes,
            "residuals": residuals,
            "vectors": vectors,
            "ivf_pids": (pairs % n).astype(np.int32),
            "ivf_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        }
        return cls(segment_id, arrays, np.ones(n, bool), _offsets(arrays["doclens"]), None)

    @classmethod
    def open(cls, directory: Path, segment_id: int, live: np.ndarray | None = None) -> _Segment:
        arrays = _open(directory, _segment_prefix(segment_id), SEGMENT_ARRAYS)
        n = len(arrays["rowids"])
        live = np.ones(n, bool) if live is None else live
        return cls(segment_id, arrays, live, _offsets(np.asarray(arrays["doclens"])), directory)

    def __len__(self) -> int:
        return len(self.live)

    def tokens(self, name: str, local: np.ndarray) -> np.ndarray:
        """The per-token array `name` of passages `local`, back to back."""
        rows = _ranges(self.starts[local], self.arrays["doclens"][local])
        return np.take(self.arrays[name], rows, axis=0)  # several times faster than fancy indexing


class PlaidIndex:
    """A PLAID index of ColBERT token embeddings (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        nbits: int,
        codec: ResidualCodec | None,
        codec_id: int,
        codec_source: Path | None,
        segments: list[_Segment],
        next_id: int,
    ) -> None:
        self.dim = dim
        self.nbits = nbits
        self._codec = codec
        self._codec_id = codec_id
        self._codec_source = codec_source
        self._segments = segments
        self._next_id = next_id

    # -- construction and persistence ------------------------------------------------------------

    @classmethod
    def empty(cls, dim: int, nbits: int) -> PlaidIndex:
        if nbits not in NBITS:
            raise ParamError("nbits", f"must be one of {NBITS}, got {nbits}")
        if dim < 1 or dim * nbits % 8:
            raise ParamError("dim", f"must be positive with dim·nbits a multiple of 8, got {dim}")
        return cls(dim, nbits, None, -1, None, [], 0)

    @classmethod
    def load(cls, directory: Path) -> PlaidIndex:
        """The index saved in `directory`, its arrays memory-mapped."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text("utf-8"))
        except FileNotFoundError as exc:
            raise ArtifactError(f"{directory} holds no PLAID index ({META_FILE} is missing)") from exc
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{directory / META_FILE}: unknown format {meta.get('format')!r}")
        codec = None
        if meta["codec"] is not None:  # small, and read whole by every search: not memory-mapped
            prefix = _codec_prefix(meta["codec"])
            arrays = {name: np.load(directory / f"{prefix}.{name}.npy") for name in CODEC_ARRAYS}
            codec = ResidualCodec(**arrays, nbits=meta["nbits"])
        dead = np.load(directory / TOMBSTONES_FILE)
        segments = []
        for segment_id in meta["segments"]:
            segment = _Segment.open(directory, segment_id)
            segment.live[dead[dead[:, 0] == segment_id, 1]] = False
            segments.append(segment)
        codec_id = -1 if codec is None else meta["codec"]
        return cls(meta["dim"], meta["nbits"], codec, codec_id, directory, segments, meta["next_id"])

    def save(self, directory: Path) -> dict[str, Any]:
        """Writes this index into the new, empty folder `directory` (created if missing) and switches its
        memory-mapped arrays to the files there; returns facts for the manifest."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise FileExistsError(f"{directory}: a PLAID index is saved into an empty folder")
        if self._codec is not None:
            codec_arrays = {name: getattr(self._codec, name) for name in CODEC_ARRAYS}
            _store(codec_arrays, _codec_prefix(self._codec_id), self._codec_source, directory)
        for segment in self._segments:
            _store(segment.arrays, _segment_prefix(segment.id), segment.source, directory)
        dead = [
            np.stack([np.full(int((~s.live).sum()), s.id), np.flatnonzero(~s.live)], axis=1)
            for s in self._segments
        ]
        _write_npy(directory / TOMBSTONES_FILE, np.concatenate(dead or [np.zeros((0, 2))]).astype(np.int64))
        meta = {
            "format": FORMAT,
            "dim": self.dim,
            "nbits": self.nbits,
            "codec": self._codec_id if self._codec is not None else None,
            "segments": [s.id for s in self._segments],
            "next_id": self._next_id,
        }
        atomic_write_json(directory / META_FILE, meta)
        fsync_dir(directory)
        self._segments = [_Segment.open(directory, s.id, s.live) for s in self._segments]
        self._codec_source = directory
        return {
            "passages": len(self),
            "embeddings": self.num_embeddings,
            "centroids": self.num_centroids,
            "nbits": self.nbits,
            "dim": self.dim,
            "segments": len(self._segments),
            "bytes": sum(p.stat().st_size for p in directory.iterdir()),
            "vector_bytes": sum(p.stat().st_size for p in directory.glob("seg*.vectors.npy")),
        }

    # -- facts -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(int(s.live.sum()) for s in self._segments)

    @property
    def num_embeddings(self) -> int:
        """Tokens of live passages."""
        return sum(int(np.asarray(s.arrays["doclens"])[s.live].sum()) for s in self._segments)

    @property
    def num_centroids(self) -> int:
        return self._codec.num_centroids if self._codec is not None else 0

    @property
    def codec(self) -> ResidualCodec | None:
        """The centroids and residual codec; None until the first add."""
        return self._codec

    # -- changes -----------------------------------------------------------------------------------

    def add(self, rowids: Sequence[int], embeddings: Sequence[np.ndarray]) -> None:
        """Adds passages: `embeddings[i]` (n_i >= 1, dim) float16/32, L2-normalised, is passage rowids[i].

        The first add to an untrained index trains the centroids and codec on its embeddings."""
        ids = np.asarray(rowids, dtype=np.int64).reshape(-1)
        if len(ids) != len(embeddings):
            raise ParamError("embeddings", f"{len(embeddings)} matrices for {len(ids)} rowids")
        if not len(ids):
            return
        for i, matrix in enumerate(embeddings):
            shape = getattr(matrix, "shape", ())
            if len(shape) != 2 or shape[1] != self.dim or shape[0] < 1:
                raise ParamError(f"embeddings[{i}]", f"expected shape (tokens >= 1, {self.dim}), got {shape}")
            if not np.issubdtype(matrix.dtype, np.floating) or not np.isfinite(matrix).all():
                raise ParamError(f"embeddings[{i}]", "expected finite floats")
        if len(np.unique(ids)) != len(ids):
            raise ParamError("rowids", "contain duplicates")
        for segment in self._segments:
            held = segment.arrays["rowids"][segment.live]
            clash = held[np.isin(held, ids)]
            if len(clash):
                raise ParamError("rowids", f"{int(clash[0])} is already in the index")
        vectors = np.concatenate([np.asarray(m, np.float16) for m in embeddings])
        doclens = np.array([len(m) for m in embeddings], np.int32)
        if self._codec is None:
            codec, codec_id = ResidualCodec.train(vectors, self.nbits), self._next_id
            segment_id = codec_id + 1
        else:
            codec, codec_id, segment_id = self._codec, self._codec_id, self._next_id
        segment = _Segment.build(segment_id, ids, vectors, doclens, codec)
        # Nothing below can fail: the index changes only now.
        if codec is not self._codec:
            self._codec, self._codec_id, self._codec_source = codec, codec_id, None
        self._segments.append(segment)
        self._next_id = segment_id + 1

    def remove(self, rowids: Sequence[int]) -> None:
        """Tombstones the passages `rowids` (rowids not in the index are ignored)."""
        ids = np.asarray(rowids, dtype=np.int64).reshape(-1)
        for segment in self._segments:
            segment.live &= ~np.isin(segment.arrays["rowids"], ids)

    def rebuild(self) -> None:
        """Re-trains centroids and codec on every live passage and recompresses them into one segment,
        dropping tombstoned data (all of it is read into memory)."""
        rowids, doclens, vectors = [], [], []
        for segment in self._segments:
            local = np.flatnonzero(segment.live)
            rowids.append(segment.arrays["rowids"][local])
            doclens.append(segment.arrays["doclens"][local])
            vectors.append(segment.tokens("vectors", local))
        if not any(len(r) for r in rowids):
            self._segments, self._codec, self._codec_source = [], None, None
            return
        all_vectors = np.concatenate(vectors)
        codec_id, segment_id = self._next_id, self._next_id + 1
        codec = ResidualCodec.train(all_vectors, self.nbits)
        segment = _Segment.build(
            segment_id, np.concatenate(rowids), all_vectors, np.concatenate(doclens), codec
        )
        # Nothing below can fail: the index changes only now.
        self._codec, self._codec_id, self._codec_source = codec, codec_id, None
        self._segments = [segment]
        self._next_id = segment_id + 1

    # -- search ------------------------------------------------------------------------------------

    def search(
        self, q: torch.Tensor, k: int, params: SearchParams | None = None, allowed: set[int] | None = None
    ) -> list[tuple[int, float]]:
        """PLAID's top-k (rowid, MaxSim score) for the query tokens `q` (Lq, dim), best first."""
        queries = self._check_query(q, k)
        params = params or SearchParams.for_k(k)
        if self._codec is None or (allowed is not None and not allowed):
            return []
        scores = self._codec.centroids @ queries.T  # (C, Lq)
        allowed_ids = None if allowed is None else np.fromiter(allowed, np.int64, len(allowed))
        candidates = None
        if allowed_ids is not None:
            candidates = self._live(allowed_ids)
            if len(candidates) > params.ndocs:
                candidates = None
        if candidates is None:
            candidates = self._probe(scores, params.ncells, allowed_ids)
        if not len(candidates):
            return []
        # Stage 2: centroid pruning.
        codes, lengths = self._tokens("codes", candidates)
        keep = scores.max(axis=1)[codes] >= params.centroid_score_threshold
        approximate = _centroid_interaction(scores, codes, lengths, keep)
        candidates = np.sort(candidates[_best(approximate, candidates, max(k, params.ndocs))])
        # Stage 3: full centroid interaction.
        codes, lengths = self._tokens("codes", candidates)
        approximate = _centroid_interaction(scores, codes, lengths)
        candidates = np.sort(candidates[_best(approximate, candidates, max(k, params.ndocs // 4))])
        # Stage 4: exact MaxSim of the stored fp16 (or the decompressed) tokens.
        if params.compressed_rerank:
            codes, lengths = self._tokens("codes", candidates)
            residuals, _ = self._tokens("residuals", candidates)
            tokens = self._codec.decompress(codes, residuals)
        else:
            tokens, lengths = self._tokens("vectors", candidates)
        exact = self._maxsim(q, _padded(tokens, _offsets(lengths), lengths), lengths)
        return self._results(exact, self._rowids(candidates), k)

    def search_exhaustive(
        self, q: torch.Tensor, k: int, allowed: set[int] | None = None
    ) -> list[tuple[int, float]]:
        """Exact MaxSim of `q` (Lq, dim) against every live (allowed) passage's uncompressed tokens."""
        self._check_query(q, k)
        allowed_ids = None if allowed is None else np.fromiter(allowed, np.int64, len(allowed))
        all_scores, all_rowids = [], []
        for segment in self._segments:
            local = np.flatnonzero(segment.live)
            if allowed_ids is not None:
                local = local[np.isin(segment.arrays["rowids"][local], allowed_ids)]
            # Shortest passages first, so that each chunk pads little.
            local = local[np.argsort(segment.arrays["doclens"][local], kind="stable")]
            lengths = np.asarray(segment.arrays["doclens"][local])
            start = 0
            while start < len(local):
                # As many passages as fit EXHAUSTIVE_CHUNK_TOKENS once padded to the longest of them.
                widths = np.maximum.accumulate(lengths[start:]) * np.arange(1, len(local) - start + 1)
                end = start + max(1, int(np.searchsorted(widths, EXHAUSTIVE_CHUNK_TOKENS, side="right")))
                chunk = local[start:end]
                d = _padded(segment.arrays["vectors"], segment.starts[chunk], lengths[start:end])
                all_scores.append(self._maxsim(q, d, lengths[start:end]))
                all_rowids.append(segment.arrays["rowids"][chunk])
                start = end
        if not all_scores:
            return []
        return self._results(np.concatenate(all_scores), np.concatenate(all_rowids), k)

    def _check_query(self, q: torch.Tensor, k: int) -> np.ndarray:
        if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.shape[1] != self.dim or q.shape[0] < 1:
            raise ParamError("q", f"expected a tensor of shape (tokens >= 1, {self.dim})")
        if k < 1:
            raise ParamError("k", "must be at least 1")
        return q.detach().float().cpu().numpy()

    def _maxsim(self, q: torch.Tensor, d: torch.Tensor, lengths: np.ndarray) -> np.ndarray:
        q = q.detach().float()
        d_lengths = torch.from_numpy(np.asarray(lengths, np.int64)).to(q.device)
        q_lengths = torch.tensor([len(q)], device=q.device)
        return maxsim(q[None], q_lengths, d.to(q.device), d_lengths)[0].cpu().numpy()

    @staticmethod
    def _results(scores: np.ndarray, rowids: np.ndarray, k: int) -> list[tuple[int, float]]:
        order = _best(scores, rowids, k)
        return [(int(r), float(s)) for r, s in zip(rowids[order], scores[order])]

    # Candidates are numbered across segments: segment i's passage j is number bases[i] + j.

    def _bases(self) -> np.ndarray:
        return _offsets(np.array([len(s) for s in self._segments], np.int64))

    def _split(self, numbers: np.ndarray) -> list[tuple[_Segment, np.ndarray]]:
        """(segment, local passage numbers) for the sorted passage `numbers`, segment by segment."""
        bases = self._bases()
        bounds = np.searchsorted(numbers, np.r_[bases, _NO_PASSAGE])
        return [
            (s, numbers[bounds[i] : bounds[i + 1]] - bases[i])
            for i, s in enumerate(self._segments)
            if bounds[i] < bounds[i + 1]
        ]

    def _tokens(self, name: str, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The per-token array `name` of the sorted passages `numbers`, back to back, and their lengths."""
        parts = self._split(numbers)
        values = np.concatenate([s.tokens(name, local) for s, local in parts])
        lengths = np.concatenate([s.arrays["doclens"][local] for s, local in parts])
        return values, lengths

    def _rowids(self, numbers: np.ndarray) -> np.ndarray:
        return np.concatenate([s.arrays["rowids"][local] for s, local in self._split(numbers)])

    def _live(self, allowed_ids: np.ndarray) -> np.ndarray:
        """Numbers of the live passages whose rowids are in `allowed_ids`."""
        parts = [
            base + np.flatnonzero(s.live & np.isin(s.arrays["rowids"], allowed_ids))
            for base, s in zip(self._bases(), self._segments)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _probe(self, scores: np.ndarray, ncells: int, allowed_ids: np.ndarray | None) -> np.ndarray:
        """Stage 1: numbers of the live (allowed) passages in the top `ncells` centroids of a query token."""
        if ncells >= len(scores):
            cells = np.arange(len(scores))
        elif ncells == 1:
            cells = np.unique(scores.argmax(axis=0))
        else:
            cells = np.unique(np.argpartition(scores, len(scores) - ncells, axis=0)[-ncells:])
        parts = []
        for base, segment in zip(self._bases(), self._segments):
            offsets = segment.arrays["ivf_offsets"]
            lists = _ranges(offsets[cells], offsets[cells + 1] - offsets[cells])
            local = np.unique(segment.arrays["ivf_pids"][lists])
            local = local[segment.live[local]]
            if allowed_ids is not None:
                local = local[np.isin(segment.arrays["rowids"][local], allowed_ids)]
            parts.append(base + local)
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
