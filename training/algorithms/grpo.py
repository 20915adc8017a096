"""GRPO through the services: TRL's ``GRPOTrainer`` (trl==1.16.0) with

* ``rollout_func`` = :class:`training.services_io.ServiceRollout` — the groups are sampled by the generation
  service (its tool loop runs retrieval inside generation; the inserted documents come back with env_mask 0 and
  TRL leaves them out of the loss);
* reward functions = the reward service through :class:`services.reward.trl_adapter.KnowserveRewards`, one per
  recipe stage (:class:`StagedRewards`: the recipe total weighs 1; every component is logged with weight 0).

TRL provides everything GRPO needs (group-normalised advantages, KL to a reference with ``beta``, the grpo / dapo /
dr_grpo losses, LoRA through peft, DeepSpeed through accelerate), so there is no loss of our own.

**Rollout/trainer mismatch.** Rollout logprobs come from the generation service (another process, another batch
shape; with vLLM another kernel); the trainer recomputes them. :class:`KnowserveGRPOTrainer` measures the per-token
gap on every step (mean |Δ logprob| over the tokens the model wrote, and the min / max of the token importance
ratio exp(trainer − rollout)) and the progress record carries it. TRL's importance-sampling corrections
(``vllm_importance_sampling_correction``) apply only to its own vLLM generation path, not to a ``rollout_func``;
these runs are on-policy by construction (``sync_every`` 1: step k's rollouts come from the weights published after
step k−1, checked by the tests) and fp32 on both sides, so they use none; ``off_policy_mask_threshold`` (TRL's
off-policy sequence masking, which reads the rollout logprobs) is there for runs that publish less often.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from services.common.grading import last_answer
from services.common.text import is_refusal
from training.algorithms import SHARED, algorithm
from training.errors import ConfigError


def _check(h) -> None:
    if h.max_steps < 1:
        raise ConfigError(f"hyperparameters.max_steps must be at least 1 for GRPO, got {h.max_steps}")
    if h.group_size < 2:
        raise ConfigError(f"hyperparameters.group_size is {h.group_size}; GRPO compares completions within a group, "
                          "so it must be at least 2")
    if h.batch_size % h.group_size:
        raise ConfigError(f"hyperparameters.batch_size {h.batch_size} is not divisible by group_size "
                          f"{h.group_size}: each step trains whole groups; make batch_size a multiple of group_size")
    if h.sync_every < 1 or h.max_completion_tokens < 1:
        raise ConfigError("hyperparameters.sync_every and max_completion_tokens must be at least 1 for GRPO (its "
                          "rollouts come from the published weights)")
    if h.beta < 0:
        raise ConfigError(f"hyperparameters.beta must be >= 0 (0 disables the KL term), got {h.beta}")
    if h.temperature <= 0:
        raise ConfigError(f"hyperparameters.temperature must be > 0 for GRPO sampling, got {h.temperature}")


SPEC = algorithm(
    "grpo", description="GRPO (TRL GRPOTrainer): rollouts from generation, rewards from the reward service",
    module=__name__, dataset="qa", needs_recipe=True, publish_start=True, check=_check,
    hyperparameters=SHARED | {"beta", "group_size", "loss_type", "max_completion_tokens", "temperature",
                              "off_policy_mask_threshold"},
    defaults={"max_steps": 50, "batch_size": 32, "sync_every": 1, "learning_rate": 1e-6, "beta": 0.0,
              "group_size": 8, "loss_type": "grpo", "max_completion_tokens": 256, "temperature": 1.0})


class StagedRewards:
    """The reward functions of a (possibly multi-stage) recipe: stage k's recipe scores from its first step on.

    TRL needs one fixed list of functions: the active stage's total (weight 1), then every stage's components
    (weight 0; a component of an inactive stage returns None, which TRL leaves out of its logged mean).
    """

    def __init__(self, stages: list[tuple[int, str]], reward_target: str, step: Callable[[], int],
                 retry_seconds: float):
        from services.reward.trl_adapter import KnowserveRewards
        from training.services_io import retrying_options

        self.stages = [(start, KnowserveRewards(recipe, target=reward_target,
                                                client_options=retrying_options(retry_seconds, 600.0)))
                       for start, recipe in stages]
        self.step = step
        self.last_batch: dict[str, Any] = {}

    def active(self):
        step = self.step()
        return [a for start, a in self.stages if start <= step][-1]

    def _total(self, prompts, completions, **columns):
        adapter = self.active()
        start = time.perf_counter()
        scores = adapter.score(prompts, completions, **columns)
        seconds = time.perf_counter() - start
        texts = [c if isinstance(c, str) else "".join(m.get("content", "") for m in c) for c in completions]
        answers = [last_answer(t) for t in texts]
        comps: dict[str, list[float]] = {}
        for s in scores:
            for c in s.components:
                if c.applicable:
                    comps.setdefault(c.name, []).append(c.value)
        self.last_batch = {
            "recipe": adapter.recipe_name,
            "reward_mean": sum(s.total for s in scores) / max(1, len(scores)),
            "reward_components": {k: sum(v) / len(v) for k, v in comps.items()},
            "refusal_rate": sum(bool(a) and is_refusal(a) for a in answers) / max(1, len(answers)),
            "reward_seconds": seconds,
        }
        return [s.total for s in scores]

    def trl_reward_funcs(self) -> tuple[list[Callable], list[float]]:
        def total(prompts, completions, **columns):
            return self._total(prompts, completions, **columns)

        total.__name__ = "knowserve_total"
        funcs, weights = [total], [1.0]
        for _, adapter in self.stages:
            for name in adapter.components:
                inner = adapter.component_func(name)

                def component(prompts, completions, _a=adapter, _f=inner, **columns):
                    if self.active() is not _a:
                        return [None] * len(completions)
                    return _f(prompts, completions, **columns)

                component.__name__ = inner.__name__
                funcs.append(component)
                weights.append(0.0)
        return funcs, weights

    def close(self) -> None:
        for _, a in self.stages:
            a.close()


def logprob_gap(trainer_logps, rollout_logps, mask) -> dict[str, float]:
    """The rollout/trainer mismatch over masked tokens: mean |Δ| and the min / max token importance ratio
    exp(trainer − rollout). Shapes: each [batch, completion_len]; mask 1 where the model wrote the token.

    >>> import torch
    >>> g = logprob_gap(torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.1, -2.0, -9.0]]), torch.tensor([[1, 1, 0]]))
    >>> round(g["logprob_abs_diff_mean"], 3), round(g["importance_ratio_min"], 3), round(g["importance_ratio_max"], 3)
    (0.05, 1.0, 1.105)
    """
    import torch

    m = mask.bool() & torch.isfinite(rollout_logps) & torch.isfinite(trainer_logps)  # [batch, len]
    if not m.any():
        return {}
    diff = (trainer_logps - rollout_logps)[m]  # [tokens]
    ratio = diff.exp()
    return {"logprob_abs_diff_mean": float(diff.abs().mean()), "importance_ratio_min": float(ratio.min()),
            "importance_ratio_max": float(ratio.max())}


def mismatch_trainer(base):
    """``base`` (TRL's GRPOTrainer) measuring the rollout/trainer logprob gap on each step's first pass."""

    class KnowserveGRPOTrainer(base):
        last_gap: dict[str, float] = {}

        def _compute_loss(self, model, inputs):
            self._gap_inputs = inputs
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self._gap_inputs = None

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args,
                                               **kwargs):
            logps, entropies, *rest = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
            inputs = getattr(self, "_gap_inputs", None)
            rollout = inputs.get("sampling_per_token_logps") if inputs else None
            if rollout is not None and rollout.shape == logps.shape:
                mask = inputs["completion_mask"]
                if inputs.get("tool_mask") is not None:
                    mask = mask * inputs["tool_mask"]
                self.last_gap = logprob_gap(logps.detach().float(), rollout.float(), mask)
            return (logps, entropies, *rest)

    return KnowserveGRPOTrainer


def build(ctx):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from training.data import load_dataset
    from training.prompts import render_prompt, resolve_format
    from training.services_io import ServiceRollout

    cfg, h = ctx.cfg, ctx.h
    rows = load_dataset(cfg.dataset, limit=cfg.dataset_limit, seed=h.seed)
    fmt = resolve_format(cfg.prompt_format, cfg.model)
    dataset = Dataset.from_list([{"prompt": render_prompt(r.question, fmt, cfg.system_prompt),
                                  "gold_answers": r.gold_answers, "topic": r.topic} for r in rows])
    rollout = ServiceRollout(ctx.io, cfg.generation_target, app_name=cfg.generation_app_name,
                             model=cfg.generation_model, temperature=h.temperature, max_tokens=h.max_completion_tokens,
                             tool_protocol=cfg.effective_tool_protocol(), max_tool_turns=cfg.max_tool_turns,
                             retrieval_top_k=cfg.retrieval_top_k, retry_seconds=cfg.retry_seconds)
    holder: dict[str, Any] = {}
    rewards = StagedRewards(cfg.stage_bounds(), cfg.reward_target,
                            lambda: holder["t"].state.global_step if "t" in holder else 0, cfg.retry_seconds)
    ctx.closers += [rewards, rollout]
    funcs, weights = rewards.trl_reward_funcs()
    args = GRPOConfig(**ctx.trainer_args(), num_generations=h.group_size, max_completion_length=h.max_completion_tokens,
                      beta=h.beta, loss_type=h.loss_type, temperature=h.temperature, reward_weights=weights,
                      off_policy_mask_threshold=h.off_policy_mask_threshold)
    trainer = mismatch_trainer(GRPOTrainer)(
        model=cfg.model, reward_funcs=funcs, args=args, train_dataset=dataset, processing_class=ctx.tokenizer,
        rollout_func=rollout, peft_config=ctx.peft_config(), callbacks=[ctx.reporter])
    holder["t"] = trainer

    def extras() -> dict[str, Any]:
        batch = rewards.last_batch
        last = rollout.last
        gap = trainer.last_gap or {}
        return {"recipe": batch.get("recipe", ""), "reward_mean": batch.get("reward_mean", 0.0),
                "reward_components": batch.get("reward_components", {}),
                "refusal_rate": batch.get("refusal_rate", 0.0), "reward_seconds": batch.get("reward_seconds", 0.0),
                "rollout_weight_versions": sorted(set(last.weight_versions)),
                "tool_turns_mean": (sum(last.tool_turns) / len(last.tool_turns)) if last.tool_turns else 0.0,
                "rollout_seconds": last.seconds, **{k: v for k, v in gap.items() if math.isfinite(v)}}

    ctx.reporter.extras = extras
    return trainer
