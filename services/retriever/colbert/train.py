"""`ragfleet train colbert`: trains a ColBERT encoder by distillation from a teacher.

No ColBERT weights are installable here, so the default student is MiniLM's transformer with an
untrained projection (`ColbertEncoder.load("all-MiniLM-L6-v2")`). The projection (hidden -> 128) is
always trained, and with `train_layers` = k so are the transformer's top k layers (at `layer_lr`; the
new projection learns faster, at `lr`): a frozen encoder caps late interaction below single-vector dense
retrieval, as real ColBERT trains its encoder. The layers below stay frozen, so their outputs for every
text are computed once up front, and a step runs only the k layers, the projection, a MaxSim and a
loss: minutes on a CPU for the projection alone, k layers costing about k/6 of MiniLM's forward and
backward per candidate.

Data, one example per query with its candidate passages:
- `beir`: a BEIR folder's queries judged in `split` (default "train"; report on "test"), their relevant
  documents (relevance > 0) as positives, passage text = title + text as the retrievers index it.
- `corpus` (JSONL, read as `ragfleet ingest` reads it): no queries exist, so each passage with at least
  two sentences yields a pseudo-query, the inverse cloze task (`datasets.pairs.inverse_cloze` of the
  passage text): one of its sentences (picked by the seed) is the query and the rest of the passage is
  the positive. The source passage itself is never a candidate (it contains the query verbatim).

Candidates: the dense bi-encoder (`dense_model`, MiniLM by default) ranks the whole corpus exactly (faiss
flat inner product); a query's candidates are its positives then the top-ranked others, `candidates` in
all. Teacher scores: `teacher="dense"` uses that bi-encoder's cosine similarities (softmax temperature
0.05, as cosines differ by tenths); `teacher="cross-encoder:PATH"` rescoring the same candidates with a
sentence-transformers CrossEncoder (raw logits, temperature 1) is the stronger choice where such a model
exists — none ships offline here.

Loss, per query over its candidates, with student scores s = MaxSim(query, candidate) (unscaled, as in
ColBERTv2): KL(softmax(teacher / T) || softmax(s)) + ce_weight * (-log of the softmax mass on the
positives). AdamW on the projection; batches follow a fixed per-epoch permutation of the examples drawn
from (seed, epoch), so a run is deterministic.

Checkpoints go to `out/checkpoints/step-NNNNNNNN/` (`runtime.artifacts.Checkpoints`: the trained
tensors, the AdamW state, the run settings and losses) every `checkpoint_every` steps and at the end,
only the last one kept; `resume=True` continues from it and ends with the same weights as an
uninterrupted run. The precomputed inputs (teacher scores, frozen layers' outputs; ~1 GB for SciFact)
are kept in `out/checkpoints/inputs.safetensors`, keyed by the data and the model names, so a resumed
run skips both transformer passes; delete `out/checkpoints` to reclaim the space once no more training
is planned. The result is a full ColBERT checkpoint at `out` in the Hugging Face layout
`ColbertEncoder.load` reads, and with `export` the trained part as a delta over MiniLM
(`ColbertEncoder.save_delta`): how the project's shipped default ("ragfleet-colbert", `make colbert-
model`) is made.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ragfleet_kernels.maxsim import maxsim_reference
from services.datasets.collections import load_beir
from services.datasets.pairs import document_text, inverse_cloze, judged_queries, sample
from services.retriever.colbert.encoder import ColbertEncoder, project_tokens, run_layers
from services.runtime.artifacts import Checkpoints, publish_file
from services.runtime.model_errors import ParamError
from services.runtime.models import MINILM_NAMES
from services.runtime.training import (
    CROSS_ENCODER_PREFIX,
    DENSE_TEACHER,
    check_ranges,
    check_source,
    check_teacher,
    teacher_temperature,
    train_steps,
)
from services.ui import progress_bar

DEFAULT_BASE = "all-MiniLM-L6-v2"
DEFAULT_DENSE_MODEL = "all-MiniLM-L6-v2"
# Documents whose transformer outputs are computed per progress-bar update.
ENCODE_CHUNK = 256
# The precomputed training inputs, beside the step checkpoints (large: the transformer outputs).
INPUTS_FILE = "inputs.safetensors"


@dataclass
class Pairs:
    """Queries and passages before candidate mining: positives[i] index `texts`, only the first
    `searchable` texts are ranked, and exclude[i] (a text index or -1) is never a candidate of query i."""

    queries: list[str]
    texts: list[str]
    positives: list[list[int]]
    searchable: int
    exclude: list[int]

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps([self.positives, self.searchable, self.exclude]).encode())
        for text in (*self.queries, *self.texts):
            digest.update(text.encode("utf-8") + b"\0")
        return digest.hexdigest()


@dataclass
class TrainingSet:
    """Queries, the texts their candidates point into, and the teacher's view of each candidate list."""

    queries: list[str]
    texts: list[str]
    candidates: np.ndarray  # (n_queries, n_candidates) int64 indices into `texts`
    positives: np.ndarray  # (n_queries, n_candidates) bool
    teacher: np.ndarray  # (n_queries, n_candidates) float32 teacher scores


def inputs_key(pairs: Pairs, models: dict[str, Any]) -> str:
    """The key of a run's precomputed inputs (and its `data` setting): the pairs and the models that
    made them."""
    return hashlib.sha256(json.dumps({"pairs": pairs.fingerprint(), **models}).encode()).hexdigest()


def beir_pairs(folder: Path, split: str = "train", max_queries: int | None = None, seed: int = 0) -> Pairs:
    """The split's judged queries with their relevant documents as positives."""
    data = load_beir(folder, split)
    row = {doc_id: i for i, doc_id in enumerate(data.corpus)}
    texts = [document_text(doc["title"], doc["text"]) for doc in data.corpus.values()]
    judged = sample(judged_queries(data), max_queries, seed)
    return Pairs(
        queries=[q.text for q in judged],
        texts=texts,
        positives=[sorted(row[d] for d in q.relevant) for q in judged],
        searchable=len(texts),
        exclude=[-1] * len(judged),
    )


def pseudo_query_pairs(path: Path, max_queries: int | None = None, seed: int = 0) -> Pairs:
    """Inverse-cloze pairs from a JSONL corpus: a sentence as the query, the rest of its passage as the
    positive (appended to the texts after the searchable corpus), the passage itself excluded."""
    from ragfleet._common import iter_documents

    texts = [document_text(d.title, d.text) for d in iter_documents(path)]
    found = sample(inverse_cloze(texts, seed), max_queries, seed)
    searchable = len(texts)
    return Pairs(
        queries=[c.query for c in found],
        texts=texts + [c.rest for c in found],
        positives=[[searchable + i] for i in range(len(found))],
        searchable=searchable,
        exclude=[c.source for c in found],
    )


def build_training_set(
    pairs: Pairs,
    *,
    dense_model: str = DEFAULT_DENSE_MODEL,
    teacher: str = "dense",
    candidates: int = 32,
    progress: bool = True,
) -> TrainingSet:
    """Mines each query's candidates with the dense bi-encoder and scores them with the teacher."""
    import faiss

    from services.runtime.models import load_sentence_transformer

    check_teacher(teacher)
    if not pairs.queries:
        raise ParamError(
            "data",
            "no training queries (no judged query with a relevant document in the "
            "corpus, or no passage with two sentences)",
        )
    dense = load_sentence_transformer(dense_model)
    text_vectors = dense.encode(
        pairs.texts, batch_size=64, normalize_embeddings=True, show_progress_bar=progress
    )
    query_vectors = dense.encode(pairs.queries, batch_size=64, normalize_embeddings=True)
    index = faiss.IndexFlatIP(text_vectors.shape[1])
    index.add(np.ascontiguousarray(text_vectors[: pairs.searchable], dtype=np.float32))
    depth = min(pairs.searchable, candidates + max(map(len, pairs.positives)) + 1)
    _, ranked = index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), depth)

    lists = []
    for positives, exclude, row in zip(pairs.positives, pairs.exclude, ranked, strict=True):
        positives = positives[: max(1, candidates // 2)]
        others = [int(i) for i in row if i >= 0 and i != exclude and i not in positives]
        lists.append(positives + others[: candidates - len(positives)])
    width = min(map(len, lists))
    if width < 2:
        raise ParamError("data", "the corpus is too small: every query needs at least 2 candidates")
    chosen = np.array([c[:width] for c in lists], dtype=np.int64)
    is_positive = np.array([np.isin(c, p) for p, c in zip(pairs.positives, chosen, strict=True)])

    if teacher == DENSE_TEACHER:
        scores = np.einsum("qe,qce->qc", query_vectors, text_vectors[chosen])
    else:
        scores = _cross_encoder_scores(teacher.removeprefix(CROSS_ENCODER_PREFIX), pairs, chosen, progress)
    return TrainingSet(pairs.queries, pairs.texts, chosen, is_positive, scores.astype(np.float32))


def _cross_encoder_scores(path: str, pairs: Pairs, chosen: np.ndarray, progress: bool) -> np.ndarray:
    from sentence_transformers import CrossEncoder

    from services.runtime.models import resolve_model

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    model = CrossEncoder(resolve_model(path), local_files_only=offline or Path(path).exists())
    inputs = [(pairs.queries[q], pairs.texts[t]) for q in range(len(chosen)) for t in chosen[q]]
    logits = model.predict(
        inputs, batch_size=32, activation_fn=torch.nn.Identity(), show_progress_bar=progress
    )
    return np.asarray(logits, dtype=np.float32).reshape(chosen.shape)


class DistillationInputs:
    """Everything a training step reads, as tensors: the frozen transformer layers' outputs (those below
    the trained ones) for the queries (n, Lq, hidden) with their attention masks, and for every token of
    every candidate text (packed into one (tokens + 1, hidden) float16 tensor whose last row is zeros,
    for padding) with which tokens the encoder keeps, each query's candidates as rows of that packing,
    which of them are positives, and the teacher's scores. Saved to and loaded from one safetensors
    file, so a resumed run skips the expensive transformer passes."""

    FIELDS = (
        "queries",
        "query_attention",
        "tokens",
        "keep",
        "offsets",
        "lengths",
        "candidates",
        "positives",
        "teacher",
    )

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.queries = tensors["queries"]  # (n, Lq, hidden) float32
        self.query_attention = tensors["query_attention"]  # (n, Lq) int64
        self.tokens = tensors["tokens"]  # (tokens + 1, hidden) float16
        self.keep = tensors["keep"]  # (tokens + 1,) bool
        self.offsets = tensors["offsets"]  # (texts,) first row of each text in `tokens`
        self.lengths = tensors["lengths"]  # (texts,)
        self.candidates = tensors["candidates"]  # (n, N) text numbers
        self.positives = tensors["positives"]  # (n, N) bool
        self.teacher = tensors["teacher"]  # (n, N) float32

    @classmethod
    def compute(
        cls, encoder: ColbertEncoder, data: TrainingSet, layer: int, progress: bool
    ) -> DistillationInputs:
        """The inputs of a run that trains the layers above `layer` (all of them frozen at the top)."""
        used, slots = np.unique(data.candidates, return_inverse=True)
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        with progress_bar(enabled=progress) as bar:
            task = bar.add_task("transformer outputs", total=len(used))
            for start in range(0, len(used), ENCODE_CHUNK):
                chunk = [data.texts[i] for i in used[start : start + ENCODE_CHUNK]]
                parts.extend(encoder.document_states(chunk, layer, dtype=torch.float16))
                bar.update(task, advance=len(chunk))
        lengths = torch.tensor([len(hidden) for hidden, _ in parts], dtype=torch.int64)
        padding = (torch.zeros(1, encoder.hidden_size, dtype=torch.float16), torch.zeros(1, dtype=torch.bool))
        parts.append(padding)
        return cls(
            {
                "queries": encoder.query_hidden_states(data.queries, layer=layer),
                "query_attention": encoder.query_inputs(data.queries)[1],
                "tokens": torch.cat([hidden for hidden, _ in parts]),
                "keep": torch.cat([keep for _, keep in parts]),
                "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]]),
                "lengths": lengths,
                "candidates": torch.from_numpy(slots.reshape(data.candidates.shape).astype(np.int64)),
                "positives": torch.from_numpy(data.positives),
                "teacher": torch.from_numpy(data.teacher),
            }
        )

    def save(self, path: Path, key: str) -> None:
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        publish_file(path, lambda tmp: save_file(tensors, tmp, metadata={"key": key}))

    @classmethod
    def load(cls, path: Path, key: str) -> DistillationInputs | None:
        """The inputs saved at `path` for the same data and models (`key`), else None."""
        if not path.is_file():
            return None
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("key") != key or set(f.keys()) != set(cls.FIELDS):
                return None
        return cls(load_file(path))

    def __len__(self) -> int:
        return len(self.candidates)

    def documents(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The packed texts `rows`, padded: hidden states (len(rows), max tokens, hidden) float32, the
        attention mask and the tokens the encoder keeps (both (len(rows), max tokens))."""
        lengths = self.lengths[rows]
        positions = torch.arange(int(lengths.max()))
        attention = positions < lengths[:, None]
        index = (self.offsets[rows, None] + positions).masked_fill(~attention, len(self.tokens) - 1)
        return self.tokens[index].float(), attention.long(), self.keep[index]


class Trained(torch.nn.Module):
    """What a run trains: the top transformer layers (none for the projection alone) and the projection
    (its one tensor named "weight", as in checkpoints of projection-only runs)."""

    def __init__(self, layers: Sequence[torch.nn.Module], projection: torch.Tensor) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.weight = torch.nn.Parameter(projection.detach().clone())

    def encode(self, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Unit token vectors from the frozen layers' outputs."""
        return project_tokens(run_layers(self.layers, hidden, attention), self.weight)


def _kept_first(vectors: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept vectors moved to its front (in order), and how many each row keeps."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    return vectors.gather(1, order[..., None].expand_as(vectors)), keep.sum(1)


def distillation_loss(
    model: Trained,
    inputs: DistillationInputs,
    batch: np.ndarray,
    temperature: float,
    ce_weight: float,
) -> torch.Tensor:
    """KL(teacher || student) over each query's candidates, plus ce_weight times the positives' NLL."""
    batch = torch.from_numpy(batch)
    candidates = inputs.candidates[batch]  # (B, N)
    queries = model.encode(inputs.queries[batch], inputs.query_attention[batch])  # (B, Lq, dim)
    hidden, attention, keep = inputs.documents(candidates.reshape(-1))
    docs, lengths = _kept_first(model.encode(hidden, attention), keep)
    docs = docs.view(*candidates.shape, hidden.shape[1], -1)
    query_lengths = torch.full((1,), queries.shape[1], dtype=torch.int64)
    # unbind, not docs[b]: indexing would make the backward pass add B full-size gradients.
    student = torch.stack(
        [
            maxsim_reference(q[None], query_lengths, d, n)[0]
            for q, d, n in zip(queries.unbind(), docs.unbind(), lengths.view(candidates.shape).unbind())
        ]
    )
    target = torch.log_softmax(inputs.teacher[batch] / temperature, dim=1)
    log_probs = torch.log_softmax(student, dim=1)
    kl = torch.nn.functional.kl_div(log_probs, target, log_target=True, reduction="batchmean")
    positives = inputs.positives[batch]
    nll = -torch.logsumexp(log_probs.masked_fill(~positives, float("-inf")), dim=1).mean()
    return kl + ce_weight * nll


def train_colbert(
    *,
    out: Path,
    beir: Path | None = None,
    split: str = "train",
    corpus: Path | None = None,
    base: str = DEFAULT_BASE,
    dense_model: str = DEFAULT_DENSE_MODEL,
    teacher: str = "dense",
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    candidates: int = 32,
    temperature: float | None = None,
    ce_weight: float = 1.0,
    train_layers: int = 0,
    layer_lr: float = 5e-5,
    export: Path | None = None,
    max_queries: int | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Trains the projection of `base`, and its top `train_layers` transformer layers at `layer_lr` (see
    the module docstring); with `export`, also writes the trained part as a delta over MiniLM there (the
    shipped default's form). Returns the run's metrics."""
    started = time.perf_counter()
    check_source(beir, corpus)
    check_ranges(
        at_least={
            "steps": (steps, 1),
            "batch_size": (batch_size, 1),
            "candidates": (candidates, 2),
            "checkpoint_every": (checkpoint_every, 1),
            "train_layers": (train_layers, 0),
        },
        positive={"lr": lr, "temperature": temperature, "layer_lr": layer_lr},
        non_negative={"ce_weight": ce_weight},
    )
    check_teacher(teacher)
    if export is not None and base not in MINILM_NAMES:
        raise ParamError("export", f"a delta is over MiniLM, and the base is {base!r}")
    out = Path(out)
    checkpoints = Checkpoints.for_run(out, resume)
    latest = checkpoints.latest()

    pairs = (
        beir_pairs(beir, split, max_queries, seed) if beir else pseudo_query_pairs(corpus, max_queries, seed)
    )
    if temperature is None:
        temperature = teacher_temperature(teacher)
    encoder = ColbertEncoder.load(base, device=device)
    stack = encoder.bert.encoder.layer
    if train_layers > len(stack):
        raise ParamError("train_layers", f"the model has {len(stack)} layers, got {train_layers}")
    frozen = len(stack) - train_layers  # the layers whose outputs are computed once
    models = {"base": base, "dense_model": dense_model, "teacher": teacher, "candidates": candidates}
    models["frozen_layers"] = frozen
    key = inputs_key(pairs, models)
    run = {**models, "batch_size": batch_size, "lr": lr, "seed": seed, "temperature": temperature}
    run.update(ce_weight=ce_weight, data=key)
    if train_layers:
        run.update(train_layers=train_layers, layer_lr=layer_lr)

    model = Trained(list(stack[frozen:]), encoder.projection.cpu())
    if latest is not None:
        latest.check_run(run)  # before the costly inputs; train_steps loads the checkpoint
    inputs = DistillationInputs.load(checkpoints.root / INPUTS_FILE, key)
    if inputs is None:
        data = build_training_set(
            pairs, dense_model=dense_model, teacher=teacher, candidates=candidates, progress=progress
        )
        inputs = DistillationInputs.compute(encoder, data, frozen, progress)
        inputs.save(checkpoints.root / INPUTS_FILE, key)

    done = train_steps(
        model,
        lambda rows: distillation_loss(model, inputs, rows, temperature, ce_weight),
        len(inputs),
        checkpoints=checkpoints,
        run=run,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        checkpoint_every=checkpoint_every,
        decay=False,
        weight_decay=0.0,
        clip_norm=None,
        lr_scale={"layers.": layer_lr / lr},
        label="train colbert",
        progress=progress,
    )
    metrics = done.metrics(len(inputs), started, out)
    metrics |= {"candidates": int(inputs.candidates.shape[1]), "loss_curve": _curve(done.losses)}
    encoder.bert.eval()  # its top layers are the trained ones
    encoder.projection = model.weight.detach().to(device).clone()
    encoder.metadata["ragfleet_training"] = {
        **run,
        "steps": done.step,
        "final_loss": metrics["final_loss"],
        "data_source": str(beir or corpus),
        "split": split if beir else None,
    }
    encoder.save(out)
    if export is not None:
        encoder.save_delta(export, train_layers)
    return metrics


def _curve(losses: list[float], points: int = 20) -> list[list[float]]:
    """[step, mean loss of the steps since the previous point] at up to `points` evenly spaced steps."""
    if not losses:
        return []
    ends = sorted({max(1, round(len(losses) * (i + 1) / points)) for i in range(points)})
    starts = [0, *ends[:-1]]
    return [[end, round(float(np.mean(losses[s:end])), 5)] for s, end in zip(starts, ends, strict=True)]
