"""Weight publishing without a cluster: the policy saved for generation is a plain HF folder, LoRA adapters merged
into a copy (the trained adapters stay), and the rollout helper groups TRL's per-sample prompts."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from services.common.models import tiny_lm_folder
from tests.conftest import ROOT
from training.services_io import group_runs, save_policy


def test_lora_policy_is_published_merged(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    base_dir = tiny_lm_folder(ROOT / ".cache/models")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained adapter: nonzero B so the merge changes the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    out = save_policy(model, AutoTokenizer.from_pretrained(base_dir), tmp_path / "step-000001")
    published = AutoModelForCausalLM.from_pretrained(out)  # loads as a plain model: no adapter files needed
    assert not any("lora" in k for k in published.state_dict())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(published.state_dict()[q], base.state_dict()[q])
    assert hasattr(model, "peft_config")  # the training model still has its adapters
    assert not (tmp_path / "step-000001.tmp").exists()


def test_group_runs_counts_consecutive_samples():
    prompts = ["a"] * 4 + ["b"] * 4
    assert group_runs(prompts) == [("a", 4), ("b", 4)]
