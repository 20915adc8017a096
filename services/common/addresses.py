"""Service names, default ports and the generation service's Serve application name: defined once, imported by
every settings class, client, CLI default, benchmark and test that needs them.

>>> default_target("reward"), DEFAULT_METRICS_PORTS["generation"]
('127.0.0.1:50053', 9104)
"""

from __future__ import annotations

SERVICES: tuple[str, ...] = ("retrieval", "verification", "reward", "generation", "training", "answer")
DEFAULT_PORTS: dict[str, int] = dict(zip(SERVICES, range(50051, 50057)))
DEFAULT_METRICS_PORTS: dict[str, int] = dict(zip(SERVICES, range(9101, 9107)))
GENERATION_APP = "knowserve-generation"  # Serve application of the generation service (gRPC metadata `application`)
LOCAL_HOST = "127.0.0.1"


def default_target(service: str) -> str:
    """host:port of a service on the local stack."""
    return f"{LOCAL_HOST}:{DEFAULT_PORTS[service]}"
