"""What both reranker trainers (`ragfleet train cross-encoder`, `ragfleet train first`) do the same way:
the training examples mined through the running fleet. The step loop with its checkpoints and the
publishing are every trainer's (`runtime.training.train_steps`, `runtime.training.publish_run`).

Data, one example per (query, positive), in order of what the user has:
- `beir`: a BEIR folder's `split` queries with their relevant documents (relevance > 0) as positives;
  no document judged for the query is ever one of its negatives (`datasets.pairs.beir_queries`).
- `corpus` (a JSONL file or a BEIR folder, read as `ragfleet ingest` reads it), no queries: pseudo-queries
  cut out of the documents (`datasets.pairs.cloze_corpus`): a document's title (of 4 words or more) or
  else one of its sentences (picked by the seed) is the query, the document without it the positive,
  and the source document never a negative.
  The index mined in holds the documents so cut (`runtime.training.training_index`: `<name>-cloze<seed>`).
  A corpus gives about a query a document, so unless `max_queries` says otherwise a run takes the
  queries the default steps train on (DEFAULT_STEPS x batch_size) and the held-out share beside them,
  at least MIN_HELD_OUT (`pseudo_query_budget`): mining, the teacher and the tuning of all 4,663 of
  SciFact's took longer than the 100 steps did.

Hard negatives come from the fleet (`datasets.mining`): the corpus is ingested into `index` (whole
documents, dense and bm25) unless that index exists, and each query is searched `mine_depth` deep in
dense and in bm25 through the Pipeline; an example's negatives are the best hits of the two lists taken
in turn, `negatives` of them. Queries with fewer hits than that are left out. A teacher ("dense":
all-MiniLM-L6-v2's cosine similarities; "cross-encoder:PATH": a trained cross-encoder's logits) scores
every text of an example. The examples and their teacher scores are kept in
`out/checkpoints/examples.json` under a key of the data and mining settings, so a resumed run needs
neither the fleet nor the teacher.

Validation: a `validation` share of the queries (drawn by the seed, in whole groups of queries sharing a
relevant document: `split_off`) is held out of training. Each is searched through the Pipeline in dense
and bm25 fused, `mine_depth` deep, as an Ask with reranking would be, and the list is kept with the
examples. Once trained, the model reranks those lists, and the weight of the retrieval scores in the
final order (`backend.blend`) that gives the best mean nDCG@10 over them (0 to 1 by tenths, the smallest
on a tie) is written to the model's train.json with the whole curve: the Reranker blends by it when a
call names no weight. On pseudo-queries a held-out query's relevant
document is the one it was cut from.

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
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytrec_eval
import torch

from services.datasets.mining import MINED_RETRIEVERS, Example, mine_examples, prepare_index, search_chunks
from services.datasets.pairs import Query, document_text
from services.reranker.backend import Ranking, RerankerModel, blend
from services.reranker.cross_encoder import CrossEncoderReranker
from services.runtime.artifacts import Checkpoints
from services.runtime.model_errors import ParamError
from services.runtime.models import load_sentence_transformer
from services.runtime.settings import RerankerSettings
from services.runtime.storage import atomic_write_json
from services.runtime.training import CROSS_ENCODER_PREFIX, DENSE_TEACHER, training_index, training_queries
from services.ui import progress_bar

DENSE_MODEL = "all-MiniLM-L6-v2"
EXAMPLES_FILE = "examples.json"
# The retrieval weights tried on the held-out queries.
WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
# Held-out lists reranked per progress-bar update.
VALIDATION_CHUNK = 8
# Both trainers' default steps, which also size a corpus's pseudo-queries (`pseudo_query_budget`).
DEFAULT_STEPS = 100
# The fewest held-out pseudo-queries of a run whose queries `pseudo_query_budget` sizes.
MIN_HELD_OUT = 100
# A listwise model whose reversed-list score is below this share of its own ranks mostly by position.
POSITION_SHARE = 0.5


@dataclass
class HeldOut:
    """A held-out query's fused retrieval list, as the Reranker would get it, and its relevant documents."""

    query: str
    doc_ids: list[str]
    texts: list[str]
    scores: list[float]
    relevant: list[str]


@dataclass(frozen=True)
class TrainingData:
    """A run's examples and held-out lists, the key of the data and settings they came from, and where
    from."""

    examples: list[Example]
    held_out: list[HeldOut]
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


def pseudo_query_budget(trained: int, validation: float) -> tuple[int, float]:
    """(max_queries, validation share) for a corpus's pseudo-queries: the `trained` queries the steps
    use and beside them the `validation` share of the whole, at least MIN_HELD_OUT (none for a share
    of 0), so the weight is tuned on enough queries even when the steps use few."""
    held = max(MIN_HELD_OUT, math.ceil(trained * validation / (1 - validation))) if validation else 0
    return trained + held, held / (trained + held)


def split_off(queries: list[Query], share: float, seed: int) -> tuple[list[Query], list[Query]]:
    """(training queries, held-out queries): about `share` of them (rounded down) held out, drawn by
    `seed`, in whole groups of queries that share a relevant document, so no held-out query's relevant
    document is ever a training positive.

    SciFact's train queries share documents as its train and test splits do; a query held out alone would
    find its documents trained on, and the weight tuned on it would reward memorising them."""
    owner: dict[str, int] = {}
    parent = list(range(len(queries)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, query in enumerate(queries):
        for doc in query.relevant:
            parent[root(i)] = root(owner.setdefault(doc, i))
    groups: dict[int, list[int]] = {}
    for i in range(len(queries)):
        groups.setdefault(root(i), []).append(i)
    members_of = list(groups.values())
    wanted, held = int(len(queries) * share), set()
    for g in np.random.default_rng(seed).permutation(len(members_of)):
        members = members_of[g]
        if len(held) + len(members) <= wanted:
            held.update(members)
    return (
        [q for i, q in enumerate(queries) if i not in held],
        [q for i, q in enumerate(queries) if i in held],
    )


def held_out_lists(client: Any, index: str, queries: Sequence[Query], depth: int) -> list[HeldOut]:
    """Each query's list from the fleet: dense and bm25 fused, `depth` deep."""
    texts = [q.text for q in queries]
    chunks = search_chunks(client, index, texts, retrievers=list(MINED_RETRIEVERS), depth=depth)
    lists = []
    for query, response in zip(queries, (r for chunk in chunks for r in chunk), strict=True):
        hits = list(response.results)
        lists.append(
            HeldOut(
                query=query.text,
                doc_ids=[h.passage.doc_id for h in hits],
                texts=[document_text(h.passage.title, h.passage.text) for h in hits],
                scores=[h.score for h in hits],
                relevant=sorted(query.relevant),
            )
        )
    return [h for h in lists if h.texts]


def _rankings(
    model: RerankerModel, pairs: Sequence[tuple[str, list[str]]], label: str, progress: bool
) -> list[Ranking]:
    """`model`'s rankings of `pairs` (query, texts), in chunks of VALIDATION_CHUNK under a progress bar."""
    rankings = []
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task(label, total=len(pairs))
        for start in range(0, len(pairs), VALIDATION_CHUNK):
            chunk = pairs[start : start + VALIDATION_CHUNK]
            rankings.extend(model.rerank_many(chunk))
            bar.update(task, advance=len(chunk))
    return rankings


def _mean_ndcg(evaluator: Any, doc_ids: Sequence[Sequence[str]], orders: Sequence[Sequence[int]]) -> float:
    """Mean nDCG@10 of the held-out lists ranked in `orders` (candidate positions, best first); a document
    ranks at its first candidate."""
    run = {}
    for i, (ids, order) in enumerate(zip(doc_ids, orders, strict=True)):
        ranked: dict[str, float] = {}
        for position, candidate in enumerate(order):
            ranked.setdefault(ids[candidate], float(len(order) - position))
        run[str(i)] = ranked
    # Every held-out list is in the run, so the mean over it is over every query.
    return round(float(np.mean([m["ndcg_cut_10"] for m in evaluator.evaluate(run).values()])), 5)


def tune_retrieval_weight(model: RerankerModel, lists: Sequence[HeldOut], progress: bool) -> dict[str, Any]:
    """The retrieval weight (of WEIGHTS) that gives `model` the best mean nDCG@10 over the held-out
    lists, the smallest on a tie, with each weight's nDCG@10; weight 0 when there are no lists.

    A model that sees a list as a whole (`ORDER_SENSITIVE`) is also scored alone on each list reversed
    (`ndcg@10_reversed`): one that ranks by position rather than content scores far below its weight-0
    score there, as FIRST's students trained on a few hundred windows do."""
    if not lists:
        return {"retrieval_weight": 0.0, "validation": None}
    rankings = _rankings(model, [(h.query, h.texts) for h in lists], "tuning the retrieval weight", progress)
    qrels = {str(i): {doc: 1 for doc in h.relevant} for i, h in enumerate(lists)}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10"})
    doc_ids = [h.doc_ids for h in lists]
    curve = {}
    for weight in WEIGHTS:
        orders = [blend(r, h.scores, weight).order for h, r in zip(lists, rankings, strict=True)]
        curve[weight] = _mean_ndcg(evaluator, doc_ids, orders)
    best = max(WEIGHTS, key=lambda w: (curve[w], -w))
    validation: dict[str, Any] = {"queries": len(lists), "depth": max(len(h.texts) for h in lists)}
    validation["ndcg@10"] = {str(w): v for w, v in curve.items()}
    if model.ORDER_SENSITIVE:
        pairs = [(h.query, h.texts[::-1]) for h in lists]
        reversed_rankings = _rankings(model, pairs, "scoring the lists reversed", progress)
        orders = [r.order for r in reversed_rankings]
        validation["ndcg@10_reversed"] = _mean_ndcg(evaluator, [ids[::-1] for ids in doc_ids], orders)
    return {"retrieval_weight": best, "validation": validation}


def tuning_warnings(tuned: Mapping[str, Any]) -> list[str]:
    """What the tuning (`tune_retrieval_weight`'s result) found that a user should know before serving
    the model: that no weight of it beats the retrieval order, and that a listwise model ranks by
    position."""
    validation = tuned["validation"]
    if validation is None:
        return []
    curve, found = validation["ndcg@10"], []
    retrieved = curve[str(WEIGHTS[-1])]
    if max(curve.values()) <= retrieved:
        found.append(
            f"the model does not improve on the retrieval order of the {validation['queries']} held-out "
            f"lists ({retrieved} nDCG@10) at any retrieval weight"
        )
    alone, reversed_ = curve[str(WEIGHTS[0])], validation.get("ndcg@10_reversed")
    if reversed_ is not None and reversed_ < POSITION_SHARE * alone:
        found.append(
            f"the model ranks by position rather than content: alone it scores {alone} nDCG@10 on the "
            f"held-out lists as retrieved and {reversed_} on the same lists reversed"
        )
    return found


class TunedRecord:
    """The train.json of a model saved in a folder (a `record` for `runtime.training.publish_run`): the
    run's `record` and the retrieval weight tuned on `lists` with the saved model as the backend loads
    it; `tuned` keeps what the tuning found, with its `tuning_warnings`."""

    def __init__(
        self,
        record: Mapping[str, Any],
        backend: type[RerankerModel],
        settings: RerankerSettings,
        lists: Sequence[HeldOut],
        progress: bool,
    ) -> None:
        self.record, self.backend, self.settings = record, backend, settings
        self.lists, self.progress = lists, progress
        self.tuned: dict[str, Any] = {}

    def __call__(self, folder: Path) -> dict[str, Any]:
        model = self.backend.load(str(folder), self.settings)
        self.tuned = tune_retrieval_weight(model, self.lists, self.progress)
        self.tuned["warnings"] = tuning_warnings(self.tuned)
        return {**self.record, **self.tuned}

    def summary(self) -> dict[str, Any]:
        """What a trainer returns of the tuning beside its metrics."""
        return {key: self.tuned[key] for key in ("retrieval_weight", "warnings")}


def _load_saved(path: Path, key: str) -> tuple[list[Example], list[HeldOut]] | None:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("key") != key:
        return None
    return [Example(**ex) for ex in saved["examples"]], [HeldOut(**h) for h in saved["held_out"]]


def training_data(
    client: Any,
    checkpoints: Checkpoints,
    *,
    beir: Path | None,
    split: str,
    corpus: Path | None,
    index: str | None,
    max_queries: int | None,
    batch_size: int,
    seed: int,
    mine_depth: int,
    negatives: int,
    teacher: str,
    validation: float,
    device: str,
    progress: bool,
) -> TrainingData:
    """The run's examples and held-out lists: the saved ones if their key matches, else mined through
    `client` (a `ragfleet.Client` of the running fleet), scored by `teacher` ("none" for no scores) and
    saved. A corpus's pseudo-queries, when `max_queries` is None, are those DEFAULT_STEPS steps of
    `batch_size` train on and the held-out ones (`pseudo_query_budget`): not the run's own steps, so
    that a finished run given more steps trains on the same data."""
    if corpus is not None and max_queries is None:
        max_queries, validation = pseudo_query_budget(DEFAULT_STEPS * batch_size, validation)
    documents, queries = training_queries(beir, split, corpus, max_queries, seed)
    source = Path(beir or corpus)
    index = training_index(index, beir, corpus, seed, "reranker-train")
    sets = {"exclude": sorted, "relevant": sorted}
    data = {"queries": [asdict(q) | {k: f(getattr(q, k)) for k, f in sets.items()} for q in queries]}
    data |= {"index": index, "mine_depth": mine_depth, "negatives": negatives, "teacher": teacher}
    data |= {"validation": validation, "seed": seed}
    key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    examples_file = checkpoints.root / EXAMPLES_FILE
    saved = _load_saved(examples_file, key)
    if saved is None:
        training, held = split_off(queries, validation, seed)
        prepare_index(client, index, documents.values())
        examples = mine_examples(
            client, index, training, depth=mine_depth, negatives=negatives, progress=progress
        )
        if not examples:
            raise ParamError("data", f"the fleet's index {index!r} gave no query {negatives} negatives")
        if teacher != "none":
            add_teacher_scores(examples, teacher, device, progress)
        saved = examples, held_out_lists(client, index, held, mine_depth)
        record = {"key": key, "examples": [asdict(ex) for ex in saved[0]]}
        atomic_write_json(examples_file, record | {"held_out": [asdict(h) for h in saved[1]]})
    return TrainingData(*saved, key, index, source)
