"""The LLM correctness grader (SimpleQA-style A/B/C) through the generation service.

KnowRL grades with an LLM judge; this is the same contract on the model knowserve serves. Weak with small
models — gold-answer matching (``grader: match``) is the default.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.common.grading import CORRECT, INCORRECT, NOT_ATTEMPTED

if TYPE_CHECKING:
    from services.generation.client import GreedyFn

GRADER_PROMPT = (
    "Grade the predicted answer to a question against the gold target. Reply with one letter: A if it is "
    "CORRECT (it contains the gold target's meaning without contradicting it), B if it is INCORRECT, C if it is "
    "NOT_ATTEMPTED (it declines to answer or does not give one).\n\n"
    "Question: {question}\nGold target: {gold}\nPredicted answer: {predicted}\n\nGrade:")

def parse_grade(text: str) -> str | None:
    """The grade letter the model answered (first standalone A/B/C, or the grade's name); None if neither.

    >>> [parse_grade(t) for t in ("A", " B.", "C", "INCORRECT", "maybe")]
    ['CORRECT', 'INCORRECT', 'NOT_ATTEMPTED', 'INCORRECT', None]
    """
    upper = text.upper()
    for name in (NOT_ATTEMPTED, INCORRECT, CORRECT):  # longest first: INCORRECT contains CORRECT
        if name in upper or name.replace("_", " ") in upper:
            return name
    m = re.match(r"\W*([ABC])\b", upper)
    return {"A": CORRECT, "B": INCORRECT, "C": NOT_ATTEMPTED}[m.group(1)] if m else None


async def grade_with_llm(generate: GreedyFn, questions: Sequence[str], golds: Sequence[Sequence[str]],
                         answers: Sequence[str]) -> list[tuple[str | None, str]]:
    """(grade or None, the grader's raw answer) per item."""
    prompts = [[{"role": "user", "content": GRADER_PROMPT.format(question=q, gold=" / ".join(g), predicted=a)}]
               for q, g, a in zip(questions, golds, answers)]
    outs = await generate(prompts, 4) if prompts else []
    return [(parse_grade(text), text.strip()[:40]) for text, _ in outs]
