"""deploy/prometheus: scrape config and rules pass promtool, the rules' unit tests pass, and every metric the
rules read is one the services actually export."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT, tool

PROM = ROOT / "deploy" / "prometheus"


def test_promtool_checks_config_rules_and_rule_unit_tests():
    promtool = tool("promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules/knowserve.rules.yml"],
                 ["test", "rules", "tests/rules_test.yml"]):
        out = subprocess.run([promtool, *args], cwd=PROM, capture_output=True, text=True)
        assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}{out.stderr}"


def test_rules_only_read_metrics_the_services_define():
    rules = (PROM / "rules" / "knowserve.rules.yml").read_text()
    used = set(re.findall(r"\b(knowserve_[a-z_]+)", rules))
    source = "\n".join(p.read_text() for p in (ROOT / "services").rglob("*.py"))
    defined = set(re.findall(r'"(knowserve_[a-z_]+)"', source))
    exported = {n + suffix for n in defined for suffix in ("", "_total", "_sum", "_count", "_bucket")}
    assert used and used <= exported, f"rules read undefined metrics: {sorted(used - exported)}"
