"""Retro decoding on a tiny random model with MiniLM's real tokenizer: the KV cache changes nothing,
sampling is seeded and stays in the nucleus, generation ends for the right reason, retrieval happens
exactly when a chunk completes, and the streamed pieces add up to the final text."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from services.generator.retro import decode
from services.generator.retro.data import decode_answer, encode, load_tokenizer, prompt_ids
from services.generator.retro.decode import (
    DecodeParams,
    DecodeResult,
    Neighbour,
    ParamError,
    TextStream,
    generate,
    sample_token,
)
from services.generator.retro.model import RetroConfig, RetroModel

CHUNK = 4
PASSAGES = [
    Neighbour("lisbon#0", "lisbon", "Lisbon", "Lisbon is the capital of Portugal.", "It lies on the Tagus."),
    Neighbour("porto#2", "porto", "Porto", "Porto is known for port wine.", ""),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny matrices: one thread avoids oversubscribing a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tiny_config(tokenizer) -> RetroConfig:
    return RetroConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        n_layers=3,
        n_heads=2,
        d_ff=64,
        max_seq_len=128,
        chunk_size=CHUNK,
        num_neighbours=2,
        neighbour_len=8,
        cca_start=1,
        cca_every=1,
        encoder_layers=1,
        pad_token_id=tokenizer.pad_token_id,
    )


@pytest.fixture(scope="module")
def model(tokenizer) -> RetroModel:
    torch.manual_seed(0)
    return RetroModel(tiny_config(tokenizer)).eval()


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    return prompt_ids(tokenizer, "What is the capital of Portugal?", CHUNK)


def run(model, tokenizer, prompt, params: DecodeParams, retrieve=None) -> tuple[list[str], DecodeResult]:
    events = list(generate(model, tokenizer, prompt, PASSAGES, retrieve, params))
    *pieces, result = events
    assert isinstance(result, DecodeResult) and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == result.text
    return pieces, result


class Recorder:
    """A retrieve callback that records its queries and answers with one fresh passage per call."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def __call__(self, text: str) -> list[Neighbour]:
        self.queries.append(text)
        n = len(self.queries)
        return [Neighbour(f"hit{n}#0", f"hit{n}", f"Hit {n}", f"retrieved for {text}", "and more")]


def test_cached_decoding_gives_the_same_tokens_as_full_recompute(model, tokenizer, prompt) -> None:
    results = {}
    for use_cache in (True, False):
        recorder = Recorder()
        params = DecodeParams(max_tokens=14, use_cache=use_cache)
        results[use_cache] = (run(model, tokenizer, prompt, params, recorder)[1], recorder.queries)
    (cached, cached_queries), (full, full_queries) = results[True], results[False]
    assert cached.token_ids == full.token_ids and cached.text == full.text
    assert cached.finish_reason == full.finish_reason
    assert cached_queries == full_queries and cached_queries
    assert [c.passage_id for c in cached.citations] == [c.passage_id for c in full.citations]
    for a, b in zip(cached.citations, full.citations):
        assert a.weight == pytest.approx(b.weight, abs=1e-4)


def test_a_seed_makes_sampling_reproducible(model, tokenizer, prompt) -> None:
    def sample(seed: int) -> list[int]:
        _, result = run(model, tokenizer, prompt, DecodeParams(max_tokens=8, temperature=1.0, seed=seed))
        return result.token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_sampling_stays_in_the_top_p_nucleus_and_follows_the_temperature() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)

    def counts(params: DecodeParams, n: int = 2000) -> torch.Tensor:
        draws = [sample_token(logits, params, generator) for _ in range(n)]
        return torch.bincount(torch.tensor(draws), minlength=4) / n

    assert sample_token(logits, DecodeParams(), None) == 0  # greedy
    nucleus = counts(DecodeParams(temperature=1.0, top_p=0.7))
    assert nucleus[2:].sum() == 0 and nucleus[0] == pytest.approx(0.5 / 0.8, abs=0.03)
    assert (counts(DecodeParams(temperature=1.0, top_p=0.85))[:3] > 0).all()
    full = counts(DecodeParams(temperature=1.0))
    assert full.tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.03)
    assert counts(DecodeParams(temperature=0.05))[0] > 0.99  # a low temperature is nearly greedy
    assert counts(DecodeParams(temperature=1.0, top_p=1e-6))[0] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_out_of_range_params_are_rejected_by_name(kwargs: dict, field: str) -> None:
    with pytest.raises(ParamError) as err:
        DecodeParams(**kwargs)
    assert err.value.field == field and str(err.value).startswith(f"{field}:")


def test_max_tokens_ends_with_length(model, tokenizer, prompt) -> None:
    _, result = run(model, tokenizer, prompt, DecodeParams(max_tokens=5))
    assert result.finish_reason == "length" and len(result.token_ids) == 5
    assert result.text == decode_answer(tokenizer, result.token_ids)
    assert set(result.timings) == {"prefill", "decode", "chunk_retrieval"}


def test_the_answer_terminator_ends_with_stop(model, tokenizer, prompt, monkeypatch) -> None:
    _, free = run(model, tokenizer, prompt, DecodeParams(max_tokens=6, temperature=1.0, seed=3))
    terminator = free.token_ids[3]
    monkeypatch.setattr(decode, "end_of_answer_id", lambda _: terminator)
    _, stopped = run(model, tokenizer, prompt, DecodeParams(max_tokens=6, temperature=1.0, seed=3))
    first = free.token_ids.index(terminator)
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:first]


def test_a_stop_string_ends_the_text_before_it(model, tokenizer, prompt) -> None:
    params = dict(max_tokens=24, temperature=1.5, seed=11)
    _, free = run(model, tokenizer, prompt, DecodeParams(**params))
    words = free.text.split()
    assert len(words) > 4
    stop = words[len(words) // 2]
    _, stopped = run(model, tokenizer, prompt, DecodeParams(**params, stop=(stop, "never-appears")))
    assert stopped.finish_reason == "stop_string"
    assert stopped.text == free.text[: free.text.index(stop)].rstrip()
    assert stop not in stopped.text


def test_retrieval_happens_when_each_answer_chunk_completes(model, tokenizer, prompt) -> None:
    recorder = Recorder()
    _, result = run(model, tokenizer, prompt, DecodeParams(max_tokens=11), recorder)
    assert len(prompt) % CHUNK == 0
    ids = result.token_ids
    # Chunks completed by a token that was fed on: after 4 and 8 answer tokens (the 11th is never fed).
    expected = [decode_answer(tokenizer, ids[end - CHUNK : end]) for end in range(CHUNK, len(ids), CHUNK)]
    assert result.finish_reason == "length" and recorder.queries == expected
    cited = {c.passage_id for c in result.citations}
    assert cited == {"lisbon#0", "porto#2", "hit1#0", "hit2#0"}
    assert all(c.weight > 0 for c in result.citations)
    assert sum(c.weight for c in result.citations) == pytest.approx(1.0, abs=1e-4)
    assert [c.weight for c in result.citations] == sorted((c.weight for c in result.citations), reverse=True)


def test_without_retrieval_every_chunk_keeps_the_question_passages(model, tokenizer, prompt) -> None:
    _, result = run(model, tokenizer, prompt, DecodeParams(max_tokens=11), None)
    assert {c.passage_id for c in result.citations} == {"lisbon#0", "porto#2"}
    assert result.timings["chunk_retrieval"] == 0.0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streamed_pieces_add_up_to_the_decoded_answer(model, tokenizer, prompt, seed: int) -> None:
    pieces, result = run(model, tokenizer, prompt, DecodeParams(max_tokens=20, temperature=2.0, seed=seed))
    assert len(pieces) > 1
    assert result.text == decode_answer(tokenizer, result.token_ids)


def test_text_stream_never_takes_back_what_it_emitted(tokenizer) -> None:
    text = "It's 4,500 people, don't you see? The play##ing field: (Ørsted) co-op... done."
    ids = encode(tokenizer, text)
    stream = TextStream(tokenizer)
    pieces = [stream.push(ids[:n])[0] for n in range(1, len(ids) + 1)]
    pieces.append(stream.finish(ids))
    assert "".join(pieces) == decode_answer(tokenizer, ids)
    assert sum(bool(p) for p in pieces) > 5  # streamed word by word, not all at the end


def test_text_stream_holds_back_a_possible_stop_string(tokenizer) -> None:
    ids = encode(tokenizer, "the answer is lisbon end of story")
    stream = TextStream(tokenizer, stop=("end of",))
    emitted = ""
    for n in range(1, len(ids) + 1):
        piece, stopped = stream.push(ids[:n])
        emitted += piece
        assert "end" not in emitted
        if stopped:
            break
    assert stopped and emitted == "the answer is lisbon"


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_copy_head_cites_the_passage_its_answer_copies_from(tokenizer, prompt, use_cache: bool) -> None:
    torch.manual_seed(0)
    model = RetroModel(dataclasses.replace(tiny_config(tokenizer), copy_head=True)).eval()
    with torch.no_grad():  # always copy, and point at neighbour slot 2
        model.copy.gate.weight.zero_()
        model.copy.gate.bias.fill_(-50.0)
        model.copy.rank_bias.copy_(torch.tensor([-30.0, 30.0]))
    # Passage 1 fills all 8 neighbour tokens, passage 2 is one token: the CCA attention, spread over
    # tokens, favours passage 1, while every answer token is copied from passage 2.
    long = Neighbour("long#0", "long", "Long", "Lisbon is the capital of Portugal and its largest city.")
    short = Neighbour("short#0", "short", "Short", "Porto")
    params = DecodeParams(max_tokens=6, use_cache=use_cache)
    *_, result = generate(model, tokenizer, prompt, [long, short], None, params)
    assert len(encode(tokenizer, short.text)) == 1
    assert set(result.token_ids) == set(encode(tokenizer, short.text))
    first, second = result.citations
    assert first.passage_id == "short#0" and first.weight > 0.99
    assert second.passage_id == "long#0" and second.weight < 0.01
