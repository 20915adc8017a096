"""GRPO through the services: TRL's ``GRPOTrainer`` (pinned, trl==1.16.0) with

* ``rollout_func`` = :class:`training.services_io.ServiceRollout` — the groups are sampled by the generation
  service (its tool loop runs retrieval inside generation; the inserted documents come back with env_mask 0 and
  TRL leaves them out of the loss);
* reward functions = the reward service through :class:`services.reward.trl_adapter.KnowserveRewards`, one per
  recipe stage (the recipe total weighs 1; every component is logged with weight 0);
* a callback that publishes the policy into generation every ``sync_every`` steps (``UpdateWeights``; a failed
  swap is reported and training continues), writes one progress record per step, saves resumable trainer
  checkpoints, and stops cleanly on request.

TRL provides everything GRPO needs here (group-normalised advantages, KL to a reference with ``beta``, the
grpo / dapo / dr_grpo losses, LoRA through peft, DeepSpeed through accelerate), so there is no loss of our own.

A run lives in ``<runs_dir>/<run_id>/``: ``config.yaml``, ``state.json``, ``progress.jsonl``, ``trainer/``
(TRL checkpoints for resume). Published weights go to ``<checkpoint_root>/<run_id>/step-N``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from services.common.grading import last_answer
from services.common.text import is_refusal
from training.config import ConfigError, RunConfig
from training.prompts import render_prompt, resolve_format
from training.services_io import BackgroundLoop, ServiceRollout, WeightPublisher, retrying_options

log = logging.getLogger("knowserve.training")

PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass
class RunState:
    """``state.json`` of a run: what GetRun / ListRuns report."""

    run_id: str
    state: str = PENDING
    step: int = 0
    max_steps: int = 0
    weight_version: int = 0
    error: str = ""
    pid: int = 0
    create_time: str = field(default_factory=now)
    update_time: str = field(default_factory=now)
    checkpoint_dir: str = ""


class RunDir:
    """Files of one run (see the module docstring); writes are atomic (tmp + rename)."""

    def __init__(self, root: Path):
        self.root = root

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def progress_path(self) -> Path:
        return self.root / "progress.jsonl"

    @property
    def trainer_dir(self) -> Path:
        return self.root / "trainer"

    @property
    def stop_path(self) -> Path:
        return self.root / "STOP"

    def write_config(self, cfg: RunConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic(self.config_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    def config(self) -> RunConfig:
        return RunConfig(**yaml.safe_load(self.config_path.read_text()))

    def state(self) -> RunState:
        return RunState(**json.loads(self.state_path.read_text()))

    def write_state(self, st: RunState) -> None:
        st.update_time = now()
        _atomic(self.state_path, json.dumps(asdict(st), indent=1))

    def progress(self) -> list[dict]:
        if not self.progress_path.exists():
            return []
        return [json.loads(line) for line in self.progress_path.read_text().splitlines() if line.strip()]

    def append_progress(self, record: dict) -> None:
        with open(self.progress_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_progress(self, last_step: int) -> None:
        """Drop records of steps after ``last_step`` (steps redone after a resume are not counted twice)."""
        kept = [r for r in self.progress() if r.get("step", 0) <= last_step]
        _atomic(self.progress_path, "".join(json.dumps(r) + "\n" for r in kept))

    def last_checkpoint(self) -> Path | None:
        found = sorted(self.trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        return found[-1] if found else None


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class StagedRewards:
    """The reward functions of a (possibly multi-stage) recipe: stage k's recipe scores from its first step on.

    TRL needs one fixed list of functions: the active stage's total (weight 1), then every stage's components
    (weight 0; a component of an inactive stage returns None, which TRL leaves out of its logged mean).
    """

    def __init__(self, stages: list[tuple[int, str]], reward_target: str, step: Callable[[], int],
                 retry_seconds: float):
        from services.reward.trl_adapter import KnowserveRewards

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


class Control:
    """Stop requests: SIGTERM / SIGINT, or a STOP file in the run folder (StopRun writes it)."""

    def __init__(self, run: RunDir):
        self.run = run
        self.reason = ""

    def install_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.request("signal"))

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    @property
    def requested(self) -> bool:
        if not self.reason and self.run.stop_path.exists():
            self.reason = "StopRun"
        return bool(self.reason)


def make_callback(run: RunDir, st: RunState, cfg: RunConfig, publisher: WeightPublisher | None,
                  rewards: StagedRewards, rollout: ServiceRollout, control: Control,
                  on_progress: Callable[[dict], None] | None):
    from transformers import TrainerCallback

    h = cfg.resolved_hyperparameters()

    class KnowserveCallback(TrainerCallback):
        def __init__(self):
            self.on_progress = on_progress
            self.step_start = time.perf_counter()
            self.pending_message = ""
            self.kl = 0.0

        def on_train_begin(self, args, state, control_, model=None, processing_class=None, **kw):
            if publisher is not None:
                # rollouts must come from the policy being trained: publish it first unless it is already serving
                info = publisher.serving()
                current = getattr(model, "name_or_path", "")
                if info.checkpoint_uri and Path(info.checkpoint_uri).resolve() == Path(current).resolve():
                    st.weight_version = int(info.weight_version)
                else:
                    result = publisher.publish(model, processing_class, state.global_step)
                    if not result.ok:
                        raise RuntimeError(f"could not publish the starting policy to generation: {result.error}")
                    st.weight_version = result.version
                    self.pending_message = f"weights v{result.version} published (starting policy)"
            run.write_state(st)

        def on_step_begin(self, args, state, control_, **kw):
            self.step_start = time.perf_counter()

        def on_log(self, args, state, control_, logs=None, **kw):
            if logs and "kl" in logs:
                self.kl = float(logs["kl"])

        def on_step_end(self, args, state, control_, model=None, processing_class=None, **kw):
            messages = [self.pending_message] if self.pending_message else []
            publishes = {"ok": int(bool(self.pending_message)), "failed": 0}
            self.pending_message = ""
            publish_seconds = 0.0
            if publisher is not None and state.global_step % h.sync_every == 0:
                result = publisher.publish(model, processing_class, state.global_step)
                publish_seconds = result.seconds
                publishes["ok" if result.ok else "failed"] += 1
                if result.ok:
                    st.weight_version = result.version
                    messages.append(f"weights v{result.version} published ({result.seconds:.1f}s)")
                else:
                    messages.append(f"weight swap failed, generation keeps v{st.weight_version}: {result.error}")
            st.step = state.global_step
            batch = rewards.last_batch
            record = {"step": state.global_step, "max_steps": h.max_steps, "time": now(),
                      "reward_mean": batch.get("reward_mean", 0.0),
                      "reward_components": batch.get("reward_components", {}),
                      "refusal_rate": batch.get("refusal_rate", 0.0), "kl": self.kl,
                      "recipe": batch.get("recipe", ""), "weight_version": st.weight_version,
                      "rollout_weight_versions": sorted(set(rollout.last.weight_versions)),
                      "tool_turns_mean": (sum(rollout.last.tool_turns) / len(rollout.last.tool_turns)
                                          if rollout.last.tool_turns else 0.0),
                      "rollout_seconds": rollout.last.seconds,
                      "reward_seconds": batch.get("reward_seconds", 0.0), "publish_seconds": publish_seconds,
                      "publishes": publishes,
                      "step_seconds": time.perf_counter() - self.step_start, "message": "; ".join(messages)}
            run.append_progress(record)
            run.write_state(st)
            if self.on_progress:
                self.on_progress(record)
            if control.requested:
                control_.should_save = True
                control_.should_training_stop = True

    return KnowserveCallback()


def run_training(run_root: Path, resume: bool = False, on_progress: Callable[[dict], None] | None = None,
                 progress_bar: bool = False) -> RunState:
    """Train the run in ``run_root`` (its ``config.yaml`` written by :meth:`RunDir.write_config`) to the end, to a
    stop request, or to an error; returns the final state (also in ``state.json``). ``progress_bar`` shows a tqdm
    bar (rate, ETA, reward, weight version); ``on_progress`` gets every step's record."""
    run = RunDir(run_root)
    cfg = run.config().check()
    h = cfg.resolved_hyperparameters()
    st = run.state() if run.state_path.exists() else RunState(cfg.run_id, max_steps=h.max_steps)
    st.state, st.error, st.pid, st.max_steps = RUNNING, "", os.getpid(), h.max_steps
    publish_dir = Path(cfg.checkpoint_root) / cfg.run_id
    st.checkpoint_dir = str(publish_dir)
    run.write_state(st)
    control = Control(run)
    control.install_signals()
    run.stop_path.unlink(missing_ok=True)
    io = rollout = publisher = rewards = None
    try:
        import torch
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(cfg.threads)
        hf_logging.disable_progress_bar()  # "Writing model shards" bars at every publish
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer

        from training.data import load_dataset

        rows = load_dataset(cfg.dataset, limit=cfg.dataset_limit, seed=h.seed)
        recipe = cfg.recipe_spec()
        fmt = resolve_format(cfg.prompt_format, cfg.model)
        dataset = Dataset.from_list([{"prompt": render_prompt(r.question, fmt, recipe.system_prompt),
                                      "gold_answers": r.gold_answers, "topic": r.topic} for r in rows])
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        io = BackgroundLoop()
        rollout = ServiceRollout(io, cfg.generation_target, app_name=cfg.generation_app_name,
                                 model=cfg.generation_model,
                                 temperature=h.temperature, max_tokens=h.max_completion_tokens,
                                 tool_protocol=cfg.effective_tool_protocol(), max_tool_turns=cfg.max_tool_turns,
                                 retrieval_top_k=cfg.retrieval_top_k, retry_seconds=cfg.retry_seconds)
        trainer_ref: dict[str, Any] = {}
        rewards = StagedRewards(cfg.stage_bounds(), cfg.reward_target,
                                lambda: trainer_ref["t"].state.global_step if "t" in trainer_ref else 0,
                                cfg.retry_seconds)
        funcs, weights = rewards.trl_reward_funcs()
        publisher = (WeightPublisher(io, cfg.generation_target, publish_dir, app_name=cfg.generation_app_name,
                                     model=cfg.generation_model, label=cfg.run_id,
                                     retry_seconds=cfg.retry_seconds) if cfg.publish else None)
        args = GRPOConfig(
            output_dir=str(run.trainer_dir), use_cpu=not torch.cuda.is_available(), bf16=False,
            per_device_train_batch_size=h.batch_size, gradient_accumulation_steps=1, num_generations=h.group_size,
            max_completion_length=h.max_completion_tokens, max_steps=h.max_steps, learning_rate=h.learning_rate,
            beta=h.beta, loss_type=h.loss_type, temperature=h.temperature, reward_weights=weights, seed=h.seed,
            logging_steps=1, report_to=[], save_strategy="steps", save_steps=cfg.checkpoint_every,
            save_total_limit=2, disable_tqdm=True, dataloader_num_workers=0,
            deepspeed=cfg.deepspeed or None, lr_scheduler_type="constant_with_warmup", warmup_steps=0,
        )
        peft_config = None
        if h.use_lora:
            from peft import LoraConfig

            peft_config = LoraConfig(r=h.lora_rank, lora_alpha=2 * h.lora_rank, target_modules="all-linear",
                                     task_type="CAUSAL_LM")
        callback = make_callback(run, st, cfg, publisher, rewards, rollout, control, on_progress)
        trainer = GRPOTrainer(model=cfg.model, reward_funcs=funcs, args=args, train_dataset=dataset,
                              processing_class=tokenizer, rollout_func=rollout, peft_config=peft_config,
                              callbacks=[callback])
        trainer_ref["t"] = trainer
        checkpoint = run.last_checkpoint() if resume else None
        if checkpoint is not None:
            run.truncate_progress(int(checkpoint.name.split("-")[-1]))
        bar = None
        if progress_bar:
            from services.common.progress import progress as tqdm

            done = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
            bar = tqdm(total=h.max_steps, initial=done, desc=f"GRPO {cfg.run_id}", unit="step")
            user_progress = on_progress

            def on_progress_bar(r: dict) -> None:
                bar.update(r["step"] - bar.n)
                bar.set_postfix(reward=f"{r['reward_mean']:+.2f}", v=r["weight_version"])
                if user_progress:
                    user_progress(r)

            callback.on_progress = on_progress_bar
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if bar is not None:
            bar.close()
        st.step = trainer.state.global_step
        if control.requested:
            st.state = STOPPED
        else:
            st.state = SUCCEEDED
            trainer.save_model(str(run.root / "final"))
            tokenizer.save_pretrained(run.root / "final")
    except ConfigError as e:
        st.state, st.error = FAILED, str(e)
    except Exception as e:  # noqa: BLE001 - the run records why it failed
        log.exception("run %s failed", cfg.run_id)
        st.state, st.error = FAILED, f"{type(e).__name__}: {e}"
    finally:
        for part in (rewards, rollout, publisher):
            if part is not None:
                try:
                    part.close()
                except Exception:  # noqa: BLE001
                    pass
        if io is not None:
            io.close()
        st.pid = 0
        run.write_state(st)
    return st


def prepare_run(cfg: RunConfig, resume: bool = False) -> RunDir:
    """Check ``cfg`` and create (or, with ``resume``, reopen) its run folder; returns it."""
    if not cfg.run_id:
        cfg = cfg.model_copy(update={"run_id": f"{cfg.recipe}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"})
    run = RunDir(Path(cfg.runs_dir) / cfg.run_id)
    if resume:
        if not run.config_path.exists():
            raise ConfigError(f"run {cfg.run_id} does not exist in {cfg.runs_dir}; start it without resume")
        return run
    cfg.check()
    if run.state_path.exists():
        raise ConfigError(f"run {cfg.run_id} already exists; resume it or choose another run_id")
    run.write_config(cfg)
    run.write_state(RunState(cfg.run_id, max_steps=cfg.resolved_hyperparameters().max_steps))
    return run
