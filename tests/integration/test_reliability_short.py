"""The short forms of the reliability suite (tests/reliability), for `make test`: each check once, small
and quick, on `ragfleet serve` processes on loopback. `make reliability` runs the long forms."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from services.runtime.settings import Limits
from tests.reliability import amplification, faults, load, tenants
from tests.reliability.hostile import attack_fleet
from tests.reliability.probes import print_summary
from tools.fleet import LocalFleet, start_local_fleet

pytestmark = pytest.mark.integration

BM25 = ("retriever-bm25", "pipeline")
# Limits scaled down so that every case of the amplification check is quick; a consistent set: a
# reply of max_batch_results passages at their largest fits server.max_message_bytes.
SMALL_LIMITS = Limits(
    max_batch_queries=256,
    max_batch_results=2000,
    max_title_bytes=1024,
    max_metadata_bytes=8192,
    max_document_bytes=256 * 1024,
    max_chunked_document_bytes=2 * 1024 * 1024,
    max_ingest_bytes=16 * 1024 * 1024,
    max_ingest_passages=20_000,
    max_passages_per_document=2000,
)


def _limits_env(limits: Limits) -> dict[str, str]:
    return {
        f"RAGFLEET_LIMITS__{name.upper()}": json.dumps(value) for name, value in limits.model_dump().items()
    }


@pytest.fixture(scope="module")
def bm25_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    running = start_local_fleet(tmp_path_factory.mktemp("reliability"), BM25)
    yield running
    running.stop()


def test_hostile_input_gets_only_documented_codes(bm25_fleet: LocalFleet) -> None:
    report = attack_fleet(bm25_fleet, examples=6, seconds=20, seed_value=1)
    print_summary("hostile (short)", report.summary())
    assert report.calls >= 100
    assert not report.broken, report.broken[:5]


def test_load_of_8_and_32_clients_has_no_errors(bm25_fleet: LocalFleet) -> None:
    load.prepare(bm25_fleet, documents=100)
    for clients in (8, 32):
        report = load.run_load(bm25_fleet, clients=clients, seconds=2.0)
        print_summary("load (short)", report.summary())
        assert not report.errors and report.latencies["search"] and report.latencies["ask"]


def test_requests_at_the_limits_stay_bounded(tmp_path) -> None:
    fleet = start_local_fleet(tmp_path, BM25, **_limits_env(SMALL_LIMITS))
    try:
        rows = amplification.run_amplification(fleet, SMALL_LIMITS, bound_mb=256)
    finally:
        fleet.stop()
    for row, _ in rows:
        print_summary("amplification (short)", row.summary())
    assert len(rows) == len(amplification.cases(SMALL_LIMITS))
    assert not [(row.case, found) for row, found in rows if found]


def test_killed_retrievers_fail_calls_plainly_and_leave_indexes_whole(tmp_path) -> None:
    fleet = start_local_fleet(tmp_path, BM25)
    try:
        searches = faults.kill_retriever_under_search(
            fleet, clients=4, kills=1, down_s=0.5, between_s=1.0, reconnect_s=10.0
        )
        ingests = faults.kill_retriever_during_ingest(fleet, rounds=2, documents=400, seed=1)
    finally:
        fleet.stop()
    print_summary("faults: retriever killed under search (short)", searches.summary())
    print_summary("faults: retriever killed during ingest (short)", ingests.summary())
    assert searches.kills == 1 and not searches.broken, searches.broken[:5]
    assert ingests.rounds == 2 and not ingests.broken, ingests.broken[:5]


def test_a_killed_generator_ends_the_stream_with_unavailable(tmp_path) -> None:
    fleet = start_local_fleet(tmp_path, ("retriever-bm25", "generator", "pipeline"))
    try:
        report = faults.kill_generator_mid_stream(fleet, {"max_tokens": 200})
    finally:
        fleet.stop()
    print_summary("faults: generator killed mid-stream (short)", report.summary())
    assert not report.broken, report.broken


def test_no_route_lets_one_tenant_reach_another(tmp_path) -> None:
    fleet = start_local_fleet(tmp_path, BM25, **tenants.FLEET_ENV)
    try:
        report = tenants.probe_fleet(fleet, forged=tenants.FORGED[:1])
    finally:
        fleet.stop()
    print_summary("tenants (short)", report.summary())
    assert not report.broken, report.broken


def test_tokens_on_the_pipeline_only_still_isolate_tenants(tmp_path) -> None:
    fleet = start_local_fleet(tmp_path, BM25, **tenants.FLEET_ENV)
    try:
        report = tenants.pipeline_only_trap(fleet)
    finally:
        fleet.stop()
    print_summary("tenants: tokens on the pipeline only (short)", report.summary())
    assert not report.broken, report.broken
