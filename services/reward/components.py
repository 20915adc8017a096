"""Reward components of the seed papers as pure functions: completion text (+ gold answers) -> number.

Each function reproduces one published rule; the docstrings show worked examples (run as doctests).
Components that need another service (``factuality`` through verification) live in :mod:`services.reward.core`;
their merge rules are here (:func:`knowrl_merge`).

Sources: KnowRL (zjunlp/KnowRL ``train/reward_function``), R1-Searcher (RUCAIBox, arXiv 2503.05592 §3.2),
Search-R1 (PeterGriffinJin/Search-R1 ``verl/utils/reward_score/qa_em*.py``), R-Tuning (arXiv 2311.09677).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from services.common.text import is_refusal, normalize_answer, tagged_sections

# ---------------------------------------------------------------------------------------------------------------
# Answer extraction and matching (SQuAD-style normalization, as R1-Searcher and Search-R1 use)


def last_answer(completion: str) -> str | None:
    """Body of the last ``<answer>…</answer>`` in the completion, stripped; None when there is none.

    Only the completion is searched, so an example answer inside the prompt (Search-R1's template shows
    ``<answer> Beijing </answer>``) never counts — Search-R1 reaches the same by requiring two matches in
    prompt + response.

    >>> last_answer("<think>x</think><answer> Paris </answer>"), last_answer("Paris")
    ('Paris', None)
    """
    found = tagged_sections(completion, "answer")
    return found[-1][0].strip() if found else None


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer (Search-R1 ``em_check``).

    >>> exact_match("The Eiffel Tower", ["eiffel tower"]), exact_match("Eiffel Tower, Paris", ["Eiffel Tower"])
    (1.0, 0.0)
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def cover_exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if any normalized gold answer appears as a whole-word span of the normalized prediction (CEM).

    >>> cover_exact_match("It is the Eiffel Tower in Paris", ["Eiffel Tower"]), cover_exact_match("Towering", ["tower"])
    (1.0, 0.0)
    """
    pred = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(g) and f" {normalize_answer(g)} " in pred for g in golds))


def answer_f1(prediction: str, golds: Sequence[str]) -> float:
    """Best token F1 between the normalized prediction and any gold answer (SQuAD / R1-Searcher answer reward).

    >>> round(answer_f1("Eiffel Tower in Paris", ["Eiffel Tower"]), 4), answer_f1("yes", ["no"])
    (0.6667, 0.0)
    """
    pred = normalize_answer(prediction).split()
    best = 0.0
    for g in golds:
        gold = normalize_answer(g).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


MATCHERS = {"exact": exact_match, "cover": cover_exact_match}

# ---------------------------------------------------------------------------------------------------------------
# KnowRL

_KNOWRL_FORMAT = re.compile(
    r"^<think>\s*(\S(?:(?!<think>|<answer>)[\s\S])*?)\s*</think>\s*<answer>\s*(\S(?:(?!<think>|<answer>)[\s\S])*?)"
    r"\s*</answer>$", re.S)


def format_think_answer(completion: str) -> float:
    """KnowRL format reward: +1 for ``<think>…</think><answer>…</answer>`` (nothing else; both non-empty; the
    leading ``<think>`` may be missing, as KnowRL's prompt opens it), else −1.

    >>> format_think_answer("<think>Paris is in France.</think><answer>Paris</answer>")
    1.0
    >>> format_think_answer("Paris is in France.</think>\\n<answer>Paris</answer>")
    1.0
    >>> format_think_answer("Paris"), format_think_answer("<think></think><answer>Paris</answer>")
    (-1.0, -1.0)
    """
    text = completion if completion.startswith("<think>") else "<think>" + completion
    return 1.0 if _KNOWRL_FORMAT.search(text) else -1.0


CORRECT, INCORRECT, NOT_ATTEMPTED, MISSING = "CORRECT", "INCORRECT", "NOT_ATTEMPTED", "MISSING"
GRADES = (CORRECT, INCORRECT, NOT_ATTEMPTED, MISSING)
_CORRECTNESS_VALUE = {CORRECT: 2.0, INCORRECT: -1.0, NOT_ATTEMPTED: 1.0, MISSING: -1.0}


def grade_answer(completion: str, golds: Sequence[str], match: str = "exact") -> str:
    """SimpleQA-style grade of the ``<answer>`` section by gold-answer match: CORRECT, INCORRECT,
    NOT_ATTEMPTED (a refusal such as "I don't know") or MISSING (no or empty ``<answer>``).

    ``golds`` are aliases: matching any of them is correct.

    >>> [grade_answer(c, ["Paris", "City of Paris"]) for c in
    ...  ["<answer>paris</answer>", "<answer>Lyon</answer>", "<answer>I don't know</answer>", "Paris", "<answer> </answer>"]]
    ['CORRECT', 'INCORRECT', 'NOT_ATTEMPTED', 'MISSING', 'MISSING']
    """
    answer = last_answer(completion)
    if not answer:
        return MISSING
    if is_refusal(answer):
        return NOT_ATTEMPTED
    return CORRECT if MATCHERS[match](answer, golds) else INCORRECT


def correctness_with_refusal(grade: str) -> float:
    """KnowRL correctness reward of a grade: CORRECT +2, INCORRECT −1, NOT_ATTEMPTED +1, MISSING −1.

    >>> [correctness_with_refusal(g) for g in (CORRECT, INCORRECT, NOT_ATTEMPTED, MISSING)]
    [2.0, -1.0, 1.0, -1.0]
    """
    return _CORRECTNESS_VALUE[grade]


def knowrl_merge(correctness: float, refusal: bool, fact_score: float | None) -> float:
    """KnowRL's combined reward: a wrong (or missing) answer that is not a refusal gets ``−1 + fact_score``
    instead of −1; every other correctness value stands. A fact score that could not be computed counts 0.

    >>> knowrl_merge(2.0, False, 0.4), knowrl_merge(-1.0, False, 0.4), knowrl_merge(1.0, True, 0.0)
    (2.0, -0.6, 1.0)
    """
    if correctness == -1.0 and not refusal:
        return -1.0 + (fact_score or 0.0)
    return correctness


# ---------------------------------------------------------------------------------------------------------------
# R1-Searcher

R1_QUERY = ("<|begin_of_query|>", "<|end_of_query|>")
R1_DOCS = ("<|begin_of_documents|>", "<|end_of_documents|>")
_R1_EXCHANGE = re.compile(r"<\|begin_of_query\|>(.*?)<\|end_of_query\|>\s*<\|begin_of_documents\|>(.*?)"
                          r"<\|end_of_documents\|>", re.S)


def retrieval_exchanges(completion: str) -> int:
    """Well-formed query -> documents exchanges: a non-empty query followed by its documents block.

    >>> retrieval_exchanges("<|begin_of_query|>capital of France<|end_of_query|>"
    ...                     "<|begin_of_documents|>(1) Paris ...<|end_of_documents|>")
    1
    """
    return sum(1 for m in _R1_EXCHANGE.finditer(completion) if m.group(1).strip())


def retrieval_used(completion: str, reward: float = 0.5) -> float:
    """R1-Searcher stage-1 retrieval reward: ``reward`` (0.5) for at least one well-formed exchange, else 0.

    >>> retrieval_used("<|begin_of_query|>x y<|end_of_query|><|begin_of_documents|>d<|end_of_documents|>")
    0.5
    >>> retrieval_used("<|begin_of_query|>x y<|end_of_query|>")  # a query that was never answered
    0.0
    """
    return reward if retrieval_exchanges(completion) >= 1 else 0.0


def r1_searcher_format_problems(completion: str, golds: Sequence[str] = (), max_answer_words: int = 10,
                                max_query_words: int = 20, max_queries: int = 4) -> list[str]:
    """What is wrong with an R1-Searcher rollout's format (empty list = well-formed).

    Checks (R1-Searcher's reward server): balanced query/document tags and one document block per query;
    at most ``max_queries`` queries of at most ``max_query_words`` words; exactly one ``</think>`` and one
    ``<answer>…</answer>`` after it; no retrieval tags inside the answer; an answer of more than
    ``max_answer_words`` words that is also longer than the gold answer.

    >>> r1_searcher_format_problems("<think>a</think><answer>Paris</answer>")
    []
    >>> r1_searcher_format_problems("<|begin_of_query|>q<|end_of_query|><answer>x</answer><answer>y</answer>")
    ['query/document tags unbalanced (1 queries, 0 documents)', 'expected one </think>, found 0', 'expected one <answer>, found 2']
    """
    problems = []
    counts = [completion.count(t) for t in (*R1_QUERY, *R1_DOCS)]
    if counts[0] != counts[1] or counts[2] != counts[3] or counts[0] != counts[2]:
        problems.append(f"query/document tags unbalanced ({counts[0]} queries, {counts[2]} documents)")
    if counts[0] > max_queries:
        problems.append(f"{counts[0]} queries, above {max_queries}")
    for q in re.findall(r"<\|begin_of_query\|>(.*?)<\|end_of_query\|>", completion, re.S):
        if len(q.split()) > max_query_words:
            problems.append(f"query of {len(q.split())} words, above {max_query_words}")
    n_think = completion.count("</think>")
    if n_think != 1:
        problems.append(f"expected one </think>, found {n_think}")
    answers = tagged_sections(completion, "answer")
    if len(answers) != 1 or completion.count("<answer>") != 1:
        problems.append(f"expected one <answer>, found {max(len(answers), completion.count('<answer>'))}")
    if answers:
        body, start = answers[-1]
        if n_think == 1 and start < completion.find("</think>"):
            problems.append("<answer> before </think>")
        if any(t in body for t in (*R1_QUERY, *R1_DOCS)):
            problems.append("retrieval tags inside the answer")
        words = len(body.split())
        gold_words = max((len(g.split()) for g in golds), default=0)
        if words > max_answer_words and words > gold_words:
            problems.append(f"answer of {words} words, above {max_answer_words} and the gold answer's {gold_words}")
    return problems


def format_r1_searcher(completion: str, golds: Sequence[str] = (), stage: int = 1, bonus: float = 0.5,
                       penalty: float = -2.0, **limits: int) -> float:
    """R1-Searcher format reward. Stage 1: ``bonus`` (+0.5) when well-formed, else 0. Stage 2: 0 when
    well-formed, else ``penalty`` (−2 in the paper; −1 is the milder variant).

    >>> good = ("<think>need the capital<|begin_of_query|>capital of France<|end_of_query|>"
    ...         "<|begin_of_documents|>(1) Paris is the capital<|end_of_documents|></think><answer>Paris</answer>")
    >>> format_r1_searcher(good, stage=1), format_r1_searcher(good, stage=2)
    (0.5, 0.0)
    >>> format_r1_searcher("<answer>Paris <|begin_of_query|></answer>", stage=2)
    -2.0
    """
    ok = not r1_searcher_format_problems(completion, golds, **limits)
    if stage == 1:
        return bonus if ok else 0.0
    return 0.0 if ok else penalty


# ---------------------------------------------------------------------------------------------------------------
# Search-R1

_SEARCH_R1_TAGS = re.compile(r"</?(think|search|information|answer)>")


def search_r1_valid_sequence(completion: str) -> tuple[bool, str]:
    """Search-R1's ``is_valid_sequence``: only think/search/information/answer blocks, balanced, in the order
    think -> (search -> information -> think)* -> answer, with nothing but whitespace between blocks.

    >>> search_r1_valid_sequence("<think>a</think><search>q</search><information>d</information>"
    ...                          "<think>b</think><answer>x</answer>")
    (True, 'valid')
    >>> search_r1_valid_sequence("<think>a</think><answer>x</answer><search>q</search>")[0]
    False
    """
    allowed = {"think": {"search", "answer"}, "search": {"information"}, "information": {"think"}, "answer": set()}
    state, pos, opened = "start", 0, None
    for m in _SEARCH_R1_TAGS.finditer(completion):
        tag, closing = m.group(1), m.group(0).startswith("</")
        between = completion[pos: m.start()]
        if opened is None:
            if closing:
                return False, f"</{tag}> without <{tag}>"
            if between.strip():
                return False, f"text outside blocks before <{tag}>"
            if (state == "start" and tag != "think") or (state != "start" and tag not in allowed[state]):
                return False, f"<{tag}> cannot follow {state}"
            opened = tag
        else:
            if not closing or tag != opened:
                return False, f"<{m.group(0)[1:-1]}> inside <{opened}>"
            state, opened = tag, None
        pos = m.end()
    if opened is not None:
        return False, f"<{opened}> not closed"
    if completion[pos:].strip():
        return False, "text after the last block"
    if state != "answer":
        return False, "does not end with <answer>"
    return True, "valid"


def search_r1_format(completion: str, golds: Sequence[str], structure_format_score: float = 0.2,
                     final_format_score: float = 0.1, retrieval_score: float = 0.1, score: float = 1.0) -> float:
    """Search-R1 EM reward with format shaping (``qa_em_format.compute_score_em``):

    ======================  ============  =====================================
    answer                  format valid  reward
    ======================  ============  =====================================
    exact match             yes / no      ``score`` / ``score - structure``
    wrong or missing        yes           ``structure`` (+ ``retrieval`` if a
                                          gold answer is in an <information>)
    wrong                   no            ``final_format_score``
    missing                 no            0
    ======================  ============  =====================================

    >>> ok = "<think>a</think><search>q</search><information>Paris is big</information><think>b</think>"
    >>> search_r1_format(ok + "<answer>Paris</answer>", ["Paris"]), search_r1_format(ok + "<answer>Rome</answer>", ["Paris"])
    (1.0, 0.30000000000000004)
    >>> search_r1_format("<answer>Paris</answer> trailing", ["Paris"]), search_r1_format("Rome", ["Paris"])
    (0.8, 0)
    """
    valid, _ = search_r1_valid_sequence(completion)
    retrieval_correct = valid and any(
        cover_exact_match(info, golds) for info, _ in tagged_sections(completion, "information"))
    answer = last_answer(completion)
    if answer is not None and exact_match(answer, golds):
        return score if valid else score - structure_format_score
    if valid:
        return structure_format_score + (retrieval_score if retrieval_correct else 0.0)
    return final_format_score if answer is not None else 0


# ---------------------------------------------------------------------------------------------------------------
# R-Tuning as a reward


def refusal_aware(grade: str, correct: float = 1.0, abstain: float = 0.0, wrong: float = -1.0) -> float:
    """Refusal-aware reward (R-Tuning's "answer if you know, else say you are unsure"): CORRECT ``correct``,
    NOT_ATTEMPTED ``abstain``, INCORRECT or MISSING ``wrong``.

    >>> [refusal_aware(g) for g in (CORRECT, NOT_ATTEMPTED, INCORRECT, MISSING)]
    [1.0, 0.0, -1.0, -1.0]
    """
    if grade == CORRECT:
        return correct
    if grade == NOT_ATTEMPTED:
        return abstain
    return wrong
