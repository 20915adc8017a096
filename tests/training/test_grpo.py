"""GRPO through the real services: the training service spawns a real trainer (TRL GRPOTrainer) whose rollouts
come from the Ray Serve generation app (retrieval inside generation against the real retrieval service), whose
rewards come from the reward service (KnowRL, factuality through verification), and which hot-swaps its weights
into generation after every step. Then the faults: bad configs refused before any compute, services killed and
restarted mid-run, a killed trainer resumed with the same step count."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file

from knowserve.training.v1 import training_service_pb2 as pb
from services.common.clients import RemoteError
from services.generation.client import GenerationClient
from tests.conftest import SERVE_APP
from training.runs import CHECKPOINT_COMPLETE
from tests.training.conftest import start_reward

pytestmark = pytest.mark.slow

HYPER = dict(learning_rate=5e-4, group_size=4, batch_size=8, sync_every=1, max_completion_tokens=32,
             temperature=1.0, seed=1)
OPTIONS = pb.RunOptions(tool_protocol="r1_searcher", max_tool_turns=1, retrieval_top_k=1, checkpoint_every=2)


async def follow(stack, run_id: str, timeout: float = 420) -> list[pb.StreamRunProgressResponse]:
    async def collect():
        return [m async for m in stack.client.stream_progress(run_id)]

    return await asyncio.wait_for(collect(), timeout)


async def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _weights(folder: Path) -> dict:
    return load_file(str(next(folder.glob("*.safetensors"))))


async def test_grpo_steps_through_services_publish_new_weights(training_stack):
    stack = training_stack
    run = await stack.client.start_run("knowrl", "demo_world", model=str(stack.model), run_id="grpo-e2e",
                                       hyperparameters=pb.Hyperparameters(max_steps=3, **HYPER), options=OPTIONS)
    assert run.state == pb.RUN_STATE_PENDING and run.hyperparameters.group_size == 4
    progress = await follow(stack, run.run_id)
    run = await stack.client.get_run(run.run_id)
    assert run.state == pb.RUN_STATE_SUCCEEDED, run.error
    assert [p.step for p in progress] == [1, 2, 3] and run.step == 3
    # every step published its weights and generation swapped them in: versions strictly increase
    assert all("published" in p.message for p in progress), [p.message for p in progress]
    versions = [p.weight_version for p in progress]
    assert versions == sorted(set(versions))
    # the rollouts of step k came from the weights published after step k-1 (on-policy through the service)
    records = [json.loads(line) for line in
               (Path(stack.training.app.settings.runs_dir) / run.run_id / "progress.jsonl").read_text().splitlines()]
    for prev, cur in zip(records, records[1:]):
        assert cur["rollout_weight_versions"] == [prev["weight_version"]]
    assert any(r["tool_turns_mean"] > 0 for r in records)  # the model searched inside generation
    assert set(records[0]["reward_components"]) == {"format_think_answer", "correctness_with_refusal", "factuality"}
    # generation now serves the run's last published version, from the run's checkpoint folder
    async with GenerationClient(stack.generation_target, app_name=SERVE_APP) as gen:
        info = await gen.model_info()
    assert info.weight_version == run.weight_version == versions[-1]
    assert Path(info.checkpoint_uri).parent == Path(run.checkpoint_dir).resolve()
    # and the parameters really changed
    before, after = _weights(stack.model), _weights(Path(info.checkpoint_uri))
    changed = [k for k in before if not (before[k] == after[k]).all()]
    assert changed, "GRPO left every parameter unchanged"


@pytest.mark.parametrize("recipe, dataset, hyper, model, problem", [
    ("no_such_recipe", "demo_world", {}, None, "recipe 'no_such_recipe' is unknown"),
    ("knowrl", "no_such_dataset", {}, None, "dataset 'no_such_dataset' is unknown"),
    ("knowrl", "demo_world", {"group_size": 1}, None, "group_size is 1"),
    ("knowrl", "demo_world", {"group_size": 4, "batch_size": 6}, None, "not divisible by group_size"),
    ("knowrl", "demo_world", {}, "/nonexistent/model", "is not an HF model folder"),
    ("knowrl", "BAD_ROWS", {}, None, "has no gold answer"),
])
async def test_bad_runs_are_refused_before_any_compute(training_stack, tmp_path, recipe, dataset, hyper, model,
                                                       problem):
    stack = training_stack
    if dataset == "BAD_ROWS":
        dataset = str(tmp_path / "rows.jsonl")
        Path(dataset).write_text('{"question": "Where was Ilvar Brenneck born?", "gold_answers": ["Velmora"]}\n'
                                 '{"question": "Which instrument does Ilvar Brenneck play?"}\n')
    with pytest.raises(RemoteError) as err:
        await stack.client.start_run(recipe, dataset, model=model or str(stack.model), run_id="bad",
                                     hyperparameters=pb.Hyperparameters(max_steps=2, **{**HYPER, **hyper}))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in str(err.value)
    assert not (Path(stack.training.app.settings.runs_dir) / "bad").exists()  # nothing was created or spawned
    assert await stack.client.list_runs() == []


async def test_services_killed_mid_run_are_waited_for(training_stack, generation_retrieval_port, start_retrieval):
    """Reward and retrieval go down after step 1 and come back on the same ports: the run waits and retries,
    and every step is counted exactly once."""
    stack = training_stack
    run = await stack.client.start_run("knowrl", "demo_world", model=str(stack.model), run_id="faults",
                                       hyperparameters=pb.Hyperparameters(max_steps=4, **HYPER), options=OPTIONS)
    runs_dir = Path(stack.training.app.settings.runs_dir)

    async def step_done():
        path = runs_dir / run.run_id / "progress.jsonl"
        return path.exists() and path.read_text().count("\n") >= 1

    await wait_for(step_done, 300, "step 1")
    reward_port = int(stack.reward.server.address.rsplit(":", 1)[1])
    verification_target = stack.verification.server.address
    await stack.reward.stop()
    await stack.retrieval.stop()
    await asyncio.sleep(4)
    retrieval = await start_retrieval(port=generation_retrieval_port, dense=False, default_mode="bm25")
    from services.retrieval.core import Document

    await retrieval.client.upsert([Document(**d) for d in stack.world.corpus()])
    await start_reward(stack.starter, verification_target, port=reward_port)
    progress = await follow(stack, run.run_id)
    final = await stack.client.get_run(run.run_id)
    assert final.state == pb.RUN_STATE_SUCCEEDED, final.error
    assert [p.step for p in progress] == [1, 2, 3, 4]


async def test_killed_trainer_resumes_with_the_same_step_count(training_stack):
    stack = training_stack
    run = await stack.client.start_run("knowrl", "demo_world", model=str(stack.model), run_id="resume",
                                       hyperparameters=pb.Hyperparameters(max_steps=4, **HYPER), options=OPTIONS)
    run_dir = Path(stack.training.app.settings.runs_dir) / run.run_id
    folder = run_dir / "trainer" / "checkpoint-2"

    def kill_while_checkpointing() -> bool:
        """SIGKILL the trainer the moment the step-2 checkpoint folder appears, i.e. while the trainer is still
        writing it; True when it was caught half-written (no complete mark yet)."""
        deadline = time.monotonic() + 300
        while not folder.exists():
            assert time.monotonic() < deadline, "no step-2 checkpoint"
            time.sleep(0.001)
        os.kill(json.loads((run_dir / "state.json").read_text())["pid"], signal.SIGKILL)  # no chance to clean up
        return not (folder / CHECKPOINT_COMPLETE).exists()

    half_written = await asyncio.to_thread(kill_while_checkpointing)
    killed = await wait_for(lambda: _failed(stack, run.run_id), 30, "the run to read as FAILED")
    assert "resume" in killed.error
    if half_written:  # a checkpoint caught mid-write is never resumed from: the resume starts over
        assert "from the start" in killed.error, killed.error
    resumed = await stack.client.start_run(run_id=run.run_id, resume=True)
    assert resumed.state == pb.RUN_STATE_PENDING
    progress = await follow(stack, run.run_id)
    final = await stack.client.get_run(run.run_id)
    assert final.state == pb.RUN_STATE_SUCCEEDED, final.error
    assert final.step == 4
    assert [p.step for p in progress] == [1, 2, 3, 4]  # steps redone after the checkpoint are not counted twice


async def _failed(stack, run_id):
    r = await stack.client.get_run(run_id)
    return r if r.state == pb.RUN_STATE_FAILED else None
