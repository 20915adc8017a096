"""Container health check over the gRPC health protocol: exit 0 when the service reports SERVING.

    python -m services.common.healthcheck --port 50051 [--service NAME] [--application knowserve-generation]
        [--auth-probe retrieval --token-file /var/run/knowserve/auth/token] [--tls-ca ca.crt --tls-cert .. --tls-key ..]

Used by the images' HEALTHCHECK (Kubernetes uses its native ``grpc:`` probes instead) and the chart's ``helm
test`` pod. ``--application`` adds the metadata Ray Serve's proxy routes by. ``--auth-probe COMPONENT`` also
proves the bearer token is enforced and accepted: the component's read-only RPC (:data:`READ_RPCS`, an empty
request) must be UNAUTHENTICATED without the token and answer with it.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import channel_credentials, read_token

# a cheap read-only RPC per component, whose request message has no required fields (empty bytes parse)
READ_RPCS: dict[str, str] = {
    "retrieval": "/knowserve.retrieval.v1.RetrievalService/GetIndexStats",
    "verification": "/knowserve.verification.v1.VerificationService/ListJudges",
    "reward": "/knowserve.reward.v1.RewardService/ListRecipes",
    "generation": "/knowserve.generation.v1.GenerationService/ListModels",
    "training": "/knowserve.training.v1.TrainingService/ListRuns",
    "answer": "/knowserve.answer.v1.AnswerService/GetLiveStats",
}


def _channel(args) -> grpc.Channel:
    target = f"{args.host}:{args.port}"
    if not args.tls_ca:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, channel_credentials(args.tls_ca, args.tls_cert, args.tls_key))


def auth_probe(channel: grpc.Channel, component: str, token: str, metadata: tuple, timeout: float) -> str | None:
    """None when ``component`` refuses a call without ``token`` (UNAUTHENTICATED) and answers it with the token;
    else what went wrong."""
    call = channel.unary_unary(READ_RPCS[component], request_serializer=None, response_deserializer=None)
    try:
        call(b"", timeout=timeout, metadata=metadata)
        return f"{component}: a call without a token was answered (auth is off)"
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            return f"{component}: a call without a token failed {e.code().name} {e.details()}, not UNAUTHENTICATED"
    try:
        call(b"", timeout=timeout, metadata=metadata + (("authorization", f"Bearer {token}"),))
    except grpc.RpcError as e:
        return f"{component}: the token was refused: {e.code().name} {e.details()}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.healthcheck")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service", default="", help="health service name; empty = the whole server")
    parser.add_argument("--application", default="", help="Ray Serve application name (metadata)")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--auth-probe", choices=sorted(READ_RPCS), help="also check the token is enforced")
    parser.add_argument("--token-file", help="bearer token for --auth-probe")
    parser.add_argument("--tls-ca", help="CA of the service's certificate (TLS); else plaintext")
    parser.add_argument("--tls-cert", help="client certificate (mTLS)")
    parser.add_argument("--tls-key", help="its key")
    args = parser.parse_args(argv)
    if args.auth_probe and not args.token_file:
        parser.error("--auth-probe needs --token-file")
    metadata = (("application", args.application),) if args.application else ()
    try:
        with _channel(args) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                              timeout=args.timeout, metadata=metadata or None)
            if reply.status == health_pb2.HealthCheckResponse.SERVING and args.auth_probe:
                problem = auth_probe(channel, args.auth_probe, read_token(args.token_file), metadata,
                                     args.timeout)
                if problem:
                    print(f"auth: {problem}", file=sys.stderr)
                    return 1
                print("auth: token enforced and accepted")
    except grpc.RpcError as e:
        print(f"unhealthy: {e.code().name} {e.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
