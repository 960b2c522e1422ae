"""One call path for every RPC, whichever server runs it (plain grpc.aio or Ray Serve).

`CallGate.run` takes the caller's metadata, authenticates it, builds the CallContext, enforces the
deadline, counts and times the call for Prometheus, logs it with its request id, and leaves error
reporting to the adapter: a ServiceError keeps its status code, anything else becomes INTERNAL with the
request id (never a traceback to the caller). Both adapters (`runtime.server`, `runtime.serve`) are
thin shells around this, so auth, limits and metrics behave the same in every deployment mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from prometheus_client import Counter, Histogram

from ragfleet.metadata import AUTHORIZATION_KEY, DEADLINE_KEY, REQUEST_ID_KEY
from services.runtime.context import CallContext
from services.runtime.errors import ServiceError, deadline_exceeded, invalid_argument, unauthenticated
from services.runtime.settings import Settings

log = logging.getLogger("ragfleet.rpc")

RPC_TOTAL = Counter("ragfleet_rpc_total", "RPCs handled", ["service", "method", "code"])
RPC_SECONDS = Histogram(
    "ragfleet_rpc_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


@dataclass(frozen=True)
class RpcMethod:
    name: str
    client_streaming: bool
    server_streaming: bool
    request_cls: type[Message]
    response_cls: type[Message]


def rpc_methods(service_full_name: str) -> list[RpcMethod]:
    """The RPCs of a service from the generated descriptors, e.g. "ragfleet.v1.Retriever"."""
    package, _, name = service_full_name.rpartition(".")
    importlib.import_module(f"{package}.{name.lower()}_pb2")  # registers its descriptors
    service = descriptor_pool.Default().FindServiceByName(service_full_name)
    return [
        RpcMethod(
            name=m.name,
            client_streaming=m.client_streaming,
            server_streaming=m.server_streaming,
            request_cls=GetMessageClass(m.input_type),
            response_cls=GetMessageClass(m.output_type),
        )
        for m in service.methods
    ]


class Undecodable:
    """What a request deserializer returns for bytes that are not a valid message (e.g. bad UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def checked(request: Any, method: RpcMethod) -> Any:
    if isinstance(request, Undecodable):
        raise invalid_argument(
            "request", f"not a valid {method.request_cls.DESCRIPTOR.name} (string fields must be UTF-8)"
        )
    return request


def _text_metadata(metadata: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """The caller's text metadata by lower-case key. Binary entries (keys ending in "-bin", bytes by
    definition) are left out: ragfleet reads none. A text value that is not UTF-8 is refused."""
    md: dict[str, str] = {}
    for key, value in metadata:
        key = key.lower()
        if key.endswith("-bin"):
            continue
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise invalid_argument(key, "metadata values must be UTF-8 text") from None
        md[key] = value
    return md


class CallGate:
    """Everything that happens around a service method call, shared by both server adapters."""

    def __init__(self, service_name: str, settings: Settings) -> None:
        self.service_name = service_name
        self.settings = settings
        self.tenants_by_token = dict(settings.auth.tokens)

    def context(self, metadata: Iterable[tuple[str, Any]], grpc_time_remaining: float | None) -> CallContext:
        md = _text_metadata(metadata)
        tenant = "default"
        if self.tenants_by_token:
            auth = md.get(AUTHORIZATION_KEY, "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise unauthenticated("authorization: a 'Bearer <token>' metadata entry is required")
            if token not in self.tenants_by_token:
                raise unauthenticated("authorization: unknown token")
            tenant = self.tenants_by_token[token]
        deadline = None
        if grpc_time_remaining is not None:
            deadline = time.time() + grpc_time_remaining
        if DEADLINE_KEY in md:
            try:
                sent = float(md[DEADLINE_KEY])
            except ValueError:
                raise invalid_argument(DEADLINE_KEY, "must be Unix seconds") from None
            deadline = sent if deadline is None else min(deadline, sent)
        return CallContext(
            tenant=tenant,
            request_id=md.get(REQUEST_ID_KEY) or uuid.uuid4().hex,
            deadline=deadline,
            authorization=md.get(AUTHORIZATION_KEY),
            metadata=md,
        )

    @contextlib.contextmanager
    def _observed(self, method: RpcMethod, ctx: CallContext) -> Iterator[None]:
        """Counts, times and logs one call; anything but a ServiceError becomes INTERNAL."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except ServiceError as err:
            code = err.code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as err:
            code = grpc.StatusCode.INTERNAL
            raise self.internal(method, ctx, err) from err
        finally:
            self.record(method, ctx, code, start)

    async def unary(
        self, method: RpcMethod, call: Callable[[CallContext], Awaitable[Message]], ctx: CallContext
    ) -> Message:
        with self._observed(method, ctx):
            remaining = ctx.time_remaining()
            if remaining is not None and remaining <= 0:
                raise deadline_exceeded("the deadline passed before the call started")
            try:
                return await asyncio.wait_for(call(ctx), timeout=remaining)
            except TimeoutError:
                raise deadline_exceeded(f"{method.name} did not finish before the deadline") from None

    async def stream(
        self, method: RpcMethod, call: Callable[[CallContext], AsyncIterator[Message]], ctx: CallContext
    ) -> AsyncIterator[Message]:
        with self._observed(method, ctx):
            async for message in call(ctx):
                if ctx.deadline is not None and ctx.time_remaining() <= 0:
                    raise deadline_exceeded(f"{method.name} did not finish before the deadline")
                yield message

    def internal(self, method: RpcMethod, ctx: CallContext, err: Exception) -> ServiceError:
        log.exception("%s.%s failed (request id %s)", self.service_name, method.name, ctx.request_id)
        return ServiceError(
            grpc.StatusCode.INTERNAL, f"internal error in {method.name} (request id {ctx.request_id})"
        )

    def record(self, method: RpcMethod, ctx: CallContext, code: grpc.StatusCode, start: float) -> None:
        elapsed = time.perf_counter() - start
        RPC_TOTAL.labels(self.service_name, method.name, code.name).inc()
        RPC_SECONDS.labels(self.service_name, method.name).observe(elapsed)
        log.info(
            "%s.%s tenant=%s request_id=%s code=%s %.1f ms",
            self.service_name,
            method.name,
            ctx.tenant,
            ctx.request_id,
            code.name,
            elapsed * 1000,
        )
