"""`ragfleet train mamba` on a tiny corpus with a fake miner (no fleet): the loss falls, resume matches."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.datasets.mining import Example
from services.retriever.mamba.model import MambaEncoder
from services.retriever.mamba.train import train_mamba
from services.runtime.artifacts import Checkpoints
from services.runtime.model_errors import ParamError

TOPICS = [
    "Penguins are flightless birds of the southern hemisphere. They swim with stiff flippers in cold seas.",
    "The stock market fell sharply on Monday morning. Investors sold shares of banks and airlines.",
    "Python is a popular programming language for data work. Its libraries cover numerics and plotting.",
    "The Eiffel Tower stands in the centre of Paris. It was built of wrought iron for a world fair.",
    "Volcanoes erupt when molten rock rises to the surface. Ash clouds can ground flights for days.",
    "Honey bees pollinate many crops across the world. A colony keeps its queen warm through winter.",
]
FAST = dict(layers=1, state_size=4, steps=24, batch_size=4, max_length=32, lr=3e-3, warmup=2, progress=False)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TOPICS)))
    return path


def fake_miner(calls):
    """Hard negatives without a fleet: the next topic's text (a real other document, never the positive)."""

    def mine(index, documents, queries, negatives):
        calls.append((index, len(documents), len(queries)))
        out = []
        for i, q in enumerate(queries):
            others = [t for t in TOPICS if t not in q.positives[0] and q.text not in t]
            out.append(Example(q.text, [q.positives[0], *others[i % 3 : i % 3 + negatives]]))
        return out

    return mine


def test_loss_falls_and_the_model_loads(tmp_path, corpus):
    calls = []
    out = tmp_path / "model"
    metrics = train_mamba(out=out, corpus=corpus, miner=fake_miner(calls), hard_negatives=1, **FAST)
    assert (
        calls == [("corpus-cloze0", len(TOPICS), len(TOPICS))]
        and metrics["steps"] == 24
        and metrics["examples"] == len(TOPICS)
    )
    assert metrics["final_loss"] < 0.7 * metrics["initial_loss"]
    encoder = MambaEncoder.load(out, max_tokens=512)
    assert encoder.dimension == 384 and encoder.encode(["penguins"]).shape == (1, 384)
    assert json.loads((out / "train.json").read_text())["negatives"] == "fleet"


def test_resume_reproduces_an_uninterrupted_run(tmp_path, corpus, monkeypatch):
    args = dict(corpus=corpus, negatives="none", teacher="dense", checkpoint_every=4, **FAST | {"steps": 8})
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train_mamba(out=whole, **args)
    save = Checkpoints.save

    def save_then_die(self, step, *rest, **kwargs):
        saved = save(self, step, *rest, **kwargs)
        if step == 4:
            raise KeyboardInterrupt
        return saved

    monkeypatch.setattr(Checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_mamba(out=parts, **args)
    monkeypatch.setattr(Checkpoints, "save", save)
    calls = []
    metrics = train_mamba(out=parts, resume=True, miner=fake_miner(calls), **args)
    assert metrics["start_step"] == 4 and calls == []
    a, b = load_file(whole / "model.safetensors"), load_file(parts / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


def test_bad_arguments_name_the_field(tmp_path, corpus):
    with pytest.raises(ParamError) as err:
        train_mamba(out=tmp_path / "m", corpus=corpus, negatives="fleet", **FAST)
    assert err.value.field == "negatives"
    with pytest.raises(ParamError) as err:
        train_mamba(out=tmp_path / "m", corpus=corpus, negatives="none", teacher="cross-encoder:x", **FAST)
    assert err.value.field == "teacher"
