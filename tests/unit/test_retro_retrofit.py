"""RETRO-fitting a tiny GPT-2 saved with save_pretrained: frozen base, zero-init CCA, training, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from services.generator.retro.retrofit import RetrofitModel

RETRO = dict(chunk_size=4, num_neighbours=2, neighbour_len=8, cca_start=0, cca_every=2, encoder_layers=1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other work shares the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=60, n_positions=64, n_embd=32, n_layer=3, n_head=2, eos_token_id=59)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 59, (2, 14), generator=gen)
    neighbours = torch.randint(0, 59, (2, 4, 2, 8), generator=gen)
    neighbours[:, :, 1, 6:] = 59  # padding (eos doubles as pad for GPT-2)
    return ids, neighbours


@torch.no_grad()
def test_fresh_retrofit_reproduces_the_base_model(gpt2_path) -> None:
    model = RetrofitModel.from_pretrained(gpt2_path, **RETRO)
    assert model.config.cca_layers == [0, 2] and model.config.pad_token_id == 59
    base = GPT2LMHeadModel.from_pretrained(gpt2_path).eval()
    ids, neighbours = inputs()
    expected = base(ids).logits
    out = model(ids, neighbours, output_neighbour_weights=True)
    assert torch.equal(out.logits, expected)
    assert torch.equal(model(ids).logits, expected)
    assert out.neighbour_weights.shape == (2, 4, 2)
    torch.testing.assert_close(out.neighbour_weights[:, :3].sum(-1), torch.ones(2, 3))


def test_training_moves_only_the_new_parameters(gpt2_path, tmp_path) -> None:
    torch.manual_seed(0)
    model = RetrofitModel.from_pretrained(gpt2_path, **RETRO).train()
    assert not model.base.training  # the frozen base runs without dropout
    trainable = model.trainable_parameters()
    trainable_ids = {id(p) for p in trainable}
    base_params = list(model.base.parameters())
    assert base_params and not trainable_ids & {id(p) for p in base_params}
    base_before = {name: p.detach().clone() for name, p in model.base.named_parameters()}
    new_before = [p.detach().clone() for p in trainable]

    ids, neighbours = inputs()
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        logits = model(ids[:, :-1], neighbours).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    for name, p in model.base.named_parameters():
        assert torch.equal(p, base_before[name]), name
    changed = [not torch.equal(p, before) for p, before in zip(trainable, new_before)]
    assert all(changed)
    model.eval()
    with torch.no_grad():
        base_logits = GPT2LMHeadModel.from_pretrained(gpt2_path).eval()(ids).logits
        trained = model(ids, neighbours).logits
        assert not torch.allclose(trained[:, 3:], base_logits[:, 3:])
        torch.testing.assert_close(trained[:, :3], base_logits[:, :3])  # before chunk 0 ends: no CCA

    model.save(tmp_path / "retrofit")
    loaded = RetrofitModel.load(tmp_path / "retrofit").eval()
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(ids, neighbours).logits, trained)


def test_retrofit_config_errors(gpt2_path) -> None:
    with pytest.raises(ValueError, match="cca_start: 5 leaves no CCA layer in a 3-layer decoder"):
        RetrofitModel.from_pretrained(gpt2_path, chunk_size=4, neighbour_len=8)
    with pytest.raises(ValueError, match="d_model: the base model has 32"):
        RetrofitModel.from_pretrained(gpt2_path, d_model=64, **RETRO)
    with pytest.raises(ValueError, match="copy_head: a retro-fitted model keeps"):
        RetrofitModel.from_pretrained(gpt2_path, copy_head=True, **RETRO)
    model = RetrofitModel.from_pretrained(gpt2_path, **RETRO)
    ids, neighbours = inputs()
    with pytest.raises(ValueError, match="neighbours: expected shape"):
        model(ids, neighbours[:, :, :1])
