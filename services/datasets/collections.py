"""Datasets as one shape for the evaluator and the trainers: BEIR, SQuAD, QA JSON lines, the demo set.

An `EvalDataset` is either

- `"ir"`: a corpus, queries and graded relevance judgements (qrels), scored with IR metrics; or
- `"qa"`: questions with gold answers, scored with EM/F1 on the answer text, and — when the
  dataset knows which documents hold the answers — with IR metrics on what was retrieved.

Loaders:

- `load_beir(folder, split)`: a BEIR folder (read by `services.datasets.beir`, as `ragfleet ingest`
  reads it); name `<folder>-<split>`; the queries judged in the split. Documents keep their
  metadata; there are no answers or contexts. Every judged query must be in `queries.jsonl`; the
  others are not asked (their ids in `queries_without_qrels`). A document with neither title nor
  text is left out (its id in `skipped_documents`); its judgements stay, so a query that needs it
  counts it as a miss, as trec_eval would.
- `load_squad(path)`: SQuAD v1.1 or v2.0 JSON, as open-domain QA: every paragraph is a document
  (id `<article index>-<paragraph index>`, title the article's title), every question is asked, and
  its qrels name its own paragraph (relevance 1). v2.0 questions marked `is_impossible` have no
  answers (`[]`) but keep their paragraph in the qrels. A question without answers that is not
  marked impossible is an error.
- `load_qa_jsonl(path)`: one `{"question", "answers"[, "contexts"][, "id"]}` object per line. The
  id defaults to the line number. The distinct context texts, in order of first appearance, become
  the documents `ctx-<n>`, and a question's qrels are its own contexts. Without any contexts the
  dataset has no corpus: it can only be run against an index that already exists.
- `load_demo()`: the generated Serrow Isles corpus and its questions (`services.demo.corpus`).
- `load_dataset(spec)`: any of the above from `"demo"`, a path (a folder with `corpus.jsonl` is
  BEIR with the "test" split, `.json` is SQuAD, `.jsonl` is QA JSONL) or a dict
  `{"kind": "beir" | "squad" | "jsonl" | "demo", "path": ..., "split": ...}`.

Every loader reads and validates the whole input before it returns, so a caller never ingests part
of a dataset that turns out to be malformed. Errors are ValueError naming `file:line` and the field
(JSON lines) or the file and the JSON path (`data[3].paragraphs[1].qas[0].answers`); a missing
file is FileNotFoundError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.datasets import beir

DatasetKind = Literal["ir", "qa"]
LOADER_KINDS = ("beir", "squad", "jsonl", "demo")
DEMO = "demo"
DEFAULT_SPLIT = "test"


@dataclass(frozen=True)
class EvalDataset:
    """A dataset ready to evaluate; see the module docstring for what each kind carries."""

    name: str
    kind: DatasetKind
    queries: dict[str, str]  # query id -> question / query text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}; may be empty for QA
    answers: dict[str, list[str]] = field(default_factory=dict)  # QA: query id -> gold answers
    contexts: dict[str, list[str]] = field(default_factory=dict)  # query id -> gold context texts
    # doc id -> {"id", "title", "text", "metadata"}, in file order
    corpus: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    # BEIR: ids of the documents left out for having neither title nor text, in file order.
    skipped_documents: list[str] = field(default_factory=list)
    # BEIR: ids of the queries with no judgements in the split, which are not asked.
    queries_without_qrels: list[str] = field(default_factory=list)

    def documents(self) -> Iterator[dict[str, Any]]:
        """The corpus as `{"id", "title", "text", "metadata"}` dicts, in file order."""
        return iter(self.corpus.values())

    @property
    def has_corpus(self) -> bool:
        """False for a QA set without contexts, which must be run against an existing index."""
        return bool(self.corpus)


def _by_id(documents: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["id"]: doc for doc in documents}


# --- BEIR --------------------------------------------------------------------------------------


def load_beir(folder: str | Path, split: str = DEFAULT_SPLIT) -> EvalDataset:
    """A BEIR folder's corpus with the queries and qrels of `split`."""
    folder = Path(folder)
    qrels = beir.load_qrels(folder, split)
    all_queries = beir.load_queries(folder)
    missing = [qid for qid in qrels if qid not in all_queries]
    if missing:
        raise ValueError(
            f"{folder / beir.QRELS_DIR / f'{split}.tsv'}: {len(missing)} judged queries are not in "
            f"{beir.QUERIES_FILE}, e.g. {missing[:5]}"
        )
    queries = {qid: text for qid, text in all_queries.items() if qid in qrels}
    skipped: list[str] = []
    corpus = _by_id(beir.iter_corpus(folder, skipped))
    return EvalDataset(
        f"{folder.resolve().name}-{split}",
        "ir",
        queries,
        qrels,
        corpus=corpus,
        skipped_documents=skipped,
        queries_without_qrels=[qid for qid in all_queries if qid not in qrels],
    )


# --- SQuAD -------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not valid UTF-8 (byte {error.start})") from None


def _expect(value: Any, kind: type, path: Path, where: str) -> Any:
    """`value` when it is a `kind` (a non-empty one for str), else a ValueError naming `where`."""
    names = {list: "a list", dict: "an object", str: "a non-empty string"}
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        if value is None:
            got = "nothing"
        elif isinstance(value, str):
            got = "an empty string"
        else:
            got = type(value).__name__
        raise ValueError(f"{path}: {where} must be {names[kind]}, got {got}")
    return value


def load_squad(path: str | Path) -> EvalDataset:
    """A SQuAD v1.1 or v2.0 file as an open-domain QA set (see the module docstring)."""
    path = Path(path)
    root = _expect(_read_json(path), dict, path, "the top level")
    articles = _expect(root.get("data"), list, path, "data")
    corpus: dict[str, dict[str, Any]] = {}
    queries: dict[str, str] = {}
    answers: dict[str, list[str]] = {}
    qrels: dict[str, dict[str, int]] = {}
    contexts: dict[str, list[str]] = {}
    for a, article in enumerate(articles):
        where = f"data[{a}]"
        _expect(article, dict, path, where)
        title = _expect(article.get("title"), str, path, f"{where}.title")
        paragraphs = _expect(article.get("paragraphs"), list, path, f"{where}.paragraphs")
        for p, paragraph in enumerate(paragraphs):
            where = f"data[{a}].paragraphs[{p}]"
            _expect(paragraph, dict, path, where)
            context = _expect(paragraph.get("context"), str, path, f"{where}.context")
            doc_id = f"{a}-{p}"
            corpus[doc_id] = {"id": doc_id, "title": title, "text": context, "metadata": {}}
            for q, qa in enumerate(_expect(paragraph.get("qas"), list, path, f"{where}.qas")):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                _expect(qa, dict, path, where)
                qid = _expect(qa.get("id"), str, path, f"{where}.id")
                if qid in queries:
                    raise ValueError(f"{path}: {where}.id repeats the question id {qid!r}")
                queries[qid] = _expect(qa.get("question"), str, path, f"{where}.question")
                answers[qid] = _squad_answers(qa, path, where)
                qrels[qid] = {doc_id: 1}
                contexts[qid] = [context]
    if not queries:
        raise ValueError(f"{path}: data holds no questions")
    return EvalDataset(path.stem, "qa", queries, qrels, answers, contexts, corpus)


def _squad_answers(qa: Mapping[str, Any], path: Path, where: str) -> list[str]:
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise ValueError(f"{path}: {where}.is_impossible must be true or false, got {impossible!r}")
    items = _expect(qa.get("answers"), list, path, f"{where}.answers")
    if impossible:
        return []
    if not items:
        raise ValueError(f"{path}: {where}.answers is empty but the question is not marked is_impossible")
    texts = []
    for n, item in enumerate(items):
        _expect(item, dict, path, f"{where}.answers[{n}]")
        texts.append(_expect(item.get("text"), str, path, f"{where}.answers[{n}].text"))
    return texts


# --- QA JSON lines -----------------------------------------------------------------------------


def _string_list(record: Mapping[str, Any], name: str, where: str, *, required: bool) -> list[str]:
    value = record.get(name)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not value:
        problem = "is missing" if value is None else "must be a non-empty list of strings"
        raise ValueError(f"{where}: field '{name}' {problem}")
    for n, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{where}: field '{name}[{n}]' must be a non-empty string, got {item!r}")
    return value


def load_qa_jsonl(path: str | Path) -> EvalDataset:
    """QA JSON lines `{"question", "answers"[, "contexts"][, "id"]}` (see the module docstring)."""
    path = Path(path)
    queries: dict[str, str] = {}
    answers: dict[str, list[str]] = {}
    contexts: dict[str, list[str]] = {}
    doc_ids: dict[str, str] = {}  # context text -> document id
    qrels: dict[str, dict[str, int]] = {}
    for number, record in beir.json_lines(path):
        where = f"{path}:{number}"
        qid = record.get("id", str(number))
        if isinstance(qid, bool) or not isinstance(qid, str | int) or str(qid) == "":
            raise ValueError(f"{where}: field 'id' must be a non-empty string, got {qid!r}")
        qid = str(qid)
        if qid in queries:
            raise ValueError(f"{where}: field 'id' repeats the question id {qid!r}")
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            problem = "is missing" if question is None else "must be a non-empty string"
            raise ValueError(f"{where}: field 'question' {problem}")
        queries[qid] = question
        answers[qid] = _string_list(record, "answers", where, required=True)
        contexts[qid] = _string_list(record, "contexts", where, required=False)
        if contexts[qid]:
            qrels[qid] = {doc_ids.setdefault(text, f"ctx-{len(doc_ids)}"): 1 for text in contexts[qid]}
    if not queries:
        raise ValueError(f"{path}: no questions")
    contexts = {qid: texts for qid, texts in contexts.items() if texts}
    corpus = _by_id({"id": i, "title": "", "text": text, "metadata": {}} for text, i in doc_ids.items())
    return EvalDataset(path.stem, "qa", queries, qrels, answers, contexts, corpus)


# --- the demo set ------------------------------------------------------------------------------


def load_demo() -> EvalDataset:
    """The demo corpus (160 documents) and its questions (ids `q1`, `q2`, ...) as a QA set."""
    from services.demo.corpus import demo_documents, demo_questions

    documents = demo_documents()
    texts = {doc["id"]: doc["text"] for doc in documents}
    questions = {f"q{n}": question for n, question in enumerate(demo_questions(), start=1)}
    return EvalDataset(
        name=DEMO,
        kind="qa",
        queries={qid: q["question"] for qid, q in questions.items()},
        qrels={qid: {q["doc_id"]: 1} for qid, q in questions.items()},
        answers={qid: [q["answer"]] for qid, q in questions.items()},
        contexts={qid: [texts[q["doc_id"]]] for qid, q in questions.items()},
        corpus=_by_id(documents),
    )


# --- dispatch ----------------------------------------------------------------------------------


def _kind_of(path: Path) -> str:
    if path.is_dir():
        if (path / beir.CORPUS_FILE).is_file():
            return "beir"
        raise ValueError(f"{path}: a folder without {beir.CORPUS_FILE} (expected a BEIR dataset)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix == ".json":
        return "squad"
    if path.suffix == ".jsonl":
        return "jsonl"
    raise ValueError(f"{path}: cannot tell the dataset kind (expected a BEIR folder, .json or .jsonl)")


def load_dataset(spec: str | Path | Mapping[str, Any]) -> EvalDataset:
    """Loads a dataset from `"demo"`, a path, or `{"kind", "path", "split"}` (see the module docstring)."""
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"kind", "path", "split"})
        if unknown:
            raise ValueError(f"dataset: unknown field {unknown[0]!r} (expected kind, path, split)")
        kind, path, split = spec.get("kind"), spec.get("path"), spec.get("split")
    else:
        kind, path, split = (DEMO, None, None) if str(spec) == DEMO else (None, spec, None)
    if kind is not None and kind not in LOADER_KINDS:
        raise ValueError(f"dataset.kind: expected one of {list(LOADER_KINDS)}, got {kind!r}")
    if split is not None and not isinstance(split, str):
        raise ValueError(f"dataset.split: must be a string, got {split!r}")
    if kind == DEMO:
        if path is not None or split is not None:
            raise ValueError("dataset: the demo set takes no path or split")
        return load_demo()
    if not isinstance(path, str | Path) or not str(path):
        raise ValueError(f"dataset.path: a dataset of kind {kind or 'unknown'!r} needs a path")
    path = Path(path)
    kind = kind or _kind_of(path)
    if split is not None and kind != "beir":
        raise ValueError(f"dataset.split: only BEIR datasets have splits, not {kind!r}")
    if kind == "beir":
        return load_beir(path, split or DEFAULT_SPLIT)
    if kind == "squad":
        return load_squad(path)
    return load_qa_jsonl(path)
