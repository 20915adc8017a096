"""Training-data builders of the seed papers (``knowserve data <builder>`` and pipeline ``build`` stages). Each reads
a QA set (a :mod:`training.data` name or JSONL) or a knowledge source, calls the services it needs, and writes a
dataset file (JSONL, TRL's formats) plus ``<out>.summary.json``.

* ``rtuning`` (R-Tuning, Zhang et al. 2024): asks the **served** model each training question (``samples`` times),
  grades every answer against the gold aliases with the platform's grader, and splits the questions into certain
  (a share of correct answers at or above ``certain_threshold``) and uncertain. ``method: unsure`` writes R-Tuning's
  own data — the question, the gold answer and "Are you sure you accurately answered the question based on your
  internal knowledge? I am sure." / "I am unsure."; ``method: refusal`` (R-Tuning-R) writes the gold answer for
  certain questions and "I don't know" for uncertain ones.
* ``coldstart`` (KnowRL's cold start): the same split, written in a training recipe's own format —
  ``<think>…</think><answer>…</answer>`` and refusals for questions the model gets wrong — so GRPO starts with the
  format and with reward variance. ``think: knowledge`` reasons from the question's knowledge passage (or the
  answered statement); ``think: own`` writes the model's own first attempt followed by R-Tuning's self-assessment
  ("I am sure." / "I am unsure."), so the decision to answer comes after the model has recalled what it can, not
  before. ``unsure_ratio`` caps the uncertain examples per certain one (a model fine-tuned on mostly refusals
  learns to refuse everything). ``search: true`` writes R1-Searcher transcripts instead, with real passages from
  the retrieval service inserted after the query (not trained on: ``untrained`` spans).
* ``knowtuning`` (KnowTuning, Lyu et al. 2024): long answers from the knowledge base ("Tell me about <title>" ->
  the lead paragraph), split into atomic facts by the verification service's claim splitter, and DPO pairs whose
  rejected answer has facts deleted (completeness), one fact revised — one name, number or date changed —
  (factuality) or the facts shuffled (logicality); every revision is judged by the verification service against
  the original passage, and the summary counts how many it confirmed REFUTED.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.common.addresses import GENERATION_APP, default_target
from services.common.clients import ClientOptions
from services.common.grading import CORRECT, GradeOptions, grade
from training.data import DatasetError, QaRow, load_dataset

BUILDERS = ("rtuning", "coldstart", "knowtuning")
UNSURE_QUESTION = "Are you sure you accurately answered the question based on your internal knowledge?"
REFUSAL = "I don't know"


@dataclass
class BuildConfig:
    """One build (YAML keys of a pipeline ``build`` stage are these field names)."""

    builder: str
    dataset: str = ""  # QA set (rtuning, coldstart); knowtuning: "demo_corpus" (Wikipedia leads) or a .jsonl corpus
    out: str = ""
    limit: int = 0
    seed: int = 0
    exclude: str = ""  # a QA JSONL whose questions must not appear (held-out evaluation questions)
    # rtuning / coldstart: ask the served model
    samples: int = 3
    temperature: float = 0.7
    certain_threshold: float = 0.5
    method: str = "refusal"  # rtuning: refusal | unsure
    max_tokens: int = 32
    match: str = "contains"
    ask_system_prompt: str = ""  # the prompt the model is asked with ("" = coldstart: the recipe's; rtuning: eval's)
    system_prompt: str = ""  # the prompt written into the training rows ("" = the recipe's, else none)
    recipe: str = "knowrl"  # coldstart: whose system prompt and format
    search: bool = False  # coldstart: R1-Searcher transcripts with retrieved passages
    think: str = "knowledge"  # coldstart: knowledge | own (the model's attempt + "I am sure/unsure.")
    unsure_ratio: float = 0.0  # uncertain examples kept per certain one (0: all)
    prompt_format: str = "auto"
    model_folder: str = ""  # for prompt_format auto: the model the rows will train
    # knowtuning
    max_sentences: int = 4
    kinds: tuple[str, ...] = ("completeness", "factuality", "logicality")
    judge: str = "lexical"
    # services
    generation_target: str = default_target("generation")
    generation_app_name: str = GENERATION_APP
    model: str = ""  # the served model asked
    retrieval_target: str = default_target("retrieval")
    verification_target: str = default_target("verification")
    batch: int = 32

    def check(self) -> "BuildConfig":
        if self.builder not in BUILDERS:
            raise DatasetError(f"builder {self.builder!r} is unknown; use one of {BUILDERS}")
        if not self.out:
            raise DatasetError("out: give the dataset file to write (a .jsonl)")
        if self.builder == "rtuning" and self.method not in ("refusal", "unsure"):
            raise DatasetError(f"method {self.method!r}: use refusal or unsure")
        if self.samples < 1 or not 0 < self.certain_threshold <= 1:
            raise DatasetError("samples must be >= 1 and certain_threshold in (0, 1]")
        if self.think not in ("knowledge", "own"):
            raise DatasetError(f"think {self.think!r}: use knowledge or own")
        return self


@dataclass
class BuildSummary:
    builder: str
    out: str
    rows: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)  # certain / uncertain; pairs per kind; refuted per kind
    grades: dict[str, list[str]] = field(default_factory=dict)  # question id -> the graded answers (rtuning)

    def write(self) -> Path:
        path = Path(self.out).with_suffix(".summary.json")
        path.write_text(json.dumps(asdict(self), indent=1))
        return path


def _write_rows(out: Path, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)


def _questions(cfg: BuildConfig) -> list[QaRow]:
    rows = load_dataset(cfg.dataset, limit=0, seed=cfg.seed)
    if cfg.exclude:
        held = {r.question.strip().lower() for r in load_dataset(cfg.exclude)}
        rows = [r for r in rows if r.question.strip().lower() not in held]
    if cfg.limit and cfg.limit < len(rows):
        rows = random.Random(cfg.seed).sample(rows, cfg.limit)
    return rows


def _system_prompt(cfg: BuildConfig) -> str:
    if cfg.system_prompt or cfg.builder == "rtuning":
        return cfg.system_prompt
    from training.config import recipes

    return recipes()[cfg.recipe].system_prompt if cfg.recipe in recipes() else ""


async def ask(cfg: BuildConfig, rows: list[QaRow]) -> tuple[list[list[str]], list[str], str]:
    """Every question's ``samples`` graded answers from the served model (CORRECT, INCORRECT, ...), its first
    answer's text, and the checkpoint it serves."""
    from services.generation.client import GenerationClient
    from training.eval import DEFAULT_SYSTEM_PROMPT
    from training.prompts import render_prompt, resolve_format

    options = GradeOptions("answer_tag_or_text", cfg.match)
    out: list[list[str]] = []
    texts: list[str] = []
    async with GenerationClient(cfg.generation_target, ClientOptions(timeout_seconds=900, retries=30),
                                cfg.generation_app_name, cfg.model, internal=True) as gen:
        info = await gen.model_info()
        fmt = resolve_format(cfg.prompt_format, cfg.model_folder or info.checkpoint_uri)
        system = cfg.ask_system_prompt or (_system_prompt(cfg) if cfg.builder == "coldstart" else DEFAULT_SYSTEM_PROMPT)
        from services.common.progress import progress

        bar = progress(total=len(rows), desc=f"{cfg.builder}: asking the served model", unit="q")
        for i in range(0, len(rows), cfg.batch):
            chunk = rows[i: i + cfg.batch]
            reply = await gen.generate([render_prompt(r.question, fmt, system) for r in chunk], n=cfg.samples,
                                       temperature=cfg.temperature if cfg.samples > 1 else 0.0,
                                       max_tokens=cfg.max_tokens)
            by_prompt: dict[int, list[str]] = {}
            for c in reply.completions:
                row = chunk[c.prompt_index]
                by_prompt.setdefault(c.prompt_index, []).append(
                    grade(c.text, row.gold_answers, row.false_answers, options))
                if c.sample_index == 0:
                    texts.append(c.text)
            out += [by_prompt[k] for k in range(len(chunk))]
            bar.update(len(chunk))
        bar.close()
    return out, texts, info.checkpoint_uri


def certain(grades: list[str], threshold: float) -> bool:
    """Whether the model knows the answer: the share of its sampled answers graded CORRECT reaches ``threshold``.

    >>> certain(["CORRECT", "INCORRECT", "CORRECT"], 0.5), certain(["INCORRECT", "CORRECT", "NOT_ATTEMPTED"], 0.5)
    (True, False)
    """
    return sum(g == CORRECT for g in grades) / max(1, len(grades)) >= threshold


def _statement(row: QaRow, answer: str) -> str:
    """A sentence stating the answer: a cloze question filled in, else the question with its answer."""
    q = row.question.removeprefix("Complete the sentence: ").strip()
    if q.endswith("..."):
        return f"{q[:-3].strip()} {answer}."
    return f"The answer to \"{q}\" is {answer}."


def _reasoning(row: QaRow, answer: str) -> str:
    """KnowRL's <think> text for a known question: the sentence of the knowledge passage that holds the answer,
    else the answered statement."""
    if row.knowledge:
        sentences = re.split(r"(?<=[.!?])\s+", row.knowledge)
        hit = next((s for s in sentences if answer.lower() in s.lower()), "")
        if hit:
            return hit.strip()
    return _statement(row, answer)


async def _search_transcripts(cfg: BuildConfig, rows: list[QaRow]) -> list[tuple[str, str]]:
    """R1-Searcher parts per question: (the query and documents block, the documents block alone)."""
    from services.common.tools import TOOL_PROTOCOLS
    from services.retrieval.client import RetrievalClient

    protocol = TOOL_PROTOCOLS["r1_searcher"]
    async with RetrievalClient(cfg.retrieval_target) as rc:
        hits = []
        for i in range(0, len(rows), 64):
            hits += await rc.search([r.question for r in rows[i: i + 64]], top_k=1)
    out = []
    for r, passages in zip(rows, hits):
        docs = protocol.format_documents(passages)
        out.append((f"{protocol.query_open}{r.question}{protocol.query_close}{docs}", docs))
    return out


def first_sentence(text: str, max_words: int = 30) -> str:
    """The first sentence of a model's answer (its first line, at most ``max_words`` words).

    >>> first_sentence("The capital of Cuba is Havana. It is on the north coast.\\nMore.")
    'The capital of Cuba is Havana.'
    """
    line = text.strip().split("\n")[0]
    m = re.match(r"(.+?[.!?])(\s|$)", line)
    return " ".join((m.group(1) if m else line).split()[:max_words])


def _row(prompt, completion: str, chat: bool, untrained: list[str] | None = None) -> dict:
    row = {"prompt": prompt,
           "completion": [{"role": "assistant", "content": completion}] if chat else completion}
    if untrained:
        row["untrained"] = untrained
    return row


async def build_answers(cfg: BuildConfig) -> BuildSummary:
    """``rtuning`` and ``coldstart`` (see the module docstring)."""
    from training.prompts import render_prompt, resolve_format

    start = time.monotonic()
    rows = _questions(cfg)
    graded, texts, served = await ask(cfg, rows)
    fmt = resolve_format(cfg.prompt_format, cfg.model_folder or served)  # the format of the model the rows train
    system = _system_prompt(cfg)
    searches = await _search_transcripts(cfg, rows) if cfg.builder == "coldstart" and cfg.search else None
    out, counts = [], Counter()
    summary = BuildSummary(cfg.builder, cfg.out)
    keep_unsure = len(rows)
    if cfg.unsure_ratio:
        keep_unsure = int(cfg.unsure_ratio * sum(certain(g, cfg.certain_threshold) for g in graded))
    for i, (row, grades) in enumerate(zip(rows, graded)):
        known = certain(grades, cfg.certain_threshold)
        counts["certain" if known else "uncertain"] += 1
        summary.grades[row.id] = grades
        if not known:
            if counts["uncertain"] > keep_unsure:
                counts["uncertain_dropped"] += 1
                continue
        gold = row.gold_answers[0]
        prompt = render_prompt(row.question, fmt, system)
        if cfg.builder == "rtuning":
            text = (f"{gold}\n{UNSURE_QUESTION} I am {'sure' if known else 'unsure'}." if cfg.method == "unsure"
                    else (gold if known else REFUSAL))
            out.append(_row(prompt, text, fmt == "chat"))
        elif searches is not None:
            transcript, docs = searches[i]
            answer = gold if known else REFUSAL
            text = f"<think>{transcript}</think><answer>{answer}</answer>"
            out.append(_row(prompt, text.removeprefix("<think>") if fmt == "demo" else text, fmt == "chat", [docs]))
        else:
            if cfg.think == "own":
                think = f"{first_sentence(texts[i])} I am {'sure' if known else 'unsure'}."
            else:
                think = _reasoning(row, gold) if known else "I do not know this reliably."
            text = f"<think>{think}</think><answer>{gold if known else REFUSAL}</answer>"
            # the demo model's prompt already opens <think>
            out.append(_row(prompt, text.removeprefix("<think>") if fmt == "demo" else text, fmt == "chat"))
    if not out:
        raise DatasetError(f"{cfg.builder} built no rows from {cfg.dataset}")
    _write_rows(Path(cfg.out), out)
    summary.rows, summary.counts, summary.seconds = len(out), dict(counts), time.monotonic() - start
    summary.write()
    return summary


# -- KnowTuning

_NUMBER = re.compile(r"\b\d[\d,]*(?:\.\d+)?\b")
_NAME = re.compile(r"\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)*\b")


def revise_fact(claim: str, pool: dict[str, list[str]], rng: random.Random) -> str | None:
    """``claim`` with one number (or date) or one name changed: a number is shifted, a name replaced by a name
    from ``pool["names"]``; None when the claim holds neither.

    >>> revise_fact("The river is 346 km long.", {"names": []}, random.Random(0))
    'The river is 450 km long.'
    >>> revise_fact("Paris is in France.", {"names": ["Spain"]}, random.Random(0))
    'Paris is in Spain.'
    """
    numbers = list(_NUMBER.finditer(claim))
    if numbers:
        m = rng.choice(numbers)
        raw = m.group(0).replace(",", "")
        value = float(raw)
        if 1000 <= value <= 2100 and raw.isdigit():  # a year
            new = str(int(value) + rng.choice([-1, 1]) * rng.randint(3, 40))
        else:
            new_value = value * rng.choice([0.5, 0.7, 1.1, 1.3, 2.0])
            new = str(int(round(new_value))) if raw.isdigit() else f"{new_value:.1f}"
            if new == raw:
                new = str(int(value) + 7)
        return claim[: m.start()] + new + claim[m.end():]
    names = [m for m in _NAME.finditer(claim) if m.start() > 0]  # not the sentence's first word
    candidates = [n for n in pool.get("names", [])]
    if names and candidates:
        m = rng.choice(names)
        choices = [c for c in candidates if c != m.group(0) and c not in claim]
        if choices:
            return claim[: m.start()] + rng.choice(choices) + claim[m.end():]
    return None


def _lead(text: str, max_sentences: int) -> str:
    sentences = re.split(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])", text.strip())
    return " ".join(sentences[:max_sentences]).strip()


async def build_knowtuning(cfg: BuildConfig) -> BuildSummary:
    """``knowtuning`` (see the module docstring)."""
    from services.retrieval.core import Passage
    from services.verification.client import VerificationClient
    from services.verification.core import VerifyItem
    from training.prompts import render_prompt

    start = time.monotonic()
    rng = random.Random(cfg.seed)
    docs = _knowledge(cfg)
    names = sorted({m.group(0) for d in docs for m in _NAME.finditer(d["text"]) if len(m.group(0)) > 3})
    pool = {"names": names}
    summary = BuildSummary("knowtuning", cfg.out)
    counts: Counter = Counter()
    rows: list[dict] = []
    revisions: list[tuple[dict, str, Passage, str]] = []  # (row, revised claim, evidence, kind)
    async with VerificationClient(cfg.verification_target, ClientOptions(timeout_seconds=600, retries=30)) as v:
        answers = [_lead(d["text"], cfg.max_sentences) for d in docs]
        split = []
        for i in range(0, len(answers), cfg.batch):  # the service's claim splitter: atomic facts with their spans
            evidence = [[Passage(id=d["id"], document_id=d["id"], title=d["title"], text=d["text"], source="kb")]
                        for d in docs[i: i + cfg.batch]]
            reply = await v.verify([VerifyItem(answer=a, topic=d["title"], evidence=e)
                                    for a, d, e in zip(answers[i: i + cfg.batch], docs[i: i + cfg.batch], evidence)],
                                   judge=cfg.judge)
            split += [[c.text for c in r.claims] for r in reply.results]
        for d, answer, claims in zip(docs, answers, split):
            if len(claims) < 2:
                continue
            prompt = render_prompt(f"Tell me about {d['title']}.", "chat", cfg.system_prompt)
            chosen = " ".join(claims)
            evidence = Passage(id=d["id"], document_id=d["id"], title=d["title"], text=d["text"], source="kb")
            if "completeness" in cfg.kinds:
                keep = sorted(rng.sample(range(len(claims)), max(1, len(claims) // 2)))
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": " ".join(claims[k] for k in keep),
                             "kind": "completeness"})
                counts["completeness"] += 1
            if "factuality" in cfg.kinds:
                order = list(range(len(claims)))
                rng.shuffle(order)
                for k in order:
                    revised = revise_fact(claims[k], pool, rng)
                    if revised:
                        rejected = claims[:k] + [revised] + claims[k + 1:]
                        row = {"prompt": prompt, "chosen": chosen, "rejected": " ".join(rejected),
                               "kind": "factuality", "revised_claim": revised, "original_claim": claims[k]}
                        rows.append(row)
                        revisions.append((row, revised, evidence, "factuality"))
                        counts["factuality"] += 1
                        break
            if "logicality" in cfg.kinds:
                shuffled = claims[:]
                for _ in range(5):
                    rng.shuffle(shuffled)
                    if shuffled != claims:
                        break
                if shuffled != claims:
                    rows.append({"prompt": prompt, "chosen": chosen, "rejected": " ".join(shuffled),
                                 "kind": "logicality"})
                    counts["logicality"] += 1
        for i in range(0, len(revisions), cfg.batch):  # did the revision really make the fact false?
            chunk = revisions[i: i + cfg.batch]
            reply = await v.verify([VerifyItem(claims=[claim], evidence=[ev]) for _, claim, ev, _ in chunk],
                                   judge=cfg.judge)
            for (row, _, _, kind), r in zip(chunk, reply.results):
                label = r.claims[0].label if r.claims else 0
                from knowserve.verification.v1 import verification_service_pb2 as vpb

                row["verdict"] = vpb.Label.Name(label).removeprefix("LABEL_")
                counts[f"{kind}_refuted"] += row["verdict"] == "REFUTED"
    if not rows:
        raise DatasetError(f"knowtuning built no pairs from {cfg.dataset}: no answer had two or more facts")
    _write_rows(Path(cfg.out), rows)
    summary.rows, summary.counts, summary.seconds = len(rows), dict(counts), time.monotonic() - start
    summary.write()
    return summary


def _knowledge(cfg: BuildConfig) -> list[dict]:
    """Documents with a title and text: the demo corpus's Wikipedia leads, or a corpus JSONL."""
    if cfg.dataset in ("", "demo_corpus"):
        from services.retrieval.demo_corpus import build_wiki_corpus

        path = Path(".knowserve/data/wiki.jsonl")
        if not path.exists():
            build_wiki_corpus(path)
    else:
        path = Path(cfg.dataset)
        if not path.is_file():
            raise DatasetError(f"knowledge corpus {path} does not exist (use demo_corpus or a .jsonl with title, text)")
    docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    docs = [d for d in docs if d.get("title") and d.get("text")]
    rng = random.Random(cfg.seed)
    if cfg.limit and cfg.limit < len(docs):
        docs = rng.sample(docs, cfg.limit)
    return docs


async def build(cfg: BuildConfig) -> BuildSummary:
    """Run the builder ``cfg`` names; returns its summary (also written beside the dataset)."""
    cfg.check()
    if cfg.builder == "knowtuning":
        return await build_knowtuning(cfg)
    return await build_answers(cfg)
