"""Domain errors, and the one table that maps them to a status: a canonical code (gRPC's names) and an HTTP status.

The data plane raises these; the call gate (service/gate.py) turns them into a Status once, for every wire.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


def short(text: str, limit: int = 64) -> str:
    """A client-supplied string, quoted and cut to a length fit for an error message."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


class Code(enum.Enum):
    """Canonical status codes as gRPC numbers and names them, each with the HTTP status it is answered with."""

    OK = (0, 200)
    CANCELLED = (1, 499)
    UNKNOWN = (2, 500)
    INVALID_ARGUMENT = (3, 400)
    DEADLINE_EXCEEDED = (4, 504)
    NOT_FOUND = (5, 404)
    ALREADY_EXISTS = (6, 409)
    PERMISSION_DENIED = (7, 403)
    RESOURCE_EXHAUSTED = (8, 429)
    FAILED_PRECONDITION = (9, 400)
    ABORTED = (10, 409)
    OUT_OF_RANGE = (11, 400)
    UNIMPLEMENTED = (12, 501)
    INTERNAL = (13, 500)
    UNAVAILABLE = (14, 503)
    DATA_LOSS = (15, 500)
    UNAUTHENTICATED = (16, 401)

    def __init__(self, number: int, http: int):
        self.number, self.http = number, http


class ServiceError(Exception):
    """Base class; the message is safe to show to the client."""

    http: int | None = None  # an HTTP status more precise than its code's, where HTTP has one


class InvalidArgument(ServiceError):
    """A bad request; the message names the offending field."""


class TooLarge(ServiceError):
    """A request over a size limit (HTTP 413, as gRPC answers an oversized message); the message names the limit."""

    http = 413


class NotFound(ServiceError):
    """Unknown model, version or class."""


class QueueFull(ServiceError):
    """The batcher's queue is at capacity; the client should back off and retry."""


class Unavailable(ServiceError):
    """Not ready yet, or draining for shutdown."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before it could finish."""


class FailedPrecondition(ServiceError):
    """The request is well formed, but the system's state refuses it (a model version that fails to load)."""


class Disabled(ServiceError):
    """A service this server has turned off by its settings; the message says why and what turns it on."""


CODES: dict[type[BaseException], Code] = {
    InvalidArgument: Code.INVALID_ARGUMENT,
    NotFound: Code.NOT_FOUND,
    QueueFull: Code.RESOURCE_EXHAUSTED,
    TooLarge: Code.RESOURCE_EXHAUSTED,
    Unavailable: Code.UNAVAILABLE,
    DeadlineExceeded: Code.DEADLINE_EXCEEDED,
    FailedPrecondition: Code.FAILED_PRECONDITION,
    Disabled: Code.UNIMPLEMENTED,
    NotImplementedError: Code.UNIMPLEMENTED,  # what generated servicer stubs raise for a missing method
}


@dataclass(frozen=True)
class Status:
    """How a call ended: its code, the HTTP status it is answered with, and a message safe for the client."""

    code: Code
    message: str = ""
    http: int = 0

    def __post_init__(self) -> None:
        if not self.http:
            object.__setattr__(self, "http", self.code.http)


def status_of(exc: BaseException) -> Status:
    """The one exception → status table; anything unmapped is INTERNAL with a generic message."""
    for cls in type(exc).__mro__:
        if cls in CODES:
            return Status(CODES[cls], str(exc), getattr(exc, "http", None) or 0)
    return Status(Code.INTERNAL, "internal error")
