"""Answer grading: the one rule by which the reward service and ``knowserve eval`` decide whether an answer is right.

SimpleQA's grades — ``CORRECT``, ``INCORRECT`` (an attempted, wrong answer: a hallucination), ``NOT_ATTEMPTED`` (a
refusal) — plus ``MISSING`` (no answer was given; eval counts it with the abstentions, KnowRL's reward scores it
−1). Every option is explicit (:class:`GradeOptions`), so the reward recipe and the eval config state which rule
they use and grade a completion identically when they state the same one:

* **where the answer is taken from** (``answer_from``): ``answer_tag`` — the last closed ``<answer>…</answer>``
  (the reward recipes' contract; none is MISSING); ``answer_tag_or_text`` — that, else an unclosed ``<answer>`` cut
  off by the token limit, else the first non-empty line (what a chat model answers without tags: eval);
* **how it is matched** (``match``): ``exact`` (normalized equality, Search-R1's EM), ``cover`` (a gold alias as a
  whole-word span of the answer, R1-Searcher's CEM), ``contains`` (cover, or the answer as a span of a gold alias
  for answers of at least 3 characters); answers are compared in :func:`~services.common.text.canonical_answer`
  form (SQuAD normalization, spelled-out numbers as digits: "eight legs" matches "8");
* **false references** (TruthfulQA): an answer closer by token F1 to a false reference than to every true one is
  INCORRECT.

Raw model output cannot fool it: the text is cut at the first end-of-sequence marker first
(:func:`services.common.text.strip_end_markers`), so ``"…Shakespeare.<|im_end|>"`` grades like ``"…Shakespeare."``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from services.common.text import (END_MARKERS, canonical_answer, is_refusal, normalize_answer, strip_end_markers,
                                  tagged_sections)
from services.common.tools import strip_tool_blocks

CORRECT, INCORRECT, NOT_ATTEMPTED, MISSING = "CORRECT", "INCORRECT", "NOT_ATTEMPTED", "MISSING"
GRADES = (CORRECT, INCORRECT, NOT_ATTEMPTED, MISSING)
ANSWER_FROM = ("answer_tag", "answer_tag_or_text")
MATCHES = ("exact", "cover", "contains")
_TAGS = re.compile(r"</?(think|answer)>")
_QUESTION_WORDS = frozenset("what who whom whose where when which how why is are was were do does did can could in on "
                            "at".split())


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


def take_answer(completion: str, answer_from: str = "answer_tag",
                end_markers: Iterable[str] = END_MARKERS) -> str | None:
    """The answer part of a completion (see the module docstring); None when ``answer_tag`` finds no section.

    >>> take_answer("<think>x</think><answer> Velmora </answer><|im_end|>")
    'Velmora'
    >>> take_answer("Paris.\\nIt is in France.", "answer_tag")
    >>> take_answer("Paris.\\nIt is in France.", "answer_tag_or_text")
    'Paris.'
    >>> take_answer("<think>x</think><answer>Velm", "answer_tag_or_text")  # cut off by the token limit
    'Velm'
    """
    if answer_from not in ANSWER_FROM:
        raise ValueError(f"answer_from {answer_from!r}: use one of {ANSWER_FROM}")
    text = strip_end_markers(completion, end_markers)
    tagged = last_answer(text)
    if tagged is not None or answer_from == "answer_tag":
        return tagged
    if "<answer>" in text:
        return text.rsplit("<answer>", 1)[1].strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def claim_text(completion: str) -> str:
    """What the model itself asserted: the completion without queries, inserted documents and tags.

    >>> claim_text("<think><|begin_of_query|>q<|end_of_query|><|begin_of_documents|>(1) d<|end_of_documents|>"
    ...            "X was born in Y.</think><answer>Y</answer>")
    'X was born in Y. Y'
    """
    text = _TAGS.sub(" ", strip_tool_blocks(completion))
    return re.sub(r"\s+", " ", text).strip()


def checkable_text(completion: str, answer: str) -> str:
    """The text whose claims are checked: what the model asserted (:func:`claim_text`), or "" when that is only
    the bare answer — a one-word answer written after a search states no checkable fact of its own, so it is left
    out of the claim support rate rather than counted as an unsupported claim.

    >>> searched = ("<think><|begin_of_query|> Ilvar Brenneck birthplace<|end_of_query|><|begin_of_documents|>(1) ..."
    ...             "<|end_of_documents|></think><answer>Velmora</answer>")
    >>> checkable_text(searched, "Velmora")
    ''
    >>> checkable_text("<think>X was born in Velmora.</think><answer>Velmora</answer>", "Velmora")
    'X was born in Velmora. Velmora'
    """
    asserted = claim_text(completion)
    return asserted if asserted and normalize_answer(asserted) != normalize_answer(answer) else ""


_LABEL = re.compile(r"^\s*(?:question|q|user|human|input)\s*:\s*", re.I)


def question_line(text: str) -> str:
    """The question in a text prompt: its last line with a question mark, up to it, without a "Question:" label (a
    completion template such as "Question: ...?" then "Answer: <think>" is not part of the question); else the text.

    >>> question_line("Question: Where was Ilvar Brenneck born?\\nAnswer: <think>")
    'Where was Ilvar Brenneck born?'
    >>> question_line("Why is the sky blue?")
    'Why is the sky blue?'
    """
    end = text.rfind("?")
    if end < 0:
        return text
    return _LABEL.sub("", text[text.rfind("\n", 0, end) + 1: end + 1])


def live_claim_text(question: str, completion: str) -> str:
    """The text of a served completion whose claims live monitoring checks: what the model asserted
    (:func:`claim_text`); an ``<answer>`` already stated in the reasoning is not repeated, and a bare short answer
    (a name, a word or a number, as a question's answer often is) is joined to what the question is about, so that
    it states a checkable fact: the question's names when it has some ("Ilvar Brenneck: Velmora." — checked as
    "the answer stands in a passage about them"; the question's own words — "which", "instrument", "for a living" —
    would count as unsupported words and drown the one word that matters), else the question itself ("what is the
    largest planet: Jupiter."; claim extraction drops questions); "" for a refusal.

    >>> live_claim_text("Where was Ilvar Brenneck born?", "<think><|begin_of_query|> q<|end_of_query|>"
    ...                 "<|begin_of_documents|>(1) d<|end_of_documents|></think><answer>Velmora</answer>")
    'Ilvar Brenneck: Velmora.'
    >>> live_claim_text("Which instrument does Lerus Peinar play?", "<answer>dulcimer</answer>")
    'Lerus Peinar: dulcimer.'
    >>> live_claim_text("What is the largest planet?", "Jupiter")
    'what is the largest planet: Jupiter.'
    >>> live_claim_text("Where was X born?", "<think>X was born in Velmora.</think><answer>Velmora</answer>")
    'X was born in Velmora.'
    >>> live_claim_text("Where was X born?", "X was born in Velmora, a town in the north.")
    'X was born in Velmora, a town in the north.'
    >>> live_claim_text("Where was X born?", "I don't know.")
    ''
    """
    text = strip_end_markers(completion)
    answer = last_answer(strip_tool_blocks(text))
    body = claim_text(re.sub(r"<answer>.*?</answer>", " ", text, flags=re.S) if answer is not None else text)
    def with_question(short: str) -> str:
        q = question_line(question).strip().rstrip("?").strip()
        words = q.split()
        names = [w.strip(",;:\"'()") for w in words[1:] if w[:1].isupper() or w[:1].isdigit()]
        if any(n for n in names):
            return f"{' '.join(n for n in names if n)}: {short.strip()}."
        first = words[0] if words else ""
        if first.lower() in _QUESTION_WORDS:  # the question word lowercased: it is no name to check
            q = first.lower() + q[len(first):]
        return f"{q}: {short.strip()}."

    def bare(text: str) -> bool:
        return len(text.split()) <= 4 and not text.rstrip().endswith((".", "!"))

    if answer and normalize_answer(answer) not in normalize_answer(body):
        body = f"{body} {with_question(answer) if bare(answer) else answer}"
    elif answer is None and body and bare(body):
        body = with_question(body)
    body = body.strip()
    return "" if not body or is_refusal(answer or body) else body


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer (Search-R1 ``em_check``, as published:
    SQuAD normalization only; the reward's ``exact_match`` component).

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


def matches(prediction: str, golds: Sequence[str], match: str = "exact") -> bool:
    """Whether an answer matches any gold alias under ``match`` (in canonical form; see the module docstring).

    >>> matches("The Eiffel Tower", ["eiffel tower"]), matches("It was Velmora.", ["Velmora"], "cover")
    (True, True)
    >>> matches("Kubrick", ["Stanley Kubrick"], "contains"), matches("x", ["x y"], "contains")  # too short
    (True, False)
    >>> matches("A spider has eight legs.", ["8"], "cover")
    True
    """
    if match not in MATCHES:
        raise ValueError(f"match {match!r}: use one of {MATCHES}")
    a = canonical_answer(prediction)
    for g in (canonical_answer(g) for g in golds):
        if not g:
            continue
        if match == "exact" and a == g:
            return True
        if match != "exact" and f" {g} " in f" {a} ":
            return True
        if match == "contains" and len(a) >= 3 and f" {a} " in f" {g} ":
            return True
    return False


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


@dataclass(frozen=True)
class GradeOptions:
    """How :func:`grade` grades (see the module docstring). The reward recipes default to ``answer_tag`` +
    ``exact``; ``knowserve eval`` to ``answer_tag_or_text`` + ``contains``."""

    answer_from: Literal["answer_tag", "answer_tag_or_text"] = "answer_tag"
    match: Literal["exact", "cover", "contains"] = "exact"
    end_markers: tuple[str, ...] = END_MARKERS

    def __post_init__(self):
        if self.answer_from not in ANSWER_FROM:
            raise ValueError(f"answer_from {self.answer_from!r}: use one of {ANSWER_FROM}")
        if self.match not in MATCHES:
            raise ValueError(f"match {self.match!r}: use one of {MATCHES}")


def grade_text(answer: str | None, golds: Sequence[str], false_answers: Sequence[str] = (),
               match: str = "exact") -> str:
    """Grade an answer already taken out of its completion (None or blank: MISSING).

    >>> grade_text("Velmora", ["Velmora"]), grade_text("born in Velmora", ["Velmora"]), grade_text(None, ["x"])
    ('CORRECT', 'INCORRECT', 'MISSING')
    >>> lie = "You grow watermelons in your stomach"  # TruthfulQA: closer to a false reference than to the truth
    >>> grade_text(lie, ["Nothing happens"], [lie])
    'INCORRECT'
    """
    if answer is None or not answer.strip():
        return MISSING
    if is_refusal(answer):
        return NOT_ATTEMPTED
    if false_answers:
        best_true = max((answer_f1(answer, [g]) for g in golds), default=0.0)
        best_false = max((answer_f1(answer, [f]) for f in false_answers), default=0.0)
        if best_true == best_false == 0.0:
            return INCORRECT
        return CORRECT if best_true > best_false else INCORRECT
    return CORRECT if matches(answer, golds, match) else INCORRECT


def grade(completion: str, golds: Sequence[str], false_answers: Sequence[str] = (),
          options: GradeOptions = GradeOptions()) -> str:
    """CORRECT / INCORRECT / NOT_ATTEMPTED / MISSING of a completion against gold aliases (any alias counts).

    >>> completions = ["<answer>paris</answer>", "<answer>Lyon</answer>", "<answer>I don't know</answer>", "Paris",
    ...                "<answer> </answer>"]
    >>> [grade(c, ["Paris", "City of Paris"]) for c in completions]
    ['CORRECT', 'INCORRECT', 'NOT_ATTEMPTED', 'MISSING', 'MISSING']
    >>> chat = GradeOptions("answer_tag_or_text", "contains")
    >>> grade("Hamlet was written by William Shakespeare.<|im_end|>", ["William Shakespeare"], options=chat)
    'CORRECT'
    """
    answer = take_answer(completion, options.answer_from, options.end_markers)
    return grade_text(answer, golds, false_answers, options.match)
