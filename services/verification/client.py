"""Typed async client of the verification service (used by reward, the eval harness and tests)."""

from __future__ import annotations

from collections.abc import Sequence

from knowserve.common.v1 import common_pb2
from knowserve.verification.v1 import verification_service_pb2 as pb
from knowserve.verification.v1 import verification_service_pb2_grpc as pb_grpc
from services.common.clients import ClientOptions, ServiceClient
from services.verification.core import VerifyItem

SECTIONS = {"all": pb.SECTION_ALL, "think": pb.SECTION_THINK, "answer": pb.SECTION_ANSWER}


def item_to_proto(it: VerifyItem) -> pb.VerifyItem:
    return pb.VerifyItem(
        answer=it.answer, claims=list(it.claims), topic=it.topic, section=SECTIONS[it.section],
        evidence=[common_pb2.Passage(id=p.id, document_id=p.document_id, title=p.title, text=p.text,
                                     score=p.score, source=p.source) for p in it.evidence],
    )


class VerificationClient(ServiceClient[pb_grpc.VerificationServiceStub]):
    """``await VerificationClient("127.0.0.1:50052").verify([VerifyItem(answer="Paris is in France.")])``"""

    def __init__(self, target: str, options: ClientOptions | None = None):
        super().__init__("verification", target, pb_grpc.VerificationServiceStub, options)

    async def verify(self, items: Sequence[VerifyItem], judge: str = "", evidence_top_k: int = 0,
                     gamma: float = 0.0, timeout: float | None = None) -> pb.VerifyResponse:
        request = pb.VerifyRequest(items=[item_to_proto(i) for i in items], judge=judge,
                                   evidence_top_k=evidence_top_k, gamma=gamma)
        return await self.call("Verify", request, timeout=timeout)

    async def list_judges(self) -> pb.ListJudgesResponse:
        return await self.call("ListJudges", pb.ListJudgesRequest())
