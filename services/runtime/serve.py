"""Ray Serve glue: every ragfleet service as a Serve deployment behind Serve's gRPC proxy.

The deployment wraps the same service object and the same `CallGate` as `ragfleet serve`, so auth,
limits, metrics and the error model do not depend on the deployment mode. Clients choose the service
with the `application` metadata (the SDK sets it); inside Ray, the gateway reaches the retrievers
through the proxy too, so services still talk only through the ragfleet stubs.

`deploy/ray/serve.yaml` builds each application with `app` (args `{service: NAME}`);
`ragfleet up` calls `run_fleet`. An embedded fleet on loopback (ray.host 127.0.0.1) installs
`keep_serve_on_loopback` in every Ray worker, since Serve binds its gRPC servers to all interfaces;
a replica refuses to start open (no auth.tokens, no auth.allow_open) when Serve is not kept there.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.config import gRPCOptions

from services.catalog import SERVICES, ServiceSpec
from services.runtime.calls import CallGate, RpcMethod, rpc_methods
from services.runtime.errors import ServiceError
from services.runtime.settings import Endpoint, Settings, is_loopback, require_auth_when_exposed

log = logging.getLogger("ragfleet.serve")

# The applications `ragfleet up` deploys (all at once; see run_fleet).
FLEET = (
    "retriever-dense",
    "retriever-bm25",
    "retriever-colbert",
    "retriever-mamba",
    "retriever-seal",
    "reranker",
    "generator",
    "pipeline",
    "evaluator",
)
# Where an ingest that names no retrievers goes in the fleet: colbert (the slowest to encode), mamba
# and seal (whose models must be trained first) are deployed but index only what is sent to them by
# name (`--retrievers colbert`, `--retrievers mamba`, `--retrievers seal`).
DEFAULT_INGEST_RETRIEVERS = ["dense", "bm25"]
# Set by keep_serve_on_loopback in the Ray worker processes it ran in.
_serve_on_loopback = False


def keep_serve_on_loopback() -> None:
    """Ray's worker_process_setup_hook for an embedded fleet on loopback. Serve binds its gRPC proxy
    (grpc_util.start_grpc_server) and each replica's inter-deployment server (replica.py) to "[::]",
    every interface, and has no option for it: those binds are rewritten to 127.0.0.1. Ray itself stays
    on loopback through its node address (see `ragfleet up`)."""
    global _serve_on_loopback
    from ray.serve._private import default_impl, replica

    add_grpc_address = default_impl.add_grpc_address
    add_port_to_grpc_server = replica.add_port_to_grpc_server

    def loopback(address: str) -> str:
        return address.replace("[::]:", "127.0.0.1:", 1)

    default_impl.add_grpc_address = lambda server, address: add_grpc_address(server, loopback(address))
    replica.add_port_to_grpc_server = lambda server, address: add_port_to_grpc_server(
        server, loopback(address)
    )
    _serve_on_loopback = True


def fleet_runtime_env(settings: Settings) -> dict[str, Any]:
    """The runtime_env of the job that deploys an embedded fleet: on loopback, the setup hook that keeps
    Serve there (the Serve controller, its proxies and the replicas inherit it)."""
    if not is_loopback(settings.ray.host):
        return {}
    return {"worker_process_setup_hook": f"{__name__}.{keep_serve_on_loopback.__name__}"}


def refuse_open_replica(settings: Settings, name: str) -> None:
    """A replica's service answers through Serve's gRPC proxy, which listens on every interface unless
    the setup hook keeps Serve on loopback; there the service needs authentication (OpenServiceError)."""
    host = "127.0.0.1" if _serve_on_loopback else "[::]"
    require_auth_when_exposed(settings, host, f"{name} (behind Serve's gRPC proxy)")


def _method(method: RpcMethod) -> Any:
    if method.server_streaming:

        async def streaming(self: Any, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
            fn = getattr(self.impl, method.name)
            try:
                ctx = self.gate.context(grpc_context.invocation_metadata(), None)
                async for message in self.gate.stream(method, lambda c: fn(request, c), ctx):
                    yield message
            except ServiceError as err:
                grpc_context.set_code(err.code)
                grpc_context.set_details(err.message)
                # Serve's proxy copies the context's status only along with a message, or when the
                # method then raises: a stream that ends here would otherwise end OK.
                raise

        handler = streaming
    else:

        async def unary(self: Any, request: Any, grpc_context: Any) -> Any:
            fn = getattr(self.impl, method.name)
            try:
                ctx = self.gate.context(grpc_context.invocation_metadata(), None)
                return await self.gate.unary(method, lambda c: fn(request, c), ctx)
            except ServiceError as err:
                grpc_context.set_code(err.code)
                grpc_context.set_details(err.message)
                return method.response_cls()

        handler = unary
    handler.__name__ = method.name
    handler.__qualname__ = method.name
    return handler


def deployment_class(spec: ServiceSpec) -> type:
    """A plain class with one method per RPC, ready for `serve.deployment`."""

    def __init__(self: Any, settings: dict[str, Any]) -> None:
        logging.basicConfig(level=settings.get("log_level", "INFO"))
        self.settings = Settings.model_validate(settings)
        refuse_open_replica(self.settings, spec.name)
        self.impl = spec.build(self.settings)
        self.gate = CallGate(spec.proto_service.rsplit(".", 1)[-1], self.settings)

    namespace: dict[str, Any] = {"__init__": __init__}
    for method in rpc_methods(spec.proto_service):
        namespace[method.name] = _method(method)
    return type(spec.name.title().replace("-", ""), (), namespace)


def fleet_settings(settings: Settings) -> Settings:
    """Settings as the deployments see them: an absolute home, the gateway reaching the retrievers,
    the reranker and the generator, and the generator reaching the dense retriever, through Serve's
    gRPC proxy."""
    proxy = f"127.0.0.1:{settings.ray.grpc_port}"
    gateway = settings.gateway.model_copy(
        update={
            "retrievers": {
                name.removeprefix("retriever-"): Endpoint(address=proxy, application=name)
                for name in FLEET
                if name.startswith("retriever-")
            },
            "reranker": Endpoint(address=proxy, application="reranker"),
            "generator": Endpoint(address=proxy, application="generator"),
            "default_retrievers": settings.gateway.default_retrievers or DEFAULT_INGEST_RETRIEVERS,
        }
    )
    generator = settings.generator.model_copy(
        update={"retriever": Endpoint(address=proxy, application="retriever-dense")}
    )
    evaluator = settings.evaluator.model_copy(
        update={"pipeline": Endpoint(address=proxy, application="pipeline")}
    )
    return settings.model_copy(
        update={
            "home": settings.home.resolve(),
            "gateway": gateway,
            "generator": generator,
            "evaluator": evaluator,
        }
    )


def application(name: str, settings: Settings, *, num_cpus: float = 0.0) -> serve.Application:
    spec = SERVICES[name]
    deployment = serve.deployment(
        deployment_class(spec),
        name=spec.name,
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=64,
    )
    return deployment.bind(json.loads(settings.model_dump_json()))


def grpc_options(settings: Settings) -> gRPCOptions:
    return gRPCOptions(
        port=settings.ray.grpc_port,
        grpc_servicer_functions=sorted({SERVICES[name].servicer_function for name in FLEET}),
    )


def run_fleet(settings: Settings) -> None:
    """Starts Serve (gRPC proxy on settings.ray.grpc_port, HTTP proxy on ray.host) and deploys every
    fleet application. Assumes `ray.init` was called (with `fleet_runtime_env` for an embedded fleet)."""
    deployed = fleet_settings(settings)
    serve.start(
        http_options={"host": settings.ray.host, "port": settings.ray.http_port},
        grpc_options=grpc_options(settings),
    )
    # All at once: the gateway and the generator connect to the others on first use, not at start-up,
    # and each replica spends its start importing torch and loading models, which overlap.
    serve.run_many(
        [serve.RunTarget(application(name, deployed), name=name, route_prefix=f"/{name}") for name in FLEET]
    )
    log.info("deployed %s", ", ".join(FLEET))


def app(args: dict[str, str]) -> serve.Application:
    """Builder for `serve deploy deploy/ray/serve.yaml`: `args` {"service": NAME} names the service;
    settings come from the environment / YAML file."""
    name = args.get("service", "")
    if name not in FLEET:
        raise ValueError(f"args.service: {name!r} is not one of {', '.join(FLEET)}")
    settings = Settings()
    if os.environ.get("RAGFLEET_GATEWAY__RETRIEVERS") is None:
        settings = fleet_settings(settings)
    return application(name, settings)
