"""Judges: (claim, evidence passages) -> SUPPORTED / REFUTED / NOT_ENOUGH_INFO, a score and the passages used.

Every judge implements :class:`Judge`. Passages arrive in retrieval rank order (knowledge edits first, thanks to
the edit boost); the verdict is the one of the best-ranked passage that is decisive (supports or refutes), so a
corrected fact beats the stale passage it replaces. No decisive passage -> NOT_ENOUGH_INFO.

* :class:`LexicalJudge` — names, numbers and content words; no model.
* :class:`NliJudge` — the cross-encoder made by ``knowserve train-verifier`` (:mod:`services.verification.nli`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.retrieval.core import STOPWORDS, Passage
from services.verification.normalise import DATE_TOKEN, DIMENSION_WORDS, Quantity, agrees, mark_dates, quantities

SUPPORTED, REFUTED, NOT_ENOUGH_INFO = "SUPPORTED", "REFUTED", "NOT_ENOUGH_INFO"


@dataclass(frozen=True)
class Verdict:
    label: str
    score: float  # confidence in ``label``, in [0, 1]
    evidence_ids: tuple[str, ...] = ()


class Judge(Protocol):
    name: str
    description: str

    def judge(self, claims: Sequence[str], evidence: Sequence[Sequence[Passage]]) -> list[Verdict]:
        """One verdict per claim; ``evidence[i]`` are claim i's passages, best first."""


_TOKEN = re.compile(rf"{DATE_TOKEN}\d+|\d[\d,]*(?:\.\d+)?|[^\W\d_]+(?:['’][^\W\d_]+)?", re.UNICODE)
_EXTRA_STOP = {"he", "she", "his", "her", "its", "also", "has", "had", "have", "were", "been", "which", "who",
               "from", "about", "than", "over", "after", "before", "during", "s"}
_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
                 "twenty": "20", "hundred": "100", "thousand": "1000", "million": "1000000"}


@dataclass(frozen=True)
class _Tok:
    norm: str  # lowercase word, the number without separators, or a date token (``ksdateYYYYMMDD``)
    kind: str  # "num", "date", "name" (capitalized, not sentence-initial unless multiword/unknown) or "word"


@functools.lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    for suffix in ("'s", "’s", "ies", "es", "s", "ed", "ing"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    for i, m in enumerate(_TOKEN.finditer(text)):
        raw = m.group()
        if raw.startswith(DATE_TOKEN):
            out.append(_Tok(raw, "date"))
            continue
        if raw[0].isdigit():
            out.append(_Tok(raw.replace(",", "").rstrip("."), "num"))
            continue
        low = raw.lower()
        if low in _NUMBER_WORDS and low not in ("one",):
            out.append(_Tok(_NUMBER_WORDS[low], "num"))
        elif raw[0].isupper() and low not in STOPWORDS and low not in _EXTRA_STOP and (i > 0 or len(raw) > 1):
            out.append(_Tok(_stem(low), "name"))
        else:
            out.append(_Tok(_stem(low), "word"))
    return out


def _content(toks: Sequence[_Tok]) -> list[_Tok]:
    return [t for t in toks if t.kind != "word" or (t.norm not in STOPWORDS and t.norm not in _EXTRA_STOP)]


@dataclass(frozen=True)
class _Text:
    """A claim or passage ready for the lexical judge: its quantities, and tokens of the rest (dates marked)."""

    tokens: list[_Tok]
    quantities: tuple[Quantity, ...]


def _prepare(text: str, with_quantities: bool = True) -> _Text:
    """Quantities found and cut out of the text (they are compared by value, not by token), dates marked.
    ``with_quantities=False``: tokens of the whole text (a passage read for a claim without quantities)."""
    qs = quantities(text) if with_quantities else ()
    rest = text
    for q in sorted(qs, key=lambda q: -q.start):
        rest = rest[: q.start] + " " + rest[q.end:]
    return _Text(_tokens(mark_dates(rest)), qs)


def _quantity_status(claim: Sequence[Quantity], passage: Sequence[Quantity]) -> list[bool | None]:
    """Per claim quantity: True (a passage quantity bears it out), False (the passage has comparable ones, none
    does), None (nothing comparable in the passage)."""
    out = []
    for cq in claim:
        comparable = [(pq, r) for pq in passage if (r := agrees(cq, pq)) is not None]
        # the passage's quantity that is the claim's: the one whose surrounding words it shares most ("lasted",
        # "population"), so "more than 60 million years" is not borne out by an unrelated larger time
        best = max((len(cq.context & pq.context) for pq, _ in comparable), default=0)
        found = [r for pq, r in comparable if len(cq.context & pq.context) == best]
        out.append(True if any(found) else (False if found else None))
    return out


@dataclass(frozen=True)
class Alignment:
    """How one claim lines up with one passage: what the lexical judge decides on, and what the feature judge
    learns from (:mod:`services.verification.learned`)."""

    content: int  # the claim's content tokens (names, numbers, dates, words not carried by a matching quantity)
    overlap: float  # share of them the passage holds
    keys: tuple[int, int, int]  # the claim's (names, numbers, dates)
    keys_missing: tuple[int, int, int]  # of those, the ones the passage lacks
    quantities: tuple[int, int, int]  # claim quantities (borne out, contradicted, nothing comparable)
    title_named: bool | None  # is the passage's title named in the claim (None: no title)
    topic: float  # share of the claim's other content words the passage holds
    conflict: bool  # the passage puts another name/number/date in a missing key's slot
    carried: frozenset[str] = frozenset()  # claim words a comparable quantity says ("long", "deep"): not content

    @property
    def missing(self) -> int:
        return sum(self.keys_missing)


def align(claim_text: _Text, passage_text: _Text, title: str = "", window: int = 4) -> Alignment:
    """The :class:`Alignment` of a prepared claim and passage (see :func:`_prepare`)."""
    claim, passage = claim_text.tokens, passage_text.tokens
    status = _quantity_status(claim_text.quantities, passage_text.quantities)
    measured = {q.dimension for q, ok in zip(claim_text.quantities, status) if ok is not None}
    # "long", "deep", "holds": the dimension a comparable quantity measures is said by the quantity itself (whether
    # its value agrees or not: "7,200 metres high" against "height 8,849 metres" is about the same thing)
    carried = frozenset(t.norm for t in _content(claim)
                        if t.kind == "word" and any(t.norm in DIMENSION_WORDS.get(d, ()) for d in measured))
    content = [t for t in _content(claim) if t.norm not in carried]
    have = {t.norm for t in passage}
    have |= {t.norm[: len(DATE_TOKEN) + 6] for t in passage if t.kind == "date"}  # "July 1934" in "4 July 1934"
    missing = [t for t in content if t.norm not in have]
    keys_missing = [t for t in missing if t.kind in ("name", "num", "date")]
    others = [t for t in content if t not in keys_missing]
    title_named = None
    if title:
        claim_norms = {t.norm for t in claim}
        title_named = any(t.norm in claim_norms for t in _content(_tokens(title)))
    conflict = False
    if keys_missing:
        positions: dict[str, list[int]] = {}
        for i, t in enumerate(passage):
            positions.setdefault(t.norm, []).append(i)
        conflict = any(_conflicts(claim, key, passage, positions, window) for key in keys_missing)

    def count(toks, kind):
        return sum(t.kind == kind for t in toks)

    return Alignment(
        content=len(content), overlap=1 - len(missing) / len(content) if content else 0.0,
        keys=(count(content, "name"), count(content, "num"), count(content, "date")),
        keys_missing=(count(keys_missing, "name"), count(keys_missing, "num"), count(keys_missing, "date")),
        quantities=(status.count(True), status.count(False), status.count(None)),
        title_named=title_named, topic=sum(t.norm in have for t in others) / len(others) if others else 0.0,
        conflict=conflict, carried=carried)


def _conflicts(claim: list[_Tok], key: _Tok, passage: list[_Tok], positions: dict, window: int) -> bool:
    """Does the passage put a different name/number of the same kind next to one of the key's anchors?"""
    idx = claim.index(key)
    # anchors are the claim's relation words next to the key ("born", "capital", "metre"), not other names
    anchors = [t for t in claim[max(0, idx - window): idx] + claim[idx + 1: idx + 1 + window]
               if t.kind == "word" and t.norm not in STOPWORDS and t.norm not in _EXTRA_STOP]
    claim_norms = {c.norm for c in claim}
    for anchor in anchors:
        for pos in positions.get(anchor.norm, []):
            for t in passage[max(0, pos - window): pos + window + 1]:
                if t.kind == key.kind and t.norm != key.norm and t.norm not in claim_norms:
                    if key.kind == "date" and len(t.norm) != len(key.norm):
                        continue  # a month against a full date: neither contradicts the other
                    if key.kind == "num" and _is_year(key.norm) != _is_year(t.norm):
                        continue
                    return True
    return False


class LexicalJudge:
    """Entity / number / date agreement between a claim and each passage.

    * SUPPORTED: every name and number of the claim appears in one passage, and at least ``support_overlap`` of
      its content words do.
    * REFUTED: the passage is about the claim's subject (its title is named in the claim) and about the same
      thing (at least ``topic_overlap`` of the claim's other content words appear), but where the claim has a
      name or number the passage has a different one in the same slot (next to the same relation word), e.g.
      "born in 1871" against "born ... in 1867".
    * otherwise NOT_ENOUGH_INFO.

    >>> p = Passage(id="curie#0", document_id="curie", title="Marie Curie", source="wiki", score=1.0,
    ...             text="Marie Curie was born in Warsaw in 1867. She won the Nobel Prize in Physics in 1903.")
    >>> j = LexicalJudge()
    >>> [v.label for v in j.judge(["Marie Curie was born in 1867.", "Marie Curie was born in 1871.",
    ...                            "Marie Curie was born in Paris.", "Marie Curie played the violin."], [[p]] * 4)]
    ['SUPPORTED', 'REFUTED', 'REFUTED', 'NOT_ENOUGH_INFO']
    """

    name = "lexical"
    description = ("Names, numbers and content words of the claim against each passage (no model). Fast; strong "
                   "on short factual claims, blind to paraphrase and negation.")

    def __init__(self, support_overlap: float = 0.8, topic_overlap: float = 0.5, window: int = 4):
        self.support_overlap = support_overlap
        self.topic_overlap = topic_overlap
        self.window = window

    def decide(self, a: Alignment) -> Verdict | None:
        """The verdict an alignment earns, None when it decides nothing."""
        if not a.content:
            return None
        _, contradicted, unmatched = a.quantities
        if not a.missing and a.overlap >= self.support_overlap and not contradicted and not unmatched:
            return Verdict(SUPPORTED, round(min(1.0, 0.5 + a.overlap / 2), 4))
        if (not a.missing and not contradicted) or a.missing == a.content or a.title_named is False:
            return None
        if a.topic < self.topic_overlap:
            return None
        if contradicted or a.conflict:  # the same quantity of the same subject, another value; or another key
            return Verdict(REFUTED, round(min(1.0, 0.5 + a.topic / 2), 4))
        return None

    def _passage_verdict(self, claim_text: _Text, passage_text: _Text, title: str = "") -> Verdict | None:
        return self.decide(align(claim_text, passage_text, title, self.window))

    def judge(self, claims: Sequence[str], evidence: Sequence[Sequence[Passage]]) -> list[Verdict]:
        out = []
        tokenized: dict[tuple[str, str, str, bool], _Text] = {}  # claims of a batch share passages: prepare once
        for claim, passages in zip(claims, evidence):
            ctoks = _prepare(claim)
            measured = bool(ctoks.quantities)  # passages are searched for quantities only for a claim that has one
            verdict = None
            for p in passages:
                key = (p.id, p.title, p.text, measured)
                if key not in tokenized:
                    tokenized[key] = _prepare(f"{p.title}. {p.text}", measured)
                v = self._passage_verdict(ctoks, tokenized[key], p.title)
                if v is not None:
                    verdict = Verdict(v.label, v.score, (p.id,))
                    break
            out.append(verdict or Verdict(NOT_ENOUGH_INFO, 1.0 if not passages else 0.5, ()))
        return out


def _is_year(num: str) -> bool:
    return num.isdigit() and len(num) == 4 and 1000 <= int(num) <= 2100


_SENTENCES = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def sentence_windows(text: str, size: int = 2) -> list[str]:
    """Overlapping windows of ``size`` adjacent sentences (the whole text when it has fewer).

    >>> sentence_windows("A is b. C is d. E is f.")
    ['A is b. C is d.', 'C is d. E is f.']
    """
    sentences = [s for s in _SENTENCES.split(text.strip()) if s]
    if len(sentences) <= size:
        return [" ".join(sentences)] if sentences else []
    return [" ".join(sentences[i: i + size]) for i in range(len(sentences) - size + 1)]


class NliJudge:
    """Cross-encoder probabilities per (sentence window of a passage, claim), as the verifier was trained.

    A passage's verdict is its most confident window; the best-ranked passage whose verdict is SUPPORTED or
    REFUTED with probability at least ``min_confidence`` decides the claim.
    """

    name = "nli"
    description = ("Cross-encoder entailment model trained by `knowserve train-verifier` (MiniLM on VitaminC + "
                   "FEVER + contrastive corpus edits), over sentence windows of each passage.")

    def __init__(self, model, min_confidence: float = 0.5, window: int = 2):
        self.model = model  # services.verification.nli.CrossEncoder
        self.min_confidence = min_confidence
        self.window = window

    def judge(self, claims: Sequence[str], evidence: Sequence[Sequence[Passage]]) -> list[Verdict]:
        pairs: list[tuple[str, str]] = []
        index: list[list[tuple[Passage, int, int]]] = []  # per claim: (passage, first pair, last pair)
        for claim, passages in zip(claims, evidence):
            rows = []
            for p in passages:
                windows = sentence_windows(p.text, self.window)
                start = len(pairs)
                pairs += [(f"{p.title}: {w}" if p.title else w, claim) for w in windows]
                rows.append((p, start, len(pairs)))
            index.append(rows)
        probs = self.model.predict(pairs) if pairs else None
        out = []
        for rows in index:
            verdict = None
            best_nei = 0.0
            for p, a, b in rows:
                if a == b:
                    continue
                window = probs[a:b]
                ps, pr, pn = window[int(window[:, :2].max(axis=1).argmax())]
                best_nei = max(best_nei, float(window[:, 2].max()))
                if max(ps, pr) >= max(pn, self.min_confidence):
                    verdict = Verdict(SUPPORTED, round(float(ps), 4), (p.id,)) if ps >= pr else \
                        Verdict(REFUTED, round(float(pr), 4), (p.id,))
                    break
            out.append(verdict or Verdict(NOT_ENOUGH_INFO, round(best_nei, 4) if rows else 1.0, ()))
        return out
