"""Cloud tier throughput and latency over real gRPC on loopback vs a bare in-process torch forward.

For 1, 8 and 32 concurrent clients: samples/s and p50/p99 latency of `Infer` calls (a client subprocess
running grpc.aio, TLS off, bearer token on, pre-encoded requests), and of a bare torch forward of the same
stages (`continue_mixed` from the split to the exit) with the same torch thread count as a replica, at the best
of the batch sizes the server may form (`bare_limit`: the largest, half and a quarter of it). Runs are
interleaved (bare, served, bare, served, ...) and repeated; medians are reported.
The server's own metrics (decode, queue, compute per batch, batch sizes) say where the time goes.

    python benchmarks/cloud_bench.py                      # ~3 minutes on 2 cores
    python benchmarks/cloud_bench.py --checkpoint models/rapnet-cifar10.pt --split 4 --seconds 5
    python benchmarks/cloud_bench.py --checkpoint models/rapnet-imagenette.pt --dataset imagenette --split 0 \
        --encoding raw+zstd --cloud-exit-price 0.03 --out benchmarks/results/cloud-imagenette.json
Writes --out (default benchmarks/results/cloud.json, cloud-DATASET.json with --dataset) and prints a markdown table (copied into docs/cloud.md).
Requests carry the model's own input size (the checkpoint's contract): noise of that size, or the --dataset's
test images fitted to it as the edge fits frames.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import itertools
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rapnet.machine import machine_info  # noqa: E402

TOKEN = "bench-token-" + "z" * 24


# ------------------------------------------------------------------------------------------------------
# Client subprocess
# ------------------------------------------------------------------------------------------------------


def _read_payloads(path: str) -> list[bytes]:
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def client_message_limit(payloads: list[bytes]) -> int:
    """The client channel's send and receive limit: gRPC's 1 MiB unless a request is larger (a large model's
    features at an early split), then that request's size and 64 KiB."""
    return max(1 << 20, max(map(len, payloads), default=0) + (64 << 10))


async def _client(address: str, payloads: list[bytes], clients: int, warmup_s: float, seconds: float,
                  rpc: str = "unary") -> dict:
    """`clients` closed-loop callers, each with one request outstanding: a unary Infer call per request, or
    (rpc="stream") one InferStream per caller, writing the next request once the previous answer came back."""
    import grpc

    limit = client_message_limit(payloads)
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary("/rapnet.v1.Inference/Infer", request_serializer=None, response_deserializer=None)
        stream = channel.stream_stream("/rapnet.v1.Inference/InferStream", request_serializer=None,
                                       response_deserializer=None)
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + seconds
        latencies: list[float] = []
        errors: dict[str, int] = {}

        async def worker(k: int) -> None:
            i = k
            open_stream = stream(metadata=metadata, timeout=warmup_s + seconds + 60) if rpc == "stream" else None
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    if open_stream is not None:
                        await open_stream.done_writing()
                    return
                try:
                    if open_stream is None:
                        await call(payloads[i % len(payloads)], metadata=metadata, timeout=30)
                    else:
                        await open_stream.write(payloads[i % len(payloads)])
                        await open_stream.read()
                    t1 = time.perf_counter()
                    if t0 >= measure_from and t1 <= stop_at:
                        latencies.append(t1 - t0)
                except grpc.aio.AioRpcError as err:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1
                    if open_stream is not None:
                        open_stream = stream(metadata=metadata, timeout=warmup_s + seconds + 60)
                i += clients

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return {"latencies": latencies, "seconds": seconds, "errors": errors}


def client_main(args) -> None:
    result = asyncio.run(_client(args.address, _read_payloads(args.payloads), args.clients, args.warmup, args.seconds,
                                 args.rpc))
    print(json.dumps(result))


# ------------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bare_limit(model, carries, split: int, exit_index: int, max_batch: int, warmup_s: float, seconds: float,
               exit_price: float | None = None) -> dict:
    """Bare torch at the best of max_batch, max_batch/2 and max_batch/4 (the limit the served path is held to).

    The best batch is not always the largest: on the 2-vCPU EPYC one thread runs these stages ~1.4x (split 4)
    and 1.8-1.9x (split 0) faster per sample at batch 16 than at 32 (activations outgrow the 2 MiB L2 cache).
    Comparing against the largest batch alone would flatter the served path, whose batches hold ~16 samples.
    """
    sizes = sorted({max(1, max_batch >> k) for k in range(3)}, reverse=True)
    by_batch = {b: bare_torch(model, carries, split, exit_index, b, warmup_s, seconds / len(sizes), exit_price)
                for b in sizes}
    best = max(by_batch, key=lambda b: by_batch[b]["samples_per_s"])
    return {**by_batch[best], "batch": best, "by_batch": {b: r["samples_per_s"] for b, r in by_batch.items()}}


def bare_torch(model, carries, split: int, exit_index: int, batch: int, warmup_s: float, seconds: float,
               exit_price: float | None = None) -> dict:
    """`exit_price`: the samples' exits come from the predictor and the priced rule, as the replica picks them for
    requests that leave the exit to the cloud (split 0); that work is timed too."""
    import torch

    from cloud.batching import priced_rule_costs
    from rapnet.exit_rules import priced_exits

    costs = priced_rule_costs(model)[: exit_index + 1] if exit_price is not None else None

    keys = carries[0].keys()
    batches = []
    for b in range(8):
        chunk = [carries[(b * batch + j) % len(carries)] for j in range(batch)]
        batches.append({k: torch.cat([c[k] for c in chunk]) for k in keys})
    exits = torch.full((batch,), exit_index, dtype=torch.long)
    latencies, samples = [], 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + seconds
    i = 0
    with torch.inference_mode():
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            carry = batches[i % len(batches)]
            if exit_price is not None:
                scores = model.exit_scores(carry["image"])[:, : exit_index + 1].numpy()
                exits = torch.from_numpy(priced_exits(scores, exit_price, costs))
            model.continue_mixed(carry, split, exits)
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append(t1 - t0)
                samples += batch
            i += 1
    measured = sum(latencies)
    return {"samples_per_s": samples / measured if measured else 0.0, "p50_ms": _pct(latencies, 0.5) * 1e3,
            "p99_ms": _pct(latencies, 0.99) * 1e3, "calls": len(latencies)}


def _metric_totals(registry) -> dict:
    def total(name: str) -> float:
        value = 0.0
        for metric in registry.collect():
            for sample in metric.samples:
                if sample.name == name:
                    value += sample.value
        return value

    return {k: total(k) for k in (
        "rapnet_cloud_batch_size_count", "rapnet_cloud_batch_size_sum", "rapnet_cloud_compute_seconds_sum",
        "rapnet_cloud_compute_seconds_count", "rapnet_cloud_queue_seconds_sum", "rapnet_cloud_queue_seconds_count",
        "rapnet_cloud_decode_seconds_sum", "rapnet_cloud_decode_seconds_count", "rapnet_cloud_request_seconds_sum",
    )}


def _client_process_settings(cpus: set[int] | None) -> None:
    """The load stands in for edge devices elsewhere: the default policy, whatever the front's (it would inherit
    SCHED_BATCH from this process)."""
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    if cpus:
        os.sched_setaffinity(0, cpus)


def served(server, payload_file: str, clients: int, warmup_s: float, seconds: float, rpc: str = "unary",
           client_cpus: set[int] | None = None) -> dict:
    before = _metric_totals(server.metrics.registry)
    cmd = [sys.executable, __file__, "--client", "--address", server.address, "--payloads", payload_file,
           "--clients", str(clients), "--warmup", str(warmup_s), "--seconds", str(seconds), "--rpc", rpc]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=warmup_s + seconds + 120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)},
                         preexec_fn=lambda: _client_process_settings(client_cpus))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    after = _metric_totals(server.metrics.registry)
    d = {k: after[k] - before[k] for k in after}
    lat = result["latencies"]
    batches = max(d["rapnet_cloud_batch_size_count"], 1)
    requests = max(d["rapnet_cloud_queue_seconds_count"], 1)
    wall = warmup_s + seconds
    return {
        "samples_per_s": len(lat) / seconds, "p50_ms": _pct(lat, 0.5) * 1e3, "p99_ms": _pct(lat, 0.99) * 1e3,
        "calls": len(lat), "errors": result["errors"],
        # Server side, over warm-up + measurement (what the metrics saw):
        "mean_batch": d["rapnet_cloud_batch_size_sum"] / batches,
        "compute_ms_per_batch": d["rapnet_cloud_compute_seconds_sum"] / max(d["rapnet_cloud_compute_seconds_count"], 1) * 1e3,
        "replica_busy": d["rapnet_cloud_compute_seconds_sum"] / wall,
        "queue_ms_mean": d["rapnet_cloud_queue_seconds_sum"] / requests * 1e3,
        "decode_ms_mean": d["rapnet_cloud_decode_seconds_sum"] / max(d["rapnet_cloud_decode_seconds_count"], 1) * 1e3,
        "front_ms_mean": d["rapnet_cloud_request_seconds_sum"] / requests * 1e3,
    }


def _replica_pids() -> list[int]:
    """Every Serve replica process on this machine."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::ServeReplica"):
                pids.append(int(proc.name))
        except (FileNotFoundError, ProcessLookupError):
            pass  # the process ended meanwhile
    return pids


def _each_thread(pid: int, apply) -> None:
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            apply(int(task.name))
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended meanwhile


def pin_threads(pid: int, cpus: set[int]) -> None:
    """CPU affinity of every thread of process `pid`."""
    _each_thread(pid, lambda tid: os.sched_setaffinity(tid, cpus))


def renice_replicas(nice: int) -> None:
    """Set the nice value of every thread of every Serve replica on this machine (Linux; lowering it needs root)."""
    for pid in _replica_pids():
        _each_thread(pid, lambda tid: os.setpriority(os.PRIO_PROCESS, tid, nice))


def deploy_variant(server, checkpoint, identity: str, config, env: str, max_batch: int, keep_freed: str,
                   app_name: str):
    """The deployment handle for replicas with `env` ("NAME=VALUE[,NAME=VALUE]", or "default"), `max_batch` and
    `keep_freed` ("on"/"off"): the server's own app for its config, else an extra app (gone with the server's Ray
    instance)."""
    keep = keep_freed == "on"
    if env == "default" and max_batch == config.batch.max_batch_size and keep == config.replica.keep_freed_memory:
        return server.front.coalescer.handle
    from ray import serve

    from cloud.app import build_app

    env_vars = {} if env == "default" else dict(item.split("=", 1) for item in env.split(","))
    variant = dataclasses.replace(
        config.with_overrides(replica={"env_vars": env_vars, "keep_freed_memory": keep},
                              batch={"max_batch_size": max_batch}),
        app_name=app_name)
    return serve.run(build_app(str(checkpoint), identity, variant), name=variant.app_name, route_prefix=None)


def main() -> None:
    from rapnet.help_format import DefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--payloads", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help="RAPNet checkpoint (default: the shipped one, "
                        "rapnet.shipped.default_checkpoint())")
    parser.add_argument("--split", type=int, default=4, help="split point the requests carry (0: the PNG image, what "
                        "edge agents send when they offload; 4: high-resolution features, ~12 KB in fp16)")
    parser.add_argument("--exit", type=int, default=None, help="default: the last exit")
    parser.add_argument("--dataset", default=None,
                        help="take the requests' images from this dataset's test split (e.g. cifar10; found like "
                             "rapnet-train finds it) instead of random noise")
    parser.add_argument("--cloud-exit-price", type=float, default=None,
                        help="split 0 only: requests leave the exit (up to --exit) to the cloud's predictor and "
                             "priced rule at this price, as edge agents do by default")
    parser.add_argument("--encoding", default="fp16",
                        help="how the edge encodes the request: a feature encoding (fp32, fp16, int8, int4; the image "
                             "entry, where live, as PNG) or an encoding menu entry (png, raw+zstd, jpeg, fp32+zstd, "
                             "fp16+zstd, int8+zstd; rapnet.codec.menu)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="replica batch wait (default: CloudConfig's)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=1, help="fixed replica count per deployed app")
    # Axes: each takes several values, measured one after another within each repeat (interleaved).
    def axis(flag: str, help: str, **kwargs) -> None:
        parser.add_argument(flag, nargs="+", help=help + "; several values are measured one after another in each "
                            "repeat", **kwargs)

    axis("--rpc", "clients call Infer once per request, or keep one InferStream each", choices=["unary", "stream"],
         default=["unary"])
    axis("--pipeline-per-replica", "handle calls the front keeps outstanding per replica (default: CloudConfig's)",
         type=int, default=None)
    axis("--chunk-hold-ms", "front: how long a partial chunk waits for company while the replica is busy "
         "(default: config's)", type=float, default=None)
    axis("--replica-nice", "renice the replica's threads to each value in turn (Linux, root; default: leave config's "
         "ray.worker_niceness)", type=int, default=None)
    axis("--gc-freeze", "the front process's startup heap frozen (gc.freeze, as CloudServer.start does) or not",
         choices=["on", "off"], default=["on"])
    axis("--max-batch-size", "replica max batch and the front's chunk size (default: CloudConfig's); each value gets "
         "its own deployed app", type=int, default=None)
    axis("--replica-env", "replica environment (replica.env_vars), e.g. RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0; "
         "each value gets its own deployed app", default=["default"], metavar="NAME=VALUE|default")
    axis("--keep-freed-memory", "replicas keep freed heap memory (replica.keep_freed_memory) or not; each value gets "
         "its own deployed app. The bare limit always keeps it (the faster)", choices=["on", "off"], default=["on"])
    axis("--transport", "front.replica_transport: grpc (Serve's direct gRPC to the replica, pickle both ways) or ray "
         "(Ray actor calls with object references)", choices=["grpc", "ray"], default=["grpc"])
    axis("--pin", "on: the replicas' threads on CPU 0, the front (this process) and the client on the others",
         choices=["off", "on"], default=["off"])
    axis("--sched", "batch: the replicas' and the front's threads under Linux SCHED_BATCH, as replica.sched_batch and "
         "front.sched_batch (woken threads do not preempt the running one); normal: SCHED_OTHER. The client always "
         "runs under SCHED_OTHER", choices=["batch", "normal"], default=["batch"])
    parser.add_argument("--out", default=None,
                        help="JSON results file (default: benchmarks/results/cloud-DATASET.json with --dataset, else "
                             "benchmarks/results/cloud.json)")
    args = parser.parse_args()
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / (f"cloud-{args.dataset}.json" if args.dataset else "cloud.json"))
    if args.client:
        args.clients = args.clients[0]
        client_main(args)
        return

    import torch

    from cloud.config import CloudConfig
    if args.batch_wait_ms is None:
        args.batch_wait_ms = CloudConfig().batch.batch_wait_ms
    if args.max_batch_size is None:
        args.max_batch_size = [CloudConfig().batch.max_batch_size]
    from cloud.front import replica_handle
    from cloud.server import CloudServer, local_ray_environment
    from rapnet.checkpoint import load_model
    from rapnet.codec import EncodeOptions, ModelContract, build_request, pixels_to_tensor, tensor_to_pixels
    from rapnet.codec.menu import ENCODING_NAMES, encode_options
    from rapnet.runtime import keep_freed_memory, set_thread_scheduling
    from rapnet.shipped import default_checkpoint

    local_ray_environment()
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    if not checkpoint.is_file():
        sys.exit(f"no checkpoint at {checkpoint}: pass --checkpoint (rapnet-train writes one)")
    torch.set_num_threads(args.torch_threads)
    # The bare limit runs in this process: the faster allocator setting, as in replicas. The front here (which does
    # not call it in production) allocates small blocks (a request is ~12-30 KB), where the setting changes little.
    bare_kept = keep_freed_memory()
    model, metadata = load_model(checkpoint)
    exit_index = model.num_exits - 1 if args.exit is None else args.exit
    contract = ModelContract.from_model(model, metadata["identity"])
    gen = torch.Generator().manual_seed(0)
    carries, payloads = [], []
    if args.cloud_exit_price is not None and args.split != 0:
        sys.exit("--cloud-exit-price needs --split 0: the cloud picks exits for image requests only")
    images, size = None, model.config.image_size
    if args.dataset:
        from rapnet.data import load_dataset, locate_dataset
        from rapnet.preprocess import to_model_input

        images = load_dataset(locate_dataset(None, args.dataset), "test", image_size=size).images[:64]
    options = encode_options(args.encoding) if args.encoding in ENCODING_NAMES else EncodeOptions(encoding=args.encoding)
    with torch.inference_mode():
        for k in range(64):
            x = to_model_input(images[k][None]) if images is not None else torch.randn(1, 3, size, size, generator=gen)
            # Split 0 sends the image (PNG, as the edge does): both sides start from the pixels the cloud decodes.
            pixels = tensor_to_pixels(x) if args.split == 0 else None
            carry = model.edge_part(pixels_to_tensor(pixels) if args.split == 0 else x, args.split)
            carries.append(carry)
            payloads.append(build_request(contract, carry, args.split, exit_index, options,
                                          image=pixels, cloud_exit_price=args.cloud_exit_price).SerializeToString())
    payload_file = tempfile.NamedTemporaryFile(prefix="rapnet-bench-", suffix=".bin", delete=False)
    payload_file.write(b"".join(struct.pack("<I", len(p)) + p for p in payloads))
    payload_file.close()

    replica_variants = list(itertools.product(args.replica_env, args.max_batch_size, args.keep_freed_memory))
    temp = tempfile.mkdtemp(prefix="rapnet-ray-bench-", dir="/tmp")
    config = CloudConfig().with_overrides(
        batch={"max_batch_size": args.max_batch_size[0], "batch_wait_ms": args.batch_wait_ms},
        # Ray's CPU bookkeeping must fit every app the axes deploy (one per replica variant) on its 2 CPUs.
        replica={"torch_threads": args.torch_threads,
                 "num_cpus": 1 / (args.replicas * len(replica_variants))},
        autoscaling={"min_replicas": args.replicas, "max_replicas": args.replicas},
        front={"port": 0, "max_in_flight": 1024},
        metrics={"port": None}, ray={"temp_dir": temp},
    )
    info = machine_info(args.torch_threads)
    t_start = time.perf_counter()
    server = CloudServer(checkpoint, config, token=TOKEN).start()
    axes = {"pipeline_per_replica": args.pipeline_per_replica or [config.front.pipeline_per_replica],
            "chunk_hold_ms": args.chunk_hold_ms or [config.front.chunk_hold_ms],
            "replica_nice": args.replica_nice or [config.ray.worker_niceness], "rpc": args.rpc,
            "gc_freeze": args.gc_freeze, "replica_env": args.replica_env, "max_batch_size": args.max_batch_size,
            "keep_freed_memory": args.keep_freed_memory, "transport": args.transport, "pin": args.pin,
            "sched": args.sched}
    variants = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    handles = {variant: deploy_variant(server, checkpoint, metadata["identity"], config, *variant, f"bench-{i}")
               for i, variant in enumerate(replica_variants)}
    runs: list[dict] = []
    try:
        for rep in range(args.repeats):
            for clients in args.clients:
                # At least up to batch 32, whatever the server's max batch: the limit must not shrink with it.
                bare = bare_limit(model, carries, args.split, exit_index, min(clients, max(32, *args.max_batch_size)),
                                  args.warmup, args.seconds, args.cloud_exit_price)
                for v in variants:  # all take effect at once: switching between runs is safe
                    coalescer = server.front.coalescer
                    coalescer.handle = replica_handle(handles[v["replica_env"], v["max_batch_size"],
                                                              v["keep_freed_memory"]], v["transport"])
                    coalescer.max_chunk = v["max_batch_size"]
                    coalescer.settings = dataclasses.replace(coalescer.settings, chunk_hold_ms=v["chunk_hold_ms"],
                                                             pipeline_per_replica=v["pipeline_per_replica"])
                    if args.replica_nice:
                        renice_replicas(v["replica_nice"])
                    if v["gc_freeze"] == "on":
                        gc.collect()
                        gc.freeze()
                    else:
                        gc.unfreeze()
                    everything = set(range(os.cpu_count() or 1))
                    pinned = v["pin"] == "on" and len(everything) > 1
                    policy = os.SCHED_BATCH if v["sched"] == "batch" else os.SCHED_OTHER
                    for pid in _replica_pids():
                        pin_threads(pid, {0} if pinned else everything)
                        set_thread_scheduling(policy, pid)
                    pin_threads(os.getpid(), everything - {0} if pinned else everything)
                    set_thread_scheduling(policy)
                    srv = served(server, payload_file.name, clients, args.warmup, args.seconds, v["rpc"],
                                 everything - {0} if pinned else None)
                    pin_threads(os.getpid(), everything)
                    set_thread_scheduling(os.SCHED_OTHER)
                    runs.append({"repeat": rep, "clients": clients, **v, "bare": bare, "served": srv})
                    ratio = srv["samples_per_s"] / bare["samples_per_s"]
                    print(f"rep {rep} clients {clients:>2} " + " ".join(f"{k} {x}" for k, x in v.items()) + ": "
                          f"bare {bare['samples_per_s']:8.1f}/s  served {srv['samples_per_s']:8.1f}/s  ratio {ratio:.2f}  "
                          f"batch {srv['mean_batch']:.1f}  busy {srv['replica_busy']:.2f}  errors {srv['errors']}",
                          flush=True)
    finally:
        server.stop()
        os.unlink(payload_file.name)
    summary = []
    for clients, v in itertools.product(args.clients, variants):
        rows = [r for r in runs if r["clients"] == clients and all(r[k] == x for k, x in v.items())]

        def med(side: str, key: str) -> float:
            return statistics.median(r[side][key] for r in rows)

        summary.append({
            "clients": clients, **v,
            "bare_batch": statistics.mode(r["bare"]["batch"] for r in rows),
            "bare_samples_per_s": med("bare", "samples_per_s"), "bare_p50_ms": med("bare", "p50_ms"),
            "bare_p99_ms": med("bare", "p99_ms"),
            "served_samples_per_s": med("served", "samples_per_s"), "served_p50_ms": med("served", "p50_ms"),
            "served_p99_ms": med("served", "p99_ms"),
            "ratio": statistics.median(r["served"]["samples_per_s"] / r["bare"]["samples_per_s"] for r in rows),
            "mean_batch": med("served", "mean_batch"), "replica_busy": med("served", "replica_busy"),
            "compute_ms_per_batch": med("served", "compute_ms_per_batch"), "queue_ms_mean": med("served", "queue_ms_mean"),
            "decode_ms_mean": med("served", "decode_ms_mean"), "front_ms_mean": med("served", "front_ms_mean"),
        })
    result = {
        "benchmark": "cloud_bench", "machine": info, "checkpoint": str(checkpoint), "identity": metadata["identity"][:12],
        "split": args.split, "exit": exit_index, "encoding": args.encoding, "dataset": args.dataset,
        "cloud_exit_price": args.cloud_exit_price, "bare_keeps_freed_memory": bare_kept,
        "settings": {"batch_wait_ms": args.batch_wait_ms, "replicas": args.replicas,
                     "seconds": args.seconds, "warmup_s": args.warmup, "repeats": args.repeats, "tls": False},
        "summary": summary, "runs": runs, "wall_s": round(time.perf_counter() - t_start, 1),
        "loadavg_end": os.getloadavg()[0],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}\n")
    columns = ["clients", "pipeline", "hold ms", "replica nice", "rpc", "gc freeze", "replica env", "max batch",
               "keep freed", "pin",
               "bare torch samples/s (at batch)", "served samples/s", "served / bare", "served p50 ms", "served p99 ms",
               "bare p50 ms (per batch)", "mean batch", "replica busy", "compute ms/batch", "queue ms", "decode ms"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" if c in ("rpc", "gc freeze", "replica env", "keep freed", "pin") else "---:"
                         for c in columns) + "|")
    for s in summary:
        cells = [s["clients"], s["pipeline_per_replica"], f"{s['chunk_hold_ms']:g}", s["replica_nice"], s["rpc"],
                 s["gc_freeze"], s["replica_env"], s["max_batch_size"], s["keep_freed_memory"], s["pin"],
                 f"{s['bare_samples_per_s']:.0f} ({s['bare_batch']})", f"{s['served_samples_per_s']:.0f}",
                 f"{s['ratio']:.2f}", f"{s['served_p50_ms']:.1f}", f"{s['served_p99_ms']:.1f}", f"{s['bare_p50_ms']:.1f}",
                 f"{s['mean_batch']:.1f}", f"{s['replica_busy']:.2f}", f"{s['compute_ms_per_batch']:.1f}",
                 f"{s['queue_ms_mean']:.1f}", f"{s['decode_ms_mean']:.2f}"]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
