"""gRPC translation for the retrieval service: protos <-> :mod:`services.retrieval.core` (no logic here)."""

from __future__ import annotations

import asyncio

from knowserve.common.v1 import common_pb2
from knowserve.retrieval.v1 import retrieval_service_pb2 as pb
from knowserve.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from services.common.errors import Unavailable
from services.common.server import ServiceApp, ServiceBinding
from services.retrieval.config import RetrievalSettings
from services.retrieval.core import Document, Passage, RetrievalCore, SearchFilter

_MODE_NAMES = {pb.SEARCH_MODE_UNSPECIFIED: "", pb.SEARCH_MODE_BM25: "bm25", pb.SEARCH_MODE_DENSE: "dense",
               pb.SEARCH_MODE_HYBRID: "hybrid"}
_MODE_ENUM = {v: k for k, v in _MODE_NAMES.items() if v}


def passage_to_proto(p: Passage) -> common_pb2.Passage:
    return common_pb2.Passage(id=p.id, document_id=p.document_id, title=p.title, text=p.text, score=p.score,
                              source=p.source, backend=p.backend)


def document_from_proto(d: common_pb2.Document) -> Document:
    return Document(id=d.id, title=d.title, text=d.text, source=d.source, metadata=dict(d.metadata))


class RetrievalServicer(pb_grpc.RetrievalServiceServicer):
    def __init__(self, app: "RetrievalApp"):
        self.app = app

    @property
    def core(self) -> RetrievalCore:
        if self.app.core is None:
            raise Unavailable("retrieval is starting: the index is not open yet (health is NOT_SERVING)")
        return self.app.core

    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        filters = [SearchFilter(f.field, tuple(f.values)) for f in request.filters]
        mode = _MODE_NAMES.get(request.mode, f"<enum {request.mode}>")
        results = await asyncio.to_thread(self.core.search, list(request.queries), request.top_k, filters, mode,
                                          request.edit_boost)
        return pb.SearchResponse(results=[
            pb.QueryResult(query=q, passages=[passage_to_proto(p) for p in ps])
            for q, ps in zip(request.queries, results)
        ])

    async def UpsertDocuments(self, request, context) -> pb.UpsertDocumentsResponse:
        r = await asyncio.to_thread(self.core.upsert, [document_from_proto(d) for d in request.documents])
        return pb.UpsertDocumentsResponse(documents_upserted=r.documents_upserted, passages_written=r.passages_written,
                                          documents_replaced=r.documents_replaced)

    async def DeleteDocuments(self, request, context) -> pb.DeleteDocumentsResponse:
        r = await asyncio.to_thread(self.core.delete, list(request.ids))
        return pb.DeleteDocumentsResponse(documents_deleted=r.documents_deleted, not_found_ids=r.not_found_ids)

    async def GetIndexStats(self, request, context) -> pb.GetIndexStatsResponse:
        st = await asyncio.to_thread(self.core.stats)
        s = self.app.settings
        return pb.GetIndexStatsResponse(
            backend=st.backend, documents=st.documents, passages=st.passages, edit_documents=st.edit_documents,
            dense_enabled=st.dense_enabled, default_mode=_MODE_ENUM[s.default_mode], max_top_k=s.max_top_k,
            index_size_bytes=st.index_size_bytes,
        )


def build_backend(settings: RetrievalSettings, encoder=None):
    """The configured backend; loads the encoder when dense vectors are on (or uses the one given)."""
    if settings.dense and encoder is None:
        from services.retrieval.encoder import load_encoder

        encoder = load_encoder(settings)
    if settings.backend == "elasticsearch":
        from services.retrieval.elastic import ElasticsearchBackend

        return ElasticsearchBackend(settings, encoder if settings.dense else None)
    from services.retrieval.embedded import EmbeddedBackend

    return EmbeddedBackend(settings, encoder if settings.dense else None)


class RetrievalApp(ServiceApp):
    """The retrieval service: backend opened (and encoder loaded) at start-up, before health turns SERVING."""

    def __init__(self, settings: RetrievalSettings, encoder=None):
        self.settings = settings
        self.encoder = encoder  # an already-loaded encoder to share (tests, benchmarks); None loads one
        self.core: RetrievalCore | None = None
        self.bindings = [ServiceBinding(pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name,
                                        pb_grpc.add_RetrievalServiceServicer_to_server, RetrievalServicer(self))]

    async def startup(self) -> None:
        backend = await asyncio.to_thread(build_backend, self.settings, self.encoder)
        self.core = RetrievalCore(self.settings, backend)

    async def shutdown(self) -> None:
        if self.core is not None:
            await asyncio.to_thread(self.core.backend.close)
