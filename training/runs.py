"""Run storage: one folder per training run, and the typed records everyone reads from it.

A run lives in ``<runs_dir>/<run_id>/``: ``config.yaml`` (:class:`training.config.RunConfig`), ``state.json``
(:class:`RunState`: what GetRun / ListRuns report), ``progress.jsonl`` (one :class:`ProgressRecord` per optimizer
step), ``trainer/`` (TRL checkpoints for resume), ``final/`` (the trained model) and ``STOP`` (a stop request).
Every write is atomic (a temporary file renamed into place). The training service core, its server, its metrics
collector and the CLI read these types instead of dict keys.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from training.config import ConfigError, RunConfig

PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"
LIVE = (PENDING, RUNNING)


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
    algorithm: str = "grpo"


@dataclass
class ProgressRecord:
    """One optimizer step of any algorithm (``progress.jsonl``). Fields an algorithm does not have stay at their
    zero value; ``metrics`` holds the rest of what its trainer logged (loss, DPO margins, ...).

    >>> r = ProgressRecord(step=3, max_steps=10, loss=0.5, metrics={"rewards/margins": 0.2})
    >>> ProgressRecord.from_json(r.to_json()).metrics["rewards/margins"]
    0.2
    """

    step: int
    max_steps: int
    time: str = field(default_factory=now)
    algorithm: str = "grpo"
    loss: float = 0.0
    learning_rate: float = 0.0
    weight_version: int = 0
    step_seconds: float = 0.0
    publish_seconds: float = 0.0
    publishes: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0})
    message: str = ""
    events: list[str] = field(default_factory=list)  # hallucination-gate decisions on this run's versions
    # GRPO
    recipe: str = ""
    reward_mean: float = 0.0
    reward_std: float = 0.0
    frac_reward_zero_std: float = 0.0
    reward_components: dict[str, float] = field(default_factory=dict)
    refusal_rate: float = 0.0
    kl: float = 0.0
    rollout_weight_versions: list[int] = field(default_factory=list)
    tool_turns_mean: float = 0.0
    rollout_seconds: float = 0.0
    reward_seconds: float = 0.0
    # the rollout/trainer mismatch: rollout logprobs (generation service) vs the trainer's recomputed ones
    logprob_abs_diff_mean: float = 0.0
    importance_ratio_min: float = 1.0
    importance_ratio_max: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProgressRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, line: str) -> "ProgressRecord":
        return cls.from_dict(json.loads(line))


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
    def final_dir(self) -> Path:
        return self.root / "final"

    @property
    def stop_path(self) -> Path:
        return self.root / "STOP"

    def write_config(self, cfg: RunConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    def config(self) -> RunConfig:
        return RunConfig(**yaml.safe_load(self.config_path.read_text()))

    def state(self) -> RunState:
        return RunState(**json.loads(self.state_path.read_text()))

    def write_state(self, st: RunState) -> None:
        st.update_time = now()
        atomic_write(self.state_path, json.dumps(asdict(st), indent=1))

    def progress(self) -> list[ProgressRecord]:
        if not self.progress_path.exists():
            return []
        out = []
        for line in self.progress_path.read_text().splitlines():
            try:
                out.append(ProgressRecord.from_json(line))
            except (ValueError, TypeError):
                continue  # a line cut by a crash mid-write
        return out

    def append_progress(self, record: ProgressRecord) -> None:
        with open(self.progress_path, "a") as f:
            f.write(record.to_json() + "\n")

    def truncate_progress(self, last_step: int) -> None:
        """Drop records of steps after ``last_step`` (steps redone after a resume are not counted twice)."""
        kept = [r for r in self.progress() if r.step <= last_step]
        atomic_write(self.progress_path, "".join(r.to_json() + "\n" for r in kept))

    def _checkpoints(self) -> list[Path]:
        return sorted((p for p in self.trainer_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                      key=lambda p: int(p.name.split("-")[-1]))

    def last_checkpoint(self) -> Path | None:
        """The newest complete TRL checkpoint: one the run marked complete after the trainer had written all of it
        (:func:`mark_complete`); a checkpoint a killed trainer left half-written has no mark and is never loaded."""
        found = [p for p in self._checkpoints() if (p / CHECKPOINT_COMPLETE).exists()]
        return found[-1] if found else None

    def discard_incomplete_checkpoints(self) -> list[Path]:
        """Remove checkpoint folders without the complete mark (a resume then rewrites them from scratch)."""
        gone = [p for p in self._checkpoints() if not (p / CHECKPOINT_COMPLETE).exists()]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        return gone


CHECKPOINT_COMPLETE = "knowserve_complete"  # written last, atomically, once a checkpoint folder is whole


def mark_complete(checkpoint: Path) -> None:
    """Mark a checkpoint folder whole: its files flushed to disk first, then the mark (renamed into place)."""
    for f in checkpoint.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    atomic_write(checkpoint / CHECKPOINT_COMPLETE, "complete\n")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def prepare_run(cfg: RunConfig, resume: bool = False) -> RunDir:
    """Check ``cfg`` and create (or, with ``resume``, reopen) its run folder; returns it."""
    if not cfg.run_id:
        cfg = cfg.model_copy(update={"run_id": f"{cfg.recipe or cfg.algorithm}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"})
    run = RunDir(Path(cfg.runs_dir) / cfg.run_id)
    if resume:
        if not run.config_path.exists():
            raise ConfigError(f"run {cfg.run_id} does not exist in {cfg.runs_dir}; start it without resume")
        return run
    cfg.check()
    if run.state_path.exists():
        raise ConfigError(f"run {cfg.run_id} already exists; resume it or choose another run_id")
    run.write_config(cfg)
    run.write_state(RunState(cfg.run_id, max_steps=cfg.total_steps(), algorithm=cfg.algorithm))
    return run


def remove_run(run: RunDir) -> None:
    shutil.rmtree(run.root, ignore_errors=True)
