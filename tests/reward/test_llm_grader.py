"""KnowRL's correctness with an LLM grader (SimpleQA A/B/C) through the real generation service on Ray Serve.

The served model is a tiny Llama taught (here, in seconds) to grade this test's two answers "A" and "B", pushed
to the running service with UpdateWeights: the rewards come from what the served model answers."""

from __future__ import annotations

import asyncio

import pytest

from knowserve.reward.v1 import reward_service_pb2 as pb
from services.generation.client import GenerationClient
from services.reward.core import ScoreItem
from services.reward.grader import GRADER_PROMPT
from tests.conftest import SERVE_APP
from tests.taught import teach_answers

pytestmark = pytest.mark.timeout(900)


async def test_llm_grader_decides_correctness(start_reward, serve_generation):
    from services.generation.engine import TransformersEngine

    target, root, _ = serve_generation
    question = "Where was Marie Curie born?"
    cases = {"Warsaw, Poland": "A", "Berlin": "B"}
    engine = await asyncio.to_thread(TransformersEngine.from_path, root / "v1", 512)
    pairs = [(engine.apply_chat_template([{"role": "user", "content": GRADER_PROMPT.format(
        question=question, gold="Warsaw", predicted=answer)}]), engine.encode(letter) + [engine.tokenizer.eos_token_id])
        for answer, letter in cases.items()]
    taught = root / "llm-grader"
    await asyncio.to_thread(teach_answers, root / "v1", pairs, taught, 120)
    async with GenerationClient(target, app_name=SERVE_APP) as gen:
        info = await gen.model_info()
        await gen.update_weights(str(taught), info.weight_version + 1)

    reward = await start_reward(generation_target=target, generation_app_name=SERVE_APP)
    spec = pb.Recipe(name="grader_llm", version="1", components=[
        pb.RecipeComponent(name="correctness_with_refusal", weight=1, params={"grader": "llm"})])
    items = [ScoreItem(question, f"<think>x</think><answer>{a}</answer>", ["Warsaw"]) for a in cases]
    items.append(ScoreItem(question, "no answer tags at all", ["Warsaw"]))  # never sent to the grader
    reply = await reward.client.score("", items, recipe_spec=spec)
    got = [(s.components[0].value, s.components[0].detail) for s in reply.scores]
    # "Warsaw, Poland" is not an exact match: the match grader would say INCORRECT; the LLM grader says CORRECT
    assert got == [(2.0, "CORRECT"), (-1.0, "INCORRECT"), (-1.0, "MISSING")], got
