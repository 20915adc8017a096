"""The retrieval service over real gRPC, real tantivy and the real MiniLM encoder."""

from __future__ import annotations

import asyncio
import json
import subprocess

import grpc
import pytest

from knowserve.common.v1 import common_pb2
from knowserve.retrieval.v1 import retrieval_service_pb2 as pb
from services.common.clients import RemoteError
from services.retrieval.core import Document, SearchFilter
from tests.conftest import tool
from tests.retrieval.conftest import FACTS


async def test_search_modes_return_the_right_passage(start_retrieval):
    r = await start_retrieval()
    await r.client.upsert(FACTS)
    for mode in ("bm25", "dense", "hybrid"):
        results = await r.client.search(["What is the capital of France?", "tallest mountain on Earth"], top_k=2,
                                         mode=mode)
        assert results[0][0].id == "paris", (mode, results[0])
        assert results[1][0].id == "everest", (mode, results[1])
        assert results[0][0].backend == {"bm25": "tantivy", "dense": "dense", "hybrid": "hybrid"}[mode]
    # dense finds a paraphrase that shares no word with the passage
    assert (await r.client.search(["first computer programmer"], top_k=1, mode="dense"))[0][0].id == "lovelace"


async def test_empty_result_is_a_normal_answer_and_filters_apply(start_retrieval):
    r = await start_retrieval()
    await r.client.upsert(FACTS)
    assert (await r.client.search(["zyxwvut qqqq"], top_k=3, mode="bm25")) == [[]]
    hits = (await r.client.search(["capital"], top_k=5, mode="bm25",
                                  filters=[SearchFilter("title", ("Berlin", "Tokyo"))]))[0]
    assert {p.id for p in hits} == {"berlin", "tokyo"}
    dense = (await r.client.search(["capital city"], top_k=5, mode="dense",
                                   filters=[SearchFilter("title", ("Berlin", "Tokyo")),
                                            SearchFilter("source", ("wiki",))]))[0]
    assert {p.id for p in dense} == {"berlin", "tokyo"}
    assert (await r.client.search(["capital"], top_k=5, mode="hybrid",
                                  filters=[SearchFilter("source", ("edit",))])) == [[]]


async def test_edit_wins_on_next_search_and_survives_restart(start_retrieval, tmp_path):
    data_dir = tmp_path / "persist"
    r = await start_retrieval(data_dir=data_dir)
    await r.client.upsert(FACTS)
    question = "How many residents does Paris have?"
    assert (await r.client.search([question], top_k=1))[0][0].id == "paris"
    await r.client.upsert([Document("edit-paris-pop", "Paris",
                                    "Paris has 2.0 million residents according to the 2024 census.", "edit")])
    top = (await r.client.search([question], top_k=1))[0][0]
    assert (top.id, top.source) == ("edit-paris-pop", "edit")
    assert (await r.client.delete(["berlin", "nope"])).not_found_ids == ["nope"]
    await r.stop()

    r2 = await start_retrieval(data_dir=data_dir)
    for mode in ("bm25", "hybrid"):
        assert (await r2.client.search([question], top_k=1, mode=mode))[0][0].id == "edit-paris-pop"
        assert all(p.id != "berlin" for p in (await r2.client.search(["capital of Germany"], top_k=5, mode=mode))[0])
    stats = await r2.client.stats()
    assert (stats.documents, stats.edit_documents, stats.dense_enabled) == (5, 1, True)


async def test_upsert_same_id_replaces_and_long_documents_are_chunked(start_retrieval):
    r = await start_retrieval(chunk_words=20, chunk_overlap_words=5)
    first = await r.client.upsert(FACTS)
    again = await r.client.upsert(FACTS)
    assert (first.documents_replaced, again.documents_replaced) == (0, len(FACTS))
    long_text = " ".join(f"word{i}" for i in range(100)) + " zebra"
    up = await r.client.upsert([Document("long", "Long", long_text, "wiki")])
    assert up.passages_written == 7
    hit = (await r.client.search(["zebra"], top_k=1, mode="bm25"))[0][0]
    assert (hit.id, hit.document_id) == ("long#6", "long")
    await r.client.upsert([Document("long", "Long", "short now", "wiki")])  # old chunks are removed
    assert (await r.client.search(["zebra"], top_k=1, mode="bm25")) == [[]]
    assert (await r.client.stats()).passages == len(FACTS) + 1


@pytest.mark.parametrize(
    "request_kwargs, needle",
    [
        ({"queries": [""]}, "queries[0]: must not be empty"),
        ({"queries": ["ok", "   "]}, "queries[1]: must not be empty"),
        ({"queries": ["ok"], "top_k": -1}, "top_k: must be between 1 and 100"),
        ({"queries": ["ok"], "top_k": 101}, "top_k: must be between 1 and 100"),
        ({"queries": ["x" * 1_000_000]}, "queries[0]: is 1000000 bytes, above the limit of 4096"),
        ({"queries": []}, "queries: at least one query"),
        ({"queries": ["ok"], "filters": [pb.SearchFilter(field="colour", values=["red"])]}, "filters[0].field"),
    ],
)
async def test_bad_search_input_is_invalid_argument(start_retrieval, request_kwargs, needle):
    r = await start_retrieval(dense=False, default_mode="bm25")
    with pytest.raises(RemoteError) as err:
        await r.client.call("Search", pb.SearchRequest(**request_kwargs))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle in str(err.value), str(err.value)
    assert await r.client.check_health() == "SERVING"


@pytest.mark.parametrize(
    "documents, needle",
    [
        ([common_pb2.Document(id="a", title="A", text="")], "documents[0].text: must not be empty"),
        ([common_pb2.Document(id="a", text="x"), common_pb2.Document(id="a", text="y")], "duplicate id 'a'"),
        ([common_pb2.Document(id="", text="x")], "documents[0].id"),
        ([common_pb2.Document(id="a", text="x" * 2_000_000)], "above the limit of 1000000"),
    ],
)
async def test_bad_documents_are_rejected_and_nothing_is_written(start_retrieval, documents, needle):
    r = await start_retrieval(dense=False, default_mode="bm25")
    await r.client.upsert(FACTS[:2])
    good = common_pb2.Document(id="good", title="Good", text="this one is fine")
    with pytest.raises(RemoteError) as err:
        await r.client.call("UpsertDocuments", pb.UpsertDocumentsRequest(documents=[good, *documents]))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle.replace("[0]", "[1]") in str(err.value)
    assert (await r.client.stats()).documents == 2  # the valid document of the batch was not written either


async def test_invalid_utf8_document_is_invalid_argument(start_retrieval):
    r = await start_retrieval(dense=False, default_mode="bm25")
    raw = pb.UpsertDocumentsRequest(documents=[common_pb2.Document(id="a", text="caf\u00e9")]).SerializeToString()
    broken = raw.replace("caf\u00e9".encode(), b"caf\xff\xfe")
    call = r.client.channel.unary_unary("/knowserve.retrieval.v1.RetrievalService/UpsertDocuments",
                                        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(broken)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.value.details()
    assert await r.client.check_health() == "SERVING"


async def test_grpcurl_search_against_running_service(start_retrieval):
    r = await start_retrieval(dense=False, default_mode="bm25")
    await r.client.upsert(FACTS)
    out = await asyncio.to_thread(
        subprocess.run,
        [tool("grpcurl"), "-plaintext", "-d", '{"queries": ["highest mountain"], "top_k": 1}', r.server.address,
         "knowserve.retrieval.v1.RetrievalService/Search"],
        capture_output=True, text=True, check=True,
    )
    passage = json.loads(out.stdout)["results"][0]["passages"][0]
    assert passage["id"] == "everest" and passage["backend"] == "tantivy"


async def test_elasticsearch_backend_against_osmem(start_retrieval, osmem_url):
    r = await start_retrieval(backend="elasticsearch", dense=False, default_mode="bm25", es_url=osmem_url,
                              es_flavor="opensearch")
    await r.client.upsert(FACTS)
    hits = (await r.client.search(["capital of Japan"], top_k=2))[0]
    assert hits[0].id == "tokyo" and hits[0].backend == "elasticsearch"
    filtered = (await r.client.search(["capital"], top_k=5, filters=[SearchFilter("title", ("Berlin",))]))[0]
    assert [p.id for p in filtered] == ["berlin"]
    await r.client.upsert([Document("edit-tokyo", "Tokyo", "Tokyo is the capital of Japan since 1869.", "edit")])
    assert (await r.client.search(["capital of Japan"], top_k=1))[0][0].id == "edit-tokyo"
    assert (await r.client.delete(["edit-tokyo"])).documents_deleted == 1
    assert (await r.client.search(["capital of Japan"], top_k=1))[0][0].id == "tokyo"
    stats = await r.client.stats()
    assert (stats.backend, stats.documents, stats.edit_documents) == ("elasticsearch", 5, 0)
    with pytest.raises(RemoteError) as err:
        await r.client.call("Search", pb.SearchRequest(queries=["x"], mode=pb.SEARCH_MODE_DENSE))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "dense" in str(err.value)
