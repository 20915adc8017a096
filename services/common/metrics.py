"""Prometheus metrics of the shared runtime, and the /metrics HTTP endpoint.

All metrics live in the default registry with a ``service`` label, so several services can
share one process (tests) without name clashes. Names follow Prometheus conventions:
``knowserve_`` prefix, base units, ``_total`` on counters.
"""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

RPC_REQUESTS = Counter(
    "knowserve_rpc_requests",  # exposed as knowserve_rpc_requests_total
    "gRPC calls handled, by service, method and status code.",
    ["service", "method", "code"],
)
RPC_DURATION = Histogram(
    "knowserve_rpc_duration_seconds",
    "Wall time of gRPC calls from receipt to the last response byte.",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
RPC_IN_FLIGHT = Gauge("knowserve_rpc_in_flight", "gRPC calls being handled now.", ["service"])
SERVING = Gauge("knowserve_serving", "1 while the service reports SERVING on its health check, else 0.", ["service"])
BUILD_INFO = Gauge("knowserve_build_info", "Build information; always 1.", ["service", "version", "python_version"])


def package_version() -> str:
    """Installed knowserve version, or "dev" when running from a source tree without install."""
    try:
        return metadata.version("knowserve")
    except metadata.PackageNotFoundError:
        return "dev"


def record_build_info(service: str) -> None:
    """Set ``knowserve_build_info{service=...}`` to 1."""
    BUILD_INFO.labels(service=service, version=package_version(), python_version=platform.python_version()).set(1)


def start_metrics_server(host: str, port: int):
    """Serve /metrics over HTTP; returns the WSGI server (``.server_port`` is the bound port)."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server
