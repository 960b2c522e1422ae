"""Input checks every service applies the same way, against the configured `Limits`.

Each check raises INVALID_ARGUMENT naming the field (as the caller spelled it on the wire, e.g.
`retrieval.top_k` or `queries[3]`) and returns the value it accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ragfleet.v1 import common_pb2
from services.runtime.errors import invalid_argument
from services.runtime.settings import Limits

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def name(value: str, field: str, limits: Limits) -> str:
    """An index or tenant name: it becomes a folder, so letters, digits, '.', '_' and '-' only."""
    if not value:
        raise invalid_argument(field, "is required")
    if len(value) > limits.max_index_name_chars:
        raise invalid_argument(field, f"longer than {limits.max_index_name_chars} characters")
    if not _NAME.match(value) or value in (".", ".."):
        raise invalid_argument(field, "may contain only letters, digits, '.', '_' and '-'")
    return value


def is_name(value: str) -> bool:
    return bool(_NAME.match(value)) and value not in (".", "..")


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


def search_options(options: common_pb2.SearchOptions, field: str) -> common_pb2.SearchOptions:
    """What any retriever requires of SearchOptions; which fields a backend uses is its own check."""
    for count in ("ncells", "ndocs"):
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
    search_options(spec.options, f"{field}.options")
    return checked


def identifier(value: str, field: str, limits: Limits) -> str:
    """A document or passage id."""
    if not value:
        raise invalid_argument(field, "is required")
    if len(value) > limits.max_id_chars:
        raise invalid_argument(field, f"longer than {limits.max_id_chars} characters")
    return value


def text_size(text: str, field: str, limits: Limits, what: str) -> None:
    """A document's or passage's text must fit `max_document_bytes`; `what` names it in the message."""
    size = len(text.encode("utf-8"))
    if size > limits.max_document_bytes:
        raise invalid_argument(field, f"{what} is {size} bytes; the limit is {limits.max_document_bytes}")
