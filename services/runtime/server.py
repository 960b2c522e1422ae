"""The gRPC server every service runs under `ragfleet serve` (plain grpc.aio, no Ray).

It registers the service through generic handlers built from the proto descriptors (so a request that
fails to parse becomes INVALID_ARGUMENT, not an opaque INTERNAL), plus standard health checking and
server reflection (`grpcurl -plaintext host:port list` works), TLS or mTLS from settings, a cap on
message size and on concurrent RPCs (RESOURCE_EXHAUSTED past either), and Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from services.runtime.calls import CallGate, RpcMethod, Undecodable, checked, rpc_methods
from services.runtime.errors import ServiceError
from services.runtime.settings import Settings, require_auth_when_exposed

log = logging.getLogger("ragfleet.server")


def _deserializer(method: RpcMethod):
    def parse(data: bytes) -> Any:
        try:
            return method.request_cls.FromString(data)
        except DecodeError as err:
            return Undecodable(err)

    return parse


def _handler(method: RpcMethod, impl: Any, gate: CallGate) -> grpc.RpcMethodHandler:
    fn = getattr(impl, method.name)

    def ctx_of(context: grpc.aio.ServicerContext):
        return gate.context(context.invocation_metadata() or (), context.time_remaining())

    async def requests_of(request_iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in request_iterator:
            yield checked(request, method)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            ctx = ctx_of(context)
            if method.client_streaming:
                return await gate.unary(method, lambda c: fn(requests_of(request), c), ctx)
            return await gate.unary(method, lambda c: fn(checked(request, method), c), ctx)
        except ServiceError as err:
            await context.abort(err.code, err.message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            ctx = ctx_of(context)
            async for message in gate.stream(method, lambda c: fn(checked(request, method), c), ctx):
                yield message
        except ServiceError as err:
            await context.abort(err.code, err.message)

    kwargs = dict(
        request_deserializer=_deserializer(method), response_serializer=method.response_cls.SerializeToString
    )
    if method.client_streaming and method.server_streaming:
        raise ValueError(f"{method.name}: bidirectional streaming is not used by ragfleet")
    if method.client_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)


def generic_handler(service_full_name: str, impl: Any, gate: CallGate) -> grpc.GenericRpcHandler:
    handlers = {m.name: _handler(m, impl, gate) for m in rpc_methods(service_full_name)}
    return grpc.method_handlers_generic_handler(service_full_name, handlers)


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    tls = settings.tls
    if tls.cert_file is None:
        return None
    if tls.key_file is None:
        raise ValueError("tls.key_file is required when tls.cert_file is set")
    chain = [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())]
    if tls.client_ca_file is None:
        return grpc.ssl_server_credentials(chain)
    return grpc.ssl_server_credentials(
        chain, root_certificates=tls.client_ca_file.read_bytes(), require_client_auth=True
    )


async def start_server(
    service_full_name: str, impl: Any, settings: Settings, *, port: int | None = None
) -> tuple[grpc.aio.Server, int]:
    """Starts a server for one service; returns it and the bound port (port 0 picks a free one).
    OpenServiceError when it would listen beyond loopback without authentication."""
    mtls = settings.tls.client_ca_file is not None
    require_auth_when_exposed(settings, settings.server.host, service_full_name, client_certificates=mtls)
    limit = settings.server.max_message_bytes
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs,
    )
    gate = CallGate(service_full_name.rsplit(".", 1)[-1], settings)
    server.add_generic_rpc_handlers([generic_handler(service_full_name, impl, gate)])

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [service_full_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{settings.server.host}:{settings.server.port if port is None else port}"
    credentials = _credentials(settings)
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    for name in ("", service_full_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s listening on %s:%d", service_full_name, settings.server.host, bound)
    return server, bound


def start_metrics(settings: Settings) -> WSGIServer | None:
    """Serves Prometheus metrics on server.metrics_port (None: not at all), on the same host as the
    gRPC server, so a service kept on loopback keeps its metrics there too."""
    if not settings.server.metrics_port:
        return None
    httpd, _ = start_http_server(settings.server.metrics_port, addr=settings.server.host)
    log.info("metrics on http://%s:%d/metrics", settings.server.host, settings.server.metrics_port)
    return httpd


async def serve_forever(
    service_full_name: str, impl: Any, settings: Settings, *, port: int | None = None
) -> None:
    """Runs until SIGINT/SIGTERM, then drains in-flight calls for server.grace_seconds."""
    server, _ = await start_server(service_full_name, impl, settings, port=port)
    start_metrics(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(settings.server.grace_seconds)
