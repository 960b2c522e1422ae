"""Fusion of retriever lists: RRF and weighted scores, tie-breaks, labels, validation."""

from __future__ import annotations

import grpc
import pytest

from ragfleet.v1 import common_pb2
from services.gateway.fusion import fuse, reciprocal_rank_fusion, weighted_fusion
from services.runtime.errors import ServiceError


def ranked(retriever: str, *items: tuple[str, float]) -> list[common_pb2.ScoredPassage]:
    return [
        common_pb2.ScoredPassage(
            passage=common_pb2.Passage(id=pid, doc_id=pid.split("#")[0], text=f"text of {pid}"),
            score=score,
            retriever=retriever,
            rank=rank,
        )
        for rank, (pid, score) in enumerate(items, start=1)
    ]


def ids(results: list[common_pb2.ScoredPassage]) -> list[str]:
    return [r.passage.id for r in results]


LISTS = {
    "dense": ranked("dense", ("a#0", 0.9), ("b#0", 0.8), ("c#0", 0.1)),
    "bm25": ranked("bm25", ("b#0", 12.0), ("d#0", 7.0), ("a#0", 2.0)),
}


def test_rrf_sums_reciprocal_ranks() -> None:
    results = reciprocal_rank_fusion(LISTS, k=60)
    scores = {r.passage.id: r.score for r in results}
    assert scores["b#0"] == pytest.approx(1 / 62 + 1 / 61)
    assert scores["a#0"] == pytest.approx(1 / 61 + 1 / 63)
    assert scores["d#0"] == pytest.approx(1 / 62)
    assert scores["c#0"] == pytest.approx(1 / 63)
    assert ids(results) == ["b#0", "a#0", "d#0", "c#0"]
    assert [r.rank for r in results] == [1, 2, 3, 4]
    assert {r.retriever for r in results} == {"fused"}


def test_rrf_weights_multiply_each_list() -> None:
    results = reciprocal_rank_fusion(LISTS, k=60, weights={"dense": 3.0})
    assert ids(results)[0] == "a#0"
    assert results[0].score == pytest.approx(3 / 61 + 1 / 63)


def test_rrf_top_k_truncates() -> None:
    assert ids(reciprocal_rank_fusion(LISTS, k=60, top_k=2)) == ["b#0", "a#0"]


def test_a_passage_listed_twice_counts_once_at_its_best_rank() -> None:
    lists = {"dense": ranked("dense", ("a#0", 0.9), ("b#0", 0.5), ("a#0", 0.4))}
    results = reciprocal_rank_fusion(lists, k=10)
    assert ids(results) == ["a#0", "b#0"]
    assert results[0].score == pytest.approx(1 / 11)


def test_ties_break_by_best_rank_then_passage_id() -> None:
    lists = {
        "x": ranked("x", ("z#0", 1.0), ("m#0", 0.5)),
        "y": ranked("y", ("m#0", 1.0), ("z#0", 0.5)),
        "w": ranked("w", ("b#0", 1.0)),
        "v": ranked("v", ("a#0", 1.0)),
    }
    # m and z tie on score and best rank 1, as do a and b (lower scores).
    assert ids(reciprocal_rank_fusion(lists, k=60)) == ["m#0", "z#0", "a#0", "b#0"]


def test_one_list_keeps_its_retriever_name() -> None:
    results = reciprocal_rank_fusion({"bm25": LISTS["bm25"]}, k=60)
    assert {r.retriever for r in results} == {"bm25"}


def test_weighted_normalises_each_list_and_missing_passages_get_zero() -> None:
    results = weighted_fusion(LISTS)
    scores = {r.passage.id: r.score for r in results}
    # dense: a=1, b=0.875, c=0; bm25: b=1, d=0.5, a=0.
    assert scores["b#0"] == pytest.approx(1.875)
    assert scores["a#0"] == pytest.approx(1.0)
    assert scores["d#0"] == pytest.approx(0.5)
    assert scores["c#0"] == pytest.approx(0.0)
    assert ids(results) == ["b#0", "a#0", "d#0", "c#0"]


def test_weighted_uses_weights_and_treats_a_flat_list_as_all_best() -> None:
    lists = {
        "dense": ranked("dense", ("a#0", 0.5), ("b#0", 0.5)),
        "bm25": ranked("bm25", ("c#0", 3.0), ("a#0", 1.0)),
    }
    results = weighted_fusion(lists, weights={"dense": 0.25, "bm25": 1.0}, top_k=2)
    scores = {r.passage.id: r.score for r in results}
    assert ids(results) == ["c#0", "a#0"]
    assert scores == {"c#0": pytest.approx(1.0), "a#0": pytest.approx(0.25)}


def test_results_are_copies_with_passage_and_continuation() -> None:
    item = ranked("dense", ("a#0", 1.0))[0]
    item.continuation.CopyFrom(common_pb2.Passage(id="a#1", doc_id="a", position=1, text="next"))
    results = reciprocal_rank_fusion({"dense": [item], "bm25": ranked("bm25", ("b#0", 1.0))}, k=60)
    fused = next(r for r in results if r.passage.id == "a#0")
    assert fused.passage == item.passage
    assert fused.continuation.id == "a#1"
    fused.passage.text = "changed"
    assert item.passage.text == "text of a#0"


def test_fuse_defaults_to_rrf_with_the_server_k() -> None:
    results = fuse(LISTS, common_pb2.Fusion(), top_k=10, default_rrf_k=1)
    assert results[0].score == pytest.approx(1 / 3 + 1 / 2)
    results = fuse(LISTS, common_pb2.Fusion(method="rrf", rrf_k=5), top_k=10, default_rrf_k=1)
    assert results[0].score == pytest.approx(1 / 7 + 1 / 6)


def test_fuse_weighted() -> None:
    fusion = common_pb2.Fusion(method="weighted", weights={"bm25": 2.0})
    results = fuse(LISTS, fusion, top_k=3, default_rrf_k=60)
    # a (1 + 2 * 0) and d (2 * 0.5) tie at 1.0; a was ranked higher (1st in dense, d 2nd in bm25).
    assert [(r.passage.id, r.score) for r in results] == [("b#0", 2.875), ("a#0", 1.0), ("d#0", 1.0)]


def test_fuse_passes_a_single_list_through_with_its_scores() -> None:
    lists = {"bm25": ranked("bm25", ("b#0", 12.0), ("d#0", 7.0), ("b#0", 1.0), ("a#0", 2.0))}
    results = fuse(lists, common_pb2.Fusion(method="weighted"), top_k=2, default_rrf_k=60)
    assert [(r.passage.id, r.score, r.rank, r.retriever) for r in results] == [
        ("b#0", 12.0, 1, "bm25"),
        ("d#0", 7.0, 2, "bm25"),
    ]


def test_fuse_of_nothing_is_empty() -> None:
    assert fuse({}, common_pb2.Fusion(), top_k=5, default_rrf_k=60) == []
    assert fuse({"a": [], "b": []}, common_pb2.Fusion(method="weighted"), top_k=5, default_rrf_k=60) == []


@pytest.mark.parametrize(
    ("fusion", "top_k", "field"),
    [
        (common_pb2.Fusion(method="borda"), 5, "fusion.method"),
        (common_pb2.Fusion(rrf_k=-1), 5, "fusion.rrf_k"),
        (common_pb2.Fusion(weights={"dense": -0.5}), 5, "fusion.weights"),
        (common_pb2.Fusion(weights={"dense": float("nan")}), 5, "fusion.weights"),
        (common_pb2.Fusion(), 0, "top_k"),
    ],
)
def test_fuse_rejects_bad_requests_naming_the_field(
    fusion: common_pb2.Fusion, top_k: int, field: str
) -> None:
    with pytest.raises(ServiceError) as caught:
        fuse(LISTS, fusion, top_k=top_k, default_rrf_k=60)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith(field + ":")
