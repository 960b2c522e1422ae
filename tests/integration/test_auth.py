"""Bearer tokens map to tenants end to end: every service of the fleet has the same tokens, the gateway
forwards the caller's token to the retrievers, and a tenant sees only its own indexes, through the
Pipeline and on direct calls to a retriever. A service listening beyond loopback without tokens refuses
to start."""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest

import ragfleet
from ragfleet.v1 import retriever_pb2, retriever_pb2_grpc
from tools.fleet import RAGFLEET, LocalFleet, free_port, service_env, start_local_fleet

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    tokens = json.dumps({"token-a": "acme", "token-b": "globex"})
    fleet = start_local_fleet(
        tmp_path_factory.mktemp("auth-home"), ("retriever-bm25", "pipeline"), RAGFLEET_AUTH__TOKENS=tokens
    )
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def address(fleet: LocalFleet) -> str:
    return fleet.address


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


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_direct_retriever_calls_keep_tenants_apart(fleet: LocalFleet) -> None:
    with ragfleet.Client(fleet.address, token="token-a", timeout=60) as a:
        a.ingest([{"id": "secret", "text": "the acme vault code is 1234"}], index="acme-only")
    with grpc.insecure_channel(fleet.services["retriever-bm25"].address) as channel:
        retriever = retriever_pb2_grpc.RetrieverStub(channel)
        search = retriever_pb2.SearchRequest(query="vault code", index="acme-only", top_k=1)
        drop = retriever_pb2.DeleteRequest(index="acme-only", drop_index=True)
        with pytest.raises(grpc.RpcError) as err:
            retriever.ListIndexes(retriever_pb2.ListIndexesRequest(), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for token, sees in (("token-a", True), ("token-b", False)):
            request = retriever_pb2.ListIndexesRequest()
            listed = retriever.ListIndexes(request, metadata=_bearer(token), timeout=30)
            assert ("acme-only" in [i.version.index for i in listed.indexes]) is sees
        for call, request in ((retriever.Search, search), (retriever.Delete, drop)):
            with pytest.raises(grpc.RpcError) as err:
                call(request, metadata=_bearer("token-b"), timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        hit = retriever.Search(search, metadata=_bearer("token-a"), timeout=30).results[0]
        assert hit.passage.doc_id == "secret"


def test_a_retriever_on_every_interface_without_auth_refuses_to_start(tmp_path) -> None:
    command = [RAGFLEET, "serve", "retriever-bm25", "--host", "0.0.0.0", "--port", str(free_port())]
    started = subprocess.run(command, env=service_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert started.returncode == 1
    refusal = " ".join((started.stdout + started.stderr).split())
    assert "would listen on 0.0.0.0 with no authentication" in refusal
    assert "auth.tokens" in refusal and "auth.allow_open" in refusal
