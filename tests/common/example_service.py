"""An example service built on the shared runtime, used by the runtime tests.

It implements ``knowserve.retrieval.v1.RetrievalService/Search`` over a tiny in-memory list so the
tests exercise the real server factory, interceptor, health, reflection, auth, TLS and drain.
Special queries drive the tests: ``sleep:<seconds>`` waits, ``boom`` raises an unexpected error.

Run as a process (SIGTERM drain test): ``KNOWSERVE_EXAMPLE_PORT=50070 python -m tests.common.example_service``
"""

from __future__ import annotations

import asyncio
import sys

from pydantic_settings import SettingsConfigDict

from knowserve.common.v1 import common_pb2
from knowserve.retrieval.v1 import retrieval_service_pb2 as pb
from knowserve.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from knowserve.training.v1 import training_service_pb2 as tpb
from knowserve.training.v1 import training_service_pb2_grpc as tpb_grpc
from services.common.errors import NotFound, check_range, check_text
from services.common.server import ServiceApp, ServiceBinding, run_main
from services.common.settings import ServiceSettings

FACTS = ["Ada Lovelace wrote the first published algorithm.", "Paris is the capital of France."]


class ExampleSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="KNOWSERVE_EXAMPLE_")
    service_name = "example"
    max_top_k: int = 10


class ExampleServicer(pb_grpc.RetrievalServiceServicer):
    def __init__(self, settings: ExampleSettings):
        self.settings = settings

    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        check_range("top_k", request.top_k, low=1, high=self.settings.max_top_k)
        out = pb.SearchResponse()
        for i, query in enumerate(request.queries):
            check_text(f"queries[{i}]", query, max_bytes=1024)
            if query.startswith("sleep:"):
                await asyncio.sleep(float(query.split(":", 1)[1]))
            if query == "boom":
                raise RuntimeError("secret internal detail")
            words = set(query.lower().split())
            hits = [f for f in FACTS if words & set(f.lower().rstrip(".").split())][: request.top_k]
            out.results.add(query=query, passages=[common_pb2.Passage(id=str(j), text=t) for j, t in enumerate(hits)])
        return out


class ExampleStreamer(tpb_grpc.TrainingServiceServicer):
    """A server-streaming RPC for the runtime's stream path: ``run_id`` "steps:N" streams N steps then ends;
    "fail-after:N" streams N steps then raises NotFound; anything else is NotFound at once."""

    async def StreamRunProgress(self, request, context):
        kind, _, n = request.run_id.partition(":")
        if kind not in ("steps", "fail-after"):
            raise NotFound(f"run {request.run_id!r} does not exist")
        for step in range(1, int(n) + 1):
            yield tpb.StreamRunProgressResponse(run_id=request.run_id, step=step, max_steps=int(n))
        if kind == "fail-after":
            raise NotFound(f"run {request.run_id!r} was deleted mid-stream")


class ExampleApp(ServiceApp):
    def __init__(self, settings: ExampleSettings):
        self.bindings = [
            ServiceBinding(
                pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name,
                pb_grpc.add_RetrievalServiceServicer_to_server,
                ExampleServicer(settings),
            ),
            ServiceBinding(
                tpb.DESCRIPTOR.services_by_name["TrainingService"].full_name,
                tpb_grpc.add_TrainingServiceServicer_to_server,
                ExampleStreamer(),
            ),
        ]


if __name__ == "__main__":
    sys.exit(run_main(ExampleSettings(), ExampleApp))
