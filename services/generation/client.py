"""Typed async client of the generation service (Serve's gRPC proxy; the application is named in metadata)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from knowserve.generation.v1 import generation_service_pb2 as pb
from knowserve.generation.v1 import generation_service_pb2_grpc as pb_grpc
from services.common.addresses import GENERATION_APP
from services.common.clients import ClientOptions, ServiceClient
from services.common.tools import enum_name
from services.generation.core import TOOL_TURNS
from services.generation.engine import LENGTH, STOP

# a completion's finish reason: domain name <-> the proto's FinishReason
FINISH_REASONS = {STOP: pb.FINISH_REASON_STOP, LENGTH: pb.FINISH_REASON_LENGTH, TOOL_TURNS: pb.FINISH_REASON_TOOL_TURNS}
_FINISH_NAMES = {value: name for name, value in FINISH_REASONS.items()}


def finish_name(reason: int) -> str:
    """A completion's finish reason by its domain name: ``stop`` (end of sequence or a stop string), ``length``
    (cut off by max_tokens), ``tool_turns`` (cut off by the tool protocol's turn limit); "" when unspecified.

    >>> [finish_name(r) for r in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_TOOL_TURNS, 0)]
    ['stop', 'length', 'tool_turns', '']
    """
    return _FINISH_NAMES.get(reason, "")


def prompt_to_proto(prompt: str | Sequence[dict]) -> pb.Prompt:
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    return pb.Prompt(chat=pb.ChatConversation(messages=[pb.ChatMessage(role=m["role"], content=m["content"])
                                                        for m in prompt]))


# What the LLM judge, the LLM claim extractor and the LLM grader ask of the served model: (chat prompts, max_tokens)
# -> [(text, per-token logprobs)] of greedy completions. :meth:`GenerationClient.greedy` is the implementation.
GreedyFn = Callable[[Sequence[Sequence[dict]], int], Awaitable[list[tuple[str, list[float]]]]]


class GenerationClient(ServiceClient[pb_grpc.GenerationServiceStub]):
    """``await GenerationClient("127.0.0.1:50054").generate(["What is the capital of France?"], max_tokens=32)``

    ``model`` names the served model every call uses unless a call names another ("" = the service's default).
    ``internal`` marks every Generate as internal traffic (training rollouts, evaluations, judges): the service
    never samples it for live hallucination monitoring, which watches what users are told.
    """

    def __init__(self, target: str, options: ClientOptions | None = None, app_name: str = GENERATION_APP,
                 model: str = "", internal: bool = False):
        options = options or ClientOptions()
        options.extra_metadata = tuple(options.extra_metadata) + (("application", app_name),)
        super().__init__("generation", target, pb_grpc.GenerationServiceStub, options)
        self.model = model
        self.internal = internal

    def _model(self, model: str | None) -> str:
        return self.model if model is None else model

    async def generate(self, prompts: Sequence[str | Sequence[dict]], *, temperature: float = 0.0,
                       top_p: float = 1.0, max_tokens: int = 0, n: int = 1, stop: Sequence[str] = (),
                       seed: int | None = None, return_logprobs: bool = False, tool_protocol: str = "",
                       max_tool_turns: int = 0, retrieval_top_k: int = 0, model: str | None = None,
                       timeout: float | None = None) -> pb.GenerateResponse:
        sampling = pb.SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, n=n,
                                     stop=list(stop))
        if seed is not None:
            sampling.seed = seed
        request = pb.GenerateRequest(prompts=[prompt_to_proto(p) for p in prompts], sampling=sampling,
                                     return_logprobs=return_logprobs,
                                     tool_protocol=pb.ToolProtocol.Value(enum_name(tool_protocol)),
                                     max_tool_turns=max_tool_turns, retrieval_top_k=retrieval_top_k,
                                     model=self._model(model), internal=self.internal)
        return await self.call("Generate", request, timeout=timeout)

    async def generate_stream(self, prompt: str | Sequence[dict], *, temperature: float = 0.0, max_tokens: int = 0,
                              model: str | None = None, timeout: float | None = None):
        """Token chunks of one completion (GenerateStream)."""
        request = pb.GenerateStreamRequest(prompt=prompt_to_proto(prompt), model=self._model(model),
                                           sampling=pb.SamplingParams(temperature=temperature, max_tokens=max_tokens))
        async for chunk in self.stream("GenerateStream", request, timeout=timeout):
            yield chunk

    async def greedy(self, prompts: Sequence[str | Sequence[dict]], max_tokens: int,
                     chunk: int = 64) -> list[tuple[str, list[float]]]:
        """(text, per-token logprobs) of greedy completions, ``chunk`` prompts per call (the service's default
        max_prompts): what the LLM judge, extractor and grader ask of the model."""
        out: list[tuple[str, list[float]]] = []
        for i in range(0, len(prompts), chunk):
            reply = await self.generate(prompts[i: i + chunk], temperature=0, max_tokens=max_tokens,
                                        return_logprobs=True)
            out += [(c.text, list(c.logprobs)) for c in reply.completions]
        return out

    async def model_info(self, model: str | None = None) -> pb.GetModelInfoResponse:
        return await self.call("GetModelInfo", pb.GetModelInfoRequest(model=self._model(model)))

    async def list_models(self) -> list[pb.GetModelInfoResponse]:
        return list((await self.call("ListModels", pb.ListModelsRequest())).models)

    async def update_weights(self, checkpoint_uri: str, version: int, timeout: float = 600.0,
                             model: str | None = None, gate: pb.HallucinationGate | None = None
                             ) -> pb.UpdateWeightsResponse:
        """Swap in ``checkpoint_uri`` as ``version``; with ``gate`` (``pb.HallucinationGate()`` takes the service's
        defaults) the service rolls it back by itself if its live hallucination rate is worse than the previous
        version's (follow it with :meth:`model_info`'s ``gate``)."""
        request = pb.UpdateWeightsRequest(checkpoint_uri=checkpoint_uri, version=version,
                                          transport=pb.WEIGHT_TRANSPORT_DISK, model=self._model(model))
        if gate is not None:
            request.gate.CopyFrom(gate)
        return await self.call("UpdateWeights", request, timeout=timeout)

    async def rollback_weights(self, version: int, timeout: float = 600.0,
                               model: str | None = None) -> pb.RollbackWeightsResponse:
        return await self.call("RollbackWeights", pb.RollbackWeightsRequest(version=version, model=self._model(model)),
                               timeout=timeout)
