"""The demo's shipped Retro model is the one its recipe makes: its recorded fingerprint is the code's
current `demo_fingerprint` (corpora, model, settings, tokenizer), its config is the recipe's with the
vocabulary cut to the demo's texts, its tokenizer reads those texts as MiniLM's does, its weights are
float16 and load; and `ensure_demo_model` installs it without training."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch
from rich.console import Console
from safetensors import safe_open

from services.demo import retro
from services.generator.retro.data import encode, load_tokenizer
from services.generator.retro.model import CONFIG_FILE, WEIGHTS_FILE, RetroConfig, RetroModel
from services.generator.retro.train import TRAIN_FILE
from services.generator.retro.vocab import checkpoint_tokenizer, cut_config, kept_token_ids
from tests.unit.test_retro_model import tiny_config

STALE = "the shipped demo model is not what the recipe makes now: run `make demo-model` and commit it"


def test_the_shipped_model_was_made_by_the_current_recipe() -> None:
    assert retro.recorded_fingerprint(retro.SHIPPED) == retro.demo_fingerprint(), STALE
    record = json.loads((retro.SHIPPED / TRAIN_FILE).read_text())
    assert record["demo"]["right"] >= 7 and record["demo"]["questions"] == 8


def test_the_shipped_config_is_the_recipes_cut_and_its_float16_weights_load() -> None:
    tokenizer = load_tokenizer(retro.TOKENIZER)
    full = RetroConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **retro.MODEL)
    expected = cut_config(full.to_dict(), kept_token_ids(tokenizer, retro.demo_texts()))
    shipped = json.loads((retro.SHIPPED / CONFIG_FILE).read_text())
    assert shipped == expected, STALE
    with safe_open(str(retro.SHIPPED / WEIGHTS_FILE), "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F16"}
    model = RetroModel.load(retro.SHIPPED)
    assert all(p.dtype == torch.float32 and bool(p.isfinite().all()) for p in model.parameters())
    assert sum((retro.SHIPPED / name).stat().st_size for name in retro.SHIPPED_FILES) < 5_000_000


def test_the_shipped_tokenizer_reads_the_demo_texts_as_minilms_does() -> None:
    full, cut = load_tokenizer(retro.TOKENIZER), checkpoint_tokenizer(retro.SHIPPED)
    assert cut is not None and cut.pad_token_id == 0
    kept = kept_token_ids(full, retro.demo_texts())
    assert len(cut) == len(kept) < len(full) // 4
    new_id = {old: new for new, old in enumerate(kept)}
    for text in retro.demo_texts():
        assert encode(cut, text) == [new_id[i] for i in encode(full, text)], text
    # A word the demo never uses may need a piece that was cut.
    assert cut.unk_token_id in encode(cut, "photosynthesis zygote")


def test_ensure_demo_model_installs_the_shipped_model_without_training(tmp_path: Path, monkeypatch) -> None:
    trained = []
    monkeypatch.setattr(retro, "train_demo_model", lambda client, out, *a, **kw: trained.append(out))
    console = Console(file=io.StringIO())
    path = retro.ensure_demo_model(client=None, home=tmp_path, console=console)
    assert path == retro.model_dir(tmp_path) and not trained
    for name in retro.SHIPPED_FILES:
        assert (path / name).read_bytes() == (retro.SHIPPED / name).read_bytes()
    # Installed once, it is then used as it is; --retrain trains anyway.
    assert retro.ensure_demo_model(client=None, home=tmp_path, console=console) == path and not trained
    retro.ensure_demo_model(client=None, home=tmp_path, console=console, retrain=True)
    assert trained == [path]


def test_a_shipped_model_of_another_recipe_is_not_used(tmp_path: Path, monkeypatch) -> None:
    stale = tmp_path / "shipped"
    shutil.copytree(retro.SHIPPED, stale)
    record = json.loads((stale / TRAIN_FILE).read_text())
    (stale / TRAIN_FILE).write_text(json.dumps({**record, "demo_fingerprint": "another-recipe"}))
    trained = []
    monkeypatch.setattr(retro, "SHIPPED", stale)
    monkeypatch.setattr(retro, "train_demo_model", lambda client, out, *a, **kw: trained.append(out))
    console = Console(file=io.StringIO())
    path = retro.ensure_demo_model(client=None, home=tmp_path / "home", console=console)
    assert trained == [path] and not path.exists()
    assert "made by recipe another-recipe" in console.file.getvalue()


def test_export_cuts_the_vocabulary_and_writes_float16_weights_that_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tokenizer = load_tokenizer(retro.TOKENIZER)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, copy_head=True)
    model = RetroModel(config)
    model.save(tmp_path / "trained")
    (tmp_path / "trained" / TRAIN_FILE).write_text(json.dumps({"demo_fingerprint": "f"}))
    retro.export_demo_model(tmp_path / "trained", tmp_path / "shipped")
    assert retro.recorded_fingerprint(tmp_path / "shipped") == "f"
    kept = kept_token_ids(tokenizer, retro.demo_texts())
    record = json.loads((tmp_path / "shipped" / TRAIN_FILE).read_text())
    assert record["vocabulary"] == {"kept": len(kept), "of": len(tokenizer), "texts": "demo_texts()"}
    shipped = RetroModel.load(tmp_path / "shipped")
    assert shipped.config.vocab_size == len(kept)
    index = torch.tensor(kept)
    for (name, p), q in zip(model.named_parameters(), shipped.parameters(), strict=True):
        expected = p.detach()[index] if name == "embed.weight" else p.detach()
        torch.testing.assert_close(q, expected.half().float(), rtol=0, atol=0, msg=name)
    # Exporting again writes the same bytes: the shipped folder is a function of the trained one.
    retro.export_demo_model(tmp_path / "trained", tmp_path / "again")
    for name in retro.SHIPPED_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "shipped" / name).read_bytes(), name
