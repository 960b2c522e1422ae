"""Exceptions the ragfleet SDK raises: one class per gRPC status code that ragfleet services use.

Every `grpc.RpcError` a call ends with is converted by `from_rpc_error` and raised `from` the
original error, so `except ragfleet.errors.NotFound:` works without touching gRPC. Errors the SDK
finds before sending anything (a malformed JSONL line, say) are raised as `InvalidArgument` too.
"""

from __future__ import annotations

from typing import Any

import grpc

from ragfleet.metadata import REQUEST_ID_KEY


class RagfleetError(Exception):
    """A failed ragfleet call: `.code` (grpc.StatusCode), `.details` and the call's `.request_id`.

    A subclass names its status code in its class line (`class NotFound(RagfleetError,
    code=grpc.StatusCode.NOT_FOUND)`), which also registers it for `error_class`.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init_subclass__(cls, *, code: grpc.StatusCode, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.code = code
        _BY_CODE[code] = cls

    def __init__(
        self, details: str, *, code: grpc.StatusCode | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(details)
        if code is not None:
            self.code = code
        self.details = details
        self.request_id = request_id

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.details}"
        return f"{text} (request id {self.request_id})" if self.request_id else text


_BY_CODE: dict[grpc.StatusCode, type[RagfleetError]] = {}


class InvalidArgument(RagfleetError, code=grpc.StatusCode.INVALID_ARGUMENT): ...


class NotFound(RagfleetError, code=grpc.StatusCode.NOT_FOUND): ...


class AlreadyExists(RagfleetError, code=grpc.StatusCode.ALREADY_EXISTS): ...


class FailedPrecondition(RagfleetError, code=grpc.StatusCode.FAILED_PRECONDITION): ...


class ResourceExhausted(RagfleetError, code=grpc.StatusCode.RESOURCE_EXHAUSTED): ...


class DeadlineExceeded(RagfleetError, code=grpc.StatusCode.DEADLINE_EXCEEDED): ...


class Unavailable(RagfleetError, code=grpc.StatusCode.UNAVAILABLE): ...


class Unauthenticated(RagfleetError, code=grpc.StatusCode.UNAUTHENTICATED): ...


class PermissionDenied(RagfleetError, code=grpc.StatusCode.PERMISSION_DENIED): ...


class Cancelled(RagfleetError, code=grpc.StatusCode.CANCELLED): ...


# INTERNAL, and the fallback for every code without a class of its own (`.code` keeps the real one).
class Internal(RagfleetError, code=grpc.StatusCode.INTERNAL): ...


def error_class(code: grpc.StatusCode) -> type[RagfleetError]:
    """The exception class for a status code (`Internal` when it has none of its own)."""
    return _BY_CODE.get(code, Internal)


def from_rpc_error(err: grpc.RpcError, *, request_id: str | None = None) -> RagfleetError:
    """Converts a failed gRPC call into the matching RagfleetError.

    The request id is the one the server sent back in its trailing metadata, else `request_id`
    (the id the SDK sent with the call).
    """
    code = status_code(err)
    details = _call_value(err, "details") or code.name
    for key, value in _call_value(err, "trailing_metadata") or ():
        if key == REQUEST_ID_KEY and value:
            request_id = value
    return error_class(code)(details, code=code, request_id=request_id)


def status_code(err: grpc.RpcError) -> grpc.StatusCode:
    """The status code a failed call ended with (UNKNOWN when the error carries none)."""
    return _call_value(err, "code") or grpc.StatusCode.UNKNOWN


def _call_value(err: grpc.RpcError, name: str) -> Any:
    """err.<name>(): a plain `grpc.RpcError()` is not a grpc.Call and has none of these methods."""
    method = getattr(err, name, None)
    return method() if callable(method) else None
