"""Typed async client of the answer service (the CLI's ``knowserve ask``, the generation service's live sampler
and its hallucination gate, the demo and tests)."""

from __future__ import annotations

from collections.abc import Sequence

from knowserve.answer.v1 import answer_service_pb2 as pb
from knowserve.answer.v1 import answer_service_pb2_grpc as pb_grpc
from services.common.clients import ClientOptions, ServiceClient

MODES = {"passages": pb.EVIDENCE_MODE_PASSAGES, "search_tool": pb.EVIDENCE_MODE_SEARCH_TOOL}


def outcome_name(outcome: int) -> str:
    """'answered', 'abstained' or 'flagged'."""
    return pb.Outcome.Name(outcome).removeprefix("OUTCOME_").lower()


def verdict_name(verdict: int) -> str:
    """'supported', 'refuted' or 'not_enough_info'."""
    return pb.Verdict.Name(verdict).removeprefix("VERDICT_").lower()


class AnswerClient(ServiceClient[pb_grpc.AnswerServiceStub]):
    """``await AnswerClient("127.0.0.1:50056").answer("Who wrote Hamlet?")``"""

    def __init__(self, target: str, options: ClientOptions | None = None):
        super().__init__("answer", target, pb_grpc.AnswerServiceStub, options)

    @staticmethod
    def request(question: str, conversation: Sequence[dict] = (), top_k: int = 0,
                support_threshold: float | None = None, mode: str = "passages", model: str = "",
                max_tokens: int = 0) -> pb.AnswerRequest:
        r = pb.AnswerRequest(question=question, top_k=top_k, evidence_mode=MODES[mode], model=model,
                             max_tokens=max_tokens,
                             conversation=[pb.Turn(role=t["role"], content=t["content"]) for t in conversation])
        if support_threshold is not None:
            r.support_threshold = support_threshold
        return r

    async def answer(self, question: str, *, conversation: Sequence[dict] = (), top_k: int = 0,
                     support_threshold: float | None = None, mode: str = "passages", model: str = "",
                     max_tokens: int = 0, timeout: float | None = None) -> pb.AnswerResponse:
        return await self.call("Answer", self.request(question, conversation, top_k, support_threshold, mode, model,
                                                      max_tokens), timeout=timeout)

    async def answer_stream(self, question: str, *, conversation: Sequence[dict] = (), top_k: int = 0,
                            support_threshold: float | None = None, model: str = "", max_tokens: int = 0,
                            timeout: float | None = None):
        """Text deltas, then one message whose ``result`` holds the verdicts and the outcome."""
        request = pb.AnswerStreamRequest(request=self.request(question, conversation, top_k, support_threshold,
                                                              "passages", model, max_tokens))
        async for chunk in self.stream("AnswerStream", request, timeout=timeout):
            yield chunk

    async def observe(self, model: str, weight_version: int, prompt: str, completion: str,
                      timeout: float | None = None) -> bool:
        reply = await self.call("ObserveGeneration", pb.ObserveGenerationRequest(
            model=model, weight_version=weight_version, prompt=prompt, completion=completion), timeout=timeout)
        return reply.queued

    async def live_stats(self, model: str, weight_version: int, last: int = 0) -> pb.GetLiveStatsResponse:
        return await self.call("GetLiveStats", pb.GetLiveStatsRequest(model=model, weight_version=weight_version,
                                                                      last=last))
