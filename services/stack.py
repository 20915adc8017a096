"""The local stack: every configured service as a local process, with ports, data and logs under one run directory.

``knowserve up`` starts them (settings come from the same ``KNOWSERVE_<SVC>_*`` variables the Helm chart sets),
waits until all report SERVING and prints a table; ``knowserve status`` re-checks; ``knowserve down`` sends
SIGTERM to the processes it started (recorded in ``<run dir>/stack.json``) and to nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.common.addresses import LOCAL_HOST, SERVICES
from services.common.auth import TOKEN_FILE_ENV
from services.common.clients import ServiceClient
from services.common.procs import free_port
from services.common.progress import console as make_console
from services.common.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]


def _registry() -> dict[str, type[ServiceSettings]]:
    """Services the stack can run, in start order (dependencies first)."""
    from services.answer.config import AnswerSettings
    from services.generation.config import GenerationSettings
    from services.retrieval.config import RetrievalSettings
    from services.reward.config import RewardSettings
    from services.training.config import TrainingSettings
    from services.verification.config import VerificationSettings

    return {"retrieval": RetrievalSettings, "verification": VerificationSettings, "reward": RewardSettings,
            "generation": GenerationSettings, "answer": AnswerSettings, "training": TrainingSettings}


@dataclass
class Proc:
    name: str
    pid: int
    port: int
    metrics_port: int | None
    log: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def run_dir() -> Path:
    return Path(os.environ.get("KNOWSERVE_RUN_DIR", ".knowserve")).resolve()


def configured_services(requested: str | None) -> list[str]:
    known = _registry()
    names = [n.strip() for n in (requested or os.environ.get("KNOWSERVE_STACK_SERVICES", "")).split(",") if n.strip()]
    names = names or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown service(s) {unknown}; the stack knows {list(known)}")
    return names


def _state_path() -> Path:
    return run_dir() / "stack.json"


def load_state() -> dict[str, Proc]:
    path = _state_path()
    if not path.exists():
        return {}
    return {name: Proc(**p) for name, p in json.loads(path.read_text()).items()}


def _save_state(procs: dict[str, Proc]) -> None:
    _state_path().parent.mkdir(parents=True, exist_ok=True)
    _state_path().write_text(json.dumps({n: asdict(p) for n, p in procs.items()}, indent=2))


def _ours(proc: Proc) -> bool:
    """True if ``proc.pid`` is still the service process we started (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return f"services.{proc.name}" in cmdline


def security_dir() -> Path:
    return run_dir() / "security"


def security_state() -> dict[str, bool]:
    """{"auth": ..., "tls": ...} of the stack last started in this run dir."""
    try:
        return json.loads((security_dir() / "stack.json").read_text())
    except (OSError, ValueError):
        return {"auth": False, "tls": False}


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def ensure_security(auth: bool, tls: bool) -> dict[str, bool]:
    """Make what ``knowserve up --auth / --tls`` needs under the run dir's ``security/`` (kept across restarts):
    a random bearer token (``token``, mode 0600), a CA (``ca.pem``) and one certificate for every service and
    client of this machine (``node.pem``/``node-key.pem``: localhost and 127.0.0.1, server and client use)."""
    d = security_dir()
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    if auth and not (d / "token").exists():
        import secrets

        _write_private(d / "token", secrets.token_urlsafe(32).encode())
    if tls and not (d / "node.pem").exists():
        _make_certificates(d)
    state = {"auth": auth, "tls": tls}
    (d / "stack.json").write_text(json.dumps(state))
    return state


def _make_certificates(d: Path, days: int = 365) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "knowserve local stack CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    _write_private(d / "ca-key.pem", pem_key(ca_key))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(d / "node-key.pem", pem_key(key))
    (d / "node.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))


def client_security_env() -> dict[str, str]:
    """The ``KNOWSERVE_TOKEN_FILE`` / ``KNOWSERVE_TLS_*`` a client of the secured local stack needs (the CLI sets
    them itself when they are unset)."""
    from services.common import auth

    state, d = security_state(), security_dir()
    env = {}
    if state.get("auth") and (d / "token").exists():
        env[auth.TOKEN_FILE_ENV] = str(d / "token")
    if state.get("tls") and (d / "node.pem").exists():
        env.update({auth.TLS_CA_ENV: str(d / "ca.pem"), auth.TLS_CERT_ENV: str(d / "node.pem"),
                    auth.TLS_KEY_ENV: str(d / "node-key.pem")})
    return env


def isolated_env(run: Path, ports: Mapping[str, int], base: Mapping[str, str] | None = None,
                 **settings: str) -> dict[str, str]:
    """The environment of a stack of its own beside any other (the tests' and benchmarks' stacks): its run
    directory, the given service ports, a free metrics port per service and a free Prometheus port, and each of
    ``settings`` as ``KNOWSERVE_<NAME>`` over ``base`` (default: this process's). The repository goes on
    ``PYTHONPATH`` where a process is started (``_service_env``, a training run), not here.

    >>> env = isolated_env(Path("/tmp/run"), {"retrieval": 50999}, base={}, RETRIEVAL_DENSE="false")
    >>> env["KNOWSERVE_RUN_DIR"], env["KNOWSERVE_RETRIEVAL_PORT"], env["KNOWSERVE_RETRIEVAL_DENSE"]
    ('/tmp/run', '50999', 'false')
    >>> env["KNOWSERVE_RETRIEVAL_METRICS_PORT"] != env["KNOWSERVE_STACK_PROMETHEUS_PORT"]
    True
    """
    base = os.environ if base is None else base
    env = dict(base, KNOWSERVE_RUN_DIR=str(run), KNOWSERVE_STACK_PROMETHEUS_PORT=str(free_port()))
    for name, port in ports.items():
        env[f"KNOWSERVE_{name.upper()}_PORT"] = str(port)
        env[f"KNOWSERVE_{name.upper()}_METRICS_PORT"] = str(free_port())
    env.update({f"KNOWSERVE_{k}": v for k, v in settings.items()})
    return env


def _service_env(name: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    prefix = f"KNOWSERVE_{name.upper()}_"
    env.setdefault(prefix + "DATA_DIR", str(run_dir() / "data" / name))
    # generation and training share one checkpoint store (a PVC in Kubernetes)
    env.setdefault(prefix + "CHECKPOINT_ROOT", str(run_dir() / "checkpoints"))
    if name == "training":
        env.setdefault(prefix + "TRAINER_THREADS", "2")  # a run is the main load while it trains
        env.setdefault(prefix + "RUNS_DIR", str(run_dir() / "runs"))
        env.setdefault(prefix + "EVAL_DIR", str(run_dir() / "eval"))
    for other in SERVICES:  # a stack on other ports: each service finds the others where they listen
        port = os.environ.get(f"KNOWSERVE_{other.upper()}_PORT")
        if port and other != name:
            env.setdefault(f"{prefix}{other.upper()}_TARGET", f"{LOCAL_HOST}:{port}")
    state, d = security_state(), security_dir()
    if state.get("auth"):  # one token: each service requires it and sends it (its client token defaults to it)
        env.setdefault(prefix + "AUTH_TOKEN_FILE", str(d / "token"))
        env[TOKEN_FILE_ENV] = str(d / "token")  # what a training run's process sends
    if state.get("tls"):
        if name != "generation":  # Ray Serve's gRPC proxy cannot terminate TLS: generation stays plaintext (token on)
            env.setdefault(prefix + "TLS_CERT_FILE", str(d / "node.pem"))
            env.setdefault(prefix + "TLS_KEY_FILE", str(d / "node-key.pem"))
            env.setdefault(prefix + "TLS_CLIENT_CA_FILE", str(d / "ca.pem"))  # mTLS
        env.setdefault(prefix + "CLIENT_TLS_CA_FILE", str(d / "ca.pem"))
        env.setdefault(prefix + "CLIENT_TLS_CERT_FILE", str(d / "node.pem"))
        env.setdefault(prefix + "CLIENT_TLS_KEY_FILE", str(d / "node-key.pem"))
        env.setdefault(prefix + "CLIENTS", json.dumps({"generation": {"tls": False}}))
        env.update(client_security_env())  # a training run's own clients
    if name == "verification":  # the feature judge (the default): trained at its first start, kept here
        env.setdefault(prefix + "JUDGE_MODEL_PATH", str(run_dir() / "models" / "judge"))
    if name == "generation":
        env.setdefault(prefix + "MODELS", json.dumps(local_models()))
        # a local stack has little traffic: verify every user completion live (the product default samples 10%)
        env.setdefault(prefix + "LIVE_SAMPLE_RATE", "1.0")
    return env


def local_models() -> list[dict]:
    """The local stack's served models: SmolLM2-135M-Instruct (the default: users, the llm judge and grader), the
    demo world's model, which `make demo` trains and hot-swaps (until it is built, an untrained tiny Llama holds
    its place), and a SmolLM2 policy that `make demo-full`'s pipeline trains, so the model users and judges talk to
    is never the one being trained."""
    from services.generation.config import BUILTIN_TINY, DEFAULT_MODEL, DEMO_MODEL, POLICY_MODEL

    demo = run_dir() / "models" / DEMO_MODEL
    return [{"name": DEFAULT_MODEL, "replica_num_cpus": 1.0},
            {"name": DEMO_MODEL, "path": str(demo) if (demo / "config.json").exists() else BUILTIN_TINY,
             "replica_num_cpus": 0.5},
            {"name": POLICY_MODEL, "replica_num_cpus": 0.5}]


async def _health(procs: dict[str, Proc], started: dict[str, subprocess.Popen] | None = None) -> dict[str, str]:
    """Health status per service; "EXITED" when its process is gone. Processes this call started are
    checked through their Popen (right after fork, /proc/<pid>/cmdline still shows the parent)."""
    started = started or {}

    async def one(p: Proc) -> str:
        alive = started[p.name].poll() is None if p.name in started else _ours(p)
        if not alive:
            return "EXITED"
        from services.common.clients import ClientOptions

        settings_cls = _registry()[p.name]
        needs_metadata = settings_cls.client_metadata is not ServiceSettings.client_metadata  # e.g. Serve's app
        options = ClientOptions(extra_metadata=settings_cls().client_metadata() if needs_metadata else ())
        async with ServiceClient(p.name, p.target, lambda ch: None, options) as c:
            return await c.check_health(timeout=1.0)

    results = await asyncio.gather(*(one(p) for p in procs.values()))
    return dict(zip(procs, results))


def print_table(procs: dict[str, Proc], health: dict[str, str], console: Console | None = None) -> None:
    table = Table(title=f"knowserve stack ({run_dir()})")
    for col in ("service", "pid", "gRPC", "metrics", "health", "log"):
        # addresses and paths wrap rather than being cut to "127.0.0.1:50…" in an 80-column log
        table.add_column(col, overflow="fold", no_wrap=col in ("service", "pid", "health"))
    for name, p in procs.items():
        status = health.get(name, "?")
        style = "green" if status == "SERVING" else "red"
        metrics = f"127.0.0.1:{p.metrics_port}/metrics" if p.metrics_port else "-"
        log = os.path.relpath(p.log, run_dir()) if p.log.startswith(str(run_dir())) else p.log
        table.add_row(name, str(p.pid), p.target, metrics, f"[{style}]{status}[/{style}]", log)
    (console or make_console()).print(table)


def up(services: str | None = None, timeout: float = 180.0, auth: bool = False, tls: bool = False) -> dict[str, Proc]:
    """Start the configured services not already running; wait for SERVING; print the table. ``auth``: every
    service requires (and sends) a generated token; ``tls``: mTLS with generated certificates."""
    procs = {n: p for n, p in load_state().items() if _ours(p)}
    if procs and security_state() != {"auth": auth, "tls": tls}:
        was = security_state()
        flags = " ".join(f"--{k}" for k, on in was.items() if on) or "no --auth/--tls"
        raise SystemExit(f"the stack is running with {flags}: pass the same flags, or `knowserve down` first to "
                         "change its security")
    ensure_security(auth, tls)
    for key, value in client_security_env().items():
        os.environ.setdefault(key, value)  # this process's health checks and the demo's own clients
    logs = run_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    registry = _registry()
    started: dict[str, subprocess.Popen] = {}
    for name in configured_services(services):
        if name in procs:
            continue
        env = _service_env(name)
        settings = registry[name]()  # reads the same KNOWSERVE_<SVC>_* names as the service will
        log_path = logs / f"{name}.log"
        with log_path.open("ab") as log_file:
            popen = subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=ROOT, env=env,
                                     stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        started[name] = popen
        procs[name] = Proc(name, popen.pid, settings.port, settings.metrics_port, str(log_path))
        _save_state(procs)
    deadline = time.monotonic() + timeout
    while True:
        health = asyncio.run(_health(procs, started))
        if all(h == "SERVING" for h in health.values()):
            break
        exited = [n for n, h in health.items() if h == "EXITED"]
        if exited or time.monotonic() > deadline:
            print_table(procs, health)
            for n in exited or [n for n, h in health.items() if h != "SERVING"]:
                tail = Path(procs[n].log).read_text(errors="replace").splitlines()[-15:]
                print(f"--- {n} log tail ({procs[n].log}) ---\n" + "\n".join(tail), file=sys.stderr)
            raise SystemExit(f"stack not SERVING: {', '.join(exited) or 'timed out'}; see the logs above")
        time.sleep(0.3)
    print_table(procs, health)
    start_monitoring(procs)
    return procs


def _prometheus_state() -> Path:
    return run_dir() / "prometheus" / "state.json"


def _prometheus_pid() -> int | None:
    """The pid of the stack's prometheus if it is still ours and running."""
    try:
        pid = json.loads(_prometheus_state().read_text())["pid"]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError, KeyError):
        return None
    return pid if "prometheus" in cmdline and str(run_dir()) in cmdline else None


def start_monitoring(procs: dict[str, Proc], console: Console | None = None) -> str | None:
    """Start the stack's Prometheus (every service's /metrics, the project's rules); returns its URL."""
    import shutil as _shutil

    from services.monitoring import LocalPrometheus

    console = console or make_console()
    if os.environ.get("KNOWSERVE_STACK_PROMETHEUS", "1") == "0" or not _shutil.which("prometheus"):
        return None
    port = int(os.environ.get("KNOWSERVE_STACK_PROMETHEUS_PORT", "9090"))
    url = f"http://127.0.0.1:{port}"
    if _prometheus_pid() is None:
        targets = {n: p.metrics_port for n, p in procs.items() if p.metrics_port}
        try:
            prom = LocalPrometheus(run_dir() / "prometheus", port).start(targets)
        except (OSError, RuntimeError, TimeoutError) as e:
            console.print(f"[yellow]prometheus not started: {e}[/yellow]")
            return None
        _prometheus_state().write_text(json.dumps({"pid": prom.proc.pid, "port": port}))
    console.print(f"prometheus: {url} (scraping every service, knowserve rules loaded; try "
                  f"{url}/graph?g0.expr=knowserve:reward_hallucination_rate:ratio_rate10m)")
    return url


def status() -> int:
    procs = load_state()
    if not procs:
        print(f"no stack running under {run_dir()}; start one with `knowserve up`")
        return 1
    health = asyncio.run(_health(procs))
    print_table(procs, health)
    return 0 if all(h == "SERVING" for h in health.values()) else 1


def down(timeout: float = 30.0) -> int:
    """SIGTERM our own processes (graceful drain), SIGKILL any left after ``timeout``."""
    prom = _prometheus_pid()
    if prom is not None:
        os.kill(prom, signal.SIGTERM)
        _prometheus_state().unlink(missing_ok=True)
    procs = load_state()
    live = {n: p for n, p in procs.items() if _ours(p)}
    for p in live.values():
        os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        live = {n: p for n, p in live.items() if _ours(p)}
        time.sleep(0.1)
    for p in live.values():
        os.kill(p.pid, signal.SIGKILL)
    _state_path().unlink(missing_ok=True)
    print(f"stopped {len(procs)} service(s)" + (f"; killed {list(live)}" if live else ""))
    return 0
