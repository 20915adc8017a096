"""Retrieval fixtures: the osmem-server emulator (the encoder and in-process servers live in tests/conftest.py)."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from tests.conftest import FACTS  # noqa: F401 - re-exported for the retrieval tests


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
