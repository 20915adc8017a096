"""One replica of one named model (a Ray Serve deployment per model): its engine, weight slot and
:class:`~services.generation.core.GenerationCore`. No protos here: the ingress (:mod:`.server`) translates, and
calls these methods through the model's deployment handle with domain objects.

**Weights** live in the deployment's ``user_config`` (``{"swap", "version", "checkpoint_uri", "vetted", "kept"}``,
written by :mod:`.controller`). A new ``swap`` number makes :meth:`ModelReplica.reconfigure` load the checkpoint beside
the serving one (transformers) or reload it in place after the in-flight requests finish (vLLM), and swap it in;
the version may go down (a rollback). :meth:`ModelReplica.prepare_weights` is the vetting a swap starts with: one
replica loads and smoke-tests the checkpoint and keeps it for its own reconfigure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class ModelState:
    """What a replica serves (GetModelInfo / ListModels)."""

    model: str
    model_name: str  # what the checkpoint is (its knowserve_checkpoint.json name, config name, or folder)
    architecture: str
    engine: str
    weight_version: int
    checkpoint_uri: str
    max_model_len: int
    parameters: int
    end_of_sequence_tokens: list[str]
    kept: list[dict] = field(default_factory=list)  # [{"version", "checkpoint_uri", "time"}], oldest first
    latest_version: int = 0


def log_to_replica_log(level: str) -> None:
    """Send this package's log records to the replica's Serve log (``ray.serve``'s handlers), where Serve puts
    a replica's own lines; otherwise they would go nowhere inside a replica."""
    serve_logger = logging.getLogger("ray.serve")
    ours = logging.getLogger("services")
    for handler in serve_logger.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.setLevel(level.upper())
    ours.propagate = False


def checkpoint_name(path: str) -> str:
    """A checkpoint's human name: ``knowserve_checkpoint.json``'s ``name`` (written by publishers), else the
    config's ``_name_or_path`` when it names a model, else the folder name."""
    import json
    from pathlib import Path

    folder = Path(path)
    try:
        return str(json.loads((folder / "knowserve_checkpoint.json").read_text())["name"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        named = str(json.loads((folder / "config.json").read_text()).get("_name_or_path") or "")
    except (OSError, ValueError):
        named = ""
    return Path(named).name if named and not Path(named).is_dir() else folder.name


class ModelReplica:
    """A Serve replica of model ``model`` (see the module docstring)."""

    def __init__(self, settings: dict[str, Any], model: str):
        import torch

        from services.common.models import resolve_model_path
        from services.generation import metrics as m
        from services.generation.config import GenerationSettings
        from services.generation.core import GenerationCore, Weights, WeightSlot
        from services.retrieval.client import RetrievalClient

        self.settings = s = GenerationSettings(**settings)
        self.spec = spec = s.model(model)
        self.model = model
        log_to_replica_log(s.log_level)
        torch.set_num_threads(spec.threads)
        path = str(resolve_model_path(spec.path))
        self.slot = WeightSlot(Weights(self._load(path), spec.initial_version, path), self._load, s.checkpoint_root)
        m.WEIGHT_VERSION.labels(model).set(spec.initial_version)
        self.retrieval = RetrievalClient(s.retrieval_target, s.client_options("retrieval", timeout_seconds=60))

        async def search(queries, top_k):
            return await self.retrieval.search(queries, top_k=top_k)

        self.core = GenerationCore(self.slot, s.limits(), search)
        self.swap = 0  # the user_config swap number this replica has applied
        self.kept = [{"version": spec.initial_version, "checkpoint_uri": path, "time": time.time()}]
        self.latest_version = spec.initial_version
        self.prepared: dict[tuple[str, int], Any] = {}  # vetted by prepare_weights on this replica

    def _load(self, path: str, like=None):
        """An engine for ``path``; ``like`` is the serving engine (its tokenizer is reused when unchanged)."""
        from services.generation import metrics as m
        from services.generation.engine import BatchingEngine, TransformersEngine

        s, spec = self.settings, self.spec
        if spec.engine == "vllm":
            from services.generation.vllm_engine import VllmEngine

            extra = {"kv_cache_memory_bytes": int(s.vllm_kv_cache_gib * 2**30)} if s.vllm_kv_cache_gib else {}
            return VllmEngine(path, spec.max_model_len, dtype="float32" if spec.device == "cpu" else "bfloat16",
                              **extra)  # continuous batching inside: no BatchingEngine in front
        engine = TransformersEngine.from_path(path, spec.max_model_len, spec.device, like=like)
        return BatchingEngine(engine, s.max_batch, s.batch_wait_seconds, observe=m.BATCH.labels(self.model).observe,
                              wait_fraction=s.batch_wait_fraction)

    # -- weights: vetting (one replica) and the swap (every replica, through user_config)
    async def prepare_weights(self, checkpoint_uri: str, version: int, rollback: bool = False) -> dict:
        """Vet a checkpoint: load it beside the serving weights and smoke-test it (raises a domain error, serving
        unchanged, when it is unusable); this replica keeps it for its reconfigure."""
        weights = await asyncio.to_thread(self.slot.prepare, checkpoint_uri, version, True, rollback)
        self.prepared = {(weights.checkpoint_uri, version): weights}
        return {"checkpoint_uri": weights.checkpoint_uri, "architecture": getattr(weights.engine, "architecture", "")}

    def drop_prepared(self) -> None:
        """Forget a vetted checkpoint whose swap did not happen."""
        self.prepared.clear()

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this on every live replica when the model's ``user_config`` changes: apply a new swap."""
        from services.generation import metrics as m

        swap = int(user_config.get("swap", 0))
        self.kept = list(user_config.get("kept") or self.kept)
        self.latest_version = max(int(user_config.get("latest_version", 0)), self.latest_version)
        if swap <= self.swap or not user_config.get("checkpoint_uri"):
            return
        start = time.perf_counter()
        version, uri = int(user_config["version"]), str(user_config["checkpoint_uri"])
        rollback = version <= self.slot.current.version
        try:
            weights = self.prepared.pop((uri, version), None)
            if weights is None:  # vetted on another replica: skip the smoke generation
                weights = await asyncio.to_thread(self.slot.prepare, uri, version, not user_config.get("vetted"),
                                                  rollback)
            previous = await asyncio.to_thread(self.slot.commit, weights, rollback)
            self.swap = swap
            log.info("%s: weights %s -> %s (%s) in %.3f s", self.model, previous.version, version, uri,
                     time.perf_counter() - start)
            m.WEIGHT_VERSION.labels(self.model).set(version)
        except Exception as e:  # noqa: BLE001 - keep serving the old weights; the controller vetted this checkpoint
            log.error("%s: weight swap to version %s failed, still serving %s: %s", self.model, version,
                      self.slot.current.version, e)
        finally:
            self.prepared.clear()

    # -- requests
    async def generate(self, prompts, params):
        from services.generation import metrics as m

        completions = await self.core.generate(prompts, params)
        for c in completions:
            m.TOKENS.labels(self.model, "model").inc(c.completion_tokens)
            m.TOKENS.labels(self.model, "tool").inc(c.tool_tokens)
            m.TOOL_TURNS.labels(self.model).observe(c.tool_turns)
        return completions

    async def stream(self, prompt, params):
        from services.generation import metrics as m

        start, first = time.perf_counter(), True
        async for delta in self.core.stream(prompt, params):
            if first and delta.token_ids:
                m.TTFT.labels(self.model).observe(time.perf_counter() - start)
                first = False
            m.TOKENS.labels(self.model, "model").inc(len(delta.token_ids))
            yield delta

    async def state(self) -> ModelState:
        w = self.slot.current
        engine = w.engine
        return ModelState(
            model=self.model, model_name=checkpoint_name(w.checkpoint_uri), architecture=engine.architecture,
            engine=engine.name, weight_version=w.version, checkpoint_uri=w.checkpoint_uri,
            max_model_len=engine.max_model_len, parameters=engine.parameters,
            end_of_sequence_tokens=[engine.decode([t]) for t in sorted(engine.end_ids)], kept=list(self.kept),
            latest_version=self.latest_version)
