"""knowserve rewards as TRL reward functions: ``(prompts, completions, **columns) -> list[float | None]``.

Use them in TRL's ``GRPOTrainer`` unchanged::

    rewards = KnowserveRewards("knowrl", verification_target="127.0.0.1:50052")   # in-process recipe
    rewards = KnowserveRewards("knowrl", target="127.0.0.1:50053")                # through the reward service
    funcs, weights = rewards.trl_reward_funcs()          # the total (weight 1) + each component (weight 0, logged)
    GRPOTrainer(model, reward_funcs=funcs, args=GRPOConfig(reward_weights=weights, ...), train_dataset=ds)

The dataset's ``gold_answers`` column (a string or a list of aliases; the name is configurable) becomes each
item's gold answers; a ``topic`` column, if present, goes to the verifier with the claims. Conversational
prompts/completions (lists of ``{"role", "content"}``) are reduced to the last user message and the assistant
text. TRL calls every reward function on the same batch: the batch is scored once and the components are read
from that one result. A component that is not applicable to an item returns ``None`` (TRL turns it into NaN
and leaves it out of the logged mean).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from services.reward.core import ItemScore, ScoreItem

RewardFunc = Callable[..., list[float | None]]


def _text(x: Any, role: str) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, Sequence):  # conversational: [{"role": ..., "content": ...}, ...]
        parts = [m.get("content", "") for m in x if isinstance(m, Mapping) and m.get("role") == role]
        if role == "user":
            return parts[-1] if parts else ""
        return "".join(p if isinstance(p, str) else "" for p in parts)
    return str(x)


def _golds(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


class KnowserveRewards:
    """Score batches under one recipe, in-process (``target=None``) or through the reward service."""

    def __init__(self, recipe: str | Mapping, *, target: str | None = None, verification_target: str | None = None,
                 gold_column: str = "gold_answers", settings=None, client_options=None):
        self.recipe_name = recipe if isinstance(recipe, str) else str(recipe.get("name", ""))
        self.recipe_spec = None if isinstance(recipe, str) else dict(recipe)
        self.target = target
        self.verification_target = verification_target
        self.gold_column = gold_column
        self._settings = settings
        self._client_options = client_options  # e.g. long UNAVAILABLE retries, so a restarted service is waited for
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="knowserve-rewards", daemon=True)
        self._thread.start()
        self._backend = None
        self._spec_proto = None  # the inline recipe as a proto (service mode), built once by _resolve
        self._cache: tuple[tuple, list[ItemScore]] | None = None
        self._lock = threading.Lock()
        self.components = [c.name for c in self._run(self._resolve()).components]

    # -- plumbing: every coroutine runs on one private loop, where the gRPC channels live
    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _open(self):
        if self._backend is None:
            if self.target:
                from services.reward.client import RewardClient

                self._backend = RewardClient(self.target, self._client_options)
            else:
                from services.reward.config import RewardSettings
                from services.reward.server import RewardApp

                settings = self._settings or RewardSettings(
                    port=0, metrics_port=None, **({"verification_target": self.verification_target}
                                                  if self.verification_target else {}))
                app = RewardApp(settings)
                await app.startup()
                self._backend = app
        return self._backend

    async def _resolve(self):
        backend = await self._open()
        if self.target:
            if self.recipe_spec is not None:  # an inline recipe: validated here, sent as this proto every batch
                from services.reward.recipes import build_recipe
                from services.reward.server import recipe_to_proto

                recipe = build_recipe(self.recipe_spec)
                self._spec_proto = recipe_to_proto(recipe)
                return recipe
            listed = {r.name: r for r in (await backend.list_recipes()).recipes}
            if self.recipe_name not in listed:
                raise ValueError(f"the reward service has no recipe {self.recipe_name!r}; it has {sorted(listed)}")
            return listed[self.recipe_name]
        return backend.core.resolve(self.recipe_name, self.recipe_spec)

    async def _score(self, items: list[ScoreItem]) -> list[ItemScore]:
        backend = await self._open()
        if not self.target:
            _, scores = await backend.core.score(self.recipe_name, self.recipe_spec, items)
            return scores
        from services.reward.components import ComponentValue

        spec = self._spec_proto
        reply = await backend.score("" if spec is not None else self.recipe_name, items, recipe_spec=spec)
        return [ItemScore(s.total, [ComponentValue(c.name, c.value, c.weight, c.applicable, c.detail)
                                    for c in s.components]) for s in reply.scores]

    def score(self, prompts: Sequence, completions: Sequence, **columns) -> list[ItemScore]:
        """Score one batch (cached: TRL calls each reward function with the same batch)."""
        key = (tuple(map(repr, prompts)), tuple(map(repr, completions)), repr(columns.get(self.gold_column)))
        with self._lock:
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            golds = columns.get(self.gold_column) or [None] * len(completions)
            topics = columns.get("topic") or [""] * len(completions)
            items = [ScoreItem(_text(p, "user"), _text(c, "assistant"), _golds(g),
                               {"topic": str(t)} if t else {})
                     for p, c, g, t in zip(prompts, completions, golds, topics)]
            scores = self._run(self._score(items))
            self._cache = (key, scores)
            return scores

    # -- the TRL-facing functions
    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        return [s.total for s in self.score(prompts, completions, **columns)]

    def total_func(self) -> RewardFunc:
        def reward(prompts, completions, **columns):
            return self(prompts, completions, **columns)

        reward.__name__ = f"knowserve_{self.recipe_name}"
        return reward

    def component_func(self, name: str) -> RewardFunc:
        if name not in self.components:
            raise ValueError(f"recipe {self.recipe_name!r} has no component {name!r}; it has {self.components}")

        def reward(prompts, completions, **columns):
            out = []
            for s in self.score(prompts, completions, **columns):
                c = next(c for c in s.components if c.name == name)
                out.append(c.value if c.applicable else None)
            return out

        reward.__name__ = f"knowserve_{self.recipe_name}_{name}"
        return reward

    def trl_reward_funcs(self) -> tuple[list[RewardFunc], list[float]]:
        """Reward functions and ``reward_weights`` for GRPOConfig: the recipe total counts (weight 1); each
        component is logged by TRL but weighs 0, so the recipe's own combine rule (e.g. KnowRL's merge) holds."""
        funcs = [self.total_func()] + [self.component_func(n) for n in self.components]
        return funcs, [1.0] + [0.0] * len(self.components)

    def close(self) -> None:
        async def shutdown():
            if self._backend is not None:
                if self.target:
                    await self._backend.close()
                else:
                    await self._backend.shutdown()

        if self._loop.is_running():
            self._run(shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
