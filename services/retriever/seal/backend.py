"""SEAL backend: passages' token ids in a segmented FM-index, searched by constrained decoding of n-grams.

The spec of an index (fixed when it is created, kept in its manifest):
- `seal_model`: a language model folder (`lm.SealLM`: any HF causal or seq2seq LM with a fast tokenizer);
  default `settings.retriever.seal_model`, else `<home>/models/seal`, where `ragfleet train seal` writes.
  Until a model is there, creating an index is FAILED_PRECONDITION naming that command. The model's
  tokenizer gives the token ids the index holds.

Search (`search.search`): SEAL's constrained beam search and intersective scoring, with the beam and the
n-gram length of the request's SearchOptions (`beam`, `ngram_length`; 0 means 15 and 10), each at most
`retriever.seal_max_beam` / `retriever.seal_max_ngram`, else INVALID_ARGUMENT naming the option. A query
with no token is INVALID_ARGUMENT naming `query`. Filters restrict the passages n-grams propose.

Each hit carries its matched n-grams as token spans of the indexed text (title + " " + text); `highlights`
maps them to character spans of the passage's text through the tokenizer's offset mapping (a match in the
title only is not a highlight of the text).

Limits: an index holds at most `retriever.seal_token_budget` tokens; an ingest past it is
RESOURCE_EXHAUSTED and changes nothing. Deletes are tombstones until `rebuild` (`ragfleet rebuild`)
merges the segments.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from services.retriever.backend import Backend, Hits, Query, Span, passage_text
from services.retriever.passages import Passage
from services.retriever.seal.lm import SealLM
from services.retriever.seal.search import Match, SealParams, search
from services.retriever.seal.segments import SegmentedIndex
from services.runtime.errors import failed_precondition, invalid_argument, resource_exhausted
from services.runtime.model_errors import ArtifactError, ParamError
from services.runtime.settings import Settings

DEFAULT_FOLDER = "seal"
TRAIN_COMMAND = "ragfleet train seal"

_models: dict[tuple[str, int, str], SealLM] = {}
_models_lock = threading.Lock()


def default_model(settings: Settings) -> str:
    """The LM of a new index whose spec names none."""
    return settings.retriever.seal_model or str(Path(settings.home) / "models" / DEFAULT_FOLDER)


def load_model(folder: str, device: str) -> SealLM:
    """The LM at `folder`, loaded once per process (again when its config changes on disk);
    FAILED_PRECONDITION when it is missing or broken."""
    config = Path(folder).expanduser() / "config.json"
    if not config.is_file():
        raise failed_precondition(
            f"no SEAL language model at {config.parent}; train one with `{TRAIN_COMMAND}` or set "
            "retriever.seal_model (or spec.seal_model) to a Hugging Face LM folder"
        )
    key = (folder, config.stat().st_mtime_ns, device)
    with _models_lock:
        lm = _models.get(key)
        if lm is None:
            try:
                lm = _models[key] = SealLM.load(folder, device)
            except ArtifactError as err:
                raise failed_precondition(str(err)) from err
        return lm


class SealBackend(Backend):
    SEARCH_OPTIONS: ClassVar[frozenset[str]] = frozenset(("beam", "ngram_length"))

    def __init__(self, spec: dict[str, Any], settings: Settings, version_dir: Path | None) -> None:
        retriever = settings.retriever
        self.lm = load_model(spec["seal_model"], retriever.device)
        self.max_beam, self.max_ngram = retriever.seal_max_beam, retriever.seal_max_ngram
        self.token_budget = retriever.seal_token_budget
        try:
            self.index = (
                SegmentedIndex.empty(self.lm.vocab_size)
                if version_dir is None
                else SegmentedIndex.open(version_dir)
            )
        except ArtifactError as err:
            raise failed_precondition(str(err)) from err

    @classmethod
    def resolve_spec(cls, spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
        # Fields of other backends in the shared IndexSpec are not read here, so they are ignored.
        folder = spec.get("seal_model") or default_model(settings)
        load_model(folder, settings.retriever.device)  # a new index needs a usable model
        return {"seal_model": folder}

    @classmethod
    def open(
        cls, directory: Path, spec: dict[str, Any], settings: Settings, version_dir: Path | None
    ) -> SealBackend:
        return cls(spec, settings, version_dir)

    model_id = property(lambda self: self.lm.model_id)
    dimension = property(lambda self: 0)

    def add(self, rows: Sequence[tuple[int, Passage]]) -> None:
        if not rows:
            return
        tokens = self.lm.encode_passages([passage_text(p) for _, p in rows])
        total = self.index.n_tokens + sum(map(len, tokens))
        if total > self.token_budget:
            raise resource_exhausted(
                f"the seal index would hold {total} tokens, past retriever.seal_token_budget "
                f"({self.token_budget}); nothing was committed"
            )
        self.index.add([(rowid, ids) for (rowid, _), ids in zip(rows, tokens, strict=True)])

    def remove(self, rowids: Sequence[int]) -> None:
        self.index.remove(list(rowids))

    def search(self, query: Query) -> list[Hits]:
        options = query.options
        params = SealParams(
            beam=options.beam or SealParams.beam, max_ngram=options.ngram_length or SealParams.max_ngram
        )
        try:
            params.check(self.max_beam, self.max_ngram)
        except ParamError as err:
            raise invalid_argument(f"options.{err.field}", err.problem) from err
        results: list[Hits] = []
        for text in query.texts:
            ids, words = self.lm.encode_query(text)
            if not ids:
                raise invalid_argument("query", f"{text[:80]!r} has no tokens the SEAL model knows")
            hits = search(self.lm, self.index, ids, words, query.k, params, query.allowed)
            results.append([(h.rowid, h.score, h.matches) for h in hits])
        return results

    def highlights(self, passage: Passage, matches: Sequence[Match] | None = None) -> list[Span]:
        if not matches:
            return []
        _, offsets = self.lm.encode_passage(passage_text(passage))
        shift = len(passage.title) + 1 if passage.title else 0  # the text's place in title + " " + text
        spans = []
        for match in matches:
            start, end = offsets[match.start][0] - shift, offsets[match.end - 1][1] - shift
            if end > 0:
                spans.append(Span(max(0, start), end, match.weight))
        return spans

    def rebuild(self) -> bool:
        return self.index.merge()

    def save(self, version_dir: Path) -> dict[str, Any]:
        self.index.save(version_dir)
        return {"tokens": self.index.n_tokens, "segments": self.index.n_segments}
