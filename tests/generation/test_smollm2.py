"""Real-model regression: SmolLM2-135M-Instruct (from its wheel) served by the real Ray Serve app.

The served text ends where the model's turn ends — no `<|im_end|>` — while token_ids keep the end-of-turn token;
questions it answers right are graded CORRECT by `knowserve eval`; the same answers in the KnowRL tags score
format +1 and correctness +2 in the reward service, also when a caller passes the model's raw output (special
tokens decoded) instead of the service's text."""

from __future__ import annotations

import asyncio
import json

import pytest

from knowserve.generation.v1 import generation_service_pb2 as gpb
from knowserve.reward.v1 import reward_service_pb2 as rpb
from services.generation.client import GenerationClient
from services.reward.core import ScoreItem

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SYSTEM = "Answer the question with a short phrase, without explanation. If you do not know the answer, say \"I don't know\"."
# questions SmolLM2-135M-Instruct answers right under greedy decoding (checked by hand: "The capital of France is
# Paris.", "The chemical symbol for gold is Au.", ...)
KNOWN = [("What is the capital of France?", ["Paris"]), ("What is the capital of Japan?", ["Tokyo"]),
         ("What is the chemical symbol for gold?", ["Au"]), ("Which planet is known as the Red Planet?", ["Mars"]),
         ("How many legs does a spider have?", ["8", "eight"])]


async def test_smollm2_text_ends_without_the_end_marker_and_is_graded_right(smollm2_app, start_reward, tmp_path):
    from transformers import AutoTokenizer

    app = smollm2_app
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q, _ in KNOWN]
    async with GenerationClient(app.target, app_name=app.app_name) as gen:
        info = await gen.model_info()
        reply = await gen.generate(chats, temperature=0, max_tokens=32)
    assert "<|im_end|>" in info.end_of_sequence_tokens
    tokenizer = AutoTokenizer.from_pretrained(info.checkpoint_uri)
    for c in reply.completions:
        assert "<|im_end|>" not in c.text and c.finish_reason == gpb.FINISH_REASON_STOP, c.text
        assert c.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the token stays, for GRPO
        assert tokenizer.decode(c.token_ids) == c.text + "<|im_end|>"

    # `knowserve eval` on these questions: every one CORRECT
    dataset = tmp_path / "known.jsonl"
    dataset.write_text("".join(json.dumps({"question": q, "gold_answers": g}) + "\n" for q, g in KNOWN))
    from services.cli import main

    out = tmp_path / "eval"
    code = await asyncio.to_thread(main, ["eval", "--dataset", str(dataset), "--generation", app.target,
                                          "--generation-app", app.app_name, "--verification", "", "--out", str(out),
                                          "--max-tokens", "32", "--limit", "0"])
    assert code == 0
    [result] = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert [r["grade"] for r in result["records"]] == ["CORRECT"] * len(KNOWN), result["records"]
    assert result["correct"] == 1.0 and result["incorrect"] == 0.0

    # the same answers in KnowRL's tags score format +1 and correctness +2, from the service's text and from the
    # raw output with the end-of-turn token decoded
    reward = await start_reward(verification_target="")
    spec = rpb.Recipe(name="knowrl_local", version="1", components=[
        rpb.RecipeComponent(name="format_think_answer", weight=1),
        rpb.RecipeComponent(name="correctness_with_refusal", weight=1, params={"match": "cover"})])
    texts = [c.text for c in reply.completions]
    raw = [tokenizer.decode(c.token_ids, skip_special_tokens=False) for c in reply.completions]
    items = [ScoreItem(q, f"<think>{t}</think><answer>{t}</answer>" + tail, g)
             for (q, g), t, r in zip(KNOWN, texts, raw) for tail in ("", r[len(t):])]
    scored = await reward.client.score("", items, recipe_spec=spec)
    assert [{c.name: c.value for c in s.components} for s in scored.scores] == [
        {"format_think_answer": 1.0, "correctness_with_refusal": 2.0}] * len(items)
