"""What one call from the front to a replica costs the caller: a Ray Serve deployment handle over each
`front.replica_transport` against a plain Ray actor method with the same chunk of samples, and the front's
`serve.status()` health poll.

Caller CPU comes from getrusage over the whole front process (its event loop, Serve's router thread and Ray's
core-worker threads), so it includes everything a call makes the front do; the replica's side is not counted.
Run it on an otherwise idle machine.

    python benchmarks/handle_cost.py          # ~1 minute
Writes benchmarks/results/handle_cost.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _calls(call, chunk: list, n: int, outstanding: int) -> tuple[float, float]:
    """(caller CPU ms, wall ms) per call, for n calls kept `outstanding` deep."""
    async def caller() -> None:
        for _ in range(n // outstanding):
            await call(chunk)

    cpu, wall = _cpu_s(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(outstanding)))
    return (_cpu_s() - cpu) * 1e3 / n, (time.perf_counter() - wall) * 1e3 / n


def main() -> None:
    from rapnet.help_format import DefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "rapnet-cifar10.pt"), help="model checkpoint")
    parser.add_argument("--calls", type=int, default=300, help="calls per measurement")
    parser.add_argument("--split", type=int, default=4, help="split point of the requests")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "handle_cost.json"), help="JSON output")
    args = parser.parse_args()

    import ray
    import torch

    from cloud.batching import Sample
    from cloud.config import CloudConfig
    from cloud.front import replica_handle
    from cloud.server import CloudServer, local_ray_environment
    from rapnet.machine import machine_info
    from rapnet.checkpoint import load_model

    model = load_model(args.checkpoint)[0].eval()
    with torch.inference_mode():
        carry = {k: v.numpy() for k, v in model.edge_part(torch.randn(1, 3, 32, 32), args.split).items()}
    last = model.num_exits - 1

    def chunk_of(n: int) -> list[Sample]:
        return [Sample(args.split, last, dict(carry)) for _ in range(n)]

    local_ray_environment()
    config = CloudConfig().with_overrides(front={"port": 0}, metrics={"port": None},
                                          ray={"temp_dir": tempfile.mkdtemp(prefix="rapnet-ray-bench-", dir="/tmp")})
    server = CloudServer(args.checkpoint, config, token="handle-cost-benchmark-token-0123456789").start()

    @ray.remote(num_cpus=0)
    class Echo:  # a plain actor: Ray's own per-call cost, no Serve and no model
        async def call(self, chunk):
            return [len(sample.carry) for sample in chunk]

    echo = Echo.remote()
    handles = {transport: replica_handle(server.handle, transport) for transport in ("ray", "grpc")}
    paths = {f"serve handle, {t}": h.remote for t, h in handles.items()} | {"plain Ray actor": echo.call.remote}
    rows = []

    async def measure() -> None:
        for call in paths.values():  # warm every path
            await call(chunk_of(16))
        for size in (1, 16):
            for outstanding in (1, 2):
                for path, call in paths.items():
                    cpu_ms, wall_ms = await _calls(call, chunk_of(size), args.calls, outstanding)
                    rows.append({"path": path, "chunk": size, "outstanding": outstanding,
                                 "caller_cpu_ms": cpu_ms, "wall_ms": wall_ms})
                    print(f"{path:18s} chunk {size:2d} outstanding {outstanding}: caller CPU {cpu_ms:5.2f} ms, "
                          f"wall {wall_ms:6.2f} ms per call", flush=True)

    try:
        asyncio.run_coroutine_threadsafe(measure(), server.loop).result()
        cpu, wall = _cpu_s(), time.perf_counter()
        for _ in range(20):
            server.running_replicas()
        status = {"caller_cpu_ms": (_cpu_s() - cpu) * 1e3 / 20, "wall_ms": (time.perf_counter() - wall) * 1e3 / 20}
        print(f"serve.status() poll: caller CPU {status['caller_cpu_ms']:.1f} ms, wall {status['wall_ms']:.1f} ms")
    finally:
        server.stop()
    result = {"benchmark": "handle_cost", "machine": machine_info(1), "split": args.split, "calls": args.calls,
              "rows": rows, "serve_status": status}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
