"""The demo's training path end to end, short: what `ragfleet demo --retrain --export DIR` runs
(`train_demo_model` into the fleet's model folder, then `export_demo_model`), through `ragfleet serve`
processes on loopback, with the demo's recipe cut to a few steps on one training archipelago. The
exported folder is then served by the Generator, which must answer; its fingerprint must say it is not
the demo's recipe, so the demo would never install it as the shipped model."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

import ragfleet
from services.demo import retro
from services.demo.corpus import demo_documents, demo_questions
from services.demo.run import DEMO_INDEX
from services.generator.retro.train import TRAIN_FILE
from services.runtime.artifacts import write_directory
from tools.fleet import LocalFleet, start_local_fleet

pytestmark = pytest.mark.integration

SHORT = dataclasses.replace(retro.SETTINGS, steps=2, batch_size=4, warmup=1, checkpoint_every=2)
ARCHIPELAGOS = 1


@pytest.fixture(scope="module")
def demo_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    running = start_local_fleet(
        tmp_path_factory.mktemp("demo-home"),
        names=("retriever-dense", "retriever-bm25", "generator", "pipeline"),
    )
    yield running
    running.stop()


def test_a_short_demo_training_run_exports_a_model_the_generator_serves(
    demo_fleet: LocalFleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    console = Console(file=io.StringIO(), width=200)
    trained, exported = retro.model_dir(demo_fleet.home), tmp_path / "exported"
    with ragfleet.Client(demo_fleet.address, timeout=300.0) as client:
        retro.replace_index(client, demo_documents(), DEMO_INDEX, console, "ingesting the demo corpus")
        record = retro.train_demo_model(
            client, trained, console, index=DEMO_INDEX, settings=SHORT, archipelagos=ARCHIPELAGOS
        )
        assert record["steps"] == SHORT.steps and len(record["losses"]) == SHORT.steps
        assert record["data"]["qa_examples"] > 0 and record["data"]["lm_windows"] > 0
        assert record["demo"]["questions"] == len(demo_questions()) == len(record["demo"]["answers"])
        assert json.loads((trained / TRAIN_FILE).read_text())["demo"] == record["demo"]
        with pytest.raises(ragfleet.errors.NotFound):  # the training index is dropped afterwards
            client.describe_index(retro.TRAINING_INDEX)

        retro.export_demo_model(trained, exported)
        short = retro.recorded_fingerprint(exported)
        assert short == retro.recipe_fingerprint(retro.MODEL, SHORT, ARCHIPELAGOS) != retro.demo_fingerprint()
        assert retro.recipe_fingerprint(retro.MODEL, retro.SETTINGS) == retro.demo_fingerprint()
        # Shipped as it is, the demo would not install it but train its own recipe's.
        retrained = []
        monkeypatch.setattr(retro, "SHIPPED", exported)
        monkeypatch.setattr(retro, "train_demo_model", lambda client, out, *a, **kw: retrained.append(out))
        retro.ensure_demo_model(client, tmp_path / "another-home", console)
        assert retrained == [retro.model_dir(tmp_path / "another-home")]
        assert f"made by recipe {short}" in console.file.getvalue()

        # The Generator serves the exported (float16) folder from its default checkpoint folder.
        write_directory(trained, {name: (exported / name).read_bytes() for name in retro.SHIPPED_FILES})
        events = list(client.ask(demo_questions()[0]["question"], index=DEMO_INDEX, params={"max_tokens": 4}))
    answer = events[-1].answer
    assert events[-1].WhichOneof("event") == "answer" and not answer.retrieval_only
    assert answer.citations
