"""How a downstream service's failure reaches our caller: its code is kept and the service named, and
a peer that vanished mid-call is UNAVAILABLE however grpc.aio noticed it."""

from __future__ import annotations

import grpc
import pytest

from services.runtime.remote import relay


def rpc_error(code: grpc.StatusCode, details: str, debug: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, debug)


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE]
)
def test_the_code_is_kept_and_the_service_named(code: grpc.StatusCode) -> None:
    err = relay(rpc_error(code, "index 'kb' does not exist"), "retriever bm25")
    assert err.code == code and err.message == "retriever bm25: index 'kb' does not exist"


def test_unknown_from_a_peer_becomes_internal() -> None:
    assert relay(rpc_error(grpc.StatusCode.UNKNOWN, "boom"), "generator").code == grpc.StatusCode.INTERNAL


def test_a_write_on_a_broken_connection_is_unavailable() -> None:
    # What grpc.aio reports itself when sending on a call whose peer died: the status never came.
    local = rpc_error(
        grpc.StatusCode.INTERNAL,
        "Internal error from Core",
        'Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object at 0x7f40e5e26430>,)',
    )
    err = relay(local, "retriever bm25")
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.message.startswith("retriever bm25: ") and "connection" in err.message


def test_internal_from_the_peer_itself_stays_internal() -> None:
    err = relay(rpc_error(grpc.StatusCode.INTERNAL, "internal error in Ingest (request id r1)"), "r1")
    assert err.code == grpc.StatusCode.INTERNAL
