"""The generation service's Serve application: one deployment per named model behind one ingress.

Why one deployment per model, not ``@serve.multiplexed``: a served model here has its own replicas and resources
(a 135M chat model on CPU beside a 1M-parameter demo model; a GPU model beside a CPU one), its own weight versions
in its own ``user_config`` — so a swap or rollback reconfigures that model's replicas and never touches another —
and its own autoscaling. Multiplexing is made for many small models sharing one pool of replicas, loaded on demand
and evicted by LRU; a model being trained and hot-swapped, or a judge that must always be warm, is not that.

The **ingress** (:class:`services.generation.server.GenerationIngress`) takes every gRPC call from Serve's gRPC
proxy (routed by the ``application`` metadata) and the OpenAI-compatible HTTP routes from Serve's HTTP proxy, and
forwards to the named model's deployment handle; swaps and rollbacks go through :mod:`.controller`.
"""

from __future__ import annotations

from typing import Any

APP_IMPORT_PATH = "services.generation.app:app_builder"
INGRESS = "GenerationIngress"
# Serve's gRPC proxy registers these; ours parse requests leniently so a corrupt body reaches the ingress, which
# answers INVALID_ARGUMENT (the generated ones make the proxy answer UNKNOWN "Unexpected DecodeError")
SERVICER_FUNCTIONS = [
    "services.generation.grpc_handlers.add_GenerationServiceServicer_to_server",
    "services.generation.grpc_handlers.add_HealthServicer_to_server",
]


def deployment_name(model: str) -> str:
    """The Serve deployment of a model.

    >>> deployment_name("demo-world")
    'model-demo-world'
    """
    return f"model-{model}"


def app_builder(args: dict[str, Any]):
    """Serve application builder (``import_path: services.generation.app:app_builder``); ``args`` are
    GenerationSettings fields."""
    from ray import serve

    from services.generation.config import GenerationSettings
    from services.generation.replica import ModelReplica
    from services.generation.server import ingress_class

    s = GenerationSettings(**args)
    models = {}
    for m in s.resolved_models():
        deployment = serve.deployment(
            ModelReplica, name=deployment_name(m.name), num_replicas=m.replicas,
            ray_actor_options={"num_cpus": m.replica_num_cpus, "num_gpus": m.replica_num_gpus},
            max_ongoing_requests=64, rolling_update_percentage=s.rollout_fraction)
        models[m.name] = deployment.bind(args, m.name)
    ingress = serve.deployment(ingress_class(s.openai_api), name=INGRESS, num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
    return ingress.bind(args, models)
