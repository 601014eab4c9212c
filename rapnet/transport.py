"""The client side of the wire, for everyone who calls the cloud front (the edge agent, the tests, the
benchmarks, the cloud's own tools): channel options, TLS client credentials, the bearer token and the
metadata that carries it, and the health check.

    token = load_token(token_file)                     # --token-file, else $RAPNET_TOKEN, else None
    channel = open_channel(address, ca="dev-certs/ca.pem")
    stub = InferenceStub(channel)                      # protos.rapnet.v1.inference_pb2_grpc
    response = stub.Infer(request, metadata=auth_metadata(token.value), timeout=2.0)

Every call to rapnet.v1.Inference carries `authorization: Bearer <token>`; the server compares it in
constant time (BearerToken.matches) and nobody logs it. So that the token never crosses a network in the clear, a
channel without TLS opens only to a loopback address (127.0.0.0/8, ::1, localhost) unless the caller passes
`allow_plaintext=True` (check_plaintext_allowed).
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from pathlib import Path
from typing import Sequence

import grpc

TOKEN_ENV = "RAPNET_TOKEN"
AUTH_HEADER = "authorization"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20  # the front's default (cloud.config.FrontSettings.max_message_bytes)


# --- the bearer token --------------------------------------------------------------------------------------
class BearerToken:
    """A bearer token: at least 16 printable ASCII characters without spaces. `repr` and `str` never show it."""

    def __init__(self, token: str):
        token = token.strip()
        if len(token) < 16:
            raise ValueError("the bearer token must be at least 16 characters (use `rapnet-cloud make-token`)")
        if any(c.isspace() for c in token) or not token.isascii():
            raise ValueError("the bearer token must be printable ASCII without spaces")
        self._expected = f"Bearer {token}".encode()
        self._token = token

    @classmethod
    def generate(cls) -> "BearerToken":
        return cls(secrets.token_urlsafe(32))

    @property
    def value(self) -> str:
        """The token itself, for handing to a client (never for logs)."""
        return self._token

    def matches(self, metadata) -> bool:
        """Server side: True when the call's metadata holds exactly `authorization: Bearer <token>`."""
        presented = [value for key, value in (metadata or ()) if key == AUTH_HEADER]
        if len(presented) != 1:
            return False
        value = presented[0]
        value = value.encode() if isinstance(value, str) else bytes(value)
        return hmac.compare_digest(value, self._expected)

    def __repr__(self) -> str:
        return "BearerToken(<redacted>)"

    __str__ = __repr__


def load_token(token_file: str | os.PathLike | None = None, env: dict | None = None) -> BearerToken | None:
    """The token from `token_file`, else from $RAPNET_TOKEN, else None."""
    env = os.environ if env is None else env
    if token_file:
        path = Path(token_file)
        try:
            text = path.read_text()
        except OSError as err:
            raise ValueError(f"cannot read token file {path}: {err.strerror}") from None
        return BearerToken(text)
    if env.get(TOKEN_ENV):
        return BearerToken(env[TOKEN_ENV])
    return None


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The metadata to send with every call."""
    return ((AUTH_HEADER, f"Bearer {token}"),)


# --- channels ----------------------------------------------------------------------------------------------
def read_pem(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of a PEM file; ValueError naming `what` and the path when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read the TLS {what} {path}: {err.strerror}") from None


def client_credentials(ca: str, client_cert: str | None = None, client_key: str | None = None) -> grpc.ChannelCredentials:
    """Trust `ca` (the dev CA, or the CA that signed the server) and optionally present a client certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "CA certificate"),
        private_key=read_pem(client_key, "client key") if client_key else None,
        certificate_chain=read_pem(client_cert, "client certificate") if client_cert else None,
    )


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def is_loopback_address(address: str) -> bool:
    """Whether a gRPC target HOST:PORT ([V6]:PORT, ipv4:/ipv6: prefixes allowed) names this machine's loopback
    interface: 127.0.0.0/8, ::1 or localhost. Other host names are not resolved (DNS could answer anything)."""
    host = address
    for prefix in ("ipv4:", "ipv6:", "dns:///"):
        if host.startswith(prefix):
            host = host[len(prefix):]
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.rpartition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext_allowed(address: str, allow_plaintext: bool = False) -> None:
    """Refuse (ValueError, naming the fix) a channel without TLS to an address that is not loopback: the bearer
    token would cross the network in the clear."""
    if not allow_plaintext and not is_loopback_address(address):
        raise ValueError(
            f"refusing to send the bearer token in plaintext to {address}: give the CA certificate that signed the "
            "cloud's certificate (--tls-ca CA.pem; rapnet-cloud make-dev-cert writes one), or reach the cloud on a "
            "loopback address (127.0.0.1), where plaintext is allowed")


def open_channel(address: str, ca: str | None = None, client_cert: str | None = None, client_key: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, aio: bool = False,
                 extra_options: Sequence[tuple[str, int]] = (), allow_plaintext: bool = False):
    """A channel to the front: TLS when `ca` is given (the CA that signed the server certificate), plain
    otherwise, which only a loopback address or `allow_plaintext` allows (ValueError); `extra_options` are added to
    the message-size options."""
    make = grpc.aio if aio else grpc
    options = channel_options(max_message_bytes) + list(extra_options)
    if ca is None:
        check_plaintext_allowed(address, allow_plaintext)
        return make.insecure_channel(address, options=options)
    return make.secure_channel(address, client_credentials(ca, client_cert, client_key), options=options)


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 2.0) -> str:
    """'SERVING', 'NOT_SERVING', ... as grpc.health.v1 reports it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
