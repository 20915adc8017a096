"""Prometheus metrics of the generation service, labelled by served ``model``.

Serve replicas are separate processes; they write to prometheus_client's multiprocess directory
(``PROMETHEUS_MULTIPROC_DIR``, set for them through the Serve runtime_env) and the launcher process serves the
merged view on ``KNOWSERVE_GENERATION_METRICS_PORT`` (default 9104). Import this module only in replicas or
after that variable is set.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("knowserve_generation_requests", "Generation RPCs and HTTP calls by model, method and status code.",
                   ["model", "method", "code"])
REQUEST_SECONDS = Histogram("knowserve_generation_request_duration_seconds", "Wall time of generation calls.",
                            ["model", "method"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
TOKENS = Counter("knowserve_generation_tokens", "Tokens produced: kind=model (sampled) or tool (inserted).",
                 ["model", "kind"])
TTFT = Histogram("knowserve_generation_time_to_first_token_seconds", "Time to the first streamed token.", ["model"],
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
BATCH = Histogram("knowserve_generation_batch_size", "Prompts per engine call after dynamic batching.", ["model"],
                  buckets=(1, 2, 4, 8, 16, 32, 64))
TOOL_TURNS = Histogram("knowserve_generation_tool_turns", "Retrieval turns per completion.", ["model"],
                       buckets=(0, 1, 2, 3, 4, 6, 8))
WEIGHT_VERSION = Gauge("knowserve_generation_weight_version", "Weight version each live replica of a model serves.",
                       ["model"], multiprocess_mode="liveall")
SWAPS = Counter("knowserve_generation_swaps", "Weight swaps by model and result: ok, failed, rollback (a "
                "RollbackWeights call), rolled_back (undone by the hallucination gate).", ["model", "result"])
GATE_DECISIONS = Counter("knowserve_generation_gate_decisions", "Hallucination gates by model and decision: kept, "
                         "rolled_back, inconclusive, superseded.", ["model", "decision"])
LIVE_SAMPLES = Counter("knowserve_generation_live_samples", "User completions sampled for live verification, by "
                       "result: queued (by the answer service), dropped (its queue or our in-flight limit was full), "
                       "failed (it could not be reached).", ["model", "result"])
