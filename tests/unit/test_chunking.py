"""Chunking in the gateway: passage ids and fields, fixed windows, sentence packing, validation,
linear time and the limits on what one document may be cut into."""

from __future__ import annotations

import random
import re
import time

import grpc
import pytest

from ragfleet.v1 import common_pb2
from services.gateway.chunking import ChunkSettings, chunk_document
from services.runtime.errors import ServiceError
from services.runtime.settings import GatewaySettings, Limits

TOKEN = re.compile(r"\w+|[^\w\s]")
LIMITS = Limits()


def doc(text: str, doc_id: str = "d1", title: str = "A title", **metadata: str) -> common_pb2.Document:
    return common_pb2.Document(id=doc_id, title=title, text=text, metadata=metadata)


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def texts(passages: list[common_pb2.Passage]) -> list[str]:
    return [p.text for p in passages]


def test_passage_fields_follow_the_document() -> None:
    passages = chunk_document(doc(words(10), doc_id="doc-7", lang="en"), ChunkSettings(4, 1), LIMITS)
    assert [p.id for p in passages] == ["doc-7#0", "doc-7#1", "doc-7#2"]
    assert [p.position for p in passages] == [0, 1, 2]
    for p in passages:
        assert p.doc_id == "doc-7"
        assert p.title == "A title"
        assert dict(p.metadata) == {"lang": "en"}


def test_fixed_windows_overlap_and_end_at_the_last_token() -> None:
    assert texts(chunk_document(doc(words(10)), ChunkSettings(4, 1), LIMITS)) == [
        "w0 w1 w2 w3",
        "w3 w4 w5 w6",
        "w6 w7 w8 w9",
    ]
    assert texts(chunk_document(doc(words(11)), ChunkSettings(4, 1), LIMITS)) == [
        "w0 w1 w2 w3",
        "w3 w4 w5 w6",
        "w6 w7 w8 w9",
        "w9 w10",
    ]


def test_no_overlap_partitions_the_tokens() -> None:
    assert texts(chunk_document(doc(words(7)), ChunkSettings(3, 0), LIMITS)) == ["w0 w1 w2", "w3 w4 w5", "w6"]


def test_a_short_document_is_one_passage_without_outer_whitespace() -> None:
    passages = chunk_document(doc("  Hello, world!\n"), ChunkSettings(200, 40), LIMITS)
    assert texts(passages) == ["Hello, world!"]


def test_punctuation_marks_are_tokens_and_inner_whitespace_is_kept() -> None:
    text = "Hello,   world!\n\tBye."
    # Tokens: Hello , world ! Bye .
    assert texts(chunk_document(doc(text), ChunkSettings(2, 0), LIMITS)) == ["Hello,", "world!", "Bye."]
    assert texts(chunk_document(doc(text), ChunkSettings(4, 0), LIMITS)) == ["Hello,   world!", "Bye."]
    assert texts(chunk_document(doc(text), ChunkSettings(6, 0), LIMITS)) == [text]


def test_unicode_words_are_single_tokens() -> None:
    passages = chunk_document(doc("Café naïve façade"), ChunkSettings(1, 0), LIMITS)
    assert texts(passages) == ["Café", "naïve", "façade"]


def test_whole_documents_keep_the_text_exactly() -> None:
    text = "  " + words(500) + "\n"
    passages = chunk_document(doc(text), ChunkSettings(10, 2, whole_documents=True), LIMITS)
    assert len(passages) == 1
    assert passages[0].text == text
    assert passages[0].id == "d1#0"


def test_sentence_aware_packs_whole_sentences() -> None:
    text = "One two three. Four five six. Seven eight nine. Ten."
    # Sentences have 4, 4, 4 and 2 tokens.
    assert texts(chunk_document(doc(text), ChunkSettings(9, 0, sentence_aware=True), LIMITS)) == [
        "One two three. Four five six.",
        "Seven eight nine. Ten.",
    ]


def test_sentence_aware_overlap_repeats_whole_trailing_sentences() -> None:
    text = "A b. C d. E f. G h. I j."
    # Five sentences of 3 tokens; windows of 9 hold three, an overlap of 3 repeats one.
    assert texts(chunk_document(doc(text), ChunkSettings(9, 3, sentence_aware=True), LIMITS)) == [
        "A b. C d. E f.",
        "E f. G h. I j.",
    ]
    # An overlap smaller than the last sentence repeats nothing.
    assert texts(chunk_document(doc(text), ChunkSettings(9, 2, sentence_aware=True), LIMITS)) == [
        "A b. C d. E f.",
        "G h. I j.",
    ]


def test_sentence_aware_splits_a_long_sentence_by_windows() -> None:
    text = "Short one. " + words(7) + ". Tail here."
    passages = texts(chunk_document(doc(text), ChunkSettings(4, 1, sentence_aware=True), LIMITS))
    assert passages == ["Short one.", "w0 w1 w2 w3", "w3 w4 w5 w6", "w6.", "Tail here."]


def test_sentence_boundaries_handle_quotes_blank_lines_and_decimals() -> None:
    text = 'He said "stop." Then left\n\nNew paragraph no stop\ngoes on. Pi is 3.14 here.'
    # Sentences of 6, 2, 7 and 7 tokens: none of two neighbours fit together in 7.
    assert texts(chunk_document(doc(text), ChunkSettings(7, 0, sentence_aware=True), LIMITS)) == [
        'He said "stop."',
        "Then left",
        "New paragraph no stop\ngoes on.",
        "Pi is 3.14 here.",
    ]


def test_passages_are_exact_slices_that_cover_every_token() -> None:
    rng = random.Random(7)
    vocabulary = [f"tok{i}" for i in range(5000)]
    for trial in range(60):
        pieces = []
        for _ in range(rng.randint(1, 120)):
            pieces.append(rng.choice(vocabulary))
            pieces.append(rng.choice([" ", "  ", "\n", ". ", ", ", "!\n\n", "? "]))
        text = "".join(pieces)
        chunk = rng.randint(1, 30)
        spec = ChunkSettings(chunk, rng.randint(0, chunk - 1), sentence_aware=bool(trial % 2))
        passages = chunk_document(doc(text), spec, LIMITS)
        covered: set[int] = set()
        offset = -1
        for passage in passages:
            offset = text.find(passage.text, offset + 1)
            assert offset >= 0, "a passage is not a slice of the text"
            tokens = [(offset + m.start(), offset + m.end()) for m in TOKEN.finditer(passage.text)]
            assert 1 <= len(tokens) <= spec.chunk_tokens
            covered.update(tokens)
        assert covered == {m.span() for m in TOKEN.finditer(text)}


@pytest.mark.parametrize(
    ("chunk", "overlap", "field"),
    [
        (0, 0, "spec.chunking.chunk_tokens"),
        (-5, 0, "spec.chunking.chunk_tokens"),
        (10, 10, "spec.chunking.overlap_tokens"),
        (10, 11, "spec.chunking.overlap_tokens"),
        (10, -1, "spec.chunking.overlap_tokens"),
    ],
)
def test_invalid_settings_name_the_field(chunk: int, overlap: int, field: str) -> None:
    with pytest.raises(ServiceError) as caught:
        ChunkSettings(chunk, overlap)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith(field + ":")


def test_from_spec_uses_defaults_for_zero_fields() -> None:
    defaults = GatewaySettings(chunk_tokens=200, overlap_tokens=40, sentence_aware=True)
    plain = ChunkSettings.from_spec(common_pb2.ChunkingSpec(), defaults, LIMITS)
    assert plain == ChunkSettings(200, 40, True, False)
    explicit = common_pb2.ChunkingSpec(chunk_tokens=50, overlap_tokens=10, whole_documents=True)
    assert ChunkSettings.from_spec(explicit, defaults, LIMITS) == ChunkSettings(50, 10, True, True)


def test_from_spec_caps_the_default_overlap_for_a_small_window() -> None:
    defaults = GatewaySettings(chunk_tokens=200, overlap_tokens=40)
    for chunk_tokens, overlap_tokens in [(30, 6), (400, 40)]:
        spec = common_pb2.ChunkingSpec(chunk_tokens=chunk_tokens)
        assert ChunkSettings.from_spec(spec, defaults, LIMITS).overlap_tokens == overlap_tokens


def test_from_spec_rejects_an_overlap_as_long_as_the_window() -> None:
    spec = common_pb2.ChunkingSpec(chunk_tokens=20, overlap_tokens=20)
    with pytest.raises(ServiceError, match="spec.chunking.overlap_tokens"):
        ChunkSettings.from_spec(spec, GatewaySettings(), LIMITS)


def test_from_spec_bounds_the_window_by_the_limit() -> None:
    limits = Limits(max_chunk_tokens=512)
    spec = common_pb2.ChunkingSpec(chunk_tokens=512)
    assert ChunkSettings.from_spec(spec, GatewaySettings(), limits).chunk_tokens == 512
    spec = common_pb2.ChunkingSpec(chunk_tokens=2**31 - 1)
    with pytest.raises(ServiceError) as caught:
        ChunkSettings.from_spec(spec, GatewaySettings(), limits)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith("spec.chunking.chunk_tokens:")
    assert "limits.max_chunk_tokens" in caught.value.message


def best_of_three(text: str, spec: ChunkSettings) -> float:
    """CPU seconds (not wall time, which other processes stretch) of the fastest of three runs."""
    limits = Limits(max_passages_per_document=10**6, max_chunked_document_bytes=2**40)
    times = []
    for _ in range(3):
        start = time.process_time()
        chunk_document(doc(text), spec, limits)
        times.append(time.process_time() - start)
    return min(times)


@pytest.mark.parametrize(
    ("unit", "spec"),
    [
        # One window holds the whole document: every sentence joins the same pack.
        ("a. ", ChunkSettings(2**31 - 1, 0, sentence_aware=True)),
        # Closing brackets are skipped back over to find a sentence's end.
        (") ", ChunkSettings(2**31 - 1, 0, sentence_aware=True)),
        # The overlap repeats all but one sentence of every pack.
        ("a. ", ChunkSettings(40, 39, sentence_aware=True)),
    ],
)
def test_chunking_time_grows_linearly_with_the_document(unit: str, spec: ChunkSettings) -> None:
    # Four times the text takes about four times as long; quadratic work would take sixteen.
    small = best_of_three(unit * 16_000, spec)
    large = best_of_three(unit * 64_000, spec)
    assert large < 8 * max(small, 0.01), (small, large)


def test_a_document_cut_into_too_many_passages_is_refused() -> None:
    limits = Limits(max_passages_per_document=10)
    assert len(chunk_document(doc(words(10)), ChunkSettings(1, 0), limits)) == 10
    with pytest.raises(ServiceError) as caught:
        chunk_document(doc(words(11)), ChunkSettings(1, 0), limits)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limits.max_passages_per_document" in caught.value.message and "'d1'" in caught.value.message


def test_title_and_metadata_copied_into_every_passage_count_against_the_limit() -> None:
    heavy = doc(words(100), title="t" * 1000, blob="m" * 1000)
    limits = Limits(max_chunked_document_bytes=150_000)
    # 50 passages of about 2 KB each fit; 100 of them do not.
    assert len(chunk_document(heavy, ChunkSettings(2, 0), limits)) == 50
    with pytest.raises(ServiceError) as caught:
        chunk_document(heavy, ChunkSettings(1, 0), limits)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limits.max_chunked_document_bytes" in caught.value.message


def test_the_byte_limit_counts_utf8_bytes() -> None:
    # Ten words of 50 characters, 100 UTF-8 bytes each: counting characters would be 500 bytes short.
    accents = doc(" ".join(["é" * 50] * 10), title="")
    passages = chunk_document(accents, ChunkSettings(1, 0), LIMITS)
    size = sum(p.ByteSize() for p in passages)
    # The check may overcount a few bytes a passage (its id's digits, the field prefixes), no more.
    assert chunk_document(accents, ChunkSettings(1, 0), Limits(max_chunked_document_bytes=size + 80))
    with pytest.raises(ServiceError, match="max_chunked_document_bytes"):
        chunk_document(accents, ChunkSettings(1, 0), Limits(max_chunked_document_bytes=size - 100))
