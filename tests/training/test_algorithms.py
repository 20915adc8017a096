"""SFT and DPO through the real training service (TRL's SFTTrainer and DPOTrainer in the spawned trainer process),
publishing into the real Ray Serve generation app; bad input refused before any compute."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from knowserve.training.v1 import training_service_pb2 as pb
from services.common.clients import RemoteError
from services.generation.client import GenerationClient
from tests.conftest import SERVE_APP
from tests.training.test_grpo import follow
from training.demo_model import prompt_for
from training.world import QUESTIONS, STATEMENTS

pytestmark = pytest.mark.slow


def _facts(world, pool: str = "taught", n: int = 8) -> list[tuple[str, str, str]]:
    """(prompt, statement, value) of demo-world facts."""
    out = []
    for e in world.pool(pool)[:n]:
        for attribute in ("birthplace",):
            value = e.value(attribute)
            out.append((prompt_for(QUESTIONS[attribute].format(name=e.name)),
                        STATEMENTS[attribute].format(name=e.name, value=value), value))
    return out


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _margins(model_dir: Path, rows: list[dict]) -> list[float]:
    """log p(chosen | prompt) - log p(rejected | prompt) under the model in ``model_dir``, per row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def logp(prompt: str, completion: str) -> float:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1: -1]  # [len(c), vocab]
        return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(c).unsqueeze(1)).sum())

    return [logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in rows]


async def test_sft_lowers_loss_and_publishes_into_generation(training_stack, tmp_path):
    stack = training_stack
    rows = [{"prompt": prompt, "completion": f" {statement}</think><answer>{value}</answer><|endoftext|>"}
            for prompt, statement, value in _facts(stack.world, "kb_only", 4)]
    dataset = _write(tmp_path / "sft.jsonl", rows)  # one batch: every step sees the same 4 examples
    async with GenerationClient(stack.generation_target, app_name=SERVE_APP) as gen:
        before = await gen.model_info()
    run = await stack.client.start_run(
        algorithm="sft", dataset=dataset, model=str(stack.model), run_id="sft-e2e",
        hyperparameters=pb.Hyperparameters(max_steps=6, batch_size=4, learning_rate=1e-3, sync_every=3, seed=1))
    assert run.algorithm == "sft" and run.max_steps == 6
    progress = await follow(stack, run.run_id)
    run = await stack.client.get_run(run.run_id)
    assert run.state == pb.RUN_STATE_SUCCEEDED, run.error
    assert [p.step for p in progress] == list(range(1, 7)) and all(p.algorithm == "sft" for p in progress)
    losses = [p.loss for p in progress]
    assert losses[-1] < losses[0] * 0.7, losses  # it learns its data (completion-only loss)
    assert sum("published" in p.message for p in progress) == 2  # steps 3 and 6
    async with GenerationClient(stack.generation_target, app_name=SERVE_APP) as gen:
        after = await gen.model_info()
    assert after.weight_version > before.weight_version == after.weight_version - 2
    assert Path(after.checkpoint_uri).parent == Path(run.checkpoint_dir).resolve()
    assert after.model_name == "sft-e2e step 6"
    assert (Path(stack.training.app.settings.runs_dir) / run.run_id / "final" / "config.json").exists()


async def test_dpo_raises_the_chosen_minus_rejected_margin(training_stack, tmp_path):
    stack = training_stack
    facts = _facts(stack.world, "kb_only")
    wrong = [v for _, _, v in facts[1:]] + [facts[0][2]]  # another person's value: a revised fact
    rows = [{"prompt": prompt, "chosen": f" {statement}</think><answer>{value}</answer>",
             "rejected": f" {statement.replace(value, other)}</think><answer>{other}</answer>"}
            for (prompt, statement, value), other in zip(facts, wrong) if other != value]
    dataset = _write(tmp_path / "dpo.jsonl", rows)
    before = await asyncio.to_thread(_margins, stack.model, rows)
    run = await stack.client.start_run(
        algorithm="dpo", dataset=dataset, model=str(stack.model), run_id="dpo-e2e",
        hyperparameters=pb.Hyperparameters(max_steps=6, batch_size=4, learning_rate=2e-3, beta=0.1, seed=1))
    progress = await follow(stack, run.run_id)
    run = await stack.client.get_run(run.run_id)
    assert run.state == pb.RUN_STATE_SUCCEEDED, run.error
    assert "rewards/margins" in progress[-1].metrics and progress[-1].metrics["rewards/margins"] > 0
    final = Path(stack.training.app.settings.runs_dir) / run.run_id / "final"
    after = await asyncio.to_thread(_margins, final, rows)
    assert sum(after) / len(after) > sum(before) / len(before) + 1.0, (before, after)


@pytest.mark.parametrize("algorithm,rows,hyper,field,needle", [
    ("rlhf", [{"prompt": "q", "completion": "a"}], {}, "algorithm", "unknown algorithm"),
    ("dpo", [{"prompt": "q", "chosen": "a"}], {}, "dataset", "no 'rejected'"),
    ("sft", [{"prompt": "q"}], {}, "dataset", "no 'completion'"),
    ("sft", [], {}, "dataset", "has no rows"),
    ("sft", [{"prompt": "q", "completion": "a"}], {"group_size": 4}, "hyperparameters.group_size",
     "not a hyperparameter of algorithm 'sft'"),
    ("dpo", [{"prompt": "q", "chosen": "a", "rejected": "b"}], {"beta": -1.0}, "hyperparameters.beta", "> 0"),
])
async def test_bad_runs_are_refused_before_any_compute(training_stack, tmp_path, algorithm, rows, hyper, field,
                                                        needle):
    stack = training_stack
    dataset = _write(tmp_path / "rows.jsonl", rows)
    with pytest.raises(RemoteError) as err:
        await stack.client.start_run(algorithm=algorithm, dataset=dataset, model=str(stack.model),
                                     hyperparameters=pb.Hyperparameters(**hyper))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle in str(err.value), str(err.value)
    assert str(err.value).startswith(f"training: {field}:"), str(err.value)  # the field is named
    assert await stack.client.list_runs() == []  # nothing was created


async def test_a_folder_that_is_not_a_causal_lm_is_refused(training_stack, tmp_path):
    stack = training_stack
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    dataset = _write(tmp_path / "rows.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(RemoteError) as err:
        await stack.client.start_run(algorithm="sft", dataset=dataset, model=str(folder))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "not a causal language model" in str(err.value)
