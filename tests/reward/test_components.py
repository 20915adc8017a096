"""The seed papers' worked cases, through the pure components and the recipe arithmetic of RewardCore."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.reward import components as C
from services.reward.config import RewardSettings
from services.reward.core import FactResult, RewardCore, ScoreItem
from services.reward.recipes import build_recipe, load_recipes

FORMATTED_CORRECT = "<think>The capital of France is Paris.</think><answer>Paris</answer>"
UNFORMATTED_WRONG = "The capital of France is Lyon. Answer: Lyon"


def core_with_fact_score(score: float | None) -> RewardCore:
    """RewardCore whose factuality source returns a fixed score: isolates the recipe arithmetic under test.
    (The same numbers through the real verification service are checked in test_service.py.)"""

    async def facts(completions, *args):
        return [FactResult(score, "fixed") for _ in completions]

    return RewardCore(RewardSettings(port=0, metrics_port=None), load_recipes(), facts)


async def test_knowrl_formatted_correct_scores_3_and_unformatted_wrong_with_fact_04_scores_minus_1_6():
    _, [good] = await core_with_fact_score(0.9).score("knowrl", None, [ScoreItem("Capital of France?",
                                                                                 FORMATTED_CORRECT, ["Paris"])])
    assert good.total == pytest.approx(3.0)
    assert {c.name: c.value for c in good.components} == {"format_think_answer": 1.0,
                                                          "correctness_with_refusal": 2.0, "factuality": 0.9}
    _, [bad] = await core_with_fact_score(0.4).score("knowrl", None, [ScoreItem("Capital of France?",
                                                                                UNFORMATTED_WRONG, ["Paris"])])
    assert bad.total == pytest.approx(-1.6)
    assert [c.detail for c in bad.components][:2] == ["", "MISSING"]


async def test_knowrl_refusal_keeps_plus_one_and_ignores_the_fact_score():
    refusal = "<think>I have no reliable memory of this.</think><answer>I don't know</answer>"
    _, [s] = await core_with_fact_score(0.0).score("knowrl", None, [ScoreItem("Q?", refusal, ["Paris"])])
    assert s.total == pytest.approx(1.0 + 1.0)
    wrong = "<think>It is Lyon.</think><answer>Lyon</answer>"
    _, [w] = await core_with_fact_score(0.5).score("knowrl", None, [ScoreItem("Q?", wrong, ["Paris"])])
    assert w.total == pytest.approx(1.0 + (-1.0 + 0.5))


def test_r1_searcher_stage1_one_retrieval_and_right_format():
    completion = ("<think>I should look this up. <|begin_of_query|>capital of France<|end_of_query|>"
                  "<|begin_of_documents|>(1) Paris is the capital of France.<|end_of_documents|>"
                  "The documents say Paris.</think><answer>Paris</answer>")
    assert C.retrieval_used(completion) == 0.5
    assert C.format_r1_searcher(completion, stage=1) == 0.5
    assert C.format_r1_searcher(completion, ["Paris"], stage=2) == 0.0
    no_docs = completion.replace("<|begin_of_documents|>(1) Paris is the capital of France.<|end_of_documents|>", "")
    assert C.retrieval_used(no_docs) == 0.0 and C.format_r1_searcher(no_docs, stage=1) == 0.0
    assert C.format_r1_searcher(no_docs, stage=2) == -2.0
    assert C.format_r1_searcher(no_docs, stage=2, penalty=-1.0) == -1.0


async def test_r1_searcher_recipes_through_the_core():
    completion = ("<think><|begin_of_query|>capital of France<|end_of_query|><|begin_of_documents|>Paris is the "
                  "capital.<|end_of_documents|></think><answer>the city of Paris</answer>")
    core = core_with_fact_score(None)
    _, [s1] = await core.score("r1_searcher_stage1", None, [ScoreItem("Q", completion)])
    assert s1.total == pytest.approx(1.0)
    _, [s2] = await core.score("r1_searcher_stage2", None, [ScoreItem("Q", completion, ["Paris"])])
    assert s2.total == pytest.approx(C.answer_f1("the city of Paris", ["Paris"]))  # 0.5: "city", "of", "paris"
    too_long = completion.replace("the city of Paris", "it might be Paris or Lyon or Marseille or Nice or Lille maybe")
    _, [s3] = await core.score("r1_searcher_stage2", None, [ScoreItem("Q", too_long, ["Paris"])])
    assert s3.components[1].value == -2.0 and "answer of 13 words" in s3.components[1].detail


async def test_search_r1_em_ignores_the_prompts_own_example_answer():
    prompt = ("Answer the question. Think in <think></think>, search with <search> query </search>, and give the "
              "final answer in <answer></answer>, e.g. <answer> Beijing </answer>. Question: capital of China?")
    core = core_with_fact_score(None)
    _, scores = await core.score("search_r1_em", None, [
        ScoreItem(prompt, "<think>I think it is Beijing</think>", ["Beijing"]),  # no answer of its own
        ScoreItem(prompt, "<think>easy</think><answer> beijing </answer>", ["Beijing"]),
        ScoreItem(prompt, "<think>x</think><answer>Shanghai</answer><answer>Beijing</answer>", ["Beijing"]),
    ])
    assert [s.total for s in scores] == [0.0, 1.0, 1.0]  # the last <answer> counts, as in Search-R1


async def test_refusal_aware_and_a_user_recipe():
    core = core_with_fact_score(None)
    items = [ScoreItem("Q", "<answer>Paris</answer>", ["Paris"]), ScoreItem("Q", "<answer>I'm not sure</answer>",
                                                                            ["Paris"]),
             ScoreItem("Q", "<answer>Rome</answer>", ["Paris"])]
    _, scores = await core.score("refusal_aware", None, items)
    assert [s.total for s in scores] == [1.0, 0.0, -1.0]
    spec = {"name": "mine", "version": "0.1", "components": [
        {"name": "refusal_aware", "weight": 2, "params": {"abstain": "0.25"}},
        {"name": "cover_exact_match", "weight": 0.5}]}
    recipe, scores = await core.score("", spec, items)
    assert (recipe.name, recipe.version) == ("mine", "0.1")
    assert [s.total for s in scores] == [2.5, 0.5, -2.0]


@pytest.mark.parametrize("spec, field", [
    ({"name": "x", "version": "1", "components": [{"name": "nope"}]}, "recipe.components[0].name"),
    ({"name": "x", "version": "1", "components": [{"name": "exact_match", "weight": float("nan")}]},
     "recipe.components[0].weight"),
    ({"name": "x", "version": "1", "components": [{"name": "refusal_aware", "params": {"abstain": "lots"}}]},
     "recipe.components[0].params.abstain"),
    ({"name": "x", "version": "1", "components": [{"name": "exact_match", "params": {"k": "1"}}]},
     "recipe.components[0].params"),
    ({"name": "x", "version": "1", "combine": "knowrl", "components": [{"name": "exact_match"}]}, "recipe.combine"),
    ({"name": "x", "components": [{"name": "exact_match"}]}, "recipe.version"),
])
def test_bad_recipes_name_the_field(spec, field):
    with pytest.raises(InvalidArgument) as err:
        build_recipe(spec)
    assert err.value.field == field, str(err.value)


def test_builtin_recipes_are_the_seed_recipes():
    assert sorted(load_recipes()) == ["knowrl", "knowrl_adaptive_search", "r1_searcher_stage1", "r1_searcher_stage2",
                                      "refusal_aware", "search_r1_em", "search_r1_format"]


async def test_adaptive_search_pays_a_known_answer_more_without_a_search():
    """IKEA's knowledge-boundary reward on top of KnowRL: the same right answer earns 0.5 more closed-book than
    after a search; a search is still worth it where it turns a wrong answer into a right one."""
    search = ("<|begin_of_query|> capital of France<|end_of_query|>\n<|begin_of_documents|>\n(1) Paris: Paris is "
              "the capital of France.\n<|end_of_documents|>\n")
    items = [ScoreItem("Capital of France?", FORMATTED_CORRECT, ["Paris"]),
             ScoreItem("Capital of France?", f"<think>{search}The capital is Paris.</think><answer>Paris</answer>",
                       ["Paris"]),
             ScoreItem("Capital of France?", "<think>It is Lyon.</think><answer>Lyon</answer>", ["Paris"])]
    _, scores = await core_with_fact_score(0.0).score("knowrl_adaptive_search", None, items)
    economy = [next(c for c in s.components if c.name == "search_economy") for s in scores]
    assert [c.value for c in economy] == [0.5, 0.0, 0.0]
    assert [c.detail for c in economy] == ["CORRECT, 0 search(es)", "CORRECT, 1 search(es)",
                                           "INCORRECT, 0 search(es)"]
    assert [s.total for s in scores] == pytest.approx([3.5, 3.0, 0.0])  # wrong: format +1, -1 + fact score 0
