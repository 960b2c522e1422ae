"""What both reranker trainers (`ragfleet train cross-encoder`, `ragfleet train first`) do the same way:
the training examples mined through the running fleet, the step loop with its checkpoints, and the
publishing of the trained model.

Data, one example per (query, positive), in order of what the user has:
- `beir`: a BEIR folder's `split` queries with their relevant documents (relevance > 0) as positives;
  no document judged for the query is ever one of its negatives (`datasets.pairs.beir_queries`).
- `corpus` (a JSONL file or a BEIR folder, read as `ragfleet ingest` reads it), no queries: pseudo-queries,
  the inverse cloze task (`datasets.pairs.pseudo_queries`): one sentence of a document (picked by the
  seed) is the query, the document without it the positive, and the source document never a negative.

Hard negatives come from the fleet (`datasets.mining`): the corpus is ingested into `index` (whole
documents, dense and bm25) unless that index exists, and each query is searched `mine_depth` deep in
dense and in bm25 through the Pipeline; an example's negatives are the best hits of the two lists taken
in turn, `negatives` of them. Queries with fewer hits than that are left out. A teacher ("dense":
all-MiniLM-L6-v2's cosine similarities; "cross-encoder:PATH": a trained cross-encoder's logits) scores
every text of an example. The examples and their teacher scores are kept in
`out/checkpoints/examples.json` under a key of the data and mining settings, so a resumed run needs
neither the fleet nor the teacher.

The loop (`train_steps`): AdamW with linear warmup and linear decay to 0 at `steps`; batches follow a
fixed permutation per epoch drawn from (seed, epoch) (`runtime.training.batch_indices`), and dropout
draws from torch's RNG, whose state the checkpoints keep (`runtime.artifacts.Checkpoints`, every
`checkpoint_every` steps and at the end), so a resumed run ends with the weights of an uninterrupted one.
Given more `steps`, a finished run trains on, its decay stretched to the new end.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.datasets.mining import Example, mine_examples, prepare_index
from services.datasets.pairs import beir_queries, pseudo_queries, read_corpus, sample
from services.reranker.cross_encoder import CrossEncoderReranker
from services.runtime.artifacts import CHECKPOINTS_DIR, Checkpoint, Checkpoints, publish_dir
from services.runtime.model_errors import ArtifactError, ParamError
from services.runtime.models import load_sentence_transformer
from services.runtime.settings import RerankerSettings
from services.runtime.storage import atomic_write_json
from services.runtime.training import CROSS_ENCODER_PREFIX, DENSE_TEACHER, batch_indices, warmup_decay_lr
from services.ui import progress_bar

DENSE_MODEL = "all-MiniLM-L6-v2"
EXAMPLES_FILE = "examples.json"
TRAIN_FILE = "train.json"


@dataclass(frozen=True)
class TrainingData:
    """A run's examples, the key of the data and settings they were made from, and where from."""

    examples: list[Example]
    key: str
    index: str
    source: Path


# --- the examples -------------------------------------------------------------------------------


def add_teacher_scores(examples: list[Example], teacher: str, device: str, progress: bool) -> None:
    """Fills each example's `teacher` scores: "dense" cosines or "cross-encoder:PATH" logits."""
    if teacher == DENSE_TEACHER:
        dense = load_sentence_transformer(DENSE_MODEL, device)
        texts = sorted({t for ex in examples for t in ex.texts})
        row = {t: i for i, t in enumerate(texts)}
        vectors = dense.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=progress)
        queries = dense.encode([ex.query for ex in examples], batch_size=64, normalize_embeddings=True)
        for ex, q in zip(examples, queries):
            ex.teacher = [float(vectors[row[t]] @ q) for t in ex.texts]
        return
    model = CrossEncoderReranker.load(
        teacher.removeprefix(CROSS_ENCODER_PREFIX), RerankerSettings(device=device)
    ).model
    pairs = [(ex.query, t) for ex in examples for t in ex.texts]
    logits = model.predict(
        pairs, batch_size=32, activation_fn=torch.nn.Identity(), show_progress_bar=progress
    )
    group = len(examples[0].texts)
    for i, ex in enumerate(examples):
        ex.teacher = [float(x) for x in logits[i * group : (i + 1) * group]]


def _index_name(source: Path) -> str:
    name = source.name if source.is_dir() else source.name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:100] or "reranker-train"


def _load_examples(path: Path, key: str) -> list[Example] | None:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return [Example(**ex) for ex in saved["examples"]] if saved.get("key") == key else None


def training_data(
    client: Any,
    checkpoints: Checkpoints,
    *,
    beir: Path | None,
    split: str,
    corpus: Path | None,
    index: str | None,
    max_queries: int | None,
    seed: int,
    mine_depth: int,
    negatives: int,
    teacher: str,
    device: str,
    progress: bool,
) -> TrainingData:
    """The run's examples: the saved ones if their key matches, else mined through `client` (a
    `ragfleet.Client` of the running fleet), scored by `teacher` ("none" for no scores) and saved."""
    if (beir is None) == (corpus is None):
        raise ParamError("beir", "give exactly one of a BEIR folder (--beir) or a corpus (--corpus)")
    source = Path(beir or corpus)
    if beir is not None:
        documents, queries = beir_queries(beir, split)
    else:
        documents = read_corpus(source)
        queries = pseudo_queries(documents, seed)
    queries = sample(queries, max_queries, seed)
    if not queries:
        raise ParamError(
            "data",
            "no training queries (no judged query with a relevant document in the corpus, "
            "or no document of two sentences)",
        )
    index = index or _index_name(source)
    data = {"queries": [asdict(q) | {"exclude": sorted(q.exclude)} for q in queries], "index": index}
    data |= {"mine_depth": mine_depth, "negatives": negatives, "teacher": teacher}
    key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    examples_file = checkpoints.root / EXAMPLES_FILE
    examples = _load_examples(examples_file, key)
    if examples is None:
        prepare_index(client, index, documents.values())
        examples = mine_examples(
            client, index, queries, depth=mine_depth, negatives=negatives, progress=progress
        )
        if not examples:
            raise ParamError("data", f"the fleet's index {index!r} gave no query {negatives} negatives")
        if teacher != "none":
            add_teacher_scores(examples, teacher, device, progress)
        atomic_write_json(examples_file, {"key": key, "examples": [asdict(ex) for ex in examples]})
    return TrainingData(examples, key, index, source)


# --- the step loop --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    """What the loop did: the step it ended at, the step it started from, and every step's loss."""

    step: int
    start_step: int
    losses: list[float]

    def metrics(self, examples: int, started: float, out: Path) -> dict[str, Any]:
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
    loss_of: Callable[[Sequence[Any]], torch.Tensor],
    examples: Sequence[Any],
    *,
    checkpoints: Checkpoints,
    latest: Checkpoint | None,
    run: dict[str, Any],
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    seed: int,
    checkpoint_every: int,
    micro_batch: int | None = None,
    label: str,
    progress: bool,
) -> Trained:
    """Trains `model`'s parameters that require grad on `loss_of(batch)` (a mean over the batch) up to
    `steps`, continuing from `latest` (whose settings must equal `run`). `micro_batch` examples go
    through each forward and backward pass (all of the batch when None): the step's gradient is the
    same, held in less memory."""
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01)
    step, losses = 0, []
    if latest is not None:
        weights, losses = latest.resume(run, optimizer)
        _load_weights(model, weights)
        step = latest.step
    start_step = step
    chunk = micro_batch or batch_size

    model.train()
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task(label, total=steps, completed=min(step, steps))
        while step < steps:
            for group in optimizer.param_groups:
                group["lr"] = warmup_decay_lr(step, lr, warmup=warmup, decay_start=warmup, decay_end=steps)
            batch = [examples[i] for i in batch_indices(step, batch_size, len(examples), seed)]
            optimizer.zero_grad()
            loss = 0.0
            for start in range(0, len(batch), chunk):
                part = batch[start : start + chunk]
                part_loss = loss_of(part) * (len(part) / len(batch))
                part_loss.backward()
                loss += part_loss.item()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            step += 1
            losses.append(loss)
            bar.update(task, advance=1, description=f"{label} (loss {loss:.4f})")
            if step % checkpoint_every == 0 or step == steps:
                checkpoints.save(step, _weights(model), optimizer, {"run": run, "losses": losses})
    model.eval()
    return Trained(step, start_step, losses)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors by name, a tensor shared under several names (tied embeddings) under its
    first: safetensors stores no aliases."""
    seen: set[int] = set()
    found = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            found[name] = tensor
    return found


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Loads what `_weights` saved; ArtifactError unless it is every tensor of the model but the aliases."""
    aliases = set(model.state_dict()) - set(_weights(model))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if set(missing) != aliases or unexpected:
        raise ArtifactError(
            f"the checkpoint does not fit the model (missing {sorted(set(missing) - aliases)}, "
            f"unexpected {sorted(unexpected)})"
        )


def publish_model(out: Path, model: torch.nn.Module, tokenizer: Any, record: dict[str, Any]) -> None:
    """The model, its tokenizer and `record` (as train.json) published at `out` whole, the run's
    checkpoints carried along."""

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / TRAIN_FILE, record)

    publish_dir(out, build, carry=(CHECKPOINTS_DIR,))
