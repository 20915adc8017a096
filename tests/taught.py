"""Tiny LMs taught exact texts or answers in a few seconds: shared by the generation, verification, reward, answer
and secured-stack tests (one home, instead of each package importing another package's conftest)."""

from __future__ import annotations

import shutil
from pathlib import Path


def _fit(folder: Path, batch: dict, labels, out: Path, steps: int, lr: float) -> Path:
    """Overfit the tiny LM in ``folder`` on one batch (a few seconds) and save it to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


def teach(folder: Path, texts: list[str], out: Path, steps: int = 150, lr: float = 3e-3) -> Path:
    """A tiny LM overfit on whole ``texts``: greedy decoding then reproduces a known transcript exactly."""
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(folder)(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return _fit(folder, dict(batch), labels, out, steps, lr)


def teach_answers(folder: Path, pairs: list[tuple[list[int], list[int]]], out: Path, steps: int = 60,
                  lr: float = 3e-3) -> Path:
    """A tiny LM taught to answer each prompt (token ids) with its completion (token ids); the loss is on the
    completion tokens only, so a few dozen steps make greedy decoding give exactly those answers."""
    import torch
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(folder).pad_token_id
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (p, c) in enumerate(pairs):
        seq = list(p) + list(c)
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        labels[r, len(p): len(seq)] = torch.tensor(list(c))
    return _fit(folder, {"input_ids": ids, "attention_mask": mask}, labels, out, steps, lr)
