"""The reward service over real gRPC, with factuality from real verification (lexical judge) and retrieval."""

from __future__ import annotations

import subprocess
import urllib.request

import pytest

from knowserve.reward.v1 import reward_service_pb2 as pb
from services.common.clients import RemoteError
from services.common.errors import Unavailable
from services.reward.core import ScoreItem
from tests.conftest import free_port, run_tool, tool


def completions_64() -> list[ScoreItem]:
    """64 rollouts of 4 questions: right, hallucinated, refusals, malformed — the mix a GRPO batch holds."""
    questions = [("Where was Marie Curie born?", ["Warsaw"], "Marie Curie was born in Warsaw in 1867."),
                 ("How high is Mount Everest?", ["8,849 metres", "8849 m"], "Mount Everest is 8,849 metres high."),
                 ("Where does the Danube end?", ["Black Sea", "the Black Sea"], "The Danube flows into the Black Sea."),
                 ("When was Marie Curie born?", ["1867"], "Marie Curie was born in Warsaw in 1867.")]
    wrong_thinks = ["Marie Curie was born in Berlin in 1871.", "Mount Everest is 7,200 metres high.",
                    "The Danube flows into the Caspian Sea.", "Marie Curie was born in 1871."]
    items = []
    for k in range(16):
        for (q, gold, fact), wrong in zip(questions, wrong_thinks):
            kind = k % 4
            if kind == 0:
                c = f"<think>{fact}</think><answer>{gold[0]}</answer>"
            elif kind == 1:
                c = f"<think>{wrong}</think><answer>{wrong.split()[-1].rstrip('.')}</answer>"
            elif kind == 2:
                c = "<think>I do not remember this.</think><answer>I don't know</answer>"
            else:
                c = f"{wrong} So the answer is {wrong.split()[-1]}"
            items.append(ScoreItem(q, c, gold))
    return items


async def test_score_a_batch_of_64_through_real_verification_and_retrieval(reward_stack):
    _, _, reward = reward_stack
    items = completions_64()
    reply = await reward.client.score("knowrl", items)
    assert (reply.recipe, reply.recipe_version) == ("knowrl", "1.0.0")
    assert len(reply.scores) == 64
    by_kind: dict[int, set[float]] = {}
    for i, s in enumerate(reply.scores):
        comps = {c.name: c for c in s.components}
        assert [c.name for c in s.components] == ["format_think_answer", "correctness_with_refusal", "factuality"]
        by_kind.setdefault(i // 4 % 4, set()).add(round(s.total, 6))
        if i // 4 % 4 == 0:  # right answer, supported think (1 claim < gamma: exp(1 - 10) penalty)
            assert s.total == pytest.approx(3.0)
            assert comps["factuality"].applicable and "1/1 claims supported" in comps["factuality"].detail
        elif i // 4 % 4 == 1:  # hallucination: wrong answer, refuted think -> -1 + 0 fact score
            assert comps["correctness_with_refusal"].detail == "INCORRECT"
            assert comps["factuality"].value == 0.0 and "refuted" in comps["factuality"].detail
            assert s.total == pytest.approx(1.0 - 1.0)
        elif i // 4 % 4 == 2:  # refusal
            assert comps["correctness_with_refusal"].detail == "NOT_ATTEMPTED" and s.total == pytest.approx(2.0)
        else:  # no tags at all
            assert s.total == pytest.approx(-1.0 - 1.0 + comps["factuality"].value)
            assert not comps["factuality"].applicable  # no <think> section: nothing to verify
    assert by_kind[0] == {3.0} and by_kind[2] == {2.0}


async def test_fact_score_0_4_through_the_real_verifier_gives_minus_1_6(reward_stack):
    """KnowRL's worked case end to end: 2 of 5 claims supported, gamma 1 (no length penalty) -> 0.4."""
    _, _, reward = reward_stack
    think = ("Marie Curie was born in Warsaw. Mount Everest is 8,849 metres high. Marie Curie was born in 1871. "
             "The Danube flows into the Caspian Sea. Mount Everest is 7,200 metres high.")
    spec = pb.Recipe(name="knowrl_gamma1", version="1", combine="knowrl", components=[
        pb.RecipeComponent(name="format_think_answer", weight=1),
        pb.RecipeComponent(name="correctness_with_refusal", weight=1),
        pb.RecipeComponent(name="factuality", weight=1, params={"gamma": "1", "section": "all"})])
    reply = await reward.client.score("", [ScoreItem("Where was Marie Curie born?", think + " Answer: Paris",
                                                     ["Warsaw"])], recipe_spec=spec)
    s = reply.scores[0]
    assert {c.name: c.value for c in s.components}["factuality"] == pytest.approx(0.4)
    assert s.total == pytest.approx(-1.6)


@pytest.mark.parametrize("recipe, spec, items, overrides, needle", [
    ("nope", None, [ScoreItem("q", "c", ["a"])], {}, "recipe: unknown recipe 'nope'"),
    ("", pb.Recipe(name="x", version="1", components=[pb.RecipeComponent(name="exact_match", weight=float("inf"))]),
     [ScoreItem("q", "c", ["a"])], {}, "recipe_spec.components[0].weight: must be a finite number"),
    ("search_r1_em", None, [ScoreItem("q", "c", ["a"])] * 9, {"max_items": 8}, "items: 9 items, above the limit of 8"),
    ("search_r1_em", None, [ScoreItem("q", "c" * 70_000, ["a"])], {}, "items[0].completion: is 70000 bytes"),
    ("search_r1_em", None, [ScoreItem("q", "c", ["a"]), ScoreItem("q", "c", [])], {},
     "items[1].gold_answers: required by component(s) ['exact_match']"),
    ("search_r1_em", None, [], {}, "items: at least one item"),
])
async def test_bad_input_is_invalid_argument_naming_item_and_field(start_reward, recipe, spec, items, overrides,
                                                                   needle):
    r = await start_reward(verification_target=f"127.0.0.1:{free_port()}", **overrides)
    with pytest.raises(RemoteError) as err:
        await r.client.score(recipe, items, recipe_spec=spec)
    assert err.value.code.name == "INVALID_ARGUMENT" and needle in str(err.value), str(err.value)
    assert await r.client.check_health() == "SERVING"


async def test_verification_down_is_unavailable_or_not_applicable_by_setting(start_reward):
    dead = f"127.0.0.1:{free_port()}"
    item = ScoreItem("Where was Marie Curie born?", "<think>She was born in Warsaw.</think><answer>Lyon</answer>",
                     ["Warsaw"])
    strict = await start_reward(verification_target=dead)
    with pytest.raises(Unavailable, match="factuality: verification"):
        await strict.client.score("knowrl", [item])
    lenient = await start_reward(verification_target=dead, on_verification_unavailable="not_applicable")
    s = (await lenient.client.score("knowrl", [item])).scores[0]
    fact = {c.name: c for c in s.components}["factuality"]
    assert not fact.applicable and "verification unavailable" in fact.detail
    assert s.total == pytest.approx(1.0 - 1.0)  # format +1, wrong answer -1 + (no fact score)
    # a recipe without factuality never needs verification
    assert (await strict.client.score("search_r1_em", [item])).scores[0].total == 0.0


async def test_list_recipes_grpcurl_and_metrics(reward_stack):
    _, _, reward = reward_stack
    names = [r.name for r in (await reward.client.list_recipes()).recipes]
    assert names == ["knowrl", "knowrl_adaptive_search", "r1_searcher_stage1", "r1_searcher_stage2", "refusal_aware",
                     "search_r1_em", "search_r1_format"]
    out = await run_tool(tool("grpcurl"), "-plaintext", "-d",
                         '{"recipe": "refusal_aware", "items": [{"completion": "<answer>Paris</answer>", '
                         '"goldAnswers": ["Paris"]}]}', reward.server.address,
                         "knowserve.reward.v1.RewardService/Score")
    assert out.returncode == 0, out.stderr
    assert '"total": 1' in out.stdout and '"recipe_version": "1.0.0"' in out.stdout
    await reward.client.score("knowrl", completions_64()[:16])  # right, hallucinated and refused answers
    text = urllib.request.urlopen(f"http://127.0.0.1:{reward.server.metrics_port}/metrics").read().decode()
    assert 'knowserve_reward_answers_total{grade="not_attempted",recipe="knowrl"}' in text
    assert 'knowserve_reward_component_value_bucket{component="factuality",le="0.0",recipe="knowrl"}' in text
    assert 'knowserve_reward_total_value_count{recipe="knowrl"}' in text
    check = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


async def test_the_answers_metric_counts_the_grade_the_recipe_gave(start_reward):
    """An answer that only covers the gold is INCORRECT by exact match but CORRECT for a recipe that grades by
    cover match: the hallucination metric must count what the recipe rewarded."""
    r = await start_reward(verification_target=f"127.0.0.1:{free_port()}")
    spec = pb.Recipe(name="cover_graded", version="1", components=[
        pb.RecipeComponent(name="correctness_with_refusal", weight=1, params={"match": "cover"})])
    reply = await r.client.score("", [ScoreItem("Capital of France?", "<answer>the city of Paris</answer>", ["Paris"]),
                                      ScoreItem("Capital of France?", "<answer>Lyon</answer>", ["Paris"])],
                                 recipe_spec=spec)
    assert [s.components[0].detail for s in reply.scores] == ["CORRECT", "INCORRECT"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{r.server.metrics_port}/metrics").read().decode()
    assert 'knowserve_reward_answers_total{grade="correct",recipe="cover_graded"} 1.0' in text
    assert 'knowserve_reward_answers_total{grade="incorrect",recipe="cover_graded"} 1.0' in text
