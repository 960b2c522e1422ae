"""A token-level FM-index over a list of passages of token ids: n-gram counts, next tokens and locations.

SEAL (Bevilacqua et al. 2022) decodes n-grams that must occur in the corpus; this index answers what the
decoder asks. It is immutable: `build` makes one, `save` writes it, `load` memory-maps it.

Text. Symbol 0 is the end marker, token t is symbol t + 1. Every passage is written reversed and followed
by the marker, the passages back to back: T = rev(p_0) $ rev(p_1) $ ... . Backward search over T matches a
pattern from its last symbol to its first, so over the reversed passages it extends an n-gram left to right
in reading order: the suffix-array range of `ngram + [t]` follows from that of `ngram` in one step, and the
tokens that may come next are the BWT symbols inside the range. N-grams never span two passages, since the
marker is no token.

Arrays (n = tokens + passages), all memory-mapped once saved:
  text (n,)      T, uint16 while the symbols fit (uint32 above)
  sa (n,)        the suffix array of T, int32 (int64 past 2^31), by pydivsufsort: it sorts integer alphabets
                 as big-endian bytes and keeps the aligned suffixes (a build briefly holds an int32 per
                 byte of T)
  bwt (n,)       BWT[i] = T[SA[i] - 1]: the symbol before each suffix
  psi (n,)       the BWT positions of each symbol in increasing order, symbol by symbol: symbol c's are
                 psi[C[c] : C[c + 1]], so rank(c, i) = searchsorted(psi[C[c] : C[c + 1]], i)
  starts (P+1,)  where each reversed passage begins in T (starts[P] = n), int64
  counts (V+2,)  C: C[c] = number of symbols < c in T, int64
Why `psi` and not the `wavelet-matrix` package for rank: that Rust wavelet matrix answers rank as fast
(0.53 µs against 0.38 µs for a pair of ranks at 10M tokens), but it cannot be memory-mapped or saved, so
every `load` would rebuild it (3.3 s and 42 MB of memory per 10M tokens), and the retriever opens a fresh
index on every write. Its `range_list` (distinct values with counts) returns Python dicts and was 4-40x
slower than numpy's unique / bincount on the BWT slice, so `next_tokens` uses those too. Measured with
numpy 2.4 / wavelet-matrix 4.0 on Zipfian ids over a 30k vocabulary; `bench/seal.py` has the index numbers.
The arrays cost about 12 bytes per corpus token (2 + 4 + 2 + 4) under a 65k vocabulary.

A decoder's first steps ask for the next tokens of frequent n-grams, whose ranges are wide (O(range) to
count). Those of ranges of at least CACHED_WIDTH suffixes are kept for the CACHED_RANGES most recently
asked (at most 16 bytes per distinct token each, so under 16·vocab_size·CACHED_RANGES bytes in all).
The suffix-array ranges of the n-grams asked are kept too, up to CACHED_PREFIXES of them (a few hundred
bytes each; then the cache starts afresh): a decoder asks for `ngram + [t]` right after `ngram`, and
SEAL's scoring then counts and locates the n-grams its beams held, so most ranges are cached or one
backward-search step from a cached one. Plain dict operations, so threads may share an index.

Bad arguments raise `ParamError` naming the argument; a folder without a readable index, `ArtifactError`.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydivsufsort

from services.runtime.artifacts import publish_file
from services.runtime.model_errors import ArtifactError, ParamError
from services.runtime.storage import atomic_write_json, fsync_dir, link_or_copy

FORMAT = 1
META_FILE = "fmindex.json"
ARRAYS = ("text", "sa", "bwt", "psi", "starts", "counts")
END = 0  # the end marker's symbol
# next_tokens of n-grams with this many occurrences or more is cached, for this many distinct n-grams
CACHED_WIDTH = 1 << 12
CACHED_RANGES = 256
CACHED_PREFIXES = 4096  # suffix-array ranges of up to this many n-grams are cached
SMALL_RANGE = 64  # next_tokens counts ranges up to this in Python


def token_array(tokens: Sequence[int] | np.ndarray, vocab_size: int, field: str) -> np.ndarray:
    """`tokens` as a 1-d int64 array; ParamError naming `field` unless every one is an int in
    [0, vocab_size)."""
    array = np.asarray(tokens)
    if array.size == 0:
        return np.zeros(0, np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ParamError(
            field, f"must be a flat sequence of integer token ids, got {array.dtype} {array.shape}"
        )
    if array.min() < 0 or array.max() >= vocab_size:
        bad = np.flatnonzero((array < 0) | (array >= vocab_size))
        raise ParamError(
            field, f"token id {int(array[bad[0]])} at {int(bad[0])} is outside [0, vocab_size={vocab_size})"
        )
    return array.astype(np.int64, copy=False)


def ngram_key(ngram: Sequence[int] | np.ndarray, vocab_size: int, field: str = "ngram") -> tuple[int, ...]:
    """`ngram` as a tuple of Python ints; ParamError naming `field` unless every one is a token id in
    [0, vocab_size). A tuple of ints (what the search passes) is checked without numpy."""
    if isinstance(ngram, tuple) and all(type(t) is int and 0 <= t < vocab_size for t in ngram):
        return ngram
    return tuple(token_array(ngram, vocab_size, field).tolist())


def checked_vocab_size(vocab_size: int) -> int:
    """`vocab_size` as an int; ParamError naming it unless it is a positive integer."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int | np.integer) or vocab_size < 1:
        raise ParamError("vocab_size", f"must be a positive integer, got {vocab_size!r}")
    return int(vocab_size)


def _symbol_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.uint32  # symbols 0..vocab_size


def _position_dtype(n: int) -> type[np.signedinteger]:
    return np.int32 if n < np.iinfo(np.int32).max else np.int64


def write_npy(path: Path, array: np.ndarray) -> None:
    """np.save into a temporary file beside `path`, flushed and renamed (no pickle)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)

    publish_file(path, write)


class FMIndex:
    """An immutable FM-index over passages of token ids < `vocab_size` (see the module docstring)."""

    def __init__(self, vocab_size: int, arrays: dict[str, np.ndarray], source: Path | None) -> None:
        self.vocab_size = vocab_size
        self._arrays = arrays
        self._text, self._sa, self._bwt, self._psi = (arrays[k] for k in ("text", "sa", "bwt", "psi"))
        self._starts = arrays["starts"]
        self._c = arrays["counts"].tolist()  # Python ints: read once per backward-search step
        counts = np.diff(arrays["counts"])[END + 1 :]
        tokens = np.flatnonzero(counts)
        self._unigrams = tokens, counts[tokens]
        # Frequent n-grams (a decoder's first steps) have wide ranges, slow to count anew every time.
        self._wide_successors = functools.lru_cache(maxsize=CACHED_RANGES)(self._successors)
        self._ranges: dict[tuple[int, ...], tuple[int, int]] = {}  # see _range
        self._source = source  # the folder the arrays are mapped from; None while only in memory
        self.n_passages = len(self._starts) - 1
        self.n_tokens = len(self._text) - self.n_passages

    # -- construction and persistence ------------------------------------------------------------

    @classmethod
    def build(cls, passages: Sequence[Sequence[int]], vocab_size: int) -> FMIndex:
        """The index of `passages` (passage numbers are their positions in it); passages may be empty."""
        vocab_size = checked_vocab_size(vocab_size)
        arrays = []
        for i, passage in enumerate(passages):
            try:
                arrays.append(token_array(passage, vocab_size, "passages"))
            except ParamError as exc:
                raise ParamError("passages", f"passages[{i}]: {exc.problem}") from None
        lengths = np.array([len(a) for a in arrays], np.int64)
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        return cls._from_text(_reversed_text(flat, lengths, vocab_size), lengths, vocab_size)

    @classmethod
    def combine(cls, parts: Sequence[tuple[FMIndex, np.ndarray]]) -> FMIndex:
        """The index of the passages `numbers` of each `(index, numbers)`, in that order (for tombstone
        indexes and merges; the parts must share one vocab_size)."""
        if not parts:
            raise ParamError("parts", "need at least one index")
        vocab_size = parts[0][0].vocab_size
        texts, lengths = [], []
        for index, numbers in parts:
            if index.vocab_size != vocab_size:
                raise ParamError("parts", f"vocab sizes differ: {index.vocab_size} and {vocab_size}")
            numbers = np.asarray(numbers, np.int64)
            begin, end = index._starts[numbers], index._starts[numbers + 1]  # each passage with its marker
            texts.append(index._text[concat_ranges(begin, end - begin)])
            lengths.append(end - begin - 1)
        text = np.concatenate(texts).astype(_symbol_dtype(vocab_size), copy=False)
        return cls._from_text(text, np.concatenate(lengths), vocab_size)

    @classmethod
    def _from_text(cls, text: np.ndarray, lengths: np.ndarray, vocab_size: int) -> FMIndex:
        n = len(text)
        positions = _position_dtype(n)
        sa = pydivsufsort.divsufsort(text).astype(positions, copy=False) if n else np.zeros(0, positions)
        bwt = text[sa - 1]  # sa == 0 wraps to the last symbol, the end marker
        counts = np.bincount(text, minlength=vocab_size + 1)
        arrays = {
            "text": text,
            "sa": sa,
            "bwt": bwt,
            "psi": np.argsort(bwt, kind="stable").astype(positions),
            "starts": np.concatenate([[0], np.cumsum(lengths + 1)]).astype(np.int64),
            "counts": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        }
        return cls(vocab_size, arrays, None)

    def save(self, directory: Path) -> None:
        """Writes the index into the new, empty folder `directory` (created if missing); files of an index
        loaded from disk are hard-linked from there. The manifest is written last."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise FileExistsError(f"{directory}: an FM-index is saved into an empty folder")
        for name, array in self._arrays.items():
            if self._source is not None:
                link_or_copy(self._source / f"{name}.npy", directory / f"{name}.npy")
            else:
                write_npy(directory / f"{name}.npy", array)
        meta = {
            "format": FORMAT,
            "vocab_size": self.vocab_size,
            "n_passages": self.n_passages,
            "n_tokens": self.n_tokens,
        }
        atomic_write_json(directory / META_FILE, meta)
        fsync_dir(directory)

    @classmethod
    def load(cls, directory: Path) -> FMIndex:
        """The index saved in `directory`, its arrays memory-mapped read-only."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text("utf-8"))
            if meta.get("format") != FORMAT:
                raise ArtifactError(f"{directory / META_FILE}: unknown format {meta.get('format')!r}")
            # np.asarray: plain ndarray views of the maps (np.memmap's indexing is slower)
            arrays = {k: np.asarray(np.load(directory / f"{k}.npy", mmap_mode="r")) for k in ARRAYS}
            n = meta["n_tokens"] + meta["n_passages"]
            expected = {k: n for k in ("text", "sa", "bwt", "psi")}
            expected.update(starts=meta["n_passages"] + 1, counts=meta["vocab_size"] + 2)
        except ArtifactError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{directory} holds no readable FM-index: {exc}") from exc
        shapes = {k: len(arrays[k]) for k in ARRAYS}
        if shapes != expected:
            raise ArtifactError(f"{directory}: array lengths {shapes} do not match {META_FILE} ({expected})")
        return cls(meta["vocab_size"], arrays, directory)

    @property
    def nbytes(self) -> int:
        """Bytes of the index's arrays (on disk, or in memory before a save)."""
        return sum(a.nbytes for a in self._arrays.values())

    # -- queries -----------------------------------------------------------------------------------

    def count(self, ngram: Sequence[int]) -> int:
        """Occurrences of `ngram` in all passages; the empty n-gram occurs once before every token."""
        sp, ep = self._range(ngram_key(ngram, self.vocab_size))
        return ep - sp

    def next_tokens(self, ngram: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The distinct tokens t (ascending, int64) such that `ngram + [t]` occurs, and its counts."""
        ngram = ngram_key(ngram, self.vocab_size)
        sp, ep = self._range(ngram)
        if not ngram:  # every token's count is known (the BWT range would miss first tokens)
            tokens, counts = self._unigrams
        elif ep - sp >= CACHED_WIDTH:
            tokens, counts = self._wide_successors(sp, ep)
        else:
            return self._successors(sp, ep)
        return tokens.copy(), counts.copy()

    def _successors(self, sp: int, ep: int) -> tuple[np.ndarray, np.ndarray]:
        """The distinct tokens in BWT[sp:ep] and their counts."""
        if ep - sp <= SMALL_RANGE:  # most n-grams past the first tokens: numpy's per-call cost would dominate
            found = Counter(self._bwt[sp:ep].tolist())
            found.pop(END, None)
            symbols = sorted(found)
            return np.array(symbols, np.int64) - 1, np.array([found[s] for s in symbols], np.int64)
        if ep - sp > self.vocab_size:  # bincount is O(range + vocab), unique O(range log range)
            counts = np.bincount(self._bwt[sp:ep], minlength=self.vocab_size + 1)
            symbols = np.flatnonzero(counts)
            counts = counts[symbols]
        else:
            symbols, counts = np.unique(self._bwt[sp:ep], return_counts=True)
        keep = symbols != END
        return symbols[keep].astype(np.int64) - 1, counts[keep].astype(np.int64)

    def locate(self, ngram: Sequence[int], limit: int | None = None) -> np.ndarray:
        """(k, 2) int64 rows (passage number, offset of the n-gram's first token), sorted; with `limit`,
        any `limit` of the occurrences (the first in suffix-array order)."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ParamError("limit", f"must be None or an integer >= 0, got {limit!r}")
        ngram = ngram_key(ngram, self.vocab_size)
        sp, ep = self._range(ngram)
        if limit is not None:
            ep = min(ep, sp + limit)
        positions = self._sa[sp:ep].astype(np.int64)
        passages = np.searchsorted(self._starts, positions, side="right") - 1
        begin = self._starts[passages]
        length = self._starts[passages + 1] - begin - 1
        # A match of the reversed n-gram at reversed offset j ends at original offset length-1-j; the
        # empty n-gram's occurrence there is taken to be before that token.
        offsets = length - (positions - begin) - max(len(ngram), 1)
        order = np.lexsort((offsets, passages))
        return np.stack([passages[order], offsets[order]], axis=1).astype(np.int64).reshape(-1, 2)

    def passage(self, number: int) -> np.ndarray:
        """The token ids of passage `number` (int64)."""
        if not 0 <= number < self.n_passages:
            raise ParamError("number", f"must be in [0, {self.n_passages}), got {number}")
        return self.passages(np.array([number]))[0]

    def passages(self, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The token ids of passages `numbers` (valid passage numbers) back to back, and their lengths
        (int64)."""
        numbers = np.asarray(numbers, np.int64)
        # Reversing the reversed passages (each with its marker) taken last to first gives them in order,
        # each after a marker.
        begin, end = self._starts[numbers[::-1]], self._starts[numbers[::-1] + 1]
        text = self._text[concat_ranges(begin, end - begin)][::-1].astype(np.int64) - 1
        return text[text >= 0], end[::-1] - begin[::-1] - 1  # markers are -1 now

    def _range(self, ngram: tuple[int, ...]) -> tuple[int, int]:
        """The suffix-array range [sp, ep) of the suffixes of T that begin with the reversed `ngram`:
        cached, or one step from its prefix's cached range, or a whole backward search."""
        if not ngram:  # the suffixes that begin with a token (the markers' come first)
            return self.n_passages, len(self._text)
        found = self._ranges.get(ngram)
        if found is not None:
            return found
        prefix = self._ranges.get(ngram[:-1])
        sp, ep = prefix if prefix is not None else (0, len(self._text))
        for token in ngram[-1:] if prefix is not None else ngram:
            sp, ep = self._step(sp, ep, token)
        if len(self._ranges) >= CACHED_PREFIXES:
            self._ranges.clear()  # what a decoder asks next extends what it asked last
        self._ranges[ngram] = sp, ep
        return sp, ep

    def _step(self, sp: int, ep: int, token: int) -> tuple[int, int]:
        """A backward-search step: the range of `token` before the suffixes of [sp, ep); (0, 0) if none."""
        if sp >= ep:
            return 0, 0
        symbol = token + 1
        lo, hi = self._c[symbol], self._c[symbol + 1]
        rank = self._psi[lo:hi].searchsorted(np.array([sp, ep], self._psi.dtype))
        sp, ep = lo + int(rank[0]), lo + int(rank[1])
        return (sp, ep) if sp < ep else (0, 0)


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions starts[i] .. starts[i] + lengths[i] - 1 of every i, back to back."""
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return offsets + np.arange(total)


def _reversed_text(flat: np.ndarray, lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    """T for passages given as their tokens back to back (`flat`) and their `lengths`."""
    text = np.zeros(len(flat) + len(lengths), _symbol_dtype(vocab_size))  # zeros: the markers stay
    if len(flat):
        passage = np.repeat(np.arange(len(lengths)), lengths)
        token_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        text_start = token_start + np.arange(len(lengths))  # each earlier passage adds one marker
        offset = np.arange(len(flat)) - token_start[passage]
        text[text_start[passage] + lengths[passage] - 1 - offset] = flat + 1
    return text
