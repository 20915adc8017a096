"""Embedded backend: an on-disk tantivy BM25 index, plus dense MiniLM vectors stored beside it.

Layout of ``data_dir``::

    tantivy/          the BM25 index (one commit per write call: atomic, survives restarts)
    dense/vectors.f32 appended float32 rows  [n_rows, dim]
    dense/rows.jsonl  appended row log: {"op": "add", "row", "id", "doc", "title", "source"} | {"op": "del", "doc"}

The dense log is replayed at start-up; deleted rows are masked, never rewritten in place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tantivy

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
    query_terms,
    reciprocal_rank_fusion,
)

log = logging.getLogger(__name__)

# passage field -> tantivy field holding its exact value (raw tokenizer)
_EXACT_FIELD = {"source": "source", "title": "title_exact", "document_id": "document_id"}


def _schema() -> tantivy.Schema:
    b = tantivy.SchemaBuilder()
    b.add_text_field("passage_id", stored=True, tokenizer_name="raw")
    b.add_text_field("document_id", stored=True, tokenizer_name="raw")
    b.add_text_field("title", stored=True, tokenizer_name="en_stem")
    b.add_text_field("title_exact", stored=False, tokenizer_name="raw")
    b.add_text_field("text", stored=True, tokenizer_name="en_stem")
    b.add_text_field("source", stored=True, tokenizer_name="raw")
    b.add_integer_field("chunk", stored=True, indexed=True)
    return b.build()


class DenseStore:
    """Append-only dense vectors with a replayable row log; search is a matrix product over live rows."""

    def __init__(self, folder: Path, dim: int):
        self.folder = folder
        self.dim = dim
        folder.mkdir(parents=True, exist_ok=True)
        self.vectors_path = folder / "vectors.f32"
        self.rows_path = folder / "rows.jsonl"
        self.matrix = np.zeros((0, dim), dtype=np.float32)  # [capacity, dim]
        self.n = 0
        self.live = np.zeros(0, dtype=bool)  # [capacity]
        self.ids: list[str] = []
        self.rows_of_doc: dict[str, list[int]] = {}  # live rows per document (for replace/delete)
        # filter field -> value -> rows ever written with it (dead rows are removed by the live mask)
        self.rows_by: dict[str, dict[str, list[int]]] = {"document_id": {}, "title": {}, "source": {}}
        self._load()

    def _grow(self, extra: int) -> None:
        need = self.n + extra
        if need <= len(self.matrix):
            return
        cap = max(need, 2 * len(self.matrix), 1024)
        m = np.zeros((cap, self.dim), dtype=np.float32)
        m[: self.n] = self.matrix[: self.n]
        live = np.zeros(cap, dtype=bool)
        live[: self.n] = self.live[: self.n]
        self.matrix, self.live = m, live

    def _load(self) -> None:
        if not self.rows_path.exists():
            return
        raw = np.fromfile(self.vectors_path, dtype=np.float32) if self.vectors_path.exists() else np.zeros(0)
        stored = raw.reshape(-1, self.dim)
        with self.rows_path.open() as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a torn last line after a crash
                    break
                if entry["op"] == "add":
                    if entry["row"] >= len(stored):
                        break
                    self._add_row(entry, stored[entry["row"]])
                else:
                    self._delete_doc(entry["doc"])

    def _add_row(self, entry: dict, vector: np.ndarray) -> None:
        self._grow(1)
        row = self.n
        self.matrix[row] = vector
        self.live[row] = True
        self.ids.append(entry["id"])
        self.rows_of_doc.setdefault(entry["doc"], []).append(row)
        for field, key in (("document_id", "doc"), ("title", "title"), ("source", "source")):
            self.rows_by[field].setdefault(entry[key], []).append(row)
        self.n += 1

    def _delete_doc(self, doc_id: str) -> None:
        for row in self.rows_of_doc.pop(doc_id, []):
            self.live[row] = False

    def replace(self, passages: Sequence[Passage], vectors: np.ndarray) -> None:
        """Replace every row of the passages' documents with the new vectors, and append to the log."""
        docs = list(dict.fromkeys(p.document_id for p in passages))
        first_row = self.n
        with self.rows_path.open("a") as log_file, self.vectors_path.open("ab") as vec_file:
            vectors.astype(np.float32).tofile(vec_file)
            vec_file.flush()
            lines = [json.dumps({"op": "del", "doc": d}) for d in docs]
            for d in docs:
                self._delete_doc(d)
            for i, p in enumerate(passages):
                entry = {"op": "add", "row": first_row + i, "id": p.id, "doc": p.document_id, "title": p.title,
                         "source": p.source}
                self._add_row(entry, vectors[i])
                lines.append(json.dumps(entry))
            log_file.write("\n".join(lines) + "\n")
            log_file.flush()

    def delete(self, doc_ids: Sequence[str]) -> None:
        with self.rows_path.open("a") as log_file:
            for d in doc_ids:
                self._delete_doc(d)
                log_file.write(json.dumps({"op": "del", "doc": d}) + "\n")

    def search(self, qvecs: np.ndarray, n: int, filters: Sequence[SearchFilter]) -> list[list[tuple[str, float]]]:
        """Top-``n`` (passage id, cosine) per query among live rows that pass the filters."""
        if self.n == 0:
            return [[] for _ in range(len(qvecs))]
        mask = self.live[: self.n].copy()  # [n_rows]
        for f in filters:
            allowed = np.zeros(self.n, dtype=bool)  # [n_rows]
            for value in f.values:
                allowed[self.rows_by[f.field].get(value, [])] = True
            mask &= allowed
        n_live = int(mask.sum())
        if n_live == 0:
            return [[] for _ in range(len(qvecs))]
        scores = qvecs @ self.matrix[: self.n].T  # [n_queries, n_rows]; no copy of the matrix
        scores[:, ~mask] = -np.inf
        k = min(n, n_live)
        out = []
        for row in scores:
            top = np.argpartition(-row, k - 1)[:k]
            top = top[np.argsort(-row[top])]
            out.append([(self.ids[j], float(row[j])) for j in top])
        return out

    @property
    def live_rows(self) -> int:
        return int(self.live[: self.n].sum())


class EmbeddedBackend:
    """tantivy BM25 + optional dense vectors, in one folder."""

    name = "embedded"

    def __init__(self, settings: RetrievalSettings, encoder=None):
        self.settings = settings
        self.folder = Path(settings.data_dir)
        index_dir = self.folder / "tantivy"
        index_dir.mkdir(parents=True, exist_ok=True)
        schema = _schema()
        self.index = tantivy.Index(schema, path=str(index_dir), reuse=True)
        self.schema = self.index.schema
        self.writer = self.index.writer(heap_size=128_000_000, num_threads=1)
        self.lock = threading.Lock()
        self.encoder = encoder
        self.dense: DenseStore | None = None
        if encoder is not None:
            self.dense = DenseStore(self.folder / "dense", encoder.dim)
            passages = self.index.searcher().num_docs
            if self.dense.live_rows != passages:
                log.warning("dense vectors out of step with the BM25 index; re-ingest to re-embed",
                            extra={"passages": passages, "dense_rows": self.dense.live_rows})

    @property
    def dense_enabled(self) -> bool:
        return self.dense is not None

    # ---- queries -------------------------------------------------------------------------------------------
    def _filter_query(self, filters: Sequence[SearchFilter]) -> list[tuple[tantivy.Occur, tantivy.Query]]:
        clauses = []
        for f in filters:
            terms = [(tantivy.Occur.Should, tantivy.Query.term_query(self.schema, _EXACT_FIELD[f.field], v))
                     for v in f.values]
            clauses.append((tantivy.Occur.Must, tantivy.Query.boolean_query(terms)))
        return clauses

    def _bm25(self, searcher, query: str, n: int, filters: Sequence[SearchFilter]) -> list[Passage]:
        text = query_terms(query)
        if not text:
            return []
        parsed, _errors = self.index.parse_query_lenient(
            text, ["title", "text"], field_boosts={"title": self.settings.title_boost}
        )
        q = tantivy.Query.boolean_query([(tantivy.Occur.Must, parsed), *self._filter_query(filters)]) if filters \
            else parsed
        result = searcher.search(q, n)
        return [self._passage(searcher.doc(addr), score, "tantivy") for score, addr in result.hits]

    @staticmethod
    def _passage(doc, score: float, backend: str) -> Passage:
        d = doc.to_dict()
        return Passage(id=d["passage_id"][0], document_id=d["document_id"][0], title=d["title"][0],
                       text=d["text"][0], source=d["source"][0], chunk=d["chunk"][0], score=float(score),
                       backend=backend)

    def _fetch(self, searcher, ids: Sequence[str]) -> dict[str, Passage]:
        if not ids:
            return {}
        q = tantivy.Query.boolean_query(
            [(tantivy.Occur.Should, tantivy.Query.term_query(self.schema, "passage_id", i)) for i in ids]
        )
        hits = searcher.search(q, len(ids)).hits
        return {p.id: p for p in (self._passage(searcher.doc(a), 0.0, "tantivy") for _, a in hits)}

    def search(self, queries: Sequence[str], top_k: int, filters: Sequence[SearchFilter], mode: str,
               edit_boost: float) -> list[list[Passage]]:
        searcher = self.index.searcher()
        pool = max(3 * top_k, top_k + 20)  # candidates re-ranked by the edit boost / fusion
        dense_hits: list[list[tuple[str, float]]] = [[] for _ in queries]
        if mode in ("dense", "hybrid"):
            dense_hits = self.dense.search(self.encoder.encode(list(queries)), pool, filters)
        out = []
        for qi, query in enumerate(queries):
            bm25 = self._bm25(searcher, query, pool, filters) if mode in ("bm25", "hybrid") else []
            if mode == "bm25":
                out.append(apply_edit_boost(bm25, edit_boost, top_k))
                continue
            fetched = self._fetch(searcher, [pid for pid, _ in dense_hits[qi]])
            if mode == "dense":
                ranked = [(pid, s) for pid, s in dense_hits[qi] if pid in fetched]
                backend = "dense"
            else:
                fetched.update({p.id: p for p in bm25})
                ranked = reciprocal_rank_fusion([[p.id for p in bm25], [pid for pid, _ in dense_hits[qi]
                                                                        if pid in fetched]], k=self.settings.rrf_k)
                backend = "hybrid"
            passages = [dataclasses.replace(fetched[pid], score=s, backend=backend) for pid, s in ranked]
            out.append(apply_edit_boost(passages, edit_boost, top_k))
        return out

    # ---- writes --------------------------------------------------------------------------------------------
    def _exists(self, searcher, doc_id: str) -> bool:
        return searcher.search(tantivy.Query.term_query(self.schema, "document_id", doc_id), 1).count > 0

    def _commit(self, delete_doc_ids: Sequence[str], passages: Sequence[Passage]) -> None:
        """One atomic tantivy commit: delete the documents' passages, add ``passages``; rolled back on any error."""
        try:
            for doc_id in delete_doc_ids:
                self.writer.delete_documents_by_term("document_id", doc_id)
            for p in passages:
                self.writer.add_document(tantivy.Document(
                    passage_id=p.id, document_id=p.document_id, title=p.title, title_exact=p.title,
                    text=p.text, source=p.source, chunk=p.chunk,
                ))
            self.writer.commit()
        except BaseException:
            self.writer.rollback()
            raise
        self.index.reload()

    def upsert(self, documents: Sequence[Document], passages: Sequence[Passage]) -> UpsertResult:
        vectors = self.encoder.encode([f"{p.title}: {p.text}" for p in passages]) if self.dense else None
        with self.lock:
            searcher = self.index.searcher()
            replaced = sum(self._exists(searcher, d.id) for d in documents)
            self._commit([d.id for d in documents], passages)
            if self.dense is not None:
                self.dense.replace(passages, vectors)
        return UpsertResult(len(documents), len(passages), replaced)

    def delete(self, ids: Sequence[str]) -> DeleteResult:
        with self.lock:
            searcher = self.index.searcher()
            present = [i for i in ids if self._exists(searcher, i)]
            missing = [i for i in ids if i not in set(present)]
            if present:
                self._commit(present, [])
                if self.dense is not None:
                    self.dense.delete(present)
        return DeleteResult(len(present), missing)

    def stats(self) -> IndexStats:
        searcher = self.index.searcher()
        first = tantivy.Query.term_query(self.schema, "chunk", 0)
        edits = tantivy.Query.boolean_query([
            (tantivy.Occur.Must, first),
            (tantivy.Occur.Must, tantivy.Query.term_query(self.schema, "source", EDIT_SOURCE)),
        ])
        size = sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())
        return IndexStats(
            backend=self.name,
            documents=searcher.search(first, 1).count,
            passages=searcher.num_docs,
            edit_documents=searcher.search(edits, 1).count,
            dense_enabled=self.dense_enabled,
            index_size_bytes=size,
        )

    def close(self) -> None:
        """Finish merges and release the index lock; idempotent."""
        with self.lock:
            if self.writer is not None:
                self.writer.wait_merging_threads()  # consumes the writer
                self.writer = None
