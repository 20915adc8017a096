"""Quantities and dates, normalised before a claim is judged against a passage.

- **Quantities** are found by `quantulum3` (numbers with units, number words, "5 million") and converted to base
  SI units by `pint`, so "346 kilometres", "346 km" and "215 mi" compare as lengths, "23,615 km3" and "23,615 cubic
  kilometres" as volumes. A comparator or approximation written before the number ("more than", "over", "at least",
  "under", "about", "nearly", ...) is kept and the claim is judged against the value: "more than 300 km" agrees
  with 346 km, "about 1,600 m" with 1,642 m (within :data:`APPROX`).
- **Dates** in the common written forms ("7 November 1867", "November 7, 1867", "7th Nov. 1867", "1867-11-07",
  "November 1867") are found by pattern and parsed by `python-dateutil`; :func:`mark_dates` rewrites each as a
  date token plus its year, so a full date compares with a full date and a bare year still matches the year.

Anything the normaliser cannot read (another script, a unit pint does not know) is left to the plain judge:
these functions never raise on text.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import math
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

EXACT = 1e-6  # relative slack of two exact values beyond their written precision (float unit conversion)
APPROX = 0.05  # relative tolerance when either side says "about"

# comparator words written just before a number -> the relation the true value has to the written one
_COMPARATORS = [
    (r"more than|over|above|greater than|in excess of|exceeding|upwards of", ">"),
    (r"at least|no less than|a minimum of", ">="),
    (r"less than|under|below|fewer than", "<"),
    (r"at most|no more than|up to|a maximum of", "<="),
    (r"about|around|approximately|roughly|nearly|almost|some|circa|c\.|an estimated|~", "~"),
]
_COMPARATOR_BEFORE = re.compile(r"(?:^|\W)(" + "|".join(p for p, _ in _COMPARATORS) + r")\s*$", re.IGNORECASE)
_RELATION = [(re.compile(rf"^(?:{p})$", re.IGNORECASE), rel) for p, rel in _COMPARATORS]

# words that say which dimension a quantity measures; a claim's such word is carried by a matching quantity
DIMENSION_WORDS = {
    "length": {"long", "length", "tall", "height", "high", "wide", "width", "deep", "depth", "distance", "far",
               "elevation", "altitude", "diameter", "radius", "span", "measure", "stretch", "run", "flow"},
    "area": {"area", "cover", "size", "large", "span", "measure"},
    "volume": {"volume", "hold", "contain", "capacity", "store"},
    "mass": {"heavy", "weigh", "weight", "mass"},
    "time": {"last", "long", "duration", "take"},
    "speed": {"fast", "speed", "travel", "reach"},
    "temperature": {"temperature", "hot", "cold", "warm", "reach"},
}

NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")  # a written number: "23,615", "3.5"
_SCALE_WORDS = re.compile(r"\b(thousand|million|billion|trillion)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Quantity:
    """A number in a text: its value in base units, what it measures and how the text bounds it."""

    value: float
    unit: str  # base unit ("meter ** 3"), or the written unit when pint does not know it, "" for a count
    dimension: str  # quantulum's entity: "length", "volume", ..., "dimensionless"
    relation: str  # "=", ">", ">=", "<", "<=" or "~" (approximate)
    start: int
    end: int  # character span of the number, its unit and its comparator words
    context: frozenset[str] = frozenset()  # words around it ("lasted", "population"): which quantity it is
    resolution: float = 0.0  # half the step of its last written digit, in base units: 8,849 m -> 0.5 m


def resolution(written: str, value: float) -> float:
    """Half the step of the last significant written digit, scaled like ``value`` (unit, "million").

    >>> resolution("8,849", 8849.0), resolution("29,000", 8839.2), resolution("2.5", 2.5e6)
    (0.5, 152.4, 50000.0)
    """
    number = written.replace(",", "")
    try:
        shown = float(number)
    except ValueError:
        return 0.0
    if "." in number:
        step = 10.0 ** -len(number.split(".")[1])
    else:
        digits = number.lstrip("-")
        step = 10.0 ** (len(digits) - len(digits.rstrip("0"))) if digits.strip("0") else 1.0
    scale = abs(value / shown) if shown else 1.0
    return round(step * scale / 2, 9)


@functools.lru_cache(maxsize=1)
def _units():
    import pint

    return pint.UnitRegistry()


@functools.lru_cache(maxsize=1)
def _parser():
    from quantulum3 import classifier, parser

    # quantulum3 disambiguates units with a scikit-learn model pickled by an older scikit-learn, which the installed
    # one cannot unpickle (every ambiguous unit then failed the whole parse); its no-classifier path (unit
    # frequencies and context words) is used instead
    classifier.USE_CLF = False
    return parser


def to_base(value: float, unit_name: str) -> tuple[float, str]:
    """(value, unit) in base SI units via pint; the written unit when pint does not know it.

    >>> to_base(346, "kilometre")
    (346000.0, 'meter')
    >>> to_base(2, "cubic kilometre")
    (2000000000.0, 'meter ** 3')
    """
    name = unit_name.replace(" per ", "/")
    power = 3 if name.startswith("cubic ") else 2 if name.startswith("square ") else 1
    name = name.removeprefix("cubic ").removeprefix("square ")
    try:
        q = _units().Quantity(value, f"({name})**{power}" if power > 1 else name).to_base_units()
        return float(q.magnitude), str(q.units)
    except Exception:  # pint raises several error types for units it does not know
        return float(value), unit_name


def _relation(prefix: str) -> tuple[str, int]:
    """The comparator at the end of ``prefix`` and its length in characters (``"="``, 0 when none)."""
    m = _COMPARATOR_BEFORE.search(prefix)
    if not m:
        return "=", 0
    word = m.group(1)
    for pattern, rel in _RELATION:
        if pattern.match(word):
            return rel, len(prefix) - m.start(1)
    return "=", 0


def _is_year(value: float, surface: str) -> bool:
    return value.is_integer() and 1000 <= value <= 2100 and re.fullmatch(r"\d{4}", surface.strip()) is not None


_CONTEXT_STOP = {"the", "and", "with", "from", "that", "this", "was", "were", "has", "had", "have", "its", "for",
                 "which", "about", "more", "than", "over", "under", "less", "around", "nearly", "some", "least"}
_WORD = re.compile(r"[^\W\d_]{3,}", re.UNICODE)
_NUMBER_THEN = re.compile(r"\d[\d,.]*\s*-?\s*([^\W\d_]+|[%$€£¥°‰]|\S)?", re.UNICODE)
_NUMBER_WORD = re.compile(r"\b(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|"
                          r"forty|fifty|hundred|dozen)\b", re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def _unit_words() -> frozenset[str]:
    """Lower-case surfaces and symbols of every unit quantulum knows, plus scale words: the words after a number
    that make it worth a full parse."""
    from quantulum3 import load

    _parser()
    units = load.units("en_US")
    words = {w.lower() for w in list(units.surfaces) + list(units.symbols)}
    words |= {w.split()[0].lower() for w in words if " " in w}
    return frozenset(words | {"thousand", "million", "billion", "trillion"})


# words after a number that quantulum lists as some unit's symbol but that are nearly always plain English
_NOT_UNITS = frozenset({"in", "and", "to", "th", "st", "nd", "rd", "a", "at", "by", "of", "on", "or", "as", "is",
                        "it", "he", "she", "the", "for", "from", "with", "was", "s", "b", "c", "d", "t", "bc", "ad",
                        "bce", "ce", "am", "pm", "no", "per"})


def _candidates(text: str) -> list[tuple[int, int]]:
    """Character windows worth giving to quantulum (a few ms a call, growing with length): around each number
    followed by a unit or scale word, each number with a comparator before it, and each number word followed by a
    unit or scale word ("three kilometres"). Years and bare counts ("born in 1867", "12 rooms") are skipped.
    Overlapping windows are merged."""
    spots = []
    for m in _NUMBER_WORD.finditer(text):
        after = _WORD.match(text[m.end():].lstrip(" -"))
        if after and after.group().lower() in _unit_words() and after.group().lower() not in _NOT_UNITS:
            spots.append((m.start(), m.end()))
    for m in _NUMBER_THEN.finditer(text):
        word = (m.group(1) or "").lower()
        if (word and word in _unit_words() and word not in _NOT_UNITS) or _relation(text[: m.start()])[0] != "=":
            spots.append((m.start(), m.end()))
    windows: list[list[int]] = []
    for a, b in sorted(spots):
        lo, hi = max(0, a - 60), min(len(text), b + 40)
        while lo > 0 and not text[lo - 1].isspace():  # whole words only
            lo -= 1
        while hi < len(text) and not text[hi].isspace():
            hi += 1
        if windows and lo <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], hi)
        else:
            windows.append([lo, hi])
    return [(a, b) for a, b in windows]


def _context(text: str, start: int, end: int, width: int = 40) -> frozenset[str]:
    words = _WORD.findall(text[max(0, start - width): start]) + _WORD.findall(text[end: end + width])
    return frozenset(w.lower().rstrip("s") for w in words if w.lower() not in _CONTEXT_STOP)


def quantities(text: str) -> tuple[Quantity, ...]:
    """Quantities of ``text`` worth comparing: any number with a unit, and counts written with a scale word
    ("5 million") or a comparator ("more than 200"); bare numbers, years and ordinals are left to the token judge.
    Only windows around likely quantities are given to quantulum (:func:`_candidates`).

    >>> [(q.value, q.unit, q.relation) for q in quantities("The Thames is more than 300 km long.")]
    [(300000.0, 'meter', '>')]
    >>> quantities("It opened in 1867 with 12 rooms as the 3rd hall.")
    ()
    """
    if not re.search(r"\d|\b(?:one|two|three|four|five|six|seven|eight|nine|ten|hundred|thousand|million|"
                     r"billion)\b", text, re.IGNORECASE):
        return ()
    out: list[Quantity] = []
    try:
        for lo, hi in _candidates(text):
            for q in _window_quantities(text[lo:hi]):
                out.append(dataclasses.replace(q, start=q.start + lo, end=q.end + lo,
                                               context=_context(text, q.start + lo, q.end + lo)))
    except Exception as exc:  # the normaliser must never fail a verification
        log.debug("quantity parser failed; plain judge", extra={"error": str(exc)[:200]})
    return tuple(out)


@functools.lru_cache(maxsize=65536)
def _window_quantities(text: str) -> tuple[Quantity, ...]:
    """Quantities of ``text`` worth comparing: any number with a unit, and counts written with a scale word
    ("5 million") or a comparator ("more than 200"); bare numbers and years are left to the token judge.

    >>> [(q.value, q.unit, q.relation) for q in quantities("The Thames is more than 300 km long.")]
    [(300000.0, 'meter', '>')]
    >>> quantities("It opened in 1867 with 12 rooms.")
    ()
    """
    parsed = _parser().parse(text)
    out = []
    for q in parsed:
        try:
            start, end = q.span
            dimension = q.unit.entity.name
            value = float(q.value)
            if not math.isfinite(value) or dimension == "unknown" or re.search(r"\d(?:st|nd|rd|th)\b", q.surface):
                continue  # ordinals ("12th" parses as tonne-hours) and units quantulum cannot place
            relation, back = _relation(text[:start])
            if dimension == "dimensionless":
                if q.unit.name not in ("dimensionless", "") or _is_year(value, q.surface):
                    continue  # percentages and other unitless units: compared as written
                if relation == "=" and not _SCALE_WORDS.search(q.surface):
                    continue  # a bare count: the token judge compares it exactly
                base, unit = value, ""
            else:
                base, unit = to_base(value, q.unit.name)
            written = NUMBER.search(q.surface)
            res = resolution(written.group(), base) if written else 0.0
            out.append(Quantity(base, unit, dimension, relation, start - back, end, _context(text, start - back, end),
                                res))
        except Exception:  # an odd parse result: skip that quantity only
            continue
    return tuple(out)


def agrees(claim: Quantity, passage: Quantity) -> bool | None:
    """Does the passage's quantity bear out the claim's? None when they do not measure the same thing.

    >>> km = lambda v, rel="=": Quantity(v * 1000.0, "meter", "length", rel, 0, 0, resolution=500.0)
    >>> agrees(km(346), km(346)), agrees(km(410), km(346)), agrees(km(300, ">"), km(346)), agrees(km(400, ">"), km(346))
    (True, False, True, False)
    >>> agrees(km(1.6, "~"), km(1.642)), agrees(Quantity(1.0, "second", "time", "=", 0, 0), km(1))
    (True, None)
    >>> m = lambda v: Quantity(v, "meter", "length", "=", 0, 0, resolution=0.5)
    >>> agrees(m(8849), m(8849)), agrees(m(8850), m(8849))
    (True, False)
    """
    if claim.unit != passage.unit or claim.dimension != passage.dimension:
        return None
    c, p = claim.value, passage.value
    # two values agree to the finer of the precisions they are written with ("29,032 ft" = "8,849 m" within half a
    # foot; "8,849 m" != "8,850 m": trailing zeros do not make the other side's exact digits coarse)
    written = [r for r in (claim.resolution, passage.resolution) if r > 0]
    slack = (min(written) if written else 0.0) + EXACT * max(abs(p), abs(c), 1e-12)
    if passage.relation not in ("=", "~"):  # the passage only bounds the value: a restated bound agrees
        return True if claim.relation == passage.relation and abs(c - p) <= slack else None
    if claim.dimension == "dimensionless" and not (0.1 <= abs(c) / max(abs(p), 1e-12) <= 10):
        return None  # counts of different orders of magnitude are different things
    if "~" in (claim.relation, passage.relation):
        slack = max(slack, APPROX * max(abs(p), abs(c)))
    close = abs(c - p) <= slack
    if claim.relation in ("=", "~"):
        return close
    return {">": p > c, ">=": p >= c or close, "<": p < c, "<=": p <= c or close}[claim.relation]


_MONTHS = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
           r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_DAY = r"(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_YEAR = r"\d{3,4}"
_DATE = re.compile(
    rf"\b(?:(?P<dmy>{_DAY}\s+(?:of\s+)?{_MONTHS},?\s+{_YEAR})|(?P<mdy>{_MONTHS}\s+{_DAY},?\s+{_YEAR})"
    rf"|(?P<iso>\d{{4}}-\d{{2}}-\d{{2}})|(?P<my>{_MONTHS}\s+{_YEAR}))\b"
)
_DEFAULT_DAY = datetime.datetime(2000, 1, 1)  # a month-only date parses to its 1st; the day is not used then
DATE_TOKEN = "ksdate"  # prefix of the date tokens mark_dates writes; the token judge treats them as dates


@functools.lru_cache(maxsize=65536)
def mark_dates(text: str) -> str:
    """Rewrite each written date as ``ksdateYYYYMMDD YYYY`` (``ksdateYYYYMM YYYY`` for a month): one token a full
    date compares on, and the year the bare-year claims match.

    >>> mark_dates("She was born on 7 November 1867 in Warsaw.")
    'She was born on ksdate18671107 1867 in Warsaw.'
    >>> mark_dates("born November 7th, 1867; married in July 1895"), mark_dates("1867-11-07")
    ('born ksdate18671107 1867; married in ksdate189507 1895', 'ksdate18671107 1867')
    """
    if not re.search(r"\d", text):
        return text

    def repl(m: re.Match) -> str:
        from dateutil import parser as dateparser

        surface = m.group(0)
        try:
            when = dateparser.parse(surface.replace(" of ", " "), default=_DEFAULT_DAY)
        except (ValueError, OverflowError):
            return surface
        if m.group("my"):
            return f"{DATE_TOKEN}{when.year:04d}{when.month:02d} {when.year}"
        return f"{DATE_TOKEN}{when.year:04d}{when.month:02d}{when.day:02d} {when.year}"

    try:
        return _DATE.sub(repl, text)
    except Exception:  # never fail a verification on a date
        return text




def clear_caches() -> None:
    """Forget the memoised quantity windows, dates and stems, so a timed pass measures cold parsing (benchmarks) —
    the caches are bounded (65,536 texts each) and otherwise live as long as the process."""
    from services.verification import judges

    _window_quantities.cache_clear()
    mark_dates.cache_clear()
    judges._stem.cache_clear()
