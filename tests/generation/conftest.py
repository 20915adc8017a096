"""Generation fixtures: tiny Llama models built here (SmolLM2's tokenizer), one of them taught a tool transcript."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT


def teach(folder: Path, texts: list[str], out: Path, steps: int = 150, lr: float = 3e-3) -> Path:
    """Overfit a tiny causal LM on ``texts`` (a few seconds) and save it to ``out``: a model that deterministically
    writes a known transcript under greedy decoding, so tests can check exact outputs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from services.common.models import tiny_lm_folder

    return tiny_lm_folder(ROOT / ".cache/models")


def teach_answers(folder: Path, pairs: list[tuple[list[int], list[int]]], out: Path, steps: int = 60,
                  lr: float = 3e-3) -> Path:
    """Overfit a tiny causal LM to answer each prompt (token ids) with its completion (token ids); the loss is on
    the completion tokens only, so a few dozen steps make greedy decoding give exactly those answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.train()
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (p, c) in enumerate(pairs):
        seq = list(p) + list(c)
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        labels[r, len(p): len(seq)] = torch.tensor(list(c))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
