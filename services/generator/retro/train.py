"""Training Retro (`ragfleet train retro`): data with retrieved neighbours, the loop, checkpoints, eval.

Data. Documents are tokenised (`retro.data`), each ended by [SEP] and cut into chunks of m tokens inside
the document (its last chunk is padded; pads are never predicted). Consecutive chunks make training
windows of `seq_len` tokens. Every chunk is a query to the Retro database, an index of ~64-token
passages built through the Retriever: its top hits, **excluding passages of the chunk's own document**
as RETRO does (held-out documents always; training ones unless `exclude_own_document` is off), become
its k neighbours (`data.neighbour_ids`: passage + continuation, r tokens). Optional
question/answer pairs add examples laid out as served (`data.prompt_ids` + `data.answer_ids`, loss on
the answer only) whose every chunk has the question's top hits as neighbours (no exclusion: the
Pipeline hands the Generator the passages it retrieved for the question). Neighbours are fetched once
and cached in `<out>/neighbours/<key>.npz`, keyed by the corpus, the QA pairs, the index versions and the
layout, so a resumed or repeated run does not query again.

Retrieval goes through a `Retrieval` object; `PipelineRetrieval` asks a running fleet through the SDK.
The Pipeline's SearchBatch carries no `with_continuation`, so it runs concurrent single searches.

Loop. AdamW (weight decay on matrices only), a warmup-stable-decay learning rate (`lr_at`), gradient
clipping. The data order is a seeded permutation per epoch, so step s always sees the same batch.
Every `checkpoint_every` steps `<out>/checkpoints/step-<6-digit step>/` gets the model (`RetroModel.save`),
the optimizer's tensors (safetensors) and the scalars (trainer.json); nothing is pickled. `resume`
continues from the latest one. The final model is `<out>/config.json` + `model.safetensors`, then
`<out>/train.json` (settings, losses, eval) written last, so a folder with train.json is complete.

Eval. Perplexity on held-out documents (a seeded `eval_fraction` of them), with their retrieved
neighbours and without retrieval (neighbours=None).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from transformers import PreTrainedTokenizerBase

from services.generator.retro.data import (
    answer_ids,
    chunk_tokens,
    encode,
    end_of_answer_id,
    load_tokenizer,
    neighbour_ids,
    prompt_ids,
)
from services.generator.retro.model import CONFIG_FILE, WEIGHTS_FILE, RetroConfig, RetroModel, load_parameters
from services.runtime.storage import atomic_write_bytes, atomic_write_json, fsync_dir, fsync_tree

IGNORE = -100  # label of positions that are not predicted
TRAIN_FILE = "train.json"
RETRO_CHUNKING = {"chunk_tokens": 48, "overlap_tokens": 0}  # 48 words ≈ 64 WordPiece tokens


@dataclass(frozen=True)
class Hit:
    """A retrieved passage as a neighbour needs it."""

    doc_id: str
    text: str
    continuation: str


class Retrieval(Protocol):
    """The Retro database: `search` returns each query's hits, best first."""

    @property
    def fingerprint(self) -> str:
        """Changes whenever the database's content does (e.g. index versions)."""
        ...

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]: ...


class PipelineRetrieval:
    """Searches `index` through a running Pipeline (`ragfleet.Client`), with continuations."""

    def __init__(
        self, client: Any, index: str, retrievers: Sequence[str] | None = ("dense",), workers: int = 4
    ):
        self.client, self.index, self.workers = client, index, workers
        self.retrievers = list(retrievers) if retrievers else None

    @property
    def fingerprint(self) -> str:
        described = self.client.describe_index(self.index)
        versions = sorted(
            f"{r.version.retriever}@{r.version.version}"
            for r in described.retrievers
            if self.retrievers is None or r.version.retriever in self.retrievers
        )
        return f"{self.index}:{','.join(versions)}:{','.join(self.retrievers or ['all'])}"

    def _one(self, query: str, top_k: int) -> list[Hit]:
        found = self.client.search(
            query, index=self.index, top_k=top_k, retrievers=self.retrievers, with_continuation=True
        )
        return [Hit(r.passage.doc_id, r.passage.text, r.continuation.text) for r in found.results]

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda q: self._one(q, top_k), queries))


def prepare_index(client: Any, index: str, documents: Sequence[dict], retrievers: Sequence[str]) -> bool:
    """Ingests `documents` into `index` as Retro's ~64-token passages unless the index exists.

    Returns whether it ingested.
    """
    import ragfleet

    try:
        client.describe_index(index)
        return False
    except ragfleet.errors.NotFound:
        pass
    client.ingest(documents, index=index, spec={"chunking": RETRO_CHUNKING, "retrievers": list(retrievers)})
    return True


@dataclass(frozen=True)
class TrainSettings:
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
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.seq_len % config.chunk_size or self.seq_len > config.max_seq_len:
            raise ValueError(
                f"seq_len: must be a multiple of chunk_size {config.chunk_size} and at most max_seq_len "
                f"{config.max_seq_len}, got {self.seq_len}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup: must be between 0 and steps ({self.steps}), got {self.warmup}")
        for name in ("decay_fraction", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be between 0 and 1, got {getattr(self, name)}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")


def lr_at(step: int, s: TrainSettings) -> float:
    """Warmup-stable-decay: linear warmup over `warmup` steps, constant, then a linear decay to
    lr · min_lr_ratio over the last `decay_fraction` of the steps (step counts from 0)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    decay_steps = round(s.steps * s.decay_fraction)
    decay_start = s.steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return s.lr
    progress = (step - decay_start + 1) / decay_steps
    return s.lr * (1 - (1 - s.min_lr_ratio) * progress)


@dataclass(frozen=True)
class TrainProgress:
    stage: str  # "ingesting", "retrieving", "training", "evaluating"
    done: int
    total: int
    loss: float | None = None


ProgressFn = Callable[[TrainProgress], None]


# --- data -----------------------------------------------------------------------------------------


@dataclass
class Examples:
    """Fixed-length examples: tokens and labels (N, seq_len), neighbours (N, seq_len / m, k, r)."""

    tokens: np.ndarray
    labels: np.ndarray
    neighbours: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(self.tokens[rows]).long(),
            torch.from_numpy(self.labels[rows]).long(),
            torch.from_numpy(self.neighbours[rows]).long(),
        )

    @staticmethod
    def concat(parts: Sequence[Examples], seq_len: int, k: int, r: int) -> Examples:
        parts = [p for p in parts if len(p)]
        if not parts:
            empty = np.zeros((0, seq_len), np.int32)
            return Examples(empty, empty.copy(), np.zeros((0, 0, k, r), np.int32))
        return Examples(
            *(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Examples))
        )


@dataclass
class _Chunk:
    doc_id: str
    ids: list[int]  # exactly m tokens, pads at the end of a document's last chunk
    labels: list[int]


def _document_chunks(tokenizer: PreTrainedTokenizerBase, doc: dict, m: int) -> list[_Chunk]:
    ids = encode(tokenizer, doc["text"]) + [end_of_answer_id(tokenizer)]
    pad = tokenizer.pad_token_id
    return [
        _Chunk(doc["id"], piece + [pad] * (m - len(piece)), piece + [IGNORE] * (m - len(piece)))
        for piece in chunk_tokens(ids, m)
    ]


def _neighbour_block(tokenizer: PreTrainedTokenizerBase, hits: Sequence[Hit], k: int, r: int) -> np.ndarray:
    """(k, r) neighbour ids from the first k hits; missing ones are all pad (masked by the model)."""
    block = np.full((k, r), tokenizer.pad_token_id, np.int32)
    for i, hit in enumerate(hits[:k]):
        block[i] = neighbour_ids(tokenizer, hit.text, hit.continuation, r)
    return block


def _split_documents(documents: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded `fraction` of the documents (at least one when fraction > 0)."""
    if fraction == 0 or len(documents) < 2:
        return list(documents), []
    order = np.random.default_rng(seed).permutation(len(documents))
    held = set(order[: max(1, round(fraction * len(documents)))].tolist())
    return (
        [d for i, d in enumerate(documents) if i not in held],
        [d for i, d in enumerate(documents) if i in held],
    )


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class _NeighbourCache:
    """Neighbour blocks of every chunk and question, fetched once per key and kept in an npz file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.path.exists():
            return None
        with np.load(self.path, allow_pickle=False) as data:
            return data["chunks"], data["questions"]

    def save(self, chunks: np.ndarray, questions: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, chunks=chunks, questions=questions)
        atomic_write_bytes(self.path, buffer.getvalue())


def build_examples(
    tokenizer: PreTrainedTokenizerBase,
    retrieval: Retrieval,
    documents: Sequence[dict],
    qa: Sequence[tuple[str, str]],
    config: RetroConfig,
    settings: TrainSettings,
    cache_dir: Path,
    progress: ProgressFn | None = None,
) -> tuple[Examples, Examples, dict[str, Any]]:
    """(train examples, held-out LM examples, data summary); neighbours come from `retrieval` or the cache."""
    m, k, r, n = config.chunk_size, config.num_neighbours, config.neighbour_len, settings.seq_len
    train_docs, eval_docs = _split_documents(documents, settings.eval_fraction, settings.seed)
    splits = [
        [c for d in docs for c in _document_chunks(tokenizer, d, m)] for docs in (train_docs, eval_docs)
    ]
    chunks = splits[0] + splits[1]
    prompts, skipped = [], 0
    for question, answer in qa:
        ids = prompt_ids(tokenizer, question, m)
        target = answer_ids(tokenizer, answer)
        if len(ids) + len(target) > n:
            skipped += 1
            continue
        prompts.append((question, ids, target))

    key = _sha(
        {
            "retrieval": retrieval.fingerprint,
            "tokenizer": tokenizer.name_or_path,
            "layout": [m, k, r, settings.extra_hits, settings.exclude_own_document],
            "chunks": _sha([(c.doc_id, c.ids) for c in chunks]),
            "questions": _sha([q for q, _, _ in prompts]),
        }
    )
    cache = _NeighbourCache(cache_dir / f"{key[:24]}.npz")
    cached = cache.load()
    if cached is None:
        excluded = [c.doc_id if settings.exclude_own_document else None for c in splits[0]]
        chunk_blocks = _search_blocks(
            tokenizer,
            retrieval,
            [tokenizer.decode(c.ids, skip_special_tokens=True) for c in chunks],
            excluded + [c.doc_id for c in splits[1]],
            k + settings.extra_hits,
            k,
            r,
            progress,
        )
        question_blocks = _search_blocks(
            tokenizer, retrieval, [q for q, _, _ in prompts], [None] * len(prompts), k, k, r, progress
        )
        cache.save(chunk_blocks, question_blocks)
    else:
        chunk_blocks, question_blocks = cached

    per_window = n // m
    pad = tokenizer.pad_token_id
    lm = []
    offset = 0
    for split in splits:
        windows = len(split) // per_window
        rows = range(offset, offset + windows * per_window)
        tokens = np.array([chunks[i].ids for i in rows], np.int32).reshape(windows, n)
        labels = np.array([chunks[i].labels for i in rows], np.int32).reshape(windows, n)
        neighbours = chunk_blocks[offset : offset + windows * per_window].reshape(windows, per_window, k, r)
        lm.append(Examples(tokens, labels, neighbours))
        offset += len(split)

    qa_tokens = np.full((len(prompts), n), pad, np.int32)
    qa_labels = np.full((len(prompts), n), IGNORE, np.int32)
    for row, (_, ids, target) in enumerate(prompts):
        qa_tokens[row, : len(ids) + len(target)] = ids + target
        qa_labels[row, len(ids) : len(ids) + len(target)] = target
    qa_neighbours = np.repeat(question_blocks[:, None], per_window, axis=1)

    train = Examples.concat([lm[0], Examples(qa_tokens, qa_labels, qa_neighbours)], n, k, r)
    if len(train) == 0:
        raise ValueError(f"seq_len: the corpus has no window of {n} tokens and there are no QA examples")
    summary = {
        "documents": len(train_docs),
        "held_out_documents": len(eval_docs),
        "lm_windows": len(lm[0]),
        "eval_windows": len(lm[1]),
        "qa_examples": len(prompts),
        "qa_skipped_too_long": skipped,
        "neighbour_cache": cache.path.name,
        "neighbours_cached": cached is not None,
    }
    return train, lm[1], summary


def _search_blocks(
    tokenizer: PreTrainedTokenizerBase,
    retrieval: Retrieval,
    queries: list[str],
    exclude_docs: list[str | None],
    top_k: int,
    k: int,
    r: int,
    progress: ProgressFn | None,
    batch: int = 64,
) -> np.ndarray:
    """(len(queries), k, r) neighbour blocks; a blank query (a chunk of only [SEP] and pads) gets none."""
    blocks = np.full((len(queries), k, r), tokenizer.pad_token_id, np.int32)
    asked = [i for i, q in enumerate(queries) if q.strip()]
    for start in range(0, len(asked), batch):
        rows = asked[start : start + batch]
        for i, hits in zip(rows, retrieval.search([queries[i] for i in rows], top_k), strict=True):
            kept = [h for h in hits if h.doc_id != exclude_docs[i]]
            blocks[i] = _neighbour_block(tokenizer, kept, k, r)
        if progress:
            progress(TrainProgress("retrieving", start + len(rows), len(asked)))
    return blocks


# --- the loop -------------------------------------------------------------------------------------


class _Order:
    """The seeded data order: epoch e is a permutation drawn from (seed, e), so batches are reproducible."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    @lru_cache(maxsize=4)  # noqa: B019 - one small object per run
    def _epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def rows(self, step: int, batch_size: int) -> np.ndarray:
        first = step * batch_size
        return np.array(
            [self._epoch(i // self.size)[i % self.size] for i in range(first, first + batch_size)]
        )


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


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under `<out>/checkpoints` (temp folders start with a dot)."""
    root = out / "checkpoints"
    steps = sorted(p for p in root.glob("step-*") if p.is_dir()) if root.exists() else []
    return steps[-1] if steps else None


def _save_checkpoint(
    out: Path, model: RetroModel, optimizer: torch.optim.AdamW, step: int, state: dict[str, Any], keep: int
) -> None:
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = _step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp / "model")
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    (tmp / "optimizer.safetensors").write_bytes(safetensors_bytes(tensors))
    groups = optimizer.state_dict()["param_groups"]
    (tmp / "trainer.json").write_text(
        json.dumps(
            {**state, "step": step, "param_groups": groups, "optimizer_scalars": scalars}, sort_keys=True
        )
    )
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, model: RetroModel, optimizer: torch.optim.AdamW) -> dict[str, Any]:
    """Restores the model, the optimizer and torch's RNG from `path`; returns the trainer state."""
    state = json.loads((path / "trainer.json").read_text())
    load_parameters(model, dict(model.named_parameters()), path / "model" / WEIGHTS_FILE)
    tensors = load_file(str(path / "optimizer.safetensors"))
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for index, values in state.pop("optimizer_scalars").items():
        per_param.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    return state


def _save_final(out: Path, model: RetroModel, record: dict[str, Any]) -> None:
    """Replaces `<out>`'s model files, then writes train.json last (its presence marks a complete model)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / TRAIN_FILE).unlink(missing_ok=True)
    staged = out / ".final.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    model.save(staged)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        os.replace(staged / name, out / name)
    shutil.rmtree(staged, ignore_errors=True)
    fsync_dir(out)
    atomic_write_json(out / TRAIN_FILE, record)


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
    latest = latest_checkpoint(out)
    if latest is not None and not resume:
        raise ValueError(
            f"resume: {out} holds checkpoints ({latest.name}); pass resume or choose another out"
        )
    started = time.perf_counter()

    train, held_out, data = build_examples(
        tok, retrieval, documents, qa, config, settings, out / "neighbours", progress
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
        saved = json.loads((latest / "trainer.json").read_text())
        for name in ("config", "settings", "tokenizer", "data"):
            if saved[name] != run_state[name]:
                raise ValueError(f"resume: {latest} was made with a different {name}; train into another out")
        saved = _load_checkpoint(latest, model, optimizer)
        step, losses = saved["step"], saved["losses"]

    order = _Order(len(train), settings.seed)
    model.train()
    while step < settings.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        tokens, labels, neighbours = train.batch(order.rows(step, settings.batch_size))
        loss, _ = lm_loss(model, tokens, labels, neighbours)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        step += 1
        losses.append(round(loss.item(), 5))
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            _save_checkpoint(
                out, model, optimizer, step, {**run_state, "losses": losses}, settings.keep_checkpoints
            )
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


def config_from_overrides(tokenizer: PreTrainedTokenizerBase, overrides: Sequence[str]) -> RetroConfig:
    """RetroConfig's defaults for `tokenizer`, changed by "field=value" strings (values parsed as JSON,
    else kept as text). Raises ValueError naming `config` or the field."""
    values: dict[str, Any] = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    for item in overrides:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"config: expected FIELD=VALUE, got {item!r}")
        try:
            values[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[name.strip()] = raw
    return RetroConfig.from_dict(values)


def train_from_fleet(
    client: Any,
    *,
    index: str,
    corpus: str | os.PathLike[str],
    out: Path,
    qa: str | os.PathLike[str] | None = None,
    retrievers: Sequence[str] = ("dense",),
    config_overrides: Sequence[str] = (),
    settings: TrainSettings = TrainSettings(),
    tokenizer: str = "all-MiniLM-L6-v2",
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """What `ragfleet train retro` runs: reads the corpus (JSONL or BEIR folder) and the optional QA set
    (anything `services.evaluator.datasets.load_dataset` reads; each question with its first answer),
    ingests the corpus into `index` as ~64-token passages unless the index exists, then `train_retro`
    with neighbours from the running fleet."""
    from ragfleet._common import iter_documents
    from services.evaluator.datasets import load_dataset

    documents = [{"id": d.id, "title": d.title, "text": d.text} for d in iter_documents(corpus)]
    pairs: list[tuple[str, str]] = []
    if qa is not None:
        dataset = load_dataset(qa)
        pairs = [
            (q, dataset.answers[qid][0]) for qid, q in dataset.queries.items() if dataset.answers.get(qid)
        ]
    config = config_from_overrides(load_tokenizer(tokenizer), config_overrides)
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
