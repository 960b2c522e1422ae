"""`ragfleet train mamba`: trains the default Mamba bi-encoder (no Mamba weights are installable here).

The student is a fresh Mamba-1 backbone (model.py; transformers' MambaModel initialisation) over
all-MiniLM-L6-v2's WordPiece tokenizer, its token embeddings copied from MiniLM's word embeddings (so
the width is MiniLM's 384) and frozen by default. That tokenizer is the one offline, it is the
teacher's own (the teacher and student read the same tokens), and MiniLM's embeddings are a lexical
start a model trained for minutes on a CPU could not learn; frozen, a small training set cannot pull
the rows of its own words away from those of the test queries.

Data, one example per (query, positive) (`datasets.pairs`): `beir` (a BEIR folder's `split` queries
and their relevant documents) or `corpus` (a JSONL file or BEIR folder without queries: pseudo-queries,
titles or inverse-cloze sentences). Negatives (`negatives`):
- "fleet": `hard_negatives` per example mined through the running fleet (`datasets.mining`: dense and
  bm25 hits of the corpus, ingested into `index` unless it exists; a corpus's pseudo-queries are mined
  in its documents as cut, `runtime.training.training_index`), as the reranker's trainer mines;
- "none": in-batch negatives only (no fleet needed).
Every other text of the batch is a negative too (in-batch), except the query's own other positives.

Loss, with student scores s = cos(query, text) / `temperature` over all texts of the batch: the
cross-entropy of each query's positive (InfoNCE), plus `distill_weight` x KL(softmax(teacher / 0.05) ||
softmax(s)) where teacher = MiniLM's cosines of the same (query, text) pairs ("dense"; "none" turns it
off). The teacher's vectors of every query and text are computed once and kept in
`out/checkpoints/teacher.safetensors`, the examples in `out/checkpoints/examples.json`, so a resumed run
needs neither the fleet nor the teacher. AdamW with linear warmup and decay; the batches are a pure
function of the step (`runtime.training.batch_indices`) and the model has no dropout, so a resumed run
ends with the weights of an uninterrupted one. Checkpoints (`runtime.artifacts.Checkpoints`) every
`checkpoint_every` steps and at the end; the model, tokenizer and `train.json` are published whole at
`out` (default `<home>/models/mamba`, where the mamba retriever finds its default model).

Texts are cut to `max_length` tokens in training only (the retriever never truncates). The default
recipe is small because the scan is the cost on a CPU (its (batch, d_inner, tokens, d_state)
intermediates): 2 layers, d_inner = d_model = 384 (`expand` 1), d_state 8, 200 steps of 16 queries
(+ 16 positives + 16 mined negatives) of at most 128 tokens. Measured on the 2 shared cores of the
development machine with the load average near 11 (other jobs), the forward and backward pass of 16
texts of 128 tokens took 9.3 s; the 4-layer, expand-2, d_state-16 model took 270 s for 48 such texts.
Idle cores should take a fraction of that; `--steps` sets the cost, and a finished run can be resumed
with more.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from services.datasets.mining import Example
from services.datasets.pairs import Query
from services.retriever.mamba.model import MambaConfig, MambaEncoder, MambaModel, load_weights
from services.runtime.artifacts import Checkpoints, publish_file
from services.runtime.model_errors import ParamError
from services.runtime.models import MINILM_ID, load_sentence_transformer, resolve_model
from services.runtime.storage import atomic_write_json
from services.runtime.training import (
    DENSE_TEACHER,
    check_ranges,
    check_source,
    publish_run,
    teacher_temperature,
    train_steps,
    training_index,
    training_queries,
)

TOKENIZER = "all-MiniLM-L6-v2"
NEGATIVES = ("fleet", "none")
TEACHERS = ("none", DENSE_TEACHER)
EXAMPLES_FILE = "examples.json"
TEACHER_FILE = "teacher.safetensors"
# Mines hard negatives: (index, the corpus by id, the queries, negatives per example) -> examples.
Miner = Callable[[str, dict[str, dict[str, Any]], Sequence[Query], int], list[Example]]


@dataclass
class TrainingData:
    """Queries and texts by number: an example is (a query number, its positive then its negatives as
    text numbers), and `positives[q]` holds the text numbers of all of query q's positives."""

    queries: list[str]
    texts: list[str]
    examples: list[tuple[int, list[int]]]
    positives: list[list[int]]

    @classmethod
    def from_examples(cls, examples: Sequence[Example], queries: Sequence[Query]) -> TrainingData:
        texts: dict[str, int] = {}
        query_rows: dict[str, int] = {}
        positives: list[list[int]] = []
        for q in queries:
            if q.text not in query_rows:
                query_rows[q.text] = len(query_rows)
                positives.append([])
            positives[query_rows[q.text]] += [texts.setdefault(t, len(texts)) for t in q.positives]
        rows = [
            (query_rows[ex.query], [texts.setdefault(t, len(texts)) for t in ex.texts]) for ex in examples
        ]
        return cls(list(query_rows), list(texts), rows, positives)


def initial_model(layers: int, state_size: int, expand: int, seed: int) -> tuple[MambaModel, Any]:
    """A fresh backbone (transformers' MambaModel initialisation) with MiniLM's word embeddings, and
    MiniLM's tokenizer (its [SEP] is the EOS the embedding is read at)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers import MambaConfig as HFMambaConfig
    from transformers import MambaModel as HFMambaModel

    path = resolve_model(TOKENIZER)
    tokenizer = AutoTokenizer.from_pretrained(path)
    words = AutoModel.from_pretrained(path).get_input_embeddings().weight.detach()
    config = MambaConfig(
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        num_hidden_layers=layers,
        state_size=state_size,
        expand=expand,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    fields = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type")}
    fresh = HFMambaModel(HFMambaConfig(**fields))
    model = MambaModel(config)
    load_weights(model, {**fresh.state_dict(), "embeddings.weight": words}, "initial model")
    return model, tokenizer


def _teacher_vectors(data: TrainingData, device: str, progress: bool) -> dict[str, torch.Tensor]:
    dense = load_sentence_transformer(TOKENIZER, device)
    encode = lambda texts, bar: torch.from_numpy(  # noqa: E731
        dense.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=bar)
    )
    return {"queries": encode(data.queries, False), "texts": encode(data.texts, progress)}


def batch_loss(
    encoder: MambaEncoder,
    data: TrainingData,
    batch: np.ndarray,
    token_ids: Callable[[list[str]], list[list[int]]],
    *,
    temperature: float,
    teacher: dict[str, torch.Tensor] | None,
    distill_weight: float,
) -> torch.Tensor:
    """InfoNCE of each example's positive among all the batch's texts, plus the distillation term."""
    examples = [data.examples[i] for i in batch]
    query_rows = [q for q, _ in examples]
    text_rows = list(dict.fromkeys(t for _, texts in examples for t in texts))
    column = {t: j for j, t in enumerate(text_rows)}
    query_vectors = encoder.embed(token_ids([data.queries[q] for q in query_rows]))
    text_vectors = encoder.embed(token_ids([data.texts[t] for t in text_rows]))
    scores = query_vectors @ text_vectors.T / temperature
    target = torch.tensor([column[group[0]] for _, group in examples])
    # The query's other positives in the batch are not negatives.
    other = torch.zeros_like(scores, dtype=torch.bool)
    for i, (q, group) in enumerate(examples):
        for t in data.positives[q]:
            if t in column and t != group[0]:
                other[i, column[t]] = True
    scores = scores.masked_fill(other, float("-inf"))
    loss = F.cross_entropy(scores, target)
    if teacher is not None and distill_weight:
        wanted = teacher["queries"][query_rows] @ teacher["texts"][text_rows].T
        wanted = torch.softmax(
            wanted.masked_fill(other, float("-inf")) / teacher_temperature(DENSE_TEACHER), 1
        )
        loss = loss + distill_weight * F.kl_div(
            scores.log_softmax(1).masked_fill(other, 0.0), wanted, reduction="batchmean"
        )
    return loss


def _load_data(path: Path, key: str) -> TrainingData | None:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("key") != key:
        return None
    return TrainingData(
        saved["queries"], saved["texts"], [(q, list(t)) for q, t in saved["examples"]], saved["positives"]
    )


def train_mamba(
    *,
    out: Path,
    beir: Path | None = None,
    split: str = "train",
    corpus: Path | None = None,
    index: str | None = None,
    miner: Miner | None = None,
    negatives: str = "fleet",
    hard_negatives: int = 1,
    teacher: str = DENSE_TEACHER,
    layers: int = 2,
    state_size: int = 8,
    expand: int = 1,
    steps: int = 200,
    batch_size: int = 16,
    max_length: int = 128,
    lr: float = 1e-3,
    warmup: int = 20,
    temperature: float = 0.05,
    distill_weight: float = 1.0,
    freeze_embeddings: bool = True,
    max_queries: int | None = None,
    seed: int = 0,
    checkpoint_every: int = 50,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Trains a Mamba bi-encoder (see the module docstring); `miner` mines hard negatives (the CLI's
    goes through the fleet) and is needed only with negatives="fleet"; returns the run's metrics."""
    started = time.perf_counter()
    check_source(beir, corpus)
    if negatives not in NEGATIVES:
        raise ParamError("negatives", f"expected one of {', '.join(NEGATIVES)}, got {negatives!r}")
    if teacher not in TEACHERS:
        raise ParamError("teacher", f"expected one of {', '.join(TEACHERS)}, got {teacher!r}")
    check_ranges(
        at_least={
            "layers": (layers, 1),
            "state_size": (state_size, 1),
            "expand": (expand, 1),
            "steps": (steps, 1),
            "batch_size": (batch_size, 2 if negatives == "none" else 1),
            "hard_negatives": (hard_negatives, 1),
            "max_length": (max_length, 8),
            "warmup": (warmup, 0),
            "checkpoint_every": (checkpoint_every, 1),
        },
        positive={"lr": lr, "temperature": temperature},
        non_negative={"distill_weight": distill_weight},
    )
    if negatives == "fleet" and miner is None:
        raise ParamError("negatives", "'fleet' needs the running fleet to mine them (or use 'none')")
    out = Path(out)
    checkpoints = Checkpoints.for_run(out, resume)

    documents, queries = training_queries(beir, split, corpus, max_queries, seed)
    source = Path(beir or corpus)
    index = training_index(index, beir, corpus, seed, "mamba-train")
    described = {"queries": [[q.text, q.positives, sorted(q.exclude)] for q in queries], "index": index}
    described |= {"negatives": negatives, "hard_negatives": hard_negatives if negatives == "fleet" else 0}
    key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    run = {"data": key, "layers": layers, "state_size": state_size, "expand": expand}
    run |= {"batch_size": batch_size, "max_length": max_length, "lr": lr, "warmup": warmup}
    run |= {"temperature": temperature, "teacher": teacher, "distill_weight": distill_weight}
    run |= {"freeze_embeddings": freeze_embeddings, "seed": seed}

    data_file = checkpoints.root / EXAMPLES_FILE
    data = _load_data(data_file, key)
    if data is None:
        if negatives == "fleet":
            examples = miner(index, documents, queries, hard_negatives)
            if not examples:
                raise ParamError(
                    "data", f"the fleet's index {index!r} gave no query {hard_negatives} negatives"
                )
        else:
            examples = [Example(q.text, [p]) for q in queries for p in q.positives]
        data = TrainingData.from_examples(examples, queries)
        record = {"key": key, "queries": data.queries, "texts": data.texts}
        atomic_write_json(data_file, record | {"examples": data.examples, "positives": data.positives})
    teacher_vectors = None
    if teacher != "none":
        teacher_file = checkpoints.root / TEACHER_FILE
        if teacher_file.is_file():
            teacher_vectors = load_file(teacher_file)
        if teacher_vectors is None or len(teacher_vectors["texts"]) != len(data.texts):
            teacher_vectors = _teacher_vectors(data, device, progress)
            publish_file(teacher_file, lambda tmp: save_file(teacher_vectors, tmp))

    model, tokenizer = initial_model(layers, state_size, expand, seed)
    model = model.to(device)
    encoder = MambaEncoder(model, tokenizer, max_tokens=max_length, window=max_length + 1, model_id=str(out))
    model.embeddings.weight.requires_grad_(not freeze_embeddings)
    eos = model.config.eos_token_id

    def token_ids(texts: list[str]) -> list[list[int]]:
        ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        return [[*row, eos] for row in ids]

    done = train_steps(
        model,
        lambda rows: batch_loss(
            encoder,
            data,
            rows,
            token_ids,
            temperature=temperature,
            teacher=teacher_vectors,
            distill_weight=distill_weight,
        ),
        len(data.examples),
        checkpoints=checkpoints,
        run=run,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        seed=seed,
        checkpoint_every=checkpoint_every,
        label="train mamba",
        progress=progress,
    )
    metrics = done.metrics(len(data.examples), started, out)
    record = {**run, "negatives": negatives, "index": index}
    record["hard_negatives"] = hard_negatives if negatives == "fleet" else 0
    record |= {"data_source": str(source), "split": split if beir else None, "tokenizer": MINILM_ID}
    record |= {"examples": len(data.examples), "final_loss": metrics["final_loss"]}
    publish_run(out, encoder.save, record)
    return metrics
