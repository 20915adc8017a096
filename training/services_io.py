"""The trainer's side of the services: GRPO rollouts from the generation service and weight publishing into it.

TRL calls its ``rollout_func`` and callbacks synchronously; the gRPC clients are asyncio. Every call runs on one
private event loop in a background thread (:class:`BackgroundLoop`), where the channels live.

A service that is down (killed, restarting) does not end the run: calls retry on UNAVAILABLE for
``retry_seconds`` before the step fails, so a restarted service is waited for and no step is lost or counted twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.clients import ClientOptions

log = logging.getLogger("knowserve.training")


class BackgroundLoop:
    """An asyncio loop in a daemon thread; ``run(coro)`` blocks until the coroutine finishes there."""

    def __init__(self, name: str = "knowserve-training-io"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def make(self, factory):
        """Build an object on the loop (gRPC aio channels bind to the loop they are created on)."""
        async def build():
            return factory()

        return self.run(build())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


def retrying_options(retry_seconds: float, call_timeout: float) -> ClientOptions:
    """Client options that keep retrying UNAVAILABLE for about ``retry_seconds`` (backoff capped at 2 s)."""
    return ClientOptions(timeout_seconds=call_timeout, retries=max(1, int(retry_seconds / 2)),
                         backoff_initial_seconds=0.2, backoff_max_seconds=2.0)


def group_runs(prompts: Sequence[Any]) -> list[tuple[Any, int]]:
    """Consecutive equal prompts as (prompt, count): TRL hands a rollout function each prompt once per sample.

    >>> group_runs(["a", "a", "b", "b"]), group_runs([[{"role": "user", "content": "x"}]] * 2)
    ([('a', 2), ('b', 2)], [([{'role': 'user', 'content': 'x'}], 2)])
    """
    runs: list[tuple[Any, int]] = []
    last = object()
    for p in prompts:
        key = json.dumps(p, sort_keys=True) if not isinstance(p, str) else p
        if runs and key == last:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
        last = key
    return runs


@dataclass
class RolloutStats:
    """What the last rollout batch looked like (read by the progress reporter)."""

    weight_versions: list[int] = field(default_factory=list)
    tool_turns: list[int] = field(default_factory=list)
    seconds: float = 0.0


class ServiceRollout:
    """TRL ``rollout_func``: sample each prompt's group from the generation service in one Generate call.

    Returns token ids, per-token logprobs, the env mask (0 for documents the service inserted, so they are left
    out of the loss) and the weight version that produced each completion.
    """

    def __init__(self, io: BackgroundLoop, generation_target: str, *, app_name: str, model: str, temperature: float,
                 max_tokens: int, tool_protocol: str = "", max_tool_turns: int = 0, retrieval_top_k: int = 0,
                 retry_seconds: float = 600.0, call_timeout: float = 600.0):
        from services.generation.client import GenerationClient

        self.io = io
        self.client = io.make(lambda: GenerationClient(generation_target, retrying_options(retry_seconds, call_timeout),
                                                       app_name, model, internal=True))
        self.temperature, self.max_tokens = temperature, max_tokens
        self.tool_protocol, self.max_tool_turns, self.retrieval_top_k = tool_protocol, max_tool_turns, retrieval_top_k
        self.last = RolloutStats()

    def generate(self, prompts: Sequence[Any], n: int):
        # unseeded: the engine batches only samples with equal sampling parameters, and a per-sample seed would
        # split every group into 1-sample engine calls
        return self.io.run(self.client.generate(
            list(prompts), temperature=self.temperature, max_tokens=self.max_tokens, n=n, return_logprobs=True,
            tool_protocol=self.tool_protocol, max_tool_turns=self.max_tool_turns, retrieval_top_k=self.retrieval_top_k))

    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        start = time.perf_counter()
        runs = group_runs(prompts)
        sizes = {count for _, count in runs}
        if len(runs) == len(prompts):  # each prompt once: the function owes num_generations samples per prompt
            n = trainer.num_generations
        elif len(sizes) == 1:
            n = sizes.pop()
        else:
            raise ValueError(f"rollout batch has uneven prompt groups {sorted(sizes)}")
        reply = self.generate([p for p, _ in runs], n)
        comps = sorted(reply.completions, key=lambda c: (c.prompt_index, c.sample_index))
        out = {"prompt_ids": [list(c.prompt_token_ids) for c in comps],
               "completion_ids": [list(c.token_ids) for c in comps],
               "logprobs": [list(c.logprobs) for c in comps],
               "env_mask": [list(c.env_mask) for c in comps],
               "weight_version": [int(c.weight_version) for c in comps]}
        self.last = RolloutStats(out["weight_version"], [c.tool_turns for c in comps], time.perf_counter() - start)
        return out

    def close(self) -> None:
        self.io.run(self.client.close())


@dataclass
class PublishResult:
    ok: bool
    version: int
    checkpoint: str
    seconds: float
    error: str = ""


class WeightPublisher:
    """Save the policy as an HF folder under the generation service's checkpoint root and hot-swap it into the
    served model ``model``.

    Versions are that model's latest published version + 1 at publish time (monotonic even across runs, restarts
    and rollbacks). A failed swap is returned, not raised: training goes on and reports it. Old step folders are
    pruned down to ``keep``, except those the generation service still keeps for rollback (GetModelInfo's
    kept_versions) and the one serving.
    """

    def __init__(self, io: BackgroundLoop, generation_target: str, checkpoint_dir: Path, *, app_name: str,
                 model: str = "", label: str = "", keep: int = 2, retry_seconds: float = 600.0, gate=None):
        from services.generation.client import GenerationClient

        self.io = io
        self.client = io.make(lambda: GenerationClient(generation_target, retrying_options(retry_seconds, 900.0),
                                                       app_name, model))
        self.checkpoint_dir = checkpoint_dir
        self.label = label or checkpoint_dir.name
        self.keep = keep
        self.history: list[PublishResult] = []
        self.gate = gate  # training.config.PublishGate: publish with a hallucination gate
        self._gates_reported: set[tuple[int, int]] = set()  # (version, state) already reported

    def serving(self):
        return self.io.run(self.client.model_info())

    def publish(self, model, tokenizer, step: int) -> PublishResult:
        start = time.perf_counter()
        folder = self.checkpoint_dir / f"step-{step:06d}"
        info = None
        try:
            info = self.serving()
            version = max(int(info.weight_version), int(info.latest_version)) + 1
            save_policy(model, tokenizer, folder, {"name": f"{self.label} step {step}", "step": step,
                                                   "run": self.label, "base": info.model_name})
            reply = self.io.run(self.client.update_weights(str(folder.resolve()), version, gate=self._gate_proto()))
            result = PublishResult(True, int(reply.version), str(folder), time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - a failed swap is reported; the run goes on
            result = PublishResult(False, 0, str(folder), time.perf_counter() - start, f"{type(e).__name__}: {e}")
            log.error("publishing step %s failed: %s", step, result.error)
        self.history.append(result)
        self._prune()
        return result

    def _gate_proto(self):
        if self.gate is None:
            return None
        from knowserve.generation.v1 import generation_service_pb2 as gpb

        g = gpb.HallucinationGate(min_answers=self.gate.min_answers, alpha=self.gate.alpha,
                                  window_seconds=self.gate.window_seconds)
        if self.gate.margin is not None:
            g.margin = self.gate.margin
        return g

    def gate_events(self) -> list[str]:
        """New decisions of the hallucination gate on versions this run published ("" each, once)."""
        if self.gate is None or not self.history:
            return []
        from knowserve.generation.v1 import generation_service_pb2 as gpb

        try:
            info = self.serving()
        except Exception as e:  # noqa: BLE001 - not knowing now is not an event; asked again next step
            log.info("gate status unknown: %s", e)
            return []
        if not info.HasField("gate"):
            return []
        g = info.gate
        ours = {r.version for r in self.history if r.ok}
        key = (int(g.version), int(g.state))
        if g.version not in ours or g.state == gpb.GATE_STATE_PENDING or key in self._gates_reported:
            return []
        self._gates_reported.add(key)
        state = gpb.GateState.Name(g.state).removeprefix("GATE_STATE_").lower()
        return [f"gate {state} v{g.version}: {g.message}"]

    def _prune(self) -> None:
        published = sorted(p for p in self.checkpoint_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        keep = {Path(r.checkpoint).resolve() for r in self.history[-1:] if r.ok}
        try:  # generation's kept versions are rollback targets: never delete them
            info = self.serving()
            keep |= {Path(k.checkpoint_uri).resolve() for k in info.kept_versions}
            keep.add(Path(info.checkpoint_uri).resolve())
        except Exception as e:  # noqa: BLE001 - unknown: prune nothing this time
            log.warning("not pruning published checkpoints: generation did not say what it keeps (%s)", e)
            return
        for old in published[: -self.keep]:
            if old.resolve() not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        self.io.run(self.client.close())


def save_policy(model, tokenizer, folder: Path, meta: dict | None = None) -> Path:
    """An HF folder of the policy's current weights (LoRA adapters merged into a copy), written atomically (a
    temporary folder renamed into place: a reader never sees half a checkpoint). ``meta`` goes to
    ``knowserve_checkpoint.json`` (its ``name`` is what GetModelInfo reports as the model's name)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    target = model
    if hasattr(model, "merge_and_unload"):  # peft: merge a copy; the trained adapters stay as they are
        import copy

        target = copy.deepcopy(model).merge_and_unload()
    target.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if meta:
        (tmp / "knowserve_checkpoint.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
