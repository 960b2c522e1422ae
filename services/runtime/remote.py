"""Calling another ragfleet service from inside one: a channel, the metadata its endpoint needs, and
how its failures are reported to our own caller.

Services reach each other only through the generated `ragfleet` stubs. Behind Ray Serve's gRPC proxy
the `application` metadata picks the service; the caller's request id, deadline and bearer token are
forwarded on every hop.

A service that requires tokens (auth.tokens) also requires them of the retrievers it calls: a retriever
that runs open files every caller under tenant "default", so tenants would share its indexes. Before it
first uses a retriever, and again after every reconnect (a restarted retriever may run with other
settings), `Remote.check_closed` calls it without a token and expects UNAUTHENTICATED; a retriever
that answers is refused with FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio

import grpc

import ragfleet
from ragfleet.metadata import APPLICATION_KEY, RETRIEVER_KEY
from ragfleet.v1 import retriever_pb2
from services.runtime.context import CallContext
from services.runtime.errors import ServiceError, failed_precondition, unavailable
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

    def __init__(
        self, endpoint: Endpoint, stub_cls: type, retriever: str | None = None, *, require_token: bool = False
    ) -> None:
        self.endpoint = endpoint
        self.retriever = retriever
        self.channel = ragfleet.make_channel(endpoint.address, options=RECONNECT_OPTIONS, aio=True)
        self.stub = stub_cls(self.channel)
        self.require_token = require_token
        # Connections seen (bumped each time the channel leaves READY) and the one checked closed.
        self._connection = 0
        self._checked: int | None = None
        self._watcher: asyncio.Task | None = None

    async def _watch(self) -> None:
        state = self.channel.get_state()
        while True:
            await self.channel.wait_for_state_change(state)
            state = self.channel.get_state()
            if state != grpc.ChannelConnectivity.READY:
                self._connection += 1

    async def check_closed(self, timeout: float) -> None:
        """FAILED_PRECONDITION unless the retriever refuses a call without a token (when this service
        requires tokens; see the module docstring). Calls it only on a connection not yet checked."""
        if not self.require_token or self._checked == self._connection:
            return
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        connection = self._connection
        who = f"retriever {self.retriever}" if self.retriever else self.endpoint.address
        md = [(APPLICATION_KEY, self.endpoint.application)] if self.endpoint.application else []
        try:
            await self.stub.ListIndexes(retriever_pb2.ListIndexesRequest(), metadata=md, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise relay(err, who) from err
            self._checked = connection
            return
        raise failed_precondition(
            f"{who} at {self.endpoint.address} answers calls without a token while this service requires "
            "them (auth.tokens): give every service of the fleet the same auth settings"
        )

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
