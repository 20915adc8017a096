"""Prometheus figures of training runs and evaluations, read from their files at scrape time.

Runs train in their own processes and ``knowserve eval`` is a CLI, so the service collects from the run folders
(``progress.jsonl``) and the eval folder (``*.json``) when Prometheus scrapes: nothing is lost when the service
restarts, and counters only grow (a run's step records are never removed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from training.runs import ProgressRecord

STEP_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class _Cached:
    """Parsed JSON files, re-read only when their mtime changes."""

    def __init__(self):
        self._files: dict[Path, tuple[float, object]] = {}

    def read(self, path: Path, lines: bool):
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return [] if lines else None
        hit = self._files.get(path)
        if hit and hit[0] == mtime:
            return hit[1]
        try:
            text = path.read_text()
            value = [json.loads(x) for x in text.splitlines() if x.strip()] if lines else json.loads(text)
        except (OSError, json.JSONDecodeError):
            return hit[1] if hit else ([] if lines else None)
        self._files[path] = (mtime, value)
        return value


class TrainingCollector:
    """``knowserve_training_*`` from run folders and ``knowserve_eval_*`` from eval results."""

    def __init__(self, runs_dir: Path, eval_dir: Path, states):
        self.runs_dir, self.eval_dir, self.states = Path(runs_dir), Path(eval_dir), states
        self.cache = _Cached()

    def describe(self):
        return []

    def collect(self):
        runs = GaugeMetricFamily("knowserve_training_runs", "Training runs by state.", labels=["state"])
        for state, n in self.states().items():
            runs.add_metric([state], n)
        yield runs
        steps = CounterMetricFamily("knowserve_training_steps", "Optimizer steps completed, by recipe (or algorithm "
                                    "for runs without one).", labels=["recipe"])
        swaps = CounterMetricFamily("knowserve_training_weight_publishes",
                                    "Weight publishes to generation by result.", labels=["result"])
        reward = GaugeMetricFamily("knowserve_training_reward", "Mean total reward of the latest step of each "
                                   "recipe's most recent run.", labels=["recipe"])
        component = GaugeMetricFamily("knowserve_training_reward_component", "Mean reward component of the latest "
                                      "step.", labels=["recipe", "component"])
        kl = GaugeMetricFamily("knowserve_training_kl", "Mean KL to the reference of the latest step.",
                               labels=["recipe"])
        refusal = GaugeMetricFamily("knowserve_training_refusal_ratio", "Share of the latest step's rollouts that "
                                    "abstained.", labels=["recipe"])
        version = GaugeMetricFamily("knowserve_training_weight_version", "Weight version the latest run published.",
                                    labels=["recipe"])
        step_hist = HistogramMetricFamily("knowserve_training_step_seconds", "Wall time of an optimizer step.",
                                          labels=["recipe"])
        loss = GaugeMetricFamily("knowserve_training_loss", "Training loss of the latest step.", labels=["recipe"])
        zero_std = GaugeMetricFamily("knowserve_training_reward_zero_std_ratio", "Share of the latest GRPO step's "
                                     "groups whose rewards were all equal (no learning signal).", labels=["recipe"])
        gap = GaugeMetricFamily("knowserve_training_logprob_abs_diff", "Mean |trainer - rollout| token logprob of the "
                                "latest GRPO step (rollout/trainer mismatch).", labels=["recipe"])
        ratio = GaugeMetricFamily("knowserve_training_importance_ratio_max", "Largest token importance ratio "
                                  "exp(trainer - rollout) of the latest GRPO step.", labels=["recipe"])
        per_recipe_steps: dict[str, int] = {}
        per_recipe_hist: dict[str, list[float]] = {}
        latest: dict[str, tuple[float, dict]] = {}
        ok = failed = 0
        if self.runs_dir.exists():
            for d in sorted(self.runs_dir.iterdir()):
                records = [ProgressRecord.from_dict(r) for r in self.cache.read(d / "progress.jsonl", lines=True)]
                if not records:
                    continue
                recipe = records[-1].recipe or records[-1].algorithm or "unknown"
                per_recipe_steps[recipe] = per_recipe_steps.get(recipe, 0) + len(records)
                per_recipe_hist.setdefault(recipe, []).extend(r.step_seconds for r in records)
                for r in records:
                    ok += r.publishes.get("ok", 0)
                    failed += r.publishes.get("failed", 0)
                mtime = (d / "progress.jsonl").stat().st_mtime
                if recipe not in latest or latest[recipe][0] < mtime:
                    latest[recipe] = (mtime, records[-1])
        for recipe, n in per_recipe_steps.items():
            steps.add_metric([recipe], n)
            values = per_recipe_hist[recipe]
            buckets = [(str(b), sum(v <= b for v in values)) for b in STEP_BUCKETS] + [("+Inf", len(values))]
            step_hist.add_metric([recipe], buckets, sum(values))
        for recipe, (_, r) in latest.items():
            version.add_metric([recipe], r.weight_version)
            loss.add_metric([recipe], r.loss)
            if r.algorithm == "grpo":
                reward.add_metric([recipe], r.reward_mean)
                kl.add_metric([recipe], r.kl)
                refusal.add_metric([recipe], r.refusal_rate)
                zero_std.add_metric([recipe], r.frac_reward_zero_std)
                gap.add_metric([recipe], r.logprob_abs_diff_mean)
                ratio.add_metric([recipe], r.importance_ratio_max)
                for name, value in r.reward_components.items():
                    component.add_metric([recipe, name], value)
        swaps.add_metric(["ok"], ok)
        swaps.add_metric(["failed"], failed)
        yield from (steps, swaps, reward, component, kl, refusal, version, step_hist, loss, zero_std, gap, ratio)
        yield from self._eval()

    def _eval(self):
        labels = ["model", "benchmark", "mode", "weight_version"]
        answers = GaugeMetricFamily("knowserve_eval_answers_ratio", "Share of evaluation answers by outcome "
                                    "(SimpleQA grades).", labels=labels + ["outcome"])
        halluc = GaugeMetricFamily("knowserve_eval_hallucination_ratio", "Hallucinated share of attempted answers.",
                                   labels=labels)
        support = GaugeMetricFamily("knowserve_eval_claim_support_ratio", "Share of checkable claims the "
                                    "knowledge base supports.", labels=labels)
        ap = GaugeMetricFamily("knowserve_eval_ap_score", "R-Tuning AP score (answers ranked by confidence).",
                               labels=labels)
        when = GaugeMetricFamily("knowserve_eval_timestamp_seconds", "When the evaluation ran (Unix time).",
                                 labels=labels)
        if self.eval_dir.exists():
            for path in sorted(self.eval_dir.glob("*.json")):
                r = self.cache.read(path, lines=False)
                if not isinstance(r, dict) or "benchmark" not in r:
                    continue
                key = [r.get("model") or "", r["benchmark"], r["mode"], str(r["weight_version"])]
                for outcome, field in (("correct", "correct"), ("hallucinated", "incorrect"),
                                       ("abstained", "not_attempted")):
                    answers.add_metric(key + [outcome], r[field])
                halluc.add_metric(key, r["hallucination_rate_attempted"])
                if r.get("claim_support") is not None:
                    support.add_metric(key, r["claim_support"])
                ap.add_metric(key, r["ap"])
                when.add_metric(key, _epoch(r.get("time", "")))
        yield from (answers, halluc, support, ap, when)


def _epoch(iso: str) -> float:
    try:
        return time.mktime(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    except ValueError:
        return 0.0
