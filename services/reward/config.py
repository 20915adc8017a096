"""Settings of the reward service (env prefix ``KNOWSERVE_REWARD_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ModelFreeServiceSettings
from services.common.text import END_MARKERS
from services.common.addresses import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, GENERATION_APP, default_target


class RewardSettings(ModelFreeServiceSettings):
    """Recipes, upstream verification and limits of the reward service."""

    model_config = SettingsConfigDict(env_prefix="KNOWSERVE_REWARD_", extra="ignore")
    service_name = "reward"

    port: int = Field(DEFAULT_PORTS["reward"], ge=0, le=65535)
    metrics_port: int | None = Field(DEFAULT_METRICS_PORTS["reward"], ge=0, le=65535)

    recipes_dir: Path | None = Field(
        None, description="Extra recipe YAML files (one recipe each); they may not reuse a built-in name."
    )
    verification_target: str = Field(default_target("verification"),
                                     description="host:port of the verification service.")
    verification_timeout_seconds: float = Field(120.0, gt=0)
    verification_retries: int = Field(4, ge=0)
    factuality_judge: str = Field("", description="Verification judge for factuality; empty = its default.")
    on_verification_unavailable: Literal["fail", "not_applicable"] = Field(
        "fail", description="fail: the Score call fails with UNAVAILABLE; not_applicable: factuality is skipped."
    )
    generation_target: str = Field(default_target("generation"), description="Generation service for grader: llm; "
                                   "empty "
                                   "disables it.")
    generation_app_name: str = Field(GENERATION_APP)
    generation_model: str = Field("", description="Served model the LLM grader asks (knowserve models); empty: the "
                                  "generation service's default model.")
    generation_timeout_seconds: float = Field(300.0, gt=0)
    generation_retries: int = Field(4, ge=0, description="Retries on UNAVAILABLE of generation calls.")
    end_markers: list[str] = Field(
        default_factory=lambda: list(END_MARKERS), description="End-of-sequence markers: a completion is cut at the "
        "first one before scoring (raw model output scores like the service's text). JSON list.")
    max_items: int = Field(1024, ge=1, description="Items per Score call.")
    max_completion_bytes: int = Field(65_536, ge=64)
    max_prompt_bytes: int = Field(65_536, ge=64)
    max_gold_answers: int = Field(64, ge=1)
    max_gold_answer_bytes: int = Field(4096, ge=1)
    max_components: int = Field(16, ge=1, description="Components in a user-defined recipe.")
