"""Bearer tokens map to tenants end to end: the gateway forwards the caller's token to the retrievers,
and a tenant sees only its own indexes."""

from __future__ import annotations

import json

import pytest

import ragfleet
from tools.fleet import start_local_fleet

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory):
    tokens = json.dumps({"token-a": "acme", "token-b": "globex"})
    fleet = start_local_fleet(
        tmp_path_factory.mktemp("auth-home"), ("retriever-bm25", "pipeline"), RAGFLEET_AUTH__TOKENS=tokens
    )
    yield fleet.address
    fleet.stop()


def test_calls_without_a_known_token_are_refused(address: str) -> None:
    for token in (None, "wrong"):
        with ragfleet.Client(address, token=token, timeout=30) as client:
            with pytest.raises(ragfleet.errors.Unauthenticated) as err:
                client.list_indexes()
            assert "authorization" in err.value.details


def test_a_tenant_sees_only_its_own_indexes(address: str) -> None:
    docs = [{"id": "d1", "text": "the acme anvil is heavy"}]
    with (
        ragfleet.Client(address, token="token-a", timeout=60) as a,
        ragfleet.Client(address, token="token-b", timeout=60) as b,
    ):
        a.ingest(docs, index="shared-name")
        assert a.search("anvil", index="shared-name", top_k=1).results[0].passage.doc_id == "d1"
        with pytest.raises(ragfleet.errors.NotFound):
            b.search("anvil", index="shared-name", top_k=1)
        assert [i.index for i in b.list_indexes()] == []
        b.ingest([{"id": "d1", "text": "globex owns another anvil"}], index="shared-name")
        found = b.search("anvil", index="shared-name", top_k=1).results[0]
        assert "globex" in found.passage.text
        assert "acme" in a.search("anvil", index="shared-name", top_k=1).results[0].passage.text
