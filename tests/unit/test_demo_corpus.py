"""The demo corpus: deterministic, well-formed, and every demo question answerable from its document."""

from __future__ import annotations

import pytest

from ragfleet.v1 import common_pb2
from services.demo.corpus import demo_documents, demo_questions, generated_archipelago
from services.gateway.chunking import ChunkSettings, chunk_document
from services.runtime.settings import Limits


def test_documents_are_deterministic_and_well_formed() -> None:
    documents = demo_documents()
    assert documents == demo_documents()
    assert 100 <= len(documents) <= 200
    assert len({d["id"] for d in documents}) == len(documents)
    for document in documents:
        assert set(document) == {"id", "title", "text", "metadata"}
        assert document["id"] and document["title"] and document["text"]
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in document["metadata"].items())
        assert document["metadata"]["topic"] in {"overview", "economy", "history", "lighthouse"}


def test_callers_get_fresh_lists() -> None:
    documents = demo_documents()
    documents[0]["text"] = "changed"
    documents[1]["metadata"]["island"] = "changed"
    assert demo_documents()[0]["text"] != "changed"
    assert demo_documents()[1]["metadata"]["island"] != "changed"


def test_generated_names_are_unique() -> None:
    overviews = [d for d in demo_documents() if d["metadata"]["topic"] == "overview"]
    islands = [d["metadata"]["island"] for d in overviews]
    capitals = [d["text"].split("Its capital is ")[1].split(",")[0] for d in overviews]
    assert len(set(islands)) == len(islands)
    assert len(set(capitals)) == len(capitals)
    assert not set(islands) & set(capitals)


def test_questions_are_answered_by_their_document() -> None:
    questions = demo_questions()
    assert questions == demo_questions()
    assert 6 <= len(questions) <= 12
    texts = {d["id"]: d["text"] for d in demo_documents()}
    for question in questions:
        assert set(question) == {"question", "answer", "doc_id"}
        assert question["answer"] in texts[question["doc_id"]]
        assert question["answer"].lower() not in question["question"].lower()
        assert question["question"].endswith("?")


def test_questions_are_not_copied_from_their_document() -> None:
    texts = {d["id"]: d["text"].lower() for d in demo_documents()}
    for question in demo_questions():
        words = question["question"].lower().rstrip("?").split()
        trigrams = {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}
        assert not any(trigram in texts[question["doc_id"]] for trigram in trigrams)


def test_unique_facts_appear_in_one_document_only() -> None:
    documents = demo_documents()
    for question in demo_questions():
        if question["answer"][0].isupper() and " " in question["answer"]:  # a person's name
            holders = [d["id"] for d in documents if question["answer"] in d["text"]]
            assert holders == [question["doc_id"]]


def test_the_corpus_chunks_into_passages() -> None:
    spec = ChunkSettings(chunk_tokens=200, overlap_tokens=40)
    for document in demo_documents():
        passages = chunk_document(common_pb2.Document(**document), spec, Limits())
        assert [p.id for p in passages] == [f"{document['id']}#0"]


def test_generated_archipelagos_share_no_names_with_the_demo() -> None:
    demo_words = {w for d in demo_documents() for w in d["text"].split() if w[:1].isupper()}
    documents, questions = generated_archipelago(1)
    assert (documents, questions) == generated_archipelago(1)
    assert len(documents) == len(demo_documents())
    assert all(d["id"].startswith("a1-") for d in documents)
    assert not {d["metadata"]["island"] for d in documents} & demo_words
    texts = {d["id"]: d["text"] for d in documents}
    for question in questions:
        assert question["answer"] in texts[question["doc_id"]]
    assert {d["id"] for d in generated_archipelago(2)[0]}.isdisjoint(texts)
    # Every demo question's wording is asked about every generated island.
    island_of = {d["id"]: d["metadata"]["island"] for d in demo_documents()}
    asked = {q["question"] for q in questions}
    for demo in demo_questions():
        template = demo["question"].replace(island_of[demo["doc_id"]], "{}")
        assert all(template.format(d["metadata"]["island"]) in asked for d in documents)
    with pytest.raises(ValueError, match="^n: "):
        generated_archipelago(0)
