"""The generation service as a Ray Serve deployment behind Serve's gRPC proxy: protos <-> :mod:`.core`.

Serve routes each gRPC method to the deployment method of the same name (``Generate``, ``GenerateStream``,
``GetModelInfo``, ``UpdateWeights``, and ``Check`` for ``grpc.health.v1.Health``). Domain errors become status
codes through ``grpc_context`` (Serve's proxy replaces the shared interceptor here).

**Hot swap.** Weights live in the deployment's ``user_config`` (``{"checkpoint_uri", "version"}``).
``UpdateWeights`` first loads and smoke-tests the checkpoint on the replica that received it (a bad checkpoint
is refused with FAILED_PRECONDITION and nothing changes), then redeploys the application config with the new
``user_config`` through Serve's REST API — an in-place ``reconfigure()`` on every live replica at once
(``rolling_update_percentage`` = ``rollout_fraction``), not a rolling restart — and acknowledges once Serve
reports the application RUNNING again, i.e. every replica has swapped.
Each replica loads the new weights beside the old ones and swaps in one assignment; requests already running
finish on the weights they started with, and every completion carries the version that produced it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any


from knowserve.generation.v1 import generation_service_pb2 as pb
from services.common.errors import FailedPrecondition, InvalidArgument, KnowserveError
from services.common.status import CallRecord, status_of

log = logging.getLogger(__name__)

APP_IMPORT_PATH = "services.generation.server:app_builder"
SERVICER_FUNCTIONS = [
    "knowserve.generation.v1.generation_service_pb2_grpc.add_GenerationServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "tool_turns": pb.FINISH_REASON_TOOL_TURNS}


def _fail(grpc_context, exc: Exception, empty, record: CallRecord | None = None):
    """Set a failed call's status on Serve's gRPC context (the shared mapping, :func:`status_of`)."""
    code, details = status_of(exc)
    if record is not None:
        record.code = code
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(details)
    return empty


def _timed(method: str) -> CallRecord:
    """Count and time one RPC into the generation metrics (the shared :class:`CallRecord`)."""
    from services.generation import metrics as m

    return CallRecord(m.REQUESTS, m.REQUEST_SECONDS, method=method)


def prompts_from_proto(request: pb.GenerateRequest):
    from services.generation.core import Prompt

    out = []
    for i, p in enumerate(request.prompts):
        kind = p.WhichOneof("input")
        if kind == "chat":
            out.append(Prompt(messages=[{"role": m.role, "content": m.content} for m in p.chat.messages]))
        elif kind == "text":
            out.append(Prompt(text=p.text))
        else:
            raise InvalidArgument(f"prompts[{i}]", "set text or chat")
    return out


def params_from_proto(request: pb.GenerateRequest):
    from services.generation.core import GenerateParams

    from services.common.tools import from_enum_name

    s = request.sampling
    try:
        tool_protocol = from_enum_name(pb.ToolProtocol.Name(request.tool_protocol))
    except ValueError:
        raise InvalidArgument("tool_protocol", f"unknown tool protocol enum value {request.tool_protocol}") from None
    return GenerateParams(
        temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k, max_tokens=s.max_tokens, n=s.n or 1,
        stop=tuple(s.stop), seed=s.seed if s.HasField("seed") else None, return_logprobs=request.return_logprobs,
        tool_protocol=tool_protocol, max_tool_turns=request.max_tool_turns,
        retrieval_top_k=request.retrieval_top_k)


def completion_to_proto(c) -> pb.Completion:
    return pb.Completion(
        prompt_index=c.prompt_index, sample_index=c.sample_index, text=c.text, token_ids=c.token_ids,
        logprobs=c.logprobs, env_mask=c.env_mask, finish_reason=_FINISH[c.finish_reason],
        usage=pb.Usage(prompt_tokens=len(c.prompt_token_ids), completion_tokens=c.completion_tokens,
                       tool_tokens=c.tool_tokens),
        weight_version=c.weight_version, tool_turns=c.tool_turns, prompt_token_ids=c.prompt_token_ids)


def _log_to_replica_log(level: str) -> None:
    """Send this package's log records to the replica's Serve log (``ray.serve``'s handlers), where Serve puts
    a replica's own lines; otherwise they would go nowhere inside a replica."""
    serve_logger = logging.getLogger("ray.serve")
    ours = logging.getLogger("services")
    for handler in serve_logger.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.setLevel(level.upper())
    ours.propagate = False


class GenerationDeployment:
    """One Serve replica: a :class:`GenerationCore` over a transformers engine."""

    def __init__(self, settings: dict[str, Any]):
        import torch

        from services.common.clients import ClientOptions
        from services.common.models import smollm2_folder
        from services.generation.config import GenerationSettings
        from services.generation import metrics as m
        from services.generation.core import GenerationCore, Weights, WeightSlot
        from services.generation.engine import BatchingEngine, TransformersEngine
        from services.retrieval.client import RetrievalClient

        self.settings = s = GenerationSettings(**settings)
        _log_to_replica_log(s.log_level)
        torch.set_num_threads(s.threads_per_replica)
        path = str(s.model_path or smollm2_folder())

        def load(p: str, like=None):  # like: the serving engine, whose tokenizer is reused when unchanged
            if s.engine == "vllm":  # continuous batching inside vLLM; a swap loads a second engine beside
                from services.generation.vllm_engine import VllmEngine

                return VllmEngine(p, s.max_model_len, dtype="float32" if s.device == "cpu" else "bfloat16")
            return BatchingEngine(TransformersEngine.from_path(p, s.max_model_len, s.device, like=like), s.max_batch,
                                  s.batch_wait_seconds, observe=m.BATCH.observe, wait_fraction=s.batch_wait_fraction)

        self.slot = WeightSlot(Weights(load(path), s.initial_version, path), load, s.checkpoint_root)
        m.WEIGHT_VERSION.set(s.initial_version)
        self.retrieval = RetrievalClient(s.retrieval_target, ClientOptions(timeout_seconds=60))

        async def search(queries, top_k):
            return await self.retrieval.search(queries, top_k=top_k)

        self.core = GenerationCore(self.slot, s.limits(), search)
        self.prepared: dict[int, Any] = {}  # version -> Weights loaded by UpdateWeights on this replica

    # -- hot swap: Serve calls this on every live replica when user_config changes
    async def reconfigure(self, user_config: dict) -> None:
        from services.generation import metrics as m

        start = time.perf_counter()
        version = int(user_config.get("version", 0))
        uri = str(user_config.get("checkpoint_uri", ""))
        if not uri or version <= self.slot.current.version:
            return
        try:
            vetted = bool(user_config.get("vetted"))  # smoke-tested by the replica that took UpdateWeights
            weights = self.prepared.pop(version, None) or await asyncio.to_thread(self.slot.prepare, uri, version,
                                                                                  not vetted)
            previous = self.slot.commit(weights)
            log.info("swapped weights %s -> %s (%s) in %.3f s", previous.version, version, uri,
                     time.perf_counter() - start)
            m.WEIGHT_VERSION.set(version)
            m.SWAPS.labels("ok").inc()
        except KnowserveError as e:  # keep serving the old weights; UpdateWeights already vetted this checkpoint
            m.SWAPS.labels("failed").inc()
            log.error("weight swap to version %s failed, still serving %s: %s", version, self.slot.current.version, e)

    # -- RPCs
    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateResponse:
        from services.generation import metrics as m

        with _timed("Generate") as record:
            try:
                completions = await self.core.generate(prompts_from_proto(request), params_from_proto(request))
            except Exception as e:  # noqa: BLE001 - mapped to a status code
                return _fail(grpc_context, e, pb.GenerateResponse(), record)
        for c in completions:
            m.TOKENS.labels("model").inc(c.completion_tokens)
            m.TOKENS.labels("tool").inc(c.tool_tokens)
            m.TOOL_TURNS.observe(c.tool_turns)
        usage = pb.Usage(prompt_tokens=sum(len(c.prompt_token_ids) for c in completions),
                         completion_tokens=sum(c.completion_tokens for c in completions),
                         tool_tokens=sum(c.tool_tokens for c in completions))
        return pb.GenerateResponse(completions=[completion_to_proto(c) for c in completions], usage=usage,
                                   weight_version=completions[0].weight_version if completions else 0)

    async def GenerateStream(self, request: pb.GenerateStreamRequest, grpc_context=None):
        """Token deltas of one sample as they are produced (no tool protocol on the stream)."""
        from services.generation.core import GenerateParams

        try:
            prompts = prompts_from_proto(pb.GenerateRequest(prompts=[request.prompt]))
            s = request.sampling
            params = GenerateParams(temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k,
                                    max_tokens=s.max_tokens, n=1, stop=tuple(s.stop),
                                    seed=s.seed if s.HasField("seed") else None,
                                    return_logprobs=request.return_logprobs)
            from services.generation import metrics as m

            start, first = time.perf_counter(), True
            async for delta in self.core.stream(prompts[0], params):
                if first and delta.token_ids:
                    m.TTFT.observe(time.perf_counter() - start)
                    first = False
                m.TOKENS.labels("model").inc(len(delta.token_ids))
                yield pb.GenerateStreamResponse(
                    text_delta=delta.text, token_ids=delta.token_ids, logprobs=delta.logprobs,
                    finish_reason=_FINISH.get(delta.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                    weight_version=delta.weight_version,
                    usage=pb.Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens))
        except Exception as e:  # noqa: BLE001
            _fail(grpc_context, e, None)

    async def GetModelInfo(self, request, grpc_context=None) -> pb.GetModelInfoResponse:
        w = self.slot.current
        return pb.GetModelInfoResponse(
            model_name=os.path.basename(str(self.settings.model_path or "SmolLM2-135M-Instruct")),
            architecture=getattr(w.engine, "architecture", ""), engine=w.engine.name, weight_version=w.version,
            checkpoint_uri=w.checkpoint_uri, max_model_len=w.engine.max_model_len,
            max_tokens_limit=self.settings.max_tokens_limit, replicas=self.settings.replicas,
            end_of_sequence_tokens=[w.engine.decode([t]) for t in sorted(w.engine.end_ids)])

    async def UpdateWeights(self, request: pb.UpdateWeightsRequest, grpc_context=None) -> pb.UpdateWeightsResponse:
        from services.generation import metrics as m

        start = time.perf_counter()
        try:
            if request.transport == pb.WEIGHT_TRANSPORT_COLLECTIVE:
                raise FailedPrecondition("WEIGHT_TRANSPORT_COLLECTIVE pushes tensors to vLLM GPU workers "
                                         "(collective_rpc); this replica runs the transformers engine: use DISK")
            previous = self.slot.current.version
            from services.generation.deploy import deployed_state, redeploy_weights

            # read what Serve has deployed while this replica vets the checkpoint: a bad one never reaches the
            # other replicas
            reading = asyncio.ensure_future(asyncio.to_thread(deployed_state, self.settings))
            try:
                weights = await asyncio.to_thread(self.slot.prepare, request.checkpoint_uri, request.version)
            except BaseException:
                await asyncio.gather(reading, return_exceptions=True)  # the vetting error is the answer
                raise
            deployed = await reading
            self.prepared[request.version] = weights  # reconfigure() on this replica takes it from here
            vetted = time.perf_counter()
            try:
                await asyncio.to_thread(redeploy_weights, self.settings, weights.checkpoint_uri, request.version,
                                        deployed)
            except BaseException:
                self.prepared.pop(request.version, None)
                raise
            log.info("UpdateWeights %s -> %s: vetted in %.3f s, every replica swapped %.3f s later", previous,
                     request.version, vetted - start, time.perf_counter() - vetted)
        except Exception as e:  # noqa: BLE001
            m.SWAPS.labels("failed").inc()
            return _fail(grpc_context, e, pb.UpdateWeightsResponse())
        return pb.UpdateWeightsResponse(version=request.version, previous_version=previous,
                                        replicas_updated=self.settings.replicas,
                                        swap_seconds=time.perf_counter() - start)

    async def Check(self, request, grpc_context=None):
        from grpc_health.v1 import health_pb2

        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def app_builder(args: dict[str, Any]):
    """Serve application builder (``import_path: services.generation.server:app_builder``); ``args`` are
    GenerationSettings fields."""
    from ray import serve

    from services.generation.config import GenerationSettings

    s = GenerationSettings(**args)
    deployment = serve.deployment(
        GenerationDeployment, name="GenerationDeployment", num_replicas=s.replicas,
        ray_actor_options={"num_cpus": s.replica_num_cpus, "num_gpus": s.replica_num_gpus},
        max_ongoing_requests=64, rolling_update_percentage=s.rollout_fraction)
    return deployment.bind(args)
