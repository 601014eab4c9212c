"""Bare torch throughput of the cloud stages at several batch sizes, interleaved (one thread, as a replica).

Why the cloud benchmark's limit is the best of several batch sizes: per sample, the largest batch is not always
the fastest. With glibc's default malloc, batch 16 beat batch 32 by 1.4-1.8x here; the process
keeps freed memory (`rapnet.runtime.keep_freed_memory`), as replicas do, unless --default-malloc.

    python benchmarks/bare_batch_sizes.py --split 4 0      # ~1 minute
Writes benchmarks/results/bare_batch_sizes.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from cloud_bench import bare_torch  # noqa: E402
from rapnet.machine import machine_info  # noqa: E402
from rapnet.checkpoint import load_model  # noqa: E402
from rapnet.codec import pixels_to_tensor, tensor_to_pixels  # noqa: E402
from rapnet.runtime import keep_freed_memory  # noqa: E402


def main() -> None:
    from rapnet.help_format import DefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "rapnet-cifar10.pt"), help="model checkpoint")
    parser.add_argument("--split", type=int, nargs="+", default=[4, 0], help="split points to measure")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32], help="batch sizes to measure")
    parser.add_argument("--repeats", type=int, default=12, help="interleaved repeats per batch size")
    parser.add_argument("--seconds", type=float, default=0.6, help="measured per batch size and repeat")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc at its defaults")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bare_batch_sizes.json"), help="JSON output")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kept = not args.default_malloc and keep_freed_memory()
    model, _ = load_model(args.checkpoint)
    exit_index = model.num_exits - 1
    result = {"benchmark": "bare_batch_sizes", "machine": machine_info(1), "exit": exit_index,
              "keeps_freed_memory": kept, "splits": {}}
    for split in args.split:
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():  # split 0 starts from decoded PNG pixels, as the cloud does
            carries = [model.edge_part(pixels_to_tensor(tensor_to_pixels(x)) if split == 0 else x, split)
                       for x in (torch.randn(1, 3, 32, 32, generator=gen) for _ in range(64))]
        runs = {b: [] for b in args.batches}
        for _ in range(args.repeats):
            for b in args.batches:  # interleaved: machine drift hits every size alike
                runs[b].append(bare_torch(model, carries, split, exit_index, b, 0.1, args.seconds)["samples_per_s"])
        largest = max(args.batches)
        summary = {b: {"median": statistics.median(v), "min": min(v), "max": max(v),
                       "median_vs_largest": statistics.median(x / y for x, y in zip(v, runs[largest]))}
                   for b, v in runs.items()}
        result["splits"][split] = {"summary": summary, "runs": runs}
        for b, s in summary.items():
            print(f"split {split} batch {b:>3}: median {s['median']:6.0f} samples/s ({s['min']:.0f}-{s['max']:.0f}), "
                  f"{s['median_vs_largest']:.2f}x batch {largest} (paired)")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
