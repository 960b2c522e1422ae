"""Input checks against Limits: names, filters, batch sizes, titles."""

import grpc
import pytest

from ragfleet.v1 import common_pb2
from services.runtime import validation
from services.runtime.errors import ServiceError
from services.runtime.settings import Limits

LIMITS = Limits()


def invalid(call, field):
    with pytest.raises(ServiceError) as err:
        call()
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert err.value.message.startswith(f"{field}:"), err.value.message
    return err.value.message


@pytest.mark.parametrize("bad", ["idx\n", "\nidx", "a/b", "..", "", "i dx"])
def test_names_match_whole(bad):
    invalid(lambda: validation.name(bad, "index", LIMITS), "index")
    assert not validation.is_name(bad)
    assert validation.name("a.b_c-9", "index", LIMITS) == "a.b_c-9"


def test_filters_count_is_limited():
    most = {f"k{i}": "v" for i in range(LIMITS.max_filters)}
    assert validation.filters(most, "filters", LIMITS) == most
    message = invalid(lambda: validation.filters({**most, "one": "more"}, "filters", LIMITS), "filters")
    assert "limits.max_filters" in message
    spec = common_pb2.RetrievalSpec(index="i", top_k=1, filters={**most, "one": "more"})
    invalid(lambda: validation.retrieval(spec, LIMITS), "retrieval.filters")


def test_batch_results_are_limited():
    top_k = LIMITS.max_top_k
    fits = LIMITS.max_batch_results // top_k
    assert validation.batch_results(fits, top_k, "top_k", LIMITS) == top_k
    message = invalid(lambda: validation.batch_results(fits + 1, top_k, "top_k", LIMITS), "top_k")
    assert "limits.max_batch_results" in message


def test_title_size():
    validation.title_size("t" * LIMITS.max_title_bytes, "title", LIMITS)
    message = invalid(lambda: validation.title_size("é" * LIMITS.max_title_bytes, "title", LIMITS), "title")
    assert "limits.max_title_bytes" in message
