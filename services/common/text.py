"""Text rules shared by verification and reward: answer normalization, refusal detection, tagged sections.

One definition of "a refusal" and of "the same answer" for the whole platform, so that the verifier's refusal
count, the reward's NOT_ATTEMPTED and the eval harness's not-attempted rate agree.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


# End-of-sequence / end-of-turn markers of the chat-model families knowserve serves or grades: ChatML (SmolLM2, Qwen),
# GPT-2 style, Llama 3, Llama 2 / Mistral, Phi-3, Gemma. Engines stop on every one of these the tokenizer knows as a
# single token and never put them in a completion's text (as OpenAI, vLLM and TGI return text); graders cut raw
# text at the first one, so a caller that passes a model's raw output cannot make a right answer look wrong.
END_MARKERS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "</s>",
                                "<|end|>", "<end_of_turn>", "<eos>")


def strip_end_markers(text: str, markers: Iterable[str] = END_MARKERS) -> str:
    """The text before the first end-of-sequence marker: what the served model's text would be.

    >>> strip_end_markers("Hamlet was written by William Shakespeare.<|im_end|>")
    'Hamlet was written by William Shakespeare.'
    >>> strip_end_markers("<answer>Paris</answer><|eot_id|><|end_of_text|>"), strip_end_markers("no marker")
    ('<answer>Paris</answer>', 'no marker')
    """
    cut = len(text)
    for m in markers:
        if m:
            at = text.find(m)
            if 0 <= at < cut:
                cut = at
    return text[:cut]


def normalize_answer(text: str) -> str:
    """SQuAD / Search-R1 normalization: lowercase, drop punctuation and articles, squeeze spaces.

    >>> normalize_answer("The  Eiffel Tower!")
    'eiffel tower'
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split(), 0)
         if w != "_"}
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_NUMBER_WORD = "|".join(sorted((*_UNITS, *_TENS, *_SCALES), key=len, reverse=True))
_NUMBER_RUN = re.compile(rf"\b(?:{_NUMBER_WORD})(?:(?:[\s-]+|\s+and\s+)(?:{_NUMBER_WORD}))*\b", re.IGNORECASE)


def _words_value(words: list[str]) -> int:
    total, current = 0, 0
    for w in words:
        if w in _UNITS:
            current += _UNITS[w]
        elif w in _TENS:
            current += _TENS[w]
        elif w == "hundred":
            current = max(current, 1) * 100
        else:
            total += max(current, 1) * _SCALES[w]
            current = 0
    return total + current


def numbers_as_digits(text: str) -> str:
    """Spelled-out cardinal numbers as digits, so "eight" and "8" are the same answer.

    >>> numbers_as_digits("A spider has eight legs; a century has one hundred years, and twenty-one is 21.")
    'A spider has 8 legs; a century has 100 years, and 21 is 21.'
    >>> numbers_as_digits("three million and five")
    '3000005'
    """
    def value(m: re.Match) -> str:
        words = [w for w in re.split(r"[\s-]+", m.group(0).lower()) if w and w != "and"]
        return str(_words_value(words))

    return _NUMBER_RUN.sub(value, text)


def canonical_answer(text: str) -> str:
    """What two answers must share to be the same: :func:`normalize_answer` after :func:`numbers_as_digits`.

    >>> canonical_answer("Eight legs."), canonical_answer("8 legs")
    ('8 legs', '8 legs')
    """
    return normalize_answer(numbers_as_digits(text))


# Phrasings of "I don't know" (R-Tuning's "I am unsure", SimpleQA's NOT_ATTEMPTED, KnowRL's refusals).
_REFUSAL = re.compile(
    r"^\W*(?:"
    r"i\s*(?:do\s*n[o']?t|don't|dont|really\s+don't)\s+know"
    r"|i\s*(?:am|'m)\s+(?:not\s+(?:sure|certain)|unsure|uncertain)"
    r"|i\s*(?:can\s*not|cannot|can't|am\s+unable\s+to|'m\s+unable\s+to)\s+(?:answer|say|determine|know|tell|find|verify|provide)"
    r"|i\s*(?:do\s*n[o']?t|don't)\s+have\s+(?:enough\s+|any\s+|that\s+|the\s+)?(?:information|knowledge|data)"
    r"|i\s*(?:have\s+no|lack\s+(?:the\s+)?)\s*(?:information|knowledge|idea)"
    r"|(?:sorry|unfortunately)[,.!]?\s+i\s+(?:do\s*n[o']?t|don't|cannot|can't)"
    r"|no\s+idea|unknown|not\s+sure|unsure|cannot\s+be\s+determined|insufficient\s+information"
    r"|(?:the\s+)?answer\s+is\s+(?:unknown|not\s+known)"
    r")\b",
    re.IGNORECASE,
)


def is_refusal(text: str) -> bool:
    """True when an answer declines to answer ("I don't know", "I'm not sure", "Unknown", ...).

    Only the start of the answer counts: "I don't know why, but Paris is the capital" is a refusal by this
    rule, "Paris. I am not sure about the date" is not.

    >>> [is_refusal(t) for t in ["I don't know.", "I'm not sure who that is", "Paris", "Unknown", ""]]
    [True, True, False, True, False]
    """
    return bool(_REFUSAL.match(text.strip()))


def tagged_sections(text: str, tag: str) -> list[tuple[str, int]]:
    """Bodies of ``<tag>…</tag>`` with their offset in ``text`` (in order; unclosed tags are ignored).

    >>> tagged_sections("<think>a</think><answer> b </answer>", "answer")
    [(' b ', 24)]
    """
    pattern = re.compile(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.S)
    return [(m.group(1), m.start(1)) for m in pattern.finditer(text)]


def section(text: str, which: str) -> tuple[str, int]:
    """The part of a completion to check: ``all``, ``think`` or ``answer`` -> (text, offset in ``text``).

    ``think`` tolerates a missing opening tag (KnowRL's template puts ``<think>`` in the prompt): everything
    before ``</think>`` counts. A missing section is ``("", 0)``.

    >>> section("reasoning here</think><answer>Paris</answer>", "think")
    ('reasoning here', 0)
    >>> section("reasoning here</think><answer>Paris</answer>", "answer")
    ('Paris', 30)
    """
    if which == "all":
        return text, 0
    if which == "answer":
        found = tagged_sections(text, "answer")
        return found[-1] if found else ("", 0)
    if which == "think":
        found = tagged_sections(text, "think")
        if found:
            return found[0]
        end = text.find("</think>")
        return (text[:end], 0) if end >= 0 else ("", 0)
    raise ValueError(f"unknown section {which!r}; use all, think or answer")
