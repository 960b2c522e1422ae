"""Tenant isolation on every route, with forged tenant headers, and the pipeline-only-token trap
(see `tenants`)."""

import pytest

from tests.reliability.probes import print_summary
from tests.reliability.tenants import FLEET_ENV, pipeline_only_trap, probe_fleet
from tools.fleet import start_local_fleet

pytestmark = pytest.mark.reliability

BM25 = ("retriever-bm25", "pipeline")


def test_no_route_lets_one_tenant_reach_another(tmp_path):
    fleet = start_local_fleet(tmp_path, BM25, **FLEET_ENV)
    try:
        report = probe_fleet(fleet)
    finally:
        fleet.stop()
    print_summary("tenants", report.summary())
    assert not report.broken, report.broken


def test_tokens_on_the_pipeline_only_still_isolate_tenants(tmp_path):
    fleet = start_local_fleet(tmp_path, BM25, **FLEET_ENV)
    try:
        report = pipeline_only_trap(fleet)
    finally:
        fleet.stop()
    print_summary("tenants: tokens on the pipeline only", report.summary())
    assert not report.broken, report.broken
