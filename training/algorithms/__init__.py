"""Training algorithms, registered by name (as TRL ships one trainer per algorithm and verl registers its
algorithms): each module declares its hyperparameters with their defaults, what its dataset looks like, the
checks its configuration must pass, and ``build(ctx)``, which returns TRL's own trainer (trl==1.16.0, pinned)
wired to the run. The step loop around the trainer (publishing into generation, progress records, stop control,
resume) is the same for every algorithm: :mod:`training.loop`.

Adding an algorithm is one module here with one ``@algorithm(...)`` registration; nothing else changes.
This package imports no TRL: the training service validates configs with it and never loads a trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.config import Resolved

SHARED = frozenset({"learning_rate", "max_steps", "batch_size", "sync_every", "use_lora", "lora_rank", "seed"})


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered algorithm (see the module docstring)."""

    name: str
    description: str
    module: str  # where build(ctx) lives (imported only by the trainer process)
    hyperparameters: frozenset[str]  # the Hyperparameters fields it takes
    defaults: dict[str, Any]
    dataset: str  # "qa" (questions with gold answers), "sft" (prompt/completion), "dpo" (prompt/chosen/rejected)
    needs_recipe: bool = False  # a training recipe (reward stages, tool protocol, system prompt)
    publish_start: bool = False  # publish the starting policy before step 1 (its rollouts must come from it)
    check: Callable[["Resolved"], None] = field(default=lambda h: None)

    def build(self, ctx):
        import importlib

        return importlib.import_module(self.module).build(ctx)


ALGORITHMS: dict[str, AlgorithmSpec] = {}


def algorithm(name: str, **kwargs):
    """Register the calling module's algorithm: ``algorithm("sft", description=..., hyperparameters=...)``."""
    if name in ALGORITHMS:
        raise ValueError(f"training algorithm {name!r} is registered twice")
    spec = AlgorithmSpec(name=name, **kwargs)
    ALGORITHMS[name] = spec
    return spec


from training.algorithms import dpo, grpo, sft  # noqa: E402,F401 - each registers itself
