"""The long form of the race suite: rounds of concurrent ingest / upsert / delete / drop / search on one
index until about 100 seconds have passed, then the invariants (see `races`)."""

import pytest

from tests.reliability.races import run_races

pytestmark = pytest.mark.reliability


async def test_no_interleaving_breaks_an_index(tmp_path):
    report = await run_races(tmp_path, rounds=400, calls_per_round=80, seconds=100, seed=15)
    print(f"{report.rounds} rounds, {report.calls} calls, {report.broken} broken")
    assert report.rounds >= 10
    assert report.broken == 0, report.broken_calls[:5] + report.broken_invariants[:5]
