"""Typed configuration of a GRPO run (``knowserve train CONFIG.yaml`` and the training service's StartRun).

A run names a training recipe (``training/recipes/<name>.yaml``: reward recipe per stage, tool protocol, system
prompt, default hyperparameters), a dataset (:mod:`training.data`), a model folder, and the services it uses.
Everything is checked before any compute; errors name the field and the fix.

>>> cfg = RunConfig(recipe="knowrl", dataset="halueval_qa", model=".", hyperparameters={"group_size": 4})
>>> h = cfg.resolved_hyperparameters(); h.group_size, h.batch_size, h.learning_rate
(4, 32, 1e-06)
>>> RunConfig(recipe="knowrl", dataset="halueval_qa", model=".", hyperparameters={"group_size": 3, "batch_size": 8}).check()
Traceback (most recent call last):
...
training.config.ConfigError: hyperparameters.batch_size 8 is not divisible by group_size 3: each step trains whole groups; make batch_size a multiple of group_size
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.common import tools
from services.common.addresses import GENERATION_APP, default_target

ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class ConfigError(ValueError):
    """A run configuration that cannot run; the message names the field and the fix."""


class Hyperparameters(BaseModel):
    """GRPO hyperparameters; ``None`` takes the recipe's default."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float | None = None
    max_steps: int | None = None
    group_size: int | None = None
    batch_size: int | None = None
    beta: float | None = None
    loss_type: Literal["grpo", "dapo", "dr_grpo"] | None = None
    sync_every: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    use_lora: bool | None = None
    lora_rank: int | None = None
    seed: int | None = None


class Resolved(BaseModel):
    learning_rate: float
    max_steps: int
    group_size: int
    batch_size: int
    beta: float
    loss_type: str
    sync_every: int
    max_completion_tokens: int
    temperature: float
    use_lora: bool
    lora_rank: int
    seed: int


class Stage(BaseModel):
    reward_recipe: str
    fraction: float = Field(gt=0, le=1)


class TrainingRecipe(BaseModel):
    name: str
    description: str = ""
    tool_protocol: str = ""

    @field_validator("tool_protocol")
    @classmethod
    def _known_protocol(cls, v: str) -> str:
        return tools.check(v)
    stages: list[Stage]
    system_prompt: str = ""
    defaults: dict = Field(default_factory=dict)


@cache
def recipes() -> dict[str, TrainingRecipe]:
    out = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        r = TrainingRecipe(**yaml.safe_load(path.read_text()))
        out[r.name] = r
    return out


class RunConfig(BaseModel):
    """One GRPO run. YAML keys are these field names."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field("", description="Run identifier; empty: <recipe>-<timestamp>.")
    recipe: str = Field(..., description="Training recipe: knowrl, r1_searcher, search_r1.")
    dataset: str = Field(..., description="Dataset name (training.data.DATASETS), demo_world[:pool:split], or .jsonl.")
    dataset_limit: int = Field(0, ge=0, description="Use a seeded sample of this many rows; 0: all.")
    model: str = Field(..., description="HF model folder the run starts from (and publishes to generation).")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    tool_protocol: str = Field("default", description="Override the recipe's tool protocol ('' for none; a name "
                               "of services.common.tools.TOOL_PROTOCOLS); 'default' keeps it.")
    max_tool_turns: int = Field(0, ge=0, description="Tool turns per rollout; 0: the generation service default.")
    retrieval_top_k: int = Field(0, ge=0, description="Documents per query; 0: the generation service default.")
    @field_validator("tool_protocol")
    @classmethod
    def _known_protocol(cls, v: str) -> str:
        return v if v == "default" else tools.check(v)

    prompt_format: Literal["auto", "chat", "demo"] = Field(
        "auto", description="chat: system+user messages (chat template); demo: the demo model's text prompt.")
    generation_target: str = default_target("generation")
    generation_app_name: str = GENERATION_APP
    generation_model: str = Field("", description="The served model rollouts come from and weights are published "
                                  "to (knowserve models); empty: the generation service's default model.")
    reward_target: str = default_target("reward")
    publish: bool = Field(True, description="Publish weights to generation every sync_every steps.")
    checkpoint_root: str = Field(".knowserve/checkpoints", description="The generation service's allowed "
                                 "checkpoint root (KNOWSERVE_GENERATION_CHECKPOINT_ROOT); weights are published there.")
    runs_dir: str = Field(".knowserve/runs", description="Where runs keep state, trainer checkpoints and progress.")
    checkpoint_every: int = Field(5, ge=1, description="Save a resumable trainer checkpoint every this many steps.")
    retry_seconds: float = Field(600.0, gt=0, description="How long service calls retry UNAVAILABLE before the "
                                 "step fails (a restarted service is waited for).")
    threads: int = Field(1, ge=1, description="torch threads of the trainer process.")
    deepspeed: str = Field("", description="DeepSpeed JSON config for multi-GPU ZeRO; empty: plain torch.")

    def recipe_spec(self) -> TrainingRecipe:
        known = recipes()
        if self.recipe not in known:
            raise ConfigError(f"recipe {self.recipe!r} is unknown; use one of {sorted(known)} "
                              f"(training/recipes/*.yaml)")
        return known[self.recipe]

    def resolved_hyperparameters(self) -> Resolved:
        base = {"max_steps": 50, "use_lora": False, "lora_rank": 16, "seed": 0, **self.recipe_spec().defaults}
        given = self.hyperparameters.model_dump(exclude_none=True)
        return Resolved(**{**base, **given})

    def effective_tool_protocol(self) -> str:
        return self.recipe_spec().tool_protocol if self.tool_protocol == "default" else self.tool_protocol

    def stage_bounds(self) -> list[tuple[int, str]]:
        """(first step, reward recipe) of each stage; stage lengths are the fractions of max_steps.

        >>> RunConfig(recipe="r1_searcher", dataset="x.jsonl", model=".", hyperparameters={"max_steps": 10}).stage_bounds()
        [(0, 'r1_searcher_stage1'), (5, 'r1_searcher_stage2')]
        """
        steps, start, out = self.resolved_hyperparameters().max_steps, 0.0, []
        for s in self.recipe_spec().stages:
            out.append((int(round(start * steps)), s.reward_recipe))
            start += s.fraction
        return out

    def check(self) -> "RunConfig":
        """Reject what cannot run, before any compute (the dataset rows are checked when they are loaded)."""
        self.recipe_spec()
        h = self.resolved_hyperparameters()
        if h.group_size < 2:
            raise ConfigError(f"hyperparameters.group_size is {h.group_size}; GRPO compares completions within a "
                              "group, so it must be at least 2")
        if h.batch_size % h.group_size:
            raise ConfigError(f"hyperparameters.batch_size {h.batch_size} is not divisible by group_size "
                              f"{h.group_size}: each step trains whole groups; make batch_size a multiple of "
                              "group_size")
        for name in ("max_steps", "sync_every", "max_completion_tokens", "lora_rank"):
            if getattr(h, name) < 1:
                raise ConfigError(f"hyperparameters.{name} must be at least 1, got {getattr(h, name)}")
        if h.learning_rate <= 0:
            raise ConfigError(f"hyperparameters.learning_rate must be positive, got {h.learning_rate}")
        if h.beta < 0:
            raise ConfigError(f"hyperparameters.beta must be >= 0 (0 disables the KL term), got {h.beta}")
        if h.temperature <= 0:
            raise ConfigError(f"hyperparameters.temperature must be > 0 for GRPO sampling, got {h.temperature}")
        if self.run_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", self.run_id):
            raise ConfigError(f"run_id {self.run_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if not self.model:
            raise ConfigError("model is empty; give an HF model folder (make demo builds .knowserve/models/demo-world)")
        if not (Path(self.model) / "config.json").is_file():
            raise ConfigError(f"model {self.model} is not an HF model folder (no config.json); fix the path")
        from training.data import DATASETS

        base = self.dataset.partition(":")[0]
        if base not in DATASETS and not self.dataset.endswith(".jsonl"):
            raise ConfigError(f"dataset {self.dataset!r} is unknown; use one of {DATASETS}, "
                              "demo_world:<pool>:<split>, or a path to a .jsonl file")
        if self.dataset.endswith(".jsonl") and not Path(self.dataset).is_file():
            raise ConfigError(f"dataset file {self.dataset} does not exist")
        if h.use_lora:
            if importlib.util.find_spec("peft") is None:
                raise ConfigError("hyperparameters.use_lora needs the peft package: pip install 'knowserve[train]'")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            raise ConfigError(f"deepspeed config {self.deepspeed} does not exist")
        if self.deepspeed:
            if importlib.util.find_spec("deepspeed") is None:
                raise ConfigError("deepspeed is set but the deepspeed package is missing: pip install "
                                  "'knowserve[gpu]' on GPU nodes (or unset deepspeed for plain torch)")
        return self

    @classmethod
    def from_yaml(cls, path: Path) -> "RunConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of run settings")
        return cls(**data)
