"""CallGate: authentication, deadlines and error mapping shared by both server adapters."""

import asyncio
import time

import grpc
import pytest

from services.runtime.calls import CallGate, rpc_methods
from services.runtime.errors import ServiceError, not_found
from services.runtime.settings import AuthSettings, Settings

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
