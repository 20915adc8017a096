"""The generation service's ingress behind Serve's gRPC proxy: protos <-> domain, and routing to the named model.

Serve routes each gRPC method to the ingress method of the same name (``Generate``, ``GenerateStream``,
``GetModelInfo``, ``ListModels``, ``UpdateWeights``, ``RollbackWeights``, and ``Check`` for
``grpc.health.v1.Health``). The ingress translates the request, forwards it to the named model's deployment
handle (:class:`~services.generation.replica.ModelReplica`) or to the weight controller
(:mod:`.controller`), and translates the answer back. Errors map to status codes with the shared
:func:`~services.common.status.status_of` (Serve's proxy has no interceptor) and every call is counted and timed
with the shared :class:`~services.common.status.CallRecord`. The OpenAI-compatible HTTP routes
(:mod:`.openai_api`) are mounted on the same ingress.

User completions (requests not marked ``internal``) are sampled for live hallucination monitoring
(:mod:`.live`) after they are answered; a swap that asks for a hallucination gate is watched by :mod:`.gate`.
"""

from __future__ import annotations

import logging
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from knowserve.generation.v1 import generation_service_pb2 as pb
from services.common import auth
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.server import check_parsed
from services.common.status import CallRecord, status_of
from services.generation.client import FINISH_REASONS

log = logging.getLogger(__name__)


def prompts_from_proto(prompts) -> list:
    from services.generation.core import Prompt

    out = []
    for i, p in enumerate(prompts):
        kind = p.WhichOneof("input")
        if kind == "chat":
            out.append(Prompt(messages=[{"role": m.role, "content": m.content} for m in p.chat.messages]))
        elif kind == "text":
            out.append(Prompt(text=p.text))
        else:
            raise InvalidArgument(f"prompts[{i}]", "set text or chat")
    return out


def params_from_proto(sampling: pb.SamplingParams, return_logprobs: bool, tool_protocol: int = 0,
                      max_tool_turns: int = 0, retrieval_top_k: int = 0):
    from services.common.tools import from_enum_name
    from services.generation.core import GenerateParams

    s = sampling
    try:
        protocol = from_enum_name(pb.ToolProtocol.Name(tool_protocol))
    except ValueError:
        raise InvalidArgument("tool_protocol", f"unknown tool protocol enum value {tool_protocol}") from None
    return GenerateParams(
        temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k, max_tokens=s.max_tokens, n=s.n or 1,
        stop=tuple(s.stop), seed=s.seed if s.HasField("seed") else None, return_logprobs=return_logprobs,
        tool_protocol=protocol, max_tool_turns=max_tool_turns, retrieval_top_k=retrieval_top_k)


def completion_to_proto(c) -> pb.Completion:
    return pb.Completion(
        prompt_index=c.prompt_index, sample_index=c.sample_index, text=c.text, token_ids=c.token_ids,
        logprobs=c.logprobs, env_mask=c.env_mask, finish_reason=FINISH_REASONS[c.finish_reason],
        usage=pb.Usage(prompt_tokens=len(c.prompt_token_ids), completion_tokens=c.completion_tokens,
                       tool_tokens=c.tool_tokens),
        weight_version=c.weight_version, tool_turns=c.tool_turns, prompt_token_ids=c.prompt_token_ids)


_GATE_STATES = {"pending": pb.GATE_STATE_PENDING, "kept": pb.GATE_STATE_KEPT, "rolled_back": pb.GATE_STATE_ROLLED_BACK,
                "inconclusive": pb.GATE_STATE_INCONCLUSIVE, "superseded": pb.GATE_STATE_SUPERSEDED}


def _timestamp(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def gate_to_proto(g) -> pb.GateStatus:
    out = pb.GateStatus(state=_GATE_STATES[g.state], version=g.version, previous_version=g.previous_version,
                        answers=g.answers, unsupported_answers=g.unsupported, previous_answers=g.previous_answers,
                        previous_unsupported_answers=g.previous_unsupported, p_value=g.p_value, message=g.message,
                        start_time=_timestamp(g.start_time))
    if g.decide_time:
        out.decide_time.CopyFrom(_timestamp(g.decide_time))
    return out


def state_to_proto(st, replicas: int, max_tokens_limit: int, default: bool) -> pb.GetModelInfoResponse:
    kept = []
    for k in st.kept:
        t = Timestamp()
        t.FromSeconds(int(k.get("time", 0)))
        kept.append(pb.KeptVersion(version=int(k["version"]), checkpoint_uri=str(k["checkpoint_uri"]), publish_time=t))
    return pb.GetModelInfoResponse(
        model=st.model, model_name=st.model_name, architecture=st.architecture, engine=st.engine,
        weight_version=st.weight_version, checkpoint_uri=st.checkpoint_uri, max_model_len=st.max_model_len,
        max_tokens_limit=max_tokens_limit, replicas=replicas, end_of_sequence_tokens=st.end_of_sequence_tokens,
        parameters=st.parameters, latest_version=st.latest_version, kept_versions=kept, is_default=default)


class GenerationIngress:
    """The ingress deployment: every gRPC method (and, with :mod:`.openai_api`, the HTTP routes)."""

    def __init__(self, settings: dict[str, Any], models: dict):
        from services.generation import metrics as m
        from services.generation.config import GenerationSettings
        from services.generation.controller import WeightController
        from services.generation.replica import log_to_replica_log

        self.settings = s = GenerationSettings(**settings)
        log_to_replica_log(s.log_level)
        self.models = models  # name -> deployment handle, in the configured order
        self.default_model = s.resolved_default_model()
        self.replicas = {m_.name: m_.replicas for m_ in s.resolved_models()}
        from services.generation.live import LiveSampler

        self.live = LiveSampler(s.answer_target, s.live_sample_rate, s.live_max_in_flight,
                                options=s.client_options("answer", timeout_seconds=5.0, retries=0))
        self.controller = WeightController(
            s, models, on_swap=lambda model, r: m.SWAPS.labels(model, r).inc(),
            stats=self.live.stats if self.live.enabled else None,
            on_gate=lambda g: m.GATE_DECISIONS.labels(g.model, g.state).inc())
        self._ready: set[str] = set()  # models that have answered (health)
        self.token = s.resolved_auth_token()  # every RPC but health (and the HTTP routes) requires it

    def _admit(self, grpc_context, request) -> None:
        """Checks every call passes before any model work: the bearer token, then a request that parsed."""
        if self.token is not None:
            auth.require(grpc_context.invocation_metadata() if grpc_context is not None else None, self.token)
        check_parsed(request, self.settings.max_request_elements)

    # -- shared
    def resolve(self, model: str) -> tuple[str, Any]:
        """(name, handle) of the named model ('' = the default); NOT_FOUND listing the served ones."""
        name = model or self.default_model
        if name not in self.models:
            raise NotFound(f"model {name!r} is not served; served models: {list(self.models)}")
        return name, self.models[name]

    def _record(self, method: str, model: str) -> CallRecord:
        """A call record labelled by the served model it names (unknown names: "unknown", so a caller cannot
        grow the label set)."""
        from services.generation import metrics as m

        label = (model or self.default_model) if (model or self.default_model) in self.models else "unknown"
        return CallRecord(m.REQUESTS, m.REQUEST_SECONDS, method=method, model=label)

    @staticmethod
    def _fail(grpc_context, exc: BaseException, empty, record: CallRecord):
        record.code, details = status_of(exc)
        if grpc_context is not None:
            grpc_context.set_code(record.code)
            grpc_context.set_details(details)
        return empty

    async def model_info(self, model: str) -> pb.GetModelInfoResponse:
        name, handle = self.resolve(model)
        st = await handle.state.remote()
        info = state_to_proto(st, self.replicas[name], self.settings.max_tokens_limit, name == self.default_model)
        if name in self.controller.gates:
            info.gate.CopyFrom(gate_to_proto(self.controller.gates[name]))
        return info

    # -- RPCs
    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateResponse:
        model = getattr(request, "model", "")
        with self._record("Generate", model) as record:
            try:
                self._admit(grpc_context, request)
                name, handle = self.resolve(request.model)
                prompts = prompts_from_proto(request.prompts)
                params = params_from_proto(request.sampling, request.return_logprobs, request.tool_protocol,
                                           request.max_tool_turns, request.retrieval_top_k)
                completions = await handle.generate.remote(prompts, params)
            except Exception as e:  # noqa: BLE001 - mapped to a status code
                return self._fail(grpc_context, e, pb.GenerateResponse(), record)
        self.live.sample(name, prompts, completions, internal=request.internal)
        usage = pb.Usage(prompt_tokens=sum(len(c.prompt_token_ids) for c in completions),
                         completion_tokens=sum(c.completion_tokens for c in completions),
                         tool_tokens=sum(c.tool_tokens for c in completions))
        return pb.GenerateResponse(completions=[completion_to_proto(c) for c in completions], usage=usage,
                                   weight_version=completions[0].weight_version if completions else 0, model=name)

    async def GenerateStream(self, request: pb.GenerateStreamRequest, grpc_context=None):
        """Token deltas of one sample as they are produced (no tool protocol on the stream)."""
        with self._record("GenerateStream", getattr(request, "model", "")) as record:
            try:
                self._admit(grpc_context, request)
                name, handle = self.resolve(request.model)
                prompt = prompts_from_proto([request.prompt])[0]
                params = params_from_proto(request.sampling, request.return_logprobs)
                parts, version = [], 0
                async for delta in handle.options(stream=True).stream.remote(prompt, params):
                    parts.append(delta.text)
                    version = delta.weight_version or version
                    yield pb.GenerateStreamResponse(
                        text_delta=delta.text, token_ids=delta.token_ids, logprobs=delta.logprobs,
                        finish_reason=FINISH_REASONS.get(delta.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                        weight_version=delta.weight_version, model=name,
                        usage=pb.Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens))
                self.live.sample_one(name, version, prompt, "".join(parts))
            except Exception as e:  # noqa: BLE001
                self._fail(grpc_context, e, None, record)
                # a stream that yields nothing never hands its context to Serve's proxy: raising with the code set
                # makes the replica wrap it (gRPCStatusError), so the client gets this code, not OK or INTERNAL
                raise

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context=None) -> pb.GetModelInfoResponse:
        with self._record("GetModelInfo", getattr(request, "model", "")) as record:
            try:
                self._admit(grpc_context, request)
                return await self.model_info(request.model)
            except Exception as e:  # noqa: BLE001
                return self._fail(grpc_context, e, pb.GetModelInfoResponse(), record)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        with self._record("ListModels", self.default_model) as record:
            try:
                self._admit(grpc_context, request)
                names = [self.default_model] + [n for n in self.models if n != self.default_model]
                return pb.ListModelsResponse(models=[await self.model_info(n) for n in names])
            except Exception as e:  # noqa: BLE001
                return self._fail(grpc_context, e, pb.ListModelsResponse(), record)

    async def UpdateWeights(self, request: pb.UpdateWeightsRequest, grpc_context=None) -> pb.UpdateWeightsResponse:
        with self._record("UpdateWeights", getattr(request, "model", "")) as record:
            try:
                self._admit(grpc_context, request)
                name, _ = self.resolve(request.model)
                if request.transport == pb.WEIGHT_TRANSPORT_COLLECTIVE:
                    raise FailedPrecondition("WEIGHT_TRANSPORT_COLLECTIVE pushes tensors to vLLM GPU workers over "
                                             "NCCL (collective_rpc), which needs a collective group between the "
                                             "trainer and the workers: use DISK")
                gate = None
                if request.HasField("gate"):
                    g = request.gate
                    try:
                        gate = self.controller.gate_spec(g.min_answers, g.margin if g.HasField("margin") else None,
                                                         g.alpha, g.window_seconds)
                    except ValueError as e:  # "gate.<field> must be ..."
                        field, _, problem = str(e).partition(" ")
                        raise InvalidArgument(field, problem) from None
                r = await self.controller.update(name, request.checkpoint_uri, request.version, gate)
            except Exception as e:  # noqa: BLE001
                return self._fail(grpc_context, e, pb.UpdateWeightsResponse(), record)
        reply = pb.UpdateWeightsResponse(version=r.version, previous_version=r.previous_version,
                                         replicas_updated=r.replicas, swap_seconds=r.seconds)
        if r.gate is not None:
            reply.gate.CopyFrom(gate_to_proto(r.gate))
        return reply

    async def RollbackWeights(self, request: pb.RollbackWeightsRequest,
                              grpc_context=None) -> pb.RollbackWeightsResponse:
        with self._record("RollbackWeights", getattr(request, "model", "")) as record:
            try:
                self._admit(grpc_context, request)
                name, _ = self.resolve(request.model)
                r = await self.controller.rollback(name, request.version)
            except Exception as e:  # noqa: BLE001
                return self._fail(grpc_context, e, pb.RollbackWeightsResponse(), record)
        return pb.RollbackWeightsResponse(version=r.version, previous_version=r.previous_version,
                                          replicas_updated=r.replicas, swap_seconds=r.seconds)

    async def Check(self, request, grpc_context=None):
        """SERVING once every model has a replica that answers (Serve routes health to the ingress, which is up
        long before a model's replicas have loaded their weights)."""
        import asyncio

        from grpc_health.v1 import health_pb2

        waiting = [n for n in self.models if n not in self._ready]
        if waiting:
            answers = await asyncio.gather(*(asyncio.wait_for(self.models[n].state.remote(), 2.0) for n in waiting),
                                           return_exceptions=True)
            self._ready.update(n for n, a in zip(waiting, answers) if not isinstance(a, BaseException))
        ready = len(self._ready) == len(self.models)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if ready
                                              else health_pb2.HealthCheckResponse.NOT_SERVING)


def ingress_class(openai_api: bool):
    """The ingress deployment class; with ``openai_api`` the OpenAI-compatible HTTP routes are mounted on it."""
    if not openai_api:
        return GenerationIngress
    from services.generation.openai_api import with_openai_routes

    return with_openai_routes(GenerationIngress)
