"""Send request bytes to a running service's RPCs through a generic gRPC channel and tally the status codes.

The channel sends the bytes as they are (no serializer), so a request the stubs could never build still reaches
the server; streaming RPCs are read to the end.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from google.protobuf.descriptor import MethodDescriptor

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}


def methods(service: str) -> list[MethodDescriptor]:
    """Every RPC of a knowserve service, from its generated descriptor."""
    module = importlib.import_module(f"knowserve.{service}.v1.{service}_service_pb2")
    return [m for s in module.DESCRIPTOR.services_by_name.values() for m in s.methods]


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


@dataclass
class Tally:
    """Status codes per RPC and the requests that got a forbidden one (kind, first bytes, details)."""

    codes: dict[str, Counter] = field(default_factory=dict)
    bad: list[tuple[str, str, bytes, str]] = field(default_factory=list)

    def add(self, rpc: str, kind: str, payload: bytes, code: grpc.StatusCode, details: str) -> None:
        self.codes.setdefault(rpc, Counter())[code.name] += 1
        if code in FORBIDDEN:
            self.bad.append((rpc, kind, payload[:80], details[:300]))

    def sent(self, rpc: str) -> int:
        return sum(self.codes.get(rpc, Counter()).values())

    def ok(self, rpc: str) -> int:
        return self.codes.get(rpc, Counter())["OK"]


def call(channel: grpc.Channel, method: MethodDescriptor, payload: bytes, metadata: tuple,
         timeout: float) -> tuple[grpc.StatusCode, str]:
    """(status code, details) of one call with raw request bytes."""
    try:
        if method.server_streaming:
            for _ in channel.unary_stream(path(method))(payload, timeout=timeout, metadata=metadata):
                pass
        else:
            channel.unary_unary(path(method))(payload, timeout=timeout, metadata=metadata)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20),
                                                 ("grpc.max_receive_message_length", 64 << 20)])


def send(target: str, method: MethodDescriptor, payloads: Iterable[tuple[str, bytes]], tally: Tally,
         metadata: tuple = (), timeout: float = 30.0, workers: int = 8,
         check: Callable[[str, bytes, grpc.StatusCode], None] | None = None) -> None:
    """Send every payload; ``check(kind, payload, code)`` after each (then one at a time, for write checks)."""
    rpc = path(method)
    with channel(target) as ch:
        if check is not None:
            for kind, payload in payloads:
                code, details = call(ch, method, payload, metadata, timeout)
                tally.add(rpc, kind, payload, code, details)
                check(kind, payload, code)
            return
        items = list(payloads)
        with ThreadPoolExecutor(workers) as pool:
            results = pool.map(lambda kp: call(ch, method, kp[1], metadata, timeout), items)
            for (kind, payload), (code, details) in zip(items, results):
                tally.add(rpc, kind, payload, code, details)



