"""Calling another ragfleet service from inside one: a channel, the metadata its endpoint needs, and
how its failures are reported to our own caller.

Services reach each other only through the generated `ragfleet` stubs. Behind Ray Serve's gRPC proxy
the `application` metadata picks the service; the caller's request id, deadline and bearer token are
forwarded on every hop.
"""

from __future__ import annotations

import grpc

import ragfleet
from ragfleet.metadata import APPLICATION_KEY, RETRIEVER_KEY
from services.runtime.context import CallContext
from services.runtime.errors import ServiceError, unavailable
from services.runtime.settings import Endpoint

# A service that restarts is reconnected to within ~0.25 s: gRPC's default reconnect backoff (1 s, x1.6
# per attempt, up to 2 min) kept calls failing UNAVAILABLE for seconds after the peer was back.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
)


class Remote:
    """A channel to one service plus the metadata its endpoint needs (the Serve application).

    Make it on the event loop that serves calls: a grpc.aio channel belongs to one loop.
    """

    def __init__(self, endpoint: Endpoint, stub_cls: type, retriever: str | None = None) -> None:
        self.endpoint = endpoint
        self.retriever = retriever
        self.stub = stub_cls(ragfleet.make_channel(endpoint.address, options=RECONNECT_OPTIONS, aio=True))

    def metadata(self, ctx: CallContext) -> list[tuple[str, str]]:
        md = ctx.outgoing_metadata()
        if self.retriever:
            md.append((RETRIEVER_KEY, self.retriever))
        if self.endpoint.application:
            md.append((APPLICATION_KEY, self.endpoint.application))
        return md


# The status grpc.aio gives a call itself when sending a message fails in its core: the connection
# broke (the peer died) before the peer's own status arrived (grpc/grpc#34148).
_LOCAL_SEND_FAILURE = "Internal error from Core"


def relay(err: grpc.aio.AioRpcError, who: str) -> ServiceError:
    """A downstream failure keeps its status code; the message says which service answered. A peer
    that vanished is UNAVAILABLE, even when grpc.aio noticed it while sending."""
    code = err.code()
    if code == grpc.StatusCode.INTERNAL and err.details() == _LOCAL_SEND_FAILURE:
        return unavailable(f"{who}: the connection broke while sending to it ({_LOCAL_SEND_FAILURE})")
    if code == grpc.StatusCode.UNKNOWN:
        code = grpc.StatusCode.INTERNAL
    return ServiceError(code, f"{who}: {err.details()}")
