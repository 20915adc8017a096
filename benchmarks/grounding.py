"""What the demo's step 8 shows, on more than four questions: the served default model (SmolLM2-135M-Instruct)
answering HaluEval-QA questions closed-book, then with the question's knowledge passage in the prompt (the prompt
the demo uses with retrieved passages), graded by the platform grader (``contains``) in the same run.

    .venv/bin/knowserve up && .venv/bin/python benchmarks/grounding.py --questions 100
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def run(target: str, model: str, n: int, seed: int) -> dict:
    from services.common.grading import GradeOptions, grade
    from services.generation.client import GenerationClient
    from training.data import load_dataset

    rows = load_dataset("halueval_qa", limit=n, seed=seed)
    options = GradeOptions("answer_tag_or_text", "contains")
    out = {}
    async with GenerationClient(target, model=model) as gen:
        for mode in ("closed-book", "with the passage"):
            chats = []
            for r in rows:
                context = "" if mode == "closed-book" else f"Use this passage:\n- {r.knowledge[:800]}\n\n"
                chats.append([{"role": "user", "content": f"{context}{r.question} Answer in one short sentence."}])
            texts = []
            for i in range(0, len(chats), 32):
                reply = await gen.generate(chats[i: i + 32], temperature=0, max_tokens=40, timeout=900)
                texts += [c.text for c in reply.completions]
            grades = [grade(t, r.gold_answers, options=options) for t, r in zip(texts, rows)]
            c = Counter(grades)
            attempted = c["CORRECT"] + c["INCORRECT"]
            out[mode] = {"correct": c["CORRECT"] / n, "hallucinated": c["INCORRECT"] / n,
                         "abstained": (c["NOT_ATTEMPTED"] + c["MISSING"]) / n,
                         "hallucinated_among_attempted": c["INCORRECT"] / attempted if attempted else 0.0,
                         "examples": [(r.question, t, g) for r, t, g in list(zip(rows, texts, grades))[:5]]}
    return out


def main() -> None:
    from services.common.addresses import default_target

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generation", default=default_target("generation"))
    parser.add_argument("--model", default="")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    r = asyncio.run(run(args.generation, args.model, args.questions, args.seed))
    for mode, m in r.items():
        print(f"{mode:17s} correct {m['correct']:.0%}, hallucinated {m['hallucinated']:.0%}, abstained "
              f"{m['abstained']:.0%}; hallucinated among attempted {m['hallucinated_among_attempted']:.0%}")
        for q, t, g in m["examples"]:
            print(f"    {g:13s} {q[:60]!r} -> {t[:80]!r}")


if __name__ == "__main__":
    main()
