"""Live monitoring benchmark (issue #18): what verifying served traffic costs, and where an Answer's time goes.

One Ray Serve generation app (SmolLM2-135M-Instruct, transformers engine, 1 replica) with ``LIVE_SAMPLE_RATE=0.1``
and a real answer service (in-process, with real retrieval over the Wikipedia demo leads and the lexical judge),
all on this machine's cores:

* **Generate tokens/s, live monitoring on vs off, same run**: concurrent clients for alternating phases; in the
  "off" phases every request is marked ``internal`` (never sampled), in the "on" phases 10% of completions go to
  the answer service and are verified while the load runs. Target: "on" at most 5% below "off".
* **Answer latency**: p50 / p99 of whole Answer calls and of their retrieval, generation and verification phases.

    .venv/bin/python benchmarks/live.py                 # ~6 min on 2 cores
    .venv/bin/python benchmarks/live.py --phase-seconds 20 --answers 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

APP = "knowserve-live-bench"
PROMPTS = ["What is the capital of France?", "Why is the sky blue?", "Who wrote Hamlet?", "What is photosynthesis?",
           "How far is the Moon?", "What is the largest planet?", "Who painted the Mona Lisa?", "What is DNA?"]
QUESTIONS = ["Which planet is known as the Red Planet?", "Who directed 2001: A Space Odyssey?",
             "What is the capital of Australia?", "How high is Mount Everest?", "What is the capital of France?",
             "Who wrote Hamlet?", "What is the largest ocean on Earth?", "Who painted the Mona Lisa?",
             "What is the chemical symbol for gold?", "Which river flows through Cairo?"]


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))] if s else float("nan")


async def load(target: str, internal: bool, clients: int, seconds: float, max_tokens: int) -> tuple[float, int]:
    """(tokens/s, failures) of ``clients`` concurrent Generate loops."""
    from services.generation.client import GenerationClient

    tokens, failures = 0, 0
    end = time.monotonic() + seconds
    async with GenerationClient(target, app_name=APP, internal=internal) as gen:
        async def one(k: int) -> None:
            nonlocal tokens, failures
            i = 0
            while time.monotonic() < end:
                chat = [{"role": "user", "content": PROMPTS[(k + i) % len(PROMPTS)]}]
                try:
                    r = await gen.generate([chat], temperature=1.0, max_tokens=max_tokens, timeout=300)
                    tokens += r.usage.completion_tokens
                except Exception:  # noqa: BLE001 - counted
                    failures += 1
                i += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(clients)))
        return tokens / (time.perf_counter() - start), failures


async def run(args) -> dict:
    from prometheus_client import REGISTRY

    from services.answer.client import AnswerClient
    from services.answer.config import AnswerSettings
    from services.answer.server import AnswerApp
    from services.common.models import smollm2_folder
    from services.retrieval.config import RetrievalSettings
    from services.retrieval.core import Document
    from services.verification.client import VerificationClient
    from services.verification.config import VerificationSettings
    from services.verification.server import VerificationApp
    from tests.conftest import GenerationApp, InProcessService, Running, reserved_port

    work = Path(tempfile.mkdtemp(prefix="knowserve-live-bench-"))
    retrieval = await Running(RetrievalSettings(port=0, metrics_port=0, data_dir=work / "index", dense=False,
                                                default_mode="bm25"), None).start()
    wiki = ROOT / ".knowserve/data/wiki.jsonl"
    if wiki.exists():
        docs = [Document(**{k: d[k] for k in ("id", "title", "text", "source")})
                for d in map(json.loads, wiki.read_text().splitlines()[: args.documents])]
    else:
        from tests.conftest import FACTS
        docs = list(FACTS)
        print("(no .knowserve/data/wiki.jsonl: `make demo` builds it; using the 5-document test facts)")
    for i in range(0, len(docs), 500):
        await retrieval.client.upsert(docs[i: i + 500])
    vs = VerificationSettings(port=0, metrics_port=0, retrieval_target=retrieval.server.address,
                              nli_model_path=Path("/nonexistent"), generation_target="")
    verification = await InProcessService(vs, VerificationApp(vs), VerificationClient).start()
    answer_port = reserved_port()
    shutil.copytree(smollm2_folder(ROOT / ".cache/models"), work / "smollm2")
    app = GenerationApp(work, work / "smollm2", app_name=APP, replicas=1, replica_num_cpus=1, max_tokens_limit=128,
                        default_max_tokens=32, answer_target=f"127.0.0.1:{answer_port}", live_sample_rate=0.1,
                        log_level="WARNING")
    print("starting the Serve app (SmolLM2-135M-Instruct, 1 replica) ...", flush=True)
    app.start(timeout=600)
    s = AnswerSettings(port=answer_port, metrics_port=0, retrieval_target=retrieval.server.address,
                       verification_target=verification.server.address, generation_target=app.target,
                       generation_app_name=APP)
    answer = await InProcessService(s, AnswerApp(s), AnswerClient).start()
    result: dict = {"documents": len(docs), "clients": args.clients, "max_tokens": args.max_tokens,
                    "phase_seconds": args.phase_seconds}
    try:
        await load(app.target, True, 2, 5, 8)  # warm up
        phases = {"off": [], "on": []}
        failures = 0
        for k in range(args.rounds):
            for arm in ("off", "on"):
                tps, failed = await load(app.target, arm == "off", args.clients, args.phase_seconds, args.max_tokens)
                phases[arm].append(tps)
                failures += failed
                print(f"  round {k + 1} live monitoring {arm:3s}: {tps:6.1f} tokens/s", flush=True)
        await asyncio.sleep(3)  # the last samples' verdicts
        sampled = sum(v for m in REGISTRY.collect() if m.name == "knowserve_live_answers"
                      for smp in m.samples if smp.name.endswith("_total") for v in [smp.value])
        dropped = sum(smp.value for m in REGISTRY.collect() if m.name == "knowserve_live_dropped_samples"
                      for smp in m.samples if smp.name.endswith("_total"))
        off, on = statistics.mean(phases["off"]), statistics.mean(phases["on"])
        result.update(tokens_per_second_off=off, tokens_per_second_on=on, change=on / off - 1, phases=phases,
                      generate_failures=failures, live_answers_verified=sampled, live_samples_dropped=dropped)

        timings: dict[str, list[float]] = {"total": [], "retrieval": [], "generation": [], "verification": []}
        outcomes: dict[str, int] = {}
        for i in range(args.answers):
            q = QUESTIONS[i % len(QUESTIONS)]
            t0 = time.perf_counter()
            r = await answer.client.answer(q, max_tokens=48)
            timings["total"].append(time.perf_counter() - t0)
            for phase in ("retrieval", "generation", "verification"):
                timings[phase].append(r.timings[phase])
            name = {1: "answered", 2: "abstained", 3: "flagged"}.get(r.outcome, "?")
            outcomes[name] = outcomes.get(name, 0) + 1
        result["answer_latency_seconds"] = {k: {"p50": pct(v, 0.5), "p99": pct(v, 0.99)} for k, v in timings.items()}
        result["answer_outcomes"] = outcomes
    finally:
        await answer.stop()
        app.stop()
        await verification.stop()
        await retrieval.stop()
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--phase-seconds", type=float, default=40)
    parser.add_argument("--rounds", type=int, default=2, help="off/on phase pairs (alternated against drift)")
    parser.add_argument("--answers", type=int, default=40)
    parser.add_argument("--documents", type=int, default=2500, help="Wikipedia demo leads in the knowledge base")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    r = asyncio.run(run(args))
    print(f"\nGenerate, {args.clients} clients, SmolLM2 via Serve ({time.strftime('%Y-%m-%d')}):")
    print(f"  live monitoring off (baseline): {r['tokens_per_second_off']:.1f} tokens/s")
    verdict = "met" if r["change"] >= -0.05 else "MISSED"
    print(f"  live monitoring on, 10% sampled: {r['tokens_per_second_on']:.1f} tokens/s ({r['change']:+.1%}; target "
          f">= -5%: {verdict}); {r['live_answers_verified']:.0f} answers verified live, "
          f"{r['live_samples_dropped']:.0f} dropped, {r['generate_failures']} failed requests")
    print(f"Answer latency over {args.answers} calls ({r['answer_outcomes']}):")
    for phase, q in r["answer_latency_seconds"].items():
        print(f"  {phase:12s} p50 {q['p50'] * 1000:8.1f} ms   p99 {q['p99'] * 1000:8.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
