"""Embedded backend: an on-disk tantivy BM25 index, plus dense MiniLM vectors stored beside it.

Layout of ``data_dir``::

    tantivy/          the BM25 index (one commit per write call: atomic, survives restarts)
    dense/            vectors, their write-ahead row log and the HNSW index (see :class:`DenseStore`)

The dense log is replayed at start-up; deleted rows are masked, never rewritten in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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


class DenseIndexMismatch(RuntimeError):
    """The stored vectors come from another encoder (or dimension) than the configured one."""


def dir_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``; a file removed while it is walked (tantivy merges and garbage-collects
    segments at any time) counts as gone, never as an error.

    >>> import tempfile; d = Path(tempfile.mkdtemp()); _ = (d / "a").write_bytes(b"xyz"); dir_bytes(d)
    3
    """
    total = 0
    for root, _dirs, files in os.walk(folder):  # os.walk skips a folder that vanishes mid-walk
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


def text_hash(text: str) -> str:
    """Short hash of a passage's text, logged with its vector so a restart can tell which side a crash hit.

    >>> text_hash("Paris is in France.") == text_hash("Paris is in France."), len(text_hash("x"))
    (True, 16)
    """
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


@dataclasses.dataclass
class _Batch:
    """One write call in the row log: where it starts (log offset, first row) and what it did."""

    offset: int
    first_row: int
    adds: list[dict]
    dels: list[str]


class DenseStore:
    """Dense vectors on disk, a replayable row log, and (above ``ann_min_rows``) an HNSW index over them.

    Layout of ``folder``::

        meta.json     {"encoder": identity, "dim": dim} - a store refuses to open with another encoder
        vectors.f32   appended float32 rows [n_rows, dim], memory-mapped (never read into RAM as a whole)
        rows.jsonl    row log: per write call {"op": "batch", "row"}, then {"op": "add", "row", "id", "doc",
                      "title", "source", "h"} / {"op": "del", "doc"} lines, then {"op": "end"}
        ann.faiss     HNSW index (ids = rows), a cache rebuilt from vectors.f32 whenever it does not match

    Each write call appends its vectors and then its log lines, fsynced, *before* the BM25 commit: the log is the
    write-ahead log. At start-up a batch without its ``end`` line (a crash mid-write) is cut off, vector bytes no
    complete batch refers to are truncated, and the backend checks the last batch against the BM25 index
    (:meth:`EmbeddedBackend._verify_last_dense_batch`) and drops it when the BM25 commit never happened.
    Deleted rows are masked, never rewritten in place.
    """

    def __init__(self, folder: Path, dim: int, encoder: str = "", settings: RetrievalSettings | None = None):
        self.folder = folder
        self.dim = dim
        self.encoder = encoder
        self.settings = settings or RetrievalSettings()
        folder.mkdir(parents=True, exist_ok=True)
        self.vectors_path = folder / "vectors.f32"
        self.rows_path = folder / "rows.jsonl"
        self._check_meta()
        self.ann = None
        self._fd: int | None = None  # read-only descriptor of vectors.f32 for re-scoring reads
        self._reset()
        self._load()

    # ---- opening -------------------------------------------------------------------------------------------
    def _check_meta(self) -> None:
        meta_path = self.folder / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("dim") != self.dim or (self.encoder and meta.get("encoder") not in ("", self.encoder)):
                raise DenseIndexMismatch(
                    f"{self.folder}: the stored vectors were made by encoder {meta.get('encoder')!r} "
                    f"(dim {meta.get('dim')}), the configured encoder is {self.encoder!r} (dim {self.dim}). "
                    f"Re-embed the corpus with the configured encoder: `knowserve reembed --data-dir "
                    f"{self.folder.parent}` (retrieval service stopped), or point KNOWSERVE_RETRIEVAL_ENCODER_PATH "
                    "back at the model that made them")
        else:
            meta_path.write_text(json.dumps({"encoder": self.encoder, "dim": self.dim}))

    def _reset(self) -> None:
        self.n = 0
        self.live = np.zeros(0, dtype=bool)  # [capacity]
        self.ids: list[str] = []
        self.rows_of_doc: dict[str, list[int]] = {}  # live rows per document (replace/delete, document_id filter)
        # filter field -> value -> rows ever written with it (dead rows are removed by the live mask)
        self.rows_by: dict[str, dict[str, list[int]]] = {"title": {}, "source": {}}
        self.dead = 0
        self.last_batch: _Batch | None = None
        self.matrix = np.zeros((0, self.dim), dtype=np.float32)

    def _remap(self) -> None:
        """Memory-map the first ``n`` stored rows ``[n, dim]`` (pages are read on demand, shared with the OS cache)."""
        self.matrix = (np.memmap(self.vectors_path, dtype=np.float32, mode="r", shape=(self.n, self.dim))
                       if self.n else np.zeros((0, self.dim), dtype=np.float32))

    def _load(self) -> None:
        stored_rows = self.vectors_path.stat().st_size // (4 * self.dim) if self.vectors_path.exists() else 0
        good_end = 0  # log offset after the last line (legacy) or batch (current) that is whole
        batch: _Batch | None = None
        if self.rows_path.exists():
            with self.rows_path.open("rb") as f:
                offset = 0
                for raw in f:
                    line_start, offset = offset, offset + len(raw)
                    try:
                        if not raw.endswith(b"\n"):
                            raise ValueError("torn line")
                        entry = json.loads(raw)
                    except ValueError:  # a torn last line after a crash
                        break
                    op = entry["op"]
                    if op == "batch":
                        batch = _Batch(line_start, entry["row"], [], [])
                    elif op == "end" and batch is not None:
                        if any(a["row"] >= stored_rows for a in batch.adds):
                            break  # its vectors never reached the disk
                        self._apply(batch)
                        self.last_batch, batch, good_end = batch, None, offset
                    elif batch is not None:  # inside a batch: applied when its end line is read
                        (batch.adds if op == "add" else batch.dels).append(entry if op == "add" else entry["doc"])
                    elif op == "add":  # legacy log without batch markers
                        if entry["row"] >= stored_rows:
                            break
                        self._apply(_Batch(line_start, entry["row"], [entry], []))
                        good_end = offset
                    else:
                        self._apply(_Batch(line_start, self.n, [], [entry["doc"]]))
                        good_end = offset
            if good_end < self.rows_path.stat().st_size:
                log.warning("dense row log cut after its last whole write (crash mid-write)",
                            extra={"path": str(self.rows_path), "kept_bytes": good_end})
                os.truncate(self.rows_path, good_end)
        if self.vectors_path.exists() and self.vectors_path.stat().st_size > self.n * 4 * self.dim:
            os.truncate(self.vectors_path, self.n * 4 * self.dim)  # vectors of a write whose log never completed
        self._remap()

    def _apply(self, batch: _Batch) -> None:
        for doc in batch.dels:
            self._delete_doc(doc)
        if batch.adds and batch.adds[-1]["row"] + 1 > len(self.live):
            self._grow(batch.adds[-1]["row"] + 1 - self.n)
        for entry in batch.adds:
            self._add_row(entry)

    def _grow(self, extra: int) -> None:
        need = self.n + extra
        if need > len(self.live):
            live = np.zeros(max(need, 2 * len(self.live), 1024), dtype=bool)
            live[: self.n] = self.live[: self.n]
            self.live = live

    def _add_row(self, entry: dict) -> None:
        self._grow(1)
        row = self.n
        self.live[row] = True
        self.ids.append(entry["id"])
        self.rows_of_doc.setdefault(entry["doc"], []).append(row)
        for field, key in (("title", "title"), ("source", "source")):
            self.rows_by[field].setdefault(entry[key], []).append(row)
        self.n += 1

    def _delete_doc(self, doc_id: str) -> None:
        rows = self.rows_of_doc.pop(doc_id, [])
        self.live[rows] = False
        self.dead += len(rows)

    def open_ann(self) -> None:
        """Load, catch up or build the HNSW index once the store is large enough (no-op when ANN is off)."""
        s = self.settings
        if not s.ann or self.live_rows < s.ann_min_rows:
            return
        from services.retrieval.ann import HnswIndex

        ann = HnswIndex(self.folder, self.dim, self.encoder, s.ann_m, s.ann_ef_construction, s.ann_ef_search)
        live = self.live[: self.n]
        if ann.load(self.n) and ann.indexed and (ann.indexed - int(live[: ann.rows].sum())) <= 0.3 * ann.indexed:
            if ann.rows < self.n:
                log.info("adding rows written since the ANN index was saved", extra={"rows": self.n - ann.rows})
                ann.add(self.matrix, live, ann.rows, self.n)
                ann.save()
        else:
            self._build(ann)
        self.ann = ann

    def _build(self, ann) -> None:
        from services.common.progress import progress

        with progress(total=self.n, unit="vec", desc="building ANN index") as bar:
            ann.build(self.matrix, self.live[: self.n], progress=bar.update)
        ann.save()

    # ---- writes --------------------------------------------------------------------------------------------
    def _append(self, lines: list[dict], vectors: np.ndarray | None) -> None:
        """Vectors first, then the batch's log lines; both fsynced (the write-ahead half of a write call)."""
        if vectors is not None and len(vectors):
            with self.vectors_path.open("ab") as vec_file:
                np.ascontiguousarray(vectors, dtype=np.float32).tofile(vec_file)
                vec_file.flush()
                os.fsync(vec_file.fileno())
        with self.rows_path.open("a") as log_file:
            log_file.write("\n".join(json.dumps(x) for x in lines) + "\n")
            log_file.flush()
            os.fsync(log_file.fileno())

    def replace(self, passages: Sequence[Passage], vectors: np.ndarray) -> None:
        """Replace every row of the passages' documents with the new vectors ``[len(passages), dim]``."""
        docs = list(dict.fromkeys(p.document_id for p in passages))
        first_row = self.n
        adds = [{"op": "add", "row": first_row + i, "id": p.id, "doc": p.document_id, "title": p.title,
                 "source": p.source, "h": text_hash(p.text)} for i, p in enumerate(passages)]
        offset = self.rows_path.stat().st_size if self.rows_path.exists() else 0
        self._append([{"op": "batch", "row": first_row}, *({"op": "del", "doc": d} for d in docs), *adds,
                      {"op": "end"}], vectors)
        batch = _Batch(offset, first_row, adds, docs)
        self._apply(batch)
        self.last_batch = batch
        self._remap()
        self._after_write(first_row)

    def delete(self, doc_ids: Sequence[str]) -> None:
        offset = self.rows_path.stat().st_size if self.rows_path.exists() else 0
        self._append([{"op": "batch", "row": self.n}, *({"op": "del", "doc": d} for d in doc_ids), {"op": "end"}],
                     None)
        batch = _Batch(offset, self.n, [], list(doc_ids))
        self._apply(batch)
        self.last_batch = batch

    def drop_last_batch(self) -> None:
        """Undo the last write call (its BM25 commit never happened): truncate the log and vectors, replay."""
        batch = self.last_batch
        if batch is None:
            return
        os.truncate(self.rows_path, batch.offset)
        os.truncate(self.vectors_path, batch.first_row * 4 * self.dim)
        self.close()
        ann, self.ann = self.ann, None
        self._reset()
        self._load()
        self.last_batch = None
        if ann is not None:
            self.open_ann()

    def _after_write(self, first_new_row: int) -> None:
        s = self.settings
        if self.ann is None:
            self.open_ann()
        elif self.n > first_new_row:
            self.ann.add(self.matrix, self.live[: self.n], first_new_row, self.n)
            if self.ann.unsaved >= s.ann_save_every:
                self.ann.save()

    def flush(self) -> None:
        """Save the ANN index if rows were added since its last save."""
        if self.ann is not None and self.ann.unsaved:
            self.ann.save()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ---- search --------------------------------------------------------------------------------------------
    def _mask(self, filters: Sequence[SearchFilter]) -> np.ndarray | None:
        """Rows that are live and pass the filters ``[n_rows]``; None when every row is live and unfiltered."""
        if not filters and not self.dead:
            return None
        mask = self.live[: self.n].copy()  # [n_rows]
        for f in filters:
            allowed = np.zeros(self.n, dtype=bool)  # [n_rows]
            for value in f.values:
                rows = self.rows_of_doc.get(value, []) if f.field == "document_id" \
                    else self.rows_by[f.field].get(value, [])
                allowed[rows] = True
            mask &= allowed
        return mask

    def _exact(self, q: np.ndarray, k: int, mask: np.ndarray | None) -> list[list[tuple[str, float]]]:
        """Exact top-``k`` over the allowed rows; gathers them first when the filter leaves few."""
        rows = np.flatnonzero(mask) if mask is not None else None  # [n_allowed]
        if rows is not None and len(rows) < self.n // 4:
            scores = q @ np.asarray(self.matrix[rows]).T  # [n_queries, n_allowed]
        else:
            scores = q @ self.matrix.T  # [n_queries, n_rows]
            if mask is not None:
                scores[:, ~mask] = -np.inf
            rows = None
        k = min(k, scores.shape[1])
        out = []
        for row in scores:
            top = np.argpartition(-row, k - 1)[:k]
            top = top[np.argsort(-row[top])]
            ids = rows[top] if rows is not None else top
            out.append([(self.ids[j], float(row[t])) for j, t in zip(ids, top)])
        return out

    def search(self, qvecs: np.ndarray, n: int, filters: Sequence[SearchFilter]) -> list[list[tuple[str, float]]]:
        """Top-``n`` (passage id, cosine) per query ``qvecs [n_queries, dim]`` among live rows that pass the filters."""
        if self.n == 0:
            return [[] for _ in range(len(qvecs))]
        mask = self._mask(filters)
        n_allowed = self.n if mask is None else int(mask.sum())
        if n_allowed == 0:
            return [[] for _ in range(len(qvecs))]
        k = min(n, n_allowed)
        if self.ann is None or (filters and n_allowed <= self.settings.ann_exact_below):
            return self._exact(qvecs, k, mask)
        candidates = min(n_allowed, k * self.settings.ann_rescore)
        _scores, rows = self.ann.search(qvecs, candidates, mask)  # [n_queries, candidates], row -1 = no more
        out = []
        for qi in range(len(qvecs)):
            found = rows[qi][rows[qi] >= 0]  # [n_found]
            if len(found) < k:  # the graph walk ran out of allowed rows: answer this query exactly
                out.append(self._exact(qvecs[qi: qi + 1], k, mask)[0])
                continue
            exact = self.read_rows(found) @ qvecs[qi]  # [n_found]: float32 cosines instead of the int8 ones
            top = np.argsort(-exact)[:k]
            out.append([(self.ids[found[t]], float(exact[t])) for t in top])
        return out

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors of ``rows`` ``[len(rows), dim]`` read with ``pread``: a few scattered rows per query go
        through the page cache without being mapped, so they do not pile up in the process's resident memory."""
        size = 4 * self.dim
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if self._fd is None:
            self._fd = os.open(self.vectors_path, os.O_RDONLY)
        for i, r in enumerate(rows):
            out[i] = np.frombuffer(os.pread(self._fd, size, int(r) * size), dtype=np.float32)
        return out

    @property
    def live_rows(self) -> int:
        return self.n - self.dead


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
        self._encode_pool = ThreadPoolExecutor(1, thread_name_prefix="encode")
        self.dense: DenseStore | None = None
        if encoder is not None:
            self.dense = DenseStore(self.folder / "dense", encoder.dim, getattr(encoder, "identity", ""), settings)
            self._verify_last_dense_batch()
            self.dense.open_ann()
            passages = self.index.searcher().num_docs
            if self.dense.live_rows != passages:
                log.warning("dense vectors out of step with the BM25 index; re-ingest to re-embed",
                            extra={"passages": passages, "dense_rows": self.dense.live_rows})

    def _verify_last_dense_batch(self) -> None:
        """Drop the dense log's last write if its BM25 commit never happened (a crash between the two)."""
        batch = self.dense.last_batch
        if batch is None:
            return
        searcher = self.index.searcher()
        if batch.adds:
            fetched = self._fetch(searcher, [a["id"] for a in batch.adds])
            committed = all(a["id"] in fetched and ("h" not in a or text_hash(fetched[a["id"]].text) == a["h"])
                            for a in batch.adds)
        else:
            committed = not any(self._exists(searcher, d) for d in batch.dels)
        if not committed:
            log.warning("the last dense write has no BM25 commit (crash between them); dropping it",
                        extra={"rows": len(batch.adds), "deleted_documents": len(batch.dels)})
            self.dense.drop_last_batch()

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
        lexical: list[list[Passage]] = [[] for _ in queries]
        if mode == "hybrid":
            # the encoder (ONNX Runtime, GIL released) runs beside the BM25 searches (tantivy, GIL released)
            encoded = self._encode_pool.submit(self.encoder.encode, list(queries))
            lexical = [self._bm25(searcher, q, pool, filters) for q in queries]
            dense_hits = self.dense.search(encoded.result(), pool, filters)
        elif mode == "dense":
            dense_hits = self.dense.search(self.encoder.encode(list(queries)), pool, filters)
        else:
            lexical = [self._bm25(searcher, q, pool, filters) for q in queries]
        out = []
        for qi, query in enumerate(queries):
            bm25 = lexical[qi]
            if mode == "bm25":
                out.append(apply_edit_boost(bm25, edit_boost, top_k))
                continue
            known = {p.id: p for p in bm25}  # dense hits BM25 already loaded are not fetched again
            fetched = self._fetch(searcher, [pid for pid, _ in dense_hits[qi] if pid not in known])
            fetched.update(known)
            if mode == "dense":
                ranked = [(pid, s) for pid, s in dense_hits[qi] if pid in fetched]
                backend = "dense"
            else:
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
            if self.dense is not None:  # the dense log is the write-ahead half: written and fsynced first
                self.dense.replace(passages, vectors)
            try:
                self._commit([d.id for d in documents], passages)
            except BaseException:
                if self.dense is not None:
                    self.dense.drop_last_batch()
                raise
        return UpsertResult(len(documents), len(passages), replaced)

    def delete(self, ids: Sequence[str]) -> DeleteResult:
        with self.lock:
            searcher = self.index.searcher()
            present = [i for i in ids if self._exists(searcher, i)]
            missing = [i for i in ids if i not in set(present)]
            if present:
                if self.dense is not None:
                    self.dense.delete(present)
                try:
                    self._commit(present, [])
                except BaseException:
                    if self.dense is not None:
                        self.dense.drop_last_batch()
                    raise
        return DeleteResult(len(present), missing)

    def stats(self) -> IndexStats:
        searcher = self.index.searcher()
        first = tantivy.Query.term_query(self.schema, "chunk", 0)
        edits = tantivy.Query.boolean_query([
            (tantivy.Occur.Must, first),
            (tantivy.Occur.Must, tantivy.Query.term_query(self.schema, "source", EDIT_SOURCE)),
        ])
        size = dir_bytes(self.folder)
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
        self._encode_pool.shutdown(wait=True)
        with self.lock:
            if self.dense is not None:
                self.dense.flush()
                self.dense.close()
            if self.writer is not None:
                self.writer.wait_merging_threads()  # consumes the writer
                self.writer = None


def reembed(settings: RetrievalSettings, encoder, batch_size: int = 512) -> int:
    """Re-embed every passage of the BM25 index with ``encoder`` into a new dense folder and swap it in.

    For a changed encoder (the store refuses to open otherwise) or a lost/damaged ``dense/`` folder. Run it with
    the retrieval service stopped; the old folder is replaced only once the new one is whole. Returns passages.
    """
    import shutil

    from services.common.progress import progress

    folder = Path(settings.data_dir)
    index = tantivy.Index.open(str(folder / "tantivy"))
    searcher = index.searcher()
    total = searcher.num_docs
    by_doc: dict[str, list[Passage]] = {}
    for _score, addr in (searcher.search(tantivy.Query.all_query(), total).hits if total else []):
        p = EmbeddedBackend._passage(searcher.doc(addr), 0.0, "tantivy")
        by_doc.setdefault(p.document_id, []).append(p)
    new = folder / "dense.new"
    shutil.rmtree(new, ignore_errors=True)
    store = DenseStore(new, encoder.dim, getattr(encoder, "identity", ""), settings.model_copy(update={"ann": False}))
    batch: list[Passage] = []

    def flush() -> None:
        if batch:
            store.replace(batch, encoder.encode([f"{p.title}: {p.text}" for p in batch]))
            bar.update(len(batch))
            batch.clear()

    with progress(total=total, unit="passage", desc="re-embedding") as bar:  # rate = passages/s
        for passages in by_doc.values():
            batch.extend(sorted(passages, key=lambda p: p.chunk))  # a document's passages stay in one batch
            if len(batch) >= batch_size:
                flush()
        flush()
    store.settings = settings
    store.open_ann()
    store.flush()
    old = folder / "dense.old"
    shutil.rmtree(old, ignore_errors=True)
    if (folder / "dense").exists():
        os.replace(folder / "dense", old)
    os.replace(new, folder / "dense")
    shutil.rmtree(old, ignore_errors=True)
    return total
