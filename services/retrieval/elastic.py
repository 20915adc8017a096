"""Elasticsearch / OpenSearch backend: BM25 ``multi_match`` with field boosts, bulk indexing, explicit mappings.

Uses the official ``elasticsearch`` client. OpenSearch-compatible servers (``es_flavor=opensearch``)
neither accept the 9.x client's ``compatible-with`` media types nor send the ``X-Elastic-Product``
header the client checks; :func:`compat_node_class` adapts both in the transport's node class,
without patching the library.

Dense and hybrid search (``dense=true``): each passage carries its MiniLM vector in an ``embedding`` field, mapped
per flavour as the servers document it — Elasticsearch ``dense_vector`` with an ``int8_hnsw`` index and the
top-level ``knn`` search option (8.12+), OpenSearch ``knn_vector`` with a Lucene HNSW method and the ``knn`` query
(2.4+, filters inside the walk). HYBRID runs both searches and fuses them with reciprocal-rank fusion in the
service (the same RRF as the embedded backend; ES's own ``rrf`` retriever needs a licence tier some clusters lack).
At start-up the backend checks the index's vector field and runs one probe ``knn`` search: a server that cannot
(an older version, the osmem emulator) is refused with the fix, never discovered on the first user query.
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
    reciprocal_rank_fusion,
)


class DenseUnsupported(RuntimeError):
    """The server cannot hold or search the vectors dense retrieval needs (refused at start-up with the fix)."""

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
VECTOR_FIELD = "embedding"
MIN_VERSION = {"elasticsearch": (8, 12), "opensearch": (2, 4)}  # int8_hnsw / Lucene knn with filters


def vector_mapping(flavor: str, dim: int, m: int, ef_construction: int) -> tuple[dict, dict]:
    """(index settings, field mapping) of the ``embedding`` field, in the flavour's documented form.

    >>> vector_mapping("elasticsearch", 384, 16, 100)[1]["index_options"]
    {'type': 'int8_hnsw', 'm': 16, 'ef_construction': 100}
    >>> vector_mapping("opensearch", 384, 16, 100)[0]
    {'index.knn': True}
    """
    if flavor == "opensearch":
        return {"index.knn": True}, {
            "type": "knn_vector", "dimension": dim,
            "method": {"name": "hnsw", "space_type": "cosinesimil", "engine": "lucene",
                       "parameters": {"m": m, "ef_construction": ef_construction}},
        }
    return {}, {"type": "dense_vector", "dims": dim, "index": True, "similarity": "cosine",
                "index_options": {"type": "int8_hnsw", "m": m, "ef_construction": ef_construction}}


def filter_clauses(filters: Sequence[SearchFilter]) -> list[dict]:
    """``terms`` clauses for the request's filters (exact values of source / title / document_id).

    >>> filter_clauses([SearchFilter("title", ("Paris",))])
    [{'terms': {'title.exact': ['Paris']}}]
    """
    return [{"terms": {_FILTER_FIELD[f.field]: list(f.values)}} for f in filters]


def knn_search_body(flavor: str, vector: Sequence[float], k: int, num_candidates: int,
                    filters: Sequence[SearchFilter]) -> dict:
    """The ``_search`` body of a filtered approximate kNN search, as each flavour documents it.

    >>> knn_search_body("elasticsearch", [0.6, 0.8], 5, 50, [])
    {'knn': {'field': 'embedding', 'query_vector': [0.6, 0.8], 'k': 5, 'num_candidates': 50}, 'size': 5}
    >>> knn_search_body("opensearch", [0.6, 0.8], 5, 50, [])
    {'query': {'knn': {'embedding': {'vector': [0.6, 0.8], 'k': 5}}}, 'size': 5}
    """
    vector = [float(x) for x in vector]
    clauses = filter_clauses(filters)
    if flavor == "opensearch":
        inner: dict = {"vector": vector, "k": k}
        if clauses:
            inner["filter"] = {"bool": {"filter": clauses}}
        return {"query": {"knn": {VECTOR_FIELD: inner}}, "size": k}
    knn: dict = {"field": VECTOR_FIELD, "query_vector": vector, "k": k, "num_candidates": max(k, num_candidates)}
    if clauses:
        knn["filter"] = clauses
    return {"knn": knn, "size": k}


def _version(info: dict) -> tuple[int, int]:
    """(major, minor) of a server's ``GET /`` answer; (0, 0) when it is not a number."""
    try:
        major, minor = info["version"]["number"].split(".")[:2]
        return int(major), int(minor)
    except (KeyError, ValueError, AttributeError):
        return 0, 0


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

    def __init__(self, settings: RetrievalSettings, encoder=None):
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
        self.encoder = encoder
        self.flavor = s.es_flavor
        try:
            info = self.client.info()
        except Exception as exc:  # connection refused, auth, TLS
            raise Unavailable(f"elasticsearch at {s.es_url} is not reachable: {exc}") from exc
        if encoder is not None:
            self._check_server(info)
        try:
            if not self.client.indices.exists(index=self.index):
                mappings = {"properties": dict(MAPPINGS["properties"])}
                index_settings = {"number_of_shards": 1, "number_of_replicas": 0}
                if encoder is not None:
                    extra, field = vector_mapping(self.flavor, encoder.dim, s.ann_m, s.ann_ef_construction)
                    mappings["properties"][VECTOR_FIELD] = field
                    index_settings.update(extra)
                self.client.indices.create(index=self.index, mappings=mappings, settings=index_settings)
        except Exception as exc:  # connection refused, auth, TLS
            raise Unavailable(f"elasticsearch at {s.es_url} is not reachable: {exc}") from exc
        if encoder is not None:
            self._check_index()

    @property
    def dense_enabled(self) -> bool:
        return self.encoder is not None

    _OFF = "or set KNOWSERVE_RETRIEVAL_DENSE=false and KNOWSERVE_RETRIEVAL_DEFAULT_MODE=bm25"

    def _check_server(self, info: dict) -> None:
        """Refuse, before touching the index, a server of another flavour or too old for dense search."""
        s, off = self.settings, self._OFF
        distribution = info.get("version", {}).get("distribution", "elasticsearch")
        flavor_seen = "opensearch" if distribution == "opensearch" else "elasticsearch"
        if flavor_seen != self.flavor:
            raise DenseUnsupported(f"{s.es_url} is {flavor_seen} but KNOWSERVE_RETRIEVAL_ES_FLAVOR={self.flavor}: "
                                   f"set it to {flavor_seen} ({off})")
        need = MIN_VERSION[self.flavor]
        if _version(info) < need:
            raise DenseUnsupported(f"{s.es_url} runs {self.flavor} {info.get('version', {}).get('number')}; dense "
                                   f"search here needs {self.flavor} >= {need[0]}.{need[1]} ({off})")

    def _check_index(self) -> None:
        """Refuse an index without a vector field of the encoder's dimension, or a server whose kNN search fails
        (one probe search), naming the fix."""
        s, off, need = self.settings, self._OFF, MIN_VERSION[self.flavor]
        field = (self.client.indices.get_mapping(index=self.index)[self.index]["mappings"]
                 .get("properties", {}).get(VECTOR_FIELD))
        dims = (field or {}).get("dims", (field or {}).get("dimension"))
        if dims != self.encoder.dim:
            raise DenseUnsupported(
                f"index {self.index} has no {VECTOR_FIELD!r} vector field of dimension {self.encoder.dim} (found "
                f"{field}): it was made without dense vectors or by another encoder. Re-create it (delete the index, "
                f"restart the service, re-run `knowserve ingest`) {off}")
        probe = [1.0] + [0.0] * (self.encoder.dim - 1)
        try:
            self.client.search(index=self.index, source_excludes=[VECTOR_FIELD],
                               **knn_search_body(self.flavor, probe, 1, 10, []))
        except Exception as exc:
            raise DenseUnsupported(f"{s.es_url} cannot run a {self.flavor} kNN search ({str(exc)[:200]}); use a "
                                   f"server that can ({self.flavor} >= {need[0]}.{need[1]}) {off}") from exc

    def _bm25_hits(self, query: str, pool: int, filters: Sequence[SearchFilter]) -> list[dict]:
        body = {
            "bool": {
                "must": [{"multi_match": {"query": query, "fields": [f"title^{self.settings.title_boost}", "text"]}}],
                "filter": filter_clauses(filters),
            }
        }
        return self.client.search(index=self.index, query=body, size=pool,
                                  source_excludes=[VECTOR_FIELD])["hits"]["hits"]

    def _knn_hits(self, vector, pool: int, filters: Sequence[SearchFilter]) -> list[dict]:
        body = knn_search_body(self.flavor, vector, pool, max(100, 4 * pool), filters)
        return self.client.search(index=self.index, source_excludes=[VECTOR_FIELD], **body)["hits"]["hits"]

    def search(self, queries: Sequence[str], top_k: int, filters: Sequence[SearchFilter], mode: str,
               edit_boost: float) -> list[list[Passage]]:
        pool = max(3 * top_k, top_k + 20)
        vectors = self.encoder.encode(list(queries)) if mode in ("dense", "hybrid") else None  # [n_queries, dim]
        out = []
        for qi, q in enumerate(queries):
            bm25 = [self._passage(h) for h in self._bm25_hits(q, pool, filters)] if mode != "dense" else []
            if mode == "bm25":
                out.append(apply_edit_boost(bm25, edit_boost, top_k))
                continue
            dense = [self._passage(h, "dense") for h in self._knn_hits(vectors[qi], pool, filters)]
            if mode == "dense":
                out.append(apply_edit_boost(dense, edit_boost, top_k))
                continue
            by_id = {p.id: p for p in dense} | {p.id: p for p in bm25}
            fused = reciprocal_rank_fusion([[p.id for p in bm25], [p.id for p in dense]], k=self.settings.rrf_k)
            out.append(apply_edit_boost([dataclasses.replace(by_id[pid], score=score, backend="hybrid")
                                         for pid, score in fused], edit_boost, top_k))
        return out

    @staticmethod
    def _passage(hit: dict, backend: str = "elasticsearch") -> Passage:
        s = hit["_source"]
        return Passage(id=s["passage_id"], document_id=s["document_id"], title=s["title"], text=s["text"],
                       source=s.get("source", ""), chunk=s.get("chunk", 0), score=float(hit["_score"] or 0.0),
                       backend=backend)

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
        vectors = self.encoder.encode([f"{p.title}: {p.text}" for p in passages]) if self.encoder else None
        ops: list[dict] = []
        for pids in existing.values():
            ops += [{"delete": {"_index": self.index, "_id": pid}} for pid in pids if pid not in new_ids]
        for i, p in enumerate(passages):
            ops.append({"index": {"_index": self.index, "_id": p.id}})
            doc = {"passage_id": p.id, "document_id": p.document_id, "title": p.title, "text": p.text,
                   "source": p.source, "chunk": p.chunk}
            if vectors is not None:
                doc[VECTOR_FIELD] = [round(float(x), 6) for x in vectors[i]]
            ops.append(doc)
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
            dense_enabled=self.dense_enabled,
            index_size_bytes=0,
        )

    def close(self) -> None:
        self.client.close()
