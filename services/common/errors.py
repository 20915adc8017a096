"""Domain errors raised by service cores. They know no transport: the gRPC status each one becomes is decided in
one place, :mod:`services.common.status` (the interceptor and the Serve deployment use it), as KServe's errors
know nothing of gRPC. Anything else becomes INTERNAL with a generic message.

>>> err = InvalidArgument("top_k", "must be between 1 and 100, got 0")
>>> str(err), err.field
('top_k: must be between 1 and 100, got 0', 'top_k')
>>> import pickle; again = pickle.loads(pickle.dumps(err)); (type(again).__name__, again.field)
('InvalidArgument', 'top_k')
"""

from __future__ import annotations


class KnowserveError(Exception):
    """Base of all domain errors (a bare one is an internal error whose message may be shown)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        """Picklable with its own constructor arguments (errors cross process boundaries: Ray Serve handles)."""
        return type(self), (self.message,)


class InvalidArgument(KnowserveError):
    """Bad input. The message names the offending field (``items[3].completion``) and the limit."""


    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self):
        return type(self), (self.field, self.problem)


class NotFound(KnowserveError):
    """A named thing (run, recipe, document) does not exist."""



class AlreadyExists(KnowserveError):
    """Creating something whose id is taken."""



class FailedPrecondition(KnowserveError):
    """The request is valid but the system is not in a state to do it (e.g. a checkpoint that fails to load)."""



class Unavailable(KnowserveError):
    """The service or one it depends on cannot answer now; the message names the cause. Retrying may help."""



class ResourceExhausted(KnowserveError):
    """A capacity limit (queue, batch, memory) is reached."""



class DeadlineExceeded(KnowserveError):
    """The request's deadline passed before the work finished."""



class Unauthenticated(KnowserveError):
    """Missing or wrong bearer token."""



def check_text(field: str, value: str, *, max_bytes: int, allow_empty: bool = False) -> str:
    """Validate a user string: not blank (unless allowed), at most ``max_bytes`` of UTF-8, no lone surrogates.

    protobuf already rejects invalid UTF-8 on the wire; strings built in-process may still hold
    lone surrogates, which cannot be stored or indexed.

    >>> check_text("query", "who wrote Hamlet?", max_bytes=100)
    'who wrote Hamlet?'
    >>> check_text("query", "  ", max_bytes=100)
    Traceback (most recent call last):
    ...
    services.common.errors.InvalidArgument: query: must not be empty or whitespace
    """
    if not allow_empty and not value.strip():
        raise InvalidArgument(field, "must not be empty or whitespace")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(field, "is not valid UTF-8") from None
    if size > max_bytes:
        raise InvalidArgument(field, f"is {size} bytes, above the limit of {max_bytes} bytes")
    return value


def check_range(field: str, value: float, *, low: float, high: float) -> None:
    """Reject ``value`` outside ``[low, high]`` with a message naming the field and the bounds.

    >>> check_range("top_k", 5, low=1, high=100)
    >>> check_range("top_k", 500, low=1, high=100)
    Traceback (most recent call last):
    ...
    services.common.errors.InvalidArgument: top_k: must be between 1 and 100, got 500
    """
    if not (low <= value <= high):
        raise InvalidArgument(field, f"must be between {low} and {high}, got {value}")


def invalid_from_validation(e, prefix: str = "") -> InvalidArgument:
    """INVALID_ARGUMENT naming the first field a pydantic ValidationError ``e`` names (under ``prefix``)."""
    err = e.errors()[0]
    field = ".".join(str(x) for x in err["loc"])
    return InvalidArgument(f"{prefix}{field}" if field else (prefix.rstrip(".") or "request"), err["msg"])
