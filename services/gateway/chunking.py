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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ragfleet.v1 import common_pb2
from services.runtime.errors import invalid_argument
from services.runtime.settings import GatewaySettings

_TOKEN = re.compile(r"\w+|[^\w\s]")
_SENTENCE_END = frozenset(".!?")
_CLOSERS = frozenset("\"')]}\u201d\u2019")
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")

# A token range [start, stop) over a document's token list.
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
    def from_spec(cls, spec: common_pb2.ChunkingSpec, defaults: GatewaySettings) -> ChunkSettings:
        """The spec with the server's defaults in place of its zero fields.

        When a spec sets ``chunk_tokens`` but not ``overlap_tokens``, the default overlap is capped at
        a fifth of the requested window, so asking for small windows alone never fails validation.
        """
        chunk_tokens = spec.chunk_tokens or defaults.chunk_tokens
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


def chunk_document(doc: common_pb2.Document, spec: ChunkSettings) -> list[common_pb2.Passage]:
    """The passages of one document, in order. The document's text must be non-empty; a text
    without tokens (only whitespace) becomes one passage holding it as is."""
    assert doc.text, "documents are validated to have text before chunking"
    text = doc.text
    tokens = [match.span() for match in _TOKEN.finditer(text)]
    if spec.whole_documents or not tokens:
        slices = [(0, len(text))]
    else:
        spans = _sentence_packs(text, tokens, spec) if spec.sentence_aware else _windows(0, len(tokens), spec)
        slices = [(tokens[start][0], tokens[stop - 1][1]) for start, stop in spans]
    return [_passage(doc, position, text[begin:end]) for position, (begin, end) in enumerate(slices)]


def _passage(doc: common_pb2.Document, position: int, text: str) -> common_pb2.Passage:
    passage = common_pb2.Passage(
        id=f"{doc.id}#{position}", doc_id=doc.id, position=position, title=doc.title, text=text
    )
    passage.metadata.update(doc.metadata)
    return passage


def _windows(start: int, stop: int, spec: ChunkSettings) -> list[_Span]:
    """Fixed windows over tokens [start, stop); the last one ends at ``stop``."""
    step = spec.chunk_tokens - spec.overlap_tokens
    spans: list[_Span] = []
    begin = start
    while True:
        end = min(begin + spec.chunk_tokens, stop)
        spans.append((begin, end))
        if end == stop:
            return spans
        begin += step


def _sentences(text: str, tokens: list[tuple[int, int]]) -> list[_Span]:
    """Token ranges of the sentences of ``text``.

    Tokens cover every non-space character, so the gap between two tokens is whitespace or nothing.
    """
    sentences: list[_Span] = []
    start = 0
    for i in range(len(tokens) - 1):
        gap = text[tokens[i][1] : tokens[i + 1][0]]
        if gap and (_BLANK_LINE.search(gap) or _ends_sentence(text, tokens, start, i)):
            sentences.append((start, i + 1))
            start = i + 1
    sentences.append((start, len(tokens)))
    return sentences


def _ends_sentence(text: str, tokens: list[tuple[int, int]], start: int, i: int) -> bool:
    """Whether tokens[start..i] end with sentence punctuation, possibly followed by closers."""
    while i > start and text[tokens[i][0] : tokens[i][1]] in _CLOSERS:
        i -= 1
    return text[tokens[i][0] : tokens[i][1]] in _SENTENCE_END


def _sentence_packs(text: str, tokens: list[tuple[int, int]], spec: ChunkSettings) -> list[_Span]:
    """Whole sentences packed up to chunk_tokens, with whole-sentence overlap up to overlap_tokens."""
    packs: list[_Span] = []
    current: list[_Span] = []

    def size(sentences: list[_Span]) -> int:
        return sum(stop - start for start, stop in sentences)

    for sentence in _sentences(text, tokens):
        length = sentence[1] - sentence[0]
        if length > spec.chunk_tokens:
            if current:
                packs.append((current[0][0], current[-1][1]))
                current = []
            packs.extend(_windows(sentence[0], sentence[1], spec))
            continue
        if current and size(current) + length > spec.chunk_tokens:
            packs.append((current[0][0], current[-1][1]))
            current = _overlap_tail(current, spec.overlap_tokens)
            while current and size(current) + length > spec.chunk_tokens:
                current.pop(0)
        current.append(sentence)
    if current:
        packs.append((current[0][0], current[-1][1]))
    return packs


def _overlap_tail(sentences: list[_Span], overlap_tokens: int) -> list[_Span]:
    """The longest proper suffix of ``sentences`` with at most ``overlap_tokens`` tokens."""
    tail: list[_Span] = []
    total = 0
    for sentence in reversed(sentences[1:]):
        total += sentence[1] - sentence[0]
        if total > overlap_tokens:
            break
        tail.insert(0, sentence)
    return tail
