"""Grafana dashboards as code (grafana-foundation-sdk): ``python deploy/grafana/dashboards.py`` writes the JSON
into ``deploy/grafana/dashboards/`` and the Helm chart's ``dashboards/`` (shipped as ConfigMaps labelled
``grafana_dashboard: "1"``). ``--check`` fails when the committed JSON differs from what the code generates.

Every panel queries the ``${datasource}`` variable; uids are stable; counters go through ``rate()`` and
histograms through ``histogram_quantile()``. ``tests/test_dashboards.py`` runs every expression against a real
Prometheus scraping real services.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

ROOT = Path(__file__).resolve().parents[2]
OUT_DIRS = [ROOT / "deploy/grafana/dashboards", ROOT / "helm/knowserve/dashboards"]
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SERVICES = ("retrieval", "verification", "reward", "generation", "answer", "training")


def query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend or "__auto").ref_id(ref).datasource(DS)


def ts(title: str, unit: str, *queries: tuple[str, str], w: int = 12, h: int = 8, desc: str = "",
       minv: float | None = None, maxv: float | None = None) -> timeseries.Panel:
    p = timeseries.Panel().title(title).datasource(DS).unit(unit).height(h).span(w).description(desc)
    for i, (expr, legend) in enumerate(queries):
        p = p.with_target(query(expr, legend, chr(ord("A") + i)))
    if minv is not None:
        p = p.min(minv)
    if maxv is not None:
        p = p.max(maxv)
    return p


def st(title: str, unit: str, expr: str, w: int = 6, desc: str = "") -> stat.Panel:
    return (stat.Panel().title(title).datasource(DS).unit(unit).height(4).span(w).description(desc)
            .with_target(query(expr)))


def base(uid: str, title: str, tags: list[str]) -> db.Dashboard:
    return (db.Dashboard(title).uid(uid).tags(["knowserve", *tags]).refresh("30s").time("now-6h", "now")
            .timezone("browser").editable()
            .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
            .link(db.DashboardLink("knowserve").type("dashboards").tags(["knowserve"]).as_dropdown(True)))


def swap_annotations(selector: str = "") -> list[db.AnnotationQuery]:
    """Weight swaps (orange) and the hallucination gate's automatic rollbacks (red) as annotations."""
    swaps = (db.AnnotationQuery().name("weight swaps").datasource(DS).enable(True).icon_color("orange")
             .target(db.AnnotationTarget().limit(100).match_any(False).tags([]).type("dashboard"))
             .expr(f"changes(max by (model) (knowserve_generation_weight_version{{{selector}}})[1m:15s]) > 0"))
    rolled = (db.AnnotationQuery().name("gate rollbacks").datasource(DS).enable(True).icon_color("red")
              .target(db.AnnotationTarget().limit(100).match_any(False).tags([]).type("dashboard"))
              .expr("sum by (model) (increase(knowserve_generation_swaps_total{"
                    + (selector + "," if selector else "") + 'result="rolled_back"}[1m])) > 0'))
    return [swaps, rolled]


def hallucination_overview() -> db.Dashboard:
    d = base("knowserve-hallucination", "knowserve / Hallucination overview", ["hallucination"])
    for a in swap_annotations():
        d = d.annotation(a)
    return (d
            .with_row(db.Row("Now"))
            .with_panel(st("Hallucination rate (rollouts, 10m)", "percentunit",
                           "max(knowserve:reward_hallucination_rate:ratio_rate10m)",
                           desc="Wrong answers among attempted ones, as graded by the reward service."))
            .with_panel(st("Claim support ratio (10m)", "percentunit",
                           "avg(knowserve:verification_support_ratio:mean_rate10m)"))
            .with_panel(st("Refusal rate (10m)", "percentunit", "max(knowserve:reward_refusal_rate:ratio_rate10m)"))
            .with_panel(st("Serving weight version", "none", "max(knowserve_generation_weight_version)"))
            .with_row(db.Row("Trends"))
            .with_panel(ts("Hallucination rate by recipe", "percentunit",
                           ("knowserve:reward_hallucination_rate:ratio_rate10m", "{{recipe}}"), minv=0, maxv=1))
            .with_panel(ts("Refusal rate by recipe", "percentunit",
                           ("knowserve:reward_refusal_rate:ratio_rate10m", "{{recipe}}"), minv=0, maxv=1))
            .with_panel(ts("Claim support ratio by judge", "percentunit",
                           ("knowserve:verification_support_ratio:mean_rate10m", "{{judge}}"), minv=0, maxv=1))
            .with_panel(ts("Claims judged per second by verdict", "ops",
                           ("sum by (label) (rate(knowserve_verification_claims_total[$__rate_interval]))",
                            "{{label}}")))
            .with_row(db.Row("Evaluations by weight version (knowserve eval)"))
            .with_panel(ts("Hallucinated share of answers by benchmark and version", "percentunit",
                           ('knowserve_eval_answers_ratio{outcome="hallucinated"}',
                            "{{model}} {{benchmark}} {{mode}} v{{weight_version}}"), minv=0, maxv=1))
            .with_panel(ts("Correct share of answers by benchmark and version", "percentunit",
                           ('knowserve_eval_answers_ratio{outcome="correct"}',
                            "{{model}} {{benchmark}} {{mode}} v{{weight_version}}"), minv=0, maxv=1))
            .with_panel(ts("Eval claim support and AP score", "percentunit",
                           ("knowserve_eval_claim_support_ratio",
                            "support {{model}} {{benchmark}} v{{weight_version}}"),
                           ("knowserve_eval_ap_score", "AP {{model}} {{benchmark}} v{{weight_version}}"),
                           minv=0, maxv=1))
            .with_panel(ts("Hallucination among attempted answers (eval)", "percentunit",
                           ("knowserve_eval_hallucination_ratio",
                            "{{model}} {{benchmark}} {{mode}} v{{weight_version}}"), minv=0, maxv=1))
            .with_row(db.Row("Live traffic (what served models tell users)"))
            .with_panel(ts("Live unsupported answers by model and version", "percentunit",
                           ("knowserve:live_unsupported_answers:ratio_rate10m", "{{model}} v{{weight_version}}"),
                           minv=0, maxv=1, desc="Verified live answers (Answer calls and sampled Generate traffic) "
                           "with a refuted claim or support below the threshold; swaps and gate rollbacks are "
                           "annotated."))
            .with_panel(ts("Live refuted claims by model and version", "percentunit",
                           ("knowserve:live_hallucination_rate:ratio_rate10m", "{{model}} v{{weight_version}}"),
                           minv=0, maxv=1))
            .with_panel(ts("Live answers by outcome", "ops",
                           ("sum by (model, outcome) (rate(knowserve_live_answers_total[$__rate_interval]))",
                            "{{model}} {{outcome}}")))
            .with_panel(ts("Live verification lag and dropped samples", "s",
                           ("histogram_quantile(0.5, sum by (model, le) (rate("
                            "knowserve_live_verification_lag_seconds_bucket[$__rate_interval])))", "lag p50 {{model}}"),
                           ("histogram_quantile(0.99, sum by (model, le) (rate("
                            "knowserve_live_verification_lag_seconds_bucket[$__rate_interval])))", "lag p99 {{model}}"),
                           ("sum by (model, reason) (rate(knowserve_live_dropped_samples_total[$__rate_interval]))",
                            "dropped/s {{model}} {{reason}}")))
            .with_panel(ts("Answer outcomes", "ops",
                           ("sum by (model, outcome) (rate(knowserve_answer_outcomes_total[$__rate_interval]))",
                            "{{model}} {{outcome}}")))
            .with_panel(ts("Hallucination gate decisions", "short",
                           ("sum by (model, decision) (increase(knowserve_generation_gate_decisions_total"
                            "[$__rate_interval]))", "{{model}} {{decision}}"))))


def service_red() -> db.Dashboard:
    d = (base("knowserve-services", "knowserve / Services (RED)", ["red"])
         .with_variable(db.QueryVariable("service").label("Service").datasource(DS)
                        .query("label_values(knowserve_rpc_requests_total, service)").refresh(
                            VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)))
    return (d.with_row(db.Row("Rate, errors, duration"))
            .with_panel(ts("Requests per second", "reqps",
                           ('sum by (service, method) (rate(knowserve_rpc_requests_total{service=~"$service"}'
                            '[$__rate_interval]))', "{{service}} {{method}}")))
            .with_panel(ts("Error ratio", "percentunit",
                           ('sum by (service) (rate(knowserve_rpc_requests_total{service=~"$service",code!="OK"}'
                            '[$__rate_interval])) / sum by (service) (rate(knowserve_rpc_requests_total'
                            '{service=~"$service"}[$__rate_interval]))', "{{service}}"), minv=0))
            .with_panel(ts("Duration p50", "s",
                           ('histogram_quantile(0.5, sum by (service, le) (rate(knowserve_rpc_duration_seconds_bucket'
                            '{service=~"$service"}[$__rate_interval])))', "{{service}}")))
            .with_panel(ts("Duration p99", "s",
                           ('histogram_quantile(0.99, sum by (service, le) (rate(knowserve_rpc_duration_seconds_bucket'
                            '{service=~"$service"}[$__rate_interval])))', "{{service}}")))
            .with_panel(ts("In flight", "none", ('sum by (service) (knowserve_rpc_in_flight{service=~"$service"})',
                                                 "{{service}}")))
            .with_panel(ts("Serving (health)", "none", ('knowserve_serving{service=~"$service"}', "{{service}}"),
                           minv=0, maxv=1)))


def generation() -> db.Dashboard:
    """Every panel broken down by served ``model`` (a $model variable selects them)."""
    m = 'model=~"$model"'
    d = (base("knowserve-generation", "knowserve / Generation", ["generation"])
         .with_variable(db.QueryVariable("model").label("Model").datasource(DS)
                        .query("label_values(knowserve_generation_weight_version, model)").refresh(
                            VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)))
    for a in swap_annotations(m):
        d = d.annotation(a)
    return (d
            .with_panel(ts("Tokens per second", "short",
                           (f"sum by (model, kind) (rate(knowserve_generation_tokens_total{{{m}}}[$__rate_interval]))",
                            "{{model}} {{kind}}")))
            .with_panel(ts("Time to first token", "s",
                           ("histogram_quantile(0.5, sum by (model, le) (rate("
                            f"knowserve_generation_time_to_first_token_seconds_bucket{{{m}}}[$__rate_interval])))",
                            "p50 {{model}}"),
                           ("histogram_quantile(0.99, sum by (model, le) (rate("
                            f"knowserve_generation_time_to_first_token_seconds_bucket{{{m}}}[$__rate_interval])))",
                            "p99 {{model}}")))
            .with_panel(ts("Request duration", "s",
                           ("histogram_quantile(0.5, sum by (model, method, le) (rate("
                            f"knowserve_generation_request_duration_seconds_bucket{{{m}}}[$__rate_interval])))",
                            "p50 {{model}} {{method}}"),
                           ("histogram_quantile(0.99, sum by (model, method, le) (rate("
                            f"knowserve_generation_request_duration_seconds_bucket{{{m}}}[$__rate_interval])))",
                            "p99 {{model}} {{method}}")))
            .with_panel(ts("Requests and errors", "reqps",
                           (f"sum by (model, method, code) (rate(knowserve_generation_requests_total{{{m}}}"
                            "[$__rate_interval]))", "{{model}} {{method}} {{code}}")))
            .with_panel(ts("Batch size (dynamic batching)", "none",
                           ("histogram_quantile(0.5, sum by (model, le) (rate(knowserve_generation_batch_size_bucket"
                            f"{{{m}}}[$__rate_interval])))", "p50 {{model}}"),
                           (f"sum by (model) (rate(knowserve_generation_batch_size_sum{{{m}}}[$__rate_interval])) / "
                            f"sum by (model) (rate(knowserve_generation_batch_size_count{{{m}}}[$__rate_interval]))",
                            "mean {{model}}")))
            .with_panel(ts("Weight version (swaps annotated)", "none",
                           (f"max by (model) (knowserve_generation_weight_version{{{m}}})", "{{model}}")))
            .with_panel(ts("Swaps and rollbacks", "short",
                           (f"sum by (model, result) (increase(knowserve_generation_swaps_total{{{m}}}"
                            "[$__rate_interval]))", "{{model}} {{result}}")))
            .with_panel(ts("Retrieval turns per completion", "none",
                           (f"sum by (model) (rate(knowserve_generation_tool_turns_sum{{{m}}}[$__rate_interval])) / "
                            f"sum by (model) (rate(knowserve_generation_tool_turns_count{{{m}}}[$__rate_interval]))",
                            "{{model}}"))))


def training() -> db.Dashboard:
    return (base("knowserve-training", "knowserve / Training (GRPO)", ["training"])
            .with_panel(st("Runs training", "none", 'sum(knowserve_training_runs{state=~"RUNNING|PENDING"})'))
            .with_panel(st("Steps (all runs)", "none", "sum(knowserve_training_steps_total)"))
            .with_panel(st("Published weight version", "none", "max(knowserve_training_weight_version)"))
            .with_panel(st("Failed publishes (1h)", "none",
                           'sum(increase(knowserve_training_weight_publishes_total{result="failed"}[1h]))'))
            .with_panel(ts("Reward (latest step)", "none", ("knowserve_training_reward", "{{recipe}}")))
            .with_panel(ts("Reward components (latest step)", "none",
                           ("knowserve_training_reward_component", "{{recipe}} {{component}}")))
            .with_panel(ts("KL to the reference and refusal ratio", "none",
                           ("knowserve_training_kl", "KL {{recipe}}"),
                           ("knowserve_training_refusal_ratio", "refusal {{recipe}}")))
            .with_panel(ts("Step time", "s",
                           ("histogram_quantile(0.5, sum by (recipe, le) (rate(knowserve_training_step_seconds_bucket"
                            "[$__rate_interval])))", "p50 {{recipe}}"),
                           ("sum by (recipe) (rate(knowserve_training_step_seconds_sum[$__rate_interval])) / "
                            "sum by (recipe) (rate(knowserve_training_step_seconds_count[$__rate_interval]))",
                            "mean {{recipe}}")))
            .with_panel(ts("Reward scoring rate (reward service)", "ops",
                           ("sum by (recipe) (rate(knowserve_reward_items_total[$__rate_interval]))", "{{recipe}}"))))


DASHBOARDS = {"hallucination-overview": hallucination_overview, "services-red": service_red,
              "generation": generation, "training": training}


def render() -> dict[str, str]:
    return {name: json.dumps(make().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
            for name, make in DASHBOARDS.items()}


def expressions(dashboard_json: dict) -> list[str]:
    """Every PromQL expression of a dashboard (panel targets and annotations)."""
    out = [t["expr"] for p in dashboard_json.get("panels", []) for t in p.get("targets", []) if t.get("expr")]
    out += [a["expr"] for a in dashboard_json.get("annotations", {}).get("list", []) if a.get("expr")]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is stale")
    args = parser.parse_args()
    stale = []
    for name, text in render().items():
        for out in OUT_DIRS:
            path = out / f"{name}.json"
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path))
            else:
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if stale:
        print("stale dashboards (run `python deploy/grafana/dashboards.py`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
