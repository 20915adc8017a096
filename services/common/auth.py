"""Bearer tokens: one check for every server knowserve runs (the gRPC interceptor, the generation service's Serve
ingress and its OpenAI-compatible HTTP routes), and the token a client sends when it is given none.

>>> authorized("Bearer s3cret", "s3cret"), authorized("Bearer wrong", "s3cret"), authorized(None, None)
(True, False, True)
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from services.common.errors import Unauthenticated

#: the answer to a missing or wrong token: it says how to send one, nothing about which tokens are valid
BEARER_HINT = "missing or wrong bearer token (send metadata 'authorization: Bearer <token>')"
#: file holding the token a knowserve client (CLI, eval, builders) sends when its options carry none
TOKEN_FILE_ENV = "KNOWSERVE_TOKEN_FILE"
#: TLS of such a client: the CA that signed the servers, and the client certificate and key for mTLS
TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV = "KNOWSERVE_TLS_CA_FILE", "KNOWSERVE_TLS_CERT_FILE", "KNOWSERVE_TLS_KEY_FILE"
#: services those clients call in plaintext although TLS is set (Ray Serve's gRPC proxy cannot terminate TLS)
PLAINTEXT_ENV = "KNOWSERVE_TLS_PLAINTEXT_SERVICES"


def authorized(given: str | None, token: str | None) -> bool:
    """Does the ``authorization`` value ``given`` carry ``token`` (None: auth is off)? Constant-time compare."""
    if token is None:
        return True
    return hmac.compare_digest((given or "").encode(), f"Bearer {token}".encode())


def metadata_value(metadata: Iterable[tuple[str, str | bytes]] | None, key: str = "authorization") -> str:
    """The first value of ``key`` in gRPC metadata (keys are lower-case on the wire)."""
    for k, v in metadata or ():
        if k.lower() == key:
            return v.decode(errors="replace") if isinstance(v, bytes) else v
    return ""


def require(metadata: Iterable[tuple[str, str | bytes]] | None, token: str | None) -> None:
    """Raise :class:`Unauthenticated` unless ``metadata`` carries ``token``."""
    if not authorized(metadata_value(metadata), token):
        raise Unauthenticated(BEARER_HINT)


def read_token(path: Path | str) -> str:
    """The token in a file (a mounted Secret), stripped; a file that cannot be read or is empty is an error that
    names the path."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read the token file {path}: {e.strerror or e}") from None
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def default_client_token() -> str | None:
    """The token named by ``$KNOWSERVE_TOKEN_FILE`` (the CLI's ``--token-file`` sets it), or None."""
    path = os.environ.get(TOKEN_FILE_ENV, "")
    return read_token(path) if path else None


def default_client_tls(service: str) -> tuple[Path, Path | None, Path | None] | None:
    """(CA, client certificate, client key) from ``$KNOWSERVE_TLS_*`` for a client of ``service``, or None for
    plaintext (no CA set, or ``service`` is in ``$KNOWSERVE_TLS_PLAINTEXT_SERVICES``, default "generation")."""
    ca = os.environ.get(TLS_CA_ENV, "")
    plaintext = {s.strip() for s in os.environ.get(PLAINTEXT_ENV, "generation").split(",") if s.strip()}
    if not ca or service in plaintext:
        return None
    cert, key = os.environ.get(TLS_CERT_ENV, ""), os.environ.get(TLS_KEY_ENV, "")
    return Path(ca), Path(cert) if cert else None, Path(key) if key else None


def channel_credentials(ca: str | Path, cert: str | Path | None = None, key: str | Path | None = None):
    """gRPC channel credentials from a CA file and, for mTLS, a client certificate and key."""
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes(),
                                        private_key=Path(key).read_bytes() if key else None,
                                        certificate_chain=Path(cert).read_bytes() if cert else None)
