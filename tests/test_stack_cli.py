"""`knowserve up / status / edit / search / ingest / down` as a user runs them, against real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from services.stack import isolated_env
from tests.conftest import ROOT, free_port


def knowserve(env, *args, check=True):
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=check, timeout=240)


def test_local_stack_lifecycle(tmp_path, subprocess_env):
    port = free_port()
    env = isolated_env(tmp_path / "run", {"retrieval": port}, base=subprocess_env, RETRIEVAL_DENSE="false",
                       RETRIEVAL_DEFAULT_MODE="bm25")
    env["COLUMNS"] = "200"
    prom_port = int(env["KNOWSERVE_STACK_PROMETHEUS_PORT"])
    target = ["--target", f"127.0.0.1:{port}"]
    try:
        up = knowserve(env, "up", "--services", "retrieval")
        assert "SERVING" in up.stdout and f"127.0.0.1:{port}" in up.stdout
        state = json.loads((tmp_path / "run" / "stack.json").read_text())
        pid = state["retrieval"]["pid"]
        assert (tmp_path / "run" / "data" / "retrieval" / "tantivy").is_dir()  # data under the run dir
        # the stack's Prometheus scrapes the service it started
        assert f"prometheus: http://127.0.0.1:{prom_port}" in up.stdout
        from services.monitoring import LocalPrometheus

        prom = LocalPrometheus(tmp_path, prom_port)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            up_series = prom.query('up{job="knowserve",component="retrieval"}')["data"]["result"]
            if up_series and up_series[0]["value"][1] == "1":
                break
            time.sleep(1)
        else:
            raise AssertionError("prometheus never scraped the retrieval service")
        prom_pid = json.loads((tmp_path / "run" / "prometheus" / "state.json").read_text())["pid"]

        corpus = tmp_path / "c.jsonl"
        corpus.write_text("\n".join(json.dumps({"id": f"c{i}", "title": f"City {i}", "text": f"city {i} is nice"})
                                    for i in range(30)))
        ingested = knowserve(env, "ingest", str(corpus), *target)
        assert "ingested 30 documents" in ingested.stdout
        knowserve(env, "edit", "add", "--id", "fix-1", "--title", "City 7", "--text", "city 7 is the capital", *target)
        found = knowserve(env, "search", "capital city 7", "--top-k", "1", *target)
        assert "city 7 is the capital" in found.stdout and "edit" in found.stdout
        assert "deleted 1" in knowserve(env, "edit", "rm", "fix-1", *target).stdout
        assert knowserve(env, "status").returncode == 0

        down = knowserve(env, "down")
        assert "stopped 1" in down.stdout
        assert not Path(f"/proc/{pid}").exists() or "services.retrieval" not in Path(
            f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert knowserve(env, "status", check=False).returncode == 1
        time.sleep(1)
        assert not Path(f"/proc/{prom_pid}").exists() or b"prometheus" not in Path(
            f"/proc/{prom_pid}/cmdline").read_bytes() or Path(f"/proc/{prom_pid}/stat").read_text().split()[2] == "Z"
    finally:
        knowserve(env, "down", check=False)


def test_up_reports_a_service_that_fails_to_start(tmp_path, subprocess_env):
    env = isolated_env(tmp_path / "run", {"retrieval": free_port()}, base=subprocess_env, RETRIEVAL_DENSE="false",
                       RETRIEVAL_DEFAULT_MODE="bm25", RETRIEVAL_BACKEND="elasticsearch",
                       RETRIEVAL_ES_URL=f"http://127.0.0.1:{free_port()}", RETRIEVAL_ES_TIMEOUT_SECONDS="1")
    result = knowserve(env, "up", "--services", "retrieval", "--timeout", "60", check=False)
    knowserve(env, "down", check=False)
    assert result.returncode != 0
    assert "retrieval" in result.stderr and "not reachable" in result.stderr
