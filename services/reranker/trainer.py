"""What both reranker trainers (`ragfleet train cross-encoder`, `ragfleet train first`) do the same way:
the training examples mined through the running fleet. The step loop with its checkpoints and the
publishing are every trainer's (`runtime.training.train_steps`, `runtime.training.publish_run`).

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

The loop (`runtime.training.train_steps`): AdamW with linear warmup and linear decay to 0 at `steps`;
batches follow a fixed permutation per epoch drawn from (seed, epoch) (`runtime.training.batch_indices`),
and dropout draws from torch's RNG, whose state the checkpoints keep (`runtime.artifacts.Checkpoints`,
every `checkpoint_every` steps and at the end), so a resumed run ends with the weights of an
uninterrupted one.
Given more `steps`, a finished run trains on, its decay stretched to the new end.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from services.datasets.mining import Example, mine_examples, prepare_index
from services.reranker.cross_encoder import CrossEncoderReranker
from services.runtime.artifacts import Checkpoints
from services.runtime.model_errors import ParamError
from services.runtime.models import load_sentence_transformer
from services.runtime.settings import RerankerSettings
from services.runtime.storage import atomic_write_json
from services.runtime.training import CROSS_ENCODER_PREFIX, DENSE_TEACHER, index_name, training_queries

DENSE_MODEL = "all-MiniLM-L6-v2"
EXAMPLES_FILE = "examples.json"


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
    documents, queries = training_queries(beir, split, corpus, max_queries, seed)
    source = Path(beir or corpus)
    index = index or index_name(source, "reranker-train")
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
