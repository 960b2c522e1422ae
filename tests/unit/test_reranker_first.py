"""The FIRST backend on a tiny causal LM the tests save: one forward pass per window, the sliding window
from the bottom of the list up, truncation counted, the generated permutation, and models refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from reranker_fixtures import make_tiny_bi_encoder, make_tiny_causal_lm

from ragfleet.v1 import common_pb2, reranker_pb2
from services.reranker.first import QUERY_TOKENS, FirstReranker
from services.reranker.service import RerankerService
from services.runtime.context import CallContext
from services.runtime.errors import ServiceError
from services.runtime.model_errors import ArtifactError
from services.runtime.settings import RerankerSettings, Settings

TEXTS = [f"passage number {i} about cells and proteins" for i in range(25)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("first") / "lm")


def load(path: Path, **settings: int) -> FirstReranker:
    return FirstReranker.load(str(path), RerankerSettings(**settings))


def test_one_window_is_one_forward_pass(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load(checkpoint)
    calls = []
    forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    ranking = model.rerank("which protein", TEXTS[:20])
    assert sorted(ranking.order) == list(range(20)) and len(calls) == 1
    assert ranking.scores == [1 - i / 20 for i in range(20)] and ranking.truncated == 0


def test_the_window_slides_from_the_bottom_and_lifts_the_best(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load(checkpoint, first_window=5, first_stride=2)
    windows: list[list[int]] = []

    def oracle(query: list[int], passages: list[list[int]]) -> list[int]:
        # The "relevance" of passage i is i: the last passages are the best.
        numbers = [int(model.tokenizer.decode(p).split()[2]) for p in passages]
        windows.append(numbers)
        return sorted(range(len(passages)), key=lambda j: -numbers[j])

    monkeypatch.setattr(model, "_window_order", oracle)
    order = model.rerank("q", TEXTS).order
    assert windows[0] == [20, 21, 22, 23, 24] and len(windows) == 11
    assert order[:3] == [24, 23, 22] and sorted(order) == list(range(25))


def test_long_passages_are_cut_and_counted(checkpoint: Path) -> None:
    model = load(checkpoint, first_passage_tokens=12)
    assert model.max_length == 12
    ranking = model.rerank("q", ["short text", "word " * 40, "another short one"])
    assert ranking.truncated == 1
    # The positions also bound the cut: 20 passages must fit the model's 1024 positions.
    assert load(checkpoint).max_length < (1024 - 2 * QUERY_TOKENS) // 20


def test_generating_the_permutation_gives_every_passage_once(checkpoint: Path) -> None:
    order = load(checkpoint).generate_order("which protein", TEXTS[:6])
    assert sorted(order) == list(range(6))
    with pytest.raises(ValueError, match="one window"):
        load(checkpoint).generate_order("q", TEXTS)


def test_models_that_are_not_causal_lms_or_too_short_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a causal LM"):
        load(make_tiny_bi_encoder(tmp_path / "bi"))
    with pytest.raises(ArtifactError, match="positions"):
        load(make_tiny_causal_lm(tmp_path / "short", positions=256))


async def test_the_service_serves_first_by_name(tmp_path: Path, checkpoint: Path) -> None:
    service = RerankerService(Settings(home=tmp_path))
    candidates = [
        common_pb2.ScoredPassage(passage=common_pb2.Passage(id=f"p{i}", text=t)) for i, t in enumerate(TEXTS)
    ]
    request = reranker_pb2.RerankRequest(
        query="q", candidates=candidates, top_k=3, backend="first", model=str(checkpoint)
    )
    reply = await service.Rerank(request, CallContext())
    assert reply.backend == "first" and reply.model_id.startswith(f"first:{checkpoint}@")
    assert [r.rank for r in reply.results] == [1, 2, 3] and {r.retriever for r in reply.results} == {"first"}
    request.model = ""
    with pytest.raises(ServiceError) as err:
        await service.Rerank(request, CallContext())
    assert (
        err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "reranker.first_model" in err.value.message
    )
