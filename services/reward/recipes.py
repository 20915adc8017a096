"""Recipes: named, versioned compositions of reward components with weights and parameters.

Built-in recipes are the YAML files in ``services/reward/recipes/``; users add their own in a folder
(``KNOWSERVE_REWARD_RECIPES_DIR``) or send one inline with a Score request. Every recipe is validated when it
is loaded: unknown components or parameters, non-finite weights and impossible combinations are rejected with
a message that names the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.common.errors import InvalidArgument
from services.reward.components import COMBINERS, COMPONENTS

BUILTIN_DIR = Path(__file__).with_name("recipes")


@dataclass(frozen=True)
class RecipeComponent:
    name: str
    weight: float
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Recipe:
    name: str
    version: str
    components: tuple[RecipeComponent, ...]
    combine: str = "sum"
    description: str = ""

    def component(self, name: str) -> RecipeComponent | None:
        return next((c for c in self.components if c.name == name), None)


def _coerce(field_name: str, value: Any, default: Any) -> Any:
    """Parameters arrive as strings from protobuf maps; convert to the default's type."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if isinstance(default, int):
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        if isinstance(default, float):
            out = float(value)
            if not math.isfinite(out):
                raise InvalidArgument(field_name, f"must be a finite number, got {value!r}")
            return out
        return str(value)
    except (TypeError, ValueError):
        raise InvalidArgument(field_name, f"expected {type(default).__name__}, got {value!r}") from None


def build_recipe(data: Mapping[str, Any], where: str = "recipe", max_components: int = 16) -> Recipe:
    """A validated :class:`Recipe` from a YAML/proto-shaped mapping; errors name ``where.<field>``.

    >>> r = build_recipe({"name": "mine", "version": "1", "components": [{"name": "exact_match", "weight": 2}]})
    >>> (r.name, r.components[0].weight, r.combine)
    ('mine', 2.0, 'sum')
    >>> build_recipe({"name": "x", "version": "1", "components": [{"name": "exact_match", "weight": "inf"}]})
    Traceback (most recent call last):
    ...
    services.common.errors.InvalidArgument: recipe.components[0].weight: must be a finite number, got 'inf'
    """
    name = str(data.get("name") or "").strip()
    if not name:
        raise InvalidArgument(f"{where}.name", "a recipe needs a name")
    version = str(data.get("version") or "").strip()
    if not version:
        raise InvalidArgument(f"{where}.version", "a recipe needs a version (e.g. \"1.0.0\")")
    combine = str(data.get("combine") or "sum")
    if combine not in COMBINERS:
        raise InvalidArgument(f"{where}.combine", f"unknown combine {combine!r}; use one of {sorted(COMBINERS)}")
    raw = data.get("components") or []
    if not raw:
        raise InvalidArgument(f"{where}.components", "a recipe needs at least one component")
    if len(raw) > max_components:
        raise InvalidArgument(f"{where}.components", f"{len(raw)} components, above the limit of {max_components}")
    components = []
    seen = set()
    for i, c in enumerate(raw):
        at = f"{where}.components[{i}]"
        cname = str(c.get("name") or "")
        if cname not in COMPONENTS:
            raise InvalidArgument(f"{at}.name", f"unknown component {cname!r}; known: {sorted(COMPONENTS)}")
        if cname in seen:
            raise InvalidArgument(f"{at}.name", f"component {cname!r} appears twice")
        seen.add(cname)
        weight = _coerce(f"{at}.weight", c.get("weight", 1.0), 1.0)
        spec = COMPONENTS[cname]
        given = dict(c.get("params") or {})
        unknown = sorted(set(given) - set(spec.params))
        if unknown:
            raise InvalidArgument(f"{at}.params", f"unknown parameter(s) {unknown} for {cname}; "
                                  f"known: {sorted(spec.params)}")
        params = {k: _coerce(f"{at}.params.{k}", given.get(k, d), d) for k, d in spec.params.items()}
        for k, allowed in spec.choices.items():
            if params[k] not in allowed:
                raise InvalidArgument(f"{at}.params.{k}", f"must be one of {allowed}, got {params[k]!r}")
        problem = spec.check(params) if spec.check else None
        if problem:
            raise InvalidArgument(f"{at}.params.{problem[0]}", problem[1])
        components.append(RecipeComponent(cname, weight, params))
    recipe = Recipe(name, version, tuple(components), combine, str(data.get("description") or ""))
    missing = [n for n in COMBINERS[combine].requires if recipe.component(n) is None]
    if missing:
        raise InvalidArgument(f"{where}.combine", f"combine {combine!r} ({COMBINERS[combine].description}) needs "
                              f"component(s) {missing}; add them or use combine 'sum'")
    return recipe


def load_recipe_file(path: Path) -> Recipe:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe file holds one mapping with name, version and components")
    try:
        return build_recipe(data, where=path.name)
    except InvalidArgument as e:
        raise ValueError(f"{path}: {e}") from None


def load_recipes(extra_dir: Path | None = None) -> dict[str, Recipe]:
    """Built-in recipes plus those in ``extra_dir``; a user recipe may not shadow a built-in one."""
    recipes = {r.name: r for r in (load_recipe_file(p) for p in sorted(BUILTIN_DIR.glob("*.yaml")))}
    if extra_dir is not None:
        if not Path(extra_dir).is_dir():
            raise ValueError(f"KNOWSERVE_REWARD_RECIPES_DIR={extra_dir} is not a folder; fix the path or unset it")
        for p in sorted(Path(extra_dir).glob("*.y*ml")):
            r = load_recipe_file(p)
            if r.name in recipes:
                raise ValueError(f"{p}: recipe name {r.name!r} is already taken; rename it")
            recipes[r.name] = r
    return recipes
