"""What every trainer does the same way: argument checks, the training queries, the data order, the
learning rate, the naming of a distillation teacher, the checkpointed step loop and the publishing.

- `check_ranges` raises ParamError naming the first argument out of range, before any work;
  `check_source` the data source (exactly one of a BEIR folder and a corpus).
- `training_queries`: the judged queries of a BEIR split, or a corpus's pseudo-queries (`datasets.pairs`);
  `training_index` the fleet index a trainer mines them in.
- `batch_indices(step, batch_size, n, seed)`: the examples of a step, a pure function of the step, so a
  resumed run sees the batches an uninterrupted one would without saving the order.
- `warmup_decay_lr`: linear warmup, a constant rate, then a linear decay.
- A teacher is "dense" (all-MiniLM-L6-v2's cosine similarities) or "cross-encoder:PATH" (a cross-encoder's
  logits), read through a softmax at `teacher_temperature(teacher)`.
- `train_steps`: AdamW over the parameters that require grad, the rate of `warmup_decay_lr` set at each
  step, gradients clipped, checkpoints (`runtime.artifacts.Checkpoints`) every `checkpoint_every` steps and
  at the end, holding the weights, the optimizer and torch's RNG state, so that a resumed run ends with the
  weights of an uninterrupted one.
- `publish_run`: the trained model and the run's record published at `out` whole, checkpoints carried along.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.datasets.pairs import Query, beir_queries, cloze_corpus, read_corpus, sample
from services.runtime.artifacts import CHECKPOINTS_DIR, Checkpoints, publish_dir
from services.runtime.model_errors import ArtifactError, ParamError
from services.runtime.storage import atomic_write_json
from services.ui import progress_bar

DENSE_TEACHER = "dense"
CROSS_ENCODER_PREFIX = "cross-encoder:"
# Cosines of related texts differ by tenths, so their softmax needs a low temperature; logits do not.
DENSE_TEMPERATURE = 0.05
CROSS_ENCODER_TEMPERATURE = 1.0
TRAIN_FILE = "train.json"  # a trained model's record of its run


def check_ranges(
    *,
    at_least: Mapping[str, tuple[float, float]] | None = None,
    positive: Mapping[str, float | None] | None = None,
    non_negative: Mapping[str, float | None] | None = None,
    below_one: Mapping[str, float] | None = None,
) -> None:
    """ParamError naming the first field out of range, checking `at_least` (field -> (value, lowest
    allowed)), then `positive`, then `non_negative` (field -> value; None for one left unset), then
    `below_one` (field -> a share, 0 <= value < 1)."""
    for field, (value, low) in (at_least or {}).items():
        if not value >= low:
            raise ParamError(field, f"must be at least {low}, got {value}")
    for field, value in (positive or {}).items():
        if value is not None and not value > 0:
            raise ParamError(field, f"must be positive, got {value}")
    for field, value in (non_negative or {}).items():
        if value is not None and not value >= 0:
            raise ParamError(field, f"must not be negative, got {value}")
    for field, value in (below_one or {}).items():
        if not 0 <= value < 1:
            raise ParamError(field, f"must be at least 0 and below 1, got {value}")


def check_source(beir: Path | None, corpus: Path | None) -> None:
    """ParamError naming `beir` unless exactly one of `beir` and `corpus` is given."""
    if (beir is None) == (corpus is None):
        raise ParamError("beir", "give exactly one of a BEIR folder (--beir) or a corpus (--corpus)")


def training_queries(
    beir: Path | None, split: str, corpus: Path | None, max_queries: int | None, seed: int
) -> tuple[dict[str, dict[str, Any]], list[Query]]:
    """The documents by id and at most `max_queries` queries (sampled by `seed`): the `split` queries of a
    BEIR folder with their relevant documents, or the pseudo-queries of `corpus` with the documents they
    were cut from as cut (`datasets.pairs.cloze_corpus`); ParamError if none."""
    check_source(beir, corpus)
    if beir is not None:
        documents, queries = beir_queries(beir, split)
    else:
        documents, queries = cloze_corpus(read_corpus(corpus), seed)
    queries = sample(queries, max_queries, seed)
    if not queries:
        raise ParamError(
            "data",
            "no training queries (no judged query with a relevant document in the corpus, "
            "or no document of two sentences)",
        )
    return documents, queries


def index_name(source: Path, default: str) -> str:
    """A fleet index name for the data at `source`: its file or folder name, made safe."""
    name = source.name if source.is_dir() else source.name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:100] or default


def training_index(index: str | None, beir: Path | None, corpus: Path | None, seed: int, default: str) -> str:
    """The index a trainer mines in: `index` if named, else the data's name; a corpus's own, since it
    holds the documents as `training_queries` cut them, is `<name>-cloze<seed>`."""
    if index:
        return index
    if beir is not None:
        return index_name(beir, default)
    return f"{index_name(Path(corpus), default)[:90]}-cloze{seed}"


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Examples of `step` (0-based): positions [step*B, (step+1)*B) of the epochs' permutations laid end to
    end, epoch e being the permutation of range(n) drawn from (seed, e)."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, within = np.divmod(positions, n)
    orders = {e: np.random.default_rng([seed, e]).permutation(n) for e in set(epochs.tolist())}
    return np.array([orders[e][j] for e, j in zip(epochs.tolist(), within.tolist(), strict=True)])


def warmup_decay_lr(
    step: int, lr: float, *, warmup: int, decay_start: int, decay_end: int, min_ratio: float = 0.0
) -> float:
    """The rate of `step` (0-based): rising linearly to `lr` over the first `warmup` steps (step
    warmup - 1 is the first at `lr`), `lr` up to step `decay_start`, then falling linearly to
    lr · min_ratio at step `decay_end`, and held there."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step <= decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, decay_end - decay_start))
    return lr * (1 - (1 - min_ratio) * progress)


def check_teacher(teacher: str, *, allow_none: bool = False) -> None:
    """ParamError naming `teacher` unless it is "dense", "cross-encoder:PATH" or, if allowed, "none"."""
    named = ("none", DENSE_TEACHER) if allow_none else (DENSE_TEACHER,)
    if teacher in named or teacher.startswith(CROSS_ENCODER_PREFIX):
        return
    expected = [repr(name) for name in (*named, f"{CROSS_ENCODER_PREFIX}PATH")]
    raise ParamError("teacher", f"expected {', '.join(expected[:-1])} or {expected[-1]}, got {teacher!r}")


def teacher_temperature(teacher: str) -> float:
    """The softmax temperature a teacher's scores are read at."""
    return DENSE_TEMPERATURE if teacher == DENSE_TEACHER else CROSS_ENCODER_TEMPERATURE


@dataclass(frozen=True)
class Trained:
    """What the loop did: the step it ended at, the step it started from, and every step's loss."""

    step: int
    start_step: int
    losses: list[float]

    def metrics(self, examples: int, started: float, out: Path) -> dict[str, Any]:
        """The run's metrics, `started` being its `time.perf_counter()` at the start."""
        return {
            "steps": self.step,
            "start_step": self.start_step,
            "examples": examples,
            "initial_loss": float(np.mean(self.losses[:10])),
            "final_loss": float(np.mean(self.losses[-10:])),
            "seconds": round(time.perf_counter() - started, 1),
            "out": str(out),
        }


def train_steps(
    model: torch.nn.Module,
    loss_of: Callable[[np.ndarray], torch.Tensor],
    examples: int,
    *,
    checkpoints: Checkpoints,
    run: dict[str, Any],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    checkpoint_every: int,
    warmup: int = 0,
    decay: bool = True,
    weight_decay: float = 0.01,
    clip_norm: float | None = 1.0,
    micro_batch: int | None = None,
    group: int = 1,
    lr_scale: Mapping[str, float] | None = None,
    label: str,
    progress: bool,
) -> Trained:
    """Trains `model`'s parameters that require grad on `loss_of(rows)` (a mean over the examples `rows`
    of `examples`) up to `steps`, continuing from the latest of `checkpoints` (whose settings must equal
    `run`; `Checkpoints.start` has checked that a run there is to be resumed).

    The rate warms up over `warmup` steps, then decays linearly to 0 at `steps` if `decay` (a run resumed
    with more steps then stretches its decay), else stays. `micro_batch` examples go through each forward
    and backward pass (all of the batch when None): the step's gradient is the same, held in less memory.
    With `group`, the examples come in groups of that many consecutive ones, and a step takes
    `batch_size` whole groups, drawn as `batch_indices` draws examples (`micro_batch` still counts
    examples).
    `lr_scale` maps a parameter-name prefix to a factor of the rate for the parameters under it (e.g.
    pretrained layers that must move slower than a new head); the others take the rate itself.
    """
    scales: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            found = [f for prefix, f in (lr_scale or {}).items() if name.startswith(prefix)]
            scales.setdefault(found[0] if found else 1.0, []).append(param)
    groups = [{"params": params, "scale": scale} for scale, params in scales.items()]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    step, losses = 0, []
    latest = checkpoints.latest()
    if latest is not None:
        weights, losses = latest.resume(run, optimizer)
        load_model_weights(model, weights)
        step = latest.step
    start_step = step
    chunk = micro_batch or batch_size * group
    decay_start, decay_end = (warmup, steps) if decay else (math.inf, math.inf)

    model.train()
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task(label, total=steps, completed=min(step, steps))
        while step < steps:
            rate = warmup_decay_lr(step, lr, warmup=warmup, decay_start=decay_start, decay_end=decay_end)
            for param_group in optimizer.param_groups:
                param_group["lr"] = rate * param_group.get("scale", 1.0)  # absent from older checkpoints
            drawn = batch_indices(step, batch_size, examples // group, seed)
            rows = (drawn[:, None] * group + np.arange(group)).ravel()
            optimizer.zero_grad()
            loss = 0.0
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                part_loss = loss_of(part) * (len(part) / len(rows))
                part_loss.backward()
                loss += part_loss.item()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], clip_norm)
            optimizer.step()
            step += 1
            losses.append(loss)
            bar.update(task, advance=1, description=f"{label} (loss {loss:.4f})")
            if step % checkpoint_every == 0 or step == steps:
                checkpoints.save(step, model_weights(model), optimizer, {"run": run, "losses": losses})
    model.eval()
    return Trained(step, start_step, losses)


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors by name, a tensor shared under several names (tied embeddings) under its
    first: safetensors stores no aliases."""
    seen: set[int] = set()
    found = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            found[name] = tensor
    return found


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Loads what `model_weights` saved; ArtifactError unless it is every tensor of the model but the
    aliases."""
    aliases = set(model.state_dict()) - set(model_weights(model))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if set(missing) != aliases or unexpected:
        raise ArtifactError(
            f"the checkpoint does not fit the model (missing {sorted(set(missing) - aliases)}, "
            f"unexpected {sorted(unexpected)})"
        )


def publish_run(
    out: Path,
    save: Callable[[Path], None],
    record: Mapping[str, Any] | Callable[[Path], Mapping[str, Any]],
    *,
    record_file: str = TRAIN_FILE,
) -> None:
    """`save(folder)` (the trained model) and `record` (as JSON in `record_file`) published at `out`
    whole, the run's checkpoints carried along. A callable `record` is called with the folder the model
    was saved in, so it can measure the saved model before anyone sees it."""

    def build(tmp: Path) -> None:
        save(tmp)
        atomic_write_json(tmp / record_file, record(tmp) if callable(record) else record)

    publish_dir(out, build, carry=(CHECKPOINTS_DIR,))


def save_pretrained(*parts: Any) -> Callable[[Path], None]:
    """A `save` for `publish_run` of Hugging Face objects (a model, its tokenizer): each one's
    `save_pretrained` into the folder."""

    def save(folder: Path) -> None:
        for part in parts:
            part.save_pretrained(folder)

    return save
