"""gRPC translation for the answer service: protos <-> :mod:`services.answer.core`, and the upstream clients.

Why a service of its own rather than a deployment inside the generation app: an answer composes three services
(retrieval, generation, verification) and must keep answering — marked unverified — when verification is down,
which a generation replica should not depend on; it is stateless and scales with user traffic, not with model
replicas; and it is where the live monitor lives, with ordinary (non-multiprocess) Prometheus metrics whose series
of dropped weight versions can be removed.
"""

from __future__ import annotations

import asyncio

from knowserve.answer.v1 import answer_service_pb2 as pb
from knowserve.answer.v1 import answer_service_pb2_grpc as pb_grpc
from knowserve.verification.v1 import verification_service_pb2 as vpb
from services.answer.config import AnswerSettings
from services.answer.core import (PASSAGES, SEARCH_TOOL, AnswerCore, AnswerResult, Limits, LiveMonitor,
                                  check_turns, search_instructions)
from services.common.errors import InvalidArgument, Unavailable
from services.common.server import ServiceApp, ServiceBinding
from services.retrieval.server import passage_to_proto

_OUTCOMES = {"answered": pb.OUTCOME_ANSWERED, "abstained": pb.OUTCOME_ABSTAINED, "flagged": pb.OUTCOME_FLAGGED}
_VERDICTS = {"SUPPORTED": pb.VERDICT_SUPPORTED, "REFUTED": pb.VERDICT_REFUTED,
             "NOT_ENOUGH_INFO": pb.VERDICT_NOT_ENOUGH_INFO}
_MODES = {pb.EVIDENCE_MODE_UNSPECIFIED: PASSAGES, pb.EVIDENCE_MODE_PASSAGES: PASSAGES,
          pb.EVIDENCE_MODE_SEARCH_TOOL: SEARCH_TOOL}


def result_to_proto(r: AnswerResult) -> pb.AnswerResponse:
    return pb.AnswerResponse(
        answer=r.answer, outcome=_OUTCOMES[r.outcome], generated=r.generated, support=r.support,
        claims=[pb.ClaimVerdict(text=c.text, start=c.start, end=c.end, verdict=_VERDICTS.get(c.verdict, 0),
                                score=c.score, passage_ids=c.passage_ids) for c in r.claims],
        citations=[pb.Citation(passage_id=pid, title=title, claim_indexes=idx) for pid, title, idx in r.citations],
        evidence=[passage_to_proto(p) for p in r.evidence], model=r.model, weight_version=r.weight_version,
        verified=r.verified, timings=r.timings)


def _args(request: pb.AnswerRequest, limits: Limits) -> dict:
    if request.evidence_mode not in _MODES:
        raise InvalidArgument("evidence_mode", f"unknown evidence mode {request.evidence_mode}")
    check_turns(len(request.conversation), limits.max_turns)  # before the turns become Python objects
    return dict(question=request.question, conversation=[{"role": t.role, "content": t.content}
                                                         for t in request.conversation],
                top_k=request.top_k,
                threshold=request.support_threshold if request.HasField("support_threshold") else None,
                mode=_MODES[request.evidence_mode], model=request.model, max_tokens=request.max_tokens)


class AnswerServicer(pb_grpc.AnswerServiceServicer):
    def __init__(self, app: "AnswerApp"):
        self.app = app

    async def Answer(self, request: pb.AnswerRequest, context) -> pb.AnswerResponse:
        core = self.app.require_core()
        return result_to_proto(await core.answer(**_args(request, core.limits)))

    async def AnswerStream(self, request: pb.AnswerStreamRequest, context):
        args = _args(request.request, self.app.require_core().limits)
        if args["mode"] == SEARCH_TOOL:
            raise InvalidArgument("evidence_mode", "AnswerStream takes EVIDENCE_MODE_PASSAGES (the search tool runs "
                                  "inside one Generate call); use Answer")
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self.app.require_core().answer(**args, on_delta=queue.put_nowait))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        while (delta := await queue.get()) is not None:
            yield pb.AnswerStreamResponse(text_delta=delta)
        yield pb.AnswerStreamResponse(result=result_to_proto(task.result()))

    async def ObserveGeneration(self, request: pb.ObserveGenerationRequest, context) -> pb.ObserveGenerationResponse:
        core = self.app.require_core()
        return pb.ObserveGenerationResponse(queued=core.observe(request.model, request.weight_version,
                                                                request.prompt, request.completion))

    async def GetLiveStats(self, request: pb.GetLiveStatsRequest, context) -> pb.GetLiveStatsResponse:
        if request.last < 0:
            raise InvalidArgument("last", f"must be >= 0, got {request.last}")
        answers, unsupported, claims, refuted = self.app.require_core().monitor.stats(
            request.model, request.weight_version, request.last)
        return pb.GetLiveStatsResponse(answers=answers, unsupported_answers=unsupported, claims=claims,
                                       refuted_claims=refuted)


class AnswerApp(ServiceApp):
    """The answer service: clients to retrieval, generation and verification, the live monitor, then SERVING."""

    def __init__(self, settings: AnswerSettings):
        self.settings = settings
        self.core: AnswerCore | None = None
        self.clients: list = []
        self.monitor: LiveMonitor | None = None
        self.bindings = [ServiceBinding(pb.DESCRIPTOR.services_by_name["AnswerService"].full_name,
                                        pb_grpc.add_AnswerServiceServicer_to_server, AnswerServicer(self))]

    def require_core(self) -> AnswerCore:
        if self.core is None:
            raise Unavailable("answer is starting (health is NOT_SERVING)")
        return self.core

    async def startup(self) -> None:
        from services.common.grading import take_answer
        from services.common.tools import TOOL_PROTOCOLS, strip_tool_blocks
        from services.generation.client import GenerationClient
        from services.retrieval.client import RetrievalClient
        from services.verification.client import VerificationClient
        from services.verification.core import VerifyItem

        s = self.settings
        def options(target: str):
            return s.client_options(target, timeout_seconds=s.upstream_timeout_seconds, retries=s.upstream_retries)

        retrieval = RetrievalClient(s.retrieval_target, options("retrieval"))
        verification = VerificationClient(s.verification_target, options("verification"))
        generation = GenerationClient(s.generation_target, options("generation"), s.generation_app_name, s.answer_model,
                                      internal=True)  # answers are counted here, not sampled again by generation
        self.clients = [retrieval, verification, generation]
        protocol = TOOL_PROTOCOLS[s.tool_protocol]

        async def search(queries, top_k):
            return await retrieval.search(queries, top_k=top_k)

        async def generate(chat, max_tokens, model, tool, top_k, on_delta):
            """(answer text, served model, weight version, passages it read with the search tool)."""
            if on_delta is not None:
                parts, version, name = [], 0, model
                async for chunk in generation.generate_stream(chat, max_tokens=max_tokens, model=model):
                    if chunk.text_delta:
                        parts.append(chunk.text_delta)
                        on_delta(chunk.text_delta)
                    version, name = chunk.weight_version or version, chunk.model or name
                return "".join(parts), name, version, []
            reply = await generation.generate([chat], max_tokens=max_tokens, model=model,
                                              tool_protocol=protocol.name if tool else "",
                                              max_tool_turns=s.max_tool_turns if tool else 0,
                                              retrieval_top_k=top_k if tool else 0)
            c = reply.completions[0]
            text, read = c.text, []
            if tool:  # the evidence is what it read: the same searches, with their passage ids
                queries = [q.strip() for q in protocol.queries(c.text) if q.strip()]
                if queries:
                    seen = {}
                    for hits in await retrieval.search(queries, top_k=top_k):
                        for p in hits:
                            seen.setdefault(p.id, p)
                    read = list(seen.values())
                text = take_answer(strip_tool_blocks(c.text), "answer_tag_or_text") or ""
            return text, reply.model or model, int(c.weight_version), read

        async def verify(text, evidence, topic):
            reply = await verification.verify([VerifyItem(answer=text, evidence=evidence or (), topic=topic)],
                                              judge=s.judge)
            return [(c.text, c.start, c.end, vpb.Label.Name(c.label).removeprefix("LABEL_"), c.score,
                     list(c.evidence_ids)) for c in reply.results[0].claims]

        async def kept_versions():
            return {m.model: {k.version for k in m.kept_versions} for m in await generation.list_models()}

        self.monitor = LiveMonitor(verify, s.live_queue_size, s.live_window, s.default_support_threshold,
                                   kept_versions, s.live_prune_seconds, s.live_max_series)
        self.monitor.start()
        limits = Limits(s.max_question_bytes, s.max_turns, s.default_top_k, s.max_top_k, s.default_max_tokens,
                        s.max_tokens_limit, s.default_support_threshold, s.max_completion_bytes)
        self.core = AnswerCore(limits, search, generate, verify, self.monitor, s.answer_model,
                               s.on_verification_unavailable, s.on_retrieval_unavailable, s.verify_timeout_seconds,
                               search_instructions(protocol.tags))

    async def shutdown(self) -> None:
        if self.monitor is not None:
            await self.monitor.stop()
        for c in self.clients:
            await c.close()
