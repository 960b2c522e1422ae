"""The per-call context a service method receives, the same under grpc.aio and under Ray Serve."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ragfleet.metadata import AUTHORIZATION_KEY, DEADLINE_KEY, REQUEST_ID_KEY


@dataclass
class CallContext:
    tenant: str = "default"
    request_id: str = ""
    # time.time() at which the caller stops waiting; None when it sent no deadline.
    deadline: float | None = None
    # The caller's bearer token, forwarded to the services this call fans out to.
    authorization: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def timeout(self, default: float) -> float:
        """Seconds a downstream call may take: what is left of the deadline, else `default`."""
        remaining = self.time_remaining()
        return default if remaining is None else max(remaining, 0.001)

    def outgoing_metadata(self) -> list[tuple[str, str]]:
        """Metadata for calls this one makes to other services."""
        md = [(REQUEST_ID_KEY, self.request_id)]
        if self.deadline is not None:
            md.append((DEADLINE_KEY, f"{self.deadline:.6f}"))
        if self.authorization:
            md.append((AUTHORIZATION_KEY, self.authorization))
        return md
