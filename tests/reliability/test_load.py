"""The long form of the load check: 8 and 32 clients of Search and Ask for 20 seconds each, with no
error; latency percentiles and memory printed (see `load`)."""

import pytest

from tests.reliability.load import prepare, run_load
from tests.reliability.probes import print_summary
from tools.fleet import start_local_fleet

pytestmark = pytest.mark.reliability

SECONDS = 20.0
# Resident memory a server may keep after the run over what it had before: no leak per call.
GROWTH_MB = 128


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    running = start_local_fleet(tmp_path_factory.mktemp("load"), ("retriever-bm25", "pipeline"))
    prepare(running)
    yield running
    running.stop()


@pytest.mark.parametrize("clients", [8, 32])
def test_clients_search_and_ask_without_errors(fleet, clients):
    report = run_load(fleet, clients=clients, seconds=SECONDS)
    summary = report.summary()
    print_summary("load", summary)
    assert summary["calls"] >= clients and not report.errors, report.errors
    for process, memory in report.memory.items():
        assert memory["after"] - memory["before"] < GROWTH_MB, (process, memory)
