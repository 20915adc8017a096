"""Quantities, units, comparators and dates in the lexical judge: worked examples, supported and refuted forms."""

from __future__ import annotations

import pytest

from services.retrieval.core import Passage
from services.verification.judges import NOT_ENOUGH_INFO, REFUTED, SUPPORTED, LexicalJudge
from services.verification.normalise import mark_dates, quantities


def passage(title: str, text: str) -> Passage:
    return Passage(id=f"{title}#0", document_id=title, title=title, text=text, source="wiki", score=1.0)


THAMES = passage("River Thames", "River Thames: length 346 km; it flows through Oxford, Reading and London.")
BAIKAL = passage("Lake Baikal", "Lake Baikal: maximum depth 1,642 m; it holds 23,615 cubic kilometres of water, "
                                "about 20% of the world's fresh surface water.")
EVEREST = passage("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, 8,849 metres.")
CURIE = passage("Marie Curie", "Marie Curie (born 7 November 1867 in Warsaw; died 4 July 1934) was a physicist "
                               "and chemist.")
TOKYO = passage("Tokyo", "Tokyo is the capital of Japan. The Greater Tokyo Area has a population of 41 million.")

CASES = [
    # the issue's own examples
    (THAMES, "The River Thames is 346 kilometres long.", SUPPORTED),
    (THAMES, "The River Thames is 410 kilometres long.", REFUTED),
    (THAMES, "The River Thames is more than 300 km long.", SUPPORTED),
    (THAMES, "The River Thames is less than 300 km long.", REFUTED),
    (THAMES, "The River Thames is about 215 miles long.", SUPPORTED),  # 346 km = 215 mi
    (BAIKAL, "Lake Baikal is 1,642 metres deep.", SUPPORTED),
    (BAIKAL, "Lake Baikal holds 23,615 km3 of water.", SUPPORTED),
    (BAIKAL, "Lake Baikal holds 30,000 km3 of water.", REFUTED),
    (BAIKAL, "Lake Baikal is about 1,600 m deep.", SUPPORTED),
    (BAIKAL, "Lake Baikal is about 1,000 m deep.", REFUTED),
    (EVEREST, "Mount Everest is 29,032 feet high.", SUPPORTED),
    (EVEREST, "Mount Everest is over 9,000 metres high.", REFUTED),
    (TOKYO, "The Greater Tokyo Area has a population of more than 40 million.", SUPPORTED),
    (TOKYO, "The Greater Tokyo Area has a population of more than 50 million.", REFUTED),
    # dates in any common form; a bare year still works
    (CURIE, "Marie Curie was born in 1867.", SUPPORTED),
    (CURIE, "Marie Curie was born in 1871.", REFUTED),
    (CURIE, "Marie Curie was born on November 7, 1867.", SUPPORTED),
    (CURIE, "Marie Curie was born on 1867-11-07.", SUPPORTED),
    (CURIE, "Marie Curie was born on 8 November 1867.", REFUTED),
    (CURIE, "Marie Curie died on 4th July 1934.", SUPPORTED),
    (CURIE, "Marie Curie died in July 1934.", SUPPORTED),
    (CURIE, "Marie Curie played the violin.", NOT_ENOUGH_INFO),
]


@pytest.mark.parametrize("evidence,claim,label", CASES, ids=[c[1] for c in CASES])
def test_worked_examples(evidence, claim, label):
    assert LexicalJudge().judge([claim], [[evidence]])[0].label == label


def test_unparseable_text_falls_back_to_the_plain_judge():
    odd = ["Москва — столица России, 2 561,5 км².", "東京は日本の首都です。人口は約1400万人。", "\x00\ufffd 12 ###", ""]
    for text in odd:
        quantities(text)
        mark_dates(text)
    verdicts = LexicalJudge().judge(odd, [[passage("Moscow", odd[0])]] * len(odd))
    assert [v.label in (SUPPORTED, REFUTED, NOT_ENOUGH_INFO) for v in verdicts] == [True] * len(odd)
