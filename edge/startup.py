"""The start-up check of the cloud: before the first frame, the agent asks the front's health (grpc.health.v1) and
makes one authenticated call (a real Infer request: a grey image at split 0 for exit 0, the cheapest thing the
cloud runs), so that a setting that makes every offload fail is named at once instead of silently degrading
every frame.

    check = CloudCheck(link, contract, settings=config.cloud, log=log, checkpoint=path)
    result = check.start()     # one line in the log; on a blocking failure, re-checks in the background
    ...
    check.stop()

Each failure gives ONE line that names the fix: nothing listening or an unresolvable host (unreachable), TLS
against a plaintext front or the reverse, a CA that did not sign the front's certificate or a certificate for
another name (tls), a missing or wrong token (token), a front that serves another model (model), a server that is
no RAPNet front (service). These block offloading (CloudLink.blocked: frames are answered here, flagged
"cloud check failed: <kind>") and the check runs again in the background with backoff (1 s doubling up to
`check_retry_max_s`, with jitter) until it passes, when offloading starts. A slow, busy or not-yet-serving front
only gets a warning: the circuit breaker handles those frame by frame.

gRPC reports a failed connection as UNAVAILABLE whatever the cause, so the cause is found by probing the address
directly: a TCP connect, then a TLS handshake with Python's ssl (what the server speaks, and whether the given CA
and host name verify its certificate).
"""
from __future__ import annotations

import random
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import grpc

from protos.rapnet.v1 import inference_pb2 as pb
from rapnet.transport import health_status

from .link import INFER_METHOD, CloudLink

BLOCKING = ("unreachable", "tls", "token", "model", "service")  # kinds that stop offloading until fixed
CHECK_RETRY_INITIAL_S = 1.0
PROBE_TIMEOUT_S = 3.0  # the TCP and TLS probes that explain a failed connection


@dataclass(frozen=True)
class CheckResult:
    kind: str  # "ok", one of BLOCKING, or "slow" / "busy" / "not-serving" / "error" (warnings only)
    line: str  # what the log says: what failed and how to fix it
    ms: float = 0.0  # how long the check took

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    @property
    def blocking(self) -> bool:
        return self.kind in BLOCKING


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of HOST:PORT or [V6]:PORT; None for other gRPC target forms (dns:///..., unix:...)."""
    if "://" in address or address.startswith("unix:"):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _grpc_error(err: grpc.RpcError) -> tuple[str, str]:
    code = err.code() if hasattr(err, "code") else None
    return (code.name if code is not None else "UNKNOWN"), ((err.details() if hasattr(err, "details") else "") or "")


class CloudCheck:
    """Checks the cloud behind `link` (its channel, credentials and token) for an edge holding `contract`."""

    def __init__(self, link: CloudLink, contract, settings, log: Callable[[str], None] | None = None,
                 checkpoint: str | None = None, rng: random.Random | None = None):
        self.link, self.contract, self.settings = link, contract, settings
        self.log = log or (lambda msg: None)
        self.checkpoint = checkpoint
        self.address = link.target.address
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.result: CheckResult | None = None  # the latest
        self.attempts = 0
        self._call = link.channel.unary_unary(INFER_METHOD, request_serializer=None,
                                              response_deserializer=lambda data: data)

    # ---- one check ------------------------------------------------------------------------------------
    def check(self) -> CheckResult:
        """Health, then one authenticated Infer call; a failed connection is explained by probing the address."""
        t0 = time.perf_counter()
        self.attempts += 1
        result = self._check()
        return CheckResult(result.kind, result.line, (time.perf_counter() - t0) * 1e3)

    def _check(self) -> CheckResult:
        timeout = self.link.deadline_ms / 1e3
        health = None
        try:
            health = health_status(self.link.channel, timeout=timeout)
        except grpc.RpcError as err:
            code, details = _grpc_error(err)
            if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                found = self._diagnose_connection()
                if found is not None:
                    return found
                if code == "DEADLINE_EXCEEDED":
                    return self._slow()
                return CheckResult("unreachable", f"{self.address} cannot be reached over gRPC ({code}: {details}): "
                                                  "check --cloud HOST:PORT and the cloud's logs")
            # UNIMPLEMENTED: a front without the health service; the Infer call below still tells
        return self._probe(health)

    def _probe(self, health: str | None) -> CheckResult:
        """One real request, with the token, as a frame would send it."""
        try:
            raw = self._call(self._probe_request(), timeout=self.link.deadline_ms / 1e3, metadata=self.link.metadata)
        except grpc.RpcError as err:
            code, details = _grpc_error(err)
            return self._refused(code, details, health)
        response = pb.InferResponse.FromString(raw)
        if response.model_identity and response.model_identity != self.contract.identity:
            return self._other_model(f"it answered for model {response.model_identity[:12]}")
        return CheckResult("ok", f"{self.address} is healthy, accepts this edge's token and serves its model "
                                 f"({self.contract.identity[:12]})")

    def _probe_request(self) -> bytes:
        import numpy as np

        from rapnet.codec import build_request, encode_options

        c, h, w = self.contract.carry_shapes[0]["image"]
        pixels = np.full((h, w, c), 128, np.uint8)
        request = build_request(self.contract, {"image": None}, 0, 0, encode_options("png"), image=pixels,
                                request_id=f"startup-check-{uuid.uuid4().hex[:12]}",
                                deadline_ms=int(self.link.deadline_ms))
        return request.SerializeToString()

    # ---- what each failure means ----------------------------------------------------------------------
    def _refused(self, code: str, details: str, health: str | None) -> CheckResult:
        if code == "UNAUTHENTICATED":
            if self.link.metadata is None:
                return CheckResult("token", f"{self.address} wants a bearer token and the agent has none: give the "
                                            "cloud's token with --token-file FILE or $RAPNET_TOKEN")
            given = f"--token-file {self.settings.token_file}" if self.settings.token_file else "$RAPNET_TOKEN"
            return CheckResult("token", f"{self.address} refused the token ({details or code}): {given} does not "
                                        "hold the cloud's token; give the one the cloud was started with")
        if code == "FAILED_PRECONDITION":
            return self._other_model(details)
        if code == "UNIMPLEMENTED":
            return CheckResult("service", f"{self.address} answers gRPC but serves no rapnet.v1.Inference: check "
                                          "--cloud HOST:PORT (the cloud front's port)")
        if code == "DEADLINE_EXCEEDED":
            return self._slow()
        if code == "RESOURCE_EXHAUSTED":
            return CheckResult("busy", f"{self.address} is busy ({details}): offloading anyway; frames are answered "
                                       "here while it refuses them (circuit breaker)")
        if code == "UNAVAILABLE":
            found = self._diagnose_connection()
            if found is not None:
                return found
        if health == "NOT_SERVING" or code == "UNAVAILABLE":
            return CheckResult("not-serving", f"{self.address} is up but not serving yet ({details or code}; its "
                                              "replicas may be starting): offloading once it answers, frames are "
                                              "answered here meanwhile (circuit breaker)")
        if code in ("INVALID_ARGUMENT", "PERMISSION_DENIED"):
            return CheckResult("service", f"{self.address} refused the check request ({code}: {details}): edge and "
                                          "cloud may run different versions of the wire format; run the same release")
        return CheckResult("error", f"{self.address} failed the check request ({code}: {details}): offloading "
                                    "anyway; see the cloud's logs")

    def _other_model(self, details: str) -> CheckResult:
        here = f" ({self.checkpoint})" if self.checkpoint else ""
        return CheckResult("model", f"{self.address} serves another model ({details}): give this edge the "
                                    f"checkpoint the cloud serves with --checkpoint, or serve this edge's{here} there")

    def _slow(self) -> CheckResult:
        return CheckResult("slow", f"{self.address} did not answer the check within {self.link.deadline_ms:g} ms "
                                   "(--deadline-ms): offloading anyway; frames are answered here while it stays that "
                                   "slow (circuit breaker)")

    def _diagnose_connection(self) -> CheckResult | None:
        """Why gRPC could not connect, from a TCP connect and a TLS handshake of our own; None if both look
        right (the cause is elsewhere)."""
        parts = split_address(self.address)
        if parts is None:
            return None
        host, port = parts
        fix = "check --cloud HOST:PORT and that the cloud (rapnet-cloud serve) runs there"
        try:
            sock = socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
        except socket.gaierror:
            return CheckResult("unreachable", f"cannot resolve the host of --cloud {self.address}: {fix}")
        except ConnectionRefusedError:
            return CheckResult("unreachable", f"nothing listens at {self.address} (connection refused): {fix}")
        except OSError as err:  # timed out, no route
            return CheckResult("unreachable", f"{self.address} does not answer ({err.strerror or err}): {fix}, "
                                              "and that no firewall stands between")
        with sock:
            return self._diagnose_tls(sock, host)

    def _diagnose_tls(self, sock: socket.socket, host: str) -> CheckResult | None:
        target = self.link.target
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
        probe.set_alpn_protocols(["h2"])
        sock.settimeout(PROBE_TIMEOUT_S)
        try:
            with probe.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=True):
                speaks_tls = True
        except ssl.SSLError as err:
            speaks_tls = "CERTIFICATE_REQUIRED" in str(err) or "HANDSHAKE_FAILURE" in str(err)
        except OSError:  # closed or reset by a plaintext server, or timed out waiting for a ServerHello
            speaks_tls = False
        if target.ca is None:
            if speaks_tls:
                return CheckResult("tls", f"{self.address} speaks TLS but the agent connects in plaintext: give "
                                          "--tls-ca with the CA certificate that signed the cloud's certificate")
            return None
        if not speaks_tls:
            return CheckResult("tls", f"{self.address} does not speak TLS, but --tls-ca {target.ca} is given: drop "
                                      "--tls-ca (and --tls-cert/--tls-key), or start the cloud with TLS")
        return self._verify_certificate(host)

    def _verify_certificate(self, host: str) -> CheckResult | None:
        target = self.link.target
        context = ssl.create_default_context(cafile=target.ca)
        context.set_alpn_protocols(["h2"])
        if target.client_cert:
            context.load_cert_chain(target.client_cert, target.client_key)
        try:
            with socket.create_connection((host, split_address(self.address)[1]), timeout=PROBE_TIMEOUT_S) as sock:
                with context.wrap_socket(sock, server_hostname=host) as tls:
                    # TLS 1.3: a server that refuses the client (no certificate, or one it does not trust) does so
                    # after the client's handshake ended, by closing; a front that is content sends its HTTP/2
                    # settings instead
                    tls.settimeout(1.0)
                    if tls.recv(1):
                        return None
            if target.client_cert is None:
                return CheckResult("tls", f"{self.address} asks for a client certificate (mutual TLS): give "
                                          "--tls-cert and --tls-key")
            return CheckResult("tls", f"{self.address} does not accept the client certificate --tls-cert "
                                      f"{target.client_cert}: give one signed by the CA the cloud trusts for clients")
        except ssl.SSLCertVerificationError as err:
            if err.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
                return CheckResult("tls", f"the certificate of {self.address} does not name {host}: connect by a "
                                          f"name it holds (e.g. --cloud localhost:PORT) or reissue it for {host}")
            return CheckResult("tls", f"the certificate of {self.address} is not signed by --tls-ca {target.ca} "
                                      f"({err.verify_message}): give the CA certificate that signed it")
        except ssl.SSLError as err:
            if target.client_cert is None and ("CERTIFICATE_REQUIRED" in str(err) or "HANDSHAKE_FAILURE" in str(err)):
                return CheckResult("tls", f"{self.address} asks for a client certificate (mutual TLS): give "
                                          "--tls-cert and --tls-key")
            return None
        except OSError:
            return None

    # ---- at start-up, and again in the background -----------------------------------------------------
    def start(self) -> CheckResult:
        """Check once (one log line); on a blocking failure, block offloading and keep checking in the background
        until the check passes."""
        result = self.result = self.check()
        self._report(result)
        if result.blocking:
            self.link.blocked = result.kind
            self._thread = threading.Thread(target=self._retry, name="edge-cloud-check", daemon=True)
            self._thread.start()
        return result

    def _report(self, result: CheckResult) -> None:
        if result.ok:
            self.log(f"cloud check passed in {result.ms:.0f} ms: {result.line}")
        elif result.blocking:
            self.log(f"cloud check failed ({result.kind}): {result.line}; answering every frame here and checking "
                     "again in the background")
        else:
            self.log(f"cloud check warning ({result.kind}): {result.line}")

    def _retry(self) -> None:
        step, first = CHECK_RETRY_INITIAL_S, time.monotonic()
        while True:
            delay = step / 2 + self._rng.uniform(0, step / 2)
            if self._stop.wait(delay):
                return
            step = min(step * 2, self.settings.check_retry_max_s)
            result = self.check()
            if self._stop.is_set():
                return
            previous, self.result = self.result, result
            if result.blocking:
                self.link.blocked = result.kind
                if result.kind != previous.kind or result.line != previous.line:
                    self._report(result)  # a new reason: one new line
                continue
            self.link.blocked = None
            self.log(f"cloud check passed after {self.attempts} attempts ({time.monotonic() - first:.0f} s): "
                     f"offloading on" + ("" if result.ok else f" ({result.kind}: {result.line})"))
            return

    @property
    def passed(self) -> bool:
        return self.result is not None and not self.result.blocking

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=PROBE_TIMEOUT_S * 2 + self.link.deadline_ms / 1e3)
            self._thread = None
