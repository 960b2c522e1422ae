"""Input checks every service applies the same way, against the configured `Limits`.

Each check raises INVALID_ARGUMENT naming the field (as the caller spelled it on the wire, e.g.
`retrieval.top_k` or `queries[3]`) and returns the value it accepted; `ReplyBudget` bounds a reply's
bytes while it is built.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from google.protobuf.message import Message

from ragfleet.v1 import common_pb2, pipeline_pb2
from services.runtime.errors import invalid_argument, resource_exhausted
from services.runtime.settings import Limits

_NAME = re.compile(r"[A-Za-z0-9._-]+")  # used with fullmatch: "$" would let a final "\n" in


def name(value: str, field: str, limits: Limits) -> str:
    """An index or tenant name: it becomes a folder, so letters, digits, '.', '_' and '-' only."""
    if not value:
        raise invalid_argument(field, "is required")
    if len(value) > limits.max_index_name_chars:
        raise invalid_argument(field, f"longer than {limits.max_index_name_chars} characters")
    if not is_name(value):
        raise invalid_argument(field, "may contain only letters, digits, '.', '_' and '-'")
    return value


def is_name(value: str) -> bool:
    return bool(_NAME.fullmatch(value)) and value not in (".", "..")


def query(value: str, field: str, limits: Limits) -> str:
    if not value.strip():
        raise invalid_argument(field, "is empty")
    if len(value) > limits.max_query_chars:
        raise invalid_argument(field, f"longer than {limits.max_query_chars} characters")
    return value


def queries(values: Sequence[str], field: str, limits: Limits) -> list[str]:
    if not values:
        raise invalid_argument(field, "is empty")
    if len(values) > limits.max_batch_queries:
        raise invalid_argument(field, f"more than {limits.max_batch_queries} queries")
    return [query(q, f"{field}[{i}]", limits) for i, q in enumerate(values)]


def top_k(value: int, field: str, limits: Limits) -> int:
    if value <= 0 or value > limits.max_top_k:
        raise invalid_argument(field, f"must be between 1 and {limits.max_top_k}, got {value}")
    return value


def batch_results(queries: int, top_k: int, field: str, limits: Limits) -> int:
    """A batch's top_k: `queries` x `top_k` results must fit `max_batch_results`."""
    if queries * top_k > limits.max_batch_results:
        raise invalid_argument(
            field,
            f"{queries} queries x top_k {top_k} ask for more than {limits.max_batch_results} results"
            " (limits.max_batch_results); send fewer queries per batch",
        )
    return top_k


def filters(values: Mapping[str, str], field: str, limits: Limits) -> Mapping[str, str]:
    """Metadata filters: at most `max_filters` pairs."""
    if len(values) > limits.max_filters:
        raise invalid_argument(
            field, f"{len(values)} filters; the limit is {limits.max_filters} (limits.max_filters)"
        )
    return values


def search_options(options: common_pb2.SearchOptions, field: str) -> common_pb2.SearchOptions:
    """What any retriever requires of SearchOptions; which fields a backend uses is its own check."""
    for count in ("ncells", "ndocs", "beam", "ngram_length"):
        if getattr(options, count) < 0:
            raise invalid_argument(f"{field}.{count}", f"must not be negative, got {getattr(options, count)}")
    if not math.isfinite(options.centroid_score_threshold):
        raise invalid_argument(f"{field}.centroid_score_threshold", "must be a finite number")
    return options


def retrieval(
    spec: common_pb2.RetrievalSpec, limits: Limits, *, field: str = "retrieval", default_top_k: int = 0
) -> common_pb2.RetrievalSpec:
    """A checked copy of a RetrievalSpec; a top_k of 0 becomes `default_top_k` when that is set.

    Retriever names and fusion are checked where they are used (the gateway knows which retrievers
    exist; `fusion.fuse` checks the method and weights).
    """
    checked = common_pb2.RetrievalSpec()
    checked.CopyFrom(spec)
    name(spec.index, f"{field}.index", limits)
    checked.top_k = top_k(spec.top_k or default_top_k, f"{field}.top_k", limits)
    if spec.candidates < 0:
        raise invalid_argument(f"{field}.candidates", "must not be negative")
    filters(spec.filters, f"{field}.filters", limits)
    search_options(spec.options, f"{field}.options")
    return checked


def identifier(value: str, field: str, limits: Limits) -> str:
    """A document or passage id."""
    if not value:
        raise invalid_argument(field, "is required")
    if len(value) > limits.max_id_chars:
        raise invalid_argument(field, f"longer than {limits.max_id_chars} characters")
    return value


def metadata_size(metadata: Mapping[str, str], field: str, limits: Limits) -> int:
    """Metadata must fit `max_metadata_bytes` (keys and values in UTF-8); returns its size."""
    size = sum(len(key.encode("utf-8")) + len(value.encode("utf-8")) for key, value in metadata.items())
    if size > limits.max_metadata_bytes:
        raise invalid_argument(
            field, f"is {size} bytes; the limit is {limits.max_metadata_bytes} (limits.max_metadata_bytes)"
        )
    return size


def title_size(title: str, field: str, limits: Limits) -> None:
    """A document's or passage's title must fit `max_title_bytes`."""
    size = len(title.encode("utf-8"))
    if size > limits.max_title_bytes:
        raise invalid_argument(
            field, f"is {size} bytes; the limit is {limits.max_title_bytes} (limits.max_title_bytes)"
        )


def text_size(text: str, field: str, limits: Limits, what: str) -> None:
    """A document's or passage's text must fit `max_document_bytes`; `what` names it in the message."""
    size = len(text.encode("utf-8"))
    if size > limits.max_document_bytes:
        raise invalid_argument(field, f"{what} is {size} bytes; the limit is {limits.max_document_bytes}")


def candidates(passages: Sequence[common_pb2.ScoredPassage], field: str, limits: Limits, most: int) -> None:
    """Passages to rerank: 1 to `most` (reranker.max_candidates) of them, each with a text that fits
    `max_document_bytes` with its title."""
    if not passages:
        raise invalid_argument(field, "is empty")
    if len(passages) > most:
        raise invalid_argument(
            field, f"{len(passages)} candidates; the limit is {most} (reranker.max_candidates)"
        )
    for i, candidate in enumerate(passages):
        passage = candidate.passage
        if not passage.text.strip():
            raise invalid_argument(f"{field}[{i}].passage.text", "is empty")
        where = f"{field}[{i}].passage.text"
        text_size(passage.title + passage.text, where, limits, f"passage {passage.id!r}")


def reranking(
    spec: pipeline_pb2.RerankSpec,
    top_k: int,
    limits: Limits,
    *,
    enabled: bool = False,
    field: str = "reranking",
) -> pipeline_pb2.RerankSpec | None:
    """A checked copy of a Pipeline RerankSpec with its depth filled in (0 means `top_k`, the checked
    retrieval top_k), or None when reranking was not asked for (`enabled`: AskRequest.rerank)."""
    if not (spec.enabled or enabled):
        return None
    checked = pipeline_pb2.RerankSpec()
    checked.CopyFrom(spec)
    checked.enabled = True
    checked.depth = spec.depth or top_k
    if checked.depth < top_k or checked.depth > limits.max_top_k:
        raise invalid_argument(
            f"{field}.depth",
            f"must be between retrieval.top_k ({top_k}) and {limits.max_top_k}, got {spec.depth}",
        )
    if spec.HasField("retrieval_weight"):
        weight(spec.retrieval_weight, f"{field}.retrieval_weight")
    return checked


def weight(value: float, field: str) -> float:
    """A weight between 0 and 1 (NaN is not)."""
    if not 0.0 <= value <= 1.0:
        raise invalid_argument(field, f"must be between 0 and 1, got {value}")
    return value


def top_k_of(value: int, field: str, available: int, what: str) -> int:
    """A top_k that picks from `available` items (`what` names them in the message)."""
    if value <= 0 or value > available:
        raise invalid_argument(field, f"must be between 1 and the {available} {what}, got {value}")
    return value


class ReplyBudget:
    """Counts the bytes of a reply as it is built; past `max_reply_bytes` it fails RESOURCE_EXHAUSTED."""

    def __init__(self, limits: Limits) -> None:
        self.limit = limits.max_reply_bytes
        self.used = 0

    def add(self, message: Message) -> None:
        self.used += message.ByteSize()
        if self.used > self.limit:
            raise resource_exhausted(
                f"the reply would be more than {self.limit} bytes (limits.max_reply_bytes); "
                "ask for fewer queries or a smaller top_k"
            )
