"""`knowserve eval` against the served demo model: SimpleQA grades, claim support from the real verification
service, AP score, the JSON and PNG it writes, and the gauges the training service exports from them (scraped
over HTTP and checked by promtool)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from services.generation.client import GenerationClient
from tests.conftest import SERVE_APP, tool
from training.eval import EvalConfig, evaluate

pytestmark = pytest.mark.slow


async def test_eval_grades_answers_writes_results_and_exports_gauges(training_stack):
    stack = training_stack
    async with GenerationClient(stack.generation_target, app_name=SERVE_APP) as gen:
        info = await gen.model_info()
        swap = await gen.update_weights(str(stack.model), info.weight_version + 1)
    eval_dir = Path(stack.training.app.settings.eval_dir)
    common = dict(generation_target=stack.generation_target, generation_app_name=SERVE_APP,
                  verification_target=stack.verification.server.address, out_dir=str(eval_dir), match="exact")
    taught = await evaluate(EvalConfig(dataset="demo_world:taught:heldout", **common), progress=False)
    unknown = await evaluate(EvalConfig(dataset="demo_world:kb_only:heldout", mode="retrieval", **common),
                             progress=False)
    questions = len(stack.world.questions("kb_only", "heldout"))
    assert unknown["n"] == questions and unknown["weight_version"] == swap.version
    for r in (taught, unknown):
        assert r["correct"] + r["incorrect"] + r["not_attempted"] == pytest.approx(1.0)
        assert 0.0 <= r["ap"] <= 1.0 and r["claim_support"] is not None
    # the cold-started model knows the taught facts and guesses the others: the world's premise holds
    assert taught["correct"] > unknown["correct"] + 0.2
    saved = json.loads(Path(unknown["path"]).read_text())
    assert len(saved["records"]) == questions
    assert {r["grade"] for r in saved["records"]} <= {"CORRECT", "INCORRECT", "NOT_ATTEMPTED"}
    # runaway answers are told apart: every record says how its completion ended, and the cut-off share counts the
    # wrong answers a limit ended (max_tokens or the tool turns) before any end of sequence
    assert {r["finish"] for r in saved["records"]} <= {"stop", "length", "tool_turns"}
    cut = [r for r in saved["records"] if r["grade"] == "INCORRECT" and r["finish"] != "stop"]
    assert unknown["incorrect_cut_off"] == pytest.approx(len(cut) / questions)
    assert unknown["incorrect_cut_off"] <= unknown["incorrect"]
    assert Path(unknown["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    port = stack.training.server.metrics_port
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())
    line = next(x for x in text.splitlines() if x.startswith("knowserve_eval_answers_ratio{")
                and 'benchmark="demo_world:kb_only:heldout"' in x and 'outcome="hallucinated"' in x
                and f'weight_version="{swap.version}"' in x)
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(unknown["incorrect"])
    assert 'knowserve_training_runs{state="RUNNING"} 0.0' in text
    check = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
