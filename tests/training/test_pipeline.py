"""A two-stage pipeline through the real services: evaluated before and after each stage, stopped by killing its
trainer mid-stage (the stage is named, the previous stage's weights serve again), and resumed to the end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from services.generation.client import GenerationClient
from tests.conftest import SERVE_APP
from tests.training.test_algorithms import _facts
from training.pipeline import Pipeline, PipelineConfig, PipelineFailed
from training.runs import RunDir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


async def test_two_stage_pipeline_resumes_after_its_trainer_is_killed(training_stack, tmp_path):
    stack = training_stack
    rows = [{"prompt": p, "completion": f" {s}</think><answer>{v}</answer><|endoftext|>"}
            for p, s, v in _facts(stack.world, "kb_only", 8)]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = Path(stack.training.app.settings.runs_dir)
    hyper = {"batch_size": 4, "learning_rate": 1e-3, "seed": 1}
    cfg = PipelineConfig(
        name="two-stage", model=str(stack.model), runs_dir=str(runs), checkpoint_root=str(stack.checkpoint_root),
        generation_target=stack.generation_target, generation_app_name=SERVE_APP,
        training_target=stack.training.server.address, verification_target=stack.verification.server.address,
        data={"sources": ["demo_world:taught:heldout", "demo_world:kb_only:heldout"], "eval_size": 8,
              "train_size": 8, "seed": 1},
        eval={"mode": "closed_book", "max_tokens": 32},
        stages=[{"name": "first", "train": {"algorithm": "sft", "dataset": str(sft), "checkpoint_every": 1,
                                             "hyperparameters": {**hyper, "max_steps": 2}}},
                {"name": "second", "train": {"algorithm": "sft", "dataset": str(sft), "checkpoint_every": 1,
                                              "hyperparameters": {**hyper, "max_steps": 8, "sync_every": 1}}}])
    lines: list[str] = []
    pipeline = Pipeline(cfg, log=lines.append)

    async def kill_the_second_trainer():
        while True:
            for d in runs.glob("two-stage-second-*"):
                run = RunDir(d)
                if run.state_path.exists() and run.last_checkpoint() is not None and run.state().pid:
                    os.kill(run.state().pid, signal.SIGKILL)
                    return d.name
            await asyncio.sleep(0.2)

    killer = asyncio.create_task(kill_the_second_trainer())
    with pytest.raises(PipelineFailed) as err:
        await pipeline.run()
    killed = await killer
    assert "stage 'second'" in str(err.value) and "--resume" in str(err.value)
    state = json.loads(pipeline.state_path.read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "failed"]
    first_version = state["stages"][0]["version_after"]
    async with GenerationClient(stack.generation_target, app_name=SERVE_APP) as gen:
        assert (await gen.model_info()).weight_version == first_version  # the first stage's weights serve again

    done = await pipeline.run(resume=True)
    assert [s.status for s in done.stages] == ["done", "done"]
    assert done.stages[1].run_id == killed  # the killed run was resumed, not restarted
    steps = [r.step for r in RunDir(runs / killed).progress()]
    assert steps == list(range(1, 9))  # no step counted twice
    assert done.before and all(s.eval for s in done.stages)  # evaluated before, and after each stage
    assert done.stages[1].eval["weight_version"] > first_version
    assert any("rolled back" in line for line in lines)
