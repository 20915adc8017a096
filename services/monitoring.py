"""Local monitoring for the stack: Debian's ``prometheus`` scraping every service the stack started, with the
project's recording and alerting rules (``deploy/prometheus/rules``). ``knowserve up`` starts it when the binary
is installed (``make setup`` installs it; ``KNOWSERVE_STACK_PROMETHEUS=0`` turns it off) and ``knowserve down``
stops it. Kubernetes uses the chart's ServiceMonitors instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy/prometheus/rules"


def scrape_config(targets: dict[str, int], scrape_interval: str = "15s", rules_dir: Path = RULES) -> dict:
    """A Prometheus config scraping ``{component: metrics_port}`` on 127.0.0.1 (job ``knowserve``, as the rules
    expect), with the project's rule files.

    >>> scrape_config({"reward": 9103})["scrape_configs"][0]["static_configs"]
    [{'targets': ['127.0.0.1:9103'], 'labels': {'component': 'reward'}}]
    """
    return {"global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(p) for p in sorted(Path(rules_dir).glob("*.yml"))],
            "scrape_configs": [{"job_name": "knowserve", "static_configs": [
                {"targets": [f"127.0.0.1:{port}"], "labels": {"component": name}}
                for name, port in targets.items()]}]}


class LocalPrometheus:
    """One prometheus process with its config, data and log under ``folder``."""

    def __init__(self, folder: Path, port: int = 9090):
        self.folder, self.port = Path(folder), port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, targets: dict[str, int], scrape_interval: str = "15s", binary: str | None = None,
              timeout: float = 30.0) -> "LocalPrometheus":
        binary = binary or shutil.which("prometheus")
        if not binary:
            raise FileNotFoundError("prometheus is not installed: `make setup` installs Debian's prometheus")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(targets, scrape_interval), sort_keys=False))
        log = open(self.folder / "prometheus.log", "ab")
        self.proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={self.folder / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: see {self.folder / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready on {self.url} after {timeout:.0f}s")

    def query(self, expr: str) -> dict:
        """The API's answer to an instant query (``status``, ``data``; ``error`` on a bad expression)."""
        import urllib.error
        import urllib.parse

        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400 for a parse error, with the JSON error body
            return json.loads(e.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
