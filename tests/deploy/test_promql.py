"""Every PromQL expression of the dashboards and of the rules, executed by a real Prometheus (Debian's) that
scrapes real running services: retrieval, verification, reward and training in-process on real gRPC servers, and
the session's Ray Serve generation app. After a few verification and reward requests and one `knowserve eval`,
the hallucination panels must return data; no expression may fail to parse or evaluate."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import yaml

from services.monitoring import LocalPrometheus
from services.reward.core import ScoreItem
from services.verification.core import VerifyItem
from tests.conftest import ROOT, SERVE_APP, free_port, tool
from tests.training.conftest import start_reward

pytestmark = pytest.mark.slow

# panels that must show data once the services have handled a few requests
MUST_HAVE_DATA = {
    "Hallucination rate by recipe", "Refusal rate by recipe", "Claim support ratio by judge",
    "Claims judged per second by verdict", "Hallucinated share of answers by benchmark and version",
    "Requests per second", "Duration p50", "Hallucination rate (rollouts, 10m)", "Claim support ratio (10m)",
    "Live unsupported answers by model and version", "Live refuted claims by model and version",
    "Live answers by outcome",
}


def dashboard_queries() -> list[tuple[str, str, str]]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dashboards", ROOT / "deploy/grafana/dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    render = module.render

    out = []
    for name, text in render().items():
        d = json.loads(text)
        for p in d["panels"]:
            for t in p.get("targets", []):
                out.append((name, p["title"], t["expr"]))
        for a in d.get("annotations", {}).get("list", []):
            if a.get("expr"):
                out.append((name, f"annotation {a['name']}", a["expr"]))
    return out


def rule_queries() -> list[tuple[str, str, str]]:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/rules/knowserve.rules.yml").read_text())
    return [("rules", r.get("record") or r.get("alert"), r["expr"]) for g in rules["groups"] for r in g["rules"]]


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends: its variables substituted (a 1s scrape interval gives $__rate_interval = 4 x 1s...)."""
    return expr.replace("$__rate_interval", "30s").replace('"$service"', '".*"')


async def test_every_dashboard_and_rule_expression_runs_on_real_prometheus(
        serve_generation, answer_port, start_retrieval, start_verification, starter, tmp_path):
    from services.training.client import TrainingClient
    from services.training.config import TrainingSettings
    from services.training.server import TrainingApp
    from tests.conftest import InProcessService, FACTS
    from training.eval import EvalConfig, evaluate

    gen_target, _, gen_metrics = serve_generation
    retrieval = await start_retrieval(dense=False, default_mode="bm25")
    await retrieval.client.upsert(FACTS)
    verification = await start_verification(retrieval_target=retrieval.server.address)
    reward = await start_reward(starter, verification.server.address)
    settings = TrainingSettings(port=0, metrics_port=0, runs_dir=tmp_path / "runs", eval_dir=tmp_path / "eval",
                                generation_target=gen_target, generation_app_name=SERVE_APP)
    training = await starter.start(InProcessService(settings, TrainingApp(settings), TrainingClient))
    from services.answer.client import AnswerClient
    from services.answer.config import AnswerSettings
    from services.answer.server import AnswerApp
    from services.generation.client import GenerationClient

    answer_settings = AnswerSettings(port=answer_port, metrics_port=0, retrieval_target=retrieval.server.address,
                                     verification_target=verification.server.address, generation_target=gen_target,
                                     generation_app_name=SERVE_APP, upstream_retries=0)
    answer = await starter.start(InProcessService(answer_settings, AnswerApp(answer_settings), AnswerClient))
    targets = {"retrieval": retrieval.server.metrics_port, "verification": verification.server.metrics_port,
               "reward": reward.server.metrics_port, "training": training.server.metrics_port,
               "generation": gen_metrics, "answer": answer.server.metrics_port}
    prom = await asyncio.to_thread(LocalPrometheus(tmp_path / "prometheus", free_port()).start, targets, "1s",
                                   tool("prometheus"))
    async def data(expr: str) -> list:
        reply = await asyncio.to_thread(prom.query, expr)
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]["result"]

    def finite(result: list) -> bool:
        return any(r["value"][1] not in ("NaN", "+Inf", "-Inf") for r in result)

    async def until(predicate, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout  # scrapes every 1s; rules evaluate every 1s
        while time.monotonic() < deadline:
            if await predicate():
                return
            await asyncio.sleep(1)
        raise AssertionError(f"timed out waiting for {what}")

    try:
        async def all_up():
            up = await data('up{job="knowserve"} == 1')
            return {r["metric"]["component"] for r in up} == set(targets)

        # counters must be scraped at their starting value first, or rate() sees no increase
        await until(all_up, "every service to be scraped")
        await asyncio.sleep(2)
        # traffic: verified answers, graded rollouts (correct, hallucinated, refused), one evaluation
        await verification.client.verify([VerifyItem(answer="Paris is the capital of France."),
                                          VerifyItem(answer="Mount Everest is 4,000 metres high.")], judge="lexical")
        items = [ScoreItem("What is the capital of France?", f"<think>{t}</think><answer>{a}</answer>", ["Paris"])
                 for t, a in (("Paris is the capital of France.", "Paris"), ("Lyon is the capital of France.",
                              "Lyon"), ("I am not sure.", "I don't know"))]
        async with GenerationClient(gen_target, app_name=SERVE_APP) as gen:
            for _ in range(3):
                await reward.client.score("knowrl", items)
                # live traffic: a user Generate (sampled to the answer service by generation), and served answers
                # the answer service verifies: one supported, one refuted
                await gen.generate(["The capital of France is"], max_tokens=8)
                for text in ("Paris is the capital of France.", "Mount Everest is 4,000 metres high."):
                    await answer.client.observe("dashboard-test", 1, "", text)
                await asyncio.sleep(1.5)
        rows = tmp_path / "qa.jsonl"
        rows.write_text("".join(json.dumps({"question": q, "gold_answers": [a]}) + "\n" for q, a in
                                (("What is the capital of France?", "Paris"), ("Where is Tokyo?", "Japan"))))
        await evaluate(EvalConfig(dataset=str(rows), generation_target=gen_target, generation_app_name=SERVE_APP,
                                  verification_target=verification.server.address, out_dir=str(settings.eval_dir),
                                  max_tokens=8), progress=False)

        async def ready():
            return (finite(await data("knowserve:reward_hallucination_rate:ratio_rate10m"))
                    and finite(await data("knowserve:live_unsupported_answers:ratio_rate10m"))
                    and finite(await data("knowserve:live_hallucination_rate:ratio_rate10m"))
                    and finite(await data("knowserve_eval_answers_ratio"))
                    and finite(await data("knowserve:verification_support_ratio:mean_rate10m")))

        await until(ready, "the recording rules and eval gauges to have values")
        empty = []
        for source, title, expr in dashboard_queries() + rule_queries():
            result = await data(grafana_to_promql(expr))  # a parse or evaluation error fails here
            if title in MUST_HAVE_DATA and not finite(result):
                empty.append(f"{source}: {title}: {expr} -> {result}")
        assert not empty, "hallucination panels without data:\n" + "\n".join(empty)
        rate = await data('knowserve:reward_hallucination_rate:ratio_rate10m{recipe="knowrl"}')
        assert float(rate[0]["value"][1]) == pytest.approx(0.5)  # 1 wrong of 2 attempted, the refusal excluded
        live = await data('knowserve:live_hallucination_rate:ratio_rate10m{model="dashboard-test",weight_version="1"}')
        assert float(live[0]["value"][1]) == pytest.approx(0.5)  # Everest's height refuted, Paris supported
        samples = await data('sum(knowserve_generation_live_samples_total{model="tiny",result="queued"})')
        assert samples and float(samples[0]["value"][1]) >= 1  # generation sampled the user Generate calls
    finally:
        await asyncio.to_thread(prom.stop)
