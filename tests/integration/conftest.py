"""A real fleet of `ragfleet serve` processes on loopback, shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tools.fleet import LocalFleet, start_local_fleet


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    running = start_local_fleet(tmp_path_factory.mktemp("ragfleet-home"))
    yield running
    running.stop()
