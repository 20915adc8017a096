"""Run the generation service on Ray Serve: a local Ray head (or an existing cluster), the Serve application
deployed declaratively through Serve's REST API (the same path as ``serve deploy`` and KubeRay's RayService), and
the REST reads and writes a weight swap is made of (:mod:`.controller` decides what to write).

``python -m services.generation`` starts a local head with explicit ports and CPUs, deploys, waits until the
application is RUNNING, and on SIGTERM shuts Serve and its own Ray down (never ``ray stop``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition, Unavailable
from services.generation.app import APP_IMPORT_PATH, INGRESS, SERVICER_FUNCTIONS, deployment_name
from services.generation.config import GenerationSettings

log = logging.getLogger(__name__)


def dashboard_url(s: GenerationSettings) -> str:
    return f"http://{s.dashboard_host}:{s.dashboard_port}"


def settings_args(s: GenerationSettings) -> dict[str, Any]:
    """The settings a replica needs, as JSON-safe builder args (secrets and transport-only fields left out)."""
    data = json.loads(s.model_dump_json(exclude={"auth_token", "auth_token_file", "tls_cert_file", "tls_key_file",
                                                 "tls_client_ca_file"}))
    return {k: v for k, v in data.items() if v is not None}


def initial_user_config(version: int) -> dict:
    """A model deployment's user_config before any swap (swap 0: the weights the replicas start with)."""
    return {"swap": 0, "version": version}


def serve_config(s: GenerationSettings, user_configs: dict[str, dict] | None = None) -> dict[str, Any]:
    """A Serve deploy config (``serve deploy`` schema) for the generation application: the ingress and one
    deployment per model, each with its weights in ``user_config`` (``user_configs``: model -> user_config)."""
    user_configs = user_configs or {}
    models = s.resolved_models()
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": s.host, "port": s.http_port},
        "grpc_options": {"port": s.port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
        "applications": [{
            "name": s.app_name,
            "route_prefix": "/",
            "import_path": APP_IMPORT_PATH,
            "args": settings_args(s),
            "runtime_env": {"env_vars": {"PROMETHEUS_MULTIPROC_DIR": str(Path(s.metrics_dir).resolve()),
                                         "OMP_NUM_THREADS": str(min(m.threads for m in models))}},
            "deployments": [{"name": INGRESS, "num_replicas": 1}] + [
                {"name": deployment_name(m.name), "num_replicas": m.replicas,
                 "user_config": user_configs.get(m.name) or initial_user_config(m.initial_version)}
                for m in models],
        }],
    }


def _client(s: GenerationSettings):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(dashboard_url(s))


def _app(s: GenerationSettings) -> dict:
    return (_client(s).get_serve_details().get("applications") or {}).get(s.app_name) or {}


@dataclass
class DeployedState:
    """What Serve has deployed (one REST read): each model's user_config and the last deploy time."""

    user_configs: dict[str, dict] = field(default_factory=dict)  # model -> user_config
    deployed_at: float = 0.0


def deployed_state(s: GenerationSettings) -> DeployedState:
    app = _app(s)
    deployments = {d.get("name"): dict(d.get("user_config") or {})
                   for d in ((app.get("deployed_app_config") or {}).get("deployments") or [])}
    return DeployedState({m.name: deployments.get(deployment_name(m.name), {}) for m in s.resolved_models()},
                         float(app.get("last_deployed_time_s") or 0.0))


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


def deploy(s: GenerationSettings, user_configs: dict[str, dict] | None = None, timeout: float = 600.0,
           deployed_before: float | None = None) -> None:
    """PUT the application config (model -> user_config as given; the others' as deployed) and wait for it."""
    before = _app(s).get("last_deployed_time_s") if deployed_before is None else deployed_before
    t0 = time.perf_counter()
    _client(s).deploy_applications(serve_config(s, user_configs))
    t1 = time.perf_counter()
    wait_running(s, timeout, deployed_after=float(before or 0.0))
    log.info("deploy: REST PUT %.3f s, until RUNNING %.3f s", t1 - t0, time.perf_counter() - t1)


def redeploy_user_config(s: GenerationSettings, model: str, user_config: dict, state: DeployedState) -> None:
    """Redeploy with only ``model``'s ``user_config`` changed: Serve runs ``reconfigure`` on that model's live
    replicas in place (all at once with ``rollout_fraction`` 1.0) and touches no other model; returns once the
    application is RUNNING again (every replica swapped). ``state`` is :func:`deployed_state` read beforehand."""
    configs = {**state.user_configs, model: user_config}
    deploy(s, configs, timeout=s.swap_timeout_seconds, deployed_before=state.deployed_at)


def start_local_ray(s: GenerationSettings):
    """A local Ray head with explicit CPUs and dashboard port, and Serve's proxies on the configured ports."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

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
