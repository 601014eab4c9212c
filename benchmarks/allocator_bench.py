"""Bare torch with glibc's default malloc against `rapnet.runtime.keep_freed_memory`, in alternating processes.

What each part runs, one torch thread: the cloud stages as a replica runs them (split 4 and split 0 to the last
exit, in a worker thread as Serve runs replica code) and the edge's batch-1 calls (the predictor, exit 0 and the
last exit, main thread). The allocator setting cannot be undone inside a process, so every repeat starts one child
process per setting, in alternating order (ABBA), and the figures are the medians of the paired ratios.

    python benchmarks/allocator_bench.py                # ~3 minutes
Writes benchmarks/results/allocator.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

SETTINGS = ("default", "keep")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _batch1(call, seconds: float) -> dict:
    """Calls per second of a batch-1 call, after a short warm-up."""
    stop = time.perf_counter() + 0.2
    while time.perf_counter() < stop:
        call()
    calls, faults, start = 0, _faults(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        calls += 1
    elapsed = time.perf_counter() - start
    return {"samples_per_s": calls / elapsed, "faults_per_sample": (_faults() - faults) / calls}


def child(args) -> None:
    import torch

    from cloud_bench import bare_torch
    from rapnet.checkpoint import load_model
    from rapnet.codec import pixels_to_tensor, tensor_to_pixels
    from rapnet.runtime import keep_freed_memory

    if args.child == "keep" and not keep_freed_memory():
        sys.exit("keep_freed_memory() changed nothing here (not glibc?)")
    torch.set_num_threads(1)
    model, _ = load_model(args.checkpoint)
    last = model.num_exits - 1
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, 32, 32, generator=gen) for _ in range(64)]
    results: dict[str, dict] = {}

    def cloud() -> None:  # in a worker thread, as Serve runs a replica's compute
        for split, batch in args.cloud:
            with torch.inference_mode():  # split 0 starts from decoded PNG pixels, as the cloud does
                carries = [model.edge_part(pixels_to_tensor(tensor_to_pixels(x)) if split == 0 else x, split)
                           for x in images]
            bare_torch(model, carries, split, last, batch, 0.3, 0.3)
            faults = _faults()
            r = bare_torch(model, carries, split, last, batch, 0.0, args.seconds)
            samples = r["calls"] * batch
            results[f"cloud split {split} batch {batch}"] = {
                "samples_per_s": r["samples_per_s"], "faults_per_sample": (_faults() - faults) / samples}

    worker = threading.Thread(target=cloud)
    worker.start()
    worker.join()
    x = images[0]
    with torch.inference_mode():
        results["edge predictor batch 1"] = _batch1(lambda: model.exit_scores(x), args.seconds)
        for k in (0, last):
            results[f"edge exit {k} batch 1"] = _batch1(lambda k=k: model.run_to_exit(x, k), args.seconds)
    print(json.dumps(results))


def main() -> None:
    from rapnet.help_format import DefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "rapnet-cifar10.pt"), help="model checkpoint")
    parser.add_argument("--repeats", type=int, default=6, help="pairs of child processes")
    parser.add_argument("--seconds", type=float, default=1.5, help="measured per workload and process")
    parser.add_argument("--cloud", type=lambda s: tuple(map(int, s.split("x"))), nargs="+",
                        default=[(4, 16), (4, 32), (0, 16)], metavar="SPLITxBATCH")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "allocator.json"), help="JSON output")
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from rapnet.machine import machine_info

    runs = []
    for rep in range(args.repeats):
        order = SETTINGS if rep % 2 == 0 else SETTINGS[::-1]  # ABBA: drift hits both settings alike
        pair = {}
        for setting in order:
            cmd = [sys.executable, __file__, "--child", setting, "--checkpoint", args.checkpoint,
                   "--seconds", str(args.seconds), "--cloud", *(f"{s}x{b}" for s, b in args.cloud)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            pair[setting] = json.loads(out.strip().splitlines()[-1])
        runs.append(pair)
        print(f"repeat {rep}: " + "  ".join(
            f"{w}: {pair['keep'][w]['samples_per_s'] / pair['default'][w]['samples_per_s']:.2f}x" for w in pair["keep"]),
            flush=True)
    summary = {}
    for workload in runs[0]["keep"]:
        ratios = [r["keep"][workload]["samples_per_s"] / r["default"][workload]["samples_per_s"] for r in runs]
        summary[workload] = {
            setting: {"samples_per_s": statistics.median(r[setting][workload]["samples_per_s"] for r in runs),
                      "faults_per_sample": statistics.median(r[setting][workload]["faults_per_sample"] for r in runs)}
            for setting in SETTINGS}
        summary[workload].update(speedup=statistics.median(ratios), keep_won=sum(x > 1 for x in ratios), pairs=len(runs))
    result = {"benchmark": "allocator", "machine": machine_info(1), "seconds": args.seconds, "summary": summary,
              "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}\n")
    print("| workload | default samples/s | faults/sample | keep freed samples/s | faults/sample | speedup (median of pairs) | pairs won |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for workload, s in summary.items():
        d, k = s["default"], s["keep"]
        print(f"| {workload} | {d['samples_per_s']:.0f} | {d['faults_per_sample']:.0f} | {k['samples_per_s']:.0f} | "
              f"{k['faults_per_sample']:.1f} | {s['speedup']:.2f}x | {s['keep_won']}/{s['pairs']} |")


if __name__ == "__main__":
    main()
