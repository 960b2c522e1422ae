"""The demo's Retro checkpoint: shipped with the project, or trained by `ragfleet demo --retrain`.

`ensure_demo_model` keeps `<home>/models/retro` (the Generator's default checkpoint) holding a model
made for the current demo corpus and recipe; train.json's `demo_fingerprint` says which corpora and
settings it was made with (`demo_fingerprint`). A current model there is used as it is; else the one
that ships in `SHIPPED` (made by `make demo-model`: `ragfleet demo --retrain --export services/demo/model`;
fp16 safetensors with the vocabulary cut to the tokens of the demo's corpora, `retro.vocab`: 3.8 MB
instead of 11) is installed when its fingerprint is the current one; else, or with `retrain`, a new one
is trained (about 18 minutes on two idle cores), replacing what is there.

The demo asks about facts that are only in its passages, so the model must learn to read answers from
its neighbours, not to remember them. It trains on `TRAINING_ARCHIPELAGOS` other archipelagos
(`corpus.generated_archipelago`: the demo's templates with new names and numbers, none of the demo's
facts), ingested into their own index `TRAINING_INDEX` of the running fleet so neighbours are retrieved
exactly as they are when served (every retriever of the index, fused, as the Pipeline's Ask does):
(a) questions in the demo's style (its 8 templates and 12 more, each fact asked once), laid out as the
Generator's prompts with the question's top passages as neighbours; (b) language modelling on the same
documents, with RETRO's rule that a chunk's own document is never its neighbour, which also gives an
honest held-out perplexity with and without retrieval. The model has a copy head
(`RetroConfig.copy_head`), as a plain Retro model of this size does not learn to copy within this budget.
The training index is dropped afterwards.

Then the 8 demo questions are answered in-process (greedy `retro.decode.generate` with the passages the
Pipeline retrieves from the demo index) and the number of answers that contain the expected one is printed
and stored in train.json. `replace_index` and `contains_answer` serve `demo.run` as well.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from services.demo.corpus import demo_documents, demo_questions, generated_archipelago
from services.evaluator.metrics.qa import normalize_answer
from services.generator.retro.data import PROMPT_TEMPLATE, load_tokenizer, prompt_ids
from services.generator.retro.decode import DecodeParams, DecodeResult, Neighbour, generate
from services.generator.retro.model import CONFIG_FILE, WEIGHTS_FILE, RetroConfig, RetroModel
from services.generator.retro.neighbours import NEIGHBOURS_DIR, PipelineRetrieval
from services.generator.retro.train import TRAIN_FILE, TrainProgress, TrainSettings, train_retro
from services.generator.retro.vocab import (
    TOKENIZER_FILES,
    cut_config,
    cut_tokenizer_files,
    cut_weights,
    kept_token_ids,
)
from services.runtime.artifacts import CHECKPOINTS_DIR, write_directory
from services.runtime.storage import atomic_write_json
from services.ui import progress_bar

TOKENIZER = "all-MiniLM-L6-v2"
# The checkpoint that ships with the project (package data).
SHIPPED = Path(__file__).with_name("model")
SHIPPED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TRAIN_FILE, *TOKENIZER_FILES)
TRAINING_INDEX = "demo-retro-train"
TRAINING_ARCHIPELAGOS = 6
# Demo passages are whole documents of 42–65 tokens, and prompts fit in 32 tokens: chunks of 32 and
# neighbours of 64 tokens cover them with a quarter of the compute of RETRO's 64 / 128.
MODEL = {
    "d_model": 128,
    "n_layers": 4,
    "n_heads": 4,
    "d_ff": 512,
    "chunk_size": 32,
    "num_neighbours": 2,
    "neighbour_len": 64,
    "cca_start": 1,
    "cca_every": 1,
    "encoder_layers": 2,
    "max_seq_len": 128,
    "copy_head": True,
}
SETTINGS = TrainSettings(
    steps=1500,
    batch_size=16,
    seq_len=64,
    lr=2e-3,
    warmup=100,
    decay_fraction=0.3,
    eval_fraction=0.1,
    checkpoint_every=1500,
    exclude_own_document=True,
)
MAX_ANSWER_TOKENS = 24


def contains_answer(generated: str, expected: str) -> bool:
    """Whether the normalised expected answer appears, as whole words, in the normalised generated text."""
    gold = normalize_answer(expected)
    return bool(gold) and f" {gold} " in f" {normalize_answer(generated)} "


def replace_index(
    client: Any, documents: list[dict], index: str, console: Console, description: str
) -> list[str]:
    """Drops `index` if it exists and ingests `documents` into it with the fleet's default spec, showing
    a progress bar and the versions each retriever built; returns those retrievers' names."""
    import ragfleet

    try:
        client.delete(index=index, drop_index=True)
    except ragfleet.errors.NotFound:
        pass
    with progress_bar(console) as bar:
        task = bar.add_task(description, total=len(documents))
        report = client.ingest(
            documents, index=index, batch_size=32, progress=lambda n: bar.update(task, completed=n)
        )
    console.print(
        f"ingested {report.documents} documents as {report.passages} passages into {index}: "
        + ", ".join(f"{r.version.retriever} (v{r.version.version})" for r in report.retrievers)
    )
    return [r.version.retriever for r in report.retrievers]


def model_dir(home: Path) -> Path:
    """Where the Generator looks for its checkpoint by default."""
    return Path(home) / "models" / "retro"


def training_corpus(archipelagos: int = TRAINING_ARCHIPELAGOS) -> tuple[list[dict], list[dict]]:
    """Documents and questions of the generated archipelagos 1…`archipelagos`."""
    documents, questions = [], []
    for n in range(1, archipelagos + 1):
        more_documents, more_questions = generated_archipelago(n)
        documents += more_documents
        questions += more_questions
    return documents, questions


def recipe_fingerprint(
    model: dict[str, Any], settings: TrainSettings, archipelagos: int = TRAINING_ARCHIPELAGOS
) -> str:
    """Changes whenever the demo corpus, the training corpus, the model or the training settings do."""
    recipe = {
        "documents": demo_documents(),
        "training": training_corpus(archipelagos),
        "model": model,
        "settings": settings.__dict__,
        "tokenizer": TOKENIZER,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@cache
def demo_fingerprint() -> str:
    """The fingerprint of the demo's own recipe (MODEL, SETTINGS): the one a current model records."""
    return recipe_fingerprint(MODEL, SETTINGS)


def recorded_fingerprint(path: Path) -> str | None:
    """The `demo_fingerprint` in the train.json of the model folder `path`, if any."""
    record = Path(path) / TRAIN_FILE
    return json.loads(record.read_text()).get("demo_fingerprint") if record.is_file() else None


def ensure_demo_model(
    client: Any, home: Path, console: Console, index: str = "demo", *, retrain: bool = False
) -> Path:
    """The demo's checkpoint folder: kept if current, else the shipped model if current, else (or with
    `retrain`) trained through `client`, its answers checked on `index` (module docstring)."""
    path = model_dir(home)
    fingerprint = demo_fingerprint()
    if not retrain:
        if recorded_fingerprint(path) == fingerprint:
            console.print(f"using the demo's Retro model at {path}")
            return path
        shipped = recorded_fingerprint(SHIPPED)
        if shipped == fingerprint:
            write_directory(path, {name: (SHIPPED / name).read_bytes() for name in SHIPPED_FILES})
            console.print(f"using the demo's shipped Retro model (recipe {fingerprint}), installed at {path}")
            return path
        if shipped is not None:
            console.print(
                f"the shipped demo model was made by recipe {shipped}, the code's is {fingerprint}: "
                "training a new one (`make demo-model` refreshes the shipped one)"
            )
    train_demo_model(client, path, console, index=index)
    return path


def demo_texts(archipelagos: int = TRAINING_ARCHIPELAGOS) -> list[str]:
    """Every text the demo model reads or writes: the demo's and the training corpus's documents and
    questions with their answers, and the prompt's own words."""
    documents, questions = training_corpus(archipelagos)
    documents, questions = demo_documents() + documents, demo_questions() + questions
    return (
        [PROMPT_TEMPLATE]
        + [f"{d['title']} {d['text']}" for d in documents]
        + [f"{q['question']} {q['answer']}" for q in questions]
    )


def export_demo_model(source: Path, out: Path) -> None:
    """Writes the model folder `source` to `out` as it ships: the vocabulary cut to the demo's texts
    (`demo_texts`, `retro.vocab`: the cut tokenizer's files join the folder), the weights in float16
    (`RetroModel.load` reads them back into float32), train.json noting the cut."""
    tokenizer = load_tokenizer(TOKENIZER)
    kept = kept_token_ids(tokenizer, demo_texts())
    weights = load_file(str(Path(source) / WEIGHTS_FILE))
    weights = {name: t.to(torch.float16) for name, t in cut_weights(weights, kept).items()}
    config = cut_config(json.loads((Path(source) / CONFIG_FILE).read_text()), kept)
    record = json.loads((Path(source) / TRAIN_FILE).read_text())
    record["vocabulary"] = {"kept": len(kept), "of": len(tokenizer), "texts": "demo_texts()"}
    write_directory(
        out,
        {
            CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
            TRAIN_FILE: json.dumps(record, indent=2, sort_keys=True).encode(),
            WEIGHTS_FILE: safetensors_bytes(weights),
            **cut_tokenizer_files(tokenizer, kept),
        },
    )


def train_demo_model(
    client: Any,
    out: Path,
    console: Console,
    *,
    index: str = "demo",
    model: dict[str, Any] = MODEL,
    settings: TrainSettings = SETTINGS,
    archipelagos: int = TRAINING_ARCHIPELAGOS,
) -> dict[str, Any]:
    """Trains the demo model into `out` (starting afresh) on the training corpus, which it ingests into
    TRAINING_INDEX for the time of training; answers the demo questions on `index` with it, and returns
    train.json's content, which then includes `demo` (the answers and how many are right) and the
    `demo_fingerprint` of the recipe used (`model`, `settings`, `archipelagos`: the demo's own unless
    given, e.g. a short run's)."""
    tokenizer = load_tokenizer(TOKENIZER)
    config = RetroConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **model)
    for stale in (CHECKPOINTS_DIR, NEIGHBOURS_DIR):
        shutil.rmtree(Path(out) / stale, ignore_errors=True)
    documents, questions = training_corpus(archipelagos)
    replace_index(client, documents, TRAINING_INDEX, console, "ingesting the Retro training corpus")
    try:
        with progress_bar(console) as bar:
            task = bar.add_task("training the demo's Retro model", total=None)

            def show(p: TrainProgress) -> None:
                loss = f", loss {p.loss:.3f}" if p.loss is not None else ""
                bar.update(task, completed=p.done, total=p.total, description=f"Retro: {p.stage}{loss}")

            record = train_retro(
                PipelineRetrieval(client, TRAINING_INDEX, retrievers=None),
                documents,
                Path(out),
                config=config,
                settings=settings,
                qa=[(q["question"], q["answer"]) for q in questions],
                tokenizer=TOKENIZER,
                extra={"demo_fingerprint": recipe_fingerprint(model, settings, archipelagos)},
                progress=show,
            )
    finally:
        client.delete(index=TRAINING_INDEX, drop_index=True)
    answers = answer_demo_questions(RetroModel.load(Path(out)).eval(), client, index)
    right = sum(a["right"] for a in answers)
    record["demo"] = {"right": right, "questions": len(answers), "answers": answers}
    atomic_write_json(Path(out) / TRAIN_FILE, record)
    console.print(
        f"trained the demo's Retro model in {record['seconds']:.0f} s: held-out perplexity "
        f"{_ppl(record['eval']['ppl_retrieval'])} with retrieval, {_ppl(record['eval']['ppl_no_retrieval'])} "
        f"without; {right}/{len(answers)} demo answers right in-process"
    )
    return record


def _ppl(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def answer_demo_questions(model: RetroModel, client: Any, index: str) -> list[dict[str, Any]]:
    """Greedy answers to the demo questions, conditioned on the passages the Pipeline retrieves for them."""
    tokenizer = load_tokenizer(TOKENIZER)
    answers = []
    for q in demo_questions():
        found = client.search(q["question"], index=index, top_k=model.config.num_neighbours)
        passages = [
            Neighbour(r.passage.id, r.passage.doc_id, r.passage.title, r.passage.text, r.continuation.text)
            for r in found.results
        ]
        prompt = prompt_ids(tokenizer, q["question"], model.config.chunk_size)
        *_, result = generate(
            model, tokenizer, prompt, passages, None, DecodeParams(max_tokens=MAX_ANSWER_TOKENS)
        )
        assert isinstance(result, DecodeResult)
        answers.append(
            {
                "question": q["question"],
                "expected": q["answer"],
                "answer": result.text,
                "right": contains_answer(result.text, q["answer"]),
            }
        )
    return answers
