"""Domain errors. The data plane raises these; service/interceptor.py maps them to gRPC status codes in one place."""

from __future__ import annotations


def short(text: str, limit: int = 64) -> str:
    """A client-supplied string, quoted and cut to a length fit for an error message."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


class ServiceError(Exception):
    """Base class; the message is safe to show to the client."""


def renamed(error: ServiceError, names: dict[str, str]) -> ServiceError:
    """The same error in a front end's words: a message led by a domain field (`seed_range.count: ...`) is led by
    the field the client actually sent instead, the longest prefix in `names` deciding; others stay as they are."""
    head, sep, rest = str(error).partition(":")
    for prefix in sorted(names, key=len, reverse=True):
        if head == prefix or head.startswith((prefix + ".", prefix + "[")):
            return type(error)(names[prefix] + sep + rest)
    return error


class InvalidArgument(ServiceError):
    """A bad request; the message names the offending field."""


class NotFound(ServiceError):
    """Unknown model, version or class."""


class QueueFull(ServiceError):
    """The batcher's queue is at capacity; the client should back off and retry."""


class Unavailable(ServiceError):
    """Not ready yet, or draining for shutdown."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before it could run."""


class FailedPrecondition(ServiceError):
    """The request is well formed, but the system's state refuses it (a model version that fails to load)."""
