"""Weight swaps and rollbacks of the served models: the control plane, apart from the replicas that serve.

A swap of model M (``UpdateWeights``) or a rollback (``RollbackWeights``):

1. **vet**: one replica of M loads the checkpoint beside its serving weights and runs a smoke generation
   (:meth:`~services.generation.replica.ModelReplica.prepare_weights`); a checkpoint that is missing, outside the
   checkpoint root, corrupt or of another architecture is refused with the cause and nothing changes;
2. **redeploy**: M's ``user_config`` — a new swap number, the version and checkpoint, ``vetted``, the kept versions —
   is written through Serve's REST API with every other deployment's config as deployed, so Serve runs
   ``reconfigure()`` on M's live replicas in place (all at once) and on nothing else;
3. **ack** once Serve reports the application RUNNING with that config: every replica of M swapped.

Versions of a model only go up on publish (above its highest published version); a rollback serves a kept
version again, so the serving version may go down, and the next publish is still above the highest. The last
``KEPT_VERSIONS`` versions of each model are kept (the serving one included); their checkpoint folders are what
publishers must not prune.

A swap may ask for a **hallucination gate** (:mod:`.gate`): the controller then watches the new version's live
figures and rolls it back by itself when it is worse than the version it replaced. A later swap or rollback of the
same model supersedes a pending gate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from services.common.errors import FailedPrecondition
from services.generation import deploy
from services.generation.config import GenerationSettings
from services.generation.gate import PENDING, SUPERSEDED, GateSpec, GateStatus, StatsFn, run_gate

log = logging.getLogger(__name__)


@dataclass
class SwapResult:
    model: str
    version: int
    previous_version: int
    replicas: int
    seconds: float
    gate: GateStatus | None = None


def kept_after(kept: list[dict], new: dict, keep: int) -> list[dict]:
    """The kept versions after publishing ``new``: the last ``keep``, oldest first, one entry per version.

    >>> v = lambda n: {"version": n, "checkpoint_uri": f"/c/{n}"}
    >>> [k["version"] for k in kept_after([v(1), v(2), v(3)], v(4), 3)]
    [2, 3, 4]
    """
    rest = [k for k in kept if int(k["version"]) != int(new["version"])]
    return (rest + [new])[-keep:]


class WeightController:
    """Swaps and rollbacks for every served model (one at a time per model)."""

    def __init__(self, settings: GenerationSettings, handles: dict, on_swap=None, stats: StatsFn | None = None,
                 on_gate=None):
        self.settings = settings
        self.handles = handles  # model -> its deployment handle
        self.locks = {name: asyncio.Lock() for name in handles}
        self.on_swap = on_swap  # (model, result) -> None: the swaps metric
        self.stats = stats  # live figures of a version (the answer service); None: gates are refused
        self.on_gate = on_gate  # (GateStatus) -> None: the gate decisions metric
        self.gates: dict[str, GateStatus] = {}  # model -> its latest gate
        self._gate_tasks: dict[str, asyncio.Task] = {}

    def _count(self, model: str, result: str) -> None:
        if self.on_swap is not None:
            self.on_swap(model, result)

    async def update(self, model: str, checkpoint_uri: str, version: int, gate: GateSpec | None = None) -> SwapResult:
        """Publish ``checkpoint_uri`` as ``version`` of ``model`` (see the module docstring); with ``gate``, watch
        the new version's live hallucination rate and roll back by itself if it is worse."""
        if gate is not None and self.stats is None:
            raise FailedPrecondition("a hallucination gate needs the answer service's live figures: set "
                                     "KNOWSERVE_GENERATION_ANSWER_TARGET (and a LIVE_SAMPLE_RATE above 0)")
        try:
            async with self.locks[model]:
                self._supersede(model, f"v{version} was published before the gate decided")
                result = await self._swap(model, checkpoint_uri, version, rollback=False)
        except Exception:
            self._count(model, "failed")
            raise
        if gate is not None:
            result.gate = self._start_gate(model, version, result.previous_version, gate)
        return result

    async def rollback(self, model: str, version: int, result: str = "rollback") -> SwapResult:
        """Serve the kept ``version`` of ``model`` again (``result`` labels the swaps metric)."""
        try:
            async with self.locks[model]:
                if result == "rollback":
                    self._supersede(model, f"a rollback to v{version} was asked for before the gate decided")
                state = await self.handles[model].state.remote()
                kept = {int(k["version"]): k for k in state.kept}
                if version not in kept:
                    raise FailedPrecondition(f"version {version} of model {model!r} is not kept; kept versions: "
                                             f"{sorted(kept)} (KNOWSERVE_GENERATION_KEPT_VERSIONS="
                                             f"{self.settings.kept_versions})")
                return await self._swap(model, kept[version]["checkpoint_uri"], version, rollback=True, state=state,
                                        result=result)
        except Exception:
            self._count(model, "failed")
            raise

    def _supersede(self, model: str, why: str) -> None:
        task, status = self._gate_tasks.pop(model, None), self.gates.get(model)
        if task is not None and not task.done():
            task.cancel()
            if status is not None and status.state == PENDING:
                status.state, status.message, status.decide_time = SUPERSEDED, f"superseded: {why}", time.time()
                log.info("gate %s v%d %s", model, status.version, status.message)
                if self.on_gate is not None:
                    self.on_gate(status)

    def _start_gate(self, model: str, version: int, previous: int, spec: GateSpec) -> GateStatus:
        status = GateStatus(model, version, previous, spec)
        self.gates[model] = status
        undo = lambda: self.rollback(model, previous, result="rolled_back")  # noqa: E731
        self._gate_tasks[model] = asyncio.get_running_loop().create_task(
            run_gate(status, self.stats, undo, self.settings.gate_poll_seconds, self.on_gate))
        log.info("gate %s v%d: watching live traffic (%d verified answers needed per version, margin %.0f%%, "
                 "alpha %g, window %.0f s)", model, version, spec.min_answers, 100 * spec.margin, spec.alpha,
                 spec.window_seconds)
        return status

    def gate_spec(self, min_answers: int = 0, margin: float | None = None, alpha: float = 0.0,
                  window_seconds: float = 0.0) -> GateSpec:
        """A gate's spec: the request's values, the settings' defaults where unset (ValueError names a bad one)."""
        s = self.settings
        return GateSpec(min_answers or s.gate_min_answers, s.gate_margin if margin is None else margin,
                        alpha or s.gate_alpha, window_seconds or s.gate_window_seconds)

    async def _swap(self, model: str, checkpoint_uri: str, version: int, rollback: bool, state=None,
                    result: str = "") -> SwapResult:
        s, handle = self.settings, self.handles[model]
        start = time.perf_counter()
        # read what Serve has deployed while a replica vets the checkpoint: a bad one never reaches the others
        reading = asyncio.ensure_future(asyncio.to_thread(deploy.deployed_state, s))
        try:
            state = state or await handle.state.remote()
            if not rollback and version <= state.latest_version:
                raise FailedPrecondition(f"version {version} is not newer than model {model!r}'s latest published "
                                         f"version {state.latest_version} (serving {state.weight_version}); "
                                         "versions are monotonic")
            vetted = await handle.prepare_weights.remote(checkpoint_uri, version, rollback)
        except BaseException:
            await asyncio.gather(reading, return_exceptions=True)  # the vetting error is the answer
            raise
        deployed = await reading
        current = deployed.user_configs.get(model) or {}
        entry = {"version": version, "checkpoint_uri": vetted["checkpoint_uri"], "time": time.time()}
        user_config = {
            "swap": int(current.get("swap", 0)) + 1, "version": version, "checkpoint_uri": vetted["checkpoint_uri"],
            "vetted": True, "latest_version": max(version, state.latest_version),
            "kept": state.kept if rollback else kept_after(state.kept, entry, s.kept_versions)}
        checked = time.perf_counter()
        try:
            await asyncio.to_thread(deploy.redeploy_user_config, s, model, user_config, deployed)
        except BaseException:
            await handle.drop_prepared.remote()
            raise
        seconds = time.perf_counter() - start
        log.info("%s %s: %s -> %s vetted in %.3f s, every replica swapped %.3f s later",
                 "RollbackWeights" if rollback else "UpdateWeights", model, state.weight_version, version,
                 checked - start, seconds - (checked - start))
        self._count(model, result or ("rollback" if rollback else "ok"))
        return SwapResult(model, version, state.weight_version, s.model(model).replicas, seconds)
