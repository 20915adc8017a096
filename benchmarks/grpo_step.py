"""Wall time per GRPO step through the services vs TRL's GRPOTrainer generating in-process, same run.

Both arms train the same model with the same group size, batch, completion length, temperature and reward
recipe (KnowRL, scored by the same reward service), for the same number of steps:

* **services**: ``training.loop.run_training`` — rollouts from the generation service (Ray Serve), rewards from
  the reward service, the new weights published into generation (save + UpdateWeights hot-swap) after every step;
  the trainer uses ``--trainer-threads`` and generation its own Serve replica.
* **in-process** (baseline): TRL ``GRPOTrainer`` without a ``rollout_func`` — it samples with ``model.generate``
  inside the trainer (no publishing needed), given all the machine's threads (``--baseline-threads``).

Target (issue #7): services <= 1.3x the in-process step time. The services arm also reports the split of a
step into rollout / reward / publish / optimizer (the rest).

Needs the local stack (``make demo`` leaves it running, serving the demo world model):

    .venv/bin/python benchmarks/grpo_step.py --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from services.common.addresses import default_target  # noqa: E402


def services_arm(args, model: Path, workdir: Path) -> list[dict]:
    from training.config import RunConfig
    from training.loop import run_training
    from training.runs import prepare_run

    cfg = RunConfig(run_id="bench-services", recipe="knowrl", dataset=args.dataset, model=str(model),
                    tool_protocol="", generation_target=args.generation, reward_target=args.reward,
                    checkpoint_root=str(args.checkpoint_root), runs_dir=str(workdir / "runs"),
                    checkpoint_every=10_000, threads=args.trainer_threads,
                    hyperparameters=dict(max_steps=args.steps, group_size=args.group_size, batch_size=args.batch_size,
                                         max_completion_tokens=args.max_tokens, temperature=1.0, learning_rate=1e-4,
                                         sync_every=1, seed=0))
    run = prepare_run(cfg)
    st = run_training(run.root, progress_bar=True)
    if st.state != "SUCCEEDED":
        raise SystemExit(f"services arm failed: {st.error}")
    return run.progress()


def inprocess_arm(args, model: Path, workdir: Path) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from services.reward.trl_adapter import KnowserveRewards
    from training.data import load_dataset
    from training.demo_model import prompt_for, uses_demo_prompt

    torch.set_num_threads(args.baseline_threads)
    rows = load_dataset(args.dataset)
    demo = uses_demo_prompt(model)
    data = Dataset.from_list([{"prompt": prompt_for(r.question) if demo else
                               [{"role": "user", "content": r.question}],
                               "gold_answers": r.gold_answers} for r in rows])
    rewards = KnowserveRewards("knowrl", target=args.reward)
    funcs, weights = rewards.trl_reward_funcs()
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    cfg = GRPOConfig(output_dir=str(workdir / "inprocess"), use_cpu=True, bf16=False,
                     per_device_train_batch_size=args.batch_size, num_generations=args.group_size,
                     max_completion_length=args.max_tokens, max_steps=args.steps, learning_rate=1e-4,
                     temperature=1.0, reward_weights=weights, logging_steps=1, report_to=[], save_strategy="no",
                     seed=0, disable_tqdm=False, lr_scheduler_type="constant")
    trainer = GRPOTrainer(model=str(model), reward_funcs=funcs, args=cfg, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(model), callbacks=[Timer()])
    trainer.train()
    rewards.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_dir = Path(os.environ.get("KNOWSERVE_RUN_DIR", ROOT / ".knowserve"))
    parser.add_argument("--model", type=Path, default=run_dir / "models/demo-world")
    parser.add_argument("--dataset", default="demo_world")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--trainer-threads", type=int, default=1)
    parser.add_argument("--baseline-threads", type=int, default=2)
    parser.add_argument("--generation", default=default_target("generation"))
    parser.add_argument("--reward", default=default_target("reward"))
    parser.add_argument("--checkpoint-root", type=Path, default=run_dir / "checkpoints")
    parser.add_argument("--out", type=Path, default=run_dir / "benchmarks/grpo_step.json")
    args = parser.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if not (args.model / "config.json").exists():
        raise SystemExit(f"no model at {args.model}: run `make demo` first (it builds the demo world model)")
    workdir = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    # the services arm publishes into generation: start from a copy under its checkpoint root
    start = args.checkpoint_root / "bench-services" / "start"
    shutil.rmtree(start, ignore_errors=True)
    shutil.copytree(args.model, start)
    try:
        records = services_arm(args, start, workdir)
        baseline = inprocess_arm(args, args.model, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    keep = slice(args.warmup, None)
    med = lambda xs: statistics.median(xs[keep])  # noqa: E731
    services = [r["step_seconds"] for r in records]
    split = {k: med([r[k] for r in records]) for k in ("rollout_seconds", "reward_seconds", "publish_seconds")}
    split["optimizer_and_rest_seconds"] = med(services) - sum(split.values())
    result = {"steps": args.steps, "warmup": args.warmup, "group_size": args.group_size,
              "batch_size": args.batch_size, "max_completion_tokens": args.max_tokens, "model": str(args.model),
              "services_step_seconds": med(services), "inprocess_step_seconds": med(baseline),
              "ratio": med(services) / med(baseline), "target_ratio": 1.3, "services_split": split,
              "services_all": services, "inprocess_all": baseline}
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_all")}, indent=1))
    verdict = "meets" if result["ratio"] <= 1.3 else "misses"
    print(f"GRPO step: services {result['services_step_seconds']:.2f}s vs in-process TRL "
          f"{result['inprocess_step_seconds']:.2f}s = {result['ratio']:.2f}x ({verdict} the <= 1.3x target); split: "
          + ", ".join(f"{k.removesuffix('_seconds')} {v:.2f}s" for k, v in split.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
