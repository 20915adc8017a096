"""Retrieval fixtures: the real MiniLM encoder (loaded once), real gRPC servers on port 0, the osmem-server emulator."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from services.common.server import GrpcServer
from services.retrieval.client import RetrievalClient
from services.retrieval.config import RetrievalSettings
from services.retrieval.core import Document
from services.retrieval.server import RetrievalApp

FACTS = [
    Document("paris", "Paris", "Paris is the capital and largest city of France, with 2.1 million residents.", "wiki"),
    Document("berlin", "Berlin", "Berlin is the capital of Germany and its most populous city.", "wiki"),
    Document("everest", "Mount Everest", "Mount Everest is Earth's highest mountain above sea level, 8,849 metres.",
             "wiki"),
    Document("lovelace", "Ada Lovelace", "Ada Lovelace was an English mathematician who wrote the first algorithm "
             "intended for Charles Babbage's Analytical Engine.", "wiki"),
    Document("tokyo", "Tokyo", "Tokyo is the capital of Japan. The Tokyo metropolitan area has 37 million people.",
             "wiki"),
]


@pytest.fixture(scope="session")
def encoder():
    from services.retrieval.encoder import SentenceEncoder

    return SentenceEncoder()


class Running:
    """A retrieval server started in-process, plus a client to it."""

    def __init__(self, settings: RetrievalSettings, encoder):
        self.settings = settings
        self.app = RetrievalApp(settings, encoder=encoder)
        self.server = GrpcServer(settings, self.app.bindings)
        self.client: RetrievalClient | None = None

    async def start(self) -> "Running":
        await self.server.start()
        await self.app.startup()
        await self.server.set_ready()
        self.client = RetrievalClient(self.server.address)
        return self

    async def stop(self) -> None:
        if self.client is None:
            return
        await self.client.close()
        self.client = None
        await self.server.stop(0)
        await self.app.shutdown()


@pytest.fixture
async def start_retrieval(encoder, tmp_path):
    """``await start_retrieval(**settings)`` -> a running service on a fresh data dir (or the one given)."""
    running: list[Running] = []

    async def start(**overrides) -> Running:
        settings = RetrievalSettings(**{"port": 0, "metrics_port": 0, "data_dir": tmp_path / "index", **overrides})
        r = await Running(settings, encoder if settings.dense else None).start()
        running.append(r)
        return r

    yield start
    for r in running:
        await r.stop()


@pytest.fixture
def osmem_url():
    """A fresh osmem-server (Elasticsearch/OpenSearch REST emulator) on a free loopback port."""
    from osmem_server import resolve_binary

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([resolve_binary(), "-addr", f"127.0.0.1:{port}", "-no-stdin-watch"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()
