"""Retro model: CCA alignment and causality, cached decoding, no-retrieval mode, citations weights,
save/load, config and input errors, and a copy task only solvable through the neighbours."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from services.generator.retro.model import ChunkedCrossAttention, Encoded, RetroConfig, RetroModel


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other work shares the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> RetroConfig:
    values = dict(
        vocab_size=50,
        d_model=32,
        n_layers=3,
        n_heads=2,
        d_ff=64,
        max_seq_len=64,
        chunk_size=4,
        num_neighbours=2,
        neighbour_len=8,
        cca_start=1,
        cca_every=1,
        encoder_layers=2,
    )
    return RetroConfig(**{**values, **overrides})


def tiny_model(**overrides) -> RetroModel:
    torch.manual_seed(0)
    return RetroModel(tiny_config(**overrides)).eval()


def random_inputs(
    config: RetroConfig, batch: int, length: int, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (batch, length), generator=gen)
    n_chunks = -(-length // config.chunk_size)
    shape = (batch, n_chunks, config.num_neighbours, config.neighbour_len)
    neighbours = torch.randint(1, config.vocab_size, shape, generator=gen)
    neighbours[:, :, 1, 5:] = config.pad_token_id  # a shorter second neighbour
    return ids, neighbours


@torch.no_grad()
@pytest.mark.parametrize("copy_head", [False, True])
def test_neighbours_of_chunk_u_condition_only_positions_from_its_last_token_on(copy_head: bool) -> None:
    model = tiny_model(copy_head=copy_head)
    m = model.config.chunk_size
    ids, neighbours = random_inputs(model.config, 2, 15)
    base = model(ids, neighbours).logits
    for u in range(3):  # chunks whose last token (u·m + m − 1) lies inside the 15 tokens
        changed = neighbours.clone()
        changed[:, u] = torch.randint(1, model.config.vocab_size, changed[:, u].shape)
        logits = model(ids, changed).logits
        first = u * m + m - 1
        assert torch.equal(logits[:, :first], base[:, :first])
        diff = (logits - base).abs().amax(dim=(0, 2))
        assert bool((diff[first:] > 1e-5).all()), (u, diff)
    # Chunk 3 (positions 12..15) is not complete in 15 tokens: its neighbours are never read.
    changed = neighbours.clone()
    changed[:, 3] = 7
    assert torch.equal(model(ids, changed).logits, base)
    assert torch.equal(model(ids, neighbours[:, :3]).logits, base)


@torch.no_grad()
def test_cca_groups_follow_retro_alignment() -> None:
    """CCA of a slice at an offset equals the same positions of a full call, and the first m−1 get nothing."""
    config = tiny_config()
    torch.manual_seed(0)
    cca = ChunkedCrossAttention(config)
    m, (k, r) = config.chunk_size, (config.num_neighbours, config.neighbour_len)
    hidden = torch.randn(2, 17, config.d_model)
    encoded = torch.randn(2, 4, k, r, config.d_encoder)
    mask = torch.ones(2, 4, k, r, dtype=torch.bool)
    mask[0, 2, 1, 3:] = False
    full = cca(hidden, Encoded(encoded, mask))
    assert torch.equal(full[:, : m - 1], torch.zeros_like(full[:, : m - 1]))
    for start in (1, 3, 5, 9, 16):
        part = cca(hidden[:, start:], Encoded(encoded, mask), offset=start)
        torch.testing.assert_close(part, full[:, start:], atol=1e-6, rtol=0)
    # Group u attends only to chunk u: masking all of chunk 1's neighbours zeroes exactly positions 7..10.
    mask[:, 1] = False
    out = cca(hidden, Encoded(encoded, mask))
    assert torch.equal(out[:, 2 * m - 1 : 3 * m - 1], torch.zeros_like(out[:, 2 * m - 1 : 3 * m - 1]))
    torch.testing.assert_close(out[:, : 2 * m - 1], full[:, : 2 * m - 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 3 * m - 1 :], full[:, 3 * m - 1 :], atol=1e-6, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("copy_head", [False, True])
def test_cached_decoding_matches_full_forward(copy_head: bool) -> None:
    model = tiny_model(copy_head=copy_head)
    m = model.config.chunk_size
    ids, neighbours = random_inputs(model.config, 2, 19)
    full = model(ids, neighbours).logits
    # Prefill 6 tokens, then pieces that cross chunk boundaries, then token by token. Neighbours arrive
    # chunk by chunk: rows of chunks not complete yet are padding, as a decoder that retrieves when a
    # chunk completes would send them.
    cache = model.new_cache(2)
    outputs = []
    for start, end in [(0, 6), (6, 9), (9, 10), *[(i, i + 1) for i in range(10, 19)]]:
        arrived = neighbours[:, : -(-end // m)].clone()
        arrived[:, end // m :] = model.config.pad_token_id
        outputs.append(model(ids[:, start:end], arrived, cache=cache).logits)
        assert cache.length == end
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, atol=1e-4, rtol=0)


@torch.no_grad()
def test_cached_decoding_without_retrieval_matches_full_forward() -> None:
    model = tiny_model()
    ids, _ = random_inputs(model.config, 1, 13)
    full = model(ids).logits
    cache = model.new_cache(1)
    outputs = [model(ids[:, :5], cache=cache).logits]
    outputs += [model(ids[:, i : i + 1], cache=cache).logits for i in range(5, 13)]
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, atol=1e-4, rtol=0)


@torch.no_grad()
def test_copy_head_mixes_in_the_neighbour_tokens_of_each_group() -> None:
    model = tiny_model(copy_head=True)
    m, vocab = model.config.chunk_size, model.config.vocab_size
    ids, neighbours = random_inputs(model.config, 2, 15)
    log_probs = model(ids, neighbours).logits
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(2, 15), atol=1e-5, rtol=0)
    # A gate stuck at "copy" leaves only the group's neighbour tokens, weighted by the pointer attention.
    with torch.no_grad():
        model.copy.gate.weight.zero_()
        model.copy.gate.bias.fill_(-50.0)
    probs = model(ids, neighbours).logits.exp()
    lm_only = model(ids).logits.softmax(-1)  # no neighbours: the LM head alone, as without a copy head
    torch.testing.assert_close(probs[:, : m - 1], lm_only[:, : m - 1], atol=1e-5, rtol=0)
    for position in range(m - 1, 15):
        group = (position - m + 1) // m
        allowed = torch.zeros(2, vocab, dtype=torch.bool)
        allowed.scatter_(1, neighbours[:, group].flatten(1), True)
        allowed[:, model.config.pad_token_id] = False  # padding is masked out of the pointer
        assert bool((probs[:, position][~allowed] < 1e-9).all())
        torch.testing.assert_close(probs[:, position][allowed].sum(), torch.tensor(2.0), atol=1e-4, rtol=0)


def test_copy_weights_are_the_pointer_mass_that_each_position_copies_with() -> None:
    model = tiny_model(copy_head=True)
    m, k, r = model.config.chunk_size, model.config.num_neighbours, model.config.neighbour_len
    with torch.no_grad():  # a gate of 0.25: a quarter LM head, three quarters pointer
        model.copy.gate.weight.zero_()
        model.copy.gate.bias.fill_(math.log(1 / 3))
    ids, neighbours = random_inputs(model.config, 2, 15)
    out = model(ids, neighbours, output_neighbour_weights=True)
    assert out.copy_weights.shape == (2, 15, k, r)
    assert model(ids, neighbours).copy_weights is None
    torch.testing.assert_close(out.copy_weights.sum((-1, -2))[:, m - 1 :], torch.full((2, 15 - m + 1), 0.75))
    assert bool((out.copy_weights[:, : m - 1] == 0).all())  # the first m−1 positions get no pointer
    assert bool((out.copy_weights[:, :, 1, 5:] == 0).all())  # nor padding
    # A cached step reports what the full forward does for its position.
    cache = model.new_cache(2)
    model(ids[:, :14], neighbours, cache=cache)
    step = model(ids[:, 14:], neighbours, cache=cache, output_neighbour_weights=True)
    torch.testing.assert_close(step.copy_weights[:, 0], out.copy_weights[:, 14], atol=1e-5, rtol=0)


@torch.no_grad()
def test_copy_head_follow_scores_match_the_token_before_each_neighbour_token() -> None:
    model = tiny_model(copy_head=True)
    m, r = model.config.chunk_size, model.config.neighbour_len
    ids, neighbours = random_inputs(model.config, 1, 2 * m - 1)
    neighbours[0, 0, 0] = torch.arange(1, r + 1)  # distinct tokens, so each has one successor
    neighbours[0, 0, 1] = torch.arange(r + 1, 2 * r + 1)
    copy = model.copy
    copy.follow_query.weight.copy_(torch.eye(model.config.d_model))
    copy.follow_key.weight.copy_(torch.eye(model.config.d_model))
    # Group 0 holds positions m−1 … 2m−2; make its i-th state "I have just written neighbour token i".
    hidden = torch.zeros(1, 2 * m - 1, model.config.d_model)
    hidden[0, m - 1 :] = model.embed(neighbours[0, 0, 0, :m])
    scores = copy._follow(hidden, neighbours, offset=0)
    assert scores.shape == (1, 1, m, 2 * r)
    assert scores[0, 0].argmax(-1).tolist() == list(range(1, m + 1))  # the token after each one
    # The rank prior shifts every token of a neighbour by that neighbour's bias.
    copy.rank_bias.copy_(torch.tensor([0.0, 3.0]))
    shifted = copy._follow(hidden, neighbours, offset=0)
    torch.testing.assert_close(shifted - scores, torch.tensor([0.0] * r + [3.0] * r).expand_as(scores))


@torch.no_grad()
@pytest.mark.parametrize("copy_head", [False, True])
def test_select_returns_the_full_outputs_of_the_chosen_positions(copy_head: bool) -> None:
    model = tiny_model(copy_head=copy_head)
    ids, neighbours = random_inputs(model.config, 2, 15)
    select = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    select[0, 0] = select[1, -1] = True  # one position without neighbours, one with
    full = model(ids, neighbours).logits
    torch.testing.assert_close(model(ids, neighbours, select=select).logits, full[select], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="^select: "):
        model(ids, neighbours, select=select[:, :-1])
    with pytest.raises(ValueError, match="^select: "):
        model(ids, neighbours, select=select.long())


@torch.no_grad()
def test_no_neighbours_means_cca_adds_nothing() -> None:
    model = tiny_model()
    ids, neighbours = random_inputs(model.config, 2, 12)
    without = model(ids, output_neighbour_weights=True)
    assert without.neighbour_weights is None
    all_padding = model(ids, neighbours, neighbour_mask=torch.zeros_like(neighbours, dtype=torch.bool)).logits
    torch.testing.assert_close(all_padding, without.logits, atol=1e-6, rtol=0)
    with_retrieval = model(ids, neighbours).logits
    assert (with_retrieval[:, 3:] - without.logits[:, 3:]).abs().amax() > 1e-4
    torch.testing.assert_close(with_retrieval[:, :3], without.logits[:, :3], atol=1e-6, rtol=0)


@torch.no_grad()
def test_neighbour_weights_are_attention_mass_per_neighbour() -> None:
    model = tiny_model()
    ids, neighbours = random_inputs(model.config, 2, 14)
    mask = neighbours != 0
    mask[1, 0, 0] = False  # batch row 1, chunk 0: only the second neighbour is there
    out = model(ids, neighbours, neighbour_mask=mask, output_neighbour_weights=True)
    weights = out.neighbour_weights
    assert weights.shape == (2, 4, 2)
    torch.testing.assert_close(weights[:, :3].sum(-1), torch.ones(2, 3))  # chunks with conditioned tokens
    assert torch.equal(weights[:, 3], torch.zeros(2, 2))  # chunk 3 is not complete
    assert weights[1, 0, 0] == 0 and weights[1, 0, 1] == pytest.approx(1.0)
    # A cached call reports only the groups of its own tokens.
    cache = model.new_cache(2)
    model(ids[:, :9], neighbours, neighbour_mask=mask, cache=cache)
    step = model(ids[:, 9:10], neighbours, neighbour_mask=mask, cache=cache, output_neighbour_weights=True)
    assert step.neighbour_weights.shape == (2, 3, 2)
    torch.testing.assert_close(step.neighbour_weights[:, 1].sum(-1), torch.ones(2))  # position 9: group 1
    assert torch.equal(step.neighbour_weights[:, [0, 2]], torch.zeros(2, 2, 2))


def test_save_load_round_trip(tmp_path) -> None:
    model = tiny_model(encoder_d_model=16, tie_embeddings=True)
    ids, neighbours = random_inputs(model.config, 1, 10)
    path = tmp_path / "retro"
    model.save(path)
    model.save(path)  # overwriting an existing checkpoint
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert RetroConfig.from_dict(json.loads((path / "config.json").read_text())) == model.config
    tensors = load_file(str(path / "model.safetensors"))
    assert "embed.weight" in tensors and "lm_head.weight" not in tensors  # tied weights stored once
    loaded = RetroModel.load(path).eval()
    assert loaded.lm_head.weight is loaded.embed.weight and loaded.encoder.embed is loaded.embed
    with torch.no_grad():
        assert torch.equal(loaded(ids, neighbours).logits, model(ids, neighbours).logits)
    (path / "config.json").write_text(json.dumps({**model.config.to_dict(), "d_model": 64}))
    with pytest.raises(ValueError, match="model.safetensors"):
        RetroModel.load(path)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(cca_start=3), "cca_start"),
        (dict(cca_start=-1), "cca_start"),
        (dict(cca_every=0), "cca_every"),
        (dict(d_model=30), "d_model"),
        (dict(encoder_d_model=18), "encoder_d_model"),
        (dict(neighbour_len=100), "max_seq_len"),
        (dict(pad_token_id=50), "pad_token_id"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_config_is_a_clear_value_error(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_round_trip_and_unknown_fields() -> None:
    config = tiny_config(cca_start=0, cca_every=2)
    assert config.cca_layers == [0, 2]
    assert RetroConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fields bogus"):
        RetroConfig.from_dict({**config.to_dict(), "bogus": 1})


@torch.no_grad()
def test_bad_inputs_raise_and_leave_the_cache_alone() -> None:
    model = tiny_model()
    ids, neighbours = random_inputs(model.config, 2, 12)
    with pytest.raises(ValueError, match="neighbours: expected shape"):
        model(ids, neighbours[:, :, :1])
    with pytest.raises(ValueError, match="complete 3 chunks"):
        model(ids, neighbours[:, :2])
    with pytest.raises(ValueError, match="neighbour_mask: given without neighbours"):
        model(ids, neighbour_mask=neighbours != 0)
    with pytest.raises(ValueError, match="neighbour_mask: expected a bool"):
        model(ids, neighbours, neighbour_mask=(neighbours != 0).long())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.ones(1, 65, dtype=torch.long))
    cache = model.new_cache(2)
    model(ids[:, :5], neighbours, cache=cache)
    with pytest.raises(ValueError, match="batch 1"):
        model(ids[:1, 5:6], cache=cache)
    with pytest.raises(ValueError, match="complete 3 chunks"):
        model(ids[:, 5:12], neighbours[:, :1], cache=cache)
    assert cache.length == 5


# The copy task: a prompt chunk of filler tokens ending in a key token, followed by a value span of m
# random tokens. The value span appears only in the neighbour of the prompt chunk (the chunk itself plus
# its continuation, as retrieval returns it), so the values are predictable only through retrieval.
COPY_M, COPY_VALUES = 4, 16
KEY_0, VALUE_0, FILLER_0 = 1, 9, 25  # keys 1..8, values 9..24, filler 25..40


def copy_batch(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = COPY_M
    filler = torch.randint(FILLER_0, FILLER_0 + 16, (batch, m - 1), generator=gen)
    key = torch.randint(KEY_0, KEY_0 + 8, (batch, 1), generator=gen)
    values = torch.randint(VALUE_0, VALUE_0 + COPY_VALUES, (batch, m), generator=gen)
    sequence = torch.cat([filler, key, values], dim=1)
    return sequence, sequence[:, None, None]  # one chunk, one neighbour of r = 2m tokens


def copy_logits(model: RetroModel, sequence: torch.Tensor, neighbours: torch.Tensor | None) -> torch.Tensor:
    """Logits predicting the value span: positions m−1 … 2m−2 of the sequence minus its last token."""
    return model(sequence[:, :-1], neighbours).logits[:, COPY_M - 1 :]


def train_copy(use_neighbours: bool, steps: int = 150) -> RetroModel:
    torch.manual_seed(0)
    config = RetroConfig(
        vocab_size=41,
        d_model=64,
        n_layers=2,
        n_heads=8,
        d_ff=128,
        max_seq_len=16,
        chunk_size=COPY_M,
        num_neighbours=1,
        neighbour_len=2 * COPY_M,
        cca_start=1,
        cca_every=1,
        encoder_layers=1,
    )
    model = RetroModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    # Warm-up then cosine decay, with clipping: without them the tiny model's time to find the copy
    # alignment varies a lot from seed to seed.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * i / steps))
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        sequence, neighbours = copy_batch(gen, 32)
        logits = copy_logits(model, sequence, neighbours if use_neighbours else None)
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), sequence[:, COPY_M:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def copy_accuracy(model: RetroModel, sequence: torch.Tensor, neighbours: torch.Tensor | None) -> float:
    predicted = copy_logits(model, sequence, neighbours).argmax(-1)
    return (predicted == sequence[:, COPY_M:]).float().mean().item()


def test_model_learns_to_copy_a_span_that_only_its_neighbours_hold() -> None:
    with torch.random.fork_rng():
        held_out, held_out_neighbours = copy_batch(torch.Generator().manual_seed(1234), 256)
        chance = 1 / COPY_VALUES
        retro = train_copy(use_neighbours=True)
        assert copy_accuracy(retro, held_out, held_out_neighbours) > 0.95
        assert copy_accuracy(retro, held_out, None) < chance + 0.1
        # The same model trained without retrieval cannot know the values.
        plain = train_copy(use_neighbours=False)
        assert copy_accuracy(plain, held_out, None) < chance + 0.1
