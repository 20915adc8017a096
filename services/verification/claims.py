"""Deterministic claim extraction: answer text -> atomic claims that keep their character span.

Rules, in order (FActScore splits into sentences and then into atomic facts; this is the no-model version):

1. list items (lines starting with ``-``, ``*``, ``•`` or ``1.``) are separate units;
2. sentences, split at ``.``/``!``/``?`` followed by a capital, not after abbreviations (``Dr.``, ``U.S.``,
   initials) or inside numbers (``3.5``);
3. clauses, split at ``;`` and at ``, and`` / ``, but`` / ``, while`` / ``, whereas`` between two clauses with
   at least three words each;
4. coordinated predicates: "X was born in A and died in B" -> "X was born in A" + "X died in B" — a split at
   `` and `` when the right side starts with a verb-like word; the left clause's subject (the words before
   its first verb-like word) is prefixed to the right claim, whose span covers only the right side.

Questions, headings of one or two words, and fragments without a letter are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    text: str
    start: int  # character span in the original answer; -1 when the claim was given, not extracted
    end: int


_ABBREV = {"dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "no", "vol", "fig",
           "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "mt", "ft", "inc",
           "ltd", "co", "corp", "u.s", "u.k", "approx", "ca", "c"}
_SENT_END = re.compile(r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*•]|\d+[.)])[ \t]+", re.M)
_CLAUSE = re.compile(r";\s+|,\s+(?:and|but|while|whereas|although|though)\s+")
_VERB_LIKE = re.compile(
    r"^(?:is|was|are|were|has|had|have|became|becomes|won|wins|wrote|writes|died|dies|lived|lives|served|"
    r"serves|founded|led|made|makes|received|receives|played|plays|worked|works|moved|moves|married|"
    r"studied|taught|built|remains|remained|includes|included|contains|contained|located|known|"
    r"[a-z]+ed|[a-z]+s)\b"
)
_DETERMINERS = {"the", "a", "an", "his", "her", "its", "their", "this", "that", "these", "those", "some", "all",
                "two", "three", "many", "several", "other", "each", "both", "one", "in", "on", "at", "as", "of",
                "s"}


def _sentence_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, cur = [], start
    for m in _SENT_END.finditer(text, start, end):
        before = text[cur: m.start()].rsplit(None, 1)
        last = before[-1].lower().rstrip(".") if before else ""
        if last in _ABBREV or (len(last) == 1 and last.isalpha()):
            continue  # "Dr. Smith", "J. R. R. Tolkien"
        spans.append((cur, m.start() + len(m.group().rstrip())))
        cur = m.end()
    spans.append((cur, end))
    return spans


def _strip(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and (text[s].isspace() or text[s] in ",;:"):
        s += 1
    while e > s and (text[e - 1].isspace() or text[e - 1] in ",;:"):
        e -= 1
    return s, e


def _subject(clause: str) -> str | None:
    words = clause.split()
    for i, w in enumerate(words):
        if i > 0 and _VERB_LIKE.match(w.lower()) and words[i - 1].lower() not in _DETERMINERS:
            return " ".join(words[:i])
    return None


def _split_predicates(text: str, s: int, e: int) -> list[tuple[str, int, int]]:
    """"X was born in A and died in B" -> [("X was born in A", ..), ("X died in B", ..)]."""
    clause = text[s:e]
    subject = _subject(clause)
    out: list[tuple[str, int, int]] = []
    cur = s
    if subject:
        for m in re.finditer(r",?\s+and\s+", clause):
            right = clause[m.end():]
            first = right.split(None, 1)[0].lower() if right.strip() else ""
            if not _VERB_LIKE.match(first) or first in _DETERMINERS:
                continue
            a, b = _strip(text, cur, s + m.start())
            if len(text[a:b].split()) >= 3:
                out.append((text[a:b], a, b))
                cur = s + m.end()
    a, b = _strip(text, cur, e)
    if a < b:
        claim = text[a:b] if cur == s or not subject else f"{subject} {text[a:b]}"
        out.append((claim, a, b))
    return out


def split_claims(text: str, offset: int = 0) -> list[Claim]:
    """Atomic claims of ``text``; spans are shifted by ``offset`` (the section's place in the whole answer).

    >>> [c.text for c in split_claims("Marie Curie was born in Warsaw in 1867 and died in 1934. "
    ...                               "She won two Nobel Prizes; her daughter also won one.")]
    ['Marie Curie was born in Warsaw in 1867', 'Marie Curie died in 1934.', 'She won two Nobel Prizes', 'her daughter also won one.']
    >>> c = split_claims("Intro: Dr. Smith lives in Paris. He is 40.")[0]
    >>> (c.text, c.start, c.end)
    ('Intro: Dr. Smith lives in Paris.', 0, 32)
    """
    units: list[tuple[int, int]] = []
    items = list(_LIST_ITEM.finditer(text))
    if items:
        bounds = [m.end() for m in items]
        if items[0].start() > 0:
            units.append((0, items[0].start()))
        for i, b in enumerate(bounds):
            nxt = items[i + 1].start() if i + 1 < len(items) else len(text)
            units.append((b, nxt))
    else:
        units.append((0, len(text)))
    claims: list[Claim] = []
    for us, ue in units:
        for ss, se in _sentence_spans(text, us, ue):
            ss, se = _strip(text, ss, se)
            if ss >= se or text[ss:se].rstrip().endswith("?"):
                continue
            cur = ss
            pieces = []
            for m in _CLAUSE.finditer(text, ss, se):
                left, right = text[cur: m.start()], text[m.end(): se]
                if len(left.split()) >= 3 and len(right.split()) >= 3:
                    pieces.append((cur, m.start()))
                    cur = m.end()
            pieces.append((cur, se))
            for ps, pe in pieces:
                ps, pe = _strip(text, ps, pe)
                for claim, a, b in _split_predicates(text, ps, pe):
                    if re.search(r"[A-Za-z]", claim) and len(claim.split()) >= 3:
                        claims.append(Claim(claim, a + offset, b + offset))
    return claims
