"""The long form of the fault checks: retrievers SIGKILLed under search load and during ingests, the
generator SIGKILLed mid-stream (see `faults`)."""

import pytest

from tests.reliability.faults import (
    kill_generator_mid_stream,
    kill_retriever_during_ingest,
    kill_retriever_under_search,
)
from tests.reliability.probes import print_summary
from tools.fleet import start_local_fleet

pytestmark = pytest.mark.reliability

BM25 = ("retriever-bm25", "pipeline")


def test_a_killed_retriever_fails_searches_only_with_unavailable(tmp_path):
    fleet = start_local_fleet(tmp_path, BM25)
    try:
        report = kill_retriever_under_search(
            fleet, clients=8, kills=3, down_s=2.0, between_s=2.0, reconnect_s=10.0
        )
    finally:
        fleet.stop()
    print_summary("faults: retriever killed under search", report.summary())
    assert report.kills == 3 and len(report.searches) > 100
    assert not report.broken, report.broken[:5]


def test_searches_work_half_a_second_after_the_retriever_is_back(tmp_path):
    fleet = start_local_fleet(tmp_path, BM25)
    try:
        report = kill_retriever_under_search(
            fleet, clients=4, kills=3, down_s=5.0, between_s=2.0, reconnect_s=0.5
        )
    finally:
        fleet.stop()
    print_summary("faults: searches after the retriever is back", report.summary())
    assert not report.broken, report.broken[:5]


def test_a_kill_during_ingest_leaves_the_index_whole(tmp_path):
    fleet = start_local_fleet(tmp_path, BM25)
    try:
        report = kill_retriever_during_ingest(fleet, rounds=10, documents=3000, seed=15)
    finally:
        fleet.stop()
    print_summary("faults: retriever killed during ingest", report.summary())
    assert report.rounds == 10
    assert not report.broken, report.broken[:5]


def test_a_killed_generator_ends_the_stream_with_unavailable(tmp_path):
    fleet = start_local_fleet(tmp_path, ("retriever-bm25", "generator", "pipeline"))
    try:
        report = kill_generator_mid_stream(fleet, {"max_tokens": 200})
    finally:
        fleet.stop()
    print_summary("faults: generator killed mid-stream", report.summary())
    assert not report.broken, report.broken
