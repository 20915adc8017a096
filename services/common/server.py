"""The asyncio gRPC server every knowserve service runs on.

One factory gives every service the same behaviour:

* standard ``grpc.health.v1.Health``: NOT_SERVING until the service calls :meth:`GrpcServer.set_ready`,
  NOT_SERVING again while draining;
* server reflection (``grpcurl list`` works);
* one interceptor that maps domain errors (:mod:`services.common.errors`) to status codes,
  applies a default deadline, checks the bearer token and records metrics;
* max message size and max concurrent calls from settings; optional TLS / mTLS;
* graceful SIGTERM drain: health goes NOT_SERVING, new calls are refused, in-flight calls finish.

Usage (see ``services/retrieval/__main__.py``)::

    server = GrpcServer(settings, [ServiceBinding("knowserve.retrieval.v1.RetrievalService", add_fn, servicer)])
    await server.start()
    ...load models...
    await server.set_ready()
    await server.wait_for_termination()
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import auth, metrics
from services.common.errors import InvalidArgument, Unauthenticated
from services.common.settings import ServiceSettings
from services.common.status import CallRecord, status_of

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"


@dataclass(frozen=True)
class ServiceBinding:
    """A generated ``add_XServicer_to_server`` function with its servicer and fully-qualified service name."""

    full_name: str
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any


class BadRequest:
    """Stands in for a request whose bytes did not parse (e.g. invalid UTF-8 in a string field); picklable, so it
    also crosses Serve's proxy to the generation ingress."""

    def __init__(self, error: Exception | str):
        self.error = f"{type(error).__name__}: {error}" if isinstance(error, Exception) else error


def lenient(deserializer):
    """Wrap a request deserializer so a parse failure reaches the handler (-> INVALID_ARGUMENT), not INTERNAL."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError / RuntimeWarning subclasses
            return BadRequest(exc)

    return parse


def repeated_elements(message, counts: dict[str, int] | None = None, prefix: str = "") -> dict[str, int]:
    """Elements of every repeated (and map) field of ``message``, nested ones included, summed per field path.

    >>> from google.protobuf.struct_pb2 import ListValue, Value
    >>> inner = Value(list_value=ListValue(values=[Value(number_value=1.0)] * 4))
    >>> repeated_elements(ListValue(values=[inner, inner, Value(string_value="x")]))
    {'values': 3, 'values.list_value.values': 8}
    """
    counts = {} if counts is None else counts
    for field, value in message.ListFields():
        if not _is_repeated(field):
            if field.message_type is not None:
                repeated_elements(value, counts, f"{prefix}{field.name}.")
            continue
        path = f"{prefix}{field.name}"
        counts[path] = counts.get(path, 0) + len(value)
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            item_type = field.message_type.fields_by_name["value"].message_type
            items = value.values() if item_type is not None else ()
        else:
            items = value
        for item in items:
            repeated_elements(item, counts, f"{path}.")
    return counts


def _is_repeated(field) -> bool:
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def check_parsed(request, max_elements: int | None = None) -> None:
    """INVALID_ARGUMENT for a request that did not parse, or whose repeated fields hold more than ``max_elements``
    elements together (checked before any handler turns them into Python objects; each service's own per-field
    limits, e.g. retrieval's ``max_documents``, apply after)."""
    if isinstance(request, BadRequest):
        raise InvalidArgument("request", f"could not be parsed (corrupt bytes, a wrong wire type or invalid UTF-8 in "
                              f"a string field): {request.error}")
    # each element takes at least one byte on the wire: a request no bigger than the limit is never walked, so
    # the walk costs nothing on the usual call and runs only for requests of more than max_elements bytes
    if max_elements is not None and request.ByteSize() > max_elements:
        counts = repeated_elements(request)
        total = sum(counts.values())
        if total > max_elements:
            largest = max(counts, key=counts.get)
            raise InvalidArgument(largest, f"the request's repeated fields hold {total} elements ({counts[largest]} "
                                           f"in {largest}), above the limit of {max_elements} "
                                           f"(setting max_request_elements)")


class _Interceptor(grpc.aio.ServerInterceptor):
    """Auth, default deadline, domain-error mapping and metrics around every handler."""

    def __init__(self, service: str, token: str | None, default_deadline: float, max_elements: int | None = None):
        self.service = service
        self.token = token
        self.default_deadline = default_deadline
        self.max_elements = max_elements

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full_method = handler_call_details.method
        method = full_method.rsplit("/", 1)[-1]
        needs_auth = self.token is not None and not full_method.startswith(HEALTH_PREFIX)
        authorized = not needs_auth or auth.authorized(
            auth.metadata_value(handler_call_details.invocation_metadata), self.token)

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, authorized),
                request_deserializer=lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, authorized),
                request_deserializer=lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler  # client-streaming methods: none in knowserve's protos

    def _admit(self, request, authorized: bool) -> None:
        """Checks every call passes before its handler runs (raised as domain errors, mapped like any other)."""
        if not authorized:
            raise Unauthenticated(auth.BEARER_HINT)
        check_parsed(request, self.max_elements)

    @staticmethod
    def _failure(context: grpc.aio.ServicerContext, exc: Exception, record: CallRecord) -> str:
        """The status message for ``exc`` (its code into ``record``; unexpected errors logged with the trace here).
        An abort already under way passes through."""
        if isinstance(exc, grpc.aio.AbortError):
            if record.code == grpc.StatusCode.OK:
                record.code = context.code() or grpc.StatusCode.UNKNOWN
            raise exc
        record.code, message = status_of(exc)
        return message

    def _record(self, method: str) -> CallRecord:
        return CallRecord(metrics.RPC_REQUESTS, metrics.RPC_DURATION, metrics.RPC_IN_FLIGHT, service=self.service,
                          method=method)

    def _wrap_unary(self, behavior, method: str, authorized: bool):
        async def wrapped(request, context: grpc.aio.ServicerContext):
            record = self._record(method)
            failure = None
            try:
                self._admit(request, authorized)
                remaining = context.time_remaining()
                async with asyncio.timeout(self.default_deadline if remaining is None else remaining):
                    return await behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - this is the one place errors are mapped
                failure = self._failure(context, exc, record)
            except asyncio.CancelledError:
                record.code = grpc.StatusCode.CANCELLED
                raise
            finally:
                record.finish()
            # aborted outside the except block: the abort does not chain the error, whose traceback holds the
            # request (a cycle only the cyclic GC would free: 20k-entry requests grew RSS by ~70 MB per 200 calls)
            await context.abort(record.code, failure)

        return wrapped

    def _wrap_stream(self, behavior, method: str, authorized: bool):
        async def wrapped(request, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            record = self._record(method)
            failure = None
            try:
                self._admit(request, authorized)
                async for item in behavior(request, context):
                    yield item
            except Exception as exc:  # noqa: BLE001
                failure = self._failure(context, exc, record)
            except (asyncio.CancelledError, GeneratorExit):
                record.code = grpc.StatusCode.CANCELLED
                raise
            finally:
                record.finish()
            if failure is not None:
                await context.abort(record.code, failure)

        return wrapped


class GrpcServer:
    """An asyncio gRPC server with health, reflection, the shared interceptor, metrics and drain."""

    def __init__(self, settings: ServiceSettings, bindings: Sequence[ServiceBinding]):
        self.settings = settings
        self.service = settings.service_name
        self.bindings = list(bindings)
        self.port: int = 0
        self.metrics_port: int | None = None
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._stopping: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        """host:port clients connect to."""
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::", "[::]") else self.settings.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Bind the port (and /metrics), register services; health stays NOT_SERVING until :meth:`set_ready`."""
        s = self.settings
        self._server = grpc.aio.server(
            interceptors=[_Interceptor(self.service, s.resolved_auth_token(), s.default_deadline_seconds,
                                       s.max_request_elements)],
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=s.max_concurrent_rpcs,
        )
        for b in self.bindings:
            b.add_to_server(b.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [b.full_name for b in self.bindings]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)
        await self._set_health(False)

        address = f"{s.host}:{s.port}"
        if s.tls_cert_file is not None:
            ca = Path(s.tls_client_ca_file).read_bytes() if s.tls_client_ca_file else None
            creds = grpc.ssl_server_credentials(
                [(Path(s.tls_key_file).read_bytes(), Path(s.tls_cert_file).read_bytes())],
                root_certificates=ca,
                require_client_auth=ca is not None,
            )
            self.port = self._server.add_secure_port(address, creds)
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}: is the port in use?")
        await self._server.start()
        if s.metrics_port is not None:
            self._metrics_http = metrics.start_metrics_server(s.host, s.metrics_port)
            self.metrics_port = self._metrics_http.server_port
        metrics.record_build_info(self.service)
        log.info(
            "listening",
            extra={"port": self.port, "metrics_port": self.metrics_port, "tls": s.tls_cert_file is not None},
        )

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *(b.full_name for b in self.bindings)]:
            await self._health.set(name, status)
        metrics.SERVING.labels(self.service).set(1 if serving else 0)

    async def set_ready(self, ready: bool = True) -> None:
        """Report SERVING (or NOT_SERVING) on the health service for every registered service."""
        await self._set_health(ready)
        log.info("serving" if ready else "not serving")

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT start a graceful drain (see :meth:`stop`)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    def request_stop(self) -> None:
        """Begin a drain from a signal handler or a test; idempotent."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self.stop())

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, wait ``shutdown_delay_seconds`` for load balancers, refuse new calls,
        let in-flight calls finish for up to ``grace`` seconds, then stop."""
        if self._server is None:
            return
        grace = self.settings.grace_seconds if grace is None else grace
        log.info("draining", extra={"grace_seconds": grace})
        await self._set_health(False)
        await self._health.enter_graceful_shutdown()
        if self.settings.shutdown_delay_seconds:
            await asyncio.sleep(self.settings.shutdown_delay_seconds)
        await self._server.stop(grace)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._stopped.set()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        """Block until the server has stopped (after a drain)."""
        await self._stopped.wait()


class ServiceApp:
    """What a service plugs into :func:`serve`: its bindings plus start-up and shut-down hooks."""

    bindings: list[ServiceBinding]

    async def startup(self) -> None:
        """Load models, open indexes, wait for dependencies. Health turns SERVING after this returns."""

    async def shutdown(self) -> None:
        """Release resources after the server stopped."""


async def serve(settings: ServiceSettings, app: ServiceApp, *, on_listening: Callable[[GrpcServer], None] | None = None) -> None:
    """Run ``app`` until SIGTERM/SIGINT: bind, start up, report SERVING, drain, shut down."""
    server = GrpcServer(settings, app.bindings)
    await server.start()
    server.install_signal_handlers()
    if on_listening is not None:
        on_listening(server)
    try:
        await app.startup()
    except Exception:
        log.exception("start-up failed; stopping")
        await server.stop(0)
        await app.shutdown()
        raise
    await server.set_ready()
    await server.wait_for_termination()
    await app.shutdown()


def run_main(settings: ServiceSettings, app_factory: Callable[[ServiceSettings], ServiceApp]) -> int:
    """Entry point body of ``python -m services.<name>``: logging, serve, exit code 0 after a clean drain."""
    from services.common.logs import configure_logging

    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    from services.common.procs import tune_allocator

    tuned = tune_allocator(settings.malloc_arena_max, settings.malloc_mmap_threshold_bytes)
    if tuned:
        log.info("malloc tuned", extra=tuned)

    async def _main() -> None:
        await serve(settings, app_factory(settings))

    asyncio.run(_main())
    return 0
