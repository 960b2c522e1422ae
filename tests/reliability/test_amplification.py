"""The long form of the amplification check: each documented limit at its default value, on freshly
started servers, each case's memory printed (see `amplification`)."""

import pytest

from services.runtime.settings import Limits
from tests.reliability.amplification import cases, prepare, problems, run_case
from tests.reliability.probes import print_summary
from tools.fleet import start_local_fleet

pytestmark = pytest.mark.reliability

LIMITS = Limits()
# The most a process may grow while it serves one request at the limits.
BOUND_MB = 512


def _param(case):
    return pytest.param(case, id=case.name)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    running = start_local_fleet(tmp_path_factory.mktemp("amplification"), ("retriever-bm25", "pipeline"))
    prepare(running, LIMITS)
    yield running
    running.stop()


@pytest.mark.parametrize("case", [_param(c) for c in cases(LIMITS)])
def test_a_request_at_a_limit_stays_within_the_memory_bound(fleet, case):
    row = run_case(fleet, case)
    print_summary("amplification", row.summary())
    found = problems(case, row, BOUND_MB)
    assert not found, found
