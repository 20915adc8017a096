"""Container health check over the gRPC health protocol: exit 0 when the service reports SERVING.

    python -m services.common.healthcheck --port 50051 [--service NAME] [--application knowserve-generation]

Used by the images' HEALTHCHECK (Kubernetes uses its native ``grpc:`` probes instead). ``--application`` adds
the metadata Ray Serve's proxy routes by.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.healthcheck")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service", default="", help="health service name; empty = the whole server")
    parser.add_argument("--application", default="", help="Ray Serve application name (metadata)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    metadata = (("application", args.application),) if args.application else None
    try:
        with grpc.insecure_channel(f"{args.host}:{args.port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                              timeout=args.timeout, metadata=metadata)
    except grpc.RpcError as e:
        print(f"unhealthy: {e.code().name} {e.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
