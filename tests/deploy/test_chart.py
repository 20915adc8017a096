"""The Helm chart, offline: Helm's own engine (helm-python-sdk) lints it strictly and renders it with the default
values and with ci/ci-values.yaml (everything optional on); every rendered manifest validates against the
Kubernetes 1.30 schemas (kubernetes-validate --strict); checkov scans the rendered manifests; and the parts that
no schema covers (the RayService's serveConfigV2, env names, security settings) are checked here."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

CHART = ROOT / "helm/knowserve"
CRD_KINDS = {"RayService", "ServiceMonitor"}  # no schema in kubernetes-validate: checked by hand below
WORKLOADS = {"Deployment", "Job"}


def render(values: dict | None) -> list[dict]:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name="ks", namespace="knowserve")
    return [d for name, text in out.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


def ci_values() -> dict:
    return yaml.safe_load((CHART / "ci/ci-values.yaml").read_text())


@pytest.fixture(scope="module", params=["default", "ci"])
def rendered(request, tmp_path_factory):
    docs = render(None if request.param == "default" else ci_values())
    path = tmp_path_factory.mktemp("render") / f"{request.param}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return request.param, docs, path


def test_chart_lints_strictly_with_both_value_files():
    import helm_python as helm

    for values in ({}, ci_values()):
        result = helm.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
        assert not result["errors"], result
        assert all(m["severity"] <= 1 for m in result["messages"]), result["messages"]  # INFO only (no icon)


def test_values_schema_rejects_bad_values():
    import helm_python as helm

    with pytest.raises(helm.HelmError, match="mode"):
        render({"generation": {"mode": "statefulset"}})
    with pytest.raises(helm.HelmError, match="recipe"):
        render({"training": {"job": {"enabled": True, "runConfig": {"recipe": "nope", "dataset": "d", "model": "m"}}}})


def test_manifests_validate_against_kubernetes_1_30(rendered):
    from tests.conftest import tool

    _, docs, path = rendered
    out = subprocess.run([tool("kubernetes-validate"), "-k", "1.30.0", "--strict", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for line in (out.stdout + out.stderr).splitlines():
        if "Couldn't find schema" in line:
            assert any(f"kind {k} " in line for k in CRD_KINDS), line
        assert not line.startswith("ERROR"), line


def test_checkov_passes_on_the_rendered_chart(rendered):
    name, _, path = rendered
    checkov = ROOT / ".venv-tools/bin/checkov"
    assert checkov.exists(), "run `make tools-env` (make test does)"
    skips = {
        # Images are addressed by tag (image.tag, default appVersion): pinning digests is the deployer's choice
        # of values, not something a chart can know in advance.
        "CKV_K8S_43",
        # IfNotPresent is right for immutable release tags (helm create's default); set image.pullPolicy=Always
        # for mutable tags.
        "CKV_K8S_15",
    }  # resource-level skips are annotations in the templates, each with its reason
    out = subprocess.run([str(checkov), "-f", str(path), "--framework", "kubernetes", "--quiet", "--compact",
                          "--skip-download",
                          "--skip-check", ",".join(sorted(skips))], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_security_env_and_probes(rendered):
    name, docs, _ = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "PersistentVolumeClaim", "Pod"} <= kinds
    for d in docs:
        if d["kind"] not in WORKLOADS | {"Pod"}:
            continue
        spec = d["spec"]["template"]["spec"] if d["kind"] != "Pod" else d["spec"]
        assert spec["enableServiceLinks"] is False and spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
            assert c["resources"]["limits"], c["name"]
            for e in c.get("env", []):
                assert e["name"].startswith(("KNOWSERVE_", "HF_", "MPLCONFIGDIR", "RAY_", "TRL_")), e["name"]
                assert "value" not in e or "password" not in e["name"].lower(), "secrets come from secretKeyRef"
        if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] in (
                "retrieval", "verification", "reward", "answer", "training"):
            c = spec["containers"][0]
            port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if name == "ci":  # mTLS on: native grpc probes speak plaintext, the image's check speaks mTLS
                    cmd = c[probe]["exec"]["command"]
                    assert cmd[cmd.index("--port") + 1] == str(port) and "--tls-cert" in cmd, (probe, cmd)
                else:
                    assert c[probe]["grpc"]["port"] == port, probe
    if name == "ci":
        env = {e["name"]: e for d in docs if d["kind"] == "Deployment"
               and d["metadata"]["labels"]["app.kubernetes.io/component"] == "retrieval"
               for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["KNOWSERVE_RETRIEVAL_BACKEND"]["value"] == "elasticsearch"
        assert env["KNOWSERVE_RETRIEVAL_ES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "knowserve-elasticsearch"
        assert env["KNOWSERVE_RETRIEVAL_AUTH_TOKEN_FILE"]["value"].startswith("/var/run/knowserve/auth/")
        assert env["KNOWSERVE_RETRIEVAL_TLS_CLIENT_CA_FILE"]["value"] == "/var/run/knowserve/tls/ca.crt"  # mTLS
        by_component = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs
                        if d["kind"] in ("Deployment", "RayService")}
        reward = {e["name"]: e["value"] for e in by_component["reward"]["spec"]["template"]["spec"]["containers"][0]
                  ["env"] if "value" in e}
        assert reward["KNOWSERVE_REWARD_CLIENT_TLS_CERT_FILE"] == "/var/run/knowserve/tls/tls.crt"
        assert json.loads(reward["KNOWSERVE_REWARD_CLIENTS"]) == {"generation": {"tls": False}}
        pod = next(d for d in docs if d["kind"] == "Pod")  # `helm test`: the token is enforced and accepted
        for c in pod["spec"]["containers"]:
            assert c["command"][c["command"].index("--auth-probe") + 1] == c["name"], c["command"]
            assert ("--tls-cert" in c["command"]) == (c["name"] != "generation"), c["command"]
        assert {v["name"] for v in pod["spec"]["volumes"]} >= {"auth", "tls"}


def test_the_env_names_are_settings_the_services_read(rendered):
    """Every KNOWSERVE_<SVC>_<FIELD> the chart sets is a field of that service's settings class."""
    from services.stack import _registry

    fields = {svc.upper(): set(cls.model_fields) for svc, cls in _registry().items()}
    _, docs, _ = rendered
    for d in docs:
        if d["kind"] not in WORKLOADS and d["kind"] != "RayService":
            continue
        specs = ([d["spec"]["template"]["spec"]] if d["kind"] in WORKLOADS else
                 [d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]])
        for spec in specs:
            for c in spec["containers"]:
                for e in c.get("env", []):
                    parts = e["name"].split("_", 2)
                    if parts[0] == "KNOWSERVE" and parts[1] in fields:
                        assert parts[2].lower() in fields[parts[1]], e["name"]


def test_rayservice_serve_config_imports_the_app_builder():
    from services.generation.app import APP_IMPORT_PATH, INGRESS, SERVICER_FUNCTIONS, deployment_name
    from services.generation.deploy import initial_user_config

    docs = render(ci_values())
    ray = next(d for d in docs if d["kind"] == "RayService")
    serve = yaml.safe_load(ray["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    assert app["import_path"] == APP_IMPORT_PATH and app["name"] == "knowserve-generation"
    assert serve["grpc_options"]["grpc_servicer_functions"] == SERVICER_FUNCTIONS
    models = app["args"]["models"]
    assert [m["name"] for m in models] == ["smollm2-135m-instruct", "judge"]
    assert models[0]["engine"] == "vllm" and models[0]["replica_num_gpus"] == 1 and models[0]["device"] == "cuda"
    assert models[1]["engine"] == "transformers" and "device" not in models[1]
    # one deployment per model behind the ingress, each starting at the weights the replicas load
    assert [d["name"] for d in app["deployments"]] == [INGRESS] + [deployment_name(m["name"]) for m in models]
    assert app["deployments"][1]["num_replicas"] == 2 and app["deployments"][1]["user_config"] == initial_user_config(1)
    from services.generation.config import GenerationSettings

    # the builder's args are valid settings (engine=vllm itself needs the vllm package, absent here; paths under
    # /checkpoints exist only in the pod)
    cpu_models = [{**m, "engine": "transformers", "path": "builtin:tiny"} for m in models]
    settings = GenerationSettings(**{**app["args"], "models": cpu_models})
    assert settings.kept_versions == 5 and settings.openai_api is True
    head = ray["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in head["env"]}
    assert env["KNOWSERVE_GENERATION_DASHBOARD_HOST"].endswith("-head-svc")
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 6 and all(m["spec"]["endpoints"][0]["port"] == "metrics" for m in monitors)


def test_dashboards_ship_as_labelled_configmaps_and_are_current():
    docs = render(None)
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert {k for m in maps for k in m["data"]} == {"hallucination-overview.json", "services-red.json",
                                                    "generation.json", "training.json"}
    check = subprocess.run([str(ROOT / ".venv/bin/python"), "deploy/grafana/dashboards.py", "--check"], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
