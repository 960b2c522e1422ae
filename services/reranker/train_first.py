"""`ragfleet train first`: the default FIRST reranker, a causal LM taught to name the best passage of a
window in its first generated token.

The model. No causal LM is installable here, and the only pretrained weights are all-MiniLM-L6-v2's, so
the default student (`base="minilm-decoder"`) is all of MiniLM run as a decoder: Hugging Face's
`BertLMHeadModel` with `is_decoder=True` (causal self-attention), every encoder weight copied from MiniLM,
the LM head tied to MiniLM's word embeddings. It reuses all the language the 6 layers learned, where a
decoder with only MiniLM's embeddings would learn to read from a few thousand training windows, and
MiniLM's WordPiece vocabulary has every identifier A..T as one token. BERT's positions are a learned table
of 512, too few for a window of 20 passages, so the table is stretched (linear interpolation) to the
window's prompt: `prompt.fixed + window x passage_tokens` positions, which also makes the FIRST backend cut
passages to `passage_tokens`, as in training. The checkpoint is a plain HF causal LM
(AutoModelForCausalLM loads it), so `services.reranker.first` serves it like any other; `base` may also
name any HF causal LM (a local path or hub id), which is then fine-tuned as it is. The project's other
decoder, Retro, is no candidate: it needs retrieved neighbours and lives in the generator, which the
reranker may not import.

Examples (`services.reranker.trainer`: BEIR qrels or pseudo-queries, negatives mined through the fleet,
scored by the teacher, kept for resuming) are windows of `window` texts: the positive and `window - 1`
negatives. A step trains on `batch_size` examples, each in `orders` windows (by default all `window` of
them): an order drawn from (seed, example) and its rotations, so every passage sits at every position
once. An identifier's bias, which the student has from the start and which is not about the passages,
then gets no net push from the step, and what the RankNet loss can still lower is the part that reads
the passages. With one random order an example (what suits a 7B model that already reads, as FIRST
trains), a small student's steps only push that bias to and fro, and it names the same identifier
whatever it is shown. The target ranking puts the positive first (the qrels or the cloze source say it
is relevant) and the negatives after it in the teacher's order: "cross-encoder:PATH" (a trained
cross-encoder, the default `<home>/models/cross-encoder`) or "dense".

Loss, per window (FIRST, Reddy et al. 2024): the LM cross-entropy of the target ranking "B] > [A] > ..."
after the prompt's closing "[", plus `ranking_weight` (10) x a weighted RankNet on the identifiers' logits
at the first generated position: for every pair ranked i above j, log(1 + exp(s_j - s_i)) weighted by
1 / (r_i + r_j) (r the target ranks, from 1), normalised by the weights' sum. The MiniLM decoder's word
embeddings stay frozen (half its parameters; with the tied head the identifiers' output vectors stay
MiniLM's, and the head's new transform and bias learn to meet them); a `base` model is trained whole.
Each window is its own forward pass (`micro_batch=1`: no padding, the activations of one window held at a
time).

Cost. On the development machine's 2 idle cores a window of 20 passages of 48 tokens (at most 1,338
tokens) takes about 3.75 s forward and backward (2 took 7.5 s), so the default 10 steps of one example in
20 orders (200 windows) take about 12.5 minutes. Mining and the teacher add to that: the teacher scores 20
texts a query, 4.1 minutes for 200 queries (SciFact's train split has 809).

What it learns at this budget: on 2 CPU cores, not the task. On probes of windows of 3 whose positive
begins with the query's own text, position-balanced steps (3 rotations of one example) taught the MiniLM
decoder to name it on 0.98 of held-out windows within 1,500 training windows, while the same steps with 3
random orders stayed at one identifier (chance). With real positives (titles and their own documents
against mined negatives, no copied text) balanced steps stayed at chance after 1,800 windows: naming is
learnable on 2 cores, judging relevance was not learned in that budget. A student of the default's 200
windows (10 examples in 20 orders) on SciFact's corpus (`--corpus`, the cross-encoder teacher) ranks by
neither: alone it scores 0.085 nDCG@10 on its held-out titles as retrieved and 0.064 on the same lists
reversed (`ndcg@10_reversed` in train.json), so weight tuning sets it to 1.0, retrieval order, and the
command warns that it adds nothing. A GPU (`--device cuda`) takes the longer recipes the task needs
(`--steps`, `--passage-tokens`; resume a finished run to train on).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from services.datasets.mining import Example
from services.reranker.first import FirstReranker, Prompt, max_positions
from services.reranker.trainer import TunedRecord, training_data
from services.runtime.artifacts import Checkpoints
from services.runtime.model_errors import ParamError
from services.runtime.models import resolve_model
from services.runtime.settings import RerankerSettings
from services.runtime.training import check_ranges, check_teacher, publish_run, save_pretrained, train_steps

MINILM_DECODER = "minilm-decoder"
MINILM = "all-MiniLM-L6-v2"
# Steps of the default recipe: one example a step, in all 20 orders of its window.
FIRST_STEPS = 10


@dataclass(frozen=True)
class Window:
    """One training window: the prompt's ids, the target ranking's ids, and each passage's target rank
    (from 1, in the order the prompt shows them)."""

    prompt: list[int]
    answer: list[int]
    ranks: list[int]


def minilm_decoder(positions: int) -> torch.nn.Module:
    """all-MiniLM-L6-v2 as a causal LM (`BertLMHeadModel`, is_decoder) of `positions` positions, for
    MiniLM's tokenizer: every MiniLM weight copied, the position table stretched to `positions` by linear
    interpolation, the LM head's transform new."""
    from transformers import AutoConfig, BertLMHeadModel, BertModel

    path = resolve_model(MINILM)
    config = AutoConfig.from_pretrained(path)
    config.update({"is_decoder": True, "max_position_embeddings": positions})
    config.architectures = ["BertLMHeadModel"]
    model = BertLMHeadModel(config)
    weights = BertModel.from_pretrained(path, add_pooling_layer=False).state_dict()
    table = weights["embeddings.position_embeddings.weight"]
    weights["embeddings.position_embeddings.weight"] = F.interpolate(
        table.T[None], size=positions, mode="linear", align_corners=True
    )[0].T
    weights.pop("embeddings.position_ids", None)
    model.bert.load_state_dict(weights)
    model.tie_weights()
    return model


def _student(base: str, window: int, passage_tokens: int) -> tuple[torch.nn.Module, Any]:
    """The model to train and its tokenizer: the MiniLM decoder sized for the window, or `base` as it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(MINILM if base == MINILM_DECODER else base)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    if base == MINILM_DECODER:
        return minilm_decoder(Prompt(tokenizer, window).fixed + window * passage_tokens), tokenizer
    return AutoModelForCausalLM.from_pretrained(resolved), tokenizer


def windows_of(
    reranker: FirstReranker, examples: Sequence[Example], seed: int, orders: int = 1
) -> list[Window]:
    """Each example as `orders` windows, one after another: an order drawn from (seed, example) and its
    rotations by len(texts) / orders places; the target ranking is the positive first, then the
    negatives by teacher score."""
    found = []
    for i, ex in enumerate(examples):
        scores = ex.teacher or []
        target = [0] + sorted(range(1, len(ex.texts)), key=lambda j: -scores[j])
        rank_of = {j: rank for rank, j in enumerate(target, start=1)}
        drawn = np.random.default_rng([seed, i]).permutation(len(ex.texts)).tolist()
        for rotation in range(orders):
            shift = rotation * len(drawn) // orders
            shown = drawn[shift:] + drawn[:shift]
            ranks = [rank_of[j] for j in shown]
            query, passages, _ = reranker.prompt.tokenize(
                ex.query, [ex.texts[j] for j in shown], reranker.max_length
            )
            order = sorted(range(len(shown)), key=lambda k: ranks[k])
            prompt = reranker.prompt.prompt_ids(query, passages)
            found.append(Window(prompt, reranker.prompt.answer_ids(order), ranks))
    return found


def weighted_ranknet(scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """RankNet over every pair (i above j in `ranks`), each weighted 1 / (r_i + r_j), as a weighted mean."""
    r = ranks.float()
    above = r[:, None] < r[None, :]
    weight = 1.0 / (r[:, None] + r[None, :])
    pair = F.softplus(scores[None, :] - scores[:, None])
    return (pair * weight)[above].sum() / weight[above].sum()


def first_loss(
    model: torch.nn.Module, label_ids: Sequence[int], batch: Sequence[Window], *, ranking_weight: float
) -> torch.Tensor:
    """The mean over `batch` of the answer's LM loss plus `ranking_weight` x the first token's RankNet."""
    total = torch.zeros((), device=model.device)
    for window in batch:
        ids = torch.tensor([window.prompt + window.answer], device=model.device)
        # The logits of the last prompt position and the answer's: each predicts the next answer token.
        logits = model(input_ids=ids, logits_to_keep=len(window.answer) + 1).logits[0, :-1].float()
        answer = torch.tensor(window.answer, device=model.device)
        lm = F.cross_entropy(logits, answer)
        first = logits[0, list(label_ids[: len(window.ranks)])]
        ranking = weighted_ranknet(first, torch.tensor(window.ranks, device=model.device))
        total = total + lm + ranking_weight * ranking
    return total / len(batch)


def train_first(
    client: Any,
    *,
    out: Path,
    teacher: str,
    beir: Path | None = None,
    split: str = "train",
    corpus: Path | None = None,
    index: str | None = None,
    base: str = MINILM_DECODER,
    window: int = 20,
    orders: int | None = None,
    passage_tokens: int = 48,
    steps: int = FIRST_STEPS,
    batch_size: int = 1,
    lr: float = 5e-5,
    warmup: int = 1,
    ranking_weight: float = 10.0,
    mine_depth: int = 30,
    validation: float = 0.1,
    max_queries: int | None = None,
    seed: int = 0,
    checkpoint_every: int = 25,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Trains a FIRST reranker (see the module docstring) with `client`, a `ragfleet.Client` of the running
    fleet (used only to mine negatives); returns the run's metrics."""
    started = time.perf_counter()
    orders = window if orders is None else orders
    check_ranges(
        at_least={
            "steps": (steps, 1),
            "batch_size": (batch_size, 1),
            "window": (window, 2),
            "orders": (orders, 1),
            "passage_tokens": (passage_tokens, 8),
            "warmup": (warmup, 0),
            "mine_depth": (mine_depth, window - 1),
            "checkpoint_every": (checkpoint_every, 1),
        },
        positive={"lr": lr},
        non_negative={"ranking_weight": ranking_weight},
        below_one={"validation": validation},
    )
    if orders > window:
        raise ParamError("orders", f"must be at most the window's {window} rotations, got {orders}")
    settings = RerankerSettings(first_window=window, first_passage_tokens=passage_tokens, device=device)
    check_teacher(teacher)
    out = Path(out)
    checkpoints = Checkpoints.for_run(out, resume)
    data = training_data(
        client,
        checkpoints,
        beir=beir,
        split=split,
        corpus=corpus,
        index=index,
        max_queries=max_queries,
        batch_size=batch_size,
        seed=seed,
        mine_depth=mine_depth,
        negatives=window - 1,
        teacher=teacher,
        validation=validation,
        device=device,
        progress=progress,
    )
    run = {"base": base, "data": data.key, "batch_size": batch_size, "orders": orders}
    run |= {"passage_tokens": passage_tokens}
    run |= {"lr": lr, "warmup": warmup, "ranking_weight": ranking_weight, "seed": seed}

    torch.manual_seed(seed)
    model, tokenizer = _student(base, window, passage_tokens)
    if base == MINILM_DECODER:
        model.get_input_embeddings().weight.requires_grad_(False)
    # The backend itself builds the prompts, so training sees what serving will.
    reranker = FirstReranker(model.to(device), tokenizer, settings)
    windows = windows_of(reranker, data.examples, seed, orders)
    done = train_steps(
        model,
        lambda rows: first_loss(
            model, reranker.label_ids, [windows[i] for i in rows], ranking_weight=ranking_weight
        ),
        len(windows),
        checkpoints=checkpoints,
        run=run,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        seed=seed,
        checkpoint_every=checkpoint_every,
        micro_batch=1,
        group=orders,
        label="train first",
        progress=progress,
    )
    metrics = done.metrics(len(data.examples), started, out)
    record = {**run, "window": window, "teacher": teacher, "index": data.index}
    record |= {"data_source": str(data.source), "split": split if beir else None}
    record |= {"examples": len(data.examples), "windows": len(windows)}
    record |= {"positions": max_positions(model.config)}
    record |= {"final_loss": metrics["final_loss"]}
    tuned = TunedRecord(record, FirstReranker, settings, data.held_out, progress)
    publish_run(out, save_pretrained(model, tokenizer), tuned)
    return metrics | tuned.summary()
