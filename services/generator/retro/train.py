"""Training Retro (`ragfleet train retro`): the loop, its checkpoints and the held-out evaluation.

The rows come from `retro.examples` (token windows and QA prompts with their neighbours, which
`retro.neighbours` retrieves and caches). AdamW (weight decay on matrices only), a warmup-stable-decay
learning rate (`lr_at`), gradient clipping. The data order is a seeded permutation per epoch, so step s
always sees the same batch. Every `checkpoint_every` steps a step checkpoint goes to `<out>/checkpoints/`
(`runtime.artifacts.Checkpoints`: the parameters, the optimizer's state, the run's settings and losses);
`resume` continues from the latest one. The finished model folder is `<out>/config.json` +
`model.safetensors` + `train.json` (settings, losses, eval), published together, so a folder with
train.json is complete.

Eval: perplexity on the held-out documents, with their retrieved neighbours and without retrieval
(neighbours=None).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from services.generator.retro.data import load_tokenizer
from services.generator.retro.examples import IGNORE, Examples, build_examples
from services.generator.retro.model import RetroConfig, RetroModel, load_parameters
from services.generator.retro.neighbours import NEIGHBOURS_DIR, PipelineRetrieval, Retrieval, prepare_index
from services.runtime.artifacts import CHECKPOINTS_DIR, Checkpoints, write_directory
from services.runtime.training import batch_indices, check_ranges, warmup_decay_lr

TRAIN_FILE = "train.json"


@dataclass(frozen=True)
class TrainSettings:
    """A run's recipe; `ragfleet train retro --config FIELD=VALUE` sets any field (and RetroConfig's)."""

    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 512
    lr: float = 1e-3
    min_lr_ratio: float = 0.0  # the rate decays to lr · min_lr_ratio
    warmup: int = 100
    decay_fraction: float = 0.2  # the last fraction of the steps decays the rate linearly
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_fraction: float = 0.05
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    extra_hits: int = 4  # searched beyond k, so hits from the chunk's own document can be dropped
    # RETRO drops a training chunk's neighbours from its own document; False keeps them, which teaches
    # copying from neighbours fast (held-out documents always drop them, so eval stays honest).
    exclude_own_document: bool = True

    def check(self, config: RetroConfig) -> None:
        """Raises ValueError naming the first bad field."""
        counts = ("steps", "batch_size", "seq_len", "checkpoint_every", "keep_checkpoints")
        check_ranges(at_least={name: (getattr(self, name), 1) for name in counts}, positive={"lr": self.lr})
        if self.seq_len % config.chunk_size or self.seq_len > config.max_seq_len:
            raise ValueError(
                f"seq_len: must be a multiple of chunk_size {config.chunk_size} and at most max_seq_len "
                f"{config.max_seq_len}, got {self.seq_len}"
            )
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup: must be between 0 and steps ({self.steps}), got {self.warmup}")
        for name in ("decay_fraction", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be between 0 and 1, got {getattr(self, name)}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")


def lr_at(step: int, s: TrainSettings) -> float:
    """Warmup-stable-decay: linear warmup over `warmup` steps, constant, then a linear decay to
    lr · min_lr_ratio over the last `decay_fraction` of the steps (step counts from 0), reached at the
    last step."""
    last = s.steps - 1
    decay_start = last - round(s.steps * s.decay_fraction)
    return warmup_decay_lr(
        step, s.lr, warmup=s.warmup, decay_start=decay_start, decay_end=last, min_ratio=s.min_lr_ratio
    )


@dataclass(frozen=True)
class TrainProgress:
    stage: str  # "ingesting", "retrieving", "training", "evaluating"
    done: int
    total: int
    loss: float | None = None


ProgressFn = Callable[[TrainProgress], None]


# --- the loop -------------------------------------------------------------------------------------


def lm_loss(
    model: RetroModel, tokens: torch.Tensor, labels: torch.Tensor, neighbours: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the labelled positions, and how many there are.

    Columns after the batch's last labelled position are cut first (short answers in long rows), and the
    output head runs only where a label is.
    """
    labelled = (labels != IGNORE).any(0).nonzero()
    end = int(labelled.max()) + 1 if len(labelled) else labels.shape[1]
    tokens, targets = tokens[:, :end], labels[:, 1:end]
    predicts = targets != IGNORE  # position t predicts token t + 1
    logits = model(tokens, neighbours, select=F.pad(predicts, (0, 1))).logits
    count = int(predicts.sum())
    return F.cross_entropy(logits, targets[predicts]), count


@torch.no_grad()
def perplexity(
    model: RetroModel, examples: Examples, *, retrieval: bool, batch_size: int = 16
) -> float | None:
    """exp(mean NLL per labelled token) over `examples`, with their neighbours or with none."""
    if len(examples) == 0:
        return None
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        tokens, labels, neighbours = examples.batch(np.arange(start, min(start + batch_size, len(examples))))
        loss, n = lm_loss(model, tokens, labels, neighbours if retrieval else None)
        total, count = total + float(loss) * n, count + n
    return math.exp(total / count) if count else None


def _optimizer(model: RetroModel, s: TrainSettings) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": s.weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95))


def _save_final(out: Path, model: RetroModel, record: dict[str, Any]) -> None:
    """Publishes `<out>` as the model folder with train.json, keeping the run's checkpoints and neighbours."""
    record_bytes = json.dumps(record, indent=2, sort_keys=True).encode()
    write_directory(out, {**model.files(), TRAIN_FILE: record_bytes}, carry=(CHECKPOINTS_DIR, NEIGHBOURS_DIR))


def train_retro(
    retrieval: Retrieval,
    documents: Sequence[dict],
    out: Path,
    *,
    config: RetroConfig | None = None,
    settings: TrainSettings = TrainSettings(),
    qa: Sequence[tuple[str, str]] = (),
    tokenizer: str = "all-MiniLM-L6-v2",
    resume: bool = False,
    extra: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Trains a Retro model on `documents` (dicts with "id" and "text") and `qa` pairs; see the module
    docstring. `config` defaults to RetroConfig's defaults for the tokenizer's vocabulary; `extra` is
    stored in train.json. Returns what train.json holds."""
    out = Path(out)
    tok = load_tokenizer(tokenizer)
    config = config or RetroConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    if config.vocab_size < len(tok) or config.pad_token_id != tok.pad_token_id:
        raise ValueError(
            f"config: vocab_size must cover the tokenizer's {len(tok)} ids and pad_token_id must be "
            f"{tok.pad_token_id}"
        )
    settings.check(config)
    if not documents and not qa:
        raise ValueError("documents: nothing to train on")
    checkpoints = Checkpoints(out / CHECKPOINTS_DIR, keep=settings.keep_checkpoints)
    latest = checkpoints.start(resume)
    started = time.perf_counter()

    def retrieving(done: int, total: int) -> None:
        if progress:
            progress(TrainProgress("retrieving", done, total))

    train, held_out, data = build_examples(
        tok,
        retrieval,
        documents,
        qa,
        config,
        seq_len=settings.seq_len,
        eval_fraction=settings.eval_fraction,
        seed=settings.seed,
        extra_hits=settings.extra_hits,
        exclude_own_document=settings.exclude_own_document,
        cache_dir=out / NEIGHBOURS_DIR,
        progress=retrieving,
    )
    run_state = {
        "config": config.to_dict(),
        "settings": dataclasses.asdict(settings),
        "tokenizer": tokenizer,
        "data": {key: data[key] for key in ("neighbour_cache", "lm_windows", "qa_examples")},
    }
    torch.manual_seed(settings.seed)
    model = RetroModel(config)
    optimizer = _optimizer(model, settings)
    losses: list[float] = []
    step = 0
    if latest is not None:
        saved = latest.state()
        for name in ("config", "settings", "tokenizer", "data"):
            if saved[name] != run_state[name]:
                raise ValueError(
                    f"resume: {latest.path} was made with a different {name}; train into another out"
                )
        load_parameters(model, dict(model.named_parameters()), latest.weights_file)
        latest.restore(optimizer)
        step, losses = latest.step, saved["losses"]

    model.train()
    while step < settings.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        rows = batch_indices(step, settings.batch_size, len(train), settings.seed)
        tokens, labels, neighbours = train.batch(rows)
        loss, _ = lm_loss(model, tokens, labels, neighbours)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        step += 1
        losses.append(round(loss.item(), 5))
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            checkpoints.save(step, dict(model.named_parameters()), optimizer, {**run_state, "losses": losses})
        if progress:
            progress(TrainProgress("training", step, settings.steps, losses[-1]))
    train_seconds = time.perf_counter() - started

    if progress:
        progress(TrainProgress("evaluating", 0, 1))
    evaluation = {
        "ppl_retrieval": perplexity(model, held_out, retrieval=True),
        "ppl_no_retrieval": perplexity(model, held_out, retrieval=False),
        "windows": len(held_out),
    }
    record = {
        **run_state,
        "data": data,
        "steps": settings.steps,
        "losses": losses,
        "eval": evaluation,
        "seconds": round(train_seconds, 1),
        **(extra or {}),
    }
    _save_final(out, model, record)
    if progress:
        progress(TrainProgress("evaluating", 1, 1))
    return record


def train_from_fleet(
    client: Any,
    *,
    index: str,
    corpus: str | os.PathLike[str],
    out: Path,
    qa: str | os.PathLike[str] | None = None,
    retrievers: Sequence[str] = ("dense",),
    config_overrides: Mapping[str, Any] | None = None,
    settings: TrainSettings = TrainSettings(),
    tokenizer: str = "all-MiniLM-L6-v2",
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """What `ragfleet train retro` runs: reads the corpus (JSONL or BEIR folder) and the optional QA set
    (anything `services.datasets.collections.load_dataset` reads; each question with its first answer),
    ingests the corpus into `index` as ~64-token passages unless the index exists, then `train_retro`
    with neighbours from the running fleet. `config_overrides` change RetroConfig's defaults for the
    tokenizer."""
    from ragfleet._common import iter_documents
    from services.datasets.collections import load_dataset

    documents = [{"id": d.id, "title": d.title, "text": d.text} for d in iter_documents(corpus)]
    pairs: list[tuple[str, str]] = []
    if qa is not None:
        dataset = load_dataset(qa)
        pairs = [
            (q, dataset.answers[qid][0]) for qid, q in dataset.queries.items() if dataset.answers.get(qid)
        ]
    tok = load_tokenizer(tokenizer)
    config = RetroConfig.from_dict(
        {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, **(config_overrides or {})}
    )
    if progress:
        progress(TrainProgress("ingesting", 0, 1))
    prepare_index(client, index, documents, retrievers)
    return train_retro(
        PipelineRetrieval(client, index, retrievers),
        documents,
        out,
        config=config,
        settings=settings,
        qa=pairs,
        tokenizer=tokenizer,
        resume=resume,
        extra={"index": index, "corpus": str(corpus), "qa": str(qa) if qa else None},
        progress=progress,
    )
