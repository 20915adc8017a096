"""Typed async client of the training service."""

from __future__ import annotations

from collections.abc import AsyncIterator

from knowserve.training.v1 import training_service_pb2 as pb
from knowserve.training.v1 import training_service_pb2_grpc as pb_grpc
from services.common.clients import ClientOptions, ServiceClient


class TrainingClient(ServiceClient[pb_grpc.TrainingServiceStub]):
    """``await TrainingClient("127.0.0.1:50055").start_run("knowrl", "demo_world", model=path)``"""

    def __init__(self, target: str, options: ClientOptions | None = None):
        super().__init__("training", target, pb_grpc.TrainingServiceStub, options)

    async def start_run(self, recipe: str = "", dataset: str = "", *, model: str = "", run_id: str = "",
                        hyperparameters: pb.Hyperparameters | None = None, options: pb.RunOptions | None = None,
                        resume: bool = False, algorithm: str = "") -> pb.Run:
        reply = await self.call("StartRun", pb.StartRunRequest(
            run_id=run_id, recipe=recipe, dataset=dataset, model=model, resume=resume, algorithm=algorithm,
            hyperparameters=hyperparameters or pb.Hyperparameters(), options=options or pb.RunOptions()))
        return reply.run

    async def start_run_config(self, cfg, *, model: str = "", run_id: str = "", resume: bool = False) -> pb.Run:
        """StartRun from a :class:`training.config.RunConfig` (a ``knowserve train`` YAML): its hyperparameters and
        run options; the service fills in its own targets and folders."""
        from services.training.convert import hyper_to_proto, options_to_proto

        return await self.start_run(cfg.recipe, cfg.dataset, model=model or cfg.model, run_id=run_id or cfg.run_id,
                                    hyperparameters=hyper_to_proto(cfg.hyperparameters),
                                    options=options_to_proto(cfg), resume=resume, algorithm=cfg.algorithm)

    async def get_run(self, run_id: str) -> pb.Run:
        return (await self.call("GetRun", pb.GetRunRequest(run_id=run_id))).run

    async def stop_run(self, run_id: str) -> pb.Run:
        return (await self.call("StopRun", pb.StopRunRequest(run_id=run_id))).run

    async def list_runs(self, page_size: int = 0) -> list[pb.Run]:
        return list((await self.call("ListRuns", pb.ListRunsRequest(page_size=page_size))).runs)

    async def stream_progress(self, run_id: str) -> AsyncIterator[pb.StreamRunProgressResponse]:
        async for msg in self.stream("StreamRunProgress", pb.StreamRunProgressRequest(run_id=run_id)):
            yield msg
