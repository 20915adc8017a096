"""Reward components of the seed papers: pure functions with their paper's worked examples (run as doctests), and
the **registry** that both the recipe validator (:mod:`services.reward.recipes`) and the scorer
(:mod:`services.reward.core`) read.

A component is one function and one ``@component(...)`` registration: its parameters (defaults fix their types),
allowed choices, what it needs (gold answers; the verification or generation service, reached through
:class:`Services`) and a description. Combiners (how component values become the total) register the same way
with ``@combiner(...)``. Adding one touches nothing else.

Sources: KnowRL (zjunlp/KnowRL ``train/reward_function``), R1-Searcher (RUCAIBox, arXiv 2503.05592 §3.2),
Search-R1 (PeterGriffinJin/Search-R1 ``verl/utils/reward_score/qa_em*.py``), R-Tuning (arXiv 2311.09677), IKEA
(arXiv 2505.07596, the knowledge-boundary reward).
Answer matching and grading are the platform's one grader (:mod:`services.common.grading`), shared with eval.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.common.errors import FailedPrecondition, Unavailable
from services.common.grading import (CORRECT, GRADES, INCORRECT, MISSING, NOT_ATTEMPTED, GradeOptions, answer_f1,
                                     cover_exact_match, exact_match, grade, last_answer)
from services.common.text import tagged_sections
from services.common.tools import TOOL_PROTOCOLS

if TYPE_CHECKING:
    from services.generation.client import GreedyFn

__all__ = ["CORRECT", "GRADES", "INCORRECT", "MISSING", "NOT_ATTEMPTED", "answer_f1", "cover_exact_match",
           "exact_match", "last_answer"]


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


_CORRECTNESS_VALUE = {CORRECT: 2.0, INCORRECT: -1.0, NOT_ATTEMPTED: 1.0, MISSING: -1.0}


def correctness_value(grade: str) -> float:
    """KnowRL correctness reward of a grade: CORRECT +2, INCORRECT −1, NOT_ATTEMPTED +1, MISSING −1.

    >>> [correctness_value(g) for g in (CORRECT, INCORRECT, NOT_ATTEMPTED, MISSING)]
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

R1 = TOOL_PROTOCOLS["r1_searcher"]


def retrieval_exchanges(completion: str) -> int:
    """Well-formed query -> documents exchanges: a non-empty query followed by its documents block.

    >>> retrieval_exchanges("<|begin_of_query|>capital of France<|end_of_query|>"
    ...                     "<|begin_of_documents|>(1) Paris ...<|end_of_documents|>")
    1
    """
    return len(R1.exchanges(completion))


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
    counts = [completion.count(t) for t in R1.tags]
    if counts[0] != counts[1] or counts[2] != counts[3] or counts[0] != counts[2]:
        problems.append(f"query/document tags unbalanced ({counts[0]} queries, {counts[2]} documents)")
    if counts[0] > max_queries:
        problems.append(f"{counts[0]} queries, above {max_queries}")
    for q in R1.queries(completion):
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
        if any(t in body for t in R1.tags):
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

S1 = TOOL_PROTOCOLS["search_r1"]
_S1_QUERY, _S1_DOCS = S1.query_open.strip("<>"), S1.docs_open.strip("<>")  # "search", "information"
_SEARCH_R1_TAGS = re.compile(rf"</?(think|{_S1_QUERY}|{_S1_DOCS}|answer)>")


def search_r1_valid_sequence(completion: str) -> tuple[bool, str]:
    """Search-R1's ``is_valid_sequence``: only think/search/information/answer blocks, balanced, in the order
    think -> (search -> information -> think)* -> answer, with nothing but whitespace between blocks.

    >>> search_r1_valid_sequence("<think>a</think><search>q</search><information>d</information>"
    ...                          "<think>b</think><answer>x</answer>")
    (True, 'valid')
    >>> search_r1_valid_sequence("<think>a</think><answer>x</answer><search>q</search>")[0]
    False
    """
    allowed = {"think": {_S1_QUERY, "answer"}, _S1_QUERY: {_S1_DOCS}, _S1_DOCS: {"think"}, "answer": set()}
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
        cover_exact_match(info, golds) for info, _ in tagged_sections(completion, _S1_DOCS))
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


# ---------------------------------------------------------------------------------------------------------------
# Adaptive search (IKEA's knowledge-boundary reward)


def search_economy(grade: str, searches: int, max_searches: int = 1, correct_bonus: float = 0.5,
                   wrong_bonus: float = 0.0) -> float:
    """Knowledge-boundary reward after IKEA (Huang et al., 2025, arXiv 2505.07596): a right answer earns
    ``correct_bonus`` times the share of the search budget it left unused (``1 - searches / max_searches``), so
    answering what the model knows beats looking it up; a wrong answer that searched earns ``wrong_bonus`` (looking
    up what it does not know is the right move, even when the search fails); anything else earns 0.

    >>> [search_economy(CORRECT, s) for s in (0, 1, 3)]   # more searches than the budget earn nothing
    [0.5, 0.0, 0.0]
    >>> search_economy(INCORRECT, 1, wrong_bonus=0.1), search_economy(INCORRECT, 0, wrong_bonus=0.1)
    (0.1, 0.0)
    """
    if grade == CORRECT:
        return correct_bonus * max(0.0, 1.0 - searches / max_searches)
    if grade == INCORRECT and searches > 0:
        return wrong_bonus
    return 0.0


# ---------------------------------------------------------------------------------------------------------------
# The registry: what a recipe may name, and how each component is scored


@dataclass
class ScoreItem:
    """One completion to score: its prompt, gold answers (aliases) and metadata (``topic`` goes to the verifier)."""

    prompt: str = ""
    completion: str = ""
    gold_answers: Sequence[str] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Value:
    """What a component says about one item; ``grade`` is set by components that grade the answer."""

    value: float
    detail: str = ""
    applicable: bool = True
    grade: str | None = None


@dataclass
class FactResult:
    """What the verification service said about one completion's checked section."""

    score: float | None  # length-penalized FActScore; None when not applicable
    detail: str


# (completions, section, judge, gamma, evidence_top_k, topics) -> one FactResult per completion
FactualityFn = Callable[[list[str], str, str, float, int, list[str]], Awaitable[list[FactResult]]]


@dataclass
class Services:
    """The other services remote components reach (None: not configured) and how to treat their failures."""

    factuality: FactualityFn | None = None
    llm_generate: GreedyFn | None = None
    factuality_judge: str = ""  # the verification judge when a recipe names none
    on_verification_unavailable: str = "fail"  # or "not_applicable"


GOLD, VERIFICATION, GENERATION = "gold", "verification", "generation"


@dataclass(frozen=True)
class ComponentSpec:
    """A registered component. ``score(items, services, **params) -> list[Value]`` is async and batched;
    ``params`` are the defaults (they fix each parameter's type); ``check(params)`` returns a problem with one
    parameter as ``(name, message)``, or None; ``grades``: its values carry the answer's grade (the answers
    metric counts the first grading component's grade)."""

    name: str
    score: Callable[..., Awaitable[list[Value]]]
    params: Mapping[str, Any]
    description: str
    needs: frozenset[str] = frozenset()
    choices: Mapping[str, tuple] = field(default_factory=dict)
    check: Callable[[Mapping[str, Any]], tuple[str, str] | None] | None = None
    grades: bool = False


COMPONENTS: dict[str, ComponentSpec] = {}


def component(name: str, *, description: str, params: Mapping[str, Any] | None = None, needs: Sequence[str] = (),
              choices: Mapping[str, tuple] | None = None, check=None, batch: bool = False, grades: bool = False):
    """Register a component. A per-item function is ``fn(item, **params) -> Value`` (pure; run in a worker
    thread); with ``batch=True`` it is ``async fn(items, services, **params) -> list[Value]`` (one call per Score
    batch, for components that call another service)."""

    def register(fn):
        if name in COMPONENTS:
            raise ValueError(f"reward component {name!r} is registered twice")
        if batch:
            score = fn
        else:
            async def score(items, services, **p):
                return await asyncio.to_thread(lambda: [fn(it, **p) for it in items])
        COMPONENTS[name] = ComponentSpec(name, score, dict(params or {}), description, frozenset(needs),
                                         dict(choices or {}), check, grades)
        return fn

    return register


_GRADE_CHOICES = {"match": ("exact", "cover", "contains"), "answer_from": ("answer_tag", "answer_tag_or_text")}


@component("format_think_answer", description="KnowRL format: +1 for <think>…</think><answer>…</answer>, else -1")
def _format_think_answer(item: ScoreItem) -> Value:
    return Value(format_think_answer(item.completion))


@component("correctness_with_refusal", needs=[GOLD], batch=True, grades=True,
           params={"match": "exact", "answer_from": "answer_tag", "grader": "match"},
           choices={**_GRADE_CHOICES, "grader": ("match", "llm")},
           description="KnowRL correctness: CORRECT +2, INCORRECT -1, NOT_ATTEMPTED +1, missing answer -1; graded by "
                       "gold-answer match or (grader: llm) by the generation service")
async def _correctness(items: Sequence[ScoreItem], services: Services, *, match: str, answer_from: str,
                       grader: str) -> list[Value]:
    options = GradeOptions(answer_from, match)
    grades = await asyncio.to_thread(lambda: [grade(it.completion, it.gold_answers, options=options) for it in items])
    out = [Value(correctness_value(g), g, grade=g) for g in grades]
    if grader == "llm":
        if services.llm_generate is None:
            raise FailedPrecondition("correctness grader 'llm' needs the generation service: set "
                                     "KNOWSERVE_REWARD_GENERATION_TARGET, or use grader 'match'")
        from services.reward.grader import grade_with_llm

        asked = [i for i, g in enumerate(grades) if g != MISSING]  # no answer: MISSING stands
        answers = [last_answer(items[i].completion) or "" for i in asked]
        graded = await grade_with_llm(services.llm_generate, [items[i].prompt for i in asked],
                                      [items[i].gold_answers for i in asked], answers)
        for i, (g, raw) in zip(asked, graded):
            out[i] = (Value(0.0, f"not applicable: grader answered {raw!r}", applicable=False) if g is None
                      else Value(correctness_value(g), g, grade=g))
    return out


@component("factuality", needs=[VERIFICATION], batch=True,
           params={"section": "think", "gamma": 10.0, "judge": "", "evidence_top_k": 0},
           choices={"section": ("think", "answer", "all")},
           check=lambda p: ("gamma", "must be above 0") if p["gamma"] <= 0 else None,
           description="KnowRL factuality: FActScore (supported fraction x length penalty) from the verification "
                       "service")
async def _factuality(items: Sequence[ScoreItem], services: Services, *, section: str, gamma: float, judge: str,
                      evidence_top_k: int) -> list[Value]:
    try:
        if services.factuality is None:
            raise Unavailable("factuality needs the verification service: set KNOWSERVE_REWARD_VERIFICATION_TARGET")
        facts = await services.factuality([it.completion for it in items], section, judge or services.factuality_judge,
                                          gamma, evidence_top_k, [it.metadata.get("topic", "") for it in items])
    except Unavailable as e:
        if services.on_verification_unavailable == "fail":
            raise Unavailable(f"factuality: {e}") from None
        facts = [FactResult(None, f"not applicable: verification unavailable ({e})") for _ in items]
    return [Value(f.score if f.score is not None else 0.0, f.detail, applicable=f.score is not None) for f in facts]


@component("retrieval_used", params={"reward": 0.5},
           description="R1-Searcher stage 1: +0.5 for a query/documents exchange")
def _retrieval_used(item: ScoreItem, *, reward: float) -> Value:
    return Value(retrieval_used(item.completion, reward), f"{retrieval_exchanges(item.completion)} exchange(s)")


@component("format_r1_searcher", choices={"stage": (1, 2)},
           params={"stage": 1, "bonus": 0.5, "penalty": -2.0, "max_answer_words": 10, "max_query_words": 20,
                   "max_queries": 4},
           description="R1-Searcher format: stage 1 +0.5 when well-formed; stage 2 0 or the penalty (-2)")
def _format_r1_searcher(item: ScoreItem, *, stage: int, bonus: float, penalty: float, **limits: int) -> Value:
    golds = list(item.gold_answers)
    problems = r1_searcher_format_problems(item.completion, golds, **limits)
    value = format_r1_searcher(item.completion, golds, stage, bonus, penalty, **limits)
    return Value(value, "; ".join(problems) or "well-formed")


def _answer_metric(fn: Callable[[str, Sequence[str]], float]):
    def score(item: ScoreItem) -> Value:
        answer = last_answer(item.completion)
        return Value(fn(answer, list(item.gold_answers)) if answer is not None else 0.0,
                     "no <answer>" if answer is None else "")

    return score


component("answer_f1", needs=[GOLD], description="Token F1 of the final <answer> against the gold answers")(
    _answer_metric(answer_f1))
component("exact_match", needs=[GOLD], description="Exact match (SQuAD normalization) of the final <answer>")(
    _answer_metric(exact_match))
component("cover_exact_match", needs=[GOLD], description="A gold answer appears inside the final <answer>")(
    _answer_metric(cover_exact_match))


@component("search_r1_format", needs=[GOLD],
           params={"structure_format_score": 0.2, "final_format_score": 0.1, "retrieval_score": 0.1, "score": 1.0},
           description="Search-R1 EM shaped by sequence format and retrieval")
def _search_r1_format(item: ScoreItem, **p: float) -> Value:
    _, why = search_r1_valid_sequence(item.completion)
    return Value(float(search_r1_format(item.completion, list(item.gold_answers), **p)), f"sequence {why}")


@component("refusal_aware", needs=[GOLD], choices=_GRADE_CHOICES, grades=True,
           params={"correct": 1.0, "abstain": 0.0, "wrong": -1.0, "match": "exact", "answer_from": "answer_tag"},
           description="R-Tuning as a reward: correct +1, abstain 0, wrong -1")
def _refusal_aware(item: ScoreItem, *, correct: float, abstain: float, wrong: float, match: str,
                   answer_from: str) -> Value:
    g = grade(item.completion, item.gold_answers, options=GradeOptions(answer_from, match))
    return Value(refusal_aware(g, correct, abstain, wrong), g, grade=g)


@component("search_economy", needs=[GOLD],
           params={"max_searches": 1, "correct_bonus": 0.5, "wrong_bonus": 0.0, "tool_protocol": "r1_searcher",
                   "match": "exact", "answer_from": "answer_tag"},
           choices={**_GRADE_CHOICES, "tool_protocol": tuple(TOOL_PROTOCOLS)},
           check=lambda p: ("max_searches", "must be at least 1") if p["max_searches"] < 1 else None,
           description="IKEA's knowledge-boundary reward: a right answer earns the bonus times the unused share of "
                       "the search budget; a wrong one that searched earns wrong_bonus")
def _search_economy(item: ScoreItem, *, max_searches: int, correct_bonus: float, wrong_bonus: float,
                    tool_protocol: str, match: str, answer_from: str) -> Value:
    g = grade(item.completion, item.gold_answers, options=GradeOptions(answer_from, match))
    searches = len(TOOL_PROTOCOLS[tool_protocol].exchanges(item.completion))
    return Value(search_economy(g, searches, max_searches, correct_bonus, wrong_bonus), f"{g}, {searches} search(es)")


# ---------------------------------------------------------------------------------------------------------------
# Combiners: component values -> the total


@dataclass
class ComponentValue:
    """A component's value for one item, with its recipe weight (what ScoreResponse reports)."""

    name: str
    value: float
    weight: float
    applicable: bool = True
    detail: str = ""
    grade: str | None = None


@dataclass(frozen=True)
class CombinerSpec:
    """A registered combiner: ``fn(values) -> total`` over the recipe's values (in recipe order); ``requires``
    are the components a recipe using it must have."""

    name: str
    fn: Callable[[dict[str, ComponentValue]], float]
    requires: tuple[str, ...]
    description: str


COMBINERS: dict[str, CombinerSpec] = {}


def combiner(name: str, *, description: str, requires: Sequence[str] = ()):
    def register(fn):
        if name in COMBINERS:
            raise ValueError(f"reward combiner {name!r} is registered twice")
        COMBINERS[name] = CombinerSpec(name, fn, tuple(requires), description)
        return fn

    return register


@combiner("sum", description="weighted sum of the applicable components")
def combine_sum(values: dict[str, ComponentValue]) -> float:
    """The weighted sum of the applicable values.

    >>> combine_sum({"a": ComponentValue("a", 1.0, 2.0), "b": ComponentValue("b", 5.0, 1.0, applicable=False)})
    2.0
    """
    return sum(v.weight * v.value for v in values.values() if v.applicable)


@combiner("knowrl", requires=("correctness_with_refusal", "factuality"),
          description="KnowRL: a wrong, non-refusal answer's correctness becomes -1 + its fact score; the rest add up")
def combine_knowrl(values: dict[str, ComponentValue]) -> float:
    """KnowRL's total: :func:`knowrl_merge` of correctness and factuality, plus the other components.

    >>> v = {"correctness_with_refusal": ComponentValue("correctness_with_refusal", -1.0, 1.0, grade="INCORRECT"),
    ...      "factuality": ComponentValue("factuality", 0.4, 1.0)}
    >>> combine_knowrl(v)
    -0.6
    """
    corr, facts = values["correctness_with_refusal"], values["factuality"]
    refusal = corr.grade == NOT_ATTEMPTED
    merged = knowrl_merge(corr.value, refusal, facts.weight * facts.value if facts.applicable else None)
    used = corr.value == -1.0 and not refusal
    facts.detail = f"{facts.detail}; {'merged into' if used else 'not used by'} correctness (knowrl)"
    return corr.weight * merged + sum(v.weight * v.value for n, v in values.items()
                                      if v.applicable and n not in ("correctness_with_refusal", "factuality"))
