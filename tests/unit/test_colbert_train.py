"""`ragfleet train colbert` on a tiny checkpoint and a dozen passages (MiniLM mines candidates, offline)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file
from test_colbert_encoder import IDS, make_tiny_checkpoint
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer
from typer.testing import CliRunner

from services.cli import app
from services.retriever.colbert import train
from services.retriever.colbert.encoder import ColbertEncoder
from services.retriever.colbert.train import (
    DistillationInputs,
    Trained,
    beir_pairs,
    build_training_set,
    distillation_loss,
    pseudo_query_pairs,
    train_colbert,
)
from services.runtime.model_errors import ParamError

DOCS = {
    "d0": "cancer tumour growth in mouse cells",
    "d1": "vaccine for the virus in human patients",
    "d2": "heart and blood risk with the drug",
    "d3": "brain gene study in the mouse",
    "d4": "paris tower and the river city",
    "d5": "music and song in the city",
    "d6": "football goal in the rain",
    "d7": "weather and rain in paris",
    "d8": "dna and rna of the cell",
    "d9": "protein genes in human cells",
    "d10": "therapy effect on tumour patients",
    "d11": "drug increase risk of heart",
}
QUERIES = {
    "q0": "tumour growth",
    "q1": "virus vaccine",
    "q2": "football goal",
    "q3": "song music",
    "q4": "rna dna",
    "q5": "heart drug risk",
    "q6": "paris weather",
}
TRAIN_QRELS = {"q0": ["d0"], "q1": ["d1"], "q2": ["d6"], "q3": ["d5"], "q4": ["d8"], "q5": ["d11", "d2"]}
TINY = {"split": "train", "candidates": 6, "batch_size": 3, "lr": 0.05, "progress": False}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine thread hand-offs cost 20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "ckpt"
    make_tiny_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def beir_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("beir")
    with open(folder / "corpus.jsonl", "w") as f:
        for doc_id, text in DOCS.items():
            f.write(json.dumps({"_id": doc_id, "title": "", "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for qid, text in QUERIES.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (folder / "qrels").mkdir()
    lines = [f"{q}\t{d}\t1" for q, docs in TRAIN_QRELS.items() for d in docs]
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(lines) + "\n")
    return folder


def _field(call):
    with pytest.raises(ParamError) as caught:
        call()
    return caught.value.field


def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path, tiny_base, beir_folder):
    out = tmp_path / "model"
    metrics = train_colbert(out=out, beir=beir_folder, base=tiny_base, steps=30, checkpoint_every=10, **TINY)
    assert metrics["steps"] == 30 and metrics["start_step"] == 0 and metrics["examples"] == len(TRAIN_QRELS)
    assert metrics["loss_curve"][-1][0] == 30 and metrics["final_loss"] < metrics["initial_loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["inputs.safetensors", "step-00000030"]

    base = ColbertEncoder.load(tiny_base)
    trained = ColbertEncoder.load(str(out))
    assert trained.dim == base.dim and not torch.equal(trained.projection, base.projection)
    assert json.loads((out / "artifact.metadata").read_text())["ragfleet_training"]["steps"] == 30
    # The loss over every example, before and after, with the same data the run used.
    data = build_training_set(beir_pairs(beir_folder, "train"), candidates=6, progress=False)
    inputs = DistillationInputs.compute(base, data, len(base.bert.encoder.layer), progress=False)
    everything = np.arange(len(data.queries))
    with torch.no_grad():
        before = distillation_loss(Trained([], base.projection), inputs, everything, 0.05, 1.0)
        after = distillation_loss(Trained([], trained.projection), inputs, everything, 0.05, 1.0)
    assert after < 0.8 * before


def test_fine_tuning_the_top_layer_trains_it_from_the_frozen_layers_outputs(tmp_path, tiny_base, beir_folder):
    base = ColbertEncoder.load(tiny_base)
    layers = len(base.bert.encoder.layer)
    data = build_training_set(beir_pairs(beir_folder, "train"), candidates=6, progress=False)
    # The top layer on the kept outputs of the layers below scores exactly as the whole encoder does.
    below = DistillationInputs.compute(base, data, layers - 1, progress=False)
    top = DistillationInputs.compute(base, data, layers, progress=False)
    everything = np.arange(len(data.queries))
    with torch.no_grad():
        whole = distillation_loss(Trained([], base.projection), top, everything, 0.05, 1.0)
        split = distillation_loss(
            Trained(base.bert.encoder.layer[-1:], base.projection).eval(), below, everything, 0.05, 1.0
        )
    assert split == pytest.approx(float(whole), rel=1e-4)

    out = tmp_path / "tuned"
    settings = {**TINY, "train_layers": 1, "layer_lr": 1e-3}
    metrics = train_colbert(out=out, beir=beir_folder, base=tiny_base, steps=20, **settings)
    assert metrics["final_loss"] < metrics["initial_loss"]
    tuned = load_file(out / "model.safetensors")
    original = load_file(Path(tiny_base) / "model.safetensors")
    changed = {k for k in original if not torch.equal(original[k], tuned[k])}
    assert "linear.weight" in changed and any(
        k.startswith(f"bert.encoder.layer.{layers - 1}.") for k in changed
    )
    assert all(k.startswith((f"bert.encoder.layer.{layers - 1}.", "linear.")) for k in changed)
    assert _field(lambda: train_colbert(out=tmp_path / "x", beir=beir_folder, base=tiny_base, **TINY,
                                        train_layers=layers + 1)) == "train_layers"  # fmt: skip


def test_resume_continues_at_the_last_checkpoint_and_ends_where_an_uninterrupted_run_does(
    tmp_path, tiny_base, beir_folder, monkeypatch
):
    whole = train_colbert(
        out=tmp_path / "a", beir=beir_folder, base=tiny_base, steps=8, checkpoint_every=3, **TINY
    )
    first = train_colbert(
        out=tmp_path / "b", beir=beir_folder, base=tiny_base, steps=5, checkpoint_every=3, **TINY
    )
    assert (tmp_path / "b" / "checkpoints" / "step-00000005").is_dir()
    # The resumed run reads the saved inputs instead of running the teacher and the transformer again.
    monkeypatch.setattr(train, "build_training_set", lambda *a, **kw: pytest.fail("inputs recomputed"))
    rest = train_colbert(
        out=tmp_path / "b", beir=beir_folder, base=tiny_base, steps=8, checkpoint_every=3, resume=True, **TINY
    )
    assert (first["steps"], rest["start_step"], rest["steps"]) == (5, 5, 8)
    a = load_file(tmp_path / "a" / "model.safetensors")["linear.weight"]
    b = load_file(tmp_path / "b" / "model.safetensors")["linear.weight"]
    assert torch.equal(a, b)
    assert whole["final_loss"] == rest["final_loss"]

    # A second run into the same folder must say whether it resumes; a resumed run keeps its settings.
    again = lambda **kw: train_colbert(  # noqa: E731
        out=tmp_path / "b", beir=beir_folder, base=tiny_base, steps=9, **{**TINY, **kw}
    )
    assert _field(again)
    assert _field(lambda: again(resume=True, lr=0.01))


def test_pseudo_queries_from_a_corpus_without_queries(tmp_path, tiny_base):
    passages = [
        "the cancer study in mouse cells. the tumour growth of the mouse. the effect of the drug",
        "the virus vaccine for human patients. the blood risk in patients with the virus",
        "music and song in the city. football goal in the rain and the weather",
        "one sentence only about the dna of the cell",
        "the heart drug risk study. the increase of risk in heart patients",
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(passages)))
    pairs = pseudo_query_pairs(path, seed=0)
    assert len(pairs.queries) == 4 and pairs.searchable == len(passages)
    for query, (positive,), source in zip(pairs.queries, pairs.positives, pairs.exclude, strict=True):
        rest = pairs.texts[positive]
        assert query in passages[source] and query not in rest and len(query.split()) >= 4
        assert len(rest) + 1 + len(query) == len(passages[source])
    data = build_training_set(pairs, candidates=4, progress=False)
    for row, is_positive, source in zip(data.candidates, data.positives, pairs.exclude, strict=True):
        assert source not in row and is_positive.tolist() == [True, False, False, False]

    metrics = train_colbert(
        out=tmp_path / "m", corpus=path, base=tiny_base, steps=3, **{**TINY, "candidates": 4}
    )
    assert metrics["examples"] == 4
    assert ColbertEncoder.load(str(tmp_path / "m")).encode_documents(["the cell"])[0].shape == (5, 16)


def test_cross_encoder_teacher_scores_candidates_with_its_logits(tmp_path, beir_folder):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(IDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=1,
    )
    model = BertForSequenceClassification(config).eval()
    tokenizer = BertTokenizer(vocab=IDS)
    model.save_pretrained(tmp_path / "ce")
    tokenizer.save_pretrained(tmp_path / "ce")
    pairs = beir_pairs(beir_folder, "train")
    data = build_training_set(pairs, teacher=f"cross-encoder:{tmp_path / 'ce'}", candidates=5, progress=False)
    for q, row in enumerate(data.candidates):
        batch = tokenizer(
            [pairs.queries[q]] * len(row), [pairs.texts[t] for t in row], return_tensors="pt", padding=True
        )
        with torch.no_grad():
            expected = model(**batch).logits[:, 0].numpy()
        np.testing.assert_allclose(data.teacher[q], expected, atol=1e-5)


def test_bad_arguments_are_rejected_before_any_work(tmp_path, beir_folder):
    both = lambda: train_colbert(out=tmp_path / "x", beir=beir_folder, corpus=beir_folder)  # noqa: E731
    assert _field(both)
    assert _field(lambda: train_colbert(out=tmp_path / "x", beir=beir_folder, steps=0)) == "steps"
    assert _field(lambda: train_colbert(out=tmp_path / "x", beir=beir_folder, teacher="bm25")) == "teacher"
    assert not (tmp_path / "x").exists()


def test_cli_trains_and_reports_metrics(tmp_path, tiny_base, beir_folder):
    out = tmp_path / "cli"
    args = ["train", "colbert", "--beir", str(beir_folder), "--out", str(out), "--base", tiny_base]
    result = CliRunner().invoke(app, [*args, "--steps", "2", "--candidates", "4", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert metrics["steps"] == 2 and (out / "model.safetensors").is_file()
    failed = CliRunner().invoke(app, ["train", "colbert", "--out", str(out)])
    assert failed.exit_code == 1 and "beir" in failed.output
