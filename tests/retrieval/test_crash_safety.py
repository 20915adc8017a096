"""`kill -9` of the retrieval service (a real process) while clients write to it, then a restart on the same data:

* during a large ingest (one client, 400-document batches) and during a burst of small UpsertDocuments from
  four clients at once (with the dense side on, so the write-ahead vector log is in play too);
* after the restart the index opens and reports SERVING; every acknowledged document is searchable, all of its
  passages; a document whose upsert was not acknowledged is all there or not there at all, never half.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from knowserve.common.v1 import common_pb2 as cpb
from knowserve.retrieval.v1 import retrieval_service_pb2 as rpb
from knowserve.retrieval.v1 import retrieval_service_pb2_grpc as rpb_grpc
from tests.conftest import ROOT, free_port

PASSAGES = 3  # per document: chunk_words=16, no overlap, 16 words each
FILLER = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron"


def text_of(doc: str) -> str:
    """Three 16-word passages, each opened by its own token (`<doc>p<k>`, letters and digits only)."""
    return " ".join(f"{token(doc, k)} {FILLER}" for k in range(PASSAGES))


def token(doc: str, k: int) -> str:
    return f"{doc.replace('-', 'x')}p{k}"


class Service:
    def __init__(self, data: Path, dense: bool):
        self.data, self.port = data, free_port()
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", KNOWSERVE_RETRIEVAL_PORT=str(self.port),
                        KNOWSERVE_RETRIEVAL_METRICS_PORT=str(free_port()), KNOWSERVE_RETRIEVAL_DATA_DIR=str(data),
                        KNOWSERVE_RETRIEVAL_DENSE=str(dense).lower(),
                        KNOWSERVE_RETRIEVAL_DEFAULT_MODE="hybrid" if dense else "bm25",
                        KNOWSERVE_RETRIEVAL_CHUNK_WORDS="16", KNOWSERVE_RETRIEVAL_CHUNK_OVERLAP_WORDS="0",
                        KNOWSERVE_RETRIEVAL_LOG_JSON="false")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "Service":
        self.log = open(self.data.parent / f"retrieval-{time.monotonic_ns()}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.retrieval"], cwd=ROOT, env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-3000:]
            try:
                with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
                    reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return self
            except grpc.RpcError:
                pass
            time.sleep(0.3)
        raise AssertionError("retrieval did not start:\n" + Path(self.log.name).read_text()[-3000:])

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def write(port: int, client: int, batch: int, acked: list, attempted: list, stop: threading.Event) -> None:
    """Upsert batches of ``batch`` new documents until the service dies; ids of acknowledged and sent batches."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = rpb_grpc.RetrievalServiceStub(ch)
        b = 0
        while not stop.is_set():
            ids = [f"c{client}-{b}-{j}" for j in range(batch)]
            attempted.extend(ids)
            try:
                stub.UpsertDocuments(rpb.UpsertDocumentsRequest(documents=[
                    cpb.Document(id=i, title=f"Doc {i}", text=text_of(i), source="crash") for i in ids]), timeout=30)
            except grpc.RpcError:
                return  # the service is gone: this batch is not acknowledged
            acked.extend(ids)
            b += 1


def visible(port: int, docs: list[str]) -> dict[str, int]:
    """How many of each document's passages a search by their tokens finds."""
    found: dict[str, int] = {d: 0 for d in docs}
    queries = [(d, token(d, k)) for d in docs for k in range(PASSAGES)]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = rpb_grpc.RetrievalServiceStub(ch)
        for i in range(0, len(queries), 200):
            chunk = queries[i: i + 200]
            reply = stub.Search(rpb.SearchRequest(queries=[q for _, q in chunk], top_k=1,
                                                  mode=rpb.SEARCH_MODE_BM25), timeout=60)
            for (doc, q), result in zip(chunk, reply.results):
                if result.passages and q in result.passages[0].text.split() and \
                        result.passages[0].document_id == doc:
                    found[doc] += 1
    return found


@pytest.mark.parametrize("case", ["large_ingest", "burst_of_four_clients"])
def test_acknowledged_upserts_survive_kill_9_and_nothing_is_half_visible(tmp_path, case):
    dense = case == "burst_of_four_clients"
    clients, batch, target = (1, 400, 1200) if case == "large_ingest" else (4, 5, 120)
    service = Service(tmp_path / "index", dense).start()
    rng = random.Random(case)
    try:
        for round_ in range(2):  # twice: the second crash hits an index that already recovered once
            acked: list[str] = []
            attempted: list[str] = []
            stop = threading.Event()
            writers = [threading.Thread(target=write, args=(service.port, f"{round_}{c}", batch, acked, attempted,
                                                            stop), daemon=True) for c in range(clients)]
            for w in writers:
                w.start()
            deadline = time.monotonic() + 240
            while len(acked) < target and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(acked) >= target, f"only {len(acked)} documents acknowledged"
            time.sleep(rng.uniform(0.0, 0.2))  # somewhere inside the next writes
            service.kill9()
            stop.set()
            for w in writers:
                w.join(60)
            acked_now = list(acked)  # nothing can be acknowledged after the kill
            service.start()  # the index opens on the same data
            found = visible(service.port, list(attempted))
            lost = [d for d in acked_now if found[d] != PASSAGES]
            assert not lost, f"{len(lost)} acknowledged documents are not (all) searchable: {lost[:5]}"
            half = {d: n for d, n in found.items() if n not in (0, PASSAGES)}
            assert not half, f"documents half visible after the crash: {list(half.items())[:5]}"
            print(f"{case} round {round_}: {len(acked_now)} acknowledged, "
                  f"{sum(n == PASSAGES for d, n in found.items() if d not in set(acked_now))} unacknowledged "
                  f"landed whole, of {len(attempted) - len(acked_now)} in flight")
    finally:
        service.stop()
