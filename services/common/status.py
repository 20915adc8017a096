"""The one mapping from errors to gRPC status codes, and the one per-call record (count, time, in flight).

The shared interceptor (:mod:`services.common.server`) and the generation deployment behind Serve's gRPC proxy
(which has no interceptor) both use :func:`status_of` and :class:`CallRecord`, so a domain error means the same
status everywhere and every call is counted and timed the same way.

>>> from services.common.errors import InvalidArgument, NotFound
>>> status_of(InvalidArgument("top_k", "must be between 1 and 100, got 0"))
(<StatusCode.INVALID_ARGUMENT: (3, 'invalid argument')>, 'top_k: must be between 1 and 100, got 0')
>>> status_of(NotFound("run 'x' does not exist"))[0].name
'NOT_FOUND'
"""

from __future__ import annotations

import logging
import time

import grpc

from services.common import errors as e

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the service log has the details"

CODES: dict[type[e.KnowserveError], grpc.StatusCode] = {
    e.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    e.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    e.Unavailable: grpc.StatusCode.UNAVAILABLE,
    e.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    e.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


def code_of(exc: e.KnowserveError) -> grpc.StatusCode:
    """The status of a domain error: its class's (or a base class's), an upstream error's own code (a
    :class:`services.common.clients.RemoteError` carries the status the other service answered), else INTERNAL."""
    upstream = getattr(exc, "code", None)
    if isinstance(upstream, grpc.StatusCode):
        return upstream
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def unwrap(exc: BaseException) -> BaseException:
    """The error a remote call raised: Ray Serve re-raises a replica's exception as ``RayTaskError(<its class>)``,
    whose message is the remote traceback; its ``cause`` is the original."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) and type(exc).__name__.startswith("RayTaskError") else exc


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for ``exc``; unknown errors are logged with their trace and
    answered INTERNAL with a generic message."""
    exc = unwrap(exc)
    if isinstance(exc, e.KnowserveError):
        code = code_of(exc)
        log.info("rpc failed", extra={"code": code.name, "detail": str(exc)})
        return code, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the work finished"
    log.error("unhandled error in rpc", exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


class CallRecord:
    """One call into a (requests counter, duration histogram[, in-flight gauge]) triple: in flight while it runs,
    then counted by its final status code and timed. ``labels`` are the metrics' labels other than ``code``."""

    def __init__(self, requests, duration, in_flight=None, **labels: str):
        self.requests, self.duration, self.in_flight, self.labels = requests, duration, in_flight, labels
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()
        if in_flight is not None:
            in_flight.labels(*self._values(in_flight)).inc()

    def _values(self, metric) -> list[str]:
        return [self.labels[name] for name in metric._labelnames if name != "code"]

    def finish(self) -> None:
        if self.in_flight is not None:
            self.in_flight.labels(*self._values(self.in_flight)).dec()
        self.requests.labels(**self.labels, code=self.code.name).inc()
        self.duration.labels(*self._values(self.duration)).observe(time.perf_counter() - self.start)

    def __enter__(self) -> "CallRecord":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.finish()
        return False
