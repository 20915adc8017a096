"""The servicer registration functions Serve's gRPC proxy is given (``grpc_servicer_functions``).

They register the generated handlers with lenient request parsing: a body that does not parse (random bytes, a
wrong wire type, invalid UTF-8) becomes a :class:`~services.common.server.BadRequest` that reaches the ingress,
which answers INVALID_ARGUMENT naming the request — with the generated functions the proxy itself fails the call
with UNKNOWN "Unexpected DecodeError".
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2_grpc

from knowserve.generation.v1 import generation_service_pb2_grpc as pb_grpc
from services.common.server import lenient


class _LenientServer:
    """Stands in for the server while a generated ``add_*_to_server`` registers its handlers."""

    def __init__(self, server):
        self._server = server

    @staticmethod
    def _lenient(handler):
        return handler._replace(request_deserializer=lenient(handler.request_deserializer))

    def add_generic_rpc_handlers(self, handlers):
        for h in handlers:
            h._method_handlers = {name: self._lenient(m) for name, m in h._method_handlers.items()}
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name, method_handlers):
        self._server.add_registered_method_handlers(
            service_name, {name: self._lenient(m) for name, m in method_handlers.items()})

    def __getattr__(self, name):
        return getattr(self._server, name)


def add_GenerationServiceServicer_to_server(servicer, server) -> None:  # noqa: N802 - the generated name
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, _LenientServer(server))


def add_HealthServicer_to_server(servicer, server) -> None:  # noqa: N802
    health_pb2_grpc.add_HealthServicer_to_server(servicer, _LenientServer(server))
