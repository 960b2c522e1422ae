"""The SEAL backend's index at one version: FM-index segments searched together, tombstones, merge.

Data. Every `add` makes a *segment*: an immutable `FMIndex` over the added passages and their rowids
(passage number i is rowid rowids[i]). A `remove` tombstones passages: they leave the segment's live mask,
and the segment gets a second, small FM-index over all its tombstoned passages (rebuilt from the segment's
text on each `remove` that hits it). N-grams never span passages, so the live answers are exact
differences: count = count in the segment - count in its tombstone index, next-token counts likewise (a
token whose count drops to 0 is gone), and `locate` asks the segment for as many more occurrences as the
tombstone index holds, then drops the tombstoned ones. A segment whose passages are all tombstoned is
dropped. Removing is thus O(tombstoned tokens of the segment) each time, and queries cost one more
backward search per segment with tombstones, until `merge` (the backend's `rebuild`, `ragfleet rebuild`)
writes the live passages of every segment into one new segment without tombstones. Every query visits
every segment: on bench/seal.py's corpora a decoding step over 8 segments with 1% tombstoned cost 10-40x
what it costs once merged, so many small adds call for a merge.

Versions. `save` writes into a new, empty folder:
  seal_index.json          format, vocab_size, the segments (id, tombstoned passages), next segment id
  seg<id>/                 the segment's FMIndex (fmindex.py)
  seg<id>.rowids.npy       (n,) int64
  seg<id>.dead/            the tombstone FMIndex, only when there are tombstones
  seg<id>.dead.npy         the tombstoned passage numbers, ascending
FM-index files of a segment that came from the folder it was opened from (or last saved to) are
hard-linked; the small rowid and tombstone arrays are written anew. Files are never changed in place,
so `open` then `add` / `remove` / `merge` then `save` into a new folder leaves the opened folder exactly as
it was, and readers of an old version keep searching it while a writer builds the next one.

Bad arguments raise `ParamError` naming the argument; a folder without a readable index, `ArtifactError`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.retriever.seal.fmindex import (
    FMIndex,
    checked_vocab_size,
    concat_ranges,
    ngram_key,
    token_array,
    write_npy,
)
from services.runtime.model_errors import ArtifactError, ParamError
from services.runtime.storage import atomic_write_json, fsync_dir

FORMAT = 1
META_FILE = "seal_index.json"


def _name(segment_id: int) -> str:
    return f"seg{segment_id:06d}"


@dataclass
class _Segment:
    """Passages added together: their FM-index and rowids (immutable), the live mask and the FM-index of
    the tombstoned passages (None while there are none)."""

    id: int
    index: FMIndex
    rowids: np.ndarray  # (n,) int64
    live: np.ndarray  # (n,) bool
    dead: FMIndex | None
    by_rowid: np.ndarray = field(init=False)  # passage numbers in rowid order, for `numbers`

    def __post_init__(self) -> None:
        self.by_rowid = np.argsort(self.rowids, kind="stable")

    @classmethod
    def new(cls, segment_id: int, index: FMIndex, rowids: np.ndarray) -> _Segment:
        return cls(segment_id, index, rowids, np.ones(len(rowids), bool), None)

    @classmethod
    def load(cls, directory: Path, segment_id: int, tombstones: int) -> _Segment:
        name = _name(segment_id)
        index = FMIndex.load(directory / name)
        rowids = np.asarray(np.load(directory / f"{name}.rowids.npy", mmap_mode="r"))
        live = np.ones(len(rowids), bool)
        dead = None
        if tombstones:
            live[np.load(directory / f"{name}.dead.npy")] = False
            dead = FMIndex.load(directory / f"{name}.dead")
        if len(rowids) != index.n_passages or int((~live).sum()) != tombstones:
            raise ArtifactError(f"{directory / name}: rowids or tombstones do not match its FM-index")
        return cls(segment_id, index, rowids, live, dead)

    def save(self, directory: Path) -> None:
        name = _name(self.id)
        self.index.save(directory / name)
        write_npy(directory / f"{name}.rowids.npy", self.rowids)
        if self.dead is not None:
            write_npy(directory / f"{name}.dead.npy", np.flatnonzero(~self.live))
            self.dead.save(directory / f"{name}.dead")

    def tombstone(self, hit: np.ndarray) -> None:
        """Tombstones the live passages where `hit` is True and rebuilds the tombstone index."""
        live = self.live & ~hit
        self.dead = FMIndex.combine([(self.index, np.flatnonzero(~live))])
        self.live = live

    def numbers(self, rowids: np.ndarray) -> np.ndarray:
        """The passage number of each of `rowids` that is a live passage here, -1 for the others."""
        if not len(self.rowids):
            return np.full(len(rowids), -1, np.int64)
        at = np.searchsorted(self.rowids, rowids, sorter=self.by_rowid)
        numbers = self.by_rowid[np.minimum(at, len(self.rowids) - 1)].astype(np.int64)
        found = (self.rowids[numbers] == rowids) & self.live[numbers]
        return np.where(found, numbers, -1)

    @property
    def n_tokens(self) -> int:
        return self.index.n_tokens - (self.dead.n_tokens if self.dead is not None else 0)


class SegmentedIndex:
    """The SEAL index of one version: segments, tombstones and merge (see the module docstring)."""

    def __init__(self, vocab_size: int, segments: list[_Segment], next_id: int) -> None:
        self.vocab_size = vocab_size
        self._segments = segments
        self._next_id = next_id

    # -- construction and persistence ------------------------------------------------------------

    @classmethod
    def empty(cls, vocab_size: int) -> SegmentedIndex:
        return cls(checked_vocab_size(vocab_size), [], 0)

    @classmethod
    def open(cls, version_dir: Path) -> SegmentedIndex:
        """The index saved in `version_dir`, memory-mapped; the folder is never written to."""
        version_dir = Path(version_dir)
        try:
            meta = json.loads((version_dir / META_FILE).read_text("utf-8"))
            if meta.get("format") != FORMAT:
                raise ArtifactError(f"{version_dir / META_FILE}: unknown format {meta.get('format')!r}")
            segments = [_Segment.load(version_dir, s["id"], s["tombstones"]) for s in meta["segments"]]
        except ArtifactError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise ArtifactError(f"{version_dir} holds no readable SEAL index: {exc}") from exc
        for segment in segments:
            if segment.index.vocab_size != meta["vocab_size"]:
                raise ArtifactError(f"{version_dir}: segment {segment.id} has another vocab_size")
        return cls(meta["vocab_size"], segments, meta["next_id"])

    def save(self, version_dir: Path) -> None:
        """Writes the index into the new, empty folder `version_dir` (created if missing) and maps its
        segments from there."""
        version_dir = Path(version_dir)
        version_dir.mkdir(parents=True, exist_ok=True)
        if any(version_dir.iterdir()):
            raise FileExistsError(f"{version_dir}: a SEAL index is saved into an empty folder")
        for segment in self._segments:
            segment.save(version_dir)
        meta = {
            "format": FORMAT,
            "vocab_size": self.vocab_size,
            "next_id": self._next_id,
            "segments": [{"id": s.id, "tombstones": int((~s.live).sum())} for s in self._segments],
        }
        atomic_write_json(version_dir / META_FILE, meta)
        fsync_dir(version_dir)
        self._segments = [_Segment.load(version_dir, s["id"], s["tombstones"]) for s in meta["segments"]]

    # -- facts -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Live passages."""
        return sum(int(s.live.sum()) for s in self._segments)

    @property
    def n_tokens(self) -> int:
        """Tokens of live passages."""
        return sum(s.n_tokens for s in self._segments)

    @property
    def n_segments(self) -> int:
        return len(self._segments)

    # -- changes -----------------------------------------------------------------------------------

    def add(self, rows: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Adds passages (rowid, token ids) as a new segment; a rowid must not be live already."""
        rowids, passages = [], []
        for i, row in enumerate(rows):
            try:
                rowid, tokens = row
            except (TypeError, ValueError):
                raise ParamError("rows", f"rows[{i}] is not a (rowid, token ids) pair") from None
            if isinstance(rowid, bool) or not isinstance(rowid, int | np.integer):
                raise ParamError("rows", f"rows[{i}]: rowid {rowid!r} is not an integer")
            try:
                passages.append(token_array(tokens, self.vocab_size, "rows"))
            except ParamError as exc:
                raise ParamError("rows", f"rows[{i}]: {exc.problem}") from None
            rowids.append(int(rowid))
        if not rowids:
            return
        ids = np.array(rowids, np.int64)
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ParamError("rows", f"rowid {int(unique[counts > 1][0])} appears more than once")
        for segment in self._segments:
            held = segment.rowids[segment.live]
            clash = held[np.isin(held, ids)]
            if len(clash):
                raise ParamError("rows", f"rowid {int(clash[0])} is already in the index")
        index = FMIndex.build(passages, self.vocab_size)
        self._segments.append(_Segment.new(self._next_id, index, ids))
        self._next_id += 1

    def remove(self, rowids: Sequence[int]) -> None:
        """Tombstones the live passages `rowids` (others are ignored)."""
        ids = np.asarray(rowids)
        if ids.size and (ids.ndim != 1 or ids.dtype.kind not in "iu"):
            raise ParamError("rowids", f"must be a flat sequence of integers, got {ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64)
        for segment in self._segments:
            hit = segment.live & np.isin(segment.rowids, ids)
            if hit.any():
                segment.tombstone(hit)
        self._segments = [s for s in self._segments if s.live.any()]

    def merge(self) -> bool:
        """Rewrites the live passages as one segment without tombstones; False when the index is that
        already (at most one segment and no tombstones)."""
        if len(self._segments) <= 1 and all(s.dead is None for s in self._segments):
            return False
        parts = [(s.index, np.flatnonzero(s.live)) for s in self._segments]
        index = FMIndex.combine(parts)
        rowids = np.concatenate([s.rowids[s.live] for s in self._segments]).astype(np.int64)
        self._segments = [_Segment.new(self._next_id, index, rowids)]
        self._next_id += 1
        return True

    # -- queries -----------------------------------------------------------------------------------

    def count(self, ngram: Sequence[int]) -> int:
        """Occurrences of `ngram` in live passages (the empty n-gram: live tokens)."""
        ngram = ngram_key(ngram, self.vocab_size)
        total = 0
        for segment in self._segments:
            total += segment.index.count(ngram)
            if segment.dead is not None:
                total -= segment.dead.count(ngram)
        return total

    def next_tokens(self, ngram: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The distinct tokens t (ascending) such that `ngram + [t]` occurs in a live passage, and the
        counts of `ngram + [t]` there, both int64."""
        ngram = ngram_key(ngram, self.vocab_size)
        tokens, counts = [], []
        for segment in self._segments:
            t, c = segment.index.next_tokens(ngram)
            if not len(t):
                continue  # then the tombstoned passages hold no occurrence either
            tokens.append(t)
            counts.append(c)
            if segment.dead is not None:
                t, c = segment.dead.next_tokens(ngram)
                tokens.append(t)
                counts.append(-c)
        if not tokens:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(tokens) == 1:
            return tokens[0], counts[0]
        # Sums per token id; float64 weights are exact for counts below 2^53.
        totals = np.bincount(np.concatenate(tokens), weights=np.concatenate(counts)).astype(np.int64)
        distinct = np.flatnonzero(totals > 0)
        return distinct, totals[distinct]

    def locate(self, ngram: Sequence[int], limit: int | None = None) -> np.ndarray:
        """(k, 2) int64 rows (rowid, offset of the n-gram's first token) of its occurrences in live
        passages, segment by segment, sorted within each; with `limit`, at most that many."""
        ngram = ngram_key(ngram, self.vocab_size)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ParamError("limit", f"must be None or an integer >= 0, got {limit!r}")
        found: list[np.ndarray] = []
        held = 0
        for segment in self._segments:
            want = None
            if limit is not None:
                if held >= limit:
                    break
                # the tombstoned occurrences among the first ones cannot outnumber the tombstone index's
                want = limit - held + (segment.dead.count(ngram) if segment.dead is not None else 0)
            rows = segment.index.locate(ngram, want)
            rows = rows[segment.live[rows[:, 0]]]
            rows[:, 0] = segment.rowids[rows[:, 0]]
            found.append(rows)
            held += len(rows)
        rows = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
        return rows if limit is None else rows[:limit]

    def passages(self, rowids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The token ids of the live passages `rowids` back to back, in that order, and their lengths
        (int64)."""
        rowids = np.asarray(rowids, np.int64).reshape(-1)
        if not len(rowids):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        pieces, lengths, order = [], [], []
        for segment in self._segments:
            numbers = segment.numbers(rowids)
            here = np.flatnonzero(numbers >= 0)
            if len(here):
                tokens, sizes = segment.index.passages(numbers[here])
                pieces.append(tokens)
                lengths.append(sizes)
                order.append(here)
        asked = np.concatenate(order) if order else np.zeros(0, np.int64)
        if len(asked) < len(rowids):
            missing = np.setdiff1d(rowids, rowids[asked])
            raise ParamError("rowids", f"{int(missing[0])} is not a live passage of the index")
        if len(pieces) == 1:
            return pieces[0], lengths[0]  # asked is 0..n-1: one segment holds them all
        # Segment by segment, then back into the order asked.
        tokens, sizes = np.concatenate(pieces), np.concatenate(lengths)
        starts = np.cumsum(sizes) - sizes
        back = np.argsort(asked)
        return tokens[concat_ranges(starts[back], sizes[back])], sizes[back]

    def tokens(self, rowid: int) -> np.ndarray:
        """The token ids (int64) of the live passage `rowid`."""
        try:
            return self.passages([rowid])[0]
        except ParamError as exc:
            raise ParamError("rowid", exc.problem) from None
