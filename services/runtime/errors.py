"""The error model: services raise ServiceError with a gRPC status code that means what it says.

Servicer code never touches a gRPC context to report errors; the server adapters (plain grpc.aio in
`runtime.server`, Ray Serve in `runtime.serve`) turn a ServiceError into the call's status, and any
other exception into INTERNAL with a request id instead of a traceback.
"""

from __future__ import annotations

from functools import partial

import grpc


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __reduce__(self) -> tuple[type[ServiceError], tuple[grpc.StatusCode, str]]:
        # Ray Serve pickles a replica's exception to its proxy; the default would call cls(message).
        return ServiceError, (self.code, self.message)


def invalid_argument(field: str, problem: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


# The other codes take only a message: `not_found("index 'x' does not exist")`.
not_found = partial(ServiceError, grpc.StatusCode.NOT_FOUND)
already_exists = partial(ServiceError, grpc.StatusCode.ALREADY_EXISTS)
failed_precondition = partial(ServiceError, grpc.StatusCode.FAILED_PRECONDITION)
unavailable = partial(ServiceError, grpc.StatusCode.UNAVAILABLE)
resource_exhausted = partial(ServiceError, grpc.StatusCode.RESOURCE_EXHAUSTED)
unauthenticated = partial(ServiceError, grpc.StatusCode.UNAUTHENTICATED)
deadline_exceeded = partial(ServiceError, grpc.StatusCode.DEADLINE_EXCEEDED)
