"""How good the model-based grading is, against the served model (the default: SmolLM2-135M-Instruct):

* the ``llm`` judge (verification) on length-matched HaluEval-QA pairs — the claim "<question> <answer>" against the
  question's knowledge passage, right vs hallucinated answer — beside the ``lexical`` judge and the majority class;
* the ``llm`` grader (reward's correctness, SimpleQA's A/B/C) on TruthfulQA answer pairs: another true reference as
  the prediction (should be CORRECT) and a false reference (should be INCORRECT), against the first true reference
  as the gold target — beside the match grader (``contains``) on the same pairs; where TruthfulQA cannot be had (it
  ships in the BIG-bench sdist, which the index stopped serving), on HaluEval-QA: the right answer said in a sentence
  (CORRECT) and the hallucinated answer (INCORRECT) against the right answer.

    .venv/bin/knowserve up --services generation && .venv/bin/python benchmarks/llm_graders.py --pairs 150
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def judge_pairs(target: str, model: str, pairs: int, records: int = 0) -> dict:
    from benchmarks.verification import halueval_items
    from services.common.clients import ClientOptions
    from services.generation.client import GenerationClient
    from services.verification.judges import LexicalJudge
    from services.verification.llm import LlmJudge

    items, _ = halueval_items(pairs, 1)
    out = {"items": len(items), "majority_class": 0.5}
    async with GenerationClient(target, ClientOptions(timeout_seconds=600), model=model, internal=True) as gen:
        llm = LlmJudge(gen.greedy)
        start = time.perf_counter()
        verdicts = []
        for i in range(0, len(items), 32):
            chunk = items[i: i + 32]
            verdicts += await llm.judge([c for c, _, _ in chunk], [[p] for _, p, _ in chunk])
        seconds = time.perf_counter() - start
    lexical = LexicalJudge().judge([c for c, _, _ in items], [[p] for _, p, _ in items])
    for name, vs in (("llm", verdicts), ("lexical", lexical)):
        pred = ["RIGHT" if v.label == "SUPPORTED" else "HALLUCINATED" for v in vs]
        out[name] = sum(p == g for p, (_, _, g) in zip(pred, items)) / len(items)
        out[f"{name}_labels"] = dict(Counter(v.label for v in vs))
    out["llm_claims_per_second"] = len(items) / seconds
    for (claim, passage, gold), v, lx in list(zip(items, verdicts, lexical))[:records]:
        print(f"  gold {gold:12s} llm {v.label:16s} p={v.score:.2f} lexical {lx.label:16s} | {claim[:110]!r} | "
              f"{passage.text[:90]!r}")
    return out


def grading_cases(source: str, pairs: int, seed: int) -> list[tuple[str, list[str], str, str]]:
    """(question, gold targets, prediction, true grade) pairs: ``truthfulqa`` — another true reference (CORRECT) and
    a false one (INCORRECT) against the first true reference; ``halueval_qa`` (where the BIG-bench sdist holding
    TruthfulQA cannot be had) — the right answer said in a sentence (CORRECT) and HaluEval's hallucinated answer
    (INCORRECT) against the right answer."""
    from services.common.grading import CORRECT, INCORRECT
    from training.data import load_dataset

    if source == "truthfulqa":
        rows = [r for r in load_dataset("truthfulqa") if len(r.gold_answers) >= 2 and r.false_answers]
        random.Random(seed).shuffle(rows)
        rows = rows[:pairs]
        return ([(r.question, [r.gold_answers[0]], r.gold_answers[1], CORRECT) for r in rows]
                + [(r.question, [r.gold_answers[0]], r.false_answers[0], INCORRECT) for r in rows])
    rows = load_dataset("halueval_qa", limit=pairs, seed=seed)
    return ([(r.question, [r.gold_answers[0]], f"I believe the answer is {r.gold_answers[0]}.", CORRECT) for r in rows]
            + [(r.question, [r.gold_answers[0]], r.false_answers[0], INCORRECT) for r in rows])


async def grade_pairs(target: str, model: str, pairs: int, seed: int, source: str = "truthfulqa",
                      records: int = 0) -> dict:
    from services.common.clients import ClientOptions
    from services.common.grading import GradeOptions, grade
    from services.generation.client import GenerationClient
    from services.reward.grader import grade_with_llm

    cases = grading_cases(source, pairs, seed)
    async with GenerationClient(target, ClientOptions(timeout_seconds=600), model=model, internal=True) as gen:
        graded = []
        for i in range(0, len(cases), 32):
            chunk = cases[i: i + 32]
            graded += await grade_with_llm(gen.greedy, [c[0] for c in chunk], [c[1] for c in chunk],
                                           [c[2] for c in chunk])
    llm = [g for g, _ in graded]
    match = [grade(c[2], c[1], options=GradeOptions("answer_tag_or_text", "contains")) for c in cases]
    gold = [c[3] for c in cases]
    for k in list(range(0, len(cases), max(1, len(cases) // max(1, records))))[:records]:
        print(f"  true {gold[k]:10s} llm {str(llm[k]):10s} contains {match[k]:10s} | {cases[k][0][:80]!r} | gold "
              f"{cases[k][1][0][:40]!r} | prediction {cases[k][2][:70]!r}")
    return {"items": len(cases), "majority_class": 0.5,
            "llm": sum(p == g for p, g in zip(llm, gold)) / len(cases),
            "llm_unparseable": sum(p is None for p in llm) / len(cases),
            "llm_grades": dict(Counter(str(p) for p in llm)),
            "match_contains": sum(p == g for p, g in zip(match, gold)) / len(cases)}


def main() -> None:
    from services.common.addresses import default_target

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generation", default=default_target("generation"))
    parser.add_argument("--model", default="", help="the served model asked (default: the default model)")
    parser.add_argument("--pairs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grader-set", choices=["auto", "truthfulqa", "halueval_qa"], default="auto",
                        help="answers the llm grader grades (auto: TruthfulQA where BIG-bench can be had)")
    parser.add_argument("--records", type=int, default=20, help="records printed per arm, to read by hand")
    parser.add_argument("--skip-judge", action="store_true", help="only the llm grader")
    args = parser.parse_args()
    if not args.skip_judge:
        j = asyncio.run(judge_pairs(args.generation, args.model, args.pairs, args.records))
        print(f"llm judge, HaluEval-QA length-matched pairs ({j['items']} claims): llm {j['llm']:.3f}, lexical "
              f"{j['lexical']:.3f}, majority {j['majority_class']:.3f}; llm labels {j['llm_labels']}; lexical labels "
              f"{j['lexical_labels']}; {j['llm_claims_per_second']:.1f} claims/s", flush=True)
    source = args.grader_set
    if source == "auto":
        from services.verification.nli import bigbench_available

        source = "truthfulqa" if bigbench_available(ROOT / ".cache") else "halueval_qa"
        if source == "halueval_qa":  # TruthfulQA comes from the BIG-bench sdist
            print("TruthfulQA unavailable (no BIG-bench sdist): the llm grader is measured on HaluEval-QA", flush=True)
    g = asyncio.run(grade_pairs(args.generation, args.model, args.pairs, args.seed, source, args.records))
    print(f"llm grader, {source} right vs wrong answers ({g['items']} answers): llm {g['llm']:.3f} "
          f"(unparseable {g['llm_unparseable']:.1%}; {g['llm_grades']}), match (contains) {g['match_contains']:.3f}, "
          f"majority {g['majority_class']:.3f}")

if __name__ == "__main__":
    main()
