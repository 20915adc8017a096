"""Async gRPC clients for knowserve services: deadlines on every call, retry with backoff on UNAVAILABLE only,
and wait-for-healthy with an error that says which service is missing and how to start it.

>>> # inside a coroutine
>>> # client = ServiceClient("retrieval", "127.0.0.1:50051", RetrievalServiceStub)
>>> # await client.wait_healthy(timeout=30)
>>> # response = await client.call("Search", SearchRequest(queries=["Ada Lovelace"]))
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import channel_credentials, default_client_tls, default_client_token
from services.common.errors import DeadlineExceeded, KnowserveError, Unavailable

log = logging.getLogger(__name__)
StubT = TypeVar("StubT")



class RemoteError(KnowserveError):
    """An upstream service answered with an error; keeps its status code so callers can pass it on."""

    def __init__(self, service: str, code: grpc.StatusCode, details: str):
        super().__init__(f"{service}: {details}")
        self.code = code
        self.service = service
        self.details = details

    def __reduce__(self):
        return type(self), (self.service, self.code, self.details)


@dataclass
class ClientOptions:
    """How a client talks to a service."""

    timeout_seconds: float = 30.0  #: deadline of each call attempt
    retries: int = 4  #: extra attempts on UNAVAILABLE
    backoff_initial_seconds: float = 0.1
    backoff_max_seconds: float = 3.0
    token: str | None = None  #: bearer token sent as 'authorization' metadata
    tls_ca_file: Path | None = None  #: CA that signed the server certificate; enables TLS
    tls_cert_file: Path | None = None  #: client certificate for mTLS
    tls_key_file: Path | None = None  #: client key for mTLS
    plaintext: bool = False  #: no TLS even where $KNOWSERVE_TLS_CA_FILE is set (a service's explicit choice)
    max_message_bytes: int = 16 * 1024 * 1024
    extra_metadata: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def start_hint(service: str) -> str:
    """How to start a missing service."""
    return f"start it with `knowserve up` (or `python -m services.{service}`) and check `knowserve status`"


class ServiceClient(Generic[StubT]):
    """One channel to one service with retrying, deadline-bounded calls."""

    def __init__(self, service: str, target: str, stub_factory: Callable[[grpc.aio.Channel], StubT],
                 options: ClientOptions | None = None):
        self.service = service
        self.target = target
        self.options = options or ClientOptions()
        o = self.options
        channel_options = [
            ("grpc.max_receive_message_length", o.max_message_bytes),
            ("grpc.max_send_message_length", o.max_message_bytes),
            # reconnect quickly after a restart; the call-level retry does the backing off
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        tls = (o.tls_ca_file, o.tls_cert_file, o.tls_key_file) if o.tls_ca_file is not None else (
            None if o.plaintext else default_client_tls(service))  # the CLI's --tls-ca / the local stack's --tls
        if tls is not None:
            self.channel = grpc.aio.secure_channel(target, channel_credentials(*tls), options=channel_options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=channel_options)
        self.stub: StubT = stub_factory(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        token = o.token if o.token is not None else default_client_token()  # the CLI's --token-file
        self._metadata = tuple(o.extra_metadata) + ((("authorization", f"Bearer {token}"),) if token else ())

    async def call(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """Call unary ``method``; retries UNAVAILABLE with jittered exponential backoff, never other codes.

        Raises :class:`Unavailable` when the service stays unreachable, :class:`DeadlineExceeded`
        on a deadline, :class:`RemoteError` (with the upstream code) for any other error.
        """
        fn = getattr(self.stub, method)
        o = self.options
        timeout = o.timeout_seconds if timeout is None else timeout
        delay = o.backoff_initial_seconds
        for attempt in range(o.retries + 1):
            try:
                return await fn(request, timeout=timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt < o.retries:
                    log.warning("retrying", extra={"service": self.service, "method": method, "attempt": attempt + 1})
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, o.backoff_max_seconds)
                    continue
                raise self._translate(method, err) from None
        raise AssertionError("unreachable")

    async def stream(self, method: str, request: Any, *, timeout: float | None = None) -> AsyncIterator[Any]:
        """Iterate a server-streaming ``method`` (no retry: a stream cannot be replayed safely)."""
        call = getattr(self.stub, method)(request, timeout=timeout, metadata=self._metadata)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as err:
            raise self._translate(method, err) from None

    def _translate(self, method: str, err: grpc.aio.AioRpcError) -> KnowserveError:
        code = err.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"{self.service} at {self.target} is unavailable ({err.details()}); {start_hint(self.service)}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"{self.service}.{method} at {self.target} exceeded its deadline")
        return RemoteError(self.service, code, err.details() or code.name)

    async def check_health(self, timeout: float = 2.0) -> str:
        """The overall health status name ("SERVING", "NOT_SERVING", ...), or "UNREACHABLE"."""
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout,
                                             metadata=self._metadata)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"

    async def wait_healthy(self, timeout: float = 60.0) -> None:
        """Wait until the service reports SERVING, for at most ``timeout`` seconds in total."""
        deadline = time.monotonic() + timeout
        status = "UNREACHABLE"
        while time.monotonic() < deadline:
            status = await self.check_health(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            if status == "SERVING":
                return
            await asyncio.sleep(0.1)
        raise Unavailable(
            f"{self.service} at {self.target} is not SERVING after {timeout:.0f}s (last status {status}); "
            f"{start_hint(self.service)}"
        )

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "ServiceClient[StubT]":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
