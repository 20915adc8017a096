"""knowserve rewards inside TRL's GRPOTrainer (a short real run on a tiny model built here) and the adapter's
in-process and service routes agreeing."""

from __future__ import annotations

import asyncio
import math

import pytest

from services.reward.trl_adapter import KnowserveRewards
from tests.conftest import ROOT


async def test_grpo_trainer_runs_on_knowserve_rewards(reward_stack, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from services.common.models import tiny_lm_folder

    _, _, reward = reward_stack
    model_dir = await asyncio.to_thread(tiny_lm_folder, ROOT / ".cache/models")
    # the adapter is synchronous (TRL calls it so): build and use it off the loop serving the in-process services
    rewards = await asyncio.to_thread(KnowserveRewards, "knowrl", target=reward.server.address)
    funcs, weights = rewards.trl_reward_funcs()
    assert [f.__name__ for f in funcs] == ["knowserve_knowrl", "knowserve_knowrl_format_think_answer",
                                           "knowserve_knowrl_correctness_with_refusal", "knowserve_knowrl_factuality"]
    dataset = Dataset.from_list([{"prompt": q, "gold_answers": g} for q, g in [
        ("Where was Marie Curie born?", ["Warsaw"]), ("How high is Mount Everest?", ["8,849 metres"]),
        ("Where does the Danube end?", ["Black Sea"]), ("When was Marie Curie born?", ["1867"])]])
    config = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                        num_generations=4, max_completion_length=8, max_steps=2, learning_rate=1e-3,
                        logging_steps=1, report_to=[], save_strategy="no", reward_weights=weights, seed=0)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=funcs, args=config, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    # the trainer blocks; run it off the event loop that serves the in-process services
    await asyncio.to_thread(trainer.train)
    await asyncio.to_thread(rewards.close)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2
    for h in logs:
        # an untrained model writes no <think>/<answer>: format -1, missing answer -1, nothing to fact-check
        assert h["rewards/knowserve_knowrl/mean"] == pytest.approx(-2.0)
        assert h["rewards/knowserve_knowrl_format_think_answer/mean"] == pytest.approx(-1.0)
        assert h["rewards/knowserve_knowrl_correctness_with_refusal/mean"] == pytest.approx(-1.0)
        fact = h["rewards/knowserve_knowrl_factuality/mean"]  # not applicable: None -> NaN -> logged as None
        assert fact is None or math.isnan(fact)
        assert h["reward"] == pytest.approx(-2.0)  # only the total counts (weights 1, 0, 0, 0)


async def test_in_process_and_service_routes_agree(reward_stack):
    _, verification, reward = reward_stack
    prompts = [[{"role": "user", "content": "Where was Marie Curie born?"}]] * 3
    completions = [[{"role": "assistant", "content": "<think>Marie Curie was born in Warsaw.</think>"
                                                     "<answer>Warsaw</answer>"}],
                   [{"role": "assistant", "content": "<think>Marie Curie was born in Berlin.</think>"
                                                     "<answer>Berlin</answer>"}],
                   [{"role": "assistant", "content": "<answer>I don't know</answer>"}]]
    golds = [["Warsaw"]] * 3
    remote = await asyncio.to_thread(KnowserveRewards, "knowrl", target=reward.server.address)
    local = await asyncio.to_thread(KnowserveRewards, "knowrl", verification_target=verification.server.address)
    try:
        r = await asyncio.to_thread(remote, prompts, completions, gold_answers=golds)
        lo = await asyncio.to_thread(local, prompts, completions, gold_answers=golds)
        mine = await asyncio.to_thread(KnowserveRewards, {"name": "em", "version": "1", "components": [
            {"name": "exact_match", "weight": 3}]}, target=reward.server.address)
        user = await asyncio.to_thread(mine, prompts, completions, gold_answers=golds)
        await asyncio.to_thread(mine.close)
    finally:
        await asyncio.to_thread(remote.close)
        await asyncio.to_thread(local.close)
    assert r == pytest.approx(lo)
    assert lo == pytest.approx([3.0, 1.0 + (-1.0 + 0.0), -1.0 + 1.0])
    assert user == [3.0, 0.0, 0.0]
