"""Scoring without gRPC: a batch of (prompt, completion, gold answers) under a recipe -> per-component rewards.

Every component and combiner comes from the registry in :mod:`services.reward.components`; the core knows none of
them by name. All components of a recipe run concurrently on the batch (``factuality`` is one Verify request for
the whole batch; the pure ones share a worker thread each). A component that cannot score an item reports
``applicable=False`` and does not count in the total.

Completions are cut at the first end-of-sequence marker first (``KNOWSERVE_REWARD_END_MARKERS``; by default
:data:`services.common.text.END_MARKERS`): a formatted answer followed by ``<|im_end|>`` is the formatted answer.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

from services.common.errors import InvalidArgument, KnowserveError, check_text
from services.common.grading import grade
from services.common.text import strip_end_markers
from services.reward.components import (COMBINERS, COMPONENTS, GOLD, ComponentValue, FactResult, FactualityFn,
                                        ScoreItem, Services)
from services.reward.config import RewardSettings
from services.reward.recipes import Recipe, build_recipe

if TYPE_CHECKING:
    from services.generation.client import GreedyFn

__all__ = ["FactResult", "ItemScore", "RewardCore", "ScoreItem"]

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
class ItemScore:
    total: float
    components: list[ComponentValue]


class RewardCore:
    """``await core.score("knowrl", None, [ScoreItem(...)])`` -> (recipe, [ItemScore])"""

    def __init__(self, settings: RewardSettings, recipes: dict[str, Recipe], factuality: FactualityFn | None,
                 llm_generate: GreedyFn | None = None):
        self.settings = settings
        self.recipes = recipes
        # None: not configured (factuality then fails the call; grader: llm is refused)
        self.services = Services(factuality, llm_generate, settings.factuality_judge,
                                 settings.on_verification_unavailable)

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
        gold_users = [c.name for c in recipe.components if GOLD in COMPONENTS[c.name].needs]
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

    async def score(self, name: str, spec: Mapping | None,
                    items: Sequence[ScoreItem]) -> tuple[Recipe, list[ItemScore]]:
        recipe = self.resolve(name, spec)
        self._validate(recipe, items)
        markers = tuple(self.settings.end_markers)
        items = [replace(it, completion=strip_end_markers(it.completion, markers)) for it in items]
        per_component = await asyncio.gather(*(COMPONENTS[c.name].score(items, self.services, **c.params)
                                               for c in recipe.components))
        combine = COMBINERS[recipe.combine].fn
        scores = []
        for i in range(len(items)):
            values = {c.name: ComponentValue(c.name, v[i].value, c.weight, v[i].applicable, v[i].detail, v[i].grade)
                      for c, v in zip(recipe.components, per_component)}
            total = combine(values)
            if not math.isfinite(total):
                raise KnowserveError(f"recipe {recipe.name} produced a non-finite total")  # a bug, not bad input
            scores.append(ItemScore(total, list(values.values())))
        self._observe(recipe, scores, [self._answer_grade(recipe, s, it) for s, it in zip(scores, items)])
        return recipe, scores

    @staticmethod
    def _answer_grade(recipe: Recipe, score: ItemScore, it: ScoreItem) -> str | None:
        """The grade the recipe gave the answer (its first grading component's, after an LLM grader), for the
        answers metric; the platform grader's default when no component grades; None without gold answers or
        when the LLM grader's reply was unusable."""
        for c, v in zip(recipe.components, score.components):
            if COMPONENTS[c.name].grades:
                return v.grade if v.applicable else None
        return grade(it.completion, it.gold_answers) if it.gold_answers else None

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
