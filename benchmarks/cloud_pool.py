"""Pool `cloud_bench.py` results over several runs: served / bare per repeat, for one setting, by traffic.

Runs of the same command minutes apart differ by up to 0.2 in their median ratio on a shared 2-vCPU host, so a
claim about a setting should pool every run made with it. Only results whose limit is the best
of several batch sizes (they record `bare_limit`) are read. Runs are pooled apart by the settings that change the
ratio: whether replicas and the bare limit keep freed memory (`rapnet.runtime.keep_freed_memory`, or glibc's
default malloc), how the front reaches replicas (`front.replica_transport`: grpc or ray), and the scheduling
policy of the replicas and the front (`sched_batch`: batch or normal).

    python benchmarks/cloud_pool.py benchmarks/results/cloud*.json --clients 32
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path


def traffic(result: dict, transport: str, sched: str) -> str:
    kept = result.get("bare_keeps_freed_memory")
    shipped = kept and transport == "grpc" and sched == "batch"
    era = "" if shipped else f" ({'kept memory' if kept else 'default malloc'}, {transport}, {sched} scheduling)"
    if result.get("cloud_exit_price") is not None:
        return f"split {result['split']}, cloud picks the exit{era}"
    return f"split {result['split']}, exit {result['exit']}{era}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="cloud_bench.py result files")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients to pool (default: 32)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the setting to pool (default: 16, the shipped one)")
    args = parser.parse_args()
    shipped = {"max_batch_size": args.max_batch_size, "pin": "off", "replica_env": "default", "gc_freeze": "on"}
    pooled: dict[str, list[tuple[str, list[float]]]] = {}
    for path in sorted(args.files):
        result = json.loads(Path(path).read_text())
        kept = "on" if result.get("bare_keeps_freed_memory") else "off"
        for transport, sched in itertools.product(("grpc", "ray"), ("batch", "normal")):
            runs = [r for r in result.get("runs", []) if "by_batch" in r["bare"] and r["clients"] == args.clients
                    and all(r.get(k, v) == v for k, v in shipped.items()) and r.get("keep_freed_memory", "off") == kept
                    and r.get("transport", "ray") == transport and r.get("sched", "normal") == sched]
            if runs:
                ratios = [r["served"]["samples_per_s"] / r["bare"]["samples_per_s"] for r in runs]
                pooled.setdefault(traffic(result, transport, sched), []).append((Path(path).name, ratios))
    print("| traffic | runs | repeats | median served / bare | range | run medians |")
    print("|---|---:|---:|---:|---|---|")
    for name, runs in pooled.items():
        every = [x for _, ratios in runs for x in ratios]
        medians = sorted(statistics.median(ratios) for _, ratios in runs)
        print(f"| {name} | {len(runs)} | {len(every)} | {statistics.median(every):.2f} | {min(every):.2f}-"
              f"{max(every):.2f} | {', '.join(f'{m:.2f}' for m in medians)} |")
    for name, runs in pooled.items():
        print(f"\n{name}: " + "; ".join(f"{f} {', '.join(f'{x:.2f}' for x in ratios)}" for f, ratios in runs))


if __name__ == "__main__":
    main()
