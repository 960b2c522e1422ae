"""Fusing the ranked lists of several retrievers into one.

* ``rrf`` (default): reciprocal rank fusion, score = sum over lists of weight / (k + rank), with the
  1-based rank of the passage in that list (its position; a passage listed twice counts once, at its
  best position).
* ``weighted``: each list's scores are min-max normalised to [0, 1] (a list whose scores are all
  equal normalises to 1), then summed with the retrievers' weights; a passage missing from a list
  gets 0 from it.

Weights default to 1. Ties are broken by the passage's best rank in any list, then by passage id,
so the output is deterministic. Results are new ScoredPassage messages ranked 1..n, with
``retriever="fused"`` — or the retriever's own name when only one list was given. ``fuse`` passes a
single list through with its own scores (fusing one list changes no order) and only re-ranks it.
A fused passage keeps the highlights every list gave it (seal's matched n-grams), ordered by start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from ragfleet.v1 import common_pb2
from services.runtime.errors import invalid_argument

FUSED = "fused"
METHODS = ("rrf", "weighted")

Lists = Mapping[str, Sequence[common_pb2.ScoredPassage]]


def reciprocal_rank_fusion(
    lists: Lists,
    k: int = 60,
    weights: Mapping[str, float] | None = None,
    top_k: int | None = None,
) -> list[common_pb2.ScoredPassage]:
    """Reciprocal rank fusion of ``lists`` (retriever name -> ranked passages), best first."""

    def score(name: str, rank: int, item: common_pb2.ScoredPassage) -> float:
        return 1.0 / (k + rank)

    return _fuse_by(lists, score, weights, top_k)


def weighted_fusion(
    lists: Lists,
    weights: Mapping[str, float] | None = None,
    top_k: int | None = None,
) -> list[common_pb2.ScoredPassage]:
    """Weighted sum of min-max normalised scores of ``lists``, best first."""
    bounds = {
        name: (min(item.score for item in ranked), max(item.score for item in ranked))
        for name, ranked in lists.items()
        if ranked
    }

    def score(name: str, rank: int, item: common_pb2.ScoredPassage) -> float:
        low, high = bounds[name]
        return 1.0 if high == low else (item.score - low) / (high - low)

    return _fuse_by(lists, score, weights, top_k)


def fuse(
    lists: Lists, fusion: common_pb2.Fusion, top_k: int, default_rrf_k: int
) -> list[common_pb2.ScoredPassage]:
    """Fuse as ``fusion`` asks (empty method: rrf; rrf_k 0: ``default_rrf_k``), keeping ``top_k``."""
    method = fusion.method or "rrf"
    if method not in METHODS:
        expected = ", ".join(METHODS)
        raise invalid_argument("fusion.method", f"unknown method {method!r}; expected one of {expected}")
    if fusion.rrf_k < 0:
        raise invalid_argument("fusion.rrf_k", f"must not be negative, got {fusion.rrf_k}")
    for name, weight in fusion.weights.items():
        if not math.isfinite(weight) or weight < 0:
            problem = f"the weight of {name!r} must be finite and >= 0, got {weight}"
            raise invalid_argument("fusion.weights", problem)
    if top_k <= 0:
        raise invalid_argument("top_k", f"must be positive, got {top_k}")
    if len(lists) == 1:
        ((name, ranked),) = lists.items()
        return _pass_through(name, ranked, top_k)
    weights = dict(fusion.weights)
    if method == "weighted":
        return weighted_fusion(lists, weights=weights, top_k=top_k)
    return reciprocal_rank_fusion(lists, k=fusion.rrf_k or default_rrf_k, weights=weights, top_k=top_k)


# (retriever name, 1-based rank in its list, the listed passage) -> unweighted score.
_Scorer = Callable[[str, int, common_pb2.ScoredPassage], float]


def _fuse_by(
    lists: Lists, score: _Scorer, weights: Mapping[str, float] | None, top_k: int | None
) -> list[common_pb2.ScoredPassage]:
    """Sum ``weight * score(name, rank, item)`` per passage id over the lists."""
    weights = weights or {}
    totals: dict[str, float] = {}
    best_rank: dict[str, int] = {}
    best_item: dict[str, common_pb2.ScoredPassage] = {}
    highlights: dict[str, list[common_pb2.Highlight]] = {}
    for name in sorted(lists):
        ranked = lists[name]
        weight = weights.get(name, 1.0)
        seen: set[str] = set()
        for rank, item in enumerate(ranked, start=1):
            pid = item.passage.id
            if pid in seen:
                continue
            seen.add(pid)
            highlights.setdefault(pid, []).extend(item.highlights)
            totals[pid] = totals.get(pid, 0.0) + weight * score(name, rank, item)
            if pid not in best_rank or rank < best_rank[pid]:
                best_rank[pid] = rank
                best_item[pid] = item
    order = sorted(totals, key=lambda pid: (-totals[pid], best_rank[pid], pid))
    if top_k is not None:
        order = order[:top_k]
    label = next(iter(lists)) if len(lists) == 1 else FUSED
    return [
        _result(best_item[pid], totals[pid], label, rank, highlights[pid])
        for rank, pid in enumerate(order, start=1)
    ]


def _pass_through(
    name: str, ranked: Sequence[common_pb2.ScoredPassage], top_k: int
) -> list[common_pb2.ScoredPassage]:
    results: list[common_pb2.ScoredPassage] = []
    seen: set[str] = set()
    for item in ranked:
        if item.passage.id in seen:
            continue
        seen.add(item.passage.id)
        results.append(_result(item, item.score, name, len(results) + 1, item.highlights))
        if len(results) == top_k:
            break
    return results


def _result(
    item: common_pb2.ScoredPassage,
    score: float,
    retriever: str,
    rank: int,
    highlights: Sequence[common_pb2.Highlight],
) -> common_pb2.ScoredPassage:
    spans = sorted(highlights, key=lambda h: (h.start, h.end))
    result = common_pb2.ScoredPassage(score=score, retriever=retriever, rank=rank, highlights=spans)
    result.passage.CopyFrom(item.passage)
    if item.HasField("continuation"):
        result.continuation.CopyFrom(item.continuation)
    return result
