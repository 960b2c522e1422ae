"""The FIRST backend: listwise reranking by a causal LM, one forward pass per window.

The passages of a window are labelled [A], [B], ... in a prompt that asks for their ranking and ends
with "[", so the model's next token is the identifier of the passage it would rank first. FIRST (Reddy
et al., 2024) reads the whole window's order off that one position: the identifiers' logits there,
sorted. A list longer than a window (`reranker.first_window`, 20) is ranked by a window sliding from the
bottom of the list to the top (`reranker.first_stride`, 10), so good passages rise to the top.
`generate_order` decodes the full permutation "[B] > [A] > ..." greedily with the same model instead
(the slower way FIRST replaces), for the latency comparison.

A checkpoint is any Hugging Face causal LM (`*ForCausalLM` or `*LMHeadModel`) with its tokenizer, in a
local folder or a hub id; every identifier letter must be one token of that tokenizer. The prompt is
built from token ids, without a chat template: the query is cut to QUERY_TOKENS, and each passage to
`max_length` tokens (`reranker.first_passage_tokens`, fewer when a full window would not fit the
model's positions); passages cut that way are reported as truncated. Scores are positional, 1 for the
first of n and 1/n less for each rank below (so blending them with retrieval scores weighs every rank
alike). `Prompt` builds these ids for the backend and for its trainer (`services.reranker.train_first`,
`ragfleet train first`, which writes the default checkpoint to <home>/models/first: a plain Hugging
Face causal LM, so loading it needs nothing of its own here).
"""

from __future__ import annotations

import string
import time
from collections.abc import Sequence
from typing import Any

import torch

from services.reranker.backend import Ranking, RerankerModel, find_checkpoint, trained_retrieval_weight
from services.runtime.model_errors import ArtifactError
from services.runtime.settings import RerankerSettings

LABELS = string.ascii_uppercase
QUERY_TOKENS = 64
HEAD = "I will provide you with {n} passages, each indicated by an alphabetical identifier []. "
HEAD += "Rank the passages based on their relevance to the search query: "
TAIL = (
    ".\nRank the {n} passages above based on their relevance to the search query. All the passages "
    "should be included and listed using identifiers, in descending order of relevance. The output "
    "format should be [] > [], e.g., [A] > [B]. Only respond with the ranking results, do not say any "
    "word or explain.\n["
)


class Prompt:
    """FIRST's prompt as token ids of one tokenizer, for the backend and its trainer alike."""

    def __init__(self, tokenizer: Any, window: int) -> None:
        self.tokenizer, self.window = tokenizer, window
        pieces = [self.ids(label) for label in LABELS[:window]]
        if any(len(ids) != 1 for ids in pieces) or len({ids[0] for ids in pieces}) < window:
            raise ArtifactError("the identifiers A, B, ... are not single, distinct tokens of this tokenizer")
        self.label_ids = [ids[0] for ids in pieces]
        bos = tokenizer.bos_token_id
        self._bos = [bos] if bos is not None else []
        # Tokens of a full window's prompt without its query and passages, and with the ranking generated.
        self.fixed = len(self.prompt_ids([], [[]] * window)) + QUERY_TOKENS * 2 + 4 * window

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, query: list[int], passages: Sequence[list[int]]) -> list[int]:
        """The prompt of a window: ends with "[", so the next token is the best passage's identifier."""
        n = len(passages)
        ids = self._bos + self.ids(HEAD.format(n=n)) + query + self.ids(".\n\n")
        for label, passage in zip(LABELS, passages):
            ids += self.ids(f"[{label}] ") + passage + self.ids("\n")
        return ids + self.ids("\nSearch Query: ") + query + self.ids(TAIL.format(n=n))

    def answer_ids(self, order: Sequence[int]) -> list[int]:
        """What follows the prompt for a ranking `order` (window positions, best first): "B] > [A] ..." """
        return self.ids("] > [".join(LABELS[i] for i in order) + "]")

    def tokenize(
        self, query: str, texts: Sequence[str], max_length: int
    ) -> tuple[list[int], list[list[int]], int]:
        """The query's and the passages' ids, cut to their limits, and how many passages were cut."""
        passages = [self.ids(text) for text in texts]
        truncated = sum(len(ids) > max_length for ids in passages)
        return self.ids(query)[:QUERY_TOKENS], [ids[:max_length] for ids in passages], truncated


def max_positions(config: Any) -> int:
    """The most tokens a model's config says it takes."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)


class FirstReranker(RerankerModel):
    DEFAULT_FOLDER = "first"
    TRAIN_COMMAND = "ragfleet train first"
    ORDER_SENSITIVE = True

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: RerankerSettings) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.window, self.stride = settings.first_window, min(settings.first_stride, settings.first_window)
        self.prompt = Prompt(tokenizer, self.window)
        self.label_ids = self.prompt.label_ids
        positions = max_positions(model.config)
        self._max_length = min(settings.first_passage_tokens, (positions - self.prompt.fixed) // self.window)
        if self._max_length < 8:
            raise ArtifactError(f"the model's {positions} positions cannot hold a window of {self.window}")

    @classmethod
    def configured_model(cls, settings: RerankerSettings) -> str | None:
        return settings.first_model

    @classmethod
    def load(cls, name_or_path: str, settings: RerankerSettings) -> FirstReranker:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        found = find_checkpoint(name_or_path, ("ForCausalLM", "LMHeadModel"), "a causal LM")
        try:
            tokenizer = AutoTokenizer.from_pretrained(found.path, local_files_only=found.local_files_only)
            model = AutoModelForCausalLM.from_pretrained(found.path, local_files_only=found.local_files_only)
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{name_or_path!r} cannot be loaded as a causal LM ({err})") from err
        loaded = cls(model.to(settings.device), tokenizer, settings)
        loaded.retrieval_weight = trained_retrieval_weight(found.path)
        return loaded

    @property
    def max_length(self) -> int:
        return self._max_length

    def _tokenize(self, query: str, texts: Sequence[str]) -> tuple[list[int], list[list[int]], int]:
        return self.prompt.tokenize(query, texts, self._max_length)

    @torch.inference_mode()
    def _window_order(self, query: list[int], passages: Sequence[list[int]]) -> list[int]:
        """The window's passages, best first, from the identifiers' logits at the first answer position."""
        ids = torch.tensor([self.prompt.prompt_ids(query, passages)], device=self.model.device)
        # The last position's logits only: the LM head over every prompt position costs more than the model.
        logits = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1, self.label_ids[: len(passages)]]
        return torch.argsort(logits.float(), descending=True, stable=True).tolist()

    def rerank(self, query: str, texts: Sequence[str]) -> Ranking:
        start = time.perf_counter()
        query_ids, passages, truncated = self._tokenize(query, texts)
        tokenized = time.perf_counter()
        order = list(range(len(texts)))
        end = len(order)
        while True:
            first = max(0, end - self.window)
            window = order[first:end]
            order[first:end] = [
                window[j] for j in self._window_order(query_ids, [passages[i] for i in window])
            ]
            if first == 0:
                break
            end -= self.stride
        scored = time.perf_counter()
        return Ranking(
            order=order,
            scores=[1.0 - i / len(order) for i in range(len(order))],
            truncated=truncated,
            timings=[
                ("rerank.tokenize", (tokenized - start) * 1000),
                ("rerank.score", (scored - tokenized) * 1000),
            ],
        )

    @torch.inference_mode()
    def generate_order(self, query: str, texts: Sequence[str]) -> list[int]:
        """One window (at most `first_window` texts) ranked by generating "[X] > [Y] > ..." greedily;
        identifiers the model leaves out follow in their given order."""
        if len(texts) > self.window:
            raise ValueError(f"texts: at most {self.window} (one window), got {len(texts)}")
        query_ids, passages, _ = self._tokenize(query, texts)
        ids = torch.tensor([self.prompt.prompt_ids(query_ids, passages)], device=self.model.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.label_ids[0]
        generated = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4 * len(texts),
            do_sample=False,
            pad_token_id=pad,
        )[0, ids.shape[1] :]
        position = {token: i for i, token in enumerate(self.label_ids[: len(texts)])}
        order = list(dict.fromkeys(position[t] for t in generated.tolist() if t in position))
        return order + [i for i in range(len(texts)) if i not in order]
