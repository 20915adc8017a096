"""Scoring without gRPC: a batch of (prompt, completion, gold answers) under a recipe -> per-component rewards.

Local components are pure functions (:mod:`services.reward.components`). ``factuality`` calls the verification
service once for the whole batch (one Verify request, claims judged together), concurrently with the local
work. A component that cannot score an item reports ``applicable=False`` and does not count in the total.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from services.common.errors import FailedPrecondition, InvalidArgument, KnowserveError, Unavailable, check_text
from services.reward import components as C
from services.reward.config import RewardSettings
from services.reward.recipes import COMPONENTS, Recipe, build_recipe

REWARD_BUCKETS = (-3, -2, -1.5, -1, -0.75, -0.5, -0.25, 0, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 4)
TOTAL = Histogram("knowserve_reward_total_value", "Total reward per scored item, by recipe.", ["recipe"],
                  buckets=REWARD_BUCKETS)
COMPONENT = Histogram("knowserve_reward_component_value", "Reward component value per scored item.",
                      ["recipe", "component"], buckets=REWARD_BUCKETS)
GRADES = Counter("knowserve_reward_answers", "Graded answers by grade: correct, incorrect (hallucinated), "
                 "not_attempted (refusal), missing.", ["recipe", "grade"])
NOT_APPLICABLE = Counter("knowserve_reward_not_applicable", "Component values that could not be computed.",
                         ["recipe", "component"])
ITEMS = Counter("knowserve_reward_items", "Items scored, by recipe.", ["recipe"])


@dataclass
class ScoreItem:
    prompt: str = ""
    completion: str = ""
    gold_answers: Sequence[str] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass
class ComponentValue:
    name: str
    value: float
    weight: float
    applicable: bool = True
    detail: str = ""


@dataclass
class ItemScore:
    total: float
    components: list[ComponentValue]


@dataclass
class FactResult:
    """What the verification service said about one completion's checked section."""

    score: float | None  # length-penalized FActScore; None when not applicable
    detail: str


# (completions, section, judge, gamma, evidence_top_k, topics) -> one FactResult per completion
FactualityFn = Callable[[list[str], str, str, float, int, list[str]], Awaitable[list[FactResult]]]


class RewardCore:
    """``await core.score("knowrl", None, [ScoreItem(...)])`` -> (recipe, [ItemScore])"""

    def __init__(self, settings: RewardSettings, recipes: dict[str, Recipe], factuality: FactualityFn | None,
                 llm_generate=None):
        self.settings = settings
        self.recipes = recipes
        self.factuality = factuality  # None: no verification configured (factuality then fails the call)
        self.llm_generate = llm_generate  # the generation service for grader: llm (None: not configured)

    def resolve(self, name: str, spec: Mapping | None) -> Recipe:
        if spec:
            recipe = build_recipe(spec, where="recipe_spec", max_components=self.settings.max_components)
            if name and name != recipe.name:
                raise InvalidArgument("recipe", f"names {name!r} but recipe_spec is {recipe.name!r}; send one")
            return recipe
        if not name:
            raise InvalidArgument("recipe", f"name a recipe ({sorted(self.recipes)}) or send recipe_spec")
        if name not in self.recipes:
            raise InvalidArgument("recipe", f"unknown recipe {name!r}; known: {sorted(self.recipes)}")
        return self.recipes[name]

    def _validate(self, recipe: Recipe, items: Sequence[ScoreItem]) -> None:
        s = self.settings
        if not items:
            raise InvalidArgument("items", "at least one item is required")
        if len(items) > s.max_items:
            raise InvalidArgument("items", f"{len(items)} items, above the limit of {s.max_items}")
        gold_users = [c.name for c in recipe.components if COMPONENTS[c.name].needs_gold]
        for i, it in enumerate(items):
            check_text(f"items[{i}].completion", it.completion, max_bytes=s.max_completion_bytes, allow_empty=True)
            check_text(f"items[{i}].prompt", it.prompt, max_bytes=s.max_prompt_bytes, allow_empty=True)
            if len(it.gold_answers) > s.max_gold_answers:
                raise InvalidArgument(f"items[{i}].gold_answers", f"{len(it.gold_answers)} answers, above the "
                                      f"limit of {s.max_gold_answers}")
            for j, g in enumerate(it.gold_answers):
                check_text(f"items[{i}].gold_answers[{j}]", g, max_bytes=s.max_gold_answer_bytes)
            if gold_users and not it.gold_answers:
                raise InvalidArgument(f"items[{i}].gold_answers", f"required by component(s) {gold_users} of "
                                      f"recipe {recipe.name!r}")
        corr = recipe.component("correctness_with_refusal")
        if corr is not None and corr.params["grader"] == "llm" and self.llm_generate is None:
            raise FailedPrecondition("correctness grader 'llm' needs the generation service: set "
                                     "KNOWSERVE_REWARD_GENERATION_TARGET, or use grader 'match'")

    async def _facts(self, recipe: Recipe, items: Sequence[ScoreItem]) -> list[FactResult] | None:
        comp = recipe.component("factuality")
        if comp is None:
            return None
        p = comp.params
        try:
            if self.factuality is None:
                raise Unavailable("factuality needs the verification service: set KNOWSERVE_REWARD_VERIFICATION_TARGET")
            return await self.factuality([it.completion for it in items], p["section"],
                                         p["judge"] or self.settings.factuality_judge, p["gamma"],
                                         p["evidence_top_k"], [it.metadata.get("topic", "") for it in items])
        except Unavailable as e:
            if self.settings.on_verification_unavailable == "fail":
                raise Unavailable(f"factuality: {e}") from None
            return [FactResult(None, f"not applicable: verification unavailable ({e})") for _ in items]

    async def score(self, name: str, spec: Mapping | None, items: Sequence[ScoreItem]) -> tuple[Recipe, list[ItemScore]]:
        recipe = self.resolve(name, spec)
        self._validate(recipe, items)
        # the verification call, the LLM grader and the local components (in a worker thread) run at once
        facts, llm_grades, local = await asyncio.gather(
            self._facts(recipe, items), self._llm_grades(recipe, items),
            asyncio.to_thread(lambda: [self._local(recipe, it) for it in items]))
        if llm_grades is not None:
            for values, graded in zip(local, llm_grades):
                self._apply_llm_grade(values, graded)
        scores = [self._combine(recipe, values, facts[i] if facts else None) for i, values in enumerate(local)]
        self._observe(recipe, scores, [self._answer_grade(values, it) for values, it in zip(local, items)])
        return recipe, scores

    async def _llm_grades(self, recipe: Recipe, items: Sequence[ScoreItem]) -> list | None:
        """SimpleQA-style grades from the generation service for items with an answer (None: not configured)."""
        comp = recipe.component("correctness_with_refusal")
        if comp is None or comp.params["grader"] != "llm":
            return None
        from services.reward.grader import grade_with_llm

        answers = [C.last_answer(it.completion) for it in items]
        asked = [i for i, a in enumerate(answers) if a]
        graded = await grade_with_llm(self.llm_generate, [items[i].prompt for i in asked],
                                      [items[i].gold_answers for i in asked], [answers[i] for i in asked])
        out: list = [None] * len(items)  # None: no answer, the match grade (MISSING) stands
        for i, g in zip(asked, graded):
            out[i] = g
        return out

    @staticmethod
    def _apply_llm_grade(values: dict[str, ComponentValue], graded) -> None:
        if graded is None:
            return
        grade, raw = graded
        v = values["correctness_with_refusal"]
        if grade is None:
            v.applicable, v.value, v.detail = False, 0.0, f"not applicable: grader answered {raw!r}"
        else:
            v.value, v.detail = C.correctness_with_refusal(grade), grade

    @staticmethod
    def _answer_grade(values: dict[str, ComponentValue], it: ScoreItem) -> str | None:
        """The grade the recipe gave the answer (its correctness component's, after an LLM grader), for the
        answers metric; an exact-match grade when no component grades; None without gold answers or when the
        LLM grader's reply was unusable."""
        for name in ("correctness_with_refusal", "refusal_aware"):
            v = values.get(name)
            if v is not None:
                return v.detail if v.applicable and v.detail in C.GRADES else None
        return C.grade_answer(it.completion, list(it.gold_answers)) if it.gold_answers else None

    @staticmethod
    def _local(recipe: Recipe, it: ScoreItem) -> dict[str, ComponentValue]:
        """Values of every local component of one item."""
        out: dict[str, ComponentValue] = {}
        golds = list(it.gold_answers)
        answer = C.last_answer(it.completion)
        for comp in recipe.components:
            p, n, w = comp.params, comp.name, comp.weight
            if n == "format_think_answer":
                out[n] = ComponentValue(n, C.format_think_answer(it.completion), w)
            elif n == "correctness_with_refusal":
                g = C.grade_answer(it.completion, golds, p["match"])
                out[n] = ComponentValue(n, C.correctness_with_refusal(g), w, detail=g)
            elif n == "retrieval_used":
                k = C.retrieval_exchanges(it.completion)
                out[n] = ComponentValue(n, C.retrieval_used(it.completion, p["reward"]), w, detail=f"{k} exchange(s)")
            elif n == "format_r1_searcher":
                limits = {k: p[k] for k in ("max_answer_words", "max_query_words", "max_queries")}
                problems = C.r1_searcher_format_problems(it.completion, golds, **limits)
                value = C.format_r1_searcher(it.completion, golds, p["stage"], p["bonus"], p["penalty"], **limits)
                out[n] = ComponentValue(n, value, w, detail="; ".join(problems) or "well-formed")
            elif n in ("answer_f1", "exact_match", "cover_exact_match"):
                fn = {"answer_f1": C.answer_f1, "exact_match": C.exact_match, "cover_exact_match": C.cover_exact_match}[n]
                value = fn(answer, golds) if answer is not None else 0.0
                out[n] = ComponentValue(n, value, w, detail="no <answer>" if answer is None else "")
            elif n == "search_r1_format":
                valid, why = C.search_r1_valid_sequence(it.completion)
                value = C.search_r1_format(it.completion, golds, p["structure_format_score"],
                                           p["final_format_score"], p["retrieval_score"], p["score"])
                out[n] = ComponentValue(n, float(value), w, detail=f"sequence {why}")
            elif n == "refusal_aware":
                g = C.grade_answer(it.completion, golds, p["match"])
                out[n] = ComponentValue(n, C.refusal_aware(g, p["correct"], p["abstain"], p["wrong"]), w, detail=g)
        return out

    @staticmethod
    def _combine(recipe: Recipe, values: dict[str, ComponentValue], fact: FactResult | None) -> ItemScore:
        if fact is not None:
            comp = recipe.component("factuality")
            values["factuality"] = ComponentValue("factuality", fact.score if fact.score is not None else 0.0,
                                                  comp.weight, applicable=fact.score is not None, detail=fact.detail)
        ordered = [values[c.name] for c in recipe.components]
        if recipe.combine == "knowrl":
            corr, facts = values["correctness_with_refusal"], values["factuality"]
            refusal = corr.detail == C.NOT_ATTEMPTED
            merged = C.knowrl_merge(corr.value, refusal,
                                    facts.weight * facts.value if facts.applicable else None)
            total = corr.weight * merged + sum(v.weight * v.value for v in ordered
                                               if v.applicable and v.name not in ("correctness_with_refusal",
                                                                                  "factuality"))
            used = corr.value == -1.0 and not refusal
            facts.detail = f"{facts.detail}; {'merged into' if used else 'not used by'} correctness (knowrl)"
        else:
            total = sum(v.weight * v.value for v in ordered if v.applicable)
        if not math.isfinite(total):
            raise KnowserveError(f"recipe {recipe.name} produced a non-finite total")  # a bug, not bad input
        return ItemScore(total, ordered)

    @staticmethod
    def _observe(recipe: Recipe, scores: list[ItemScore], grades: list[str | None]) -> None:
        ITEMS.labels(recipe.name).inc(len(scores))
        for s, g in zip(scores, grades):
            TOTAL.labels(recipe.name).observe(s.total)
            for c in s.components:
                if c.applicable:
                    COMPONENT.labels(recipe.name, c.name).observe(c.value)
                else:
                    NOT_APPLICABLE.labels(recipe.name, c.name).inc()
            if g is not None:
                GRADES.labels(recipe.name, g.lower()).inc()
