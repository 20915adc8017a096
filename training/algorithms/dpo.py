"""Direct preference optimisation: TRL's ``DPOTrainer`` (trl==1.16.0) on prompt/chosen/rejected rows (KnowTuning's
knowledge comparison: the full answer against answers whose facts were deleted, revised or shuffled; ``knowserve
data knowtuning``), against a frozen reference copy of the starting model, with ``beta`` and TRL's loss types.
Weights are published into the generation service every ``sync_every`` steps and at the end.
"""

from __future__ import annotations

from training.algorithms import SHARED, algorithm
from training.errors import ConfigError


def _check(h) -> None:
    if h.beta <= 0:
        raise ConfigError(f"hyperparameters.beta must be > 0 for DPO (the preference temperature), got {h.beta}")
    if h.num_epochs <= 0 and h.max_steps == 0:
        raise ConfigError("hyperparameters.num_epochs must be > 0 when max_steps is 0")


SPEC = algorithm(
    "dpo", description="DPO (TRL DPOTrainer) with a reference model and beta",
    module=__name__, dataset="dpo", check=_check,
    hyperparameters=SHARED | {"beta", "dpo_loss_type", "num_epochs", "max_length"},
    defaults={"max_steps": 0, "batch_size": 8, "sync_every": 0, "learning_rate": 5e-6, "beta": 0.1,
              "num_epochs": 1.0, "max_length": 512, "dpo_loss_type": "sigmoid"})


def build(ctx):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from training.data import load_rows

    cfg, h = ctx.cfg, ctx.h
    rows = load_rows(cfg.dataset, "dpo", cfg.dataset_limit, h.seed)
    args = DPOConfig(**ctx.trainer_args(), beta=h.beta, loss_type=[h.dpo_loss_type], max_length=h.max_length)
    return DPOTrainer(model=cfg.model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=ctx.tokenizer, peft_config=ctx.peft_config(), callbacks=[ctx.reporter])
