"""Streaming corpus ingestion: JSONL or Parquet rows (``id``, ``title``, ``text``, optional ``source``) in batches.

Never loads the whole corpus: JSONL is read line by line, Parquet batch by batch. Each batch is one
atomic upsert, so an interrupted ingest leaves the last committed batch searchable, and re-ingesting
the same ids replaces documents instead of duplicating them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from services.common.progress import progress as tqdm

from services.retrieval.core import Document, UpsertResult

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """Counts of one ingest run."""

    documents: int = 0
    passages: int = 0
    replaced: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(f"{where}: {why}")


def _row_to_document(row: dict, default_source: str) -> Document:
    missing = [k for k in ("id", "text") if not str(row.get(k) or "").strip()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return Document(id=str(row["id"]), title=str(row.get("title") or ""), text=str(row["text"]),
                    source=str(row.get("source") or default_source))


def iter_rows(path: Path) -> Iterator[tuple[str, dict | None, str]]:
    """Yield ``(location, row or None, error)`` from a .jsonl/.json-lines or .parquet file, streaming."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield f"row {n}", row, ""
    elif suffix in (".jsonl", ".ndjson", ".json"):
        with path.open("rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                    yield f"line {n}", row if isinstance(row, dict) else None, "" if isinstance(row, dict) else "not an object"
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    yield f"line {n}", None, f"invalid JSON/UTF-8 ({exc.__class__.__name__})"
    else:
        raise ValueError(f"{path}: unsupported corpus format {suffix!r}; use .jsonl or .parquet")


def count_rows(path: Path) -> int | None:
    """Row count for the progress bar's ETA (Parquet metadata, or a fast newline count for JSONL)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def ingest(path: Path, upsert: Callable[[list[Document]], UpsertResult], *, batch_size: int = 256,
           source: str = "", progress: bool = True) -> IngestReport:
    """Stream ``path`` into ``upsert`` in batches; rows without id/text or with bad JSON are skipped and counted."""
    path = Path(path)
    report = IngestReport()
    batch: dict[str, Document] = {}

    def flush() -> None:
        if batch:
            r = upsert(list(batch.values()))
            report.documents += r.documents_upserted
            report.passages += r.passages_written
            report.replaced += r.documents_replaced
            batch.clear()

    started = time.monotonic()
    bar = tqdm(total=count_rows(path), unit="doc", desc=f"ingest {path.name}", disable=not progress)
    with bar:
        for where, row, error in iter_rows(path):
            bar.update(1)
            if row is None:
                report.skip(where, error)
                continue
            try:
                doc = _row_to_document(row, source)
            except ValueError as exc:
                report.skip(where, str(exc))
                continue
            if doc.id in batch:  # a later row with the same id wins, as a later batch would
                flush()
            batch[doc.id] = doc
            if len(batch) >= batch_size:
                flush()
                bar.set_postfix(docs=report.documents, passages=report.passages,
                                passages_per_s=round(report.passages / max(time.monotonic() - started, 1e-9)))
        flush()
    took = time.monotonic() - started
    rate = round(report.passages / max(took, 1e-9))
    log.info("ingest done", extra={"documents": report.documents, "passages": report.passages,
                                   "seconds": round(took, 1), "passages_per_s": rate})
    return report


async def ingest_through_service(path: Path, client, *, batch_size: int = 256, source: str = "",
                                 progress: bool = True) -> IngestReport:
    """:func:`ingest` into a running retrieval service: file reading in a thread, Upsert RPCs on this loop."""
    loop = asyncio.get_running_loop()

    def upsert(batch: list[Document]) -> UpsertResult:
        return asyncio.run_coroutine_threadsafe(client.upsert(batch), loop).result()

    return await asyncio.to_thread(ingest, path, upsert, batch_size=batch_size, source=source, progress=progress)
