"""Settings of the answer service (env prefix ``KNOWSERVE_ANSWER_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.addresses import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, GENERATION_APP, default_target
from services.common.settings import ModelFreeServiceSettings


class AnswerSettings(ModelFreeServiceSettings):
    """Upstream services, limits and the live monitor of the answer service."""

    model_config = SettingsConfigDict(env_prefix="KNOWSERVE_ANSWER_", extra="ignore")
    service_name = "answer"

    port: int = Field(DEFAULT_PORTS["answer"], ge=0, le=65535)
    metrics_port: int | None = Field(DEFAULT_METRICS_PORTS["answer"], ge=0, le=65535)

    retrieval_target: str = Field(default_target("retrieval"))
    verification_target: str = Field(default_target("verification"))
    generation_target: str = Field(default_target("generation"))
    generation_app_name: str = Field(GENERATION_APP)
    answer_model: str = Field("", description="Served model that answers; empty: the generation default.")
    judge: str = Field("lexical", description="Verification judge of answers and live samples.")
    upstream_timeout_seconds: float = Field(120.0, gt=0)
    upstream_retries: int = Field(2, ge=0)

    max_question_bytes: int = Field(2000, ge=16)
    max_turns: int = Field(20, ge=0, description="Earlier turns of a conversation.")
    default_top_k: int = Field(4, ge=1)
    max_top_k: int = Field(10, ge=1)
    default_max_tokens: int = Field(96, ge=1)
    max_tokens_limit: int = Field(256, ge=1)
    default_support_threshold: float = Field(0.5, ge=0, le=1, description="Answers with less support abstain.")
    on_verification_unavailable: Literal["answer", "fail"] = Field(
        "answer", description="answer: return it marked verified=false (FLAGGED); fail: UNAVAILABLE (fail closed).")
    on_retrieval_unavailable: Literal["fail", "closed_book"] = Field(
        "fail", description="fail: UNAVAILABLE naming retrieval; closed_book: answer without evidence (it abstains "
        "unless the judge finds support elsewhere).")

    live_queue_size: int = Field(256, ge=1, description="Samples waiting for live verification before new ones "
                                 "are dropped (and counted).")
    live_window: int = Field(500, ge=10, description="Verified answers kept per model version for live stats.")
    live_max_series: int = Field(64, ge=1, description="(model, weight version) series the live monitor tracks at "
                                 "once; samples opening more are dropped (bounds memory and metric labels; versions "
                                 "generation no longer keeps are pruned).")
    live_prune_seconds: float = Field(30.0, gt=0, description="How often the series of versions generation no "
                                      "longer keeps are removed.")
    max_completion_bytes: int = Field(16_000, ge=16, description="ObserveGeneration completions.")
    tool_protocol: str = Field("r1_searcher", description="Search protocol of EVIDENCE_MODE_SEARCH_TOOL.")
    max_tool_turns: int = Field(2, ge=1, description="Searches of one EVIDENCE_MODE_SEARCH_TOOL answer.")
    verify_timeout_seconds: float = Field(60.0, gt=0, description="How long Answer waits for its verdicts.")

    @field_validator("tool_protocol")
    @classmethod
    def _protocol(cls, v: str) -> str:
        from services.common.tools import check

        return check(v, "KNOWSERVE_ANSWER_TOOL_PROTOCOL", allow_empty=False)
