"""Elasticsearch / OpenSearch backend: BM25 ``multi_match`` with field boosts, bulk indexing, explicit mappings.

Uses the official ``elasticsearch`` client. OpenSearch-compatible servers (``es_flavor=opensearch``)
neither accept the 9.x client's ``compatible-with`` media types nor send the ``X-Elastic-Product``
header the client checks; :func:`compat_node_class` adapts both in the transport's node class,
without patching the library. Dense vectors are not indexed here yet (the local test emulator
cannot run ``knn``): the settings refuse ``dense=true`` with this backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from elastic_transport import HttpHeaders, Urllib3HttpNode
from elastic_transport._node import NodeApiResponse

from services.common.errors import Unavailable
from services.retrieval.config import RetrievalSettings
from services.retrieval.core import (
    EDIT_SOURCE,
    DeleteResult,
    Document,
    IndexStats,
    Passage,
    SearchFilter,
    UpsertResult,
    apply_edit_boost,
)

MAPPINGS = {
    "properties": {
        "passage_id": {"type": "keyword"},
        "document_id": {"type": "keyword"},
        "title": {"type": "text", "analyzer": "english", "fields": {"exact": {"type": "keyword"}}},
        "text": {"type": "text", "analyzer": "english"},
        "source": {"type": "keyword"},
        "chunk": {"type": "integer"},
    }
}
_FILTER_FIELD = {"source": "source", "title": "title.exact", "document_id": "document_id"}


def _plain_media_type(value: str) -> str:
    """``application/vnd.elasticsearch+json; compatible-with=9`` -> ``application/json`` (same for x-ndjson).

    >>> _plain_media_type("application/vnd.elasticsearch+x-ndjson; compatible-with=9")
    'application/x-ndjson'
    """
    if value.startswith("application/vnd.elasticsearch+"):
        return "application/" + value.split("+", 1)[1].split(";", 1)[0].strip()
    return value


def compat_node_class(json_headers: bool, add_product_header: bool) -> type[Urllib3HttpNode]:
    """A urllib3 node that sends plain JSON media types and/or supplies the product header on responses."""

    class CompatNode(Urllib3HttpNode):
        def perform_request(self, method, target, body=None, headers=None, **kwargs):
            if json_headers and headers is not None:
                headers = HttpHeaders({k: _plain_media_type(v) for k, v in headers.items()})
            response = super().perform_request(method, target, body=body, headers=headers, **kwargs)
            meta = response.meta
            if add_product_header and "x-elastic-product" not in meta.headers:
                new_headers = HttpHeaders(dict(meta.headers.items()))
                new_headers["X-Elastic-Product"] = "Elasticsearch"
                return NodeApiResponse(dataclasses.replace(meta, headers=new_headers), response.body)
            return response

    return CompatNode


class ElasticsearchBackend:
    """Passages as documents of one index (``_id`` = passage id); every write refreshes so it is visible at once."""

    name = "elasticsearch"
    dense_enabled = False

    def __init__(self, settings: RetrievalSettings):
        from elasticsearch import Elasticsearch

        s = settings
        self.settings = s
        opensearch = s.es_flavor == "opensearch"
        auth = {}
        if s.es_api_key is not None:
            auth["api_key"] = s.es_api_key.get_secret_value()
        elif s.es_username:
            auth["basic_auth"] = (s.es_username, s.es_password.get_secret_value() if s.es_password else "")
        self.client = Elasticsearch(
            s.es_url,
            node_class=compat_node_class(json_headers=opensearch or s.es_compat_json_headers,
                                         add_product_header=opensearch),
            request_timeout=s.es_timeout_seconds,
            verify_certs=s.es_verify_certs,
            **auth,
        )
        self.index = s.es_index
        try:
            if not self.client.indices.exists(index=self.index):
                self.client.indices.create(index=self.index, mappings=MAPPINGS,
                                           settings={"number_of_shards": 1, "number_of_replicas": 0})
        except Exception as exc:  # connection refused, auth, TLS
            raise Unavailable(f"elasticsearch at {s.es_url} is not reachable: {exc}") from exc

    def _filters(self, filters: Sequence[SearchFilter]) -> list[dict]:
        return [{"terms": {_FILTER_FIELD[f.field]: list(f.values)}} for f in filters]

    def search(self, queries: Sequence[str], top_k: int, filters: Sequence[SearchFilter], mode: str,
               edit_boost: float) -> list[list[Passage]]:
        pool = max(3 * top_k, top_k + 20)
        out = []
        for q in queries:
            body = {
                "bool": {
                    "must": [{"multi_match": {"query": q, "fields": [f"title^{self.settings.title_boost}", "text"]}}],
                    "filter": self._filters(filters),
                }
            }
            hits = self.client.search(index=self.index, query=body, size=pool)["hits"]["hits"]
            out.append(apply_edit_boost([self._passage(h) for h in hits], edit_boost, top_k))
        return out

    @staticmethod
    def _passage(hit: dict) -> Passage:
        s = hit["_source"]
        return Passage(id=s["passage_id"], document_id=s["document_id"], title=s["title"], text=s["text"],
                       source=s.get("source", ""), chunk=s.get("chunk", 0), score=float(hit["_score"] or 0.0),
                       backend="elasticsearch")

    def _passage_ids_of(self, doc_ids: Sequence[str]) -> dict[str, list[str]]:
        if not doc_ids:
            return {}
        hits = self.client.search(index=self.index, query={"terms": {"document_id": list(doc_ids)}},
                                  size=10_000, source=["document_id"])["hits"]["hits"]
        out: dict[str, list[str]] = {}
        for h in hits:
            out.setdefault(h["_source"]["document_id"], []).append(h["_id"])
        return out

    def _bulk(self, operations: list[dict]) -> None:
        if not operations:
            return
        reply = self.client.bulk(operations=operations, refresh=True)
        if reply.get("errors"):
            failed = [item for item in reply["items"] if list(item.values())[0].get("error")]
            raise Unavailable(f"elasticsearch bulk write failed for {len(failed)} items: {failed[:1]}")

    def upsert(self, documents: Sequence[Document], passages: Sequence[Passage]) -> UpsertResult:
        existing = self._passage_ids_of([d.id for d in documents])
        new_ids = {p.id for p in passages}
        ops: list[dict] = []
        for pids in existing.values():
            ops += [{"delete": {"_index": self.index, "_id": pid}} for pid in pids if pid not in new_ids]
        for p in passages:
            ops.append({"index": {"_index": self.index, "_id": p.id}})
            ops.append({"passage_id": p.id, "document_id": p.document_id, "title": p.title, "text": p.text,
                        "source": p.source, "chunk": p.chunk})
        self._bulk(ops)
        return UpsertResult(len(documents), len(passages), len(existing))

    def delete(self, ids: Sequence[str]) -> DeleteResult:
        existing = self._passage_ids_of(ids)
        self._bulk([{"delete": {"_index": self.index, "_id": pid}} for pids in existing.values() for pid in pids])
        return DeleteResult(len(existing), [i for i in ids if i not in existing])

    def _count(self, query: dict) -> int:
        return int(self.client.count(index=self.index, query=query)["count"])

    def stats(self) -> IndexStats:
        first = {"term": {"chunk": 0}}
        return IndexStats(
            backend=self.name,
            documents=self._count(first),
            passages=self._count({"match_all": {}}),
            edit_documents=self._count({"bool": {"filter": [first, {"term": {"source": EDIT_SOURCE}}]}}),
            dense_enabled=False,
            index_size_bytes=0,
        )

    def close(self) -> None:
        self.client.close()
