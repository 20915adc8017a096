"""Runs without gRPC: start (validated before any compute), resume, stop, list, and follow GRPO runs.

Each run trains in its own process (``python -m training.run RUN_DIR``) that records everything in the run folder
(:class:`training.runs.RunDir`), so the service holds no state a restart would lose: a run whose process died
(the trainer was killed) reads back as FAILED with a hint, and ``StartRun(resume=true)`` continues it from its last
checkpoint with the same step count.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from services.common.auth import TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, TOKEN_FILE_ENV
from services.common.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted,
                                    invalid_from_validation)
from services.training.config import TrainingSettings
from training.config import ConfigError, Hyperparameters, RunConfig, check_run_id
from training.runs import FAILED, LIVE, PENDING, RunDir, RunState, prepare_run

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class StartSpec:
    run_id: str = ""
    recipe: str = ""
    dataset: str = ""
    model: str = ""
    hyperparameters: Hyperparameters | None = None
    resume: bool = False
    overrides: dict | None = None
    algorithm: str = ""  # "" = grpo  # extra RunConfig fields (tool protocol, top_k, ...) from a YAML config


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


class TrainingCore:
    def __init__(self, settings: TrainingSettings):
        self.s = settings
        self.runs_dir = Path(settings.runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, subprocess.Popen] = {}

    # -- queries
    def _run(self, run_id: str) -> RunDir:
        if not run_id:
            raise InvalidArgument("run_id", "is required")
        try:
            check_run_id(run_id)  # a folder name, never a path out of the runs dir
        except ConfigError as e:
            raise InvalidArgument("run_id", str(e).removeprefix("run_id ")) from None
        run = RunDir(self.runs_dir / run_id)
        if not run.state_path.exists():
            raise NotFound(f"run {run_id!r} does not exist in {self.runs_dir}")
        return run

    def state(self, run_id: str) -> tuple[RunState, RunConfig]:
        run = self._run(run_id)
        st = run.state()
        if st.state in LIVE and st.pid and not _alive(st.pid):
            last = run.last_checkpoint()
            st.state = FAILED
            st.error = (f"the trainer process {st.pid} exited without finishing (killed?); StartRun with resume=true "
                        f"continues from {'step ' + last.name.split('-')[-1] if last else 'the start'}")
            st.pid = 0
            run.write_state(st)
        return st, run.config()

    def list(self, page_size: int = 0) -> list[tuple[RunState, RunConfig]]:
        out = []
        for d in self.runs_dir.iterdir():
            if (d / "state.json").exists() and (d / "config.yaml").exists():
                try:
                    out.append(self.state(d.name))
                except (OSError, ValueError):
                    continue
        out.sort(key=lambda x: x[0].create_time, reverse=True)
        return out[:page_size] if page_size > 0 else out

    def _live_count(self) -> int:
        return sum(1 for st, _ in self.list() if st.state in LIVE)

    # -- commands
    def start(self, spec: StartSpec) -> tuple[RunState, RunConfig]:
        if self._live_count() >= self.s.max_concurrent_runs:
            raise ResourceExhausted(f"{self.s.max_concurrent_runs} run(s) already training "
                                    "(KNOWSERVE_TRAINING_MAX_CONCURRENT_RUNS); stop one or wait")
        if spec.resume:
            run = self._run(spec.run_id)
            st, cfg = self.state(spec.run_id)
            if st.state in LIVE:
                raise FailedPrecondition(f"run {spec.run_id} is {st.state} (pid {st.pid}); stop it before resuming")
            if st.step >= st.max_steps and st.state == "SUCCEEDED":
                raise FailedPrecondition(f"run {spec.run_id} already finished all {st.max_steps} steps")
        else:
            cfg = self._config(spec)
            if spec.run_id and (self.runs_dir / spec.run_id / "state.json").exists():
                raise AlreadyExists(f"run {spec.run_id!r} already exists; resume it or choose another run_id")
            from training.data import DatasetError, load_dataset, load_rows

            try:  # rows are checked before any compute (a row without a question, a completion, a rejected answer)
                kind, seed = cfg.algorithm_spec().dataset, cfg.resolved_hyperparameters().seed
                if kind == "qa":
                    load_dataset(cfg.dataset, limit=cfg.dataset_limit, seed=seed)
                else:
                    load_rows(cfg.dataset, kind, cfg.dataset_limit, seed)
                if cfg.total_steps() > self.s.max_steps_limit:
                    raise InvalidArgument("hyperparameters.max_steps", f"{cfg.total_steps()} steps, above the limit "
                                          f"of {self.s.max_steps_limit} (KNOWSERVE_TRAINING_MAX_STEPS_LIMIT)")
                run = prepare_run(cfg)
            except (ConfigError, DatasetError) as e:
                raise InvalidArgument(_field_of(str(e)), str(e)) from None
        self._spawn(run, resume=spec.resume)
        return self.state(run.root.name)

    def _config(self, spec: StartSpec) -> RunConfig:
        from training.algorithms import ALGORITHMS

        algorithm = spec.algorithm or "grpo"
        if algorithm not in ALGORITHMS:
            raise InvalidArgument("algorithm", f"unknown algorithm {algorithm!r}; use one of {sorted(ALGORITHMS)}")
        if not spec.recipe and ALGORITHMS[algorithm].needs_recipe:
            raise InvalidArgument("recipe", f"is required for {algorithm} (knowrl, r1_searcher, search_r1)")
        if not spec.dataset:
            raise InvalidArgument("dataset", "is required (a dataset name or a .jsonl path)")
        model = spec.model or str(self.s.default_model or "")
        if not model:
            from services.common.models import smollm2_folder

            model = str(smollm2_folder())
        h = spec.hyperparameters or Hyperparameters()
        if h.max_steps is not None and h.max_steps > self.s.max_steps_limit:
            raise InvalidArgument("hyperparameters.max_steps", f"{h.max_steps} is above the limit of "
                                  f"{self.s.max_steps_limit} (KNOWSERVE_TRAINING_MAX_STEPS_LIMIT)")
        fields = {"run_id": spec.run_id, "algorithm": algorithm, "recipe": spec.recipe, "dataset": spec.dataset,
                  "model": model,
                  "hyperparameters": h, "generation_target": self.s.generation_target,
                  "generation_app_name": self.s.generation_app_name, "generation_model": self.s.generation_model,
                  "reward_target": self.s.reward_target,
                  "checkpoint_root": str(self.s.checkpoint_root), "runs_dir": str(self.runs_dir),
                  "retry_seconds": self.s.retry_seconds, "threads": self.s.trainer_threads, **(spec.overrides or {})}
        try:
            return RunConfig(**fields).check()
        except ConfigError as e:
            raise InvalidArgument(_field_of(str(e)), str(e)) from None
        except ValidationError as e:  # a run option outside its type or choices
            raise invalid_from_validation(e) from None
        except ValueError as e:  # pydantic: an unknown loss type, a wrong type
            raise InvalidArgument("hyperparameters", str(e).splitlines()[0] + ": " + str(e)) from None

    def _client_token_file(self, run: RunDir) -> Path | None:
        """A file with the token the run sends (KNOWSERVE_TOKEN_FILE of its process): the service's client or own
        token file; an inline token is written into the run folder, readable by its owner only."""
        s = self.s
        path = s.client_token_file or s.auth_token_file
        if path is not None:
            return Path(path).resolve()
        token = s.resolved_auth_token()
        if token is None:
            return None
        out = run.root / "client-token"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        return out

    def _spawn(self, run: RunDir, resume: bool) -> None:
        cmd = [sys.executable, "-m", "training.run", str(run.root)] + (["--resume"] if resume else [])
        log = open(run.root / "trainer.log", "ab")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": str(self.s.trainer_threads), "TRL_EXPERIMENTAL_SILENCE": "1"}
        token_file = self._client_token_file(run)
        if token_file is not None:  # the run calls generation and reward with the service's token
            env[TOKEN_FILE_ENV] = str(token_file)
        for name, path in ((TLS_CA_ENV, self.s.client_tls_ca_file), (TLS_CERT_ENV, self.s.client_tls_cert_file),
                           (TLS_KEY_ENV, self.s.client_tls_key_file)):
            if path is not None:  # and over the service's client TLS (generation stays plaintext: PLAINTEXT_ENV)
                env[name] = str(Path(path).resolve())
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        log.close()
        st = run.state()
        st.state, st.pid, st.error = PENDING, proc.pid, ""
        run.write_state(st)
        self.children[run.root.name] = proc

    def stop(self, run_id: str) -> tuple[RunState, RunConfig]:
        run = self._run(run_id)
        st, _ = self.state(run_id)
        if st.state in LIVE:
            run.stop_path.touch()  # the trainer stops after its current step, with a checkpoint
        return self.state(run_id)

    def shutdown(self, grace: float = 60.0) -> None:
        """Stop the runs this process started (each saves a checkpoint: resumable)."""
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.children.values():
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()

    async def follow(self, run_id: str, poll: float) -> AsyncIterator[tuple[dict, RunState]]:
        """Every progress record of the run (past ones first), then new ones until the run ends."""
        run = self._run(run_id)
        sent = 0
        while True:
            records = await asyncio.to_thread(run.progress)
            st, _ = await asyncio.to_thread(self.state, run_id)
            for r in records[sent:]:
                yield r, st
            sent = max(sent, len(records))
            if st.state not in LIVE:
                return
            await asyncio.sleep(poll)


def _field_of(message: str) -> str:
    """The config field a ConfigError names ("hyperparameters.group_size is 1" -> "hyperparameters.group_size")."""
    head = message.split(" ", 1)[0].strip("'\":,")
    return head if head.replace(".", "").replace("_", "").isalnum() else "config"
