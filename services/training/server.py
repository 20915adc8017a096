"""gRPC translation for the training service: protos <-> :mod:`services.training.core`."""

from __future__ import annotations

import asyncio
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from knowserve.training.v1 import training_service_pb2 as pb
from knowserve.training.v1 import training_service_pb2_grpc as pb_grpc
from services.common.errors import Unavailable
from services.common.server import ServiceApp, ServiceBinding
from services.training.config import TrainingSettings
from services.training.convert import hyper_from_proto, hyper_to_proto, options_from_proto
from services.training.core import StartSpec, TrainingCore
from training.config import RunConfig
from training.runs import ProgressRecord, RunState

STATES = {"PENDING": pb.RUN_STATE_PENDING, "RUNNING": pb.RUN_STATE_RUNNING, "SUCCEEDED": pb.RUN_STATE_SUCCEEDED,
          "FAILED": pb.RUN_STATE_FAILED, "STOPPED": pb.RUN_STATE_STOPPED}


def _ts(iso: str) -> Timestamp:
    t = Timestamp()
    if iso:
        t.FromDatetime(datetime.fromisoformat(iso))
    return t


def run_to_proto(st: RunState, cfg: RunConfig) -> pb.Run:
    h = cfg.resolved_hyperparameters()
    return pb.Run(run_id=st.run_id, state=STATES.get(st.state, pb.RUN_STATE_UNSPECIFIED), recipe=cfg.recipe,
                  dataset=cfg.dataset, model=cfg.model, step=st.step, weight_version=st.weight_version,
                  checkpoint_dir=st.checkpoint_dir, error=st.error, create_time=_ts(st.create_time),
                  update_time=_ts(st.update_time), algorithm=cfg.algorithm, max_steps=st.max_steps,
                  hyperparameters=hyper_to_proto(h, cfg.algorithm_spec().hyperparameters))


def progress_to_proto(run_id: str, r: ProgressRecord, st: RunState) -> pb.StreamRunProgressResponse:
    return pb.StreamRunProgressResponse(
        run_id=run_id, step=r.step, max_steps=r.max_steps, reward_mean=r.reward_mean,
        reward_components=r.reward_components, kl=r.kl, refusal_rate=r.refusal_rate, weight_version=r.weight_version,
        state=STATES.get(st.state, pb.RUN_STATE_UNSPECIFIED), step_seconds=r.step_seconds, message=r.message,
        algorithm=r.algorithm, loss=r.loss, reward_std=r.reward_std, frac_reward_zero_std=r.frac_reward_zero_std,
        logprob_abs_diff_mean=r.logprob_abs_diff_mean, importance_ratio_min=r.importance_ratio_min,
        importance_ratio_max=r.importance_ratio_max, metrics=r.metrics, events=r.events)


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    def __init__(self, app: "TrainingApp"):
        self.app = app

    async def StartRun(self, request: pb.StartRunRequest, context) -> pb.StartRunResponse:
        spec = StartSpec(request.run_id, request.recipe, request.dataset, request.model,
                         hyper_from_proto(request.hyperparameters), request.resume, options_from_proto(request.options),
                         request.algorithm)
        st, cfg = await asyncio.to_thread(self.app.require_core().start, spec)
        return pb.StartRunResponse(run=run_to_proto(st, cfg))

    async def GetRun(self, request: pb.GetRunRequest, context) -> pb.GetRunResponse:
        st, cfg = await asyncio.to_thread(self.app.require_core().state, request.run_id)
        return pb.GetRunResponse(run=run_to_proto(st, cfg))

    async def StopRun(self, request: pb.StopRunRequest, context) -> pb.StopRunResponse:
        st, cfg = await asyncio.to_thread(self.app.require_core().stop, request.run_id)
        return pb.StopRunResponse(run=run_to_proto(st, cfg))

    async def ListRuns(self, request: pb.ListRunsRequest, context) -> pb.ListRunsResponse:
        runs = await asyncio.to_thread(self.app.require_core().list, request.page_size)
        return pb.ListRunsResponse(runs=[run_to_proto(st, cfg) for st, cfg in runs])

    async def StreamRunProgress(self, request: pb.StreamRunProgressRequest, context):
        core = self.app.require_core()
        async for r, st in core.follow(request.run_id, self.app.settings.max_progress_poll_seconds):
            yield progress_to_proto(request.run_id, r, st)


class TrainingApp(ServiceApp):
    """The training service: run folder ready and metrics collector registered, then SERVING."""

    def __init__(self, settings: TrainingSettings):
        self.settings = settings
        self.core: TrainingCore | None = None
        self._collector = None
        self.bindings = [ServiceBinding(pb.DESCRIPTOR.services_by_name["TrainingService"].full_name,
                                        pb_grpc.add_TrainingServiceServicer_to_server, TrainingServicer(self))]

    def require_core(self) -> TrainingCore:
        if self.core is None:
            raise Unavailable("training is starting (health is NOT_SERVING)")
        return self.core

    def _states(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for st, _ in self.core.list() if self.core else []:
            counts[st.state] = counts.get(st.state, 0) + 1
        return counts

    async def startup(self) -> None:
        from prometheus_client import REGISTRY

        from services.training.metrics import TrainingCollector

        self.core = await asyncio.to_thread(TrainingCore, self.settings)
        self._collector = TrainingCollector(self.settings.runs_dir, self.settings.eval_dir, self._states)
        try:
            REGISTRY.register(self._collector)
        except ValueError:  # a second app in one process (tests): the first collector already exports these
            self._collector = None

    async def shutdown(self) -> None:
        from prometheus_client import REGISTRY

        if self.core is not None:
            await asyncio.to_thread(self.core.shutdown)
        if self._collector is not None:
            REGISTRY.unregister(self._collector)
