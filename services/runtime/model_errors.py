"""The errors model code raises (indexes, encoders, decoders): plain Python, no gRPC.

Model code does not know who called it, so it cannot know what a failure means to a client. The service
that calls it decides: a `ParamError` for a field the client sent becomes INVALID_ARGUMENT naming that
field, an `ArtifactError` FAILED_PRECONDITION (the model or index on disk must be fixed first), and
anything else, a `ParamError` about a value the service computed itself included, is a server fault:
INTERNAL, logged.
"""

from __future__ import annotations


class ParamError(ValueError):
    """An argument out of range; `field` names it (e.g. "top_p"), `problem` says what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ArtifactError(ValueError):
    """A saved model or index that is missing, unreadable or inconsistent."""
