"""Process and port facts read from the operating system: a free local port, a process's resident memory, and the
Ray Serve processes (proxy and replicas) started under a generation launcher. One home for what the benchmarks
(soak, retrieval, generation) and the tests (fuzz, stacks) measure.

>>> 0 < free_port() < 65536 and rss_bytes(os.getpid()) > 0
True
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    """A local TCP port free now, for a server bound right away (it is in the kernel's ephemeral range, so a
    socket bound to port 0 later may take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_bytes(pid: int) -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (resident peak) of a process, in bytes; empty if it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in lines)
            if k in ("VmRSS", "VmHWM")}


def rss_bytes(pid: int) -> int:
    """Resident memory of a process in bytes (0 if it is gone)."""
    return memory_bytes(pid).get("VmRSS", 0)


def serve_pids(launcher_pid: int) -> list[int]:
    """The Ray Serve proxy and replica processes in the session of ``launcher_pid`` (a generation launcher starts
    its own Ray head, so every Ray process it owns shares its session id)."""
    try:
        sid = os.getsid(launcher_pid)
    except (OSError, ProcessLookupError):
        return []
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == launcher_pid:
            continue
        try:
            if os.getsid(int(proc.name)) != sid:
                continue
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
        if cmd.startswith("ray::") and ("ServeReplica" in cmd or "ProxyActor" in cmd):
            out.append(int(proc.name))
    return out
