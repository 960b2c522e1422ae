"""services.evaluator.metrics.rag on hand-made samples whose right scores are known."""

from __future__ import annotations

import os
from concurrent import futures

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc
import pytest

from ragfleet.v1 import generator_pb2, generator_pb2_grpc
from services.evaluator.metrics.rag import (
    ALL_METRICS,
    CrossEncoderEntailer,
    GeneratorJudge,
    RagSample,
    Scorer,
    aggregate,
    parse_yes_no,
    score_samples,
    split_claims,
)

EIFFEL = (
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by Gustave "
    "Eiffel's company and completed in 1889. It is 330 metres tall."
)
EIFFEL_QUESTION = "Where is the Eiffel Tower and when was it completed?"
EIFFEL_TRUTH = "The Eiffel Tower is in Paris and was completed in 1889."
FRANCE = "The capital of France is Paris."
GERMANY = "Berlin is the capital of Germany."


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer()


def eiffel(answer: str, ground_truths: tuple[str, ...] = (EIFFEL_TRUTH,)) -> RagSample:
    return RagSample(EIFFEL_QUESTION, answer, [EIFFEL], ground_truths)


def capital(answer: str, contexts: list[str], ground_truths: tuple[str, ...] = ("Paris",)) -> RagSample:
    return RagSample("What is the capital of France?", answer, contexts, ground_truths)


def test_split_claims_cuts_sentences_and_drops_empty_ones():
    assert split_claims("It opened in 1889. Is it tall? Yes!\nIt is 330 m.\n...") == [
        "It opened in 1889.",
        "Is it tall?",
        "Yes!",
        "It is 330 m.",
    ]
    assert split_claims("It costs 3.5 euros, e.g. for adults.") == ["It costs 3.5 euros, e.g. for adults."]
    assert split_claims("  ") == []


def test_faithful_answer_scores_one_and_hallucinated_answers_at_most_half(scorer: Scorer):
    faithful = scorer.faithfulness(eiffel("The Eiffel Tower is in Paris. It was completed in 1889."))
    invented_city = scorer.faithfulness(eiffel("The Eiffel Tower is in Rome. It was built by Napoleon."))
    wrong_year = scorer.faithfulness(eiffel("The Eiffel Tower is in Paris. It was completed in 1925."))
    assert faithful >= 0.99
    assert invented_city <= 0.5 and wrong_year <= 0.5
    assert wrong_year == pytest.approx(0.5)  # one of two claims holds


def test_a_short_answer_stated_by_the_context_is_faithful_and_an_empty_one_is_not(scorer: Scorer):
    assert scorer.faithfulness(capital("Paris", [FRANCE])) == 1.0
    assert scorer.faithfulness(capital("Paris", [GERMANY])) == 0.0
    assert scorer.faithfulness(capital("", [FRANCE])) == 0.0
    assert scorer.faithfulness(capital("Paris", [])) == 0.0


def test_context_recall_is_one_when_the_context_holds_the_answer_and_zero_when_it_lacks_it(scorer: Scorer):
    assert scorer.context_recall(capital("Paris", [GERMANY, FRANCE])) == 1.0
    assert scorer.context_recall(capital("Paris", [GERMANY, "Rome is in Italy."])) == 0.0
    assert scorer.context_recall(eiffel("Paris")) == 1.0
    assert (
        scorer.context_recall(RagSample(EIFFEL_QUESTION, "", ["Bananas are yellow."], [EIFFEL_TRUTH])) == 0.0
    )
    # Two claims, the context holds only the first.
    partial = RagSample(EIFFEL_QUESTION, "", [FRANCE], ["Paris is the capital of France. It has 2 airports."])
    assert scorer.context_recall(partial) == pytest.approx(0.5)


def test_context_precision_is_the_average_precision_of_the_ranking(scorer: Scorer):
    assert scorer.context_precision(capital("Paris", [FRANCE, GERMANY])) == 1.0
    assert scorer.context_precision(capital("Paris", [GERMANY, FRANCE])) == pytest.approx(0.5)
    assert scorer.context_precision(capital("Paris", [GERMANY, "Rome is in Italy."])) == 0.0
    # Relevant at ranks 1 and 3: (1/1 + 2/3) / 2.
    ranked = capital("Paris", [FRANCE, GERMANY, "Paris is a city in France."])
    assert scorer.context_precision(ranked) == pytest.approx((1 + 2 / 3) / 2)


def test_answer_correctness_and_similarity(scorer: Scorer):
    exact = capital("Paris", [FRANCE])
    assert scorer.answer_correctness(exact) == pytest.approx(1.0, abs=1e-6)
    assert scorer.answer_similarity(exact) == pytest.approx(1.0, abs=1e-6)
    identical = eiffel(EIFFEL_TRUTH)
    assert scorer.answer_similarity(identical) == pytest.approx(1.0, abs=1e-6)
    # The best of several ground truths counts.
    assert scorer.answer_correctness(capital("Paris", [FRANCE], ("Lyon", "Paris"))) == pytest.approx(
        1.0, abs=1e-6
    )
    wrong = scorer.answer_correctness(capital("Berlin", [FRANCE]))
    partly = scorer.answer_correctness(capital("Paris, Texas", [FRANCE]))
    assert wrong < 0.25 and 0.5 < partly < 1.0  # F1 0 and 2/3, plus a quarter of the similarity
    assert scorer.answer_similarity(capital("Bananas are yellow.", [FRANCE])) < 0.5


def test_on_topic_answers_are_more_relevant_than_off_topic_ones(scorer: Scorer):
    on_topic = scorer.answer_relevancy(eiffel("The Eiffel Tower is in Paris and was completed in 1889."))
    off_topic = scorer.answer_relevancy(eiffel("Bananas are rich in potassium."))
    assert on_topic > 0.7 and off_topic < 0.3


def test_metrics_that_need_ground_truths_are_none_without_them_and_skipped_by_the_mean(scorer: Scorer):
    no_truth = capital("Paris", [FRANCE], ground_truths=())
    scores = scorer.score(no_truth)
    assert {name for name, value in scores.items() if value is None} == {
        "answer_correctness",
        "context_precision",
        "context_recall",
        "answer_similarity",
    }
    assert scores["faithfulness"] == 1.0
    assert aggregate([{"a": 1.0, "b": None}, {"a": 0.0, "b": 0.5}, {"a": 0.5, "b": None}]) == {
        "a": 0.5,
        "b": 0.5,
    }
    assert aggregate([{"a": None}]) == {}


def test_score_samples_is_deterministic_and_matches_scoring_one_by_one():
    samples = [
        capital("Paris", [GERMANY, FRANCE]),
        capital("Paris", [FRANCE], ground_truths=()),
        eiffel("The Eiffel Tower is in Paris. It was completed in 1925."),
    ]
    mean, per_sample = score_samples(samples)
    assert (mean, per_sample) == score_samples(samples)
    assert [set(scores) for scores in per_sample] == [set(ALL_METRICS)] * 3
    assert per_sample[0]["context_precision"] == pytest.approx(0.5)
    assert per_sample[2]["faithfulness"] == pytest.approx(0.5)
    assert mean["answer_similarity"] == pytest.approx(
        (per_sample[0]["answer_similarity"] + per_sample[2]["answer_similarity"]) / 2
    )
    one_by_one = [Scorer().score(sample) for sample in samples]
    for batched, alone in zip(per_sample, one_by_one):
        assert batched == pytest.approx(alone, abs=1e-5)

    subset, rows = score_samples(samples[:1], metrics=("faithfulness",))
    assert subset == {"faithfulness": 1.0} and rows == [{"faithfulness": 1.0}]
    assert score_samples([]) == ({}, [])
    with pytest.raises(ValueError, match="unknown RAG metrics"):
        score_samples(samples, metrics=("faithfulness", "bleu"))


def test_parse_yes_no():
    assert parse_yes_no("Yes.") and parse_yes_no(" yes, it is") and parse_yes_no("YES")
    assert not parse_yes_no("No.") and not parse_yes_no("") and not parse_yes_no("yesterday")


class RuleGenerator(generator_pb2_grpc.GeneratorServicer):
    """A test-double Generator that answers the judge's questions by a fixed rule.

    Entailment: "Yes" when every capitalized word and number of the statement occurs in the context
    passage. Relevance: "Yes" when the answer mentions the Eiffel Tower.
    """

    def __init__(self) -> None:
        self.requests: list[generator_pb2.GenerateRequest] = []

    def Generate(self, request, context):
        self.requests.append(request)
        lines = dict(line.split(": ", 1) for line in request.question.splitlines() if ": " in line)
        if "Statement" in lines:
            premise = " ".join(p.passage.text for p in request.context)
            words = [w.strip(".,") for w in lines["Statement"].split()]
            key_words = [w for w in words if w[:1].isupper() or w[:1].isdigit()]
            verdict = all(w in premise for w in key_words)
        else:
            verdict = "Eiffel" in lines["Answer"]
        return generator_pb2.GenerateResponse(text="Yes." if verdict else "No, it is not.")


@pytest.fixture
def judge():
    generator = RuleGenerator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    generator_pb2_grpc.add_GeneratorServicer_to_server(generator, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield GeneratorJudge(channel, timeout_s=10), generator
    channel.close()
    server.stop(None)


def test_judge_mode_asks_the_generator(judge, scorer: Scorer):
    generator_judge, generator = judge
    judged = Scorer(embedder=scorer.embedder, entailer=generator_judge, relevance_judge=generator_judge)
    # A paraphrase the offline support rule misses, which the judge accepts.
    paraphrase = eiffel("The tower stands in Paris and was finished in 1889.")
    assert scorer.faithfulness(paraphrase) == 0.0
    assert judged.faithfulness(paraphrase) == 1.0
    assert judged.faithfulness(eiffel("The Eiffel Tower is in Paris. It was completed in 1925.")) == 0.5
    assert judged.answer_relevancy(paraphrase) == 0.0
    assert judged.answer_relevancy(eiffel("The Eiffel Tower is in Paris.")) == 1.0
    assert (
        judged.context_recall(capital("Paris", [GERMANY, FRANCE], ("Paris is the capital of France.",)))
        == 1.0
    )

    entailment = generator.requests[0]
    assert entailment.params.temperature == 0.0 and entailment.params.max_tokens > 0
    assert not entailment.retrieval.index
    assert [p.passage.text for p in entailment.context] == [EIFFEL]
    assert "Statement: The tower stands in Paris and was finished in 1889." in entailment.question
    # Metrics that compare embeddings do not call the judge.
    asked = len(generator.requests)
    judged.answer_similarity(paraphrase)
    assert len(generator.requests) == asked


def tiny_cross_encoder(path, id2label: dict[int, str]) -> tuple:
    """A random 1-layer BERT classifier with a 12-word vocabulary, saved under `path`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "tower", "is", "in", "paris", "berlin", "."]
    (path / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def test_cross_encoder_entailer_reads_the_entailment_probability(tmp_path):
    import torch

    premise, hypothesis = "the tower is in paris.", "the tower is in berlin."
    nli, tokenizer = tiny_cross_encoder(tmp_path / "nli", {0: "contradiction", 1: "entailment", 2: "neutral"})
    with torch.no_grad():
        logits = nli(**tokenizer(premise, hypothesis, return_tensors="pt")).logits[0]
    entailer = CrossEncoderEntailer(str(tmp_path / "nli"))
    assert entailer.entails(premise, hypothesis) == pytest.approx(
        torch.softmax(logits, -1)[1].item(), abs=1e-5
    )
    assert entailer.entails(premise, hypothesis) == entailer.entails(premise, hypothesis)

    single, tokenizer = tiny_cross_encoder(tmp_path / "single", {0: "LABEL_0"})
    with torch.no_grad():
        logit = single(**tokenizer(premise, hypothesis, return_tensors="pt")).logits[0, 0]
    assert CrossEncoderEntailer(str(tmp_path / "single")).entails(premise, hypothesis) == pytest.approx(
        torch.sigmoid(logit).item(), abs=1e-5
    )

    tiny_cross_encoder(tmp_path / "sentiment", {0: "negative", 1: "positive"})
    with pytest.raises(ValueError, match="no 'entailment' label"):
        CrossEncoderEntailer(str(tmp_path / "sentiment"))
