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
REPLY_UNBOUNDED = (
    "defect: SearchBatch replies are bounded in results (max_batch_results), not in bytes. At the default "
    "limits an ordinary reply (100 queries x top_k 1000, or 4096 x 24, of ~700-byte passages) is 73-74 MB, "
    "over server.max_message_bytes (64 MiB): the Retriever builds all of it (+1.3 to 2.6 GiB resident, "
    "25-30 s) before gRPC refuses to send it with RESOURCE_EXHAUSTED 'Sent message larger than max', which "
    "names no limit; over passages whose title and metadata are at their limits 2 queries make a 90 MB reply "
    "(the limits allow 100: ~6.8 GB). Nothing checks a reply's size before the work."
)


def _param(case):
    marks = [pytest.mark.xfail(strict=True, reason=REPLY_UNBOUNDED)] if "SearchBatch" in case.name else []
    return pytest.param(case, id=case.name, marks=marks)


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
