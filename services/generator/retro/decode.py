"""Retro decoding: from a prompt and the question's passages to streamed answer text with citations.

One generation (`generate`) runs RETRO inference on a `RetroModel`:

* **Prefill, then one token per step.** The prompt (`data.prompt_ids`: left-padded to whole chunks) is fed
  once into a `RetroCache`; each step then feeds only the token just chosen. With
  `DecodeParams.use_cache=False` every step recomputes the whole sequence instead: the benchmark's baseline
  and the reference the cached path is tested against (greedy decoding gives the same tokens).
* **Neighbours of the prompt.** Every chunk that ends inside the prompt is conditioned on the question's
  passages, as the model was trained (`retro.train`): the first k passages in the order given (the
  Pipeline's reranked, else fused, order), passage j in neighbour slot j, each followed by its
  continuation (`data.neighbour_ids`). Slots without a passage are all pad, which the model masks out.
* **Retrieval every chunk.** When the generated sequence completes a chunk of m tokens, `retrieve(text of
  that chunk)` returns fresh neighbours (its first k hits), fetched before the token that completes the
  chunk is fed, so they condition the tokens from that one on (RETRO's alignment). Without `retrieve`, or
  for a chunk whose text is blank, the question's passages are used again.
* **Choosing a token.** Greedy when temperature is 0; otherwise softmax(logits / temperature) restricted
  to the top-p nucleus, drawn with a `torch.Generator` seeded from `seed` (reproducible) or at random.
  Generation ends on the answer terminator (`data.end_of_answer_id`, finish "stop"), on a stop string
  (finish "stop_string"; the stop string and what follows are dropped) or after max_tokens ("length").
* **Streaming text.** The answer text is `data.decode_answer` of the generated ids, and WordPiece decoding
  is not append-only: a "##" piece glues onto the word before it, and the tokenizer's clean-up rewrites
  spaces before punctuation. Each step therefore decodes all generated ids again and emits only text that
  no later token can change: everything before the last whitespace (every rewrite starts at a whitespace),
  minus any tail that could be the start of a stop string. The pieces yielded concatenate to the final text.
* **Citations.** A passage's weight is a share in [0, 1]; passages are sorted by it, largest first.
  With a copy head it is what the answer copied from the passage: per answer token, the pointer mass
  (`RetroOutput.copy_weights`: (1 − gate) · pointer attention) that the position which produced it put
  on the passage's tokens with that token's id, i.e. the probability that the token was copied from
  that passage, averaged over the answer tokens. Without one, it is the attention mass
  (`RetroOutput.neighbour_weights`, last CCA layer) the passage received from the positions that
  produced answer tokens, summed over chunks and divided by the number of those positions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from services.generator.retro.data import decode_answer, end_of_answer_id, neighbour_ids
from services.generator.retro.model import RetroCache, RetroModel
from services.runtime.model_errors import ParamError

FINISH_REASONS = ("stop", "length", "stop_string")


@dataclass(frozen=True)
class Neighbour:
    """A retrieved passage as a neighbour: its text, its document's next passage, and where it came from."""

    passage_id: str
    doc_id: str
    title: str
    text: str
    continuation: str = ""


@dataclass(frozen=True)
class DecodeParams:
    max_tokens: int = 64
    # 0 means greedy decoding.
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # False recomputes the whole sequence every step (no KV cache).
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ParamError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ParamError("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ParamError("top_p", f"must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ParamError("stop", "stop strings must not be empty")


@dataclass(frozen=True)
class Citation:
    passage_id: str
    doc_id: str
    title: str
    weight: float


@dataclass(frozen=True)
class DecodeResult:
    text: str
    finish_reason: str  # one of FINISH_REASONS
    token_ids: list[int]
    citations: list[Citation]
    # Milliseconds: "prefill" (the prompt's forward pass), "decode" (every later step), "chunk_retrieval"
    # (time spent in `retrieve`, which "decode" excludes).
    timings: dict[str, float] = field(default_factory=dict)


# What `generate` yields: text pieces as they are decided, then one DecodeResult.
DecodeEvent = str | DecodeResult
Retrieve = Callable[[str], list[Neighbour]]


def sample_token(logits: torch.Tensor, params: DecodeParams, generator: torch.Generator | None) -> int:
    """The next token from one position's logits (vocab,): greedy at temperature 0, else nucleus sampling."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix of the sorted tokens whose mass reaches top_p (always the first one).
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        sorted_probs[mass_before >= params.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Turns the growing list of generated ids into text pieces that are never taken back (see above)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.text = ""  # everything emitted so far

    def push(self, ids: Sequence[int]) -> tuple[str, bool]:
        """The new text piece after `ids` (all generated ids so far), and whether a stop string appeared."""
        decoded = decode_answer(self.tokenizer, ids)
        hits = [i for i in (decoded.find(s) for s in self.stop) if i >= 0]
        if hits:
            return self._emit(decoded[: min(hits)].rstrip()), True
        cut = max((decoded.rfind(c) for c in " \t\n"), default=-1)
        for s in self.stop:
            # The earliest position whose text up to `cut` could still grow into this stop string.
            for start in range(max(len(self.text), cut - len(s) + 1), cut):
                if s.startswith(decoded[start:cut]):
                    cut = start
                    break
        return self._emit(decoded[:cut] if cut > len(self.text) else self.text), False

    def finish(self, ids: Sequence[int]) -> str:
        """The rest of the text once generation has ended without a stop string."""
        return self._emit(decode_answer(self.tokenizer, ids))

    def _emit(self, text: str) -> str:
        piece = text[len(self.text) :]
        self.text = text
        return piece


class _Neighbours:
    """Neighbour ids of every chunk so far, (k, r) each, and the passages they came from."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, k: int, r: int, device: torch.device) -> None:
        self.tokenizer, self.k, self.r, self.device = tokenizer, k, r, device
        self.rows: list[torch.Tensor] = []
        self.sources: list[list[Neighbour]] = []
        self.empty = torch.full((k, r), tokenizer.pad_token_id, dtype=torch.long, device=device)

    def add(self, neighbours: Sequence[Neighbour]) -> None:
        chosen = list(neighbours[: self.k])
        row = self.empty.clone()
        for j, n in enumerate(chosen):
            ids = neighbour_ids(self.tokenizer, n.text, n.continuation, self.r)
            row[j] = torch.tensor(ids, dtype=torch.long, device=self.device)
        self.rows.append(row)
        self.sources.append(chosen)

    def tensor(self, n_chunks: int) -> torch.Tensor:
        """(1, n_chunks, k, r): the rows so far, then pad rows for chunks not yet complete (never read)."""
        rows = self.rows[:n_chunks] + [self.empty] * (n_chunks - len(self.rows))
        return torch.stack(rows)[None]


def _answer_mass(weights: torch.Tensor, start: int, end: int, first_answer: int, m: int) -> torch.Tensor:
    """(n_chunks, k) attention mass summed over the positions in [start, end) that produce answer tokens
    (those >= first_answer), from `weights` (n_chunks, k) averaged over each attending group's positions."""
    positions = torch.arange(max(start, first_answer, m - 1), end)
    counts = torch.bincount((positions - (m - 1)) // m, minlength=weights.shape[0])[: weights.shape[0]]
    return weights.float().cpu() * counts[:, None]


def _copied_mass(pointer: torch.Tensor, row: torch.Tensor, token: int) -> torch.Tensor:
    """(k,): one position's pointer mass (k, r) on the neighbour tokens of `row` (k, r) that are `token`."""
    return (pointer * (row.cpu() == token)).sum(-1)


def _citations(mass: torch.Tensor, sources: list[list[Neighbour]], answer_positions: int) -> list[Citation]:
    totals: dict[str, float] = {}
    passages: dict[str, Neighbour] = {}
    for chunk, chosen in enumerate(sources[: mass.shape[0]]):
        for j, n in enumerate(chosen):
            totals[n.passage_id] = totals.get(n.passage_id, 0.0) + float(mass[chunk, j])
            passages[n.passage_id] = n
    share = 1.0 / max(answer_positions, 1)
    return sorted(
        (Citation(p.passage_id, p.doc_id, p.title, totals[p.passage_id] * share) for p in passages.values()),
        key=lambda c: -c.weight,
    )


@torch.inference_mode()
def generate(
    model: RetroModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Sequence[int],
    first_neighbours: Sequence[Neighbour],
    retrieve: Retrieve | None,
    params: DecodeParams,
) -> Iterator[DecodeEvent]:
    """Yields the answer's text pieces as they are decided, then a DecodeResult (module docstring).

    `prompt` is `data.prompt_ids(...)`; `first_neighbours` are the question's passages, best first.
    """
    config = model.config
    m = config.chunk_size
    if not prompt:
        raise ValueError("prompt: is empty")
    if len(prompt) >= config.max_seq_len:
        raise ValueError(f"prompt: {len(prompt)} tokens leave no room in max_seq_len {config.max_seq_len}")
    device = model.embed.weight.device
    end_id = end_of_answer_id(tokenizer)
    budget = min(params.max_tokens, config.max_seq_len - len(prompt))
    generator = None
    if params.temperature > 0:
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)

    neighbours = _Neighbours(tokenizer, config.num_neighbours, config.neighbour_len, device)
    for _ in range(len(prompt) // m):
        neighbours.add(first_neighbours)
    cache: RetroCache | None = model.new_cache(1) if params.use_cache else None
    ids = list(prompt)
    first_answer = len(prompt) - 1  # this position's output is the first answer token
    # (n_chunks, k) citation mass per chunk and neighbour slot: copied (copy head) or attended (CCA).
    mass = torch.zeros(-(-(len(prompt) + budget) // m), config.num_neighbours)

    def forward(new: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feeds `new` (the whole sequence without a cache); returns the last position's logits and, with a
        copy head, its pointer mass (k, r) on the neighbour tokens of its group."""
        total = len(ids)
        start = total - len(new)
        out = model(
            torch.tensor([new], dtype=torch.long, device=device),
            neighbours.tensor(-(-total // m)),
            cache=cache,
            output_neighbour_weights=True,
        )
        if out.copy_weights is not None:
            return out.logits[0, -1], out.copy_weights[0, -1].float().cpu()
        if out.neighbour_weights is not None:
            call = _answer_mass(out.neighbour_weights[0], start, total, first_answer, m)
            if cache is None:  # a full recompute covers every position again
                mass.zero_()
            mass[: call.shape[0]] += call
        return out.logits[0, -1], None

    timings = {"prefill": 0.0, "decode": 0.0, "chunk_retrieval": 0.0}
    started = time.perf_counter()
    logits, pointer = forward(ids)
    copy_head = pointer is not None
    timings["prefill"] = (time.perf_counter() - started) * 1000
    decode_started = time.perf_counter()

    stream = TextStream(tokenizer, params.stop)
    generated: list[int] = []
    finish = "length"
    while True:
        token = sample_token(logits, params, generator)
        if token == end_id:
            finish = "stop"
            break
        if pointer is not None:
            # The position that produced `token` is the last of `ids`, in the attending group of this chunk.
            chunk = (len(ids) - m) // m
            mass[chunk] += _copied_mass(pointer, neighbours.rows[chunk], token)
        generated.append(token)
        ids.append(token)
        piece, stopped = stream.push(generated)
        if piece:
            yield piece
        if stopped:
            finish = "stop_string"
            break
        if len(generated) >= budget:
            break
        if len(ids) % m == 0 and len(ids) > len(prompt):
            # This token completes a chunk past the prompt: retrieve with its text before feeding the token.
            chunk_text = decode_answer(tokenizer, ids[-m:])
            fresh: Sequence[Neighbour] = first_neighbours
            if retrieve is not None and chunk_text.strip():
                retrieve_started = time.perf_counter()
                fresh = retrieve(chunk_text)
                timings["chunk_retrieval"] += (time.perf_counter() - retrieve_started) * 1000
            neighbours.add(fresh)
        logits, pointer = forward([token] if cache is not None else ids)
    if finish != "stop_string":
        piece = stream.finish(generated)
        if piece:
            yield piece
    timings["decode"] = (time.perf_counter() - decode_started) * 1000 - timings["chunk_retrieval"]
    # Copied mass is counted per answer token; attention per position that produced one (the last
    # position's output, the end-of-answer token, counts when it was chosen).
    answer_positions = len(generated) if copy_head else len(ids) - first_answer - (finish != "stop")
    yield DecodeResult(
        text=stream.text,
        finish_reason=finish,
        token_ids=generated,
        citations=_citations(mass, neighbours.sources, answer_positions),
        timings=timings,
    )
