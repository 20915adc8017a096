"""Pure functions for the hallucination figures the evaluation harness reports.

Grades come from the platform's one grader (:mod:`services.common.grading`): ``CORRECT``, ``INCORRECT`` (a
hallucination: an attempted, wrong answer), ``NOT_ATTEMPTED`` (an abstention) and ``MISSING`` (no answer at all,
counted with the abstentions, as SimpleQA does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from services.common.grading import CORRECT, INCORRECT, MISSING, NOT_ATTEMPTED
from services.generation.core import CUT_OFF


def rates(grades: Sequence[str]) -> dict[str, float]:
    """SimpleQA rates over all questions, the hallucination rate among attempted answers, and correct-or-abstain.

    >>> r = rates(["CORRECT", "INCORRECT", "NOT_ATTEMPTED", "INCORRECT"])
    >>> r["correct"], r["incorrect"], r["not_attempted"], round(r["hallucination_rate_attempted"], 3), r["correct_or_abstain"]
    (0.25, 0.5, 0.25, 0.667, 0.5)
    """
    n = len(grades)
    if n == 0:
        raise ValueError("rates of an empty set of grades")
    c = sum(g == CORRECT for g in grades) / n
    i = sum(g == INCORRECT for g in grades) / n
    na = sum(g in (NOT_ATTEMPTED, MISSING) for g in grades) / n
    attempted = c + i
    return {"correct": c, "incorrect": i, "not_attempted": na,
            "hallucination_rate_attempted": i / attempted if attempted else 0.0,
            "correct_or_abstain": c + na,
            "f_score": 2 * c * (c / attempted) / (c + c / attempted) if attempted and c else 0.0}


def incorrect_cut_off(records: list[dict]) -> float:
    """Share of questions answered wrong by a completion that a limit cut off (no end of sequence): runaway text
    graded as a hallucination, which a reader of the headline figure wants told apart from a confident wrong answer.

    >>> incorrect_cut_off([{"grade": "INCORRECT", "finish": "length"}, {"grade": "INCORRECT", "finish": "stop"},
    ...                    {"grade": "CORRECT", "finish": "length"}, {"grade": "INCORRECT", "finish": "tool_turns"}])
    0.5
    """
    if not records:
        return 0.0
    return sum(r["grade"] == INCORRECT and r.get("finish") in CUT_OFF for r in records) / len(records)


def sequence_confidence(logprobs: Sequence[float]) -> float:
    """Confidence of a completion from its token logprobs: the geometric-mean token probability.

    >>> round(sequence_confidence([math.log(0.5), math.log(0.5)]), 3), sequence_confidence([])
    (0.5, 0.0)
    """
    if not logprobs:
        return 0.0
    return math.exp(sum(logprobs) / len(logprobs))


def average_precision(confidences: Sequence[float], correct: Sequence[bool]) -> float:
    """R-Tuning's AP score: answers ranked by confidence (highest first), the mean of precision@k over the ranks
    k of the correct answers — 1.0 when every correct answer is more confident than every wrong one.

    >>> average_precision([0.9, 0.8, 0.1], [True, True, False]), average_precision([0.1, 0.8, 0.9], [True, True, False])
    (1.0, 0.5833333333333333)
    >>> average_precision([0.5], [False])
    0.0
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences for {len(correct)} labels")
    order = sorted(range(len(confidences)), key=lambda i: -confidences[i])
    hits, total = 0, 0.0
    for k, i in enumerate(order, 1):
        if correct[i]:
            hits += 1
            total += hits / k
    return total / hits if hits else 0.0
