"""The Ray Serve application: replicas that hold the model and run the cloud stages with dynamic batching.

Each replica loads the checkpoint once, refuses to start unless its model identity equals the one the front
expects, and answers chunks of `Sample`s (coalesced by the front) through `@serve.batch` (size and wait from `BatchSettings`). A batch that mixes
split points and exits is regrouped by `cloud.batching.run_batch`. Replica count and autoscaling come from
`CloudConfig` (see `build_app`), never from code.
"""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from .batching import Sample, SampleResult, priced_rule_costs, run_batch
from .config import CloudConfig


class IdentityMismatch(RuntimeError):
    """The checkpoint a replica loaded is not the model the front serves."""


def _bind_replica_grpc_to_loopback() -> None:
    """On a local Ray instance (node address 127.0.0.1), bind Serve's per-replica gRPC server to 127.0.0.1.

    Ray Serve 2.60 starts that server (the channel `front.replica_transport: grpc` uses) on every interface,
    `[::]:0`, whatever the node address, after the replica's constructor has run; on one machine nothing outside it
    needs to reach it. On a cluster the node address is the private IP and Serve's own binding is left alone.
    """
    import ray
    from ray.serve._private import replica as serve_replica

    if ray.util.get_node_ip_address() != "127.0.0.1":
        return
    bind = getattr(serve_replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "loopback_only", False):
        return  # another Serve version (test_replicas_listen_on_loopback_only tells), or wrapped already

    def loopback_only(server, address: str):
        host, _, port = address.rpartition(":")
        return bind(server, f"127.0.0.1:{port}" if host in ("[::]", "0.0.0.0") else address)

    loopback_only.loopback_only = True
    serve_replica.add_port_to_grpc_server = loopback_only


@serve.deployment
class CloudStages:
    """Runs stages [split, exit] of the RAPNet model for batches of samples."""

    def __init__(self, checkpoint: str, expected_identity: str, max_batch_size: int, batch_wait_s: float,
                 torch_threads: int = 1, keep_freed_memory: bool = True, sched_batch: bool = True):
        import torch

        from rapnet.runtime import keep_freed_memory as keep
        from rapnet.runtime import prefer_throughput_scheduling

        # Before the first forward pass, so that its activations' memory is reused from then on.
        self.keeps_freed_memory = keep_freed_memory and keep()
        if sched_batch:
            prefer_throughput_scheduling()  # the compute pool's thread, started below, inherits it
        _bind_replica_grpc_to_loopback()
        torch.set_num_threads(torch_threads)  # oversubscribed intra-op threads make small convs many times slower
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # already fixed in this process
        from rapnet.checkpoint import load_model

        model, metadata = load_model(checkpoint)
        if metadata["identity"] != expected_identity:
            raise IdentityMismatch(
                f"replica loaded {checkpoint} with model identity {metadata['identity'][:12]}, the front serves "
                f"{expected_identity[:12]}: every node must hold the same checkpoint file"
            )
        self.device = torch.device("cuda") if torch.cuda.is_available() else None
        self.model = model.to(self.device) if self.device is not None else model
        self.identity = metadata["identity"]
        self.relative_costs = priced_rule_costs(model)  # for requests that leave the exit to the cloud
        self.infer.set_max_batch_size(max_batch_size)
        self.infer.set_batch_wait_timeout_s(batch_wait_s)
        # Compute off the replica's event loop, so the next batch gathers while this one runs.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rapnet-compute")

    async def __call__(self, chunk: list[Sample]) -> list[SampleResult]:
        """One call carries a chunk of samples the front coalesced; @serve.batch merges chunks up to
        max_batch_size samples, so the per-call overhead of Ray is paid per chunk, not per sample."""
        return await self.infer(chunk)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=lambda chunks: sum(map(len, chunks)))
    async def infer(self, chunks: list[list[Sample]]) -> list[list[SampleResult]]:
        samples = [sample for chunk in chunks for sample in chunk]
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._pool, run_batch, self.model, samples, self.device,
                                             self.relative_costs)
        out, pos = [], 0
        for chunk in chunks:
            out.append(results[pos : pos + len(chunk)])
            pos += len(chunk)
        return out

    def model_identity(self) -> str:
        return self.identity

    def whoami(self) -> dict:
        """Process id and Ray actor name of this replica (tests kill it by name), and its process settings."""
        import ray

        from rapnet.runtime import thread_scheduling_policies

        return {"pid": os.getpid(), "actor_name": ray.get_runtime_context().get_actor_name(),
                "keeps_freed_memory": self.keeps_freed_memory,
                "scheduling_policies": sorted(thread_scheduling_policies())}


def build_app(checkpoint: str, identity: str, config: CloudConfig):
    """The bound application, with every deployment option taken from the config."""
    rep = config.replica
    options = dict(
        name=config.deployment_name,
        ray_actor_options={"num_cpus": rep.num_cpus, "num_gpus": rep.num_gpus,
                           **({"runtime_env": {"env_vars": dict(rep.env_vars)}} if rep.env_vars else {})},
        max_ongoing_requests=rep.max_ongoing_requests,
        health_check_period_s=rep.health_check_period_s,
        health_check_timeout_s=rep.health_check_timeout_s,
        graceful_shutdown_timeout_s=rep.graceful_shutdown_timeout_s,
        max_constructor_retry_count=rep.max_constructor_retry_count,
        **config.autoscaling.serve_options(),
    )
    return CloudStages.options(**options).bind(
        checkpoint, identity, config.batch.max_batch_size, config.batch.batch_wait_ms / 1e3, rep.torch_threads,
        rep.keep_freed_memory, rep.sched_batch,
    )
