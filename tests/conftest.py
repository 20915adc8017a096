"""Shared fixtures: binaries the tests drive (grpcurl, promtool), TLS material, free ports."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.procs import free_port
from services.common.server import GrpcServer
from services.retrieval.client import RetrievalClient
from services.retrieval.config import RetrievalSettings
from services.retrieval.core import Document
from services.retrieval.server import RetrievalApp
from services.verification.client import VerificationClient
from services.verification.config import VerificationSettings
from services.verification.server import VerificationApp

ROOT = Path(__file__).resolve().parents[1]
SERVE_APP = "knowserve-generation-test"
# the session's generation app requires this bearer token (as a deployment with auth on does); its clients send it
GENERATION_TOKEN = "session-generation-token-0123456789"
SERVE_META = (("application", SERVE_APP), ("authorization", f"Bearer {GENERATION_TOKEN}"))
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """Path of a binary the project installs (venv first, then PATH); fails the test with the fix if missing."""
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: run `make setup` (it installs every tool the tests use)")
    return found


def reserved_port() -> int:
    """A free port for a server started later in the session (the generation app's retrieval and answer targets):
    drawn between Ray's worker ports (10002-19999) and the kernel's ephemeral range (32768+), where no port-0 bind,
    outgoing connection or Ray process lands, so it is still free when the test binds it. Random, so that two test
    sessions on one machine do not pick the same one."""
    import random

    low, high = 20000, 32767
    try:
        low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        high = min(high, low_ephemeral - 1)
    except (OSError, ValueError, IndexError):
        pass
    for port in random.sample(range(low, high + 1), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=knowserve-test-ca")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext")
    return {p.stem + "_" + p.suffix[1:]: p for p in d.iterdir()}


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for service subprocesses: the repo on PYTHONPATH, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


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
    from services.retrieval.config import RetrievalSettings
    from services.retrieval.encoder import load_encoder

    return load_encoder(RetrievalSettings())  # the default runtime (onnx), as the service loads it


class InProcessService:
    """A service app on a real gRPC server (port 0) in the test's event loop, plus a typed client to it."""

    def __init__(self, settings, app, client_cls):
        self.settings = settings
        self.app = app
        self.server = GrpcServer(settings, app.bindings)
        self.client_cls = client_cls
        self.client = None

    async def start(self):
        await self.server.start()
        await self.app.startup()
        await self.server.set_ready()
        self.client = self.client_cls(self.server.address)
        return self

    async def stop(self) -> None:
        if self.client is None:
            return
        await self.client.close()
        self.client = None
        await self.server.stop(0)
        await self.app.shutdown()


class Running(InProcessService):
    """A retrieval server started in-process, plus a :class:`RetrievalClient` to it."""

    client: RetrievalClient

    def __init__(self, settings: RetrievalSettings, encoder):
        super().__init__(settings, RetrievalApp(settings, encoder=encoder), RetrievalClient)


class _Starter:
    """Starts in-process services for one test and stops them all when it ends."""

    def __init__(self):
        self.running: list[InProcessService] = []

    async def start(self, service: InProcessService) -> InProcessService:
        await service.start()
        self.running.append(service)
        return service

    async def stop_all(self) -> None:
        for r in reversed(self.running):
            await r.stop()


@pytest.fixture
async def starter():
    s = _Starter()
    yield s
    await s.stop_all()


@pytest.fixture
def start_retrieval(starter, encoder, tmp_path):
    """``await start_retrieval(**settings)`` -> a running service on a fresh data dir (or the one given)."""

    async def start(**overrides) -> Running:
        settings = RetrievalSettings(**{"port": 0, "metrics_port": 0, "data_dir": tmp_path / "index", **overrides})
        return await starter.start(Running(settings, encoder if settings.dense else None))

    return start


@pytest.fixture
def start_verification(starter):
    """``await start_verification(retrieval_target=..., nli_model=None, **settings)`` -> a running service."""

    async def start(nli_model=None, **overrides) -> InProcessService:
        # the lexical judge by default here: most tests pin its (deterministic) verdicts; the feature judge's
        # tests (tests/verification/test_feature_judge.py) pass its model folder and make it the default
        settings = VerificationSettings(**{"port": 0, "metrics_port": 0, "retrieval_retries": 0,
                                           "nli_model_path": Path("/nonexistent"), "generation_target": "",
                                           "default_judge": "lexical", "judge_model_path": Path("/nonexistent"),
                                           **overrides})
        return await starter.start(InProcessService(settings, VerificationApp(settings, nli_model=nli_model),
                                                    VerificationClient))

    return start


@pytest.fixture
def start_reward(starter):
    """``await start_reward(verification_target=..., **settings)`` -> a running reward service."""
    from services.reward.client import RewardClient
    from services.reward.config import RewardSettings
    from services.reward.server import RewardApp

    async def start(**overrides) -> InProcessService:
        settings = RewardSettings(**{"port": 0, "metrics_port": 0, "verification_retries": 0,
                                     "generation_target": "", **overrides})
        return await starter.start(InProcessService(settings, RewardApp(settings), RewardClient))

    return start

async def run_tool(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a binary without blocking the event loop (in-process servers answer it from the same loop)."""
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE if input else None,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(input.encode() if input else None)
    return subprocess.CompletedProcess(list(args), proc.returncode, out.decode(), err.decode())


@pytest.fixture(scope="session")
def answer_port():
    """The port the session's generation app sends live samples to and reads gate figures from; a test that
    needs live monitoring starts an answer service there."""
    return reserved_port()


@pytest.fixture(scope="session")
def generation_retrieval_port():
    """The port the session's generation app sends tool-protocol searches to; a test that needs retrieval inside
    generation starts a retrieval service there."""
    return reserved_port()


class GenerationApp:
    """``python -m services.generation`` (a local Ray head, explicit ports and CPUs, the Serve app) as our own
    process group; stopped by signalling that group, never `ray stop`."""

    def __init__(self, root: Path, model: Path | None, app_name: str = SERVE_APP, python: str = sys.executable,
                 **settings):
        self.root, self.port, self.metrics_port, self.http_port = root, free_port(), free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.app_name = app_name
        self.python = python
        if model is not None:
            settings["model_path"] = model
        if "models" in settings and not isinstance(settings["models"], str):
            settings["models"] = json.dumps(settings["models"])
        env = {f"KNOWSERVE_GENERATION_{k.upper()}": str(v) for k, v in {
            "port": self.port, "http_port": self.http_port, "dashboard_port": free_port(),
            "checkpoint_root": root, "app_name": app_name, "metrics_port": self.metrics_port,
            "metrics_dir": root / "metrics", "replicas": 2, "replica_num_cpus": 0.5, "ray_num_cpus": 2,
            "answer_target": "",  # no live monitoring unless a test asks (never the local stack's port)
            **settings}.items()}
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", **env)
        self.log_path = root / "generation.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240.0) -> "GenerationApp":
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([self.python, "-m", "services.generation"], cwd=ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with grpc.insecure_channel(self.target) as ch:
                    reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5,
                                                                 metadata=(("application", self.app_name),))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:  # every model has a replica up
                    return self
            except grpc.RpcError:
                pass
            time.sleep(1)
        self.stop()
        pytest.fail("generation did not start:\n" + self.log_path.read_text()[-4000:])

    def stop(self) -> None:
        if self.proc is None:
            return
        # SIGTERM to the launcher only: it shuts Serve and its own Ray head down in order (signalling the whole
        # group would kill the Ray head under it first, and serve.shutdown() then waits for a GCS that is gone);
        # then whatever is left of our own process group is killed.
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None


# the session app's models: the default, one other (isolation, rollback), one for the hallucination gate
SERVE_MODELS = ("tiny", "second", "gated")


@pytest.fixture(scope="session")
def serve_generation_app(tmp_path_factory, generation_retrieval_port, answer_port) -> GenerationApp:
    """The generation app on a real local Ray head, shared by the generation, verification, reward, answer and
    training tests: three named models, `tiny` (the default; 2 replicas), `second` and `gated` (1 replica each),
    tiny Llamas built here. Every user completion is sampled for live monitoring (to ``answer_port``)."""
    from services.common.models import tiny_lm_folder

    from services.common.auth import TOKEN_FILE_ENV

    tiny_model = tiny_lm_folder(ROOT / ".cache/models")
    root = tmp_path_factory.mktemp("checkpoints")
    shutil.copytree(tiny_model, root / "v1")
    # auth on: every RPC but health needs the token; every knowserve client of the session sends it, through
    # $KNOWSERVE_TOKEN_FILE, as the CLI and a training run's process do (servers without auth ignore it)
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(GENERATION_TOKEN)
    os.environ[TOKEN_FILE_ENV] = str(token_file)
    app = GenerationApp(root, None, max_tokens_limit=64, default_max_tokens=16, auth_token_file=token_file,
                        retrieval_target=f"127.0.0.1:{generation_retrieval_port}",
                        answer_target=f"127.0.0.1:{answer_port}", live_sample_rate=1.0, gate_poll_seconds=0.5,
                        models=[
                            {"name": SERVE_MODELS[0], "path": str(root / "v1"), "replicas": 2, "replica_num_cpus": 0.5},
                            {"name": SERVE_MODELS[1], "path": "builtin:tiny", "replicas": 1,
                             "replica_num_cpus": 0.25},
                            {"name": SERVE_MODELS[2], "path": str(root / "v1"), "replicas": 1,
                             "replica_num_cpus": 0.25}]).start()
    yield app
    app.stop()


@pytest.fixture(scope="session")
def smollm2_app(tmp_path_factory):
    """SmolLM2-135M-Instruct (from its wheel) served by the real Serve app: the real-model tests share it."""
    from services.common.models import smollm2_folder

    root = tmp_path_factory.mktemp("smollm2")
    shutil.copytree(smollm2_folder(ROOT / ".cache/models"), root / "smollm2")
    app = GenerationApp(root, root / "smollm2", app_name="knowserve-smollm2-test", replicas=1,
                        replica_num_cpus=1, max_tokens_limit=128, default_max_tokens=32).start()
    yield app
    app.stop()


@pytest.fixture(scope="session")
def serve_generation(serve_generation_app):
    """(target, checkpoint root, metrics port) of the session's generation app."""
    app = serve_generation_app
    return app.target, app.root, app.metrics_port
