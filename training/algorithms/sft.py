"""Supervised fine-tuning: TRL's ``SFTTrainer`` (trl==1.16.0) on prompt/completion rows (KnowRL's cold start, R-Tuning's
refusal-aware data, KnowTuning's atomic facts: ``knowserve data``), the loss on the completion only by default,
LoRA optional. Weights are published into the generation service every ``sync_every`` steps and at the end.
"""

from __future__ import annotations

from training.algorithms import SHARED, algorithm
from training.errors import ConfigError


def _check(h) -> None:
    if h.num_epochs <= 0 and h.max_steps == 0:
        raise ConfigError("hyperparameters.num_epochs must be > 0 when max_steps is 0")
    if h.max_length < 16:
        raise ConfigError(f"hyperparameters.max_length must be at least 16 tokens, got {h.max_length}")


SPEC = algorithm(
    "sft", description="supervised fine-tuning (TRL SFTTrainer), completion-only loss, LoRA optional",
    module=__name__, dataset="sft", check=_check,
    hyperparameters=SHARED | {"num_epochs", "max_length", "completion_only_loss"},
    defaults={"max_steps": 0, "batch_size": 8, "sync_every": 0, "learning_rate": 2e-5, "beta": 0.0,
              "num_epochs": 1.0, "max_length": 512, "completion_only_loss": True})


def build(ctx):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from training.data import load_rows

    cfg, h = ctx.cfg, ctx.h
    rows = load_rows(cfg.dataset, "sft", cfg.dataset_limit, h.seed)
    args = SFTConfig(**ctx.trainer_args(), max_length=h.max_length, completion_only_loss=h.completion_only_loss,
                     packing=False)
    return SFTTrainer(model=cfg.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=ctx.tokenizer,
                      peft_config=ctx.peft_config(), callbacks=[ctx.reporter])
