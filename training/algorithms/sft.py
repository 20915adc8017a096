"""Supervised fine-tuning: TRL's ``SFTTrainer`` (trl==1.16.0) on prompt/completion rows (KnowRL's cold start, R-Tuning's
refusal-aware data, KnowTuning's atomic facts: ``knowserve data``), the loss on the completion only by default,
LoRA optional. Weights are published into the generation service every ``sync_every`` steps and at the end.

Rows may name ``untrained`` spans of their completion (the documents a search transcript inserts, as the
generation service's env mask does in GRPO): then the rows are tokenized here, with ``completion_mask`` 0 on those
tokens, and TRL trains on the rest.
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
    if any(r.get("untrained") for r in rows):
        rows = [tokenize_masked(ctx.tokenizer, r) for r in rows]
    else:
        rows = [{k: r[k] for k in ("prompt", "completion")} for r in rows]
    args = SFTConfig(**ctx.trainer_args(), max_length=h.max_length, completion_only_loss=h.completion_only_loss,
                     packing=False)
    return SFTTrainer(model=cfg.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=ctx.tokenizer,
                      peft_config=ctx.peft_config(), callbacks=[ctx.reporter])


def tokenize_masked(tokenizer, row: dict) -> dict:
    """``input_ids`` and ``completion_mask`` of one row: 0 on the prompt and on the completion's ``untrained``
    spans, 1 on the rest of the completion (its end-of-turn included)."""
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):  # conversational: the chat template renders both
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        completion_text = full[len(prompt_text):]
    else:
        prompt_text, completion_text = prompt, completion + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    enc = tokenizer(completion_text, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for text in row.get("untrained", []):
        at = completion_text.find(text)
        if at >= 0:
            spans.append((at, at + len(text)))
    mask = [0 if any(a <= start and end <= b for a, b in spans) else 1 for start, end in enc["offset_mapping"]]
    return {"input_ids": prompt_ids + enc["input_ids"], "completion_mask": [0] * len(prompt_ids) + mask}
