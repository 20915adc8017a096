"""Soak: N minutes of mixed concurrent traffic on the secured local stack, one service killed and restarted midway.

    python benchmarks/soak.py [--minutes 10] [--kill retrieval] [--no-secure] [--json benchmarks/results/soak/soak.json]

The stack is `knowserve up --auth --tls` (generation plaintext with its token: Serve's proxy has no TLS) in a
temporary run dir on its own ports: retrieval (BM25 over 2,000 demo-corpus leads), verification (the default
`feature` judge, trained at its start), reward, generation (one tiny Llama, built here) and training. Traffic, each
kind in its own thread(s): Search (2), UpsertDocuments of new documents (1; every acknowledged id is recorded),
Verify with retrieved evidence (1), Score under `knowrl` (1), Generate (1), and a GRPO run on the tiny model through
the training service publishing a swap every step. At the half, ``--kill`` is `kill -9`ed and `knowserve up` brings
it back. Printed and written: requests and errors by code per RPC, p50/p99 latency, errors outside the restart
window, RSS per service (first sample after the warm-up vs the last), swaps published, and acknowledged writes not
searchable at the end. Targets: 0 lost, 0 INTERNAL/UNKNOWN, errors only inside the restart window, RSS growth ≤ 10%
after warm-up. A plot of latency and RSS over time goes beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from knowserve.common.v1 import common_pb2 as cpb  # noqa: E402
from knowserve.generation.v1 import generation_service_pb2 as gpb  # noqa: E402
from knowserve.generation.v1 import generation_service_pb2_grpc as gpb_grpc  # noqa: E402
from knowserve.retrieval.v1 import retrieval_service_pb2 as rpb  # noqa: E402
from knowserve.retrieval.v1 import retrieval_service_pb2_grpc as rpb_grpc  # noqa: E402
from knowserve.reward.v1 import reward_service_pb2 as wpb  # noqa: E402
from knowserve.reward.v1 import reward_service_pb2_grpc as wpb_grpc  # noqa: E402
from knowserve.training.v1 import training_service_pb2 as tpb  # noqa: E402
from knowserve.training.v1 import training_service_pb2_grpc as tpb_grpc  # noqa: E402
from knowserve.verification.v1 import verification_service_pb2 as vpb  # noqa: E402
from knowserve.verification.v1 import verification_service_pb2_grpc as vpb_grpc  # noqa: E402
from services.common.addresses import GENERATION_APP  # noqa: E402
from services.common.procs import free_port, rss_bytes, serve_pids  # noqa: E402
from services.stack import isolated_env  # noqa: E402

SERVICES = ("retrieval", "verification", "reward", "generation", "training")
FORBIDDEN = {"INTERNAL", "UNKNOWN"}


def log_line(text: str) -> str:
    return f"[{time.strftime('%H:%M:%S')}] {text}"


class Stack:
    """The secured local stack in a temporary run dir, driven through the `knowserve` CLI."""

    def __init__(self, run: Path, secure: bool):
        from services.common.models import tiny_lm_folder

        self.run, self.secure = run, secure
        self.ports = {name: free_port() for name in SERVICES}
        model = tiny_lm_folder(ROOT / ".cache/models")
        self.model = str(model)
        env = isolated_env(run, self.ports, RETRIEVAL_DENSE="false", RETRIEVAL_DEFAULT_MODE="bm25",
                           GENERATION_MODELS=json.dumps([{"name": "tiny", "path": self.model, "replicas": 1,
                                                          "replica_num_cpus": 0.5}]),
                           GENERATION_HTTP_PORT=str(free_port()), GENERATION_DASHBOARD_PORT=str(free_port()),
                           GENERATION_LIVE_SAMPLE_RATE="0", GENERATION_ANSWER_TARGET="",
                           TRAINING_DEFAULT_MODEL=self.model, TRAINING_TRAINER_THREADS="1")
        self.env = env

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=self.env,
                             capture_output=True, text=True, timeout=900)
        if check and out.returncode:
            raise RuntimeError(f"knowserve {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out

    def up(self, services: str) -> None:
        self.cli("up", "--services", services, "--timeout", "600", *(["--auth", "--tls"] if self.secure else []))

    def state(self) -> dict:
        return json.loads((self.run / "stack.json").read_text())

    def pids(self, name: str) -> list[int]:
        if name == "trainer":  # the GRPO run's own process (the training service starts one per run)
            try:
                pid = json.loads((self.run / "runs" / "soak" / "state.json").read_text()).get("pid", 0)
            except (OSError, ValueError):
                return []
            return [pid] if pid else []
        pid = self.state()[name]["pid"]
        if name != "generation":
            return [pid]
        return [pid, *serve_pids(pid)]  # and its Ray head's Serve proxy and replicas

    def rss(self, name: str) -> int:
        return sum(rss_bytes(pid) for pid in self.pids(name))

    def channel(self, name: str) -> grpc.Channel:
        target = f"127.0.0.1:{self.ports[name]}"
        if not self.secure or name == "generation":
            return grpc.insecure_channel(target)
        sec = self.run / "security"
        creds = grpc.ssl_channel_credentials((sec / "ca.pem").read_bytes(), (sec / "node-key.pem").read_bytes(),
                                             (sec / "node.pem").read_bytes())
        return grpc.secure_channel(target, creds)

    def metadata(self, name: str) -> tuple:
        md = (("application", GENERATION_APP),) if name == "generation" else ()
        if self.secure:
            md += (("authorization", f"Bearer {(self.run / 'security' / 'token').read_text().strip()}"),)
        return md


class Recorder:
    """(time, rpc, code, seconds) of every call, thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls: list[tuple[float, str, str, float]] = []

    def call(self, rpc: str, fn):
        start = time.monotonic()
        try:
            out = fn()
            code = "OK"
        except grpc.RpcError as e:
            out, code = None, e.code().name
        with self.lock:
            self.calls.append((start, rpc, code, time.monotonic() - start))
        if code != "OK":
            time.sleep(0.25)  # as a client with backoff would, instead of a busy loop of refusals
        return out


def traffic(stack: Stack, rec: Recorder, stop: threading.Event, leads: list[dict], acked: list[str]) -> list:
    """Start the traffic threads; returns them."""
    rng = random.Random(0)

    def loop(service: str, stub_cls, body, pause: float = 0.0):
        def run():
            ch = stack.channel(service)
            stub = stub_cls(ch)
            while not stop.is_set():
                body(stub, stack.metadata(service))
                if pause:
                    stop.wait(pause)
            ch.close()
        return run

    def search(stub, md):
        q = rng.choice(leads)["title"]
        rec.call("Search", lambda: stub.Search(rpb.SearchRequest(queries=[q], top_k=3), timeout=10, metadata=md))

    counter = iter(range(10**9))

    def upsert(stub, md):
        n = next(counter)
        doc = cpb.Document(id=f"soak-{n}", title=f"Soak {n}", text=f"soaktoken{n} is a note written by the soak.",
                           source="soak")
        if rec.call("UpsertDocuments", lambda: stub.UpsertDocuments(
                rpb.UpsertDocumentsRequest(documents=[doc]), timeout=10, metadata=md)) is not None:
            acked.append(doc.id)

    def verify(stub, md):
        lead = rng.choice(leads)
        claim = lead["text"].split(". ")[0][:300] + "."
        rec.call("Verify", lambda: stub.Verify(vpb.VerifyRequest(items=[vpb.VerifyItem(
            answer=claim, topic=lead["title"])]), timeout=30, metadata=md))

    def score(stub, md):
        lead = rng.choice(leads)
        rec.call("Score", lambda: stub.Score(wpb.ScoreRequest(recipe="knowrl", items=[wpb.ScoreItem(
            prompt=f"What is {lead['title']}?", completion=f"<think>{lead['text'][:200]}</think><answer>"
            f"{lead['title']}</answer>", gold_answers=[lead["title"]])]), timeout=30, metadata=md))

    def generate(stub, md):
        rec.call("Generate", lambda: stub.Generate(gpb.GenerateRequest(
            prompts=[gpb.Prompt(text=f"Tell me about {rng.choice(leads)['title']}.")],
            sampling=gpb.SamplingParams(max_tokens=16)), timeout=30, metadata=md))

    threads = [threading.Thread(target=loop("retrieval", rpb_grpc.RetrievalServiceStub, search), daemon=True)
               for _ in range(2)]
    threads += [threading.Thread(target=loop(s, c, b, p), daemon=True) for s, c, b, p in (
        ("retrieval", rpb_grpc.RetrievalServiceStub, upsert, 0.05),
        ("verification", vpb_grpc.VerificationServiceStub, verify, 0.0),
        ("reward", wpb_grpc.RewardServiceStub, score, 0.0),
        ("generation", gpb_grpc.GenerationServiceStub, generate, 0.0))]
    for t in threads:
        t.start()
    return threads


def serving(stack: Stack, name: str) -> bool:
    try:
        with stack.channel(name) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3,
                                                         metadata=stack.metadata(name) or None)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of ``values``.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 99)
    (2.0, 4.0)
    """
    s = sorted(values)
    return s[min(len(s) - 1, max(0, -(-len(s) * q // 100) - 1))] if s else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill", default="retrieval", choices=SERVICES, help="killed (-9) and restarted midway")
    parser.add_argument("--no-secure", action="store_true", help="plain stack (no --auth --tls)")
    parser.add_argument("--leads", type=int, default=2000)
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the run before RSS is compared")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/soak/soak.json")
    args = parser.parse_args()

    from services.retrieval.demo_corpus import build_wiki_corpus

    corpus = ROOT / ".knowserve/data/wiki.jsonl"
    if not corpus.exists():
        build_wiki_corpus(corpus)
    leads = [json.loads(line) for line in corpus.read_text().splitlines()[: args.leads]]
    run = Path(tempfile.mkdtemp(prefix="knowserve-soak-")) / "run"
    stack = Stack(run, secure=not args.no_secure)
    try:
        soak(stack, run, leads, args)
    finally:
        stack.cli("down", check=False)


def soak(stack: Stack, run: Path, leads: list[dict], args) -> None:
    started = time.monotonic()
    print(log_line(f"starting the stack in {run} (secure={stack.secure}; the feature judge trains at its start)"))
    stack.up(",".join(SERVICES))
    subset = run / "leads.jsonl"
    subset.write_text("".join(json.dumps(d) + "\n" for d in leads))
    stack.cli("ingest", str(subset), "--target", f"localhost:{stack.ports['retrieval']}")
    print(log_line(f"stack up and {len(leads)} leads ingested in {time.monotonic() - started:.0f} s"))

    rec, stop, acked = Recorder(), threading.Event(), []
    with stack.channel("training") as ch:  # the GRPO run: rollouts through generation, rewards through reward
        run_pb = tpb_grpc.TrainingServiceStub(ch).StartRun(tpb.StartRunRequest(
            recipe="knowrl", dataset="halueval_qa", model=stack.model, run_id="soak",
            hyperparameters=tpb.Hyperparameters(max_steps=500, group_size=4, batch_size=8, sync_every=1,
                                                max_completion_tokens=16, learning_rate=5e-4, seed=1),
            options=tpb.RunOptions(checkpoint_every=5, dataset_limit=400)),
            timeout=120, metadata=stack.metadata("training")).run
    threads = traffic(stack, rec, stop, leads, acked)
    t0 = time.monotonic()
    duration = args.minutes * 60
    rss: dict[str, list[tuple[float, int]]] = defaultdict(list)
    window: list[float] = []
    killed = False
    while (now := time.monotonic() - t0) < duration:
        for name in (*SERVICES, "trainer"):
            rss[name].append((now, stack.rss(name)))
        if not killed and now >= duration / 2:
            pid = stack.state()[args.kill]["pid"]
            print(log_line(f"kill -9 {args.kill} (pid {pid}) at {now:.0f} s"))
            window.append(now)
            os.kill(pid, signal.SIGKILL)
            stack.up(args.kill)
            while not serving(stack, args.kill):
                time.sleep(0.5)
            window.append(time.monotonic() - t0)
            print(log_line(f"{args.kill} back SERVING after {window[1] - window[0]:.1f} s"))
            killed = True
        done = len(rec.calls)
        print(log_line(f"{now:.0f}/{duration:.0f} s: {done} calls ({done / max(now, 1):.0f}/s), "
                       f"ETA {duration - now:.0f} s"))
        time.sleep(10)
    stop.set()
    for t in threads:
        t.join(60)
    with stack.channel("training") as ch:
        stub = tpb_grpc.TrainingServiceStub(ch)
        final = stub.GetRun(tpb.GetRunRequest(run_id=run_pb.run_id), timeout=30,
                            metadata=stack.metadata("training")).run
        stub.StopRun(tpb.StopRunRequest(run_id=run_pb.run_id), timeout=60, metadata=stack.metadata("training"))
        progress = []
        try:  # the records so far (the stream ends when the stopped run does)
            for record in stub.StreamRunProgress(tpb.StreamRunProgressRequest(run_id=run_pb.run_id), timeout=120,
                                                 metadata=stack.metadata("training")):
                progress.append(record)
        except grpc.RpcError as e:
            print(log_line(f"progress stream: {e.code().name} {e.details()}"))

    # every acknowledged upsert searchable
    lost = []
    with stack.channel("retrieval") as ch:
        stub = rpb_grpc.RetrievalServiceStub(ch)
        ids = list(acked)
        for i in range(0, len(ids), 200):
            chunk = ids[i: i + 200]
            reply = stub.Search(rpb.SearchRequest(queries=[f"soaktoken{d[5:]}" for d in chunk], top_k=1,
                                                  mode=rpb.SEARCH_MODE_BM25), timeout=60,
                                metadata=stack.metadata("retrieval"))
            lost += [d for d, r in zip(chunk, reply.results) if not r.passages or r.passages[0].document_id != d]

    report = summarise(rec, rss, window, args, lost, len(acked), final, progress, duration)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    plot(rec, rss, window, args.json.with_suffix(".png"))
    print_report(report)


def summarise(rec, rss, window, args, lost, acked, final, progress, duration) -> dict:
    grace = 5.0  # calls that started just before the kill may fail just after it
    lo, hi = (window[0] - grace, window[1] + grace) if len(window) == 2 else (float("inf"), float("-inf"))
    t_first = min(t for t, *_ in rec.calls)
    per = {}
    for rpc in sorted({c[1] for c in rec.calls}):
        calls = [c for c in rec.calls if c[1] == rpc]
        codes = Counter(c[2] for c in calls)
        outside = Counter(c[2] for c in calls if c[2] != "OK" and not lo <= c[0] - t_first <= hi)
        ok = [c[3] for c in calls if c[2] == "OK"]
        per[rpc] = {"requests": len(calls), "codes": dict(codes), "errors_outside_restart": dict(outside),
                    "p50_ms": round(percentile(ok, 50) * 1000, 1), "p99_ms": round(percentile(ok, 99) * 1000, 1)}
    memory = {}
    for name, samples in rss.items():
        after = [(t, b) for t, b in samples if t >= duration * args.warmup and b > 0]
        if name == args.kill:  # compared from its restart on
            after = [(t, b) for t, b in after if t > window[1] + duration * 0.1] if len(window) == 2 else after
        if len(after) >= 2:
            memory[name] = {"rss_mib_first": round(after[0][1] / 2**20), "rss_mib_last": round(after[-1][1] / 2**20),
                            "growth": round(after[-1][1] / after[0][1] - 1, 4)}
    swaps = sum("published" in r.message for r in progress)
    return {"minutes": args.minutes, "killed": args.kill, "restart_window_s": [round(w, 1) for w in window],
            "secure": not args.no_secure, "rpcs": per, "rss": memory, "acknowledged_writes": acked,
            "lost_acknowledged_writes": len(lost), "lost_examples": lost[:10],
            "grpo": {"state": tpb.RunState.Name(final.state), "step": final.step,
                     "weight_version": final.weight_version,
                     "swaps_published": swaps, "error": final.error},
            "forbidden_codes": sum(n for r in per.values() for c, n in r["codes"].items() if c in FORBIDDEN)}


def print_report(r: dict) -> None:
    print(f"\nsoak: {r['minutes']:g} min, {r['killed']} killed at {r['restart_window_s'][0]:.0f} s and SERVING "
          f"again at {r['restart_window_s'][1]:.0f} s (secure={r['secure']})")
    print(f"{'rpc':18s} {'requests':>9s} {'p50 ms':>8s} {'p99 ms':>8s}  codes / errors outside the restart window")
    for rpc, x in r["rpcs"].items():
        print(f"{rpc:18s} {x['requests']:9d} {x['p50_ms']:8.1f} {x['p99_ms']:8.1f}  {x['codes']} / "
              f"{x['errors_outside_restart'] or 'none'}")
    for name, m in r["rss"].items():
        print(f"RSS {name:13s} {m['rss_mib_first']:6d} -> {m['rss_mib_last']:6d} MiB ({m['growth']:+.1%})")
    g = r["grpo"]
    print(f"GRPO run: {g['state']} at step {g['step']}, weight version {g['weight_version']}, swaps published "
          f"{g['swaps_published']}{'; ' + g['error'] if g['error'] else ''}")
    print(f"acknowledged writes {r['acknowledged_writes']}, lost {r['lost_acknowledged_writes']} (target 0); "
          f"INTERNAL/UNKNOWN {r['forbidden_codes']} (target 0)")
    outside = sum(sum(x["errors_outside_restart"].values()) for x in r["rpcs"].values())
    growth = max((m["growth"] for m in r["rss"].values()), default=0.0)
    print(f"targets: lost 0 {'met' if not r['lost_acknowledged_writes'] else 'MISSED'}; INTERNAL/UNKNOWN 0 "
          f"{'met' if not r['forbidden_codes'] else 'MISSED'}; errors only in the restart window "
          f"{'met' if not outside else f'MISSED ({outside})'}; RSS growth <= 10% "
          f"{'met' if growth <= 0.10 else f'MISSED (max {growth:+.1%})'}")


def plot(rec, rss, window, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_first = min(t for t, *_ in rec.calls)
    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for rpc in sorted({c[1] for c in rec.calls}):
        pts = [(c[0] - t_first, c[3] * 1000) for c in rec.calls if c[1] == rpc and c[2] == "OK"]
        a.scatter([p[0] for p in pts], [p[1] for p in pts], s=2, label=rpc)
        errs = [c[0] - t_first for c in rec.calls if c[1] == rpc and c[2] != "OK"]
        a.scatter(errs, [1.0] * len(errs), marker="x", s=12, color="red")
    a.set_yscale("log")
    a.set_ylabel("latency (ms, log); x = error")
    a.legend(markerscale=4, fontsize=8, ncol=3)
    for name, samples in rss.items():
        b.plot([t for t, _ in samples], [v / 2**20 for _, v in samples], label=name)
    b.set_ylabel("resident memory (MiB)")
    b.set_xlabel("seconds into the soak")
    b.legend(fontsize=8)
    for ax in (a, b):
        if len(window) == 2:
            ax.axvspan(window[0], window[1], color="grey", alpha=0.3)
    a.set_title("Soak: latency per call and memory per service (grey: the killed service's restart)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
