"""gRPC translation for the verification service: protos <-> :mod:`services.verification.core`."""

from __future__ import annotations

import asyncio
import logging

from knowserve.verification.v1 import verification_service_pb2 as pb
from knowserve.verification.v1 import verification_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidArgument, Unavailable
from services.common.server import ServiceApp, ServiceBinding
from services.retrieval.client import RetrievalClient, passage_from_proto
from services.verification.config import VerificationSettings
from services.verification.core import VerificationCore, VerifyItem, VerifyResult
from services.verification.judges import LexicalJudge, NliJudge
from services.verification.learned import load_feature_judge

log = logging.getLogger(__name__)

_SECTIONS = {pb.SECTION_UNSPECIFIED: "all", pb.SECTION_ALL: "all", pb.SECTION_THINK: "think",
             pb.SECTION_ANSWER: "answer"}
_LABELS = {"SUPPORTED": pb.LABEL_SUPPORTED, "REFUTED": pb.LABEL_REFUTED, "NOT_ENOUGH_INFO": pb.LABEL_NOT_ENOUGH_INFO}
_KINDS = {"claims": pb.ANSWER_KIND_CLAIMS, "empty": pb.ANSWER_KIND_EMPTY, "refusal": pb.ANSWER_KIND_REFUSAL,
          "no_claims": pb.ANSWER_KIND_NO_CLAIMS}
LLM_UNAVAILABLE = "needs the generation service: set KNOWSERVE_VERIFICATION_GENERATION_TARGET"


def item_from_proto(i: int, it: pb.VerifyItem) -> VerifyItem:
    if it.section not in _SECTIONS:
        raise InvalidArgument(f"items[{i}].section", f"unknown section enum value {it.section}")
    return VerifyItem(answer=it.answer, claims=list(it.claims), topic=it.topic,
                      evidence=[passage_from_proto(p) for p in it.evidence], section=_SECTIONS[it.section])


def result_to_proto(r: VerifyResult) -> pb.VerifyResult:
    return pb.VerifyResult(
        kind=_KINDS[r.kind], factscore=r.factscore, length_penalized_score=r.length_penalized_score,
        supported=r.supported, refuted=r.refuted, not_enough_info=r.not_enough_info,
        claims=[pb.ClaimVerdict(text=c.text, start=c.start, end=c.end, label=_LABELS[c.label], score=c.score,
                                evidence_ids=list(c.evidence_ids)) for c in r.claims],
    )


class VerificationServicer(pb_grpc.VerificationServiceServicer):
    def __init__(self, app: "VerificationApp"):
        self.app = app

    async def Verify(self, request: pb.VerifyRequest, context) -> pb.VerifyResponse:
        core = self.app.require_core()
        extractor = "llm" if request.extractor == pb.CLAIM_EXTRACTOR_LLM else "deterministic"
        items = [item_from_proto(i, it) for i, it in enumerate(request.items)]
        judge = request.judge or core.settings.default_judge
        results = await core.verify(items, judge, request.evidence_top_k, request.gamma, extractor)
        return pb.VerifyResponse(judge=judge, results=[result_to_proto(r) for r in results])

    async def ListJudges(self, request, context) -> pb.ListJudgesResponse:
        core = self.app.require_core()
        judges = [pb.JudgeInfo(name=j.name, ready=True, description=j.description) for j in core.judges.values()]
        judges += [pb.JudgeInfo(name=n, ready=False, description=why) for n, why in core.unavailable.items()]
        return pb.ListJudgesResponse(judges=judges, default_judge=core.settings.default_judge)


class VerificationApp(ServiceApp):
    """The verification service: judges loaded and a retrieval client opened before health turns SERVING.

    Retrieval is not required at start-up (evidence may come with the request); a Verify call that needs it
    while it is down fails with UNAVAILABLE naming retrieval.
    """

    def __init__(self, settings: VerificationSettings, nli_model=None):
        self.settings = settings
        self.nli_model = nli_model  # an already-loaded CrossEncoder to share (tests); None loads from the path
        self.core: VerificationCore | None = None
        self.retrieval: RetrievalClient | None = None
        self.generation = None
        self.bindings = [ServiceBinding(pb.DESCRIPTOR.services_by_name["VerificationService"].full_name,
                                        pb_grpc.add_VerificationServiceServicer_to_server,
                                        VerificationServicer(self))]

    def require_core(self) -> VerificationCore:
        if self.core is None:
            raise Unavailable("verification is starting: judges are loading (health is NOT_SERVING)")
        return self.core

    async def startup(self) -> None:
        s = self.settings
        judges = {"lexical": LexicalJudge(s.lexical_support_overlap, s.lexical_topic_overlap)}
        unavailable = {}
        llm_generate = None
        if s.generation_target:
            from services.generation.client import GenerationClient
            from services.verification.llm import LlmJudge

            self.generation = GenerationClient(s.generation_target, s.client_options(
                "generation", timeout_seconds=s.generation_timeout_seconds, retries=s.generation_retries),
                s.generation_app_name,
                model=s.generation_model, internal=True)
            llm_generate = self.generation.greedy
            judges["llm"] = LlmJudge(llm_generate)
        else:
            unavailable["llm"] = LLM_UNAVAILABLE
        model = self.nli_model
        if model is None and (s.nli_model_path / "config.json").exists():
            from services.verification.nli import CrossEncoder

            model = await asyncio.to_thread(CrossEncoder, s.nli_model_path, s.nli_device)
        if model is not None:
            judges["nli"] = NliJudge(model, s.nli_min_confidence)
        else:
            unavailable["nli"] = (f"no model in {s.nli_model_path}: run `knowserve train-verifier` or set "
                                  "KNOWSERVE_VERIFICATION_NLI_MODEL_PATH")
            log.warning("nli judge disabled: %s", unavailable["nli"])
        feature = await asyncio.to_thread(load_feature_judge, s)  # may train it (default, missing)
        if isinstance(feature, str):
            unavailable["feature"] = feature
            log.warning("feature judge disabled: %s", feature)
        else:
            judges["feature"] = feature
        self.retrieval = RetrievalClient(s.retrieval_target, s.client_options(
            "retrieval", timeout_seconds=s.retrieval_timeout_seconds, retries=s.retrieval_retries))
        mode = s.retrieval_mode

        async def search(queries, top_k):
            return await self.retrieval.search(queries, top_k=top_k, mode=mode)

        self.core = VerificationCore(s, search, judges, unavailable, llm_generate)

    async def shutdown(self) -> None:
        if self.retrieval is not None:
            await self.retrieval.close()
        if self.generation is not None:
            await self.generation.close()
