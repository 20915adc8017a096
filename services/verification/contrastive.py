"""A contrastive claim set over quantities, dates and places, made from real encyclopedia leads.

Each item is (claim, evidence passage, gold label). From a lead sentence that states a fact:

- **SUPPORTED**: the sentence with the quantity in another unit ("346 km" -> "about 215 miles"), bounded ("more
  than 311 km"), or the date in another written form ("7 November 1867" -> "November 7, 1867", "1867-11-07");
- **REFUTED**: the same sentence with the value changed by 30-100% (or bounded on the wrong side), the date moved by
  days or years, or the place after "born in" / "died in" / "capital of" swapped for a place from another lead;
- **NOT_ENOUGH_INFO**: a sentence of another lead, its subject replaced by this lead's title.

The untouched sentence is never a claim (that would only test string matching). Items carry their article, and
:func:`split_by_article` holds articles out whole, so a judge trained on one part never saw the other's passages.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from services.verification.judges import NOT_ENOUGH_INFO, REFUTED, SUPPORTED
from services.verification.normalise import NUMBER, quantities, to_base

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_FULL_DATE = re.compile(r"\b(?P<d>[12]\d|3[01]|0?[1-9]) (?P<m>January|February|March|April|May|June|July|August|"
                        r"September|October|November|December) (?P<y>1[0-9]{3}|20[0-2][0-9])\b")
_PLACE = re.compile(r"\b(?P<rel>born in|died in|capital of|located in|headquartered in) (?P<place>[A-Z][a-z]+"
                    r"(?: [A-Z][a-z]+)?)")
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
# a unit as written -> (another unit to say it in, its pint name); only lengths, masses, areas and volumes
_OTHER_UNIT = {"meter": ("feet", "foot"), "kilogram": ("pounds", "pound"), "meter ** 2": ("square miles", "mile**2"),
               "meter ** 3": ("cubic feet", "foot**3")}


@dataclass(frozen=True)
class ClaimItem:
    claim: str
    title: str
    evidence: str
    label: str
    kind: str  # "quantity", "date", "place" or "unrelated"
    article: str


def _fmt(x: float) -> str:
    """A number as an encyclopedia writes it: thousands separators, at most 3 significant decimals.

    >>> _fmt(214.99), _fmt(1234567.0), _fmt(0.01234)
    ('215', '1,234,567', '0.0123')
    """
    if abs(x) >= 100:
        return f"{round(x):,}"
    return f"{float(f'{x:.3g}'):,}".rstrip("0").rstrip(".") if x != int(x) else f"{int(x):,}"


def _quantity_items(sentence: str, rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for q in quantities(sentence):
        if q.relation != "=" or q.dimension in ("dimensionless", "currency"):
            continue
        surface = sentence[q.start: q.end]
        num = NUMBER.match(surface)  # the number first: not "US$48", not "five km"
        if not num or re.match(r"\s*\(\s*\d", sentence[q.end:]):
            continue  # a conversion in brackets after it ("800 km (500 mi)") would state the value twice
        written = float(num.group().replace(",", ""))
        if written <= 0:
            continue
        unit_text = surface[num.end():]
        unit_text = unit_text if unit_text.startswith("-") else " " + unit_text.strip()
        if q.unit in _OTHER_UNIT:
            words, pint_name = _OTHER_UNIT[q.unit]
            per_unit, _ = to_base(1.0, pint_name)
            other = q.value / per_unit
            out.append((sentence[: q.start] + f"about {_fmt(other)} {words}" + sentence[q.end:], SUPPORTED))
        out.append((sentence[: q.start] + f"more than {_fmt(written * 0.9)}{unit_text}" + sentence[q.end:],
                    SUPPORTED))
        wrong = written * rng.choice([rng.uniform(1.3, 2.0), rng.uniform(0.4, 0.7)])
        out.append((sentence[: q.start] + f"{_fmt(wrong)}{unit_text}" + sentence[q.end:], REFUTED))
        out.append((sentence[: q.start] + f"more than {_fmt(written * 1.3)}{unit_text}" + sentence[q.end:],
                    REFUTED))
        break  # one quantity per sentence
    return out


def _date_items(sentence: str, rng: random.Random) -> list[tuple[str, str]]:
    m = _FULL_DATE.search(sentence)
    if not m:
        return []
    d, month, y = int(m.group("d")), m.group("m"), int(m.group("y"))
    mi = _MONTHS.index(month) + 1
    head, tail = sentence[: m.start()], sentence[m.end():]
    out = [(head + f"{month} {d}, {y}" + tail, SUPPORTED), (head + f"{y}-{mi:02d}-{d:02d}" + tail, SUPPORTED)]
    shifted = d + rng.choice([-1, 1]) * rng.randint(1, 9)
    if 1 <= shifted <= 28:
        out.append((head + f"{shifted} {month} {y}" + tail, REFUTED))
    out.append((head + f"{d} {month} {y + rng.choice([-1, 1]) * rng.randint(2, 30)}" + tail, REFUTED))
    return out


def build(leads: list[dict], seed: int = 0) -> list[ClaimItem]:
    """Claim items from leads (``{"id", "title", "text"}``), shuffled."""
    rng = random.Random(seed)
    places = [m.group("place") for lead in leads for m in _PLACE.finditer(lead["text"])]
    items: list[ClaimItem] = []
    for lead in leads:
        title, text = lead["title"], lead["text"]
        for sentence in _SENTENCE.split(text):
            if title.split(" (")[0] not in sentence or len(sentence.split()) > 60:
                continue  # a claim names its subject, like the claims an answer is split into
            made = [(c, lab, "quantity") for c, lab in _quantity_items(sentence, rng)]
            made += [(c, lab, "date") for c, lab in _date_items(sentence, rng)]
            p = _PLACE.search(sentence)
            if p and places:
                other = rng.choice(places)
                if other != p.group("place") and other not in text:
                    made.append((sentence[: p.start("place")] + other + sentence[p.end("place"):], REFUTED, "place"))
            for claim, label, kind in made:
                items.append(ClaimItem(claim, title, text, label, kind, lead["id"]))
    # unrelated facts: another lead's first sentence with this lead's subject put in
    for lead in rng.sample(leads, min(len(leads), max(1, len(items) // 4))):
        other = rng.choice(leads)
        first = _SENTENCE.split(other["text"])[0]
        if other["id"] == lead["id"] or other["title"] not in first:
            continue
        claim = first.replace(other["title"], lead["title"], 1)
        items.append(ClaimItem(claim, lead["title"], lead["text"], NOT_ENOUGH_INFO, "unrelated", lead["id"]))
    rng.shuffle(items)
    return items


def cap_per_kind(items: list[ClaimItem], n: int) -> list[ClaimItem]:
    """The first ``n`` items of each (kind, label), in order.

    >>> its = [ClaimItem("c", "T", "e", lab, "date", "a") for lab in (SUPPORTED, SUPPORTED, REFUTED)]
    >>> [i.label for i in cap_per_kind(its, 1)]
    ['SUPPORTED', 'REFUTED']
    """
    counts: dict[tuple[str, str], int] = {}
    kept = []
    for it in items:
        key = (it.kind, it.label)
        if counts.get(key, 0) < n:
            counts[key] = counts.get(key, 0) + 1
            kept.append(it)
    return kept


def split_by_article(items: list[ClaimItem], heldout_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, held out): whole articles go to one side.

    >>> its = [ClaimItem("c", "T", "e", SUPPORTED, "date", str(i % 10)) for i in range(100)]
    >>> train, held = split_by_article(its, 0.3)
    >>> len(held), not {i.article for i in train} & {i.article for i in held}
    (30, True)
    """
    articles = sorted({i.article for i in items})
    random.Random(seed).shuffle(articles)
    held = set(articles[: round(len(articles) * heldout_fraction)])
    return [i for i in items if i.article not in held], [i for i in items if i.article in held]
