"""The Reranker service in-process with the cross-encoder backend on tiny checkpoints the tests save:
results match CrossEncoder.predict, truncation is counted, the default model is found where the trainer
writes it (and reloaded when it changes), bad input gets the right status naming the field, and
concurrent calls are batched into one model call without changing their results."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from reranker_fixtures import MAX_POSITIONS, make_tiny_bi_encoder, make_tiny_cross_encoder

from ragfleet.v1 import common_pb2, reranker_pb2
from services.reranker.backend import Ranking, blend
from services.reranker.cross_encoder import CrossEncoderReranker
from services.reranker.service import Batcher, RerankerService
from services.runtime.context import CallContext
from services.runtime.errors import ServiceError
from services.runtime.settings import RerankerSettings, Settings

QUERY = "which protein controls cell growth"
TEXTS = [
    "The protein p53 controls cell growth and division.",
    "Paris is the capital of France.",
    "Cell growth depends on nutrients and signals.",
    "Football is played with a round ball.",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_cross_encoder(tmp_path_factory.mktemp("ce") / "model")


def candidates(texts: list[str] = TEXTS) -> list[common_pb2.ScoredPassage]:
    return [
        common_pb2.ScoredPassage(
            passage=common_pb2.Passage(id=f"d{i}#0", doc_id=f"d{i}", title="t" if i == 0 else "", text=text),
            score=1.0 - i / 10,
            retriever="fused",
            rank=i + 1,
            continuation=common_pb2.Passage(id=f"d{i}#1", text="next"),
        )
        for i, text in enumerate(texts)
    ]


def service(tmp_path: Path, **reranker: object) -> RerankerService:
    return RerankerService(Settings(home=tmp_path, reranker=RerankerSettings(**reranker)))


async def rerank(svc: RerankerService, **fields: object) -> reranker_pb2.RerankResponse:
    request = {"query": QUERY, "candidates": candidates(), "top_k": len(TEXTS), **fields}
    return await svc.Rerank(reranker_pb2.RerankRequest(**request), CallContext())


async def test_rerank_orders_as_cross_encoder_predict(tmp_path: Path, checkpoint: Path) -> None:
    from sentence_transformers import CrossEncoder

    reply = await rerank(service(tmp_path, batch_size=3), model=str(checkpoint), top_k=3)
    texts = [f"t {TEXTS[0]}", *TEXTS[1:]]
    expected = CrossEncoder(str(checkpoint), local_files_only=True).predict([(QUERY, t) for t in texts])
    order = np.argsort(-expected, kind="stable")[:3]
    assert [r.passage.id for r in reply.results] == [f"d{i}#0" for i in order]
    assert [r.score for r in reply.results] == pytest.approx(expected[order].tolist(), abs=1e-5)
    assert [r.rank for r in reply.results] == [1, 2, 3]
    assert {r.retriever for r in reply.results} == {"cross_encoder"}
    assert all(r.continuation.id == r.passage.id.replace("#0", "#1") for r in reply.results)
    assert reply.backend == "cross_encoder" and reply.model_id.startswith(f"cross_encoder:{checkpoint}@")
    assert reply.max_length == MAX_POSITIONS and reply.truncated == 0
    stages = {"rerank.load", "rerank.queue", "rerank.measure", "rerank.score"}
    assert {t.stage for t in reply.timings} == stages


async def test_truncated_candidates_are_counted(tmp_path: Path, checkpoint: Path) -> None:
    long = "cell growth " * MAX_POSITIONS
    request = reranker_pb2.RerankRequest(
        query=QUERY, candidates=candidates([long, TEXTS[1], long]), top_k=1, model=str(checkpoint)
    )
    reply = await service(tmp_path).Rerank(request, CallContext())
    assert reply.truncated == 2 and len(reply.results) == 1


async def test_without_a_trained_model_the_service_names_the_training_command(tmp_path: Path) -> None:
    with pytest.raises(ServiceError) as err:
        await rerank(service(tmp_path))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "ragfleet train cross-encoder" in err.value.message
    # A trainer's checkpoints folder alone is not a model yet.
    (tmp_path / "models" / "cross-encoder" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ServiceError, match="ragfleet train cross-encoder"):
        await rerank(service(tmp_path))


async def test_the_default_model_is_found_and_reloaded_when_it_changes(
    tmp_path: Path, checkpoint: Path
) -> None:
    default = tmp_path / "models" / "cross-encoder"
    shutil.copytree(checkpoint, default)
    svc = service(tmp_path)
    first = await rerank(svc)
    assert first.model_id.startswith(f"cross_encoder:{default}@")
    assert (await rerank(svc)).model_id == first.model_id
    shutil.rmtree(default)
    make_tiny_cross_encoder(default, seed=1)
    weights = default / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    second = await rerank(svc)
    assert second.model_id != first.model_id
    assert [r.score for r in second.results] != [r.score for r in first.results]


async def test_a_configured_model_that_cannot_load_is_a_failed_precondition(tmp_path: Path) -> None:
    with pytest.raises(ServiceError) as err:
        await rerank(service(tmp_path, cross_encoder_model=str(tmp_path / "nowhere")))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "ragfleet train cross-encoder" in err.value.message


async def test_bad_input_names_the_field(tmp_path: Path, checkpoint: Path) -> None:
    bi_encoder = make_tiny_bi_encoder(tmp_path / "bi")
    two_labels = make_tiny_cross_encoder(tmp_path / "nli", num_labels=2)
    svc = service(tmp_path, max_candidates=3, cross_encoder_model=str(checkpoint))
    empty_text = candidates()[:2]
    empty_text[1].passage.text = "  "
    for fields, field in [
        ({"query": " "}, "query"),
        ({"candidates": []}, "candidates"),
        ({"candidates": candidates(), "top_k": 3}, "candidates"),
        ({"candidates": empty_text, "top_k": 1}, "candidates[1].passage.text"),
        ({"candidates": candidates()[:3], "top_k": 0}, "top_k"),
        ({"candidates": candidates()[:3], "top_k": 4}, "top_k"),
        ({"candidates": candidates()[:3], "top_k": 1, "backend": "nope"}, "backend"),
        ({"candidates": candidates()[:3], "top_k": 1, "model": str(tmp_path / "missing")}, "model"),
        ({"candidates": candidates()[:3], "top_k": 1, "model": str(bi_encoder)}, "model"),
        ({"candidates": candidates()[:3], "top_k": 1, "model": str(two_labels)}, "model"),
        ({"candidates": candidates()[:3], "top_k": 1, "retrieval_weight": 1.5}, "retrieval_weight"),
        ({"candidates": candidates()[:3], "top_k": 1, "retrieval_weight": -0.1}, "retrieval_weight"),
        ({"candidates": candidates()[:3], "top_k": 1, "retrieval_weight": float("nan")}, "retrieval_weight"),
    ]:
        with pytest.raises(ServiceError) as err:
            await rerank(svc, **fields)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert err.value.message.startswith(f"{field}:"), (fields, err.value.message)
    with pytest.raises(ServiceError, match="not a cross-encoder"):
        await rerank(svc, candidates=candidates()[:3], top_k=1, model=str(bi_encoder))


async def test_retrieval_scores_are_blended_by_the_calls_weight_else_the_models(
    tmp_path: Path, checkpoint: Path
) -> None:
    svc = service(tmp_path, cross_encoder_model=str(checkpoint))
    alone = await rerank(svc)
    assert alone.retrieval_weight == 0.0
    # Retrieval scores fall with the candidate's position, so weight 1 is retrieval order.
    retrieval = await rerank(svc, retrieval_weight=1.0)
    assert [r.passage.id for r in retrieval.results] == [f"d{i}#0" for i in range(len(TEXTS))]
    assert retrieval.retrieval_weight == 1.0 and retrieval.results[0].score == pytest.approx(1.0)
    # A trainer's weight in the checkpoint's train.json is the default; a call's weight overrides it.
    tuned = tmp_path / "tuned"
    shutil.copytree(checkpoint, tuned)
    (tuned / "train.json").write_text('{"retrieval_weight": 1.0}')
    by_model = await rerank(svc, model=str(tuned))
    assert by_model.retrieval_weight == 1.0
    assert [r.passage.id for r in by_model.results] == [r.passage.id for r in retrieval.results]
    overridden = await rerank(svc, model=str(tuned), retrieval_weight=0.0)
    assert [r.passage.id for r in overridden.results] == [r.passage.id for r in alone.results]
    (tuned / "train.json").write_text('{"retrieval_weight": 3}')
    with pytest.raises(ServiceError, match="retrieval_weight must be between 0 and 1"):
        await rerank(svc, model=str(tuned))


def test_blend_interpolates_scaled_scores_and_breaks_ties_by_the_side_weighted_more() -> None:
    ranking = Ranking(order=[2, 0, 1], scores=[3.0, 2.0, 1.0], truncated=0)
    assert blend(ranking, [0.0, 0.0, 0.0], 0.0) is ranking
    assert blend(ranking, [0.0, 0.0, 0.0], 0.5).order == [2, 0, 1]
    assert blend(ranking, [9.0, 5.0, 1.0], 1.0).order == [0, 1, 2]
    # Model scaled: d2 1, d0 0.5, d1 0; retrieval scaled: d0 1, d1 0.5, d2 0 -> d0 0.75, d2 0.5, d1 0.25.
    mixed = blend(ranking, [9.0, 5.0, 1.0], 0.5)
    assert mixed.order == [0, 2, 1] and mixed.scores == pytest.approx([0.75, 0.5, 0.25])
    # Retrieval ties d0 and d1, which the model ranks d1 first: weight 1 is the retrieval list as given.
    model_first = Ranking(order=[2, 1, 0], scores=[3.0, 2.0, 1.0], truncated=0)
    assert blend(model_first, [5.0, 5.0, 1.0], 1.0).order == [0, 1, 2]
    # At 0.5: d1 0.75, then d0 and d2 tie at 0.5, in the model's order.
    assert blend(model_first, [5.0, 5.0, 1.0], 0.5).order == [1, 2, 0]


async def test_only_the_newest_models_stay_loaded(tmp_path: Path, checkpoint: Path) -> None:
    other = make_tiny_cross_encoder(tmp_path / "other", seed=2)
    svc = service(tmp_path, max_loaded_models=1)
    await rerank(svc, model=str(checkpoint))
    await rerank(svc, model=str(other))
    assert list(svc._models) == [("cross_encoder", str(other))]


class Recording(CrossEncoderReranker):
    """The tiny cross-encoder, recording the calls of each `rerank_many`."""

    def __init__(self, model: CrossEncoderReranker, fail: bool = False) -> None:
        super().__init__(model.model, model.batch_size)
        self.batches: list[list[str]] = []
        self.fail = fail

    def rerank_many(self, calls: list[tuple[str, list[str]]]) -> list[Ranking]:
        self.batches.append([query for query, _ in calls])
        if self.fail:
            raise RuntimeError("the model broke")
        return super().rerank_many(calls)


QUERIES = [QUERY, "capital of France", "ball games", "nutrients for cells"]


async def test_concurrent_calls_are_scored_together_with_unchanged_results(checkpoint: Path) -> None:
    model = Recording(CrossEncoderReranker.load(str(checkpoint), RerankerSettings(batch_size=3)))
    alone = [model.rerank(query, TEXTS) for query in QUERIES]
    model.batches.clear()
    batcher = Batcher(model, 512)
    together = await asyncio.gather(*(batcher.rank(query, TEXTS) for query in QUERIES))
    assert model.batches[-1] == QUERIES
    for a, b in zip(alone, together):
        assert a.order == b.order and b.scores == pytest.approx(a.scores, abs=1e-5)
        assert [stage for stage, _ in b.timings] == ["rerank.queue", "rerank.measure", "rerank.score"]
    # At most batch_pairs candidates a batch (the first call goes in whatever its size); 0: one by one.
    for max_pairs, batches in [(2 * len(TEXTS), [QUERIES[:2], QUERIES[2:]]), (0, [[q] for q in QUERIES])]:
        model.batches.clear()
        batcher = Batcher(model, max_pairs)
        await asyncio.gather(*(batcher.rank(query, TEXTS) for query in QUERIES))
        assert model.batches == batches


async def test_a_cancelled_call_is_dropped_and_an_error_reaches_every_waiting_call(checkpoint: Path) -> None:
    model = Recording(CrossEncoderReranker.load(str(checkpoint), RerankerSettings()))
    batcher = Batcher(model, 512)
    first = asyncio.ensure_future(batcher.rank(QUERIES[0], TEXTS))
    await asyncio.sleep(0)  # the first call is being scored; the next ones wait
    waiting = [asyncio.ensure_future(batcher.rank(query, TEXTS)) for query in QUERIES[1:]]
    await asyncio.sleep(0)
    waiting[0].cancel()
    await asyncio.gather(first, *waiting, return_exceptions=True)
    assert model.batches == [QUERIES[:1], QUERIES[2:]]

    broken = Batcher(Recording(model, fail=True), 512)
    results = await asyncio.gather(*(broken.rank(q, TEXTS) for q in QUERIES), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


def test_pairs_per_batch_are_the_devices_unless_configured() -> None:
    assert RerankerSettings().pairs_per_batch() == 32
    assert RerankerSettings(device="cuda").pairs_per_batch() == 256
    assert RerankerSettings(device="cuda", batch_size=5).pairs_per_batch() == 5
    with pytest.raises(ValueError, match="batch_size"):
        RerankerSettings(batch_size=-1)
