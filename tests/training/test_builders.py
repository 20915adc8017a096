"""The data builders against the real services: R-Tuning's certain/uncertain split is exactly the grades of the
answers the served model gives; KnowTuning's revisions each change exactly one atomic fact and its REFUTED count is
what the verification service says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.grading import CORRECT, GradeOptions, grade
from services.generation.client import GenerationClient
from services.retrieval.core import Passage
from services.verification.core import VerifyItem
from tests.conftest import SERVE_APP
from training.builders import REFUSAL, BuildConfig, build
from training.data import load_dataset
from training.prompts import render_prompt

pytestmark = pytest.mark.slow


async def test_rtuning_split_is_the_served_models_grades(training_stack, tmp_path):
    stack = training_stack
    async with GenerationClient(stack.generation_target, app_name=SERVE_APP) as gen:
        info = await gen.model_info()
        await gen.update_weights(str(stack.model), max(info.weight_version, info.latest_version) + 1)
        questions = tmp_path / "questions.jsonl"  # taught facts (it knows) and KB-only ones (it guesses)
        rows = (load_dataset("demo_world:taught:heldout", limit=6, seed=1)
                + load_dataset("demo_world:kb_only:heldout", limit=6, seed=1))
        questions.write_text("".join(json.dumps({"id": r.id, "question": r.question, "gold_answers": r.gold_answers})
                                     + "\n" for r in rows))
        cfg = BuildConfig(builder="rtuning", dataset=str(questions), out=str(tmp_path / "rtuning.jsonl"), samples=1,
                          max_tokens=32, generation_target=stack.generation_target, generation_app_name=SERVE_APP)
        summary = await build(cfg)
        # the same questions asked again, greedy, and graded here
        reply = await gen.generate([render_prompt(r.question, "demo") for r in rows], temperature=0, max_tokens=32)
    mine = [grade(c.text, r.gold_answers, options=GradeOptions("answer_tag_or_text", "contains"))
            for c, r in zip(reply.completions, rows)]
    assert [summary.grades[r.id] for r in rows] == [[g] for g in mine]
    assert summary.counts == {k: v for k, v in {"certain": mine.count(CORRECT),
                                                "uncertain": len(mine) - mine.count(CORRECT)}.items() if v}
    assert 0 < mine.count(CORRECT) < len(mine)  # the demo model knows some and not others
    written = [json.loads(line) for line in Path(cfg.out).read_text().splitlines()]
    for r, g, w in zip(rows, mine, written):  # refusal method: the gold answer where it knew, "I don't know" else
        assert w["completion"] == (r.gold_answers[0] if g == CORRECT else REFUSAL)
        assert w["prompt"] == render_prompt(r.question, "demo")


CORPUS = [
    {"id": "thames", "title": "River Thames", "text": "The River Thames flows through southern England. It is 346 "
     "kilometres long. The river rises at Thames Head in Gloucestershire. It flows into the North Sea."},
    {"id": "baikal", "title": "Lake Baikal", "text": "Lake Baikal is a rift lake in Siberia. It is 1,642 metres deep. "
     "The lake formed about 25 million years ago. It holds 23,615 cubic kilometres of water."},
    {"id": "curie", "title": "Marie Curie", "text": "Marie Curie was a physicist and chemist. She was born in Warsaw "
     "in 1867. She won the Nobel Prize in Physics in 1903. She died in Passy in 1934."},
    {"id": "everest", "title": "Mount Everest", "text": "Mount Everest is the highest mountain on Earth. Its summit "
     "is 8,849 metres above sea level. It was first climbed in 1953 by Edmund Hillary and Tenzing Norgay."},
]


async def test_knowtuning_revisions_change_one_fact_and_count_refutations(training_stack, tmp_path):
    stack = training_stack
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    cfg = BuildConfig(builder="knowtuning", dataset=str(corpus), out=str(tmp_path / "knowtuning.jsonl"), seed=3,
                      verification_target=stack.verification.server.address)
    summary = await build(cfg)
    rows = [json.loads(line) for line in Path(cfg.out).read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert {k: kinds.count(k) for k in set(kinds)} == {k: summary.counts[k] for k in set(kinds)}
    facts = [r for r in rows if r["kind"] == "factuality"]
    assert len(facts) == len(CORPUS)
    client = stack.verification.client
    by_id = {d["title"]: d for d in CORPUS}
    refuted = 0
    for r in facts:
        split = await client.verify([VerifyItem(answer=r["chosen"]), VerifyItem(answer=r["rejected"])],
                                    judge="lexical")
        chosen, rejected = ([c.text for c in res.claims] for res in split.results)
        assert len(chosen) == len(rejected) and sum(a != b for a, b in zip(chosen, rejected)) == 1, (chosen, rejected)
        title = r["prompt"][-1]["content"].removeprefix("Tell me about ").rstrip(".")
        doc = by_id[title]
        evidence = Passage(id=doc["id"], document_id=doc["id"], title=title, text=doc["text"], source="kb")
        verdict = await client.verify([VerifyItem(claims=[r["revised_claim"]], evidence=[evidence])], judge="lexical")
        label = verdict.results[0].claims[0].label
        refuted += label == 2  # LABEL_REFUTED
        assert r["verdict"] == ("REFUTED" if label == 2 else r["verdict"])
    assert summary.counts.get("factuality_refuted", 0) == refuted
    assert refuted >= len(facts) // 2  # numbers and dates changed against the passage are caught
