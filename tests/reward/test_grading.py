"""One grading rule: the reward service and `knowserve eval` grade the same answers identically when they state the
same options, and neither is fooled by a model's end-of-turn marker."""

from __future__ import annotations

import pytest

from knowserve.reward.v1 import reward_service_pb2 as pb
from services.common.grading import GRADES
from services.reward.core import ScoreItem
from training.data import QaRow
from training.eval import EvalConfig, grade_options, grade_record

GOLD = ["William Shakespeare", "Shakespeare"]
COMPLETIONS = [
    "<think>It is a tragedy by Shakespeare.</think><answer>William Shakespeare</answer>",
    "<think>Hmm.</think><answer>William Shakespeare</answer><|im_end|>",  # raw model output: the end marker stays
    "<answer>It was written by William Shakespeare.</answer>",
    "<answer>Christopher Marlowe</answer>",
    "<answer>I don't know</answer>",
    "<answer> </answer>",
    "Hamlet was written by William Shakespeare.<|im_end|>",  # no tags: answer_tag finds nothing
    "William Shakespeare.\nHe wrote it around 1600.",
    "<think>x</think><answer>Shakesp",  # cut off by the token limit
    "Shakespeare<|endoftext|><|im_end|>",
    "",
]


@pytest.mark.parametrize("answer_from", ["answer_tag", "answer_tag_or_text"])
@pytest.mark.parametrize("match", ["exact", "cover", "contains"])
async def test_reward_and_eval_grade_identically(start_reward, answer_from, match):
    reward = await start_reward(verification_target="")
    spec = pb.Recipe(name="grade", version="1", components=[pb.RecipeComponent(
        name="correctness_with_refusal", weight=1, params={"match": match, "answer_from": answer_from})])
    reply = await reward.client.score("", [ScoreItem("Who wrote Hamlet?", c, GOLD) for c in COMPLETIONS],
                                      recipe_spec=spec)
    by_reward = [s.components[0].detail for s in reply.scores]
    options = grade_options(EvalConfig(dataset="x.jsonl", match=match, answer_from=answer_from))
    row = QaRow("q", "Who wrote Hamlet?", GOLD)
    by_eval = [grade_record(c, row, options)["grade"] for c in COMPLETIONS]
    assert by_reward == by_eval
    assert set(by_eval) <= set(GRADES)
    # the end marker never changes a grade: the raw completion grades like the text the service returns
    assert by_eval[1] == by_eval[0] == "CORRECT"
    assert by_eval[4] == "NOT_ATTEMPTED" and by_eval[5] == "MISSING" and by_eval[3] == "INCORRECT"


def test_eval_defaults_grade_a_chat_answer_with_its_end_marker_correct():
    options = grade_options(EvalConfig(dataset="x.jsonl"))  # answer_tag_or_text + contains
    row = QaRow("q", "Who wrote Hamlet?", ["William Shakespeare"])
    record = grade_record("Hamlet was written by William Shakespeare.<|im_end|>", row, options)
    assert record == {"completion": "Hamlet was written by William Shakespeare.",
                      "answer": "Hamlet was written by William Shakespeare.", "grade": "CORRECT"}


async def test_format_reward_ignores_the_end_marker(start_reward):
    reward = await start_reward(verification_target="")
    spec = pb.Recipe(name="fmt", version="1", components=[pb.RecipeComponent(name="format_think_answer", weight=1)])
    formatted = "<think>Hamlet is by Shakespeare.</think><answer>William Shakespeare</answer>"
    reply = await reward.client.score("", [ScoreItem("q", formatted), ScoreItem("q", formatted + "<|im_end|>"),
                                           ScoreItem("q", formatted + "<|eot_id|>\n")], recipe_spec=spec)
    assert [s.total for s in reply.scores] == [1.0, 1.0, 1.0]
