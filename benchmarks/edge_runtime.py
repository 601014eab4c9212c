"""The edge's runtimes: batch-1 latency on ONNX Runtime against eager PyTorch, the edge install's size and the
agent's start-up time against the full (PyTorch) install.

1. Latency, one process, one thread each (torch.set_num_threads(1), ONNX Runtime intra_op_num_threads=1), batch 1,
   real CIFAR-10 test images: the full device path (exit predictor + every stage + the last head) and each exit
   alone (its stages and head), for ONNX Runtime (rapnet.execution.OnnxRuntime on rapnet-export's graphs) and
   eager PyTorch (the MultiExitNetwork's own methods under torch.inference_mode, as the edge ran it before it had a
   choice). Every round times every call once in a freshly shuffled order (A/B interleaved); medians over rounds
   of the calling thread's CPU time (both runtimes compute on the calling thread with one thread), which a busy
   machine's preemption does not inflate: a call that spans several scheduler slices waits for the other
   processes in wall time, so wall-clock medians there penalise the longer call by far more than its compute.
   The wall-clock medians are recorded too.
   Per exit: latency(exit k) / latency(last exit) against FLOPs(exit k) / FLOPs(last exit) (rapnet.costs); exits at
   >= 25% of the cost whose quotient lies outside [1/1.3, 1.3] are flagged.
2. Install size: `du` of a fresh edge virtualenv (scripts/install_edge.sh) and of a fresh full one (the README's
   setup: pip install -e ".[dev]"), with their package counts. Made in a temporary folder unless --edge-venv and
   --full-venv name existing ones.
3. Start-up: `edge-agent` answering --frames images from a folder, interleaved: the edge install on ONNX Runtime
   (graphs present) against the full install on PyTorch; medians of the process's CPU time (user + system, from
   getrusage) and of its wall time. The cloud is out of reach and the
   device fast (--device-gflops 100), so every frame is answered here and no network time enters.

    python benchmarks/edge_runtime.py                                    # ~5 min with fresh virtualenvs
    python benchmarks/edge_runtime.py --edge-venv /tmp/edge --full-venv /tmp/full --rounds 200

Writes benchmarks/results/edge_runtime.json (or --output) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rapnet.checkpoint import load_model  # noqa: E402
from rapnet.data import load_dataset, locate_dataset, stratified_sample  # noqa: E402
from rapnet.execution import OnnxRuntime  # noqa: E402
from rapnet.export import export_device_graphs, find_export  # noqa: E402
from rapnet.help_format import DefaultsHelpFormatter  # noqa: E402
from rapnet.machine import machine_info  # noqa: E402
from rapnet.preprocess import to_model_array, to_model_input  # noqa: E402
from rapnet.shipped import default_checkpoint  # noqa: E402

FLAG_MIN_COST_FRACTION = 0.25
FLAG_QUOTIENT = 1.3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=str(default_checkpoint("rapnet")), help="RAPNet checkpoint")
    p.add_argument("--dataset", default="cifar10", help="test images (fitted to the model's input size) of this dataset")
    p.add_argument("--rounds", type=int, default=300, help="timed rounds (each times every call once)")
    p.add_argument("--warmup", type=int, default=30, help="untimed rounds first")
    p.add_argument("--edge-venv", type=Path, default=None,
                   help="an edge virtualenv made by scripts/install_edge.sh (default: make one in a temporary folder)")
    p.add_argument("--full-venv", type=Path, default=None,
                   help="a full virtualenv (pip install -e '.[dev]') (default: make one in a temporary folder)")
    p.add_argument("--startup-runs", type=int, default=5, help="agent start-ups per install (interleaved)")
    p.add_argument("--frames", type=int, default=16, help="frames each agent start-up answers (its calibration frames)")
    p.add_argument("--skip-install", action="store_true", help="latency only")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "edge_runtime.json")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- 1. latency ---------------------------------------------------------------------------------------------
def time_calls(calls: dict, rounds: int, warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms per call, (thread CPU time, wall time); every round runs every call once, in a shuffled order."""
    names = list(calls)
    cpu, wall = {name: [] for name in names}, {name: [] for name in names}
    rng = random.Random(0)
    for r in range(warmup + rounds):
        rng.shuffle(names)
        for name in names:
            c0, t0 = time.thread_time(), time.perf_counter()
            calls[name](r)
            t1, c1 = time.perf_counter(), time.thread_time()
            if r >= warmup:
                cpu[name].append((c1 - c0) * 1e3)
                wall[name].append((t1 - t0) * 1e3)
    return ({name: statistics.median(ts) for name, ts in cpu.items()},
            {name: statistics.median(ts) for name, ts in wall.items()})


def measure_latency(model, run: OnnxRuntime, images: np.ndarray, rounds: int, warmup: int) -> dict:
    last = model.num_exits - 1
    xs = [to_model_array(image) for image in images]
    ts = [to_model_input(image) for image in images]
    calls = {}

    def eager(fn):
        def call(r):
            with torch.inference_mode():
                fn(ts[r % len(ts)])
        return call

    def onnx(fn):
        return lambda r: fn(xs[r % len(xs)])

    calls["onnx full"] = onnx(lambda x: (run.exit_scores(x), run.run_to_exit(x, last)))
    calls["torch full"] = eager(lambda x: (model.exit_scores(x), model.run_to_exit(x, last)))
    calls["onnx predictor"] = onnx(run.exit_scores)
    calls["torch predictor"] = eager(model.exit_scores)
    for k in range(model.num_exits):
        calls[f"onnx exit {k}"] = onnx(lambda x, k=k: run.run_to_exit(x, k))
        calls[f"torch exit {k}"] = eager(lambda x, k=k: model.run_to_exit(x, k))
    ms, wall = time_calls(calls, rounds, warmup)
    costs = run.costs
    share = [costs.exit_cost(k) / costs.exit_cost(last) for k in range(model.num_exits)]
    per_runtime = {}
    for name in ("onnx", "torch"):
        exits = []
        for k in range(model.num_exits):
            ratio = ms[f"{name} exit {k}"] / ms[f"{name} exit {last}"]
            quotient = ratio / share[k]
            flagged = share[k] >= FLAG_MIN_COST_FRACTION and not 1 / FLAG_QUOTIENT <= quotient <= FLAG_QUOTIENT
            exits.append({"exit": k, "median_ms": round(ms[f"{name} exit {k}"], 4), "flops_share": round(share[k], 4),
                          "latency_share": round(ratio, 4), "quotient": round(quotient, 3), "flagged": flagged})
        per_runtime[name] = {"full_path_ms": round(ms[f"{name} full"], 4),
                             "predictor_ms": round(ms[f"{name} predictor"], 4), "exits": exits,
                             "flagged_exits": [e["exit"] for e in exits if e["flagged"]],
                             "wall_ms": {k.split(" ", 1)[1]: round(v, 4) for k, v in wall.items()
                                         if k.startswith(name + " ")}}
    return {"clock": "thread CPU time (median ms); wall-clock medians under wall_ms",
            "speedup_full_path": round(ms["torch full"] / ms["onnx full"], 3),
            "speedup_full_path_wall": round(wall["torch full"] / wall["onnx full"], 3),
            "speedup_per_exit": [round(ms[f"torch exit {k}"] / ms[f"onnx exit {k}"], 3) for k in range(model.num_exits)],
            **per_runtime}


# --- 2. install size ----------------------------------------------------------------------------------------
def du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def packages(venv: Path) -> list[str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                         text=True, check=True).stdout
    return sorted(line.split("==")[0].lower() for line in out.splitlines() if "==" in line)


def make_venvs(tmp: Path, edge: Path | None, full: Path | None) -> tuple[Path, Path, dict]:
    seconds = {}
    if edge is None:
        edge = tmp / "edge"
        t0 = time.perf_counter()
        subprocess.run([str(ROOT / "scripts" / "install_edge.sh"), str(edge)], check=True, cwd=ROOT)
        seconds["edge"] = round(time.perf_counter() - t0, 1)
    if full is None:
        full = tmp / "full"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(full)], check=True)
        subprocess.run([str(full / "bin" / "python"), "-m", "pip", "install", "--quiet", "-e", ".[dev]"], check=True,
                       cwd=ROOT)
        seconds["full"] = round(time.perf_counter() - t0, 1)
    return edge, full, seconds


def install_sizes(edge: Path, full: Path) -> dict:
    result = {}
    for name, venv in (("edge", edge), ("full", full)):
        pkgs = packages(venv)
        result[name] = {"venv": str(venv), "bytes": du_bytes(venv), "packages": len(pkgs),
                        "has": {m: m in pkgs for m in ("torch", "ray", "matplotlib", "onnxruntime")}}
    result["size_ratio_full_over_edge"] = round(result["full"]["bytes"] / result["edge"]["bytes"], 2)
    return result


# --- 3. start-up --------------------------------------------------------------------------------------------
def startup(edge: Path, full: Path, checkpoint: str, graphs: Path, images: np.ndarray, runs: int, tmp: Path) -> dict:
    folder = tmp / "frames"
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    common = ["--images", str(folder), "--cloud", "127.0.0.1:9", "--no-cloud-check", "--device-gflops", "100",
              "--quiet", "--calibration-frames", str(len(images))]
    commands = {"onnx edge install": [str(edge / "bin" / "edge-agent"), "--runtime", "onnx", "--checkpoint",
                                      str(graphs), *common],
                "torch full install": [str(full / "bin" / "edge-agent"), "--runtime", "torch", "--checkpoint",
                                       checkpoint, *common]}
    env = dict(os.environ, RAPNET_CACHE=str(tmp / "cache"), RAPNET_TOKEN="startup-benchmark-token-xxxx")
    cpu, wall = {name: [] for name in commands}, {name: [] for name in commands}
    for r in range(runs + 1):  # the first round warms the page cache, untimed
        for name, cmd in commands.items():
            before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
            elapsed, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode != 0:
                raise SystemExit(f"{name}: edge-agent failed:\n{done.stderr[-2000:]}")
            if r:
                cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                wall[name].append(elapsed)
    med = {name: round(statistics.median(ts), 3) for name, ts in cpu.items()}
    med_wall = {name: round(statistics.median(ts), 3) for name, ts in wall.items()}
    return {"frames": len(images), "median_cpu_s": med, "median_wall_s": med_wall, "runs": runs,
            "ratio_torch_over_onnx": round(med["torch full install"] / med["onnx edge install"], 2),
            "ratio_torch_over_onnx_wall": round(med_wall["torch full install"] / med_wall["onnx edge install"], 2),
            "commands": {name: " ".join(cmd) for name, cmd in commands.items()}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    model, metadata = load_model(args.checkpoint)
    with tempfile.TemporaryDirectory(prefix="edge-runtime-") as tmp:
        tmp = Path(tmp)
        manifest = find_export(args.checkpoint) or export_device_graphs(args.checkpoint, tmp / "graphs")
        run = OnnxRuntime(manifest, threads=1)
        test = load_dataset(locate_dataset(None, args.dataset), "test", image_size=model.config.image_size)
        images = np.ascontiguousarray(test.images[stratified_sample(test.labels, max(args.frames, 10), seed=0)])
        log(f"latency: {args.rounds} rounds of {2 * (model.num_exits + 2)} calls, batch 1, 1 thread")
        latency = measure_latency(model, run, images, args.rounds, args.warmup)
        result = {"checkpoint": str(args.checkpoint), "identity": metadata["identity"],
                  "graphs": str(manifest.folder), "threads": 1, "batch": 1, "rounds": args.rounds,
                  "latency": latency}
        if not args.skip_install:
            log("install: virtualenvs")
            edge, full, seconds = make_venvs(tmp, args.edge_venv, args.full_venv)
            result["install"] = {**install_sizes(edge, full), "install_seconds": seconds}
            log("start-up: edge-agent runs, interleaved")
            result["startup"] = startup(edge, full, str(args.checkpoint), manifest.folder, images[:args.frames],
                                        args.startup_runs, tmp)
        result["versions"] = {"onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__}
        result["machine"] = machine_info(torch_threads=1, dirty_paths=("rapnet", "edge", "benchmarks/edge_runtime.py"))
        result["note"] = ("measured while a model-training run kept both cores of this machine busy: absolute times "
                          "are inflated and noisy, the ratios (same run, interleaved) are what counts")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


def table(result: dict) -> str:
    lat = result["latency"]
    lines = ["| path (thread CPU ms, medians) | ONNX Runtime | eager PyTorch | speed-up | FLOPs share | "
             "ONNX latency share (quotient) |",
             "|---|---:|---:|---:|---:|---:|",
             f"| full device path (predictor + all stages + last head) | {lat['onnx']['full_path_ms']:.3f} | "
             f"{lat['torch']['full_path_ms']:.3f} | {lat['speedup_full_path']:.2f}x | | |"]
    for o, t, s in zip(lat["onnx"]["exits"], lat["torch"]["exits"], lat["speedup_per_exit"]):
        lines.append(f"| exit {o['exit']} | {o['median_ms']:.3f} | {t['median_ms']:.3f} | {s:.2f}x | "
                     f"{o['flops_share']:.3f} | {o['latency_share']:.3f} ({o['quotient']:.2f}) |")
    if "install" in result:
        inst = result["install"]
        lines += ["", "| install | size | packages | torch / Ray / matplotlib |", "|---|---:|---:|---|"]
        for name in ("edge", "full"):
            has = inst[name]["has"]
            lines.append(f"| {name} | {inst[name]['bytes'] / 2**20:.0f} MiB | {inst[name]['packages']} | "
                         f"{'/'.join('yes' if has[m] else 'no' for m in ('torch', 'ray', 'matplotlib'))} |")
        st = result["startup"]
        lines += ["", f"start-up ({st['frames']} frames answered, median of {st['runs']}), CPU: "
                      + ", ".join(f"{k} {v:.2f} s" for k, v in st["median_cpu_s"].items())
                      + f" ({st['ratio_torch_over_onnx']:.2f}x); wall: "
                      + ", ".join(f"{k} {v:.2f} s" for k, v in st["median_wall_s"].items())
                      + f" ({st['ratio_torch_over_onnx_wall']:.2f}x)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
