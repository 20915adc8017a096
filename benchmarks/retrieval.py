"""Retrieval benchmark: index build time, in-process QPS and gRPC p50/p99 for embedded BM25 and hybrid,
beside the bm25s and rank_bm25 baselines on the same passages and queries, in the same run.

    .venv/bin/python benchmarks/retrieval.py                      # 100k passages, 1,000 queries, BM25 + hybrid
    .venv/bin/python benchmarks/retrieval.py --passages 20000 --no-hybrid

Passages: the ~10k Wikipedia demo leads replicated (ids suffixed) up to --passages, so the length
distribution is the real one. Replicas have identical text, so the dense encoder embeds each
distinct text once (a cache keyed by text); BM25 indexes every replica.
Targets (issue #3): gRPC Search p50 <= 3 ms and p99 <= 15 ms for BM25 top-10; embedded BM25 >= 5x the baseline QPS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.retrieval.config import RetrievalSettings  # noqa: E402
from services.retrieval.core import Document, RetrievalCore  # noqa: E402
from services.retrieval.demo_corpus import build_wiki_corpus  # noqa: E402
from services.retrieval.embedded import EmbeddedBackend  # noqa: E402


class CachedEncoder:
    """Encodes each distinct text once (replicated passages share vectors)."""

    def __init__(self, encoder):
        self.encoder, self.dim, self.cache = encoder, encoder.dim, {}

    def encode(self, texts):
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for t, v in zip(missing, self.encoder.encode(missing)):
                self.cache[t] = v
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def load_docs(n: int) -> list[Document]:
    corpus = ROOT / ".knowserve" / "data" / "wiki.jsonl"
    if not corpus.exists():
        build_wiki_corpus(corpus)
    base = [json.loads(line) for line in corpus.open()]
    docs = []
    for i in range(n):
        row = base[i % len(base)]
        docs.append(Document(f"{row['id']}~{i // len(base)}", row["title"], row["text"], "wikipedia"))
    return docs


def make_queries(docs: list[Document], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choice(docs).text.split()
        start = rng.randrange(max(1, len(words) - 8))
        out.append(" ".join(words[start : start + rng.randint(3, 8)]))
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def build_index(docs, data_dir: Path, encoder) -> tuple[RetrievalCore, float]:
    dense = encoder is not None
    s = RetrievalSettings(data_dir=data_dir, dense=dense, default_mode="hybrid" if dense else "bm25")
    core = RetrievalCore(s, EmbeddedBackend(s, encoder))
    t0 = time.perf_counter()
    for i in range(0, len(docs), 2000):
        core.upsert(docs[i : i + 2000])
    return core, time.perf_counter() - t0


def in_process_qps(core: RetrievalCore, queries: list[str], mode: str) -> float:
    t0 = time.perf_counter()
    for q in queries:
        core.search([q], 10, mode=mode)
    return len(queries) / (time.perf_counter() - t0)


def grpc_latencies(data_dir: Path, queries: list[str], mode: str, dense: bool) -> tuple[float, float]:
    import grpc

    from knowserve.retrieval.v1 import retrieval_service_pb2 as pb
    from knowserve.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), KNOWSERVE_RETRIEVAL_PORT=str(port),
               KNOWSERVE_RETRIEVAL_DATA_DIR=str(data_dir), KNOWSERVE_RETRIEVAL_DENSE=str(dense).lower(),
               KNOWSERVE_RETRIEVAL_DEFAULT_MODE=mode)
    env.pop("KNOWSERVE_RETRIEVAL_METRICS_PORT", None)
    env["KNOWSERVE_RETRIEVAL_METRICS_PORT"] = "0"
    proc = subprocess.Popen([sys.executable, "-m", "services.retrieval"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=120)
        stub = pb_grpc.RetrievalServiceStub(channel)
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(channel)
        while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING:
            time.sleep(0.2)
        for q in queries[:50]:  # warm-up
            stub.Search(pb.SearchRequest(queries=[q], top_k=10))
        lat = []
        for q in queries:
            t0 = time.perf_counter()
            stub.Search(pb.SearchRequest(queries=[q], top_k=10))
            lat.append((time.perf_counter() - t0) * 1000)
        return percentile(lat, 50), percentile(lat, 99)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def baselines(docs: list[Document], queries: list[str], rank_bm25_queries: int) -> dict[str, tuple[float, float]]:
    """(build seconds, QPS) for bm25s and rank_bm25 on the same passages."""
    import bm25s
    from rank_bm25 import BM25Okapi

    texts = [f"{d.title} {d.text}" for d in docs]
    out = {}
    t0 = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    for q in queries:
        retriever.retrieve(bm25s.tokenize([q], stopwords="en", show_progress=False), k=10, show_progress=False)
    out["bm25s"] = (build, len(queries) / (time.perf_counter() - t0))

    t0 = time.perf_counter()
    bm = BM25Okapi([t.lower().split() for t in texts])
    build = time.perf_counter() - t0
    sample = queries[:rank_bm25_queries]
    t0 = time.perf_counter()
    for q in sample:
        scores = bm.get_scores(q.lower().split())
        np.argpartition(-scores, 10)[:10]
    out["rank_bm25"] = (build, len(sample) / (time.perf_counter() - t0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rank-bm25-queries", type=int, default=50, help="rank_bm25 is O(corpus) per query")
    parser.add_argument("--no-hybrid", action="store_true")
    args = parser.parse_args()

    docs = load_docs(args.passages)
    queries = make_queries(docs, args.queries)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bm25_dir = Path(tmp) / "bm25"
        core, build = build_index(docs, bm25_dir, None)
        qps = in_process_qps(core, queries, "bm25")
        core.backend.close()
        p50, p99 = grpc_latencies(bm25_dir, queries, "bm25", dense=False)
        rows.append(("knowserve embedded BM25 (tantivy)", build, qps, p50, p99))
        if not args.no_hybrid:
            from services.retrieval.encoder import SentenceEncoder

            hybrid_dir = Path(tmp) / "hybrid"
            core, build = build_index(docs, hybrid_dir, CachedEncoder(SentenceEncoder()))
            qps = in_process_qps(core, queries, "hybrid")
            core.backend.close()
            p50, p99 = grpc_latencies(hybrid_dir, queries, "hybrid", dense=True)
            rows.append(("knowserve embedded hybrid (BM25+MiniLM, RRF)", build, qps, p50, p99))
        for name, (build, qps) in baselines(docs, queries, args.rank_bm25_queries).items():
            rows.append((f"baseline {name} (in-process)", build, qps, float("nan"), float("nan")))

    print(f"\n{len(docs):,} passages, {len(queries):,} queries, top-10, {os.cpu_count()} CPUs")
    print(f"{'engine':48s} {'build s':>9s} {'QPS':>9s} {'gRPC p50 ms':>12s} {'gRPC p99 ms':>12s}")
    for name, build, qps, p50, p99 in rows:
        print(f"{name:48s} {build:9.1f} {qps:9.1f} {p50:12.2f} {p99:12.2f}")
    bm25 = rows[0]
    base = {name: qps for name, _, qps, _, _ in rows if name.startswith("baseline")}
    best_baseline = max(base.values())
    print(f"\ntarget gRPC p50 <= 3 ms: {bm25[3]:.2f} ms {'PASS' if bm25[3] <= 3 else 'MISS'}; "
          f"p99 <= 15 ms: {bm25[4]:.2f} ms {'PASS' if bm25[4] <= 15 else 'MISS'}")
    for name, qps in base.items():
        print(f"embedded BM25 vs {name}: {bm25[2] / qps:.1f}x QPS (target >= 5x)")
    print(f"vs the strongest baseline: {bm25[2] / best_baseline:.1f}x {'PASS' if bm25[2] >= 5 * best_baseline else 'MISS'}")


if __name__ == "__main__":
    main()
