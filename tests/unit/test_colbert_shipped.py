"""The ColBERT default that ships with the project (`make colbert-model`): a few MB of float16 delta over
the pip-installed MiniLM that loads by name, encodes, and records the recipe and data it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from services.retriever.colbert.encoder import SHIPPED_FILE, SHIPPED_NAME, ColbertEncoder
from services.retriever.colbert.train import beir_pairs, inputs_key
from services.runtime.settings import RetrieverSettings

SCIFACT = Path(__file__).resolve().parents[3] / "shared" / "data" / "scifact"


def training_record() -> dict:
    with safe_open(SHIPPED_FILE, framework="pt") as f:
        return json.loads((f.metadata() or {})["training"])


def test_the_shipped_default_is_small_loads_by_name_and_is_the_fleets_default() -> None:
    assert SHIPPED_FILE.stat().st_size < 5 * 2**20
    assert RetrieverSettings().colbert_model == SHIPPED_NAME
    encoder = ColbertEncoder.load(SHIPPED_NAME)
    assert encoder.model_id.startswith(f"colbert:{SHIPPED_NAME}@") and encoder.dim == 128
    untrained = ColbertEncoder.load("all-MiniLM-L6-v2")
    assert not (encoder.projection == untrained.projection).all()
    query, _ = encoder.encode_queries(["Which bird cannot fly?"])
    docs = encoder.encode_documents(["Penguins cannot fly.", "The stock market fell on Monday."])
    scores = [float((query[0] @ torch.from_numpy(d).float().T).amax(dim=1).sum()) for d in docs]
    assert scores[0] > scores[1]


def test_the_shipped_default_records_the_make_colbert_model_recipe() -> None:
    record = training_record()
    recipe = {"train_layers": 1, "candidates": 16, "batch_size": 8, "steps": 300, "lr": 3e-3}
    assert {k: record[k] for k in recipe} == recipe and record["layer_lr"] == 5e-5
    assert record["split"] == "train" and record["teacher"] == "dense"


@pytest.mark.skipif(not SCIFACT.is_dir(), reason="needs ../shared/data/scifact")
def test_the_shipped_default_was_trained_on_scifact_train_queries() -> None:
    record = training_record()
    models = {k: record[k] for k in ("base", "dense_model", "teacher", "candidates", "frozen_layers")}
    assert record["data"] == inputs_key(beir_pairs(SCIFACT, "train"), models)
