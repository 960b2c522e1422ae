"""CallGate: authentication, deadlines, metadata and error mapping shared by both server adapters;
the grpc.aio server's handling of binary metadata, where its metrics endpoint listens, and its refusal
to serve open beyond loopback."""

import asyncio
import socket
import time
import urllib.request

import grpc
import pytest

from ragfleet.v1 import pipeline_pb2_grpc, retriever_pb2
from services.gateway.service import PipelineService
from services.runtime.calls import CallGate, rpc_methods
from services.runtime.errors import ServiceError, not_found
from services.runtime.server import start_metrics, start_server
from services.runtime.settings import (
    AuthSettings,
    GatewaySettings,
    OpenServiceError,
    ServerSettings,
    Settings,
    TlsSettings,
    is_loopback,
    require_auth_when_exposed,
)

SEARCH = next(m for m in rpc_methods("ragfleet.v1.Retriever") if m.name == "Search")


def gate(tokens: dict[str, str] | None = None) -> CallGate:
    return CallGate("Retriever", Settings(auth=AuthSettings(tokens=tokens or {})))


def test_methods_come_from_the_descriptors() -> None:
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in rpc_methods("ragfleet.v1.Pipeline")}
    assert kinds["Ingest"] == (True, False)
    assert kinds["AskStream"] == (False, True)
    assert kinds["Search"] == (False, False)


def test_no_tokens_means_default_tenant() -> None:
    ctx = gate().context([("x-request-id", "abc")], None)
    assert ctx.tenant == "default" and ctx.request_id == "abc" and ctx.deadline is None


def test_tokens_map_to_tenants_and_unknown_tokens_are_refused() -> None:
    g = gate({"s3cret": "acme"})
    assert g.context([("authorization", "Bearer s3cret")], None).tenant == "acme"
    for md in ([], [("authorization", "Bearer nope")], [("authorization", "Basic s3cret")]):
        with pytest.raises(ServiceError) as err:
            g.context(md, None)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_the_earliest_deadline_wins() -> None:
    ctx = gate().context([("x-ragfleet-deadline", f"{time.time() + 100:.3f}")], 5.0)
    assert 4.0 < ctx.time_remaining() <= 5.0
    with pytest.raises(ServiceError) as err:
        gate().context([("x-ragfleet-deadline", "soon")], None)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "x-ragfleet-deadline" in err.value.message


async def test_errors_keep_their_code_and_others_become_internal() -> None:
    g = gate()
    ctx = g.context([], None)

    async def missing(_):
        raise not_found("index 'x' does not exist")

    async def crash(_):
        raise KeyError("boom")

    with pytest.raises(ServiceError) as err:
        await g.unary(SEARCH, missing, ctx)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ServiceError) as err:
        await g.unary(SEARCH, crash, ctx)
    assert err.value.code == grpc.StatusCode.INTERNAL
    assert ctx.request_id in err.value.message and "boom" not in err.value.message


async def test_deadline_is_enforced() -> None:
    g = gate()
    ctx = g.context([], 0.05)

    async def slow(_):
        await asyncio.sleep(1)

    with pytest.raises(ServiceError) as err:
        await g.unary(SEARCH, slow, ctx)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_streams_map_errors_the_same_way() -> None:
    g = gate()
    ctx = g.context([], None)
    ask = next(m for m in rpc_methods("ragfleet.v1.Pipeline") if m.name == "AskStream")

    async def two_then_crash(_):
        yield 1
        yield 2
        raise RuntimeError("secret detail")

    got = []
    with pytest.raises(ServiceError) as err:
        async for item in g.stream(ask, two_then_crash, ctx):
            got.append(item)
    assert got == [1, 2]
    assert err.value.code == grpc.StatusCode.INTERNAL and "secret" not in err.value.message


def test_undecodable_metadata_is_an_invalid_argument_naming_the_key() -> None:
    with pytest.raises(ServiceError) as err:
        gate().context([("x-request-id", b"\xff\xfe")], None)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message.startswith("x-request-id:")


def test_binary_metadata_is_left_out_of_the_text_metadata() -> None:
    ctx = gate().context([("x-a-bin", b"\xff"), ("x-request-id", "abc")], None)
    assert ctx.metadata == {"x-request-id": "abc"}


@pytest.fixture
async def pipeline_server():
    """A Pipeline with no retrievers (ListIndexes answers an empty list) behind the real grpc.aio
    server, requiring the token 's3cret'; yields a stub."""
    settings = Settings(auth=AuthSettings(tokens={"s3cret": "acme"}), gateway=GatewaySettings(retrievers={}))
    server, port = await start_server("ragfleet.v1.Pipeline", PipelineService(settings), settings, port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pipeline_pb2_grpc.PipelineStub(channel)
    await server.stop(None)


async def test_binary_metadata_that_is_not_utf8_is_accepted_over_grpc(pipeline_server) -> None:
    request = retriever_pb2.ListIndexesRequest()
    authorized = [("authorization", "Bearer s3cret"), ("x-a-bin", b"\xff")]
    assert list((await pipeline_server.ListIndexes(request, metadata=authorized)).indexes) == []
    # It does not get past authentication either.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await pipeline_server.ListIndexes(request, metadata=[("x-a-bin", b"\xff")])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_metrics_endpoint_listens_on_the_server_host() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    httpd = start_metrics(Settings(server=ServerSettings(host="127.0.0.1", metrics_port=port)))
    try:
        assert httpd.server_address[:2] == ("127.0.0.1", port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert b"ragfleet_rpc_total" in reply.read()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert start_metrics(Settings(server=ServerSettings(metrics_port=None))) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]", "::ffff:127.0.0.1"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "", "192.0.2.2", "fd00::2", "example.com"])
def test_hosts_other_machines_reach(host: str) -> None:
    assert not is_loopback(host)


def test_an_open_service_may_listen_on_loopback_only() -> None:
    open_settings = Settings()
    assert open_settings.server.host == "127.0.0.1" and open_settings.ray.host == "127.0.0.1"
    require_auth_when_exposed(open_settings, "127.0.0.1", "retriever")
    with pytest.raises(OpenServiceError) as err:
        require_auth_when_exposed(open_settings, "0.0.0.0", "retriever")
    assert "retriever would listen on 0.0.0.0" in str(err.value)
    assert "auth.tokens" in str(err.value) and "auth.allow_open" in str(err.value)


@pytest.mark.parametrize(
    "settings, mtls",
    [
        (Settings(auth=AuthSettings(tokens={"s3cret": "acme"})), False),
        (Settings(auth=AuthSettings(allow_open=True)), False),
        (Settings(), True),
    ],
    ids=["tokens", "allow-open", "client-certificates"],
)
def test_tokens_client_certificates_or_an_explicit_allow_open_may_listen_everywhere(
    settings: Settings, mtls: bool
) -> None:
    require_auth_when_exposed(settings, "0.0.0.0", "retriever", client_certificates=mtls)


async def test_the_server_refuses_to_listen_open_beyond_loopback(tmp_path) -> None:
    settings = Settings(server=ServerSettings(host="0.0.0.0"), gateway=GatewaySettings(retrievers={}))
    with pytest.raises(OpenServiceError):
        await start_server("ragfleet.v1.Pipeline", PipelineService(settings), settings, port=0)
    # TLS without client certificates authenticates the server only: it still refuses.
    (tmp_path / "cert.pem").write_text("unused")
    tls = Settings(server=settings.server, tls=TlsSettings(cert_file=tmp_path / "cert.pem"))
    with pytest.raises(OpenServiceError):
        await start_server("ragfleet.v1.Pipeline", PipelineService(settings), tls, port=0)
