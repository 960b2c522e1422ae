"""The error model: services raise ServiceError with a gRPC status code that means what it says.

Servicer code never touches a gRPC context to report errors; the server adapters (plain grpc.aio in
`runtime.server`, Ray Serve in `runtime.serve`) turn a ServiceError into the call's status, and any
other exception into INTERNAL with a request id instead of a traceback.
"""

from __future__ import annotations

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


def not_found(what: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, what)


def already_exists(what: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS, what)


def failed_precondition(what: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, what)


def resource_exhausted(what: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, what)


def unavailable(what: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, what)


def unauthenticated(what: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, what)


def deadline_exceeded(what: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, what)
