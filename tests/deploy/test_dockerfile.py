"""The images' Dockerfile, without a Docker engine (none runs here): checkov's Dockerfile checks, and the
project's own rules per final image — a target for every service (CPU, and CUDA for generation and training),
non-root user, a gRPC health HEALTHCHECK, dependencies pinned by the project's constraints, no secrets baked in,
and stubs generated at build time from the protos."""

from __future__ import annotations

import re
import subprocess

import pytest

from services.common.addresses import DEFAULT_PORTS
from tests.conftest import ROOT

DOCKERFILE = ROOT / "deploy/docker/Dockerfile"
SERVICES = DEFAULT_PORTS
TARGETS = {**{s: s for s in SERVICES}, "generation-gpu": "generation", "training-gpu": "training"}


def stages() -> dict[str, dict]:
    from dockerfile_parse import DockerfileParser

    out: dict[str, dict] = {}
    current = None
    for ins in DockerfileParser(path=str(DOCKERFILE)).structure:
        if ins["instruction"] == "FROM":
            parts = ins["value"].split()
            current = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else parts[0]
            out[current] = {"from": parts[0], "ins": []}
        elif current:
            out[current]["ins"].append((ins["instruction"], ins["value"]))
    return out


def resolved(name: str, all_stages: dict) -> list[tuple[str, str]]:
    """Instructions of a stage including those it inherits from earlier stages."""
    stage = all_stages[name]
    parent = stage["from"]
    return (resolved(parent, all_stages) if parent in all_stages else []) + stage["ins"]


def test_checkov_dockerfile_checks_pass():
    checkov = ROOT / ".venv-tools/bin/checkov"
    assert checkov.exists(), "run `make tools-env` (make test does)"
    out = subprocess.run([str(checkov), "-f", str(DOCKERFILE), "--framework", "dockerfile", "--quiet", "--compact",
                          "--skip-download"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_service_image_follows_the_rules(target):
    all_stages = stages()
    assert target in all_stages, f"no `--target {target}` stage"
    ins = resolved(target, all_stages)
    service = TARGETS[target]
    users = [v for i, v in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    health = [v for i, v in ins if i == "HEALTHCHECK"]
    assert health and "services.common.healthcheck" in health[-1] and str(SERVICES[service]) in health[-1]
    entry = [v for i, v in ins if i == "ENTRYPOINT"]
    assert entry and f"services.{service}" in entry[-1]
    assert str(SERVICES[service]) in " ".join(v for i, v in ins if i == "EXPOSE")
    for i, v in ins:
        if i in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|PASSWORD|API_KEY|SECRET)\w*=", v, re.I), f"secret baked in: {v}"
    text = DOCKERFILE.read_text()
    if not target.endswith("-gpu"):  # CPU images install with the project's constraints and lock file
        venv = f"venv-{service}"
        installs = " ".join(v for i, v in resolved(venv, all_stages) if i == "RUN")
        torchless = service in ("reward", "answer")  # no model in-process: no torch
        assert "requirements.lock" in installs and ("torch==2.13.0" in installs or torchless)
    else:
        assert "vllm==" in text or target == "training-gpu"
        assert all_stages["gpu-base"]["from"].startswith("nvidia/cuda:")
    assert "grpc_tools.protoc" in text  # stubs are generated in the build, never copied from a checkout


def test_lock_file_pins_what_the_tests_ran_with():
    lock = (ROOT / "deploy/docker/requirements.lock").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lock if "==" in line)
    import grpc
    import ray
    import transformers
    import trl

    assert pins["grpcio"] == grpc.__version__ and pins["ray"] == ray.__version__ and pins["trl"] == trl.__version__
    assert pins["transformers"] == transformers.__version__  # 5.24.0 broke tied weights: the image must not drift
    assert "torch" not in pins  # torch comes from the CPU or CUDA index, per image
    assert all("==" in line for line in lock if line and not line.startswith("#"))
