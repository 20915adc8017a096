"""Streaming ingestion: JSONL and Parquet, idempotent re-ingest, bad rows, and an interrupted ingest."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.retrieval.config import RetrievalSettings
from services.retrieval.core import RetrievalCore
from services.retrieval.embedded import EmbeddedBackend
from services.retrieval.ingest import ingest


def write_jsonl(path, n, bad_lines=()):
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"d{i}", "title": f"Doc {i}", "text": f"document number {i} about topic{i % 7}"})
                    + "\n")
        for line in bad_lines:
            f.write(line + "\n")
    return path


def core_at(path) -> RetrievalCore:
    s = RetrievalSettings(data_dir=path, dense=False, default_mode="bm25")
    return RetrievalCore(s, EmbeddedBackend(s))


def test_jsonl_ingest_is_idempotent_and_counts_bad_rows(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", 50, bad_lines=['{"id": "x"}', "not json", '{"text": "no id"}'])
    core = core_at(tmp_path / "idx")
    first = ingest(corpus, core.upsert, batch_size=16, progress=False)
    assert (first.documents, first.replaced, first.skipped) == (50, 0, 3)
    assert any("missing text" in e for e in first.skipped_examples)
    second = ingest(corpus, core.upsert, batch_size=16, progress=False)
    assert (second.documents, second.replaced) == (50, 50)
    assert core.stats().documents == 50 and core.stats().passages == 50


def test_parquet_ingest(tmp_path):
    table = pa.table({"id": ["p1", "p2"], "title": ["A", "B"], "text": ["alpha text", "beta text"],
                      "source": ["kb", None]})
    pq.write_table(table, tmp_path / "c.parquet")
    core = core_at(tmp_path / "idx")
    report = ingest(tmp_path / "c.parquet", core.upsert, source="default-src", progress=False)
    assert report.documents == 2
    hit = core.search(["beta"], 1)[0][0]
    assert (hit.id, hit.source) == ("p2", "default-src")


def test_interrupted_ingest_leaves_committed_state_searchable(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", 100)
    core = core_at(tmp_path / "idx")
    calls = 0

    def flaky_upsert(batch):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt  # the process dies in the middle of the third batch
        return core.upsert(batch)

    with pytest.raises(KeyboardInterrupt):
        ingest(corpus, flaky_upsert, batch_size=20, progress=False)
    core.backend.close()
    reopened = core_at(tmp_path / "idx")
    assert reopened.stats().documents == 40
    assert reopened.search(["document number 39"], 1)[0][0].id == "d39"
