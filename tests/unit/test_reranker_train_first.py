"""`ragfleet train first` on a tiny GPT-2 and a tiny corpus, with a stand-in for the fleet's search and a
tiny cross-encoder as teacher: the windows and their target rankings, the weighted RankNet, the loss
dropping, a resumed run ending with the weights of an uninterrupted one, the published model serving in
the Reranker; and the default student, MiniLM as a causal LM."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from reranker_fixtures import FakeFleet, make_tiny_causal_lm, make_tiny_cross_encoder
from safetensors.torch import load_file

from ragfleet.v1 import common_pb2, reranker_pb2
from services.datasets import mining
from services.demo.corpus import demo_documents
from services.reranker import train_first
from services.reranker.first import LABELS, FirstReranker
from services.reranker.service import RerankerService
from services.runtime import training
from services.runtime.context import CallContext
from services.runtime.model_errors import ParamError
from services.runtime.settings import RerankerSettings, Settings

DOCUMENTS = demo_documents()[:24]
TINY = {"window": 4, "orders": 2, "passage_tokens": 16, "batch_size": 1, "lr": 2e-2, "warmup": 2}
TINY |= {"mine_depth": 8}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "base": make_tiny_causal_lm(root / "gpt2", positions=512),
        "teacher": make_tiny_cross_encoder(root / "teacher"),
    }


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    return path


def settings_of(models: dict[str, Path], **more: object) -> dict[str, object]:
    return {**TINY, "base": str(models["base"]), "teacher": f"cross-encoder:{models['teacher']}"} | more


def test_weighted_ranknet_prefers_the_target_order_and_weighs_the_top() -> None:
    ranks = torch.tensor([1, 2, 3])

    def loss(*scores: float) -> float:
        return float(train_first.weighted_ranknet(torch.tensor(scores, dtype=torch.float), ranks))

    assert loss(2, 1, 0) < loss(0, 1, 2)
    # One swapped pair each: at the top (weight 1/3) it costs more than at the bottom (1/5).
    assert loss(1, 2, 0) > loss(2, 0, 1) > loss(2, 1, 0)


def test_a_window_puts_the_positive_first_then_the_teacher_order(models: dict[str, Path]) -> None:
    reranker = FirstReranker.load(str(models["base"]), RerankerSettings(first_window=4))
    texts = ["alpha", "beta", "gamma", "delta"]  # the positive, then negatives the teacher puts 4th, 2nd, 3rd
    example = mining.Example("q", texts, [0.0, 1.0, 3.0, 2.0])
    (window,) = train_first.windows_of(reranker, [example], seed=0)
    where = {text: window.prompt.index(reranker.prompt.ids(text)[0]) for text in texts}
    shown = sorted(texts, key=where.get)
    expected = {"alpha": 1, "gamma": 2, "delta": 3, "beta": 4}
    assert window.ranks == [expected[text] for text in shown]
    best = [LABELS[k] for k in sorted(range(4), key=lambda k: window.ranks[k])]
    assert reranker.tokenizer.decode(window.answer).replace(" ", "") == "]>[".join(best).lower() + "]"
    assert window.prompt[-1] == reranker.prompt.ids("[")[0]
    # Another example is shown in another order (drawn per example), with the same targets.
    orders = {tuple(w.ranks) for w in train_first.windows_of(reranker, [example] * 6, seed=0)}
    assert len(orders) > 1
    # In all its rotations, one after another, each text takes each position once.
    rotations = train_first.windows_of(reranker, [example, example], seed=0, orders=4)
    assert rotations[0] == window and len(rotations) == 8
    for ranks in ([w.ranks for w in rotations[:4]], [w.ranks for w in rotations[4:]]):
        assert [r[1:] + r[:1] for r in ranks[:-1]] == ranks[1:]
        assert all(sorted(column) == [1, 2, 3, 4] for column in zip(*ranks))
    halves = train_first.windows_of(reranker, [example], seed=0, orders=2)
    assert [w.ranks for w in halves] == [rotations[0].ranks, rotations[2].ranks]


def test_training_lowers_the_loss_and_the_model_serves(
    tmp_path: Path, models: dict[str, Path], corpus: Path
) -> None:
    out = tmp_path / "home" / "models" / "first"
    metrics = train_first.train_first(
        FakeFleet(), out=out, corpus=corpus, steps=30, progress=False, **settings_of(models)
    )
    assert metrics["steps"] == 30 and metrics["final_loss"] < 0.7 * metrics["initial_loss"]
    record = json.loads((out / training.TRAIN_FILE).read_text())
    assert record["window"] == 4 and record["examples"] == metrics["examples"]
    assert record["windows"] == 2 * record["examples"] and record["orders"] == 2
    assert 0.0 <= record["validation"]["ndcg@10_reversed"] <= 1.0  # a listwise model's position check

    service = RerankerService(Settings(home=tmp_path / "home", reranker={"first_window": 4}))
    candidates = [
        common_pb2.ScoredPassage(passage=common_pb2.Passage(id=d["id"], title=d["title"], text=d["text"]))
        for d in DOCUMENTS[:6]
    ]
    request = reranker_pb2.RerankRequest(
        query="which protein", candidates=candidates, top_k=6, backend="first"
    )
    reply = asyncio.run(service.Rerank(request, CallContext()))
    assert reply.model_id.startswith(f"first:{out}@") and len(reply.results) == 6


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(
    tmp_path: Path, models: dict[str, Path], corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(models, steps=6, checkpoint_every=2, progress=False)
    train_first.train_first(FakeFleet(), out=tmp_path / "whole", corpus=corpus, **settings)

    real_loss, calls = train_first.first_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # in step 4 (two windows a step, one forward pass each)
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_first, "first_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_first.train_first(FakeFleet(), out=tmp_path / "resumed", corpus=corpus, **settings)
    monkeypatch.setattr(train_first, "first_loss", real_loss)
    # The mined windows and teacher scores were kept: resuming needs no fleet.
    metrics = train_first.train_first(None, out=tmp_path / "resumed", corpus=corpus, resume=True, **settings)
    assert metrics["start_step"] == 2
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.allclose(whole[k], resumed[k]) for k in whole)


def test_bad_settings_name_the_parameter(tmp_path: Path, models: dict[str, Path], corpus: Path) -> None:
    for kwargs, field in [
        ({"window": 1}, "window"),
        ({"mine_depth": 2}, "mine_depth"),
        ({"orders": 0}, "orders"),
        ({"orders": 5}, "orders"),  # more than the window's 4 rotations
        ({"teacher": "none"}, "teacher"),
        ({"corpus": None}, "beir"),
    ]:
        with pytest.raises(ParamError) as err:
            train_first.train_first(
                FakeFleet(),
                out=tmp_path / "x",
                progress=False,
                **(settings_of(models, corpus=corpus) | kwargs),
            )
        assert err.value.field == field


def test_the_default_student_is_minilm_as_a_causal_lm(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, BertModel

    from services.runtime.models import resolve_model

    model, tokenizer = train_first._student(train_first.MINILM_DECODER, window=20, passage_tokens=48)
    assert model.config.is_decoder and type(model).__name__ == "BertLMHeadModel"
    minilm = BertModel.from_pretrained(resolve_model("all-MiniLM-L6-v2"), add_pooling_layer=False)
    layer, source = (
        model.bert.encoder.layer[3].attention.self.query,
        minilm.encoder.layer[3].attention.self.query,
    )
    assert torch.equal(layer.weight, source.weight)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # Causal: a position's output does not change when later tokens do.
    model.eval()
    ids = torch.tensor([tokenizer("cells divide by mitosis", add_special_tokens=False)["input_ids"]])
    other = ids.clone()
    other[0, -1] = tokenizer.convert_tokens_to_ids("protein")
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=other).logits
    assert torch.allclose(a[0, :-1], b[0, :-1], atol=1e-5) and not torch.allclose(a[0, -1], b[0, -1])
    # Saved, it is a plain HF causal LM, and the FIRST backend cuts passages to the trained length.
    model.save_pretrained(tmp_path / "first")
    tokenizer.save_pretrained(tmp_path / "first")
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "first")).__name__ == "BertLMHeadModel"
    assert FirstReranker.load(str(tmp_path / "first"), RerankerSettings()).max_length == 48


def test_the_cli_trains_into_the_default_folder_taught_by_the_default_cross_encoder(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from services.cli import app

    seen: dict[str, object] = {}
    monkeypatch.setenv("RAGFLEET_HOME", str(tmp_path))
    monkeypatch.setattr(
        train_first,
        "train_first",
        lambda client, **kwargs: seen.update(kwargs) or {"steps": 1, "warnings": ["it ranks by position"]},
    )
    result = CliRunner().invoke(app, ["train", "first", "--corpus", str(corpus), "--steps", "7"])
    assert result.exit_code == 0, result.output
    assert "warning: it ranks by position" in result.output
    assert seen["out"] == tmp_path / "models" / FirstReranker.DEFAULT_FOLDER
    assert seen["teacher"] == f"cross-encoder:{tmp_path / 'models' / 'cross-encoder'}"
    assert (seen["steps"], seen["window"], seen["corpus"]) == (7, 20, corpus)
    assert (seen["orders"], seen["batch_size"]) == (None, 1)  # the trainer takes None as the window
    monkeypatch.undo()
    failed = CliRunner().invoke(app, ["train", "first", "--out", str(tmp_path / "x")])
    assert failed.exit_code == 1 and "beir" in failed.output
