"""Typed configuration of the cloud tier, in one place: batching, replicas and autoscaling, the gRPC front,
metrics and the local Ray instance. Load it from YAML (`CloudConfig.from_yaml`); CLI flags override single
fields. Unknown keys are refused, so a typo never silently falls back to a default.

Example (every key optional; see cloud/cluster/serve-config.yaml):

    batch: {max_batch_size: 16, batch_wait_ms: 0}
    autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}
    replica: {num_cpus: 1, torch_threads: 1}
    front: {port: 50051, max_in_flight: 256}
    metrics: {port: 9464}
"""
from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rapnet.transport import DEFAULT_MAX_MESSAGE_BYTES, TOKEN_ENV


REPLICA_TRANSPORTS = ("grpc", "ray")


@dataclass(frozen=True)
class BatchSettings:
    """Dynamic batching inside each replica (@serve.batch)."""

    # Samples per forward pass, and per chunk the front sends. 16: two chunks of 16 keep one queued behind the one
    # computing. With the shipped model at 32 clients 16 served 1.11-1.23x what 32 did (3 of 3 interleaved pairs,
    # `benchmarks/cloud_bench.py --max-batch-size 16 32` on a 2-core host), although bare torch runs batch 32 faster
    # per sample: with 32 the replica idles while a chunk fills. GPUs want more.
    max_batch_size: int = 16
    # How long the first sample of a replica batch waits for company. 0: the front already coalesces samples into
    # chunks, and waiting again in the replica measured slower (0.68 -> 0.72 of bare torch at 32 clients at 0).
    batch_wait_ms: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= 1024:
            raise ValueError(f"batch.max_batch_size {self.max_batch_size} is outside 1..1024")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch.batch_wait_ms {self.batch_wait_ms} is outside 0..1000")


@dataclass(frozen=True)
class AutoscalingSettings:
    """Replica count. min == max gives a fixed count; otherwise Ray Serve autoscales between them on the
    number of ongoing requests per replica."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"autoscaling: need 1 <= min_replicas ({self.min_replicas}) <= max_replicas ({self.max_replicas})"
            )
        if self.target_ongoing_requests <= 0:
            raise ValueError("autoscaling.target_ongoing_requests must be positive")

    @property
    def fixed(self) -> bool:
        return self.min_replicas == self.max_replicas

    def serve_options(self) -> dict[str, Any]:
        """The deployment options Ray Serve takes (num_replicas, or autoscaling_config)."""
        if self.fixed:
            return {"num_replicas": self.min_replicas}
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            }
        }


@dataclass(frozen=True)
class ReplicaSettings:
    """What one replica (a Ray actor running the cloud stages) gets."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0  # > 0: the replica moves the model to CUDA
    torch_threads: int = 1  # intra-op threads per replica; more than cores/replicas oversubscribes the CPU
    max_ongoing_requests: int = 128  # per replica, Serve's own bound (keep >= max_batch_size)
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 10.0
    graceful_shutdown_timeout_s: float = 5.0
    max_constructor_retry_count: int = 3  # a replica that cannot load the checkpoint fails fast
    # Keep freed heap memory for reuse (glibc mallopt; rapnet.runtime.keep_freed_memory): no page faults on every
    # batch's fresh activations, at the cost of keeping the peak heap.
    keep_freed_memory: bool = True
    # Run the replica's threads under Linux SCHED_BATCH (rapnet.runtime.prefer_throughput_scheduling): Serve's and
    # gRPC's threads waking up do not preempt the compute thread.
    sched_batch: bool = True
    # Environment of the replica processes (Ray runtime_env), e.g. Ray Serve's RAY_SERVE_* switches; works on a
    # cluster too, unlike variables set for the local raylet.
    env_vars: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0 or self.torch_threads < 1:
            raise ValueError("replica: num_cpus and num_gpus must be >= 0 and torch_threads >= 1")
        if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in dict(self.env_vars).items()):
            raise ValueError("replica.env_vars must map names to strings (quote numbers in YAML: '0')")
        if TOKEN_ENV in self.env_vars:
            raise ValueError(f"replica.env_vars must not hold {TOKEN_ENV}: replicas never need the bearer token, and "
                             "every process of the replica's runtime environment would carry it")


@dataclass(frozen=True)
class FrontSettings:
    """The edge-facing gRPC server (grpc.aio in the driver process)."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    # Send limit, and cap on the receive limit, which is the served model's largest legitimate request
    # (rapnet.codec.budget: 41 KB for the shipped CIFAR-10 model).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_in_flight: int = 256  # samples admitted at once (unary + stream); beyond: RESOURCE_EXHAUSTED
    request_timeout_s: float = 30.0  # cap for requests that carry no gRPC deadline
    retries: int = 1  # retries of a request whose replica died under it
    honour_request_deadline_ms: bool = True  # also honour InferRequest.deadline_ms (same-clock assumption)
    pipeline_per_replica: int = 2  # chunks the front keeps outstanding per running replica (see front.py)
    chunk_hold_ms: float = 50.0  # cap on how long a partial chunk waits for company while replicas are busy (front.py)
    stream_window: int = 64  # outstanding messages per InferStream before the server stops reading
    # How chunks reach replicas: "grpc" (Serve's direct gRPC channel to each replica, pickled both ways) or "ray"
    # (Ray actor calls with object references, Serve's default). grpc costs the front half the CPU per call and
    # served 19 % more at 32 clients on a 2-core host (benchmarks/cloud_bench.py).
    replica_transport: str = "grpc"
    # Run the front's threads under Linux SCHED_BATCH once started: on a machine it shares with replicas, its
    # wake-ups for every request do not preempt their compute threads. stop() restores the policy it found.
    sched_batch: bool = True
    grace_s: float = 2.0  # on shutdown, in-flight calls get this long to finish
    # INVALID_ARGUMENT, UNAUTHENTICATED and FAILED_PRECONDITION are answered after this pause (within the call's
    # deadline): a client sending malformed calls back to back cannot take the front's event loop from the others
    # (benchmarks/hostile_clients.py). Waiting costs the front nothing; 0: answer at once.
    refusal_delay_ms: float = 100.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"front.port {self.port} is outside 0..65535")
        if self.max_message_bytes < 1024:
            raise ValueError("front.max_message_bytes must be at least 1024")
        if self.max_in_flight < 1 or self.retries < 0 or self.stream_window < 1 or self.pipeline_per_replica < 1:
            raise ValueError("front: max_in_flight, stream_window and pipeline_per_replica must be >= 1, retries >= 0")
        if not 0 <= self.chunk_hold_ms <= 1000:
            raise ValueError(f"front.chunk_hold_ms {self.chunk_hold_ms} is outside 0..1000")
        if not 0 <= self.refusal_delay_ms <= 5000:
            raise ValueError(f"front.refusal_delay_ms {self.refusal_delay_ms} is outside 0..5000")
        if self.replica_transport not in REPLICA_TRANSPORTS:
            raise ValueError(f"front.replica_transport {self.replica_transport!r} is not one of {REPLICA_TRANSPORTS}")

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus exporter of the front (prometheus_client). port None: no exporter; 0: a free port."""

    host: str = "127.0.0.1"
    port: int | None = None


@dataclass(frozen=True)
class RaySettings:
    """The Ray instance start_local / `rapnet-cloud serve` starts when no address is given."""

    address: str | None = None  # "auto": attach to the cluster this node belongs to
    num_cpus: int = 2
    object_store_bytes: int = 200 * 1024 * 1024
    temp_dir: str | None = None  # default: Ray's own (/tmp/ray)
    namespace: str = "rapnet"
    # Nice value of the worker processes (replicas). Ray's default, 15, lets the front and the load outrank the
    # replicas on a shared machine: 0 measured 0.64 -> 0.69 of bare torch at 32 clients
    # (benchmarks/cloud_bench.py, 2-core host).
    worker_niceness: int = 0
    # Call arguments up to this size travel inside the call. Ray's default (100 KB) sends a chunk of 16 samples
    # at split 4 (~400 KB) through the object store instead: a put, raylet work and a fetch per call.
    inline_args_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if not 0 <= self.worker_niceness <= 19:
            raise ValueError(f"ray.worker_niceness {self.worker_niceness} is outside 0..19")
        if not 100 * 1024 <= self.inline_args_bytes <= 10 << 20:  # Ray inlines at most 10 MiB per call
            raise ValueError(f"ray.inline_args_bytes {self.inline_args_bytes} is outside 100 KiB..10 MiB")


@dataclass(frozen=True)
class CloudConfig:
    app_name: str = "rapnet"
    deployment_name: str = "CloudStages"
    batch: BatchSettings = field(default_factory=BatchSettings)
    autoscaling: AutoscalingSettings = field(default_factory=AutoscalingSettings)
    replica: ReplicaSettings = field(default_factory=ReplicaSettings)
    front: FrontSettings = field(default_factory=FrontSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    ray: RaySettings = field(default_factory=RaySettings)

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None) -> "CloudConfig":
        data = dict(data or {})
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "CloudConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"cannot read cloud config {path}: {err}") from None
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"cloud config {path} must be a mapping at the top level")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"cloud config {path}: {err}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, **sections: dict[str, Any]) -> "CloudConfig":
        """Replace single fields: cfg.with_overrides(front={"port": 0}, batch={"max_batch_size": 8})."""
        changes = {}
        for name, values in sections.items():
            values = {k: v for k, v in values.items() if v is not None}
            if values:
                changes[name] = dataclasses.replace(getattr(self, name), **values)
        return dataclasses.replace(self, **changes)


def _build(cls, data: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in {where or 'the top level'}; known: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        sub = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ValueError(f"{where}{name} must be a mapping")
            values[name] = _build(sub, value, f"{where}{name}.")
        else:
            values[name] = value
    return cls(**values)
