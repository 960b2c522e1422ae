"""Cutting documents into passages: done once, in the gateway, so every retriever sees the same ids.

A passage of document ``d`` has the id ``d#n`` (n = 0, 1, ...), knows its document and position, and
carries the document's title and metadata. Its text is always an exact slice of the document text,
from the first character of its first token to the last character of its last token, so whitespace
and punctuation inside a passage are preserved as written.

Tokens are words (``\\w+``) and single punctuation characters, found by a regular expression that
keeps character offsets. Three modes:

* fixed windows (default): ``chunk_tokens`` tokens per passage, consecutive windows share
  ``overlap_tokens`` tokens; the last window ends at the last token.
* sentence-aware: whole sentences are packed into a passage while it stays within ``chunk_tokens``;
  the next passage starts with the trailing whole sentences of the previous one that fit in
  ``overlap_tokens``. A sentence longer than the window is cut into fixed windows of its own.
  A sentence ends after ``.``, ``!`` or ``?`` (plus any closing quotes or brackets) followed by
  whitespace, or at a blank line.
* whole documents: one passage holding the whole text (BEIR corpora are already passage-sized).

Chunking takes time linear in the document's length whatever the settings. What one document may be
cut into is bounded by the limits: ``max_chunk_tokens`` per window, ``max_passages_per_document``
passages and ``max_chunked_document_bytes`` for them all (title and metadata are copied into each);
both are checked before any passage is built.
"""

from __future__ import annotations

import re
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

from ragfleet.v1 import common_pb2
from services.runtime.errors import invalid_argument, resource_exhausted
from services.runtime.settings import GatewaySettings, Limits

_TOKEN = re.compile(r"\w+|[^\w\s]")
_SENTENCE_END = frozenset(".!?")
_CLOSERS = frozenset("\"')]}\u201d\u2019")
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")

# A token range [start, stop) over a document's tokens.
_Span = tuple[int, int]


@dataclass(frozen=True)
class ChunkSettings:
    """How to cut documents; validated on construction (raises INVALID_ARGUMENT naming the field)."""

    chunk_tokens: int
    overlap_tokens: int
    sentence_aware: bool = False
    whole_documents: bool = False

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0:
            raise invalid_argument("spec.chunking.chunk_tokens", f"must be positive, got {self.chunk_tokens}")
        if not 0 <= self.overlap_tokens < self.chunk_tokens:
            raise invalid_argument(
                "spec.chunking.overlap_tokens",
                f"must be at least 0 and less than chunk_tokens ({self.chunk_tokens}), "
                f"got {self.overlap_tokens}",
            )

    @classmethod
    def from_spec(
        cls, spec: common_pb2.ChunkingSpec, defaults: GatewaySettings, limits: Limits
    ) -> ChunkSettings:
        """The spec with the server's defaults in place of its zero fields, within `max_chunk_tokens`.

        When a spec sets ``chunk_tokens`` but not ``overlap_tokens``, the default overlap is capped at
        a fifth of the requested window, so asking for small windows alone never fails validation.
        """
        chunk_tokens = spec.chunk_tokens or defaults.chunk_tokens
        if chunk_tokens > limits.max_chunk_tokens:
            raise invalid_argument(
                "spec.chunking.chunk_tokens",
                f"{chunk_tokens} is over the limit of {limits.max_chunk_tokens} (limits.max_chunk_tokens)",
            )
        if spec.overlap_tokens:
            overlap_tokens = spec.overlap_tokens
        elif spec.chunk_tokens:
            overlap_tokens = min(defaults.overlap_tokens, spec.chunk_tokens // 5)
        else:
            overlap_tokens = defaults.overlap_tokens
        return cls(
            chunk_tokens=chunk_tokens,
            overlap_tokens=overlap_tokens,
            sentence_aware=spec.sentence_aware or defaults.sentence_aware,
            whole_documents=spec.whole_documents,
        )


@dataclass(frozen=True)
class _Tokens:
    """Character offsets of a text's tokens: token i is text[starts[i]:ends[i]]."""

    starts: array
    ends: array

    @classmethod
    def of(cls, text: str) -> _Tokens:
        # Arrays of C ints, not a list of tuples: a 2 MB document may have two million tokens.
        starts, ends = array("i"), array("i")
        for match in _TOKEN.finditer(text):
            starts.append(match.start())
            ends.append(match.end())
        return cls(starts, ends)

    def __len__(self) -> int:
        return len(self.starts)


def chunk_document(doc: common_pb2.Document, spec: ChunkSettings, limits: Limits) -> list[common_pb2.Passage]:
    """The passages of one document, in order. The document's text must be non-empty; a text
    without tokens (only whitespace) becomes one passage holding it as is.

    Raises RESOURCE_EXHAUSTED when the passages would be more than `max_passages_per_document` or
    together larger than `max_chunked_document_bytes`.
    """
    assert doc.text, "documents are validated to have text before chunking"
    text = doc.text
    tokens = _Tokens.of(text)
    if spec.whole_documents or not tokens:
        slices = [(0, len(text))]
    else:
        spans = _sentence_packs(text, tokens, spec) if spec.sentence_aware else _windows(0, len(tokens), spec)
        most = limits.max_passages_per_document
        slices = [(tokens.starts[start], tokens.ends[stop - 1]) for start, stop in islice(spans, most + 1)]
        if len(slices) > most:
            raise resource_exhausted(
                f"document {doc.id!r} would be cut into more than {most} passages "
                "(limits.max_passages_per_document); ask for larger chunk_tokens"
            )
    _check_size(doc, slices, limits)
    return [_passage(doc, position, text[begin:end]) for position, (begin, end) in enumerate(slices)]


def _passage(doc: common_pb2.Document, position: int, text: str) -> common_pb2.Passage:
    passage = common_pb2.Passage(
        id=f"{doc.id}#{position}", doc_id=doc.id, position=position, title=doc.title, text=text
    )
    passage.metadata.update(doc.metadata)
    return passage


def _check_size(doc: common_pb2.Document, slices: list[tuple[int, int]], limits: Limits) -> None:
    """The passages' encoded size, from an empty one (id, title, metadata) plus each text's UTF-8 bytes."""
    # The text field's tag and length prefix take at most 6 bytes.
    size = len(slices) * (_passage(doc, len(slices), "").ByteSize() + 6) + _utf8_bytes(doc.text, slices)
    if size > limits.max_chunked_document_bytes:
        raise resource_exhausted(
            f"document {doc.id!r} would be cut into {len(slices)} passages of {size} bytes together, over "
            f"the limit of {limits.max_chunked_document_bytes} (limits.max_chunked_document_bytes; the "
            "title and metadata are copied into every passage)"
        )


def _utf8_bytes(text: str, slices: list[tuple[int, int]]) -> int:
    """The UTF-8 size of all the slices together, in one pass over the text."""
    if text.isascii():
        return sum(end - begin for begin, end in slices)
    at: dict[int, int] = {}
    total = previous = 0
    for offset in sorted({offset for piece in slices for offset in piece}):
        total += len(text[previous:offset].encode("utf-8"))
        at[offset] = total
        previous = offset
    return sum(at[end] - at[begin] for begin, end in slices)


def _windows(start: int, stop: int, spec: ChunkSettings) -> Iterator[_Span]:
    """Fixed windows over tokens [start, stop); the last one ends at ``stop``."""
    step = spec.chunk_tokens - spec.overlap_tokens
    begin = start
    while True:
        end = min(begin + spec.chunk_tokens, stop)
        yield begin, end
        if end == stop:
            return
        begin += step


def _sentences(text: str, tokens: _Tokens) -> Iterator[_Span]:
    """Token ranges of the sentences of ``text``.

    Tokens cover every non-space character, so the gap between two tokens is whitespace or nothing.
    A sentence ends at a gap after sentence punctuation, any closers after it aside.
    """
    starts, ends = tokens.starts, tokens.ends
    start = 0
    punctuated = False  # whether the last token of this sentence that is not a closer ends one
    for i in range(len(tokens) - 1):
        token = text[starts[i] : ends[i]]
        if token not in _CLOSERS:
            punctuated = token in _SENTENCE_END
        gap = text[ends[i] : starts[i + 1]]
        if gap and (punctuated or _BLANK_LINE.search(gap)):
            yield start, i + 1
            start = i + 1
            punctuated = False
    yield start, len(tokens)


def _sentence_packs(text: str, tokens: _Tokens, spec: ChunkSettings) -> Iterator[_Span]:
    """Whole sentences packed up to chunk_tokens; the next pack starts with the longest proper tail of
    the previous one's sentences that fits overlap_tokens. Sentences are consecutive, so a pack's size
    is its last stop minus its first start, and each sentence enters and leaves a pack once."""
    pack: deque[_Span] = deque()

    def size() -> int:
        return pack[-1][1] - pack[0][0]

    for sentence in _sentences(text, tokens):
        length = sentence[1] - sentence[0]
        if length > spec.chunk_tokens:
            if pack:
                yield pack[0][0], pack[-1][1]
                pack.clear()
            yield from _windows(sentence[0], sentence[1], spec)
            continue
        if pack and size() + length > spec.chunk_tokens:
            yield pack[0][0], pack[-1][1]
            pack.popleft()
            while pack and (size() > spec.overlap_tokens or size() + length > spec.chunk_tokens):
                pack.popleft()
        pack.append(sentence)
    if pack:
        yield pack[0][0], pack[-1][1]
