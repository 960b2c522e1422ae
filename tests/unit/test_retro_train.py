"""Retro training on a tiny model and corpus, with neighbours from a real in-process TF-IDF index."""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from services.generator.retro.data import load_tokenizer
from services.generator.retro.model import WEIGHTS_FILE, RetroConfig, RetroModel
from services.generator.retro.neighbours import Hit
from services.generator.retro.train import TRAIN_FILE, TrainProgress, TrainSettings, lr_at, train_retro
from services.runtime.artifacts import CHECKPOINTS_DIR, Checkpoints

_WORD = re.compile(r"\w+")


class TfIdfRetrieval:
    """Cosine TF-IDF over fixed word windows of the documents; a passage's continuation is the next
    window of its document (what the Retriever returns with with_continuation)."""

    fingerprint = "tfidf-test"

    def __init__(self, documents: Sequence[dict], words: int = 8) -> None:
        self.passages: list[Hit] = []
        for doc in documents:
            tokens = doc["text"].split()
            pieces = [" ".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]
            for j, piece in enumerate(pieces):
                following = pieces[j + 1] if j + 1 < len(pieces) else ""
                self.passages.append(Hit(doc["id"], piece, following))
        bags = [_WORD.findall(p.text.lower()) for p in self.passages]
        self.vocab = {w: i for i, w in enumerate(sorted({w for bag in bags for w in bag}))}
        counts = np.zeros((len(bags), len(self.vocab)))
        for row, bag in enumerate(bags):
            for w in bag:
                counts[row, self.vocab[w]] += 1
        self.idf = np.log(len(bags) / (1 + (counts > 0).sum(0))) + 1
        weighted = counts * self.idf
        self.matrix = weighted / np.linalg.norm(weighted, axis=1, keepdims=True)
        self.queries = 0

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        self.queries += len(queries)
        results = []
        for query in queries:
            vector = np.zeros(len(self.vocab))
            for w in _WORD.findall(query.lower()):
                if w in self.vocab:
                    vector[self.vocab[w]] += 1
            scores = self.matrix @ (vector * self.idf)
            results.append([self.passages[i] for i in np.argsort(-scores, kind="stable")[:top_k]])
        return results


def _corpus(n: int = 12) -> list[dict]:
    """Pairs of documents with the same made-up text, so each chunk's best other-document neighbour
    holds its continuation."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vo", "ne", "ri", "po"]
    docs = []
    for i in range(n):
        text = " ".join("".join(rng.choices(syllables, k=2)) for _ in range(16))
        docs += [{"id": f"d{i}a", "text": text}, {"id": f"d{i}b", "text": text}]
    return docs


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other work shares the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _latest_step(out: Path) -> int:
    latest = Checkpoints(out / CHECKPOINTS_DIR).latest()
    assert latest is not None
    return latest.step


def _config(tokenizer) -> RetroConfig:
    return RetroConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        chunk_size=8,
        num_neighbours=2,
        neighbour_len=16,
        cca_start=1,
        cca_every=1,
        encoder_layers=1,
        max_seq_len=64,
    )


SETTINGS = TrainSettings(
    steps=16, batch_size=4, seq_len=16, lr=3e-3, warmup=2, eval_fraction=0.2, checkpoint_every=8
)


def test_lr_schedule_warms_up_holds_and_decays() -> None:
    s = TrainSettings(steps=100, lr=1.0, warmup=10, decay_fraction=0.2, min_lr_ratio=0.1)
    assert lr_at(0, s) == pytest.approx(0.1) and lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(10, s) == lr_at(79, s) == 1.0
    assert lr_at(80, s) < 1.0 and lr_at(99, s) == pytest.approx(0.1)
    assert all(lr_at(i, s) >= lr_at(i + 1, s) for i in range(10, 99))


def test_training_lowers_the_loss_and_writes_a_loadable_model(tokenizer, tmp_path: Path) -> None:
    docs = _corpus()
    retrieval = TfIdfRetrieval(docs)
    qa = [("what follows " + d["text"].split()[0] + "?", d["text"].split()[1]) for d in docs[:8]]
    settings = TrainSettings(steps=30, batch_size=8, seq_len=24, lr=1e-2, warmup=3, checkpoint_every=10)
    seen: list[TrainProgress] = []
    record = train_retro(
        retrieval, docs, tmp_path, config=_config(tokenizer), settings=settings, qa=qa, progress=seen.append
    )
    losses = record["losses"]
    assert len(losses) == 30 and np.mean(losses[-5:]) < losses[0] - 2.0
    assert record["data"]["qa_examples"] == 8 and record["data"]["held_out_documents"] == 1
    assert record["eval"]["ppl_retrieval"] is not None and record["eval"]["ppl_no_retrieval"] is not None
    assert {p.stage for p in seen} == {"retrieving", "training", "evaluating"}
    assert json.loads((tmp_path / TRAIN_FILE).read_text())["losses"] == losses
    model = RetroModel.load(tmp_path)
    assert model.config == _config(tokenizer)
    # Only `keep_checkpoints` checkpoints remain; the latest is the final step.
    assert _latest_step(tmp_path) == 30
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) == settings.keep_checkpoints


def test_neighbours_are_cached_in_the_out_folder(tokenizer, tmp_path: Path) -> None:
    docs = _corpus(4)
    retrieval = TfIdfRetrieval(docs)
    settings = TrainSettings(steps=2, batch_size=2, seq_len=16, warmup=1, checkpoint_every=2)
    first = train_retro(retrieval, docs, tmp_path / "a", config=_config(tokenizer), settings=settings)
    queries = retrieval.queries
    assert queries > 0 and not first["data"]["neighbours_cached"]
    second = train_retro(retrieval, docs, tmp_path / "b", config=_config(tokenizer), settings=settings)
    assert retrieval.queries == 2 * queries  # another out folder has its own cache ...
    assert second["losses"] == first["losses"]  # ... and the same seed gives the same run
    third = train_retro(
        retrieval, docs, tmp_path / "b", config=_config(tokenizer), settings=settings, resume=True
    )
    assert retrieval.queries == 2 * queries and third["data"]["neighbours_cached"]


def _inside(needle: list[int], haystack: list[int]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_neighbours_exclude_the_chunks_own_document_but_not_the_questions(tokenizer, tmp_path: Path) -> None:
    rng = random.Random(1)
    words = [f"w{i}" for i in range(200)]
    docs = [{"id": f"d{i}", "text": " ".join(rng.sample(words, 16))} for i in range(6)]
    question = " ".join(docs[3]["text"].split()[:4])
    settings = TrainSettings(steps=1, batch_size=2, seq_len=32, warmup=0, eval_fraction=0.0)
    config = _config(tokenizer)
    train_retro(TfIdfRetrieval(docs), docs, tmp_path, config=config, settings=settings, qa=[(question, "x")])
    [cache] = list((tmp_path / "neighbours").glob("*.npz"))
    data = np.load(cache)
    own = [tokenizer(d["text"], add_special_tokens=False)["input_ids"] for d in docs]
    row = 0
    for ids in own:
        for _ in range(-(-(len(ids) + 1) // config.chunk_size)):  # + [SEP]
            for neighbour in data["chunks"][row]:
                tokens = [t for t in neighbour.tolist() if t != tokenizer.pad_token_id]
                assert not _inside(tokens[:6], ids)
                assert any(_inside(tokens[:6], other) for other in own)
            row += 1
    assert row == len(data["chunks"])
    # The question's own document is not excluded: its best hit is the passage it was taken from.
    assert _inside(data["questions"][0, 0, :6].tolist(), own[3])


def test_resume_after_interruption_matches_an_uninterrupted_run(tokenizer, tmp_path: Path) -> None:
    docs = _corpus(6)
    retrieval = TfIdfRetrieval(docs)
    whole = train_retro(retrieval, docs, tmp_path / "whole", config=_config(tokenizer), settings=SETTINGS)

    class Interrupted(Exception):
        pass

    def stop_at_10(p: TrainProgress) -> None:
        if p.stage == "training" and p.done == 10:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_retro(
            retrieval,
            docs,
            tmp_path / "cut",
            config=_config(tokenizer),
            settings=SETTINGS,
            progress=stop_at_10,
        )
    assert _latest_step(tmp_path / "cut") == 8
    assert not (tmp_path / "cut" / TRAIN_FILE).exists()
    with pytest.raises(ValueError, match="^resume: "):
        train_retro(retrieval, docs, tmp_path / "cut", config=_config(tokenizer), settings=SETTINGS)
    resumed = train_retro(
        retrieval, docs, tmp_path / "cut", config=_config(tokenizer), settings=SETTINGS, resume=True
    )
    assert resumed["losses"] == whole["losses"]
    a, b = load_file(str(tmp_path / "whole" / WEIGHTS_FILE)), load_file(str(tmp_path / "cut" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_resume_refuses_other_settings(tokenizer, tmp_path: Path) -> None:
    docs = _corpus(4)
    retrieval = TfIdfRetrieval(docs)
    settings = TrainSettings(steps=8, batch_size=2, seq_len=16, warmup=1, checkpoint_every=8)
    train_retro(retrieval, docs, tmp_path, config=_config(tokenizer), settings=settings)
    other = TrainSettings(steps=8, batch_size=2, seq_len=16, warmup=1, checkpoint_every=8, lr=1e-4)
    with pytest.raises(ValueError, match="^resume: .*settings"):
        train_retro(retrieval, docs, tmp_path, config=_config(tokenizer), settings=other, resume=True)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"seq_len": 12}, "seq_len"),
        ({"steps": 0}, "steps"),
        ({"warmup": 50}, "warmup"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_bad_settings_name_the_field(tokenizer, tmp_path: Path, change: dict, field: str) -> None:
    settings = TrainSettings(**{**SETTINGS.__dict__, **change})
    with pytest.raises(ValueError, match=f"^{field}: "):
        train_retro(
            TfIdfRetrieval(_corpus(2)), _corpus(2), tmp_path, config=_config(tokenizer), settings=settings
        )
    assert not tmp_path.joinpath("checkpoints").exists()


def test_the_demo_model_is_reused_only_for_the_current_corpus_and_recipe(tmp_path: Path) -> None:
    from rich.console import Console

    from services.demo.retro import demo_fingerprint, ensure_demo_model, model_dir

    class NoFleet:
        """Any use means the demo would train a new model."""

        def __getattr__(self, name: str):
            raise LookupError(name)

    console = Console(file=io.StringIO())
    path = model_dir(tmp_path)
    path.mkdir(parents=True)
    (path / TRAIN_FILE).write_text(json.dumps({"demo_fingerprint": demo_fingerprint()}))
    assert ensure_demo_model(NoFleet(), tmp_path, console) == path
    (path / TRAIN_FILE).write_text(json.dumps({"demo_fingerprint": "an older corpus"}))
    # A stale model gives way to the shipped one, made by the current recipe; asked to, it trains.
    assert ensure_demo_model(NoFleet(), tmp_path, console) == path
    assert json.loads((path / TRAIN_FILE).read_text())["demo_fingerprint"] == demo_fingerprint()
    with pytest.raises(LookupError):
        ensure_demo_model(NoFleet(), tmp_path, console, retrain=True)


def test_cli_config_items_go_to_the_model_or_the_run_by_field_name() -> None:
    from services.cli import _dataclass_overrides

    items = ["d_model=128", "steps=5", "copy_head=true", "lr=1", "encoder_d_model=null"]
    model, run = _dataclass_overrides(items, RetroConfig, TrainSettings)
    assert model == {"d_model": 128, "copy_head": True, "encoder_d_model": None}
    assert run == {"steps": 5, "lr": 1} and TrainSettings(**run).steps == 5
    bad_items = (("bogus=1", "config"), ("steps", "config"), ("steps=abc", "steps"), ("seed=0.5", "seed"))
    for bad, field in bad_items:
        with pytest.raises(ValueError, match=f"^{field}: "):
            _dataclass_overrides([bad], RetroConfig, TrainSettings)
