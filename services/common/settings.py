"""Typed settings shared by every service; each service subclasses :class:`ServiceSettings`.

Every field is read from the environment as ``KNOWSERVE_<SVC>_<FIELD>`` (the Helm chart
sets the same names), e.g. ``KNOWSERVE_RETRIEVAL_PORT=50051``. Bad combinations are
rejected at start-up with a message that names the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from services.common.clients import ClientOptions


class ClientSecurity(BaseModel):
    """How a service authenticates to one target (unset fields fall back to the service-wide client settings)."""

    model_config = {"extra": "forbid"}

    token_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls: bool | None = None  # False: plaintext to this target although the service-wide client TLS is set


class ServiceSettings(BaseSettings):
    """Transport, limits, security and logging settings of one gRPC service."""

    model_config = SettingsConfigDict(env_prefix="KNOWSERVE_", extra="ignore", validate_default=True)

    #: Short service name ("retrieval"); labels metrics and logs.
    service_name: ClassVar[str] = "service"

    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 in containers.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free port (tests).")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free port, unset disables."
    )
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request or response message.")
    max_request_elements: int = Field(
        1_000_000, ge=1, description="Most elements in all repeated fields of one request together (a 16 MiB message "
        "of packed integers holds ~16M), refused with INVALID_ARGUMENT before any handler work.")
    default_deadline_seconds: float = Field(
        120.0, gt=0, description="Deadline applied to calls that arrive without one."
    )
    max_concurrent_rpcs: int = Field(256, ge=1, description="Calls in flight before new ones get RESOURCE_EXHAUSTED.")
    grace_seconds: float = Field(20.0, ge=0, description="On SIGTERM, how long in-flight calls may take to finish.")
    shutdown_delay_seconds: float = Field(
        0.0, ge=0, description="On SIGTERM, report NOT_SERVING this long before refusing calls (set ~5 in Kubernetes)."
    )
    tls_cert_file: Path | None = Field(None, description="Server certificate (PEM); enables TLS.")
    tls_key_file: Path | None = Field(None, description="Server private key (PEM).")
    tls_client_ca_file: Path | None = Field(None, description="CA bundle for client certificates; enables mTLS.")
    auth_token: SecretStr | None = Field(None, description="Bearer token clients must send; enables auth.")
    auth_token_file: Path | None = Field(None, description="File holding the bearer token (a mounted Secret).")
    client_token_file: Path | None = Field(
        None, description="Token this service sends to the services it calls; unset: its own token "
        "(AUTH_TOKEN / AUTH_TOKEN_FILE), so one Secret secures the whole deployment.")
    client_tls_ca_file: Path | None = Field(
        None, description="CA bundle that signed the certificates of the services it calls; enables TLS on its "
        "outgoing calls.")
    client_tls_cert_file: Path | None = Field(None, description="Client certificate it presents (mTLS).")
    client_tls_key_file: Path | None = Field(None, description="Key of that client certificate.")
    clients: dict[str, ClientSecurity] = Field(
        default_factory=dict, description='Per-target overrides of the four client settings above, e.g. '
        '{"retrieval": {"token_file": "/run/secrets/retrieval-token", "tls_ca_file": "/etc/ca.pem"}} (JSON).')
    malloc_arena_max: int | None = Field(
        2, ge=1, description="glibc malloc arenas of the process (MALLOC_ARENA_MAX); unset: glibc's default "
        "(8 per core). 2 keeps retrieval's RSS swings under hostile traffic at 94-112 MiB instead of 106-138 at no "
        "measured encoding cost. See services.common.procs.tune_allocator. Applied by services started with run_main; "
        "generation's Serve replicas and proxy (Ray workers) keep glibc's defaults.")
    malloc_mmap_threshold_bytes: int | None = Field(
        None, ge=4096, le=32 << 20, description="Fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_): blocks this "
        "large are mapped and returned to the system when freed; unset: glibc's dynamic threshold.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = Field(True, description="One JSON object per log line; false for human-readable lines.")

    @model_validator(mode="after")
    def _check_security(self) -> "ServiceSettings":
        prefix = self.model_config.get("env_prefix", "KNOWSERVE_")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(f"TLS needs both {prefix}TLS_CERT_FILE and {prefix}TLS_KEY_FILE; set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                f"{prefix}TLS_CLIENT_CA_FILE (mTLS) needs server TLS: set {prefix}TLS_CERT_FILE and {prefix}TLS_KEY_FILE"
            )
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_token_file", "client_token_file",
                     "client_tls_ca_file", "client_tls_cert_file", "client_tls_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{prefix}{name.upper()}={path} does not exist; fix the path or unset it")
        for target, c in [("", ClientSecurity(token_file=self.client_token_file, tls_ca_file=self.client_tls_ca_file,
                                              tls_cert_file=self.client_tls_cert_file,
                                              tls_key_file=self.client_tls_key_file)), *self.clients.items()]:
            where = f"{prefix}CLIENTS[{target!r}]" if target else f"{prefix}CLIENT_TLS_*"
            if (c.tls_cert_file is None) != (c.tls_key_file is None):
                raise ValueError(f"{where}: a client certificate needs its key and a key its certificate; set both")
            for name in ("token_file", "tls_ca_file", "tls_cert_file", "tls_key_file"):
                path = getattr(c, name)
                if target and path is not None and not Path(path).is_file():
                    raise ValueError(f"{where}.{name}={path} does not exist; fix the path or remove it")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError(f"set only one of {prefix}AUTH_TOKEN and {prefix}AUTH_TOKEN_FILE")
        return self

    def resolved_auth_token(self) -> str | None:
        """The bearer token clients must send, or None when auth is off."""
        if self.auth_token is not None:
            return self.auth_token.get_secret_value()
        if self.auth_token_file is not None:
            from services.common.auth import read_token

            return read_token(self.auth_token_file)
        return None

    def client_options(self, target: str, **options) -> ClientOptions:
        """How this service calls ``target`` ("retrieval", "verification", ...): its token and TLS settings (the
        per-target override, else the service-wide client settings, else its own token) and ``options``
        (timeouts, retries)."""
        from services.common.auth import read_token
        from services.common.clients import ClientOptions

        c = self.clients.get(target, ClientSecurity())
        token_file = c.token_file or self.client_token_file
        token = read_token(token_file) if token_file else self.resolved_auth_token()
        if c.tls is False:
            return ClientOptions(token=token, plaintext=True, **options)
        ca = c.tls_ca_file or self.client_tls_ca_file
        cert = c.tls_cert_file or (None if c.tls_key_file else self.client_tls_cert_file)
        key = c.tls_key_file or (None if c.tls_cert_file else self.client_tls_key_file)
        return ClientOptions(token=token, tls_ca_file=ca, tls_cert_file=cert, tls_key_file=key,
                             plaintext=ca is None, **options)

    def client_metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata every client of this service sends besides auth (Serve's proxy needs the application)."""
        return ()


class ModelFreeServiceSettings(ServiceSettings):
    """Settings of a service that holds no model (answer, reward, training): a small heap that multi-MB requests
    must not leave fragmented, so a fixed 1 MiB mmap threshold by default besides the 2 malloc arenas of every
    service (:func:`services.common.procs.tune_allocator` has the figures)."""

    malloc_mmap_threshold_bytes: int | None = Field(1 << 20, ge=4096, le=32 << 20)
