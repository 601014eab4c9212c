"""The edge's side of the network: one gRPC channel to the cloud front, a circuit breaker, and a live
estimate of bandwidth, round-trip time and cloud queueing from the agent's own transfers.

    link = CloudLink(CloudTarget("127.0.0.1:50051", token=..., ca=None), deadline_ms=1000)
    if link.admit() is None:                   # None: a request may go now (else why not: the degraded reason)
        reply = link.infer(request_bytes)      # raises CloudCallError (with a gRPC status name) on failure
    link.estimate.snapshot()                   # {"bandwidth_mbps": ..., "rtt_ms": ..., "cloud_queue_ms": ...}

Requests are sent pre-serialized (a unary-unary call with an identity serializer), so the bytes the agent
reports are exactly the bytes of the message gRPC sends.
"""
from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass

import grpc

from protos.rapnet.v1 import inference_pb2 as pb
from rapnet.transport import DEFAULT_MAX_MESSAGE_BYTES, auth_metadata, open_channel

INFER_METHOD = "/rapnet.v1.Inference/Infer"


@dataclass(frozen=True)
class CloudTarget:
    """Where the cloud is and how to authenticate to it. `repr` never shows the token."""

    address: str
    token: str | None = None
    ca: str | None = None  # TLS: the CA that signed the server certificate (None: plaintext, loopback only)
    client_cert: str | None = None
    client_key: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # gRPC send and receive limit; the agent's: the contract's

    @classmethod
    def from_settings(cls, settings, token: str | None, address: str | None = None,
                      max_message_bytes: int | None = None) -> "CloudTarget":
        """The target edge.config.CloudSettings describe, with the token read at start-up; `address` replaces
        the settings' (the embedded local cloud's). `max_message_bytes`: the limit where the settings leave it to
        the model contract (CloudSettings.message_limit)."""
        limit = settings.max_message_bytes if settings.max_message_bytes is not None else max_message_bytes
        if limit is None:
            raise ValueError("cloud.max_message_bytes is auto: pass the model contract's limit "
                             "(edge.config.CloudSettings.message_limit)")
        return cls(address or settings.address, token, settings.tls_ca, settings.tls_cert, settings.tls_key, limit)

    def __repr__(self) -> str:
        return (f"CloudTarget(address={self.address!r}, token={'<redacted>' if self.token else None}, "
                f"tls={self.ca is not None}, mutual_tls={self.client_cert is not None})")

    __str__ = __repr__


class CloudCallError(Exception):
    """A failed cloud call: `code` is the gRPC status name (UNAVAILABLE, DEADLINE_EXCEEDED, ...) or
    CIRCUIT_OPEN / CLIENT_ERROR."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code, self.detail = code, detail


# --------------------------------------------------------------------------------------------------------
# Circuit breaker
# --------------------------------------------------------------------------------------------------------


class CircuitBreaker:
    """closed -> (failures consecutive failures) -> open -> (cooldown) -> half-open: one probe request;
    its success closes the circuit, its failure opens it again with the cooldown doubled (up to max_cooldown_s).
    """

    def __init__(self, failures: int = 3, cooldown_s: float = 2.0, max_cooldown_s: float = 30.0, clock=time.monotonic):
        if failures < 1 or cooldown_s <= 0:
            raise ValueError("circuit breaker: failures must be >= 1 and cooldown_s > 0")
        self.threshold, self.base_cooldown, self.max_cooldown = failures, cooldown_s, max_cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self.state = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._cooldown = cooldown_s
        self._probe_out = False
        self.trips = 0  # times it opened

    def allow(self) -> bool:
        """May a request go to the cloud now? (In half-open, exactly one caller gets True: the probe.)"""
        with self._lock:
            if self.state == "closed":
                return True
            if self.state == "open" and self._clock() - self._opened_at >= self._cooldown:
                self.state = "half-open"
                self._probe_out = False
            if self.state == "half-open" and not self._probe_out:
                self._probe_out = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self.state, self._consecutive, self._cooldown, self._probe_out = "closed", 0, self.base_cooldown, False

    def failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            if self.state == "half-open":
                self._cooldown = min(self._cooldown * 2, self.max_cooldown)
                self._open()
            elif self.state == "closed" and self._consecutive >= self.threshold:
                self._open()

    def _open(self) -> None:
        self.state, self._opened_at, self._probe_out = "open", self._clock(), False
        self.trips += 1


# --------------------------------------------------------------------------------------------------------
# Network estimate
# --------------------------------------------------------------------------------------------------------


class NetworkEstimate:
    """Bandwidth, RTT and cloud queueing from completed calls.

    Per call: wire_ms = round trip seen by the edge - server time (queue + decode + compute, from the
    response). RTT: the minimum wire time over the last `window` calls (the smallest requests see almost only
    propagation; BBR's min-RTT idea). Bandwidth: EWMA of bytes * 8 / (wire_ms - RTT), i.e. the part of the
    wire time the payload itself took. Before the first call, the priors hold.
    """

    def __init__(self, bandwidth_mbps: float, rtt_ms: float, alpha: float = 0.2, window: int = 32,
                 min_transfer_ms: float = 0.05, stale_s: float = 2.0, half_life_s: float = 2.0, clock=time.monotonic):
        self.alpha, self.min_transfer_ms = alpha, min_transfer_ms
        self.stale_s, self.half_life_s, self._clock = stale_s, half_life_s, clock
        self._lock = threading.Lock()
        self._wire = collections.deque(maxlen=window)
        self.prior = (float(bandwidth_mbps), float(rtt_ms), 0.0)
        self.bandwidth_mbps, self.rtt_ms, self.cloud_queue_ms = self.prior
        self.samples = 0
        self._last = clock()

    def update(self, nbytes: int, round_trip_ms: float, server_ms: float, queue_ms: float) -> None:
        wire = max(round_trip_ms - server_ms, 0.0)
        with self._lock:
            self._wire.append(wire)
            self.rtt_ms = min(self._wire)
            transfer = max(wire - self.rtt_ms, self.min_transfer_ms)
            sample = nbytes * 8 / (transfer * 1e3)  # Mbit/s
            first = self.samples == 0
            self.bandwidth_mbps = sample if first else (1 - self.alpha) * self.bandwidth_mbps + self.alpha * sample
            self.cloud_queue_ms = queue_ms if first else (1 - self.alpha) * self.cloud_queue_ms + self.alpha * queue_ms
            self.samples += 1
            self._last = self._clock()

    def snapshot(self) -> dict:
        """The estimate now. Without a fresh sample for `stale_s`, it drifts back to the priors (half-life
        `half_life_s`): an agent that stopped offloading because the cloud looked slow tries again later,
        instead of trusting a stale measurement forever."""
        with self._lock:
            values = (self.bandwidth_mbps, self.rtt_ms, self.cloud_queue_ms)
            age = self._clock() - self._last
            if self.samples and age > self.stale_s:
                keep = 0.5 ** ((age - self.stale_s) / self.half_life_s)
                bw_prior, rtt_prior, q_prior = self.prior
                # bandwidth in log space: a factor-of-ten error decays like any other
                bw = math.exp(math.log(bw_prior) + keep * (math.log(max(values[0], 1e-6)) - math.log(bw_prior)))
                values = (bw, rtt_prior + keep * (values[1] - rtt_prior), q_prior + keep * (values[2] - q_prior))
            return {"bandwidth_mbps": values[0], "rtt_ms": values[1], "cloud_queue_ms": values[2],
                    "samples": self.samples, "age_s": age}


# --------------------------------------------------------------------------------------------------------
# The link
# --------------------------------------------------------------------------------------------------------


def answer_mismatch(response: pb.InferResponse, request_id: str, identity: str, split: int) -> str | None:
    """Why `response` is not the answer to the request with this id, for this model at this split; None if it is."""
    for what, got, want in (("request id", response.request_id, request_id),
                            ("model identity", response.model_identity, identity),
                            ("split point", response.split_point, split)):
        if got != want:
            return f"the answer names {what} {str(got)[:64]!r}, the request {str(want)[:64]!r}"
    return None


@dataclass
class CloudReply:
    response: pb.InferResponse
    round_trip_ms: float  # send to answer, as the edge saw it
    network_ms: float  # round trip minus the server's own time
    bytes_sent: int
    bytes_received: int


# Reconnect quickly once the cloud is back (gRPC's default backoff grows to 120 s).
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


class CloudLink:
    def __init__(self, target: CloudTarget, deadline_ms: float, breaker: CircuitBreaker | None = None,
                 estimate: NetworkEstimate | None = None):
        self.target, self.deadline_ms = target, float(deadline_ms)
        self.channel = open_channel(target.address, target.ca, target.client_cert, target.client_key,
                                    target.max_message_bytes, extra_options=RECONNECT_OPTIONS)
        self._call = self.channel.unary_unary(INFER_METHOD, request_serializer=None,
                                              response_deserializer=pb.InferResponse.FromString)
        self._metadata = auth_metadata(target.token) if target.token else None
        self.breaker = breaker or CircuitBreaker()
        self.estimate = estimate or NetworkEstimate(50.0, 5.0)
        # Set by the start-up check (edge.startup) while the cloud is known not to accept this edge's requests
        # (unreachable, TLS, token, model): what failed, e.g. "token". None: requests may go.
        self.blocked: str | None = None

    def admit(self) -> str | None:
        """None when a request may go to the cloud now; otherwise why not, as a frame's degraded reason. In the
        circuit's half-open state exactly one caller is admitted: the probe."""
        blocked = self.blocked
        if blocked is not None:
            return f"cloud check failed: {blocked}"
        if not self.breaker.allow():
            return f"circuit {self.breaker.state}"
        return None

    @property
    def metadata(self):
        """The call metadata (the bearer token) every request carries; never log it."""
        return self._metadata

    def infer(self, data: bytes, deadline_ms: float | None = None,
              expect: tuple[str, str, int] | None = None) -> CloudReply:
        """Send one serialized InferRequest; CloudCallError on any failure (the breaker is updated). `expect`:
        (request id, model identity, split point) the answer must carry, else CloudCallError MISMATCHED_ANSWER."""
        timeout = (deadline_ms if deadline_ms is not None else self.deadline_ms) / 1e3
        t0 = time.perf_counter()
        try:
            response = self._call(data, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            self.breaker.failure()
            code = err.code() if hasattr(err, "code") else None
            raise CloudCallError(code.name if code is not None else "UNKNOWN",
                                 (err.details() if hasattr(err, "details") else "") or "") from None
        except Exception as err:  # noqa: BLE001 - anything else the call raises is a failed offload too
            self.breaker.failure()
            raise CloudCallError("CLIENT_ERROR", f"{err.__class__.__name__}: {err}") from None
        round_trip = (time.perf_counter() - t0) * 1e3
        mismatch = answer_mismatch(response, *expect) if expect is not None else None
        if mismatch is not None:  # not the answer to this request: never used as one
            self.breaker.failure()
            raise CloudCallError("MISMATCHED_ANSWER", mismatch)
        self.breaker.success()
        t = response.timings
        server_ms = float(t.queue_ms + t.compute_ms + t.decode_ms)
        received = response.ByteSize()
        self.estimate.update(len(data) + received, round_trip, server_ms, float(t.queue_ms))
        return CloudReply(response, round_trip, max(round_trip - server_ms, 0.0), len(data), received)

    def close(self) -> None:
        self.channel.close()
