"""Typed async client of the retrieval service (used by verification, generation, the CLI and tests)."""

from __future__ import annotations

from collections.abc import Sequence

from knowserve.common.v1 import common_pb2
from knowserve.retrieval.v1 import retrieval_service_pb2 as pb
from knowserve.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from services.common.clients import ClientOptions, ServiceClient
from services.retrieval.core import DeleteResult, Document, Passage, SearchFilter, UpsertResult

_MODES = {"": pb.SEARCH_MODE_UNSPECIFIED, "bm25": pb.SEARCH_MODE_BM25, "dense": pb.SEARCH_MODE_DENSE,
          "hybrid": pb.SEARCH_MODE_HYBRID}


def passage_from_proto(p: common_pb2.Passage) -> Passage:
    return Passage(id=p.id, document_id=p.document_id, title=p.title, text=p.text, source=p.source, score=p.score,
                   backend=p.backend)


class RetrievalClient(ServiceClient[pb_grpc.RetrievalServiceStub]):
    """``await RetrievalClient("127.0.0.1:50051").search(["who wrote Hamlet"], top_k=3)``"""

    def __init__(self, target: str, options: ClientOptions | None = None):
        super().__init__("retrieval", target, pb_grpc.RetrievalServiceStub, options)

    async def search(self, queries: Sequence[str], top_k: int = 0, filters: Sequence[SearchFilter] = (),
                     mode: str = "", edit_boost: float = 0.0) -> list[list[Passage]]:
        request = pb.SearchRequest(
            queries=list(queries), top_k=top_k, mode=_MODES[mode], edit_boost=edit_boost,
            filters=[pb.SearchFilter(field=f.field, values=list(f.values)) for f in filters],
        )
        reply = await self.call("Search", request)
        return [[passage_from_proto(p) for p in r.passages] for r in reply.results]

    async def upsert(self, documents: Sequence[Document]) -> UpsertResult:
        reply = await self.call("UpsertDocuments", pb.UpsertDocumentsRequest(documents=[
            common_pb2.Document(id=d.id, title=d.title, text=d.text, source=d.source, metadata=d.metadata)
            for d in documents
        ]), timeout=max(self.options.timeout_seconds, 300.0))
        return UpsertResult(reply.documents_upserted, reply.passages_written, reply.documents_replaced)

    async def delete(self, ids: Sequence[str]) -> DeleteResult:
        reply = await self.call("DeleteDocuments", pb.DeleteDocumentsRequest(ids=list(ids)))
        return DeleteResult(reply.documents_deleted, list(reply.not_found_ids))

    async def stats(self) -> pb.GetIndexStatsResponse:
        return await self.call("GetIndexStats", pb.GetIndexStatsRequest())
