"""Run the generation service on Ray Serve: a local Ray head (or an existing cluster), the Serve application
deployed declaratively through Serve's REST API (the same path as ``serve deploy`` and KubeRay's RayService),
and weight swaps as config redeploys that change only ``user_config``.

``python -m services.generation`` starts a local head with explicit ports and CPUs, deploys, waits until the
application is RUNNING, and on SIGTERM shuts Serve and its own Ray down (never ``ray stop``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition, Unavailable
from services.generation.config import GenerationSettings
from services.generation.server import APP_IMPORT_PATH, SERVICER_FUNCTIONS

DEPLOYMENT = "GenerationDeployment"
log = logging.getLogger(__name__)


def dashboard_url(s: GenerationSettings) -> str:
    return f"http://{s.dashboard_host}:{s.dashboard_port}"


def settings_args(s: GenerationSettings) -> dict[str, Any]:
    """The settings a replica needs, as JSON-safe builder args (secrets and transport-only fields left out)."""
    data = json.loads(s.model_dump_json(exclude={"auth_token", "auth_token_file", "tls_cert_file", "tls_key_file",
                                                 "tls_client_ca_file"}))
    return {k: v for k, v in data.items() if v is not None}


def serve_config(s: GenerationSettings, user_config: dict | None = None) -> dict[str, Any]:
    """A Serve deploy config (``serve deploy`` schema) for the generation application."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": s.host, "port": s.http_port},
        "grpc_options": {"port": s.port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
        "applications": [{
            "name": s.app_name,
            "route_prefix": f"/{s.app_name}",
            "import_path": APP_IMPORT_PATH,
            "args": settings_args(s),
            "runtime_env": {"env_vars": {"PROMETHEUS_MULTIPROC_DIR": str(Path(s.metrics_dir).resolve()),
                                         "OMP_NUM_THREADS": str(s.threads_per_replica)}},
            "deployments": [{"name": DEPLOYMENT, "num_replicas": s.replicas,
                             "user_config": user_config or {"version": s.initial_version}}],
        }],
    }


def _client(s: GenerationSettings):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(dashboard_url(s))


def _app(s: GenerationSettings) -> dict:
    return (_client(s).get_serve_details().get("applications") or {}).get(s.app_name) or {}


def wait_running(s: GenerationSettings, timeout: float, deployed_after: float = 0.0) -> None:
    """Wait until the application runs a config deployed after ``deployed_after`` (Serve's
    ``last_deployed_time_s``) with every deployment HEALTHY, i.e. every replica has applied it."""
    deadline = time.monotonic() + timeout
    status, deployments = "?", {}
    while time.monotonic() < deadline:
        app = _app(s)
        status = app.get("status", "NOT_DEPLOYED")
        deployments = {n: d.get("status") for n, d in (app.get("deployments") or {}).items()}
        fresh = float(app.get("last_deployed_time_s") or 0.0) > deployed_after
        if fresh and status == "RUNNING" and deployments and all(v == "HEALTHY" for v in deployments.values()):
            return
        if fresh and status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise FailedPrecondition(f"Serve application {s.app_name} is {status}: {deployments}")
        time.sleep(0.05)  # each poll is a REST read the dashboard answers on the same cores
    raise Unavailable(f"Serve application {s.app_name} not RUNNING after {timeout:.0f}s (status {status}, "
                      f"deployments {deployments})")


def deploy(s: GenerationSettings, user_config: dict | None = None, timeout: float = 600.0,
           deployed_before: float | None = None) -> None:
    before = float(_app(s).get("last_deployed_time_s") or 0.0) if deployed_before is None else deployed_before
    t0 = time.perf_counter()
    _client(s).deploy_applications(serve_config(s, user_config))
    t1 = time.perf_counter()
    wait_running(s, timeout, deployed_after=before)
    log.info("deploy: REST PUT %.3f s, until RUNNING %.3f s", t1 - t0, time.perf_counter() - t1)


def current_user_config(s: GenerationSettings, app: dict | None = None) -> dict:
    deployed = ((app if app is not None else _app(s)).get("deployed_app_config") or {})
    for d in deployed.get("deployments") or []:
        if d.get("name") == DEPLOYMENT:
            return dict(d.get("user_config") or {})
    return {}


def deployed_state(s: GenerationSettings) -> tuple[int, float]:
    """(deployed weight version, Serve's last deploy time) from one REST read."""
    app = _app(s)
    return int(current_user_config(s, app).get("version", 0)), float(app.get("last_deployed_time_s") or 0.0)


def redeploy_weights(s: GenerationSettings, checkpoint_uri: str, version: int,
                     deployed: tuple[int, float] | None = None) -> None:
    """Redeploy with only ``user_config`` changed: Serve runs ``reconfigure`` on every live replica in place
    (all at once with ``rollout_fraction`` 1.0); returns once the application is RUNNING again (every replica
    swapped). ``deployed`` is :func:`deployed_state` read beforehand (UpdateWeights reads it while it vets the
    checkpoint); ``vetted`` tells the replicas the checkpoint already passed the smoke generation."""
    deployed_version, deployed_at = deployed if deployed is not None else deployed_state(s)
    if deployed_version >= version:
        raise FailedPrecondition(f"version {version} is not newer than the deployed version {deployed_version}; "
                                 "versions are monotonic")
    deploy(s, {"checkpoint_uri": checkpoint_uri, "version": version, "vetted": True},
           timeout=s.swap_timeout_seconds, deployed_before=deployed_at)


def start_local_ray(s: GenerationSettings):
    """A local Ray head with explicit CPUs and dashboard port, and Serve's proxies on the configured ports."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions, HTTPOptions

    ray.init(address=s.ray_address or None, num_cpus=None if s.ray_address else s.ray_num_cpus,
             include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=s.dashboard_port,
             configure_logging=False, log_to_driver=False)
    serve.start(http_options=HTTPOptions(host=s.host, port=s.http_port),
                grpc_options=gRPCOptions(port=s.port, grpc_servicer_functions=SERVICER_FUNCTIONS))


def serve_merged_metrics(host: str, port: int, metrics_dir: Path):
    """/metrics merging every replica's multiprocess files (plus this process's build info)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


def main() -> int:
    import signal
    import threading

    import ray
    from ray import serve

    from services.common.logs import configure_logging

    s = GenerationSettings()
    configure_logging("generation", s.log_level, s.log_json)
    metrics_dir = Path(s.metrics_dir).resolve()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    if s.metrics_port is not None:
        serve_merged_metrics(s.host, s.metrics_port, metrics_dir)
    start_local_ray(s)
    deploy(s)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
