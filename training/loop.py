"""The step loop every algorithm shares: its TRL trainer (from :mod:`training.algorithms`), plus

* a callback (:class:`ProgressReporter`) that publishes the policy into the generation service every
  ``sync_every`` steps (and at the end), writes one :class:`~training.runs.ProgressRecord` per step with what the
  trainer logged, saves resumable checkpoints, and stops cleanly on request (:class:`Control`);
* one background event loop (:class:`~training.services_io.BackgroundLoop`) where every gRPC client lives;
* run state in the run folder (:mod:`training.runs`), so the training service reads a run back after any restart.

``python -m training.run RUN_DIR [--resume]`` runs :func:`run_training`; the training service spawns it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config import ConfigError, Resolved, RunConfig
from training.runs import FAILED, RUNNING, STOPPED, SUCCEEDED, ProgressRecord, RunDir, RunState, mark_complete
from training.services_io import BackgroundLoop, WeightPublisher, save_policy

log = logging.getLogger("knowserve.training")


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


# logged by TRL under these names -> ProgressRecord fields
_LOGGED = {"loss": "loss", "learning_rate": "learning_rate", "kl": "kl", "reward_std": "reward_std",
           "frac_reward_zero_std": "frac_reward_zero_std"}


def make_reporter(run: RunDir, st: RunState, cfg: RunConfig, h: Resolved, publisher: WeightPublisher | None,
                  control: Control, publish_start: bool, on_progress: Callable[[ProgressRecord], None] | None):
    """The TrainerCallback of a run (a factory: transformers is imported only in the trainer process)."""
    from transformers import TrainerCallback

    class ProgressReporter(TrainerCallback):
        """Publishing, progress records and stop control around any TRL trainer (see the module docstring).

        A step's record is written once the trainer has logged it (``on_log`` follows ``on_step_end``), so it
        carries that step's loss, KL or DPO margins. ``extras()`` (set by the algorithm) adds its own fields."""

        def __init__(self):
            self.on_progress = on_progress
            self.extras: Callable[[], dict[str, Any]] = dict
            self.step_start = time.perf_counter()
            self.pending: ProgressRecord | None = None
            self.pending_message = ""
            self.last_published = -1

        def _publish(self, model, tokenizer, step: int, messages: list[str], record: ProgressRecord) -> None:
            result = publisher.publish(model, tokenizer, step)
            record.publish_seconds += result.seconds
            record.publishes["ok" if result.ok else "failed"] += 1
            if result.ok:
                st.weight_version = result.version
                self.last_published = step
                messages.append(f"weights v{result.version} published ({result.seconds:.1f}s)")
            else:
                messages.append(f"weight swap failed, generation keeps v{st.weight_version}: {result.error}")

        def on_train_begin(self, args, state, control_, model=None, processing_class=None, **kw):
            if publisher is not None:
                info = publisher.serving()
                current = getattr(model, "name_or_path", "")
                if info.checkpoint_uri and Path(info.checkpoint_uri).resolve() == Path(current).resolve():
                    st.weight_version = int(info.weight_version)
                elif publish_start:  # rollouts must come from the policy being trained: publish it first
                    result = publisher.publish(model, processing_class, state.global_step)
                    if not result.ok:
                        raise RuntimeError(f"could not publish the starting policy to generation: {result.error}")
                    st.weight_version = result.version
                    self.pending_message = f"weights v{result.version} published (starting policy)"
                else:
                    st.weight_version = int(info.weight_version)
            run.write_state(st)

        def on_step_begin(self, args, state, control_, **kw):
            self.flush()
            self.step_start = time.perf_counter()

        def on_step_end(self, args, state, control_, model=None, processing_class=None, **kw):
            messages = [self.pending_message] if self.pending_message else []
            record = ProgressRecord(step=state.global_step, max_steps=state.max_steps, algorithm=cfg.algorithm,
                                    publishes={"ok": int(bool(self.pending_message)), "failed": 0})
            self.pending_message = ""
            last = state.global_step >= state.max_steps
            if publisher is not None:
                record.events = publisher.gate_events()  # the decision on an earlier version comes first
            if publisher is not None and ((h.sync_every and state.global_step % h.sync_every == 0) or last):
                self._publish(model, processing_class, state.global_step, messages, record)
            st.step = state.global_step
            record.weight_version = st.weight_version
            record.message = "; ".join(messages)
            for key, value in self.extras().items():
                setattr(record, key, value)
            record.step_seconds = time.perf_counter() - self.step_start
            self.pending = record
            if control.requested:
                control_.should_save = True
                control_.should_training_stop = True

        def on_log(self, args, state, control_, logs=None, **kw):
            if self.pending is None or not logs:
                return
            for key, value in logs.items():
                if not isinstance(value, (int, float)):
                    continue
                if key in _LOGGED:
                    setattr(self.pending, _LOGGED[key], float(value))
                else:
                    self.pending.metrics[key] = float(value)
            self.flush()

        def on_save(self, args, state, control_, **kw):
            # called once the trainer has written the whole checkpoint: only now may a resume load it
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                mark_complete(folder)

        def on_train_end(self, args, state, control_, **kw):
            self.flush()

        def flush(self) -> None:
            if self.pending is None:
                return
            record, self.pending = self.pending, None
            run.append_progress(record)
            run.write_state(st)
            if self.on_progress:
                self.on_progress(record)

    return ProgressReporter()


@dataclass
class TrainContext:
    """What an algorithm's ``build`` gets: the run, its config, the shared reporter and background loop."""

    cfg: RunConfig
    h: Resolved
    run: RunDir
    io: BackgroundLoop
    reporter: Any  # the ProgressReporter callback: add it to the trainer
    tokenizer: Any
    closers: list = field(default_factory=list)  # objects with close() to call when the run ends

    def trainer_args(self) -> dict[str, Any]:
        """TrainingArguments every TRL config shares (CPU or GPU, logging every step, resumable checkpoints)."""
        import torch

        cfg, h = self.cfg, self.h
        return dict(output_dir=str(self.run.trainer_dir), use_cpu=not torch.cuda.is_available(), bf16=False,
                    per_device_train_batch_size=h.batch_size, gradient_accumulation_steps=1,
                    max_steps=cfg.total_steps(), learning_rate=h.learning_rate, seed=h.seed, logging_steps=1,
                    report_to=[], save_strategy="steps", save_steps=cfg.checkpoint_every, save_total_limit=2,
                    disable_tqdm=True, dataloader_num_workers=0, deepspeed=cfg.deepspeed or None,
                    lr_scheduler_type="constant_with_warmup", warmup_steps=0)

    def peft_config(self):
        if not self.h.use_lora:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.h.lora_rank, lora_alpha=2 * self.h.lora_rank, target_modules="all-linear",
                          task_type="CAUSAL_LM")


def run_training(run_root: Path, resume: bool = False, on_progress: Callable[[ProgressRecord], None] | None = None,
                 progress_bar: bool = False) -> RunState:
    """Train the run in ``run_root`` (its ``config.yaml`` written by :func:`training.runs.prepare_run`) to the end,
    to a stop request, or to an error; returns the final state (also in ``state.json``). ``progress_bar`` shows a
    bar (rate, ETA, loss or reward, weight version); ``on_progress`` gets every step's record."""
    run = RunDir(run_root)
    cfg = run.config().check()
    h = cfg.resolved_hyperparameters()
    spec = cfg.algorithm_spec()
    total = cfg.total_steps()
    st = run.state() if run.state_path.exists() else RunState(cfg.run_id, max_steps=total, algorithm=cfg.algorithm)
    st.state, st.error, st.pid, st.max_steps = RUNNING, "", os.getpid(), total
    publish_dir = Path(cfg.checkpoint_root) / cfg.run_id
    st.checkpoint_dir = str(publish_dir)
    run.write_state(st)
    control = Control(run)
    control.install_signals()
    run.stop_path.unlink(missing_ok=True)
    io = publisher = None
    ctx: TrainContext | None = None
    try:
        import torch
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(cfg.threads)
        hf_logging.disable_progress_bar()  # "Writing model shards" bars at every publish
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        io = BackgroundLoop()
        publisher = (WeightPublisher(io, cfg.generation_target, publish_dir, app_name=cfg.generation_app_name,
                                     model=cfg.generation_model, label=cfg.run_id, retry_seconds=cfg.retry_seconds,
                                     gate=cfg.publish_gate)
                     if cfg.publish else None)
        reporter = make_reporter(run, st, cfg, h, publisher, control, spec.publish_start, on_progress)
        ctx = TrainContext(cfg, h, run, io, reporter, tokenizer)
        trainer = spec.build(ctx)
        if resume:
            for gone in run.discard_incomplete_checkpoints():
                log.info("removed %s: a killed trainer left it half-written", gone.name)
        checkpoint = run.last_checkpoint() if resume else None
        if resume:  # steps after the checkpoint (all of them, without one) are redone: their records go
            run.truncate_progress(int(checkpoint.name.split("-")[-1]) if checkpoint is not None else 0)
        if progress_bar:
            from services.common.progress import progress

            done = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
            bar = progress(total=total, initial=done, desc=f"{cfg.algorithm} {cfg.run_id}", unit="step")
            user_progress = on_progress

            def on_progress_bar(r: ProgressRecord) -> None:
                bar.update(r.step - bar.n)
                shown = {"reward": f"{r.reward_mean:+.2f}"} if cfg.algorithm == "grpo" else {"loss": f"{r.loss:.3f}"}
                bar.set_postfix(**shown, v=r.weight_version, refresh=False)
                if user_progress:
                    user_progress(r)

            reporter.on_progress = on_progress_bar
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if progress_bar:
            bar.close()
        st.step = trainer.state.global_step
        if control.requested:
            st.state = STOPPED
        else:
            st.state = SUCCEEDED
            save_policy(trainer.model, tokenizer, run.final_dir, {"name": f"{cfg.run_id} final", "run": cfg.run_id,
                                                                  "step": st.step, "algorithm": cfg.algorithm})
    except ConfigError as e:
        st.state, st.error = FAILED, str(e)
    except Exception as e:  # noqa: BLE001 - the run records why it failed
        log.exception("run %s failed", cfg.run_id)
        st.state, st.error = FAILED, f"{type(e).__name__}: {e}"
    finally:
        for part in ([publisher] + (ctx.closers if ctx else [])):
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
