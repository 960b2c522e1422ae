"""services.datasets.pairs: judged queries from BEIR qrels, pseudo-queries (titles or inverse-cloze
sentences), seeded sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.datasets import pairs
from services.datasets.collections import load_beir
from services.demo.corpus import demo_documents


@pytest.fixture
def beir_dir(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    (root / "qrels").mkdir(parents=True)
    corpus = [
        {"_id": "d1", "title": "Alpha", "text": "first"},
        {"_id": "d2", "text": "second"},
        {"_id": "d3", "text": "third"},
    ]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    queries = [{"_id": q, "text": f"query {q}"} for q in ("q1", "q2", "q3")]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    # q1: d3 then d1 relevant, d2 judged irrelevant; q2: only a document the corpus lacks; q3: none relevant.
    qrels = "q1\td3\t1\nq1\td2\t0\nq1\td1\t2\nq2\tgone\t1\nq3\td2\t0\n"
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return root


def test_judged_queries_keep_those_with_a_relevant_document_in_the_corpus(beir_dir: Path) -> None:
    (query,) = pairs.judged_queries(load_beir(beir_dir, "train"))
    assert query == pairs.JudgedQuery("query q1", ["d3", "d1"], frozenset({"d1", "d2", "d3"}))


def test_beir_queries_give_positive_texts_and_exclude_every_judged_document(beir_dir: Path) -> None:
    corpus, queries = pairs.beir_queries(beir_dir, "train")
    assert list(corpus) == ["d1", "d2", "d3"]
    judged, relevant = frozenset({"d1", "d2", "d3"}), frozenset({"d1", "d3"})
    assert queries == [pairs.Query("query q1", ["third", "Alpha first"], judged, relevant)]


def test_cloze_corpus_cuts_each_querys_sentence_out_of_its_document() -> None:
    documents = {d["id"]: d for d in demo_documents()[:24]}
    cut, queries = pairs.cloze_corpus(documents, seed=0)
    assert queries and list(cut) == list(documents)
    for query in queries:
        (source,) = query.exclude
        (positive,) = query.positives
        assert query.relevant == query.exclude
        assert query.text in documents[source]["text"] and query.text not in positive
        assert len(query.text.split()) >= pairs.MIN_QUERY_WORDS
        assert positive == pairs.document_text(documents[source]["title"], cut[source]["text"])
        assert query.text not in cut[source]["text"] and cut[source]["title"] == documents[source]["title"]
    untouched = set(documents) - {next(iter(q.exclude)) for q in queries}
    assert all(cut[d] == documents[d] for d in untouched)


def test_cloze_corpus_cuts_a_long_enough_title_out_and_falls_back_to_a_sentence() -> None:
    documents = {
        "t1": {"id": "t1", "title": "Lighthouses of the northern islands", "text": "One line. Two lines."},
        "s1": {"id": "s1", "title": "Short title", "text": "A sentence of enough words. Another one here."},
        "t2": {"id": "t2", "title": "Tides and the harbour of Punnour", "text": "Single sentence text."},
        "e1": {"id": "e1", "title": "A title over no text", "text": ""},
    }
    cut, queries = pairs.cloze_corpus(documents, seed=0)
    assert [next(iter(q.relevant)) for q in queries] == ["t1", "s1", "t2"]
    t1, s1, t2 = queries
    assert (t1.text, t1.positives) == ("Lighthouses of the northern islands", ["One line. Two lines."])
    assert cut["t1"] == {**documents["t1"], "title": ""} and cut["t2"]["title"] == ""
    assert s1.text in documents["s1"]["text"] and s1.text not in cut["s1"]["text"]
    assert s1.positives == [pairs.document_text("Short title", cut["s1"]["text"])]
    assert cut["e1"] == documents["e1"]


def test_inverse_cloze_cuts_one_long_enough_sentence_from_texts_of_two_or_more() -> None:
    texts = [
        "One sentence only, with many words in it.",
        "Too short. Also short! This one has enough words.",
        "The first sentence is long enough. The second sentence is long enough too.",
        "Tiny. Small.",
    ]
    found = pairs.inverse_cloze(texts, seed=0)
    assert [c.source for c in found] == [1, 2]
    assert found[0] == pairs.Cloze(1, "This one has enough words.", "Too short. Also short!")
    for source, query, rest in found:
        assert len(rest) + 1 + len(query) == len(texts[source]) and query not in rest
    assert pairs.inverse_cloze(texts, seed=0) == found


def test_sample_is_a_seeded_choice_kept_in_order() -> None:
    items = list("abcdefghij")
    assert pairs.sample(items, None, seed=0) == items and pairs.sample(items, 10, seed=0) == items
    picked = pairs.sample(items, 4, seed=1)
    assert len(picked) == 4 and picked == sorted(picked) and set(picked) <= set(items)
    assert pairs.sample(items, 4, seed=1) == picked
    assert any(pairs.sample(items, 4, seed=s) != picked for s in range(2, 6))


def test_read_corpus_and_document_text(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    rows = [{"id": "a", "title": "T", "text": "x"}, {"id": "b", "text": "y"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    corpus = pairs.read_corpus(path)
    assert corpus == {"a": {"id": "a", "title": "T", "text": "x"}, "b": {"id": "b", "title": "", "text": "y"}}
    assert [pairs.document_text(d["title"], d["text"]) for d in corpus.values()] == ["T x", "y"]
