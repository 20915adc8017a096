"""``knowserve eval``: how much a served model hallucinates, per weight version.

A QA set runs through the generation service (closed-book, or with retrieval inside generation), each answer is
graded against the gold answers by the platform's one grader (:mod:`services.common.grading`, the rule the reward
service uses; SimpleQA's correct / incorrect = hallucinated / not attempted), its claims are
checked by the verification service against the knowledge base (claim support rate), and R-Tuning's AP score
ranks answers by the model's own confidence (the geometric-mean probability of the tokens it wrote).

Each result is written as JSON to ``<out_dir>/<model>__<benchmark>__<mode>__v<version>.json`` and a PNG chart of every
result in ``out_dir`` is redrawn; the training service exports the latest figures to Prometheus as gauges
labelled by benchmark, mode and weight version (``knowserve_eval_*``).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from services.common.addresses import GENERATION_APP, default_target
from services.common.clients import ClientOptions
from services.common.grading import (ANSWER_FROM, MATCHES, MISSING, NOT_ATTEMPTED, GradeOptions, checkable_text, grade,
                                     take_answer)
from services.common.text import END_MARKERS, strip_end_markers
from services.common.tools import DEFAULT as DEFAULT_TOOL_PROTOCOL
from services.common.tools import check as check_tool_protocol
from training.data import QaRow, load_dataset
from training.metrics import average_precision, incorrect_cut_off, rates, sequence_confidence
from training.prompts import FORMATS, render_prompt, resolve_format

DEFAULT_SYSTEM_PROMPT = ("Answer the question with a short phrase, without explanation. If you do not know the "
                         "answer, say \"I don't know\".")


@dataclass
class EvalConfig:
    dataset: str
    limit: int = 0
    seed: int = 0
    mode: str = "closed_book"  # closed_book | retrieval
    tool_protocol: str = DEFAULT_TOOL_PROTOCOL  # the protocol of retrieval mode
    prompt_format: str = "auto"  # auto | chat | demo
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    match: str = "contains"  # exact | cover | contains (services.common.grading)
    answer_from: str = "answer_tag_or_text"  # answer_tag | answer_tag_or_text
    max_tokens: int = 64
    max_tool_turns: int = 1
    retrieval_top_k: int = 1
    generation_target: str = default_target("generation")
    generation_app_name: str = GENERATION_APP
    model: str = ""  # served model to evaluate; "" = the generation service's default
    verification_target: str = default_target("verification")  # "" skips claim support
    judge: str = ""
    out_dir: str = ""  # "": <KNOWSERVE_RUN_DIR or .knowserve>/eval
    batch: int = 32
    label: str = ""

    def check(self) -> "EvalConfig":
        if self.mode not in ("closed_book", "retrieval"):
            raise ValueError(f"mode {self.mode!r}: use closed_book or retrieval")
        if self.match not in MATCHES:
            raise ValueError(f"match {self.match!r}: use one of {MATCHES}")
        if self.answer_from not in ANSWER_FROM:
            raise ValueError(f"answer_from {self.answer_from!r}: use one of {ANSWER_FROM}")
        if self.prompt_format not in FORMATS:
            raise ValueError(f"prompt_format {self.prompt_format!r}: use one of {FORMATS}")
        check_tool_protocol(self.tool_protocol, allow_empty=False)
        if self.max_tokens < 1 or self.batch < 1:
            raise ValueError("max_tokens and batch must be at least 1")
        return self


def grade_options(cfg: EvalConfig, end_markers=END_MARKERS) -> GradeOptions:
    """The grading rule of an eval (the same :class:`GradeOptions` a reward recipe states)."""
    return GradeOptions(cfg.answer_from, cfg.match, tuple(end_markers))


def grade_record(completion: str, row: QaRow, options: GradeOptions) -> dict:
    """The graded parts of one answer's record: the completion as the model's text (cut at its first end marker),
    the answer taken out of it and its grade."""
    text = strip_end_markers(completion, options.end_markers)
    return {"completion": text, "answer": take_answer(text, options.answer_from, ()) or "",
            "grade": grade(text, row.gold_answers, row.false_answers, options)}


async def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """Run the evaluation; returns the result dict (also written as JSON)."""
    from services.common.progress import progress as tqdm

    from services.generation.client import GenerationClient, finish_name

    cfg.check()
    rows = await asyncio.to_thread(load_dataset, cfg.dataset, None, cfg.limit, cfg.seed)
    gen = GenerationClient(cfg.generation_target, ClientOptions(timeout_seconds=900, retries=30,
                                                                backoff_max_seconds=2.0), cfg.generation_app_name,
                           model=cfg.model, internal=True)
    start = time.monotonic()
    try:
        info = await gen.model_info()
        fmt = resolve_format(cfg.prompt_format, info.checkpoint_uri)
        # raw text from any caller is cut at the served model's own end markers too (GetModelInfo)
        options = grade_options(cfg, dict.fromkeys((*END_MARKERS, *info.end_of_sequence_tokens)))
        records = []
        bar = tqdm(total=len(rows), desc=f"eval {Path(cfg.dataset).name} ({cfg.mode})", unit="q", disable=not progress)
        for i in range(0, len(rows), cfg.batch):
            chunk = rows[i: i + cfg.batch]
            reply = await gen.generate([render_prompt(r.question, fmt, cfg.system_prompt) for r in chunk],
                                       temperature=0.0,
                                       max_tokens=cfg.max_tokens, return_logprobs=True,
                                       tool_protocol=cfg.tool_protocol if cfg.mode == "retrieval" else "",
                                       max_tool_turns=cfg.max_tool_turns if cfg.mode == "retrieval" else 0,
                                       retrieval_top_k=cfg.retrieval_top_k if cfg.mode == "retrieval" else 0)
            for row, c in zip(chunk, sorted(reply.completions, key=lambda c: c.prompt_index)):
                own = [lp for lp, m in zip(c.logprobs, c.env_mask) if m]
                records.append({"id": row.id, "question": row.question, "gold_answers": row.gold_answers,
                                **grade_record(c.text, row, options),
                                "confidence": sequence_confidence(own), "searched": c.tool_turns > 0,
                                "finish": finish_name(c.finish_reason),
                                "weight_version": int(c.weight_version), "topic": row.topic})
            bar.update(len(chunk))
        bar.close()
        versions = sorted({r["weight_version"] for r in records})
    finally:
        await gen.close()
    support = await _claim_support(cfg, records) if cfg.verification_target else None
    grades = [r["grade"] for r in records]
    result = {"benchmark": cfg.dataset, "mode": cfg.mode, "label": cfg.label, "model": info.model,
              "model_name": info.model_name, "checkpoint": info.checkpoint_uri,
              "weight_version": versions[-1] if versions else int(info.weight_version),
              "weight_versions_seen": versions, "n": len(records), **rates(grades),
              "incorrect_cut_off": incorrect_cut_off(records),
              "ap": average_precision([r["confidence"] for r in records], [g == "CORRECT" for g in grades]),
              "search_rate": sum(r["searched"] for r in records) / len(records),
              "claim_support": support, "seconds": time.monotonic() - start,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "records": records}
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    name = f"{_slug(info.model or 'model')}__{_slug(cfg.dataset)}__{cfg.mode}__v{result['weight_version']}"
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    result["path"] = str(path)
    result["chart"] = str(plot_results(out))
    return result


async def _claim_support(cfg: EvalConfig, records: list[dict]) -> float | None:
    """Share of checkable claims in attempted answers that the knowledge base supports (FActScore precision);
    None when no attempted answer asserted anything beyond its bare answer."""
    from services.verification.client import VerificationClient
    from services.verification.core import VerifyItem

    attempted = [r for r in records if r["grade"] not in (NOT_ATTEMPTED, MISSING)
                 and checkable_text(r["completion"], r["answer"])]
    if not attempted:
        return None
    supported = total = 0
    async with VerificationClient(cfg.verification_target, ClientOptions(timeout_seconds=600, retries=30)) as v:
        for i in range(0, len(attempted), 64):
            chunk = attempted[i: i + 64]
            reply = await v.verify([VerifyItem(answer=checkable_text(r["completion"], r["answer"]), topic=r["topic"])
                                    for r in chunk], judge=cfg.judge)
            for r, res in zip(chunk, reply.results):
                r["claims_supported"], r["claims_total"] = res.supported, len(res.claims)
                supported += res.supported
                total += len(res.claims)
    return supported / total if total else None


def default_out_dir() -> Path:
    import os

    return Path(os.environ.get("KNOWSERVE_RUN_DIR", Path(__file__).resolve().parents[1] / ".knowserve")) / "eval"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def load_results(out_dir: Path) -> list[dict]:
    results = []
    for path in sorted(Path(out_dir).glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        d.pop("records", None)
        results.append(d)
    return results


def plot_results(out_dir: Path) -> Path:
    """One PNG of every result in ``out_dir``: stacked correct / hallucinated / abstained per benchmark, mode and
    weight version (the figure a before/after comparison wants)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(load_results(out_dir), key=lambda r: (r.get("model") or "", r["benchmark"], r["mode"],
                                                           r["weight_version"]))
    # one bar per result, grouped by benchmark and mode; labels wrap at ':' and stay horizontal, the legend sits
    # outside the axes so it covers no bar
    fig, ax = plt.subplots(figsize=(min(24, max(6.5, 1.35 * len(results) + 3)), 5.0))
    labels = ["\n".join((r.get("model") or "", *r["benchmark"].split(":"), r["mode"].replace("_", "-"),
                         f"v{r['weight_version']}")).strip() for r in results]
    x = list(range(len(results)))
    bottom = [0.0] * len(results)
    for key, colour, name in (("correct", "#2e7d32", "correct"), ("incorrect", "#c62828", "hallucinated"),
                              ("not_attempted", "#9e9e9e", "abstained")):
        values = [r[key] for r in results]
        ax.bar(x, values, bottom=bottom, color=colour, label=name, width=0.7)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_xlim(-0.6, len(results) - 0.4)
    ax.set_ylabel("share of questions")
    ax.set_ylim(0, 1)
    ax.set_title("knowserve eval: answers by benchmark, mode and weight version")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    path = Path(out_dir) / "eval.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def share_text(value: float | None) -> str:
    """A share as the tables print it; "-" for a result written before the figure existed."""
    return "-" if value is None else f"{value:.1%}"


def summary_table(results: list[dict]):
    """A rich table of results (before/after rows)."""
    from rich.table import Table

    t = Table(title="hallucination by weight version")
    for col in ("benchmark", "mode", "version", "n", "correct", "hallucinated", "of which cut off", "abstained",
                "halluc./attempted", "correct-or-abstain", "claim support", "AP", "searched"):
        t.add_column(col, justify="right" if col not in ("benchmark", "mode") else "left")
    for r in results:
        cs = r.get("claim_support")
        t.add_row(r["benchmark"], r["mode"], f"v{r['weight_version']}", str(r["n"]), f"{r['correct']:.1%}",
                  f"{r['incorrect']:.1%}", share_text(r.get("incorrect_cut_off")), f"{r['not_attempted']:.1%}",
                  f"{r['hallucination_rate_attempted']:.1%}",
                  f"{r['correct_or_abstain']:.1%}", "-" if cs is None else f"{cs:.1%}", f"{r['ap']:.2f}",
                  f"{r.get('search_rate', 0):.0%}")
    return t
