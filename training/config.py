"""Typed configuration of a training run (``knowserve train CONFIG.yaml`` and the training service's StartRun).

A run names an **algorithm** (``grpo``, ``sft``, ``dpo``: :mod:`training.algorithms`), a dataset, a model folder
and the services it uses; GRPO also names a training recipe (``training/recipes/<name>.yaml``: reward recipe per
stage, tool protocol, system prompt, default hyperparameters). Hyperparameters are one flat mapping; each
algorithm takes the ones it declares (a hyperparameter another algorithm uses is refused, naming the algorithm).
Everything is checked before any compute; errors name the field and the fix.

>>> cfg = RunConfig(recipe="knowrl", dataset="halueval_qa", model=".", hyperparameters={"group_size": 4})
>>> h = cfg.resolved_hyperparameters(); h.group_size, h.batch_size, h.learning_rate
(4, 32, 1e-06)
>>> RunConfig(recipe="knowrl", dataset="halueval_qa", model=".",
...           hyperparameters={"group_size": 3, "batch_size": 8}).check()
Traceback (most recent call last):
...
training.errors.ConfigError: hyperparameters.batch_size 8 is not divisible by group_size 3: each step trains whole groups; make batch_size a multiple of group_size
>>> RunConfig(algorithm="sft", dataset="x.jsonl", model=".", hyperparameters={"group_size": 4}).check()
Traceback (most recent call last):
...
training.errors.ConfigError: hyperparameters.group_size is not a hyperparameter of algorithm 'sft'; it takes ['batch_size', 'completion_only_loss', 'learning_rate', 'lora_rank', 'max_length', 'max_steps', 'num_epochs', 'seed', 'sync_every', 'use_lora']
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.common import tools
from services.common.addresses import GENERATION_APP, default_target
from training.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"

__all__ = ["ConfigError", "Hyperparameters", "Resolved", "RunConfig", "TrainingRecipe", "recipes"]



RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a run's folder name under the runs dir: no paths


def check_run_id(run_id: str) -> str:
    """``run_id`` when it is a safe folder name, else a ConfigError naming the rule.

    >>> check_run_id("knowrl-20261207")
    'knowrl-20261207'
    >>> check_run_id("../etc")
    Traceback (most recent call last):
    ...
    training.errors.ConfigError: run_id '../etc' must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)
    """
    if not RUN_ID.fullmatch(run_id):
        shown = run_id if len(run_id) <= 80 else run_id[:80] + "..."
        raise ConfigError(f"run_id {shown!r} must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter "
                          "or digit)")
    return run_id

class Hyperparameters(BaseModel):
    """Hyperparameters of every algorithm (each takes its own; :mod:`training.algorithms`); ``None`` takes the
    algorithm's (and, for GRPO, the recipe's) default."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    sync_every: int | None = None  # publish to generation every N steps (0: only at the end)
    use_lora: bool | None = None
    lora_rank: int | None = None
    seed: int | None = None
    beta: float | None = None  # GRPO: KL to the reference; DPO: the preference temperature
    # GRPO
    group_size: int | None = None
    loss_type: Literal["grpo", "dapo", "dr_grpo"] | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    off_policy_mask_threshold: float | None = None
    # SFT / DPO
    num_epochs: float | None = None
    max_length: int | None = None
    completion_only_loss: bool | None = None
    dpo_loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] | None = None


class Resolved(BaseModel):
    """Every hyperparameter decided (the algorithm uses its own)."""

    learning_rate: float
    max_steps: int
    batch_size: int
    sync_every: int
    use_lora: bool
    lora_rank: int
    seed: int
    beta: float
    group_size: int = 0
    loss_type: str = "grpo"
    max_completion_tokens: int = 0
    temperature: float = 1.0
    off_policy_mask_threshold: float | None = None
    num_epochs: float = 1.0
    max_length: int = 512
    completion_only_loss: bool = True
    dpo_loss_type: str = "sigmoid"


class Stage(BaseModel):
    reward_recipe: str
    fraction: float = Field(gt=0, le=1)


class TrainingRecipe(BaseModel):
    name: str
    description: str = ""
    tool_protocol: str = ""
    stages: list[Stage]
    system_prompt: str = ""
    defaults: dict = Field(default_factory=dict)

    @field_validator("tool_protocol")
    @classmethod
    def _known_protocol(cls, v: str) -> str:
        return tools.check(v)


@cache
def recipes() -> dict[str, TrainingRecipe]:
    out = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        r = TrainingRecipe(**yaml.safe_load(path.read_text()))
        out[r.name] = r
    return out


def check_causal_lm(folder: str | Path, field: str = "model") -> None:
    """Refuse a folder that is not a Hugging Face causal language model, naming the fix."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise ConfigError(f"{field} {folder} is not an HF model folder (no config.json); fix the path")
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except ValueError:
        raise ConfigError(f"{field} {folder}: config.json is not valid JSON; the folder is damaged") from None
    if not any(a.endswith("ForCausalLM") for a in architectures):
        raise ConfigError(f"{field} {folder} is a {architectures or 'model without architectures'}, not a causal "
                          "language model (…ForCausalLM); train a causal LM folder")


class PublishGate(BaseModel):
    """The hallucination gate of a run's publishes (generation's ``HallucinationGate``; zero: its defaults)."""

    model_config = ConfigDict(extra="forbid")

    min_answers: int = Field(0, ge=0, description="Verified live answers needed per version.")
    margin: float | None = Field(None, ge=0, le=1, description="How much worse a version may be.")
    alpha: float = Field(0.0, ge=0, lt=1, description="Significance level of the test.")
    window_seconds: float = Field(0.0, ge=0, description="Seconds a gate waits for its answers.")


class RunConfig(BaseModel):
    """One training run. YAML keys are these field names."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field("", description="Run identifier; empty: <recipe or algorithm>-<timestamp>.")
    algorithm: str = Field("grpo", description="Training algorithm: grpo, sft, dpo (training/algorithms).")
    recipe: str = Field("", description="GRPO's training recipe: knowrl, r1_searcher, search_r1 (required for grpo).")
    dataset: str = Field(..., description="GRPO: a QA dataset name (training.data.DATASETS), demo_world[:pool:split] "
                         "or .jsonl; SFT / DPO: a .jsonl of prompt/completion or prompt/chosen/rejected rows "
                         "(`knowserve data` builds them).")
    dataset_limit: int = Field(0, ge=0, description="Use a seeded sample of this many rows; 0: all.")
    model: str = Field(..., description="HF model folder the run starts from (and publishes to generation).")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    tool_protocol: str = Field("default", description="Override the recipe's tool protocol ('' for none; a name "
                               "of services.common.tools.TOOL_PROTOCOLS); 'default' keeps it.")
    max_tool_turns: int = Field(0, ge=0, description="Tool turns per rollout; 0: the generation service default.")
    retrieval_top_k: int = Field(0, ge=0, description="Documents per query; 0: the generation service default.")
    prompt_format: Literal["auto", "chat", "demo"] = Field(
        "auto", description="chat: system+user messages (chat template); demo: the demo model's text prompt.")
    generation_target: str = default_target("generation")
    generation_app_name: str = GENERATION_APP
    generation_model: str = Field("", description="The served model rollouts come from and weights are published "
                                  "to (knowserve models); empty: the generation service's default model.")
    reward_target: str = default_target("reward")
    publish: bool = Field(True, description="Publish weights to generation every sync_every steps.")
    publish_gate: PublishGate | None = Field(None, description="Publish with a hallucination gate: generation rolls "
                                             "a version back by itself when its live hallucination rate is worse "
                                             "than the previous version's; decisions show in the progress events.")
    checkpoint_root: str = Field(".knowserve/checkpoints", description="The generation service's allowed "
                                 "checkpoint root (KNOWSERVE_GENERATION_CHECKPOINT_ROOT); weights are published there.")
    runs_dir: str = Field(".knowserve/runs", description="Where runs keep state, trainer checkpoints and progress.")
    checkpoint_every: int = Field(5, ge=1, description="Save a resumable trainer checkpoint every this many steps.")
    retry_seconds: float = Field(600.0, gt=0, description="How long service calls retry UNAVAILABLE before the "
                                 "step fails (a restarted service is waited for).")
    threads: int = Field(1, ge=1, description="torch threads of the trainer process.")
    deepspeed: str = Field("", description="DeepSpeed JSON config for multi-GPU ZeRO; empty: plain torch.")

    @field_validator("tool_protocol")
    @classmethod
    def _known_protocol(cls, v: str) -> str:
        return v if v == "default" else tools.check(v)

    def algorithm_spec(self):
        from training.algorithms import ALGORITHMS

        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm {self.algorithm!r} is unknown; use one of {sorted(ALGORITHMS)}")
        return ALGORITHMS[self.algorithm]

    def recipe_spec(self) -> TrainingRecipe | None:
        """GRPO's training recipe (None for an algorithm without one)."""
        if not self.recipe and not self.algorithm_spec().needs_recipe:
            return None
        known = recipes()
        if self.recipe not in known:
            raise ConfigError(f"recipe {self.recipe!r} is unknown; use one of {sorted(known)} "
                              f"(training/recipes/*.yaml)")
        return known[self.recipe]

    @property
    def system_prompt(self) -> str:
        recipe = self.recipe_spec()
        return recipe.system_prompt if recipe else ""

    def resolved_hyperparameters(self) -> Resolved:
        spec = self.algorithm_spec()
        given = self.hyperparameters.model_dump(exclude_none=True)
        foreign = sorted(set(given) - spec.hyperparameters)
        if foreign:
            raise ConfigError(f"hyperparameters.{foreign[0]} is not a hyperparameter of algorithm {self.algorithm!r}; "
                              f"it takes {sorted(spec.hyperparameters)}")
        recipe = self.recipe_spec()
        base = {"use_lora": False, "lora_rank": 16, "seed": 0, **spec.defaults,
                **(recipe.defaults if recipe else {})}
        return Resolved(**{**base, **given})

    def total_steps(self) -> int:
        """Optimizer steps of the run: ``max_steps``, or (SFT / DPO with max_steps 0) ``num_epochs`` passes over
        the dataset file in batches of ``batch_size``."""
        import math

        h = self.resolved_hyperparameters()
        if h.max_steps or self.algorithm_spec().dataset == "qa":
            return h.max_steps
        try:
            with open(self.dataset) as f:
                rows = sum(1 for line in f if line.strip())
        except OSError:
            raise ConfigError(f"dataset file {self.dataset} cannot be read; build it with `knowserve data`") from None
        rows = min(rows, self.dataset_limit) if self.dataset_limit else rows
        return max(1, math.ceil(h.num_epochs * rows / h.batch_size))

    def effective_tool_protocol(self) -> str:
        recipe = self.recipe_spec()
        return (recipe.tool_protocol if recipe else "") if self.tool_protocol == "default" else self.tool_protocol

    def stage_bounds(self) -> list[tuple[int, str]]:
        """(first step, reward recipe) of each stage; stage lengths are the fractions of max_steps.

        >>> RunConfig(recipe="r1_searcher", dataset="x.jsonl", model=".",
        ...           hyperparameters={"max_steps": 10}).stage_bounds()
        [(0, 'r1_searcher_stage1'), (5, 'r1_searcher_stage2')]
        """
        steps, start, out = self.resolved_hyperparameters().max_steps, 0.0, []
        for s in self.recipe_spec().stages:
            out.append((int(round(start * steps)), s.reward_recipe))
            start += s.fraction
        return out

    def check(self) -> "RunConfig":
        """Reject what cannot run, before any compute (the dataset rows are checked when they are loaded)."""
        spec = self.algorithm_spec()
        self.recipe_spec()
        h = self.resolved_hyperparameters()
        for name in ("lora_rank", "batch_size"):
            if getattr(h, name) < 1:
                raise ConfigError(f"hyperparameters.{name} must be at least 1, got {getattr(h, name)}")
        if h.max_steps < 0:
            raise ConfigError(f"hyperparameters.max_steps must be >= 0, got {h.max_steps}")
        if h.sync_every < 0:
            raise ConfigError(f"hyperparameters.sync_every must be >= 0 (0: publish only at the end), got "
                              f"{h.sync_every}")
        if h.learning_rate <= 0:
            raise ConfigError(f"hyperparameters.learning_rate must be positive, got {h.learning_rate}")
        spec.check(h)
        if self.run_id:
            check_run_id(self.run_id)
        if not self.model:
            raise ConfigError("model is empty; give an HF model folder (make demo builds .knowserve/models/demo-world)")
        check_causal_lm(self.model)
        if spec.dataset == "qa":
            from training.data import DATASETS

            base = self.dataset.partition(":")[0]
            if base not in DATASETS and not self.dataset.endswith(".jsonl"):
                raise ConfigError(f"dataset {self.dataset!r} is unknown; use one of {DATASETS}, "
                                  "demo_world:<pool>:<split>, or a path to a .jsonl file")
        elif not self.dataset.endswith(".jsonl"):
            raise ConfigError(f"dataset {self.dataset!r}: algorithm {self.algorithm!r} trains on a .jsonl of "
                              f"{spec.dataset} rows; build one with `knowserve data`")
        if self.dataset.endswith(".jsonl") and not Path(self.dataset).is_file():
            raise ConfigError(f"dataset file {self.dataset} does not exist; build it with `knowserve data` or fix "
                              "the path")
        if h.use_lora and importlib.util.find_spec("peft") is None:
            raise ConfigError("hyperparameters.use_lora needs the peft package: pip install 'knowserve[train]'")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            raise ConfigError(f"deepspeed config {self.deepspeed} does not exist")
        if self.deepspeed and importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("deepspeed is set but the deepspeed package is missing: pip install "
                              "'knowserve[gpu]' on GPU nodes (or unset deepspeed for plain torch)")
        return self

    @classmethod
    def from_yaml(cls, path: Path) -> "RunConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of run settings")
        return cls(**data)
