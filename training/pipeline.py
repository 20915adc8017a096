"""Training pipelines: stages in order — data builds (:mod:`training.builders`) and training runs (any algorithm,
through the training service) — with ``knowserve eval`` before the first stage and after every training stage,
each stage's weights hot-swapped into the served model the pipeline trains.

``knowserve pipeline CONFIG.yaml [--resume]``; ``make demo-full`` runs ``training/configs/smollm2_pipeline.yaml``::

    name: smollm2
    model: builtin:smollm2-135m-instruct        # or a model folder
    generation_model: smollm2-policy            # the served model it trains (its rollouts, its evaluations)
    data: {sources: [qa_wikidata], eval_size: 200, train_size: 400, seed: 7}   # -> @eval.jsonl, @train.jsonl
    eval: {mode: closed_book, max_tokens: 32}
    stages:
      - {name: coldstart, build: {builder: coldstart, dataset: "@train", samples: 2}}
      - {name: sft, train: {algorithm: sft, dataset: "@coldstart", hyperparameters: {num_epochs: 2}}}
      - {name: grpo, train: {algorithm: grpo, recipe: knowrl, dataset: "@train", hyperparameters: {max_steps: 8}}}

``@eval`` / ``@train`` are the held-out and training questions the pipeline samples from ``data.sources`` (never
overlapping: every evaluation question is held out from every stage); ``@<stage>`` is what a build stage wrote.
A training stage starts from the previous training stage's final model. State lives in
``<runs_dir>/pipelines/<name>/state.json``: a stage that fails stops the pipeline naming the stage, the served
model is rolled back to the version the previous stage left (RollbackWeights), and ``--resume`` continues from the
failed stage (its run resumed from its last checkpoint when it has one).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from services.common.addresses import GENERATION_APP, default_target
from training.errors import ConfigError


class DataSplit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(..., min_length=1, description="QA sets (training.data names or .jsonl files).")
    eval_size: int = Field(200, ge=1)
    train_size: int = Field(400, ge=1)
    seed: int = 0


class EvalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: str = "closed_book"
    max_tokens: int = 32
    match: str = "contains"
    recipe: str = ""  # whose system prompt the evaluation asks with ("" = knowserve eval's default)
    judge: str = ""
    claim_support: bool = False  # also check claims through verification (slower)


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]{0,30}$")
    build: dict[str, Any] | None = None  # training.builders.BuildConfig fields
    train: dict[str, Any] | None = None  # training.config.RunConfig fields (targets and folders are filled in)


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model: str
    generation_model: str = ""
    data: DataSplit
    eval: EvalSettings = Field(default_factory=EvalSettings)
    stages: list[Stage] = Field(..., min_length=1)
    runs_dir: str = ".knowserve/runs"
    checkpoint_root: str = Field(".knowserve/checkpoints", description="The generation service's checkpoint root "
                                 "(a start model outside it is copied in before it is served).")
    generation_target: str = default_target("generation")
    generation_app_name: str = GENERATION_APP
    training_target: str = default_target("training")
    verification_target: str = default_target("verification")
    retrieval_target: str = default_target("retrieval")

    def check(self) -> "PipelineConfig":
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names) or {"eval", "train"} & set(names):
            raise ConfigError(f"stages: names must be unique and not 'eval' or 'train', got {names}")
        built: set[str] = set()
        for i, s in enumerate(self.stages):
            if (s.build is None) == (s.train is None):
                raise ConfigError(f"stages[{i}] ({s.name}): give exactly one of build or train")
            spec = s.build or s.train
            ref = str(spec.get("dataset", ""))
            if ref.startswith("@") and ref[1:] not in {"eval", "train"} | built:
                raise ConfigError(f"stages[{i}] ({s.name}).dataset {ref} names no earlier build stage; use @train, "
                                  f"@eval or one of {sorted(built) or 'none yet'}")
            if s.build is not None:
                built.add(s.name)
        return self

    @classmethod
    def from_yaml(cls, path: Path) -> "PipelineConfig":
        return cls(**(yaml.safe_load(Path(path).read_text()) or {})).check()


@dataclass
class StageState:
    name: str
    status: str = "pending"  # pending | running | done | failed
    output: str = ""  # build: the dataset file; train: the final model folder
    run_id: str = ""
    version_after: int = 0
    eval: dict = field(default_factory=dict)  # the evaluation after a training stage (summary figures)
    error: str = ""
    seconds: float = 0.0


@dataclass
class PipelineState:
    name: str
    stages: list[StageState]
    before: dict = field(default_factory=dict)
    version_before: int = 0
    started: float = field(default_factory=time.time)
    folder: str = ""

    @classmethod
    def load(cls, path: Path) -> "PipelineState":
        d = json.loads(path.read_text())
        return cls(d["name"], [StageState(**s) for s in d["stages"]], d.get("before", {}),
                   d.get("version_before", 0), d.get("started", time.time()), str(path.parent))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)


class PipelineFailed(RuntimeError):
    """A stage failed; the message names it and how to resume."""


def split_questions(cfg: PipelineConfig, folder: Path) -> tuple[Path, Path]:
    """``eval.jsonl`` (held out) and ``train.jsonl`` sampled from the sources without overlap (by question)."""
    from training.data import load_dataset

    rows, seen = [], set()
    for source in cfg.data.sources:
        for r in load_dataset(source):
            key = r.question.strip().lower()
            if key not in seen:
                seen.add(key)
                rows.append(r)
    random.Random(cfg.data.seed).shuffle(rows)
    need = cfg.data.eval_size + cfg.data.train_size
    if len(rows) < need:
        raise ConfigError(f"data: {len(rows)} distinct questions in {cfg.data.sources}, fewer than eval_size + "
                          f"train_size = {need}")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, part in (("eval", rows[: cfg.data.eval_size]), ("train", rows[cfg.data.eval_size: need])):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": r.id, "question": r.question, "gold_answers": r.gold_answers,
                                            "false_answers": r.false_answers, "knowledge": r.knowledge,
                                            "topic": r.topic}) + "\n" for r in part))
        out.append(path)
    return out[0], out[1]


class Pipeline:
    """Runs a :class:`PipelineConfig` (see the module docstring); ``log`` gets one line per event."""

    def __init__(self, cfg: PipelineConfig, log=print):
        self.cfg = cfg.check()
        self.folder = Path(cfg.runs_dir).resolve() / "pipelines" / cfg.name
        self.state_path = self.folder / "state.json"
        self.log = log

    def _ref(self, ref: str, state: PipelineState) -> str:
        if not ref.startswith("@"):
            return ref
        name = ref[1:]
        if name in ("eval", "train"):
            return str(self.folder / f"{name}.jsonl")
        return next(s.output for s in state.stages if s.name == name)

    def _model_before(self, index: int, state: PipelineState) -> str:
        from services.common.models import resolve_model_path

        previous = [s for s, c in zip(state.stages[:index], self.cfg.stages[:index]) if c.train is not None]
        return previous[-1].output if previous else str(resolve_model_path(self.cfg.model).resolve())

    async def evaluate(self, label: str) -> dict:
        from training.config import recipes
        from training.eval import DEFAULT_SYSTEM_PROMPT, EvalConfig, evaluate

        e = self.cfg.eval
        system = recipes()[e.recipe].system_prompt if e.recipe else DEFAULT_SYSTEM_PROMPT
        r = await evaluate(EvalConfig(
            dataset=str(self.folder / "eval.jsonl"), mode=e.mode, match=e.match, max_tokens=e.max_tokens,
            system_prompt=system, label=label, model=self.cfg.generation_model, judge=e.judge,
            generation_target=self.cfg.generation_target, generation_app_name=self.cfg.generation_app_name,
            verification_target=self.cfg.verification_target if e.claim_support else "",
            out_dir=str(self.folder / "eval" / label)), progress=True)
        keep = ("weight_version", "n", "correct", "incorrect", "not_attempted", "hallucination_rate_attempted",
                "correct_or_abstain", "ap", "claim_support", "seconds", "path")
        summary = {k: r.get(k) for k in keep}
        self.log(f"eval ({label}) v{r['weight_version']}: correct {r['correct']:.1%}, hallucinated "
                 f"{r['incorrect']:.1%}, abstained {r['not_attempted']:.1%}, AP {r['ap']:.2f} ({r['n']} questions)")
        return summary

    async def _serving_version(self) -> int:
        from services.generation.client import GenerationClient

        async with GenerationClient(self.cfg.generation_target, app_name=self.cfg.generation_app_name,
                                    model=self.cfg.generation_model) as g:
            return int((await g.model_info()).weight_version)

    async def _publish_start(self, folder: str) -> int:
        """Serve ``folder`` (the pipeline's starting model) in the pipeline's served model unless it already does:
        copied under the checkpoint root and hot-swapped in as the next version. Returns the serving version."""
        import shutil

        from services.generation.client import GenerationClient

        async with GenerationClient(self.cfg.generation_target, app_name=self.cfg.generation_app_name,
                                    model=self.cfg.generation_model) as g:
            info = await g.model_info()
            if Path(info.checkpoint_uri).resolve() == Path(folder).resolve():
                return int(info.weight_version)
            target = Path(self.cfg.checkpoint_root).resolve() / f"pipeline-{self.cfg.name}" / "start"
            if not target.exists():
                shutil.copytree(folder, target.with_name("start.tmp"), dirs_exist_ok=True)
                target.with_name("start.tmp").rename(target)
            reply = await g.update_weights(str(target), max(info.weight_version, info.latest_version) + 1)
            self.log(f"serving the starting model {folder} in {info.model!r} as v{reply.version}")
            return int(reply.version)

    async def _rollback(self, version: int) -> None:
        from services.generation.client import GenerationClient

        async with GenerationClient(self.cfg.generation_target, app_name=self.cfg.generation_app_name,
                                    model=self.cfg.generation_model) as g:
            if int((await g.model_info()).weight_version) != version:
                await g.rollback_weights(version)
                self.log(f"generation rolled back to v{version} (the weights the previous stage left)")

    async def _train(self, index: int, stage: Stage, st: StageState, state: PipelineState) -> None:
        from knowserve.training.v1 import training_service_pb2 as tpb
        from services.training.client import TrainingClient
        from training.config import RunConfig

        spec = dict(stage.train)
        spec["dataset"] = self._ref(str(spec.get("dataset", "")), state)
        spec.setdefault("run_id", f"{self.cfg.name}-{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        spec["generation_model"] = self.cfg.generation_model
        spec["model"] = self._model_before(index, state)
        cfg = RunConfig(**spec)
        async with TrainingClient(self.cfg.training_target) as client:
            resume = bool(st.run_id)
            if resume:
                run = await client.start_run_config(cfg.model_copy(update={"run_id": st.run_id}), resume=True)
            else:
                run = await client.start_run_config(cfg)
                st.run_id = run.run_id
                state.save(self.state_path)
            self.log(f"{stage.name}: run {run.run_id}: {run.algorithm} on {cfg.dataset}, "
                     f"{run.max_steps} steps{' (resumed)' if resume else ''}")
            from services.common.progress import progress

            bar = progress(total=run.max_steps, desc=f"{stage.name} ({run.algorithm})", unit="step")
            async for p in client.stream_progress(run.run_id):
                bar.update(p.step - bar.n)
                bar.set_postfix(loss=f"{p.loss:.3f}", reward=f"{p.reward_mean:+.2f}", v=p.weight_version,
                                refresh=False)
            bar.close()
            run = await client.get_run(run.run_id)
        if run.state != tpb.RUN_STATE_SUCCEEDED:
            raise PipelineFailed(f"stage {stage.name!r} (run {run.run_id}) ended {tpb.RunState.Name(run.state)}: "
                                 f"{run.error}")
        st.output = str(Path(self.cfg.runs_dir).resolve() / run.run_id / "final")

    async def run(self, resume: bool = False) -> PipelineState:
        from training.builders import BuildConfig, build

        if resume and self.state_path.exists():
            state = PipelineState.load(self.state_path)
            self.log(f"resuming pipeline {self.cfg.name}: " + ", ".join(f"{s.name} {s.status}" for s in state.stages))
        else:
            if self.state_path.exists() and not resume:
                raise ConfigError(f"pipeline {self.cfg.name} already ran in {self.folder}; --resume it or rename it")
            split_questions(self.cfg, self.folder)
            state = PipelineState(self.cfg.name, [StageState(s.name) for s in self.cfg.stages],
                                  folder=str(self.folder))
            state.version_before = await self._publish_start(self._model_before(0, state))
            state.save(self.state_path)
        if not state.before:
            state.before = await self.evaluate("before")
            state.save(self.state_path)
        for i, (stage, st) in enumerate(zip(self.cfg.stages, state.stages)):
            if st.status == "done":
                continue
            st.status, st.error, start = "running", "", time.monotonic()
            state.save(self.state_path)
            try:
                if stage.build is not None:
                    spec = {**stage.build, "dataset": self._ref(str(stage.build.get("dataset", "")), state)}
                    spec.setdefault("out", str(self.folder / "data" / f"{stage.name}.jsonl"))
                    spec.setdefault("exclude", str(self.folder / "eval.jsonl"))
                    bc = BuildConfig(**{**spec, "generation_target": self.cfg.generation_target,
                                        "generation_app_name": self.cfg.generation_app_name,
                                        "model": self.cfg.generation_model, "model_folder": self._model_before(i, state),
                                        "verification_target": self.cfg.verification_target,
                                        "retrieval_target": self.cfg.retrieval_target})
                    summary = await build(bc)
                    st.output = bc.out
                    self.log(f"{stage.name}: {summary.rows} rows -> {bc.out} ({summary.counts}, "
                             f"{summary.seconds:.0f}s)")
                else:
                    await self._train(i, stage, st, state)  # its last step published the final weights
                    st.version_after = await self._serving_version()
                    st.eval = await self.evaluate(stage.name)
            except Exception as e:  # noqa: BLE001 - the pipeline stops here, resumable
                st.status, st.error = "failed", f"{type(e).__name__}: {e}"
                st.seconds += time.monotonic() - start
                state.save(self.state_path)
                previous = [s.version_after for s in state.stages[:i] if s.version_after] or [state.version_before]
                try:
                    await self._rollback(previous[-1])
                except Exception as rollback_error:  # noqa: BLE001
                    self.log(f"could not roll back to v{previous[-1]}: {rollback_error}")
                raise PipelineFailed(f"pipeline {self.cfg.name} stopped at stage {stage.name!r}: {st.error}; fix it "
                                     f"and run again with --resume") from None
            st.status, st.seconds = "done", st.seconds + time.monotonic() - start
            state.save(self.state_path)
        return state


def table(state: PipelineState) -> list[tuple[str, dict]]:
    """(label, evaluation) rows: before, then after every training stage."""
    return [("before", state.before)] + [(s.name, s.eval) for s in state.stages if s.eval]


def plot(state: PipelineState, out: Path) -> Path:
    """A PNG: correct / hallucinated / abstained shares and AP before and after every training stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table(state)
    labels = [f"{name}\nv{r.get('weight_version')}" for name, r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 3), 4.8))
    x = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    for key, colour, name in (("correct", "#2e7d32", "correct"), ("incorrect", "#c62828", "hallucinated"),
                              ("not_attempted", "#9e9e9e", "abstained")):
        values = [r.get(key, 0.0) for _, r in rows]
        ax.bar(x, values, bottom=bottom, color=colour, label=name, width=0.6)
        for xi, b, v in zip(x, bottom, values):
            if v >= 0.06:
                ax.text(xi, b + v / 2, f"{v:.0%}", ha="center", va="center", color="white", fontsize=9)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.plot(x, [r.get("ap", 0.0) for _, r in rows], "k--o", label="AP (confidence ranks correct first)")
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of held-out questions")
    ax.set_title(f"pipeline {state.name}: held-out answers after each stage")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def print_summary(state: PipelineState, console, chart: Path | None = None) -> Path:
    """The per-stage table (rich), the headline change and the chart; returns the chart's path."""
    from rich.table import Table

    from training.eval import share_text

    t = Table(title=f"pipeline {state.name}: held-out questions after each stage")
    for col in ("stage", "version", "correct", "hallucinated", "of which cut off", "abstained", "halluc./attempted",
                "AP", "minutes"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    minutes = {s.name: s.seconds / 60 for s in state.stages}
    rows = table(state)
    for name, r in rows:
        t.add_row(name, f"v{r.get('weight_version')}", f"{r['correct']:.1%}", f"{r['incorrect']:.1%}",
                  share_text(r.get("incorrect_cut_off")), f"{r['not_attempted']:.1%}",
                  f"{r['hallucination_rate_attempted']:.1%}", f"{r['ap']:.2f}",
                  f"{minutes.get(name, 0):.1f}")
    console.print(t)
    first, last = rows[0][1], rows[-1][1]
    drop = 1 - last["incorrect"] / first["incorrect"] if first["incorrect"] else 0.0
    console.print(f"hallucinated {first['incorrect']:.1%} -> {last['incorrect']:.1%} ({drop:.0%} relative drop), "
                  f"correct {first['correct']:.1%} -> {last['correct']:.1%} "
                  f"({100 * (last['correct'] - first['correct']):+.1f} points), AP {first['ap']:.2f} -> {last['ap']:.2f}; "
                  f"stages {sum(minutes.values()):.1f} min, wall {(time.time() - state.started) / 60:.1f} min")
    path = plot(state, chart or Path(state.folder) / "pipeline.png")
    console.print(f"chart: {path}")
    return path


def run_pipeline(path: Path, resume: bool = False, log=print) -> PipelineState:
    """``knowserve pipeline``: run (or resume) the pipeline in ``path``; returns its state."""
    return asyncio.run(Pipeline(PipelineConfig.from_yaml(path), log).run(resume))
