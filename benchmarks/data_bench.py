"""Peak memory and wall time of loading a dataset split through rapnet.data, cold (decoding into the cache) and
warm (memory-mapping the cache).

Every measurement runs in a fresh Python process, so its peak resident set (ru_maxrss) is that load's alone; the
same process's resident set after importing rapnet.data (numpy, cv2) is reported as the baseline. "warm + pass"
also reads every pixel once (a sum over the split), which pulls the mapped file into the page cache and counts
its pages as resident, although the kernel can drop them again at any time.

    python benchmarks/data_bench.py                        # Imagenette val at 128 and 224 px, ~1 min
    python benchmarks/data_bench.py --data ../shared/datasets/cifar10/cifar10-jpeg.tar.gz --split test --sizes 32

Writes benchmarks/results/data.json (or --output) and prints a markdown table. Uses a fresh temporary cache
folder (or --cache-dir, emptied first), so "cold" really decodes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rapnet.help_format import DefaultsHelpFormatter  # noqa: E402
from rapnet.machine import machine_info  # noqa: E402

# Run in a child process: load once, print what it cost.
_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from rapnet.data import load_dataset
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
ds = load_dataset({data!r}, {split!r}, image_size={size!r}, cache_dir={cache!r})
seconds = time.perf_counter() - started
out = {{"images": len(ds), "shape": list(ds.images.shape), "seconds": seconds,
        "baseline_rss_mib": base / 1024, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "array_mib": ds.images.nbytes / 2**20, "memory_mapped": type(ds.images).__name__ == "memmap"}}
if {touch!r}:
    started = time.perf_counter()
    out["pixel_sum"] = int(ds.images.sum(dtype="uint64"))
    out["pass_seconds"] = time.perf_counter() - started
    out["peak_rss_after_pass_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def measure(data: str, split: str, size: int, cache: str, touch: bool = False) -> dict:
    code = _CHILD.format(root=str(ROOT), data=data, split=split, size=size, cache=cache, touch=touch)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "imagenette" / "imagenette-224.tar.gz"),
                   help="dataset archive or folder")
    p.add_argument("--split", default="val", help="split to load")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="image sizes (N x N px) to load at")
    p.add_argument("--cache-dir", default=None,
                   help="cache folder to use, emptied first (default: a fresh temporary folder, removed afterwards)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "data.json"), help="where to write the JSON")
    args = p.parse_args(argv)

    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="rapnet-data-bench-"))
    rows = []
    try:
        for size in args.sizes:
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
            cold = measure(args.data, args.split, size, str(cache))
            warm = measure(args.data, args.split, size, str(cache))
            touched = measure(args.data, args.split, size, str(cache), touch=True)
            rows.append({"image_size": size, "cold": cold, "warm": warm, "warm_and_pass": touched,
                         "cache_file_mib": sum(f.stat().st_size for f in cache.glob("*.images.npy")) / 2**20})
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache, ignore_errors=True)
    report = {"data": args.data, "split": args.split, "machine": machine_info(), "results": rows,
              "method": "one fresh process per load; peak_rss_mib is ru_maxrss, baseline_rss_mib the same after importing "
                        "rapnet.data"}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print("| size | images | array MiB | cold s | cold peak RSS MiB | warm s | warm peak RSS MiB | warm + pass peak RSS MiB | baseline RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, w, t = r["cold"], r["warm"], r["warm_and_pass"]
        print(f"| {r['image_size']} | {c['images']} | {c['array_mib']:.0f} | {c['seconds']:.2f} | {c['peak_rss_mib']:.0f} | "
              f"{w['seconds'] * 1e3:.1f} ms | {w['peak_rss_mib']:.0f} | {t['peak_rss_after_pass_mib']:.0f} | {c['baseline_rss_mib']:.0f} |")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
