"""RAG answer metrics: faithfulness, answer correctness, answer relevancy, context precision,
context recall and answer similarity — offline and deterministic by default, judged on request.

A sample is a `RagSample`: the question, the generated answer, the retrieved contexts in rank order
and the ground-truth answers (alternatives; possibly none). Every metric is a number in [0, 1], or
None where it is undefined: the metrics that compare with a ground truth (answer correctness,
context precision, context recall, answer similarity) are None for a sample without ground truths,
and `aggregate` averages each metric over the samples where it is defined.

Claims. A text is cut into sentences (after `.`, `!` or `?` followed by white space and a capital
letter, digit or quote, and at line breaks); each sentence with at least one word is a claim.

Support. Whether a set of contexts supports a claim is decided in one of two ways:

- Default (offline, deterministic): the premises are every sentence of every context and every
  whole context. For a premise p the support score is

      s(claim, p) = 0.5 * max(cos(claim, p), 0) + 0.5 * recall(claim, p)

  where cos is the cosine similarity of the MiniLM embeddings and recall is the share of the
  claim's content words (lower-cased, stemmed, stop words removed) that occur in p. A claim is
  supported when some premise reaches s >= `SUPPORT_THRESHOLD` (0.75) *and* contains every number
  of the claim (embeddings barely tell 1889 from 1925; a number absent from the premise is the
  commonest hallucination). Paraphrases that share few words with the context can fall under the
  threshold; configure an entailer where that matters.
- With an `Entailer` configured (`CrossEncoderEntailer` over an NLI cross-encoder, or a Generator
  through `GeneratorJudge`): a claim is supported when some whole context entails it with probability
  >= `ENTAILMENT_THRESHOLD` (0.5).

In both modes a claim whose normalized text (SQuAD normalization) occurs, on word boundaries, in the
normalized text of a context is supported: a short answer such as "1889" is supported by any
context that states it.

Judge mode. `GeneratorJudge` asks a configured Generator yes/no questions (temperature 0). Passed
as `Scorer(entailer=judge, relevance_judge=judge)` it decides claim support and answer relevancy;
the similarity metrics stay embedding-based.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np
import Stemmer
import torch

from ragfleet.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.evaluator.metrics.qa import f1_score, normalize_answer
from services.runtime.models import load_sentence_transformer, resolve_model

ALL_METRICS: tuple[str, ...] = (
    "faithfulness",
    "answer_correctness",
    "answer_relevancy",
    "context_precision",
    "context_recall",
    "answer_similarity",
)
SUPPORT_THRESHOLD = 0.75
ENTAILMENT_THRESHOLD = 0.5
CORRECTNESS_F1_WEIGHT = 0.75

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])|\s*\n\s*")
_WORD = re.compile(r"[^\W_]+")
_STOP_WORDS = frozenset(
    """a an and are as at be been being but by can could did do does for from had has have he her
    him his i if in into is it its me my no not of on or our she so than that the their them then
    there these they this those to us was we were what when where which while who whom why will with
    would you your s""".split()
)
_stemmer = Stemmer.Stemmer("english")


@dataclass(frozen=True)
class RagSample:
    """One question answered from retrieved contexts; `contexts` in rank order (best first)."""

    question: str
    answer: str
    contexts: Sequence[str] = ()
    ground_truths: Sequence[str] = ()


class Entailer(Protocol):
    def entails(self, premise: str, hypothesis: str) -> float:
        """Probability in [0, 1] that `premise` entails `hypothesis`."""
        ...


class RelevanceJudge(Protocol):
    def relevance(self, question: str, answer: str) -> float:
        """Score in [0, 1] of how well `answer` addresses `question`."""
        ...


def split_claims(text: str) -> list[str]:
    """The sentences of `text` that contain at least one word, stripped."""
    sentences = (s.strip() for s in _SENTENCE_BREAK.split(text))
    return [s for s in sentences if _WORD.search(s.lower())]


def _content_stems(text: str) -> list[str]:
    """Stems of the words of `text` that are not stop words (all of its words if all are)."""
    words = _WORD.findall(text.lower())
    content = [w for w in words if w not in _STOP_WORDS] or words
    return _stemmer.stemWords(content)


def _numbers(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if any(c.isdigit() for c in w)}


def _contains(context: str, claim: str) -> bool:
    """Whether the normalized `claim` occurs in the normalized `context` on word boundaries."""
    needle = normalize_answer(claim)
    return bool(needle) and f" {needle} " in f" {normalize_answer(context)} "


class Embedder:
    """Unit-norm sentence embeddings (MiniLM by default), cached by text until `clear()`."""

    def __init__(self, model: str = "all-MiniLM-L6-v2", device: str = "cpu", batch_size: int = 64):
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self._cache: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """A (len(texts), dim) float32 array of unit vectors; uncached texts are encoded in one batch."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            encoder = load_sentence_transformer(self.model, self.device)
            vectors = encoder.encode(
                missing, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
            )
            self._cache.update(zip(missing, vectors))
        return np.stack([self._cache[t] for t in texts])

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of `a` and `b`, clipped to [0, 1]."""
        va, vb = self.embed([a, b])
        return _clip(float(va @ vb))

    def clear(self) -> None:
        self._cache.clear()


def _clip(x: float) -> float:
    return min(max(x, 0.0), 1.0)


class Scorer:
    """Computes the RAG metrics of one sample; see the module docstring for claims and support."""

    def __init__(
        self,
        embedder: Embedder | None = None,
        entailer: Entailer | None = None,
        relevance_judge: RelevanceJudge | None = None,
    ):
        self.embedder = embedder or Embedder()
        self.entailer = entailer
        self.relevance_judge = relevance_judge

    def supported(self, claims: Sequence[str], contexts: Sequence[str]) -> list[bool]:
        """For each claim (a sentence, as `split_claims` returns), whether `contexts` support it
        (module docstring, "Support")."""
        if not claims:
            return []
        if not contexts:
            return [False] * len(claims)
        if self.entailer is not None:
            return [
                any(_contains(c, claim) for c in contexts)
                or max(self.entailer.entails(c, claim) for c in contexts) >= ENTAILMENT_THRESHOLD
                for claim in claims
            ]
        premises = list(dict.fromkeys([s for c in contexts for s in split_claims(c)] + list(contexts)))
        cosines = self.embedder.embed(claims) @ self.embedder.embed(premises).T
        premise_stems = [set(_content_stems(p)) for p in premises]
        premise_numbers = [_numbers(p) for p in premises]
        verdicts = []
        for i, claim in enumerate(claims):
            stems, numbers = _content_stems(claim), _numbers(claim)
            best = 0.0
            for j in range(len(premises)):
                if numbers <= premise_numbers[j]:
                    recall = sum(s in premise_stems[j] for s in stems) / len(stems)
                    best = max(best, 0.5 * max(float(cosines[i, j]), 0.0) + 0.5 * recall)
            verdicts.append(best >= SUPPORT_THRESHOLD or any(_contains(c, claim) for c in contexts))
        return verdicts

    def faithfulness(self, sample: RagSample) -> float:
        """Share of the answer's claims that the contexts support.

        An answer without claims (empty) scores 0: it states nothing the contexts ground.
        """
        claims = split_claims(sample.answer)
        if not claims:
            return 0.0
        verdicts = self.supported(claims, sample.contexts)
        return sum(verdicts) / len(verdicts)

    def answer_correctness(self, sample: RagSample) -> float | None:
        """0.75 * token F1 + 0.25 * answer similarity, each against its best ground truth.

        Token F1 has SQuAD semantics (normalized bag of words, max over the ground truths); the
        similarity term is `answer_similarity`, which credits correct answers worded differently.
        None without ground truths.
        """
        similarity = self.answer_similarity(sample)
        if similarity is None:
            return None
        f1 = f1_score(sample.answer, list(sample.ground_truths))
        return CORRECTNESS_F1_WEIGHT * f1 + (1.0 - CORRECTNESS_F1_WEIGHT) * similarity

    def answer_relevancy(self, sample: RagSample) -> float:
        """How directly the answer addresses the question.

        Default: cosine similarity of the question and answer embeddings, negative values clipped
        to 0 (MiniLM cosines of unrelated sentences sit near 0). With a relevance judge: its score.
        """
        if self.relevance_judge is not None:
            return _clip(self.relevance_judge.relevance(sample.question, sample.answer))
        return self.embedder.similarity(sample.question, sample.answer)

    def context_precision(self, sample: RagSample) -> float | None:
        """Average precision of the ranked contexts.

        Context k is relevant when it contains a ground truth (normalized, on word boundaries) or
        supports every claim of some ground truth. The score is the mean of precision@k over the
        relevant positions k — 1 when all relevant contexts come first, 0.5 when the only relevant
        one of two is second, 0 when none is relevant. None without ground truths.
        """
        if not sample.ground_truths:
            return None
        relevant = [self._holds_a_ground_truth(context, sample.ground_truths) for context in sample.contexts]
        hits, precisions = 0, []
        for k, is_relevant in enumerate(relevant, start=1):
            if is_relevant:
                hits += 1
                precisions.append(hits / k)
        return sum(precisions) / len(precisions) if precisions else 0.0

    def _holds_a_ground_truth(self, context: str, ground_truths: Sequence[str]) -> bool:
        for truth in ground_truths:
            claims = split_claims(truth)
            if _contains(context, truth) or (claims and all(self.supported(claims, [context]))):
                return True
        return False

    def context_recall(self, sample: RagSample) -> float | None:
        """Share of the ground truth's claims that the contexts, taken together, support.

        Ground truths are alternatives, so the best-covered one counts. None without ground truths.
        """
        if not sample.ground_truths:
            return None
        recalls = []
        for truth in sample.ground_truths:
            claims = split_claims(truth)
            if claims:
                verdicts = self.supported(claims, sample.contexts)
                recalls.append(sum(verdicts) / len(verdicts))
        return max(recalls, default=0.0)

    def answer_similarity(self, sample: RagSample) -> float | None:
        """Cosine similarity of the answer and ground-truth embeddings, best ground truth, clipped
        to [0, 1]. None without ground truths."""
        if not sample.ground_truths:
            return None
        return max(self.embedder.similarity(sample.answer, truth) for truth in sample.ground_truths)

    def score(self, sample: RagSample, metrics: Iterable[str] = ALL_METRICS) -> dict[str, float | None]:
        """`{metric: value}` for the named metrics of one sample."""
        metrics = list(metrics)
        unknown = set(metrics) - set(ALL_METRICS)
        if unknown:
            raise ValueError(f"unknown RAG metrics {sorted(unknown)}; known: {list(ALL_METRICS)}")
        self.embedder.embed(self.texts_to_embed(sample))
        return {name: getattr(self, name)(sample) for name in metrics}

    def texts_to_embed(self, sample: RagSample) -> list[str]:
        """Every text the metrics may embed for `sample`, so that they are encoded in one batch."""
        texts = [sample.question, sample.answer, *sample.ground_truths]
        if self.entailer is None:
            texts.extend(sample.contexts)
            for text in (sample.answer, *sample.ground_truths, *sample.contexts):
                texts.extend(split_claims(text))
        return texts


def aggregate(per_sample: Sequence[Mapping[str, float | None]]) -> dict[str, float]:
    """Mean of each metric over the samples where it is not None; metrics never defined are left out."""
    sums: dict[str, list[float]] = {}
    for scores in per_sample:
        for name, value in scores.items():
            if value is not None:
                sums.setdefault(name, []).append(value)
    return {name: math.fsum(values) / len(values) for name, values in sums.items()}


def score_samples(
    samples: Sequence[RagSample], metrics: Sequence[str] = ALL_METRICS, scorer: Scorer | None = None
) -> tuple[dict[str, float], list[dict[str, float | None]]]:
    """(aggregate, per-sample scores) of `metrics` over `samples`.

    All the texts are embedded in one batch first; the embedding cache is cleared at the end.
    """
    if not samples:
        return {}, []
    scorer = scorer or Scorer()
    try:
        scorer.embedder.embed([t for sample in samples for t in scorer.texts_to_embed(sample)])
        per_sample = [scorer.score(sample, metrics) for sample in samples]
    finally:
        scorer.embedder.clear()
    return aggregate(per_sample), per_sample


class CrossEncoderEntailer:
    """An `Entailer` backed by a sentence-transformers `CrossEncoder` read from a path or hub id.

    An NLI model (several outputs) gives the softmax probability of the label its config names
    "entailment"; a single-output model (e.g. a relevance cross-encoder) gives the sigmoid of its score.
    """

    def __init__(self, model: str, device: str = "cpu"):
        from sentence_transformers import CrossEncoder

        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        self._model = CrossEncoder(resolve_model(model), device=device, local_files_only=offline)
        self._entailment = None
        if self._model.num_labels > 1:
            labels = {name.lower(): int(i) for i, name in self._model.config.id2label.items()}
            if "entailment" not in labels:
                raise ValueError(f"{model}: no 'entailment' label among {sorted(labels)}")
            self._entailment = labels["entailment"]

    def entails(self, premise: str, hypothesis: str) -> float:
        logits = self._model.predict(
            [(premise, hypothesis)], activation_fn=torch.nn.Identity(), convert_to_tensor=True
        )[0].float()
        if self._entailment is None:
            return float(torch.sigmoid(logits.reshape(())))
        return float(torch.softmax(logits, dim=-1)[self._entailment])


class GeneratorJudge:
    """An `Entailer` and `RelevanceJudge` that asks a Generator service yes/no questions.

    Each question goes out as a `GenerateRequest` with greedy decoding (temperature 0), no index
    (so no retrieval of its own) and, for entailment, the premise as the only context passage. A
    reply whose first word is "yes" (any case, punctuation ignored) scores 1.0; any other reply 0.0.
    """

    ENTAILMENT_PROMPT = (
        "Is the following statement supported by the context? Answer yes or no.\nStatement: {hypothesis}"
    )
    RELEVANCE_PROMPT = (
        "Does the answer address the question? Answer yes or no.\nQuestion: {question}\nAnswer: {answer}"
    )

    def __init__(
        self,
        channel: grpc.Channel | str,
        *,
        timeout_s: float = 60.0,
        max_tokens: int = 4,
        metadata: Sequence[tuple[str, str]] = (),
    ):
        self._channel = grpc.insecure_channel(channel) if isinstance(channel, str) else channel
        self._stub = generator_pb2_grpc.GeneratorStub(self._channel)
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.metadata = tuple(metadata)

    def entails(self, premise: str, hypothesis: str) -> float:
        return self._ask(self.ENTAILMENT_PROMPT.format(hypothesis=hypothesis), context=premise)

    def relevance(self, question: str, answer: str) -> float:
        return self._ask(self.RELEVANCE_PROMPT.format(question=question, answer=answer))

    def _ask(self, prompt: str, context: str | None = None) -> float:
        passages = []
        if context is not None:
            passages.append(
                common_pb2.ScoredPassage(passage=common_pb2.Passage(id="premise", text=context), rank=1)
            )
        request = generator_pb2.GenerateRequest(
            question=prompt,
            context=passages,
            params=common_pb2.GenerationParams(temperature=0.0, max_tokens=self.max_tokens),
        )
        reply = self._stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)
        return 1.0 if parse_yes_no(reply.text) else 0.0


def parse_yes_no(text: str) -> bool:
    """Whether a judge's reply says yes: its first word, lower-cased and without punctuation."""
    words = _WORD.findall(text.lower())
    return bool(words) and words[0] == "yes"
