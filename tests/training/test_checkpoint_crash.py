"""`kill -9` of a process publishing checkpoints into the store generation reads from (``save_policy``, what every
training run's publisher calls), at random moments: every published folder is whole and loads, a half-written one
exists only under its ``.tmp`` name, which generation refuses to swap to, and the next write clears it. (The
trainer's own resume checkpoints: tests/training/test_grpo.py kills the trainer while it writes one.)"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from services.common.errors import InvalidArgument
from tests.conftest import ROOT

WRITER = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer
from services.common.models import tiny_lm_folder
from training.services_io import save_policy
src = tiny_lm_folder(Path({cache!r}))
model, tok = AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)
root, step = Path(sys.argv[1]), int(sys.argv[2])
while True:
    save_policy(model, tok, root / f"step-{{step:06d}}", {{"name": "tiny", "step": step}})
    print(step, flush=True)  # published: the folder is in place
    step += 1
"""


def test_published_checkpoints_are_whole_after_kill_9(tmp_path):
    from services.generation.core import WeightSlot

    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(cache=str(ROOT / ".cache/models")))
    store = tmp_path / "store"
    store.mkdir()
    rng = random.Random(3)
    step, caught_tmp = 1, 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(store), str(step)], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                             "HF_HUB_OFFLINE": "1"})
        first = proc.stdout.readline()
        assert first.strip().isdigit(), f"writer failed (rc {proc.poll()})"
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside a later write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        published = sorted(p for p in store.iterdir() if not p.name.endswith(".tmp"))
        for folder in published:  # each one whole: weights, config, tokenizer, the run's note
            assert load_file(folder / "model.safetensors"), folder
            assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
            assert (folder / "tokenizer.json").exists()
            assert json.loads((folder / "knowserve_checkpoint.json").read_text())["step"] == int(folder.name[5:])
        leftovers = [p for p in store.iterdir() if p.name.endswith(".tmp")]
        caught_tmp += bool(leftovers)
        slot = WeightSlot(None, lambda path, serving: None, store)  # generation's checks of a swap's folder
        for tmp in leftovers:
            with pytest.raises(InvalidArgument, match="still being written"):
                slot.check_uri(str(tmp))
        step = int(published[-1].name[5:]) + 1 if published else step
    assert step > 3
    print(f"{step - 1} checkpoints published, a half-written .tmp caught {caught_tmp} of 3 times")
