"""Dense and hybrid search on the Elasticsearch backend.

What can run here runs for real: the osmem emulator (OpenSearch 3.x API) accepts the ``knn_vector`` mapping but
cannot run a kNN query, so the backend must refuse it at start-up with the fix. What cannot run here — a real
Elasticsearch or OpenSearch server with kNN (no such server can be installed on this machine) — is replaced by a
small HTTP server that plays one: the official ``elasticsearch`` client talks to it over HTTP, and it checks every
mapping and search body against the request format each flavour documents before answering from what was indexed
(cosine over the stored vectors, word overlap for BM25). So the bodies the service really sends are the ones
checked.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from services.retrieval.config import RetrievalSettings
from services.retrieval.core import Document, RetrievalCore, SearchFilter
from services.retrieval.elastic import DenseUnsupported, ElasticsearchBackend
from tests.conftest import FACTS

# documented keys: Elasticsearch "kNN search" (top-level knn option) and "dense_vector" field type; OpenSearch
# "k-NN query" and "knn_vector" field type
ES_KNN_KEYS = {"field", "query_vector", "k", "num_candidates", "filter", "similarity", "boost", "inner_hits",
               "rescore_vector"}
ES_SIMILARITIES = {"cosine", "dot_product", "l2_norm", "max_inner_product"}
ES_INDEX_TYPES = {"hnsw", "int8_hnsw", "int4_hnsw", "bbq_hnsw", "flat", "int8_flat", "int4_flat", "bbq_flat"}
OS_KNN_KEYS = {"vector", "k", "filter", "min_score", "max_distance", "method_parameters", "rescore", "expand_nested"}
OS_ENGINES = {"lucene", "faiss", "nmslib"}


class FakeSearchServer(ThreadingHTTPServer):
    """Plays an Elasticsearch 8.15 or OpenSearch 2.19 node for one index; records format violations."""

    def __init__(self, flavor: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.flavor = flavor
        self.mapping: dict | None = None
        self.index_settings: dict = {}
        self.docs: dict[str, dict] = {}
        self.violations: list[str] = []
        self.searches: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.violations.append(what)

    def check_mapping(self, body: dict) -> None:
        field = body["mappings"]["properties"].get("embedding")
        settings = body.get("settings", {})
        if self.flavor == "elasticsearch":
            self.check(field["type"] == "dense_vector" and isinstance(field["dims"], int), f"dense_vector: {field}")
            self.check(field.get("similarity") in ES_SIMILARITIES, f"similarity: {field}")
            self.check(field.get("index_options", {}).get("type") in ES_INDEX_TYPES, f"index_options: {field}")
        else:
            self.check(field["type"] == "knn_vector" and isinstance(field["dimension"], int), f"knn_vector: {field}")
            self.check(field["method"]["name"] == "hnsw" and field["method"]["engine"] in OS_ENGINES, str(field))
            self.check(settings.get("index.knn") is True, f"index.knn setting: {settings}")

    def dims(self) -> int:
        field = self.mapping["properties"]["embedding"]
        return field.get("dims", field.get("dimension"))

    def passes(self, doc: dict, clauses: list[dict]) -> bool:
        for clause in clauses:
            field, values = next(iter(clause["terms"].items()))
            value = doc["title"] if field == "title.exact" else doc[field]
            if value not in values:
                return False
        return True

    def search(self, body: dict) -> list[tuple[float, dict]]:
        self.searches.append(body)
        knn = body.get("knn")
        if self.flavor == "opensearch" and "knn" in body.get("query", {}):
            (field, knn), = body["query"]["knn"].items()
            self.check(field == "embedding" and set(knn) <= OS_KNN_KEYS, f"knn query keys: {sorted(knn)}")
            vector, k = knn["vector"], knn["k"]
            clauses = knn.get("filter", {}).get("bool", {}).get("filter", [])
        elif knn is not None:
            self.check(self.flavor == "elasticsearch", "top-level knn sent to OpenSearch")
            self.check(set(knn) <= ES_KNN_KEYS, f"knn keys: {sorted(knn)}")
            self.check(knn["field"] == "embedding" and knn["k"] <= knn["num_candidates"] <= 10_000,
                       f"k/num_candidates: {knn['k']}/{knn['num_candidates']}")
            vector, k = knn["query_vector"], knn["k"]
            clauses = knn.get("filter", [])
        else:  # BM25: multi_match (word overlap stands in for BM25 here)
            query = body["query"]["bool"]
            words = set(re.findall(r"\w+", query["must"][0]["multi_match"]["query"].lower()))
            scored = [(len(words & set(re.findall(r"\w+", (d["title"] + " " + d["text"]).lower()))), d)
                      for d in self.docs.values() if self.passes(d, query["filter"])]
            return sorted([x for x in scored if x[0] > 0], key=lambda x: -x[0])[: body.get("size", 10)]
        self.check(len(vector) == self.dims(), f"query vector of {len(vector)} dims, mapping {self.dims()}")
        q = np.array(vector)
        scored = [(float(q @ np.array(d["embedding"])), d) for d in self.docs.values() if self.passes(d, clauses)]
        return sorted(scored, key=lambda x: -x[0])[:k]


class _Handler(BaseHTTPRequestHandler):
    server: FakeSearchServer

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict | None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return raw.decode() if raw else ""

    def do_HEAD(self):
        self._reply(200 if self.server.mapping is not None else 404, None)

    def do_GET(self):
        s = self.server
        if self.path.split("?")[0] == "/":
            version = {"number": "8.15.3"} if s.flavor == "elasticsearch" else {"number": "2.19.1",
                                                                                "distribution": "opensearch"}
            return self._reply(200, {"name": "fake", "version": version})
        if self.path.split("?")[0].endswith("/_mapping"):
            return self._reply(200, {"kb": {"mappings": s.mapping}})
        return self._reply(404, {"error": "unknown"})

    def do_PUT(self):
        if self.path.split("?")[0].endswith("/_bulk"):  # the 9.x client sends bulk as PUT
            return self.do_POST()
        body = json.loads(self._body())
        self.server.check_mapping(body)
        self.server.mapping = body["mappings"]
        self._reply(200, {"acknowledged": True})

    def do_POST(self):
        s = self.server
        path = self.path.split("?")[0]
        text = self._body()
        if path.endswith("/_bulk"):
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            i = 0
            while i < len(lines):
                (op, meta), = lines[i].items()
                if op == "delete":
                    s.docs.pop(meta["_id"], None)
                    i += 1
                else:
                    s.docs[meta["_id"]] = lines[i + 1]
                    i += 2
            return self._reply(200, {"errors": False, "items": []})
        if path.endswith("/_count"):
            return self._reply(200, {"count": len(s.docs)})
        if path.endswith("/_search"):
            body = json.loads(text) if text else {}
            if "terms" in body.get("query", {}):  # the passages of some documents (upsert / delete)
                ids = set(body["query"]["terms"]["document_id"])
                hits = [{"_id": k, "_source": {"document_id": d["document_id"]}}
                        for k, d in s.docs.items() if d["document_id"] in ids]
                return self._reply(200, {"hits": {"hits": hits}})
            self.server.check("_source_excludes=embedding" in self.path, f"vectors not excluded: {self.path}")
            hits = [{"_id": d["passage_id"], "_score": score, "_source": {k: v for k, v in d.items()
                                                                           if k != "embedding"}}
                    for score, d in s.search(body)]
            return self._reply(200, {"hits": {"hits": hits}})
        return self._reply(404, {"error": "unknown"})


@pytest.fixture(params=["elasticsearch", "opensearch"])
def fake_server(request):
    server = FakeSearchServer(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_dense_and_hybrid_requests_follow_each_flavours_documented_format(fake_server, encoder):
    s = RetrievalSettings(backend="elasticsearch", es_url=fake_server.url, es_flavor=fake_server.flavor,
                          es_index="kb")
    core = RetrievalCore(s, ElasticsearchBackend(s, encoder))
    core.upsert(FACTS)
    assert all(len(d["embedding"]) == encoder.dim for d in fake_server.docs.values())
    dense = core.search(["Who wrote the first computer program?"], 2, mode="dense")[0]
    assert dense[0].id == "lovelace" and dense[0].backend == "dense"
    hybrid = core.search(["highest mountain on Earth"], 3, mode="hybrid")[0]
    assert hybrid[0].id == "everest" and hybrid[0].backend == "hybrid"
    only = core.search(["the capital city"], 5, mode="dense", filters=[SearchFilter("title", ("Berlin", "Tokyo"))])[0]
    assert {p.id for p in only} == {"berlin", "tokyo"}
    core.upsert([Document("edit-tokyo", "Tokyo", "Tokyo has been the capital of Japan since 1869.", "edit")])
    assert core.search(["capital of Japan"], 1, mode="hybrid")[0][0].id == "edit-tokyo"
    assert core.stats().dense_enabled
    assert fake_server.violations == []
    knn_bodies = [b for b in fake_server.searches if "knn" in b or "knn" in b.get("query", {})]
    assert len(knn_bodies) >= 4  # the start-up probe, dense, hybrid, filtered dense, hybrid after the edit


def test_a_server_that_cannot_run_knn_is_refused_at_start_with_the_fix(osmem_url, encoder):
    s = RetrievalSettings(backend="elasticsearch", es_url=osmem_url, es_flavor="opensearch", es_index="kb-dense")
    with pytest.raises(DenseUnsupported, match="kNN search.*KNOWSERVE_RETRIEVAL_DENSE=false"):
        ElasticsearchBackend(s, encoder)
    bm25_only = RetrievalSettings(backend="elasticsearch", es_url=osmem_url, es_flavor="opensearch",
                                  es_index="kb-plain", dense=False, default_mode="bm25")
    backend = ElasticsearchBackend(bm25_only)
    backend.close()
    with pytest.raises(DenseUnsupported, match="no 'embedding' vector field"):  # an index made without vectors
        ElasticsearchBackend(RetrievalSettings(backend="elasticsearch", es_url=osmem_url, es_flavor="opensearch",
                                               es_index="kb-plain"), encoder)


def test_wrong_flavour_is_refused_with_the_setting_to_change(fake_server, encoder):
    other = "opensearch" if fake_server.flavor == "elasticsearch" else "elasticsearch"
    s = RetrievalSettings(backend="elasticsearch", es_url=fake_server.url, es_flavor=other, es_index="kb")
    with pytest.raises(DenseUnsupported, match=f"ES_FLAVOR={other}: set it to {fake_server.flavor}"):
        ElasticsearchBackend(s, encoder)
