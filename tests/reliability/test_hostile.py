"""The long form of the hostile-input check: a few thousand structured and raw requests to every
Pipeline and Retriever RPC, about 5 minutes (see `hostile`)."""

import pytest

from tests.reliability.hostile import attack_fleet
from tests.reliability.probes import print_summary
from tools.fleet import start_local_fleet

pytestmark = pytest.mark.reliability


def test_hostile_input_gets_only_documented_codes_and_changes_nothing(tmp_path):
    fleet = start_local_fleet(tmp_path, ("retriever-bm25", "pipeline"))
    try:
        report = attack_fleet(fleet, examples=300, seconds=300, seed_value=15)
    finally:
        fleet.stop()
    print_summary("hostile", report.summary())
    assert report.calls >= 1000
    assert not report.broken, report.broken[:5]
