"""rapnet-sim: trace-driven simulation of edge-cloud policies (RAPNet split vs baselines) over the real test set.

  rapnet-sim traces            build (or refresh) the cached traces and print where they are
  rapnet-sim run  --bandwidth-mbps 10 --rtt-ms 20 --device-gflops 2
                               every policy under one condition, as a table
  rapnet-sim sweep             bandwidth x device compute x RTT grid: CSV, markdown, JSON and heatmaps in runs/sim/
  rapnet-sim live              real edge agent + cloud on loopback at 6 points, shaped network, vs simulation

--dataset picks the models and their data: imagenette (default; the camera-resolution set, 128 px) or cifar10.
The traces (every model's answers on a class-stratified sample of the test set; --full for all of it) are
cached in the user cache folder, keyed by what they are made of: the checkpoints' identities, the dataset's
content and the build settings. They are rebuilt automatically when any of these changes, so after a new
model lands `rapnet-sim sweep` is the one command to rerun. Outputs go only where --out says (default:
runs/sim/ under the current folder).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rapnet.codec.menu import DEFAULT_ENCODINGS, ENCODING_NAMES

from rapnet.help_format import DefaultsHelpFormatter

DEFAULT_OUT = Path("runs") / "sim"  # relative to the current folder, never inside the installed package
DEFAULT_LIVE_OUT = DEFAULT_OUT / "live.json"
# The datasets rapnet-sim knows (each with shipped rapnet-/sdn-/static-<dataset>.pt) and the default: the
# camera-resolution set (rapnet.shipped.CAMERA_DATASET).
DATASETS = ("imagenette", "cifar10")
DEFAULT_DATASET = "imagenette"
# The trace sample sizes per dataset (orchestration.traces.DEFAULT_TEST_IMAGES and friends), written out because
# importing orchestration.traces loads torch (slow --help); a test checks they agree.
DEFAULT_TEST_IMAGES = {"cifar10": 5000, "imagenette": 1000}
DEFAULT_HELDOUT_IMAGES = {"cifar10": 0, "imagenette": 0}
DEFAULT_BANDWIDTHS = (0.5, 1, 2, 5, 10, 20, 50, 100)
DEFAULT_GFLOPS = (0.5, 1, 2, 5, 10, 20)
DEFAULT_RTTS = (5, 20, 80)


def _accuracy_target(value: str) -> float | str:
    if value == "static":
        return value
    try:
        target = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor 'static'") from None
    if not 0.0 < target <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..1 (an accuracy, e.g. 0.84)")
    return target


def sim_config(args):
    """The simulator's SimConfig from rapnet-sim's parsed arguments."""
    from .simulator import SimConfig

    return SimConfig(devices=args.devices, workers=args.workers, fps=args.fps, accuracy_target=args.accuracy_target,
                     rapnet_rule=args.rapnet_rule, encodings=tuple(args.encodings), seed=args.seed,
                     cloud_exit=args.cloud_exit, calibration_priors=args.calibration_priors,
                     device_runtime=args.device_runtime)


def _world(args):
    import torch

    torch.set_num_threads(1)
    from rapnet.runtime import keep_freed_memory

    keep_freed_memory()  # trace building: activations reuse freed memory instead of faulting in fresh pages
    from .simulator import load_world

    return load_world(sim_config(args), args.models, args.data, args.cache, rebuild=getattr(args, "rebuild", False),
                      log=lambda m: print(m, file=sys.stderr), settings=trace_settings(args),
                      progress=not args.no_progress, dataset=args.dataset)


def trace_settings(args):
    """The traces' sample sizes from rapnet-sim's parsed arguments (--full: every image; a size not given: the
    dataset's default)."""
    from .traces import TraceSettings

    if args.full:
        return TraceSettings.full()
    default = TraceSettings.default(args.dataset)
    return TraceSettings(test_images=default.test_images if args.test_images is None else args.test_images,
                         heldout_images=default.heldout_images if args.heldout_images is None else args.heldout_images)


def _conditions(args, bandwidth, gflops, rtt):
    from .planner import Conditions

    return Conditions(bandwidth_mbps=bandwidth, rtt_ms=rtt, device_gflops=gflops, cloud_gflops=args.cloud_gflops,
                      jitter_ms=args.jitter_ms, loss=args.loss)


def cmd_traces(args) -> None:
    world, meta = _world(args)
    cache = {k: v for k, v in meta.items() if k != "test_index"}  # the path is what edge-agent --traces takes
    print(json.dumps({"cache": cache, **world.describe()}, indent=1, default=str))


def cmd_run(args) -> None:
    from .simulator import DESCRIPTIONS, compare

    world, _ = _world(args)
    c = _conditions(args, args.bandwidth_mbps, args.device_gflops, args.rtt_ms)
    results = world.run_all(c)
    print(f"conditions: {c}")
    print(f"accuracy target {world.accuracy_target:.4f} (calibration split): RAPNet {world.rapnet_setting()}, "
          f"capped price {world.capped_setting[0]:g} stop {world.capped_setting[1]:g} (JPEG images "
          f"{world.capped_jpeg_stop:g}), SDN threshold {world.sdn_threshold:g} (JPEG images {world.sdn_jpeg_threshold:g})\n")
    print("| policy | accuracy % | mean ms | p50 ms | p95 ms | offloaded % | mean bytes | queue ms | what |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        print(f"| {name} | {100 * r.accuracy:.2f} | {r.mean_ms:.2f} | {r.p50_ms:.2f} | {r.p95_ms:.2f} | "
              f"{100 * r.offload_share:.1f} | {r.mean_bytes:.0f} | {r.mean_queue_ms:.2f} | {DESCRIPTIONS[name]} |")
    print("\n" + json.dumps(compare(results), indent=1))


def sweep(world, args, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    from .simulator import BASELINES, CAPPED_BASELINES, compare

    cells = [(b, g, r) for r in args.rtt_ms for g in args.device_gflops for b in args.bandwidth_mbps]
    rows = []
    for b, g, r in tqdm(cells, desc="rapnet-sim sweep", unit="cell", disable=not progress):
        results = world.run_all(_conditions(args, b, g, r))
        verdict = compare(results)
        if "rapnet_capped" in results:  # the capped rule, judged by the same criteria against its own ablation
            verdict["capped"] = compare(results, ours="rapnet_capped", baselines=CAPPED_BASELINES)
            verdict["capped_vs_priced_edge"] = compare(results, ours="rapnet_capped", baselines=BASELINES)["wins_strict"]
        for name, res in results.items():
            row = {"bandwidth_mbps": b, "device_gflops": g, "rtt_ms": r, **{k: v for k, v in asdict(res).items() if k != "detail"}}
            row["exit_histogram"] = " ".join(map(str, res.exit_histogram))
            row["detail"] = json.dumps(res.detail)
            rows.append(row)
        rows.append({"bandwidth_mbps": b, "device_gflops": g, "rtt_ms": r, "policy": "_verdict", "detail": json.dumps(verdict)})
    return rows


def summarize(rows: list[dict]) -> dict:
    verdicts = [dict(json.loads(r["detail"]), bandwidth_mbps=r["bandwidth_mbps"], device_gflops=r["device_gflops"], rtt_ms=r["rtt_ms"])
                for r in rows if r["policy"] == "_verdict"]
    n = len(verdicts)
    ratios = np.array([v["oracle_ratio"] for v in verdicts])
    by_policy: dict[str, dict] = {}
    for r in rows:
        if r["policy"] == "_verdict":
            continue
        p = by_policy.setdefault(r["policy"], {"accuracy": [], "mean_ms": []})
        p["accuracy"].append(r["accuracy"])  # varies by cell where a policy sends JPEG in some cells only
        p["mean_ms"].append(r["mean_ms"])
    fastest_counts = dict(Counter(v["fastest_baseline"] for v in verdicts))
    capped = [v["capped"] for v in verdicts if "capped" in v]
    capped_ratios = np.array([v["oracle_ratio"] for v in capped])
    return {
        "cells": n,
        "wins_strict": sum(v["wins_strict"] for v in verdicts),
        "wins_within_tie": sum(v["wins_within_tie"] for v in verdicts),
        "fastest_overall": sum(v["fastest_overall"] for v in verdicts),
        "not_dominated": sum(v["not_dominated"] for v in verdicts),
        "oracle_ratio_median": float(np.median(ratios)),
        "oracle_ratio_max": float(ratios.max()),
        "within_15pct_of_oracle": int((ratios <= 1.15).sum()),
        "latency_vs_fastest_median": float(np.median([v["latency_vs_fastest"] for v in verdicts])),
        "fastest_baseline_counts": fastest_counts,
        "policy_accuracy": {k: float(np.mean(v["accuracy"])) for k, v in by_policy.items()},
        "policy_accuracy_range": {k: [float(min(v["accuracy"])), float(max(v["accuracy"]))] for k, v in by_policy.items()},
        "policy_geomean_ms": {k: float(np.exp(np.mean(np.log(v["mean_ms"])))) for k, v in by_policy.items()},
        "losing_cells": [v for v in verdicts if not v["fastest_overall"]],
        "capped": {
            "wins_strict": sum(v["wins_strict"] for v in capped),
            "wins_within_tie": sum(v["wins_within_tie"] for v in capped),
            "fastest_overall": sum(v["fastest_overall"] for v in capped),
            "not_dominated": sum(v["not_dominated"] for v in capped),
            "oracle_ratio_median": float(np.median(capped_ratios)),
            "within_15pct_of_oracle": int((capped_ratios <= 1.15).sum()),
            "wins_strict_vs_priced_edge": sum(v.get("capped_vs_priced_edge", False) for v in verdicts),
            "fastest_baseline_counts": dict(Counter(v["fastest_baseline"] for v in capped)),
        } if capped else None,
    }


def output_paths(folder: str | Path) -> dict[str, Path]:
    """--out FOLDER -> FOLDER/sweep.csv, sweep.json and sweep.md (the heatmaps go beside them)."""
    return {ext: Path(folder) / f"sweep.{ext}" for ext in ("csv", "json", "md")}


def write_outputs(rows, summary, world, meta, args, wall_s) -> list[Path]:
    paths = output_paths(args.out)
    paths["csv"].parent.mkdir(parents=True, exist_ok=True)
    fields = ["bandwidth_mbps", "device_gflops", "rtt_ms", "policy", "accuracy", "mean_ms", "p50_ms", "p95_ms",
              "offload_share", "mean_bytes", "mean_queue_ms", "exit_histogram", "detail"]
    csv_path = paths["csv"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    from rapnet.machine import machine_info

    info = {"summary": {k: v for k, v in summary.items() if k != "losing_cells"}, "losing_cells": summary["losing_cells"],
            "world": world.describe(), "traces": {k: v for k, v in meta.items() if k != "test_index"}, "args": {k: v for k, v in vars(args).items() if k != "func"},
            "machine": machine_info(), "wall_s": wall_s}
    json_path = paths["json"]
    json_path.write_text(json.dumps(info, indent=1, default=str))
    md_path = paths["md"]
    md_path.write_text(markdown(rows, summary, world))
    figures = heatmaps(rows, Path(args.figures_dir or args.out), args)
    return [csv_path, json_path, md_path, *figures]


def markdown(rows, summary, world) -> str:
    from .simulator import ACCURACY_TIE, DESCRIPTIONS

    s = summary
    lines = [f"# rapnet-sim sweep: {s['cells']} cells", "",
             f"Accuracy target (calibration split) {world.accuracy_target:.4f}: RAPNet {world.rapnet_setting()}, "
             f"SDN threshold {world.sdn_threshold}. Test images: {world.n}.", "",
             "| policy | test accuracy %, mean over cells (range) | geometric mean of mean latency over cells, ms | what |",
             "|---|---:|---:|---|"]
    for p, acc in s["policy_accuracy"].items():
        low, high = s["policy_accuracy_range"][p]
        spread = f" ({100 * low:.2f}-{100 * high:.2f})" if high - low > 5e-5 else ""
        lines.append(f"| {p} | {100 * acc:.2f}{spread} | {s['policy_geomean_ms'][p]:.2f} | {DESCRIPTIONS[p]} |")
    lines += ["", f"- RAPNet split fastest of all policies except the oracle: {s['fastest_overall']}/{s['cells']} cells",
              f"- ... and at equal or better accuracy than every baseline (a win): {s['wins_strict']}/{s['cells']}"
              f" ({s['wins_within_tie']}/{s['cells']} with accuracies within {100 * ACCURACY_TIE:g} point counted as equal)",
              f"- not dominated (no baseline at least as accurate and faster): {s['not_dominated']}/{s['cells']}",
              f"- latency / oracle latency: median {s['oracle_ratio_median']:.3f}, max {s['oracle_ratio_max']:.3f}; "
              f"within 15%: {s['within_15pct_of_oracle']}/{s['cells']}",
              f"- fastest baseline per cell: {s['fastest_baseline_counts']}"]
    if s.get("capped"):
        c = s["capped"]
        lines += [f"- RAPNet capped (price {world.capped_setting[0]:g}, stop confidence {world.capped_setting[1]:g}, "
                  f"{world.capped_jpeg_stop:g} for JPEG images; "
                  f"`edge-agent --price Q --stop-confidence T`), against the baselines with its own edge-only ablation "
                  f"(rapnet_edge_capped) for RAPNet's: fastest {c['fastest_overall']}/{s['cells']}, wins "
                  f"{c['wins_strict']}/{s['cells']} ({c['wins_within_tie']}/{s['cells']} within {100 * ACCURACY_TIE:g} point; "
                  f"{c['wins_strict_vs_priced_edge']}/{s['cells']} against the priced rapnet_edge instead), not dominated {c['not_dominated']}/{s['cells']}, oracle ratio median "
                  f"{c['oracle_ratio_median']:.3f}, within 15%: {c['within_15pct_of_oracle']}/{s['cells']}; fastest "
                  f"baseline per cell: {c['fastest_baseline_counts']}"]
    lines += ["",
              "| RTT ms | device GFLOP/s | bandwidth Mbit/s | ours ms | ours acc % | fastest baseline | its ms | its acc % | ours/oracle |",
              "|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    index = {(r["bandwidth_mbps"], r["device_gflops"], r["rtt_ms"], r["policy"]): r for r in rows}
    for r in rows:
        if r["policy"] != "_verdict":
            continue
        v = json.loads(r["detail"])
        key = (r["bandwidth_mbps"], r["device_gflops"], r["rtt_ms"])
        o, b = index[(*key, "rapnet_split")], index[(*key, v["fastest_baseline"])]
        lines.append(f"| {key[2]} | {key[1]} | {key[0]} | {o['mean_ms']:.2f} | {100 * o['accuracy']:.2f} | {v['fastest_baseline']} | "
                     f"{b['mean_ms']:.2f} | {100 * b['accuracy']:.2f} | {v['oracle_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def heatmaps(rows, folder: Path, args) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    bws, gfs, rtts = list(args.bandwidth_mbps), list(args.device_gflops), list(args.rtt_ms)
    verdict = {(r["bandwidth_mbps"], r["device_gflops"], r["rtt_ms"]): json.loads(r["detail"]) for r in rows if r["policy"] == "_verdict"}
    capped = {key: v["capped"] for key, v in verdict.items() if "capped" in v}
    short = {"sdn_edge": "SDN", "rapnet_edge": "RAPe", "rapnet_edge_capped": "RAPeC", "cloud_png": "CldP", "cloud_jpeg": "CldJ", "neurosurgeon": "NS", "spinn": "SPINN"}
    paths = []
    plots = [(verdict, "latency_vs_fastest", "RAPNet split mean latency / fastest baseline's (label: that baseline)", "sim_latency_ratio.png", "RdYlGn_r", 1.0),
             (verdict, "accuracy_vs_fastest", "RAPNet split accuracy minus the fastest baseline's (percentage points)", "sim_accuracy_delta.png", "RdYlGn", 0.0),
             (verdict, "oracle_ratio", "RAPNet split mean latency / oracle's", "sim_oracle_ratio.png", "Reds", None)]
    if len(capped) == len(verdict):
        plots.append((capped, "latency_vs_fastest", "RAPNet capped mean latency / fastest baseline's (its edge-only ablation "
                      "standing in for RAPNet's; label: that baseline)", "sim_capped_latency_ratio.png", "RdYlGn_r", 1.0))
    for verdict, key, title, fname, cmap, center in plots:
        fig, axes = plt.subplots(1, len(rtts), figsize=(4.6 * len(rtts), 4.2), squeeze=False)
        vals_all = np.array([[[verdict[b, g, r][key] for b in bws] for g in gfs] for r in rtts], dtype=float)
        if key == "accuracy_vs_fastest":
            vals_all = vals_all * 100
        if center is None:
            norm = matplotlib.colors.Normalize(1.0, max(1.3, np.nanmax(vals_all)))
        elif key == "latency_vs_fastest":
            span = max(abs(np.log(np.nanmax(vals_all))), abs(np.log(np.nanmin(vals_all))), 0.05)
            norm = matplotlib.colors.LogNorm(np.exp(-span), np.exp(span))
        else:
            span = max(np.nanmax(np.abs(vals_all)), 0.5)
            norm = matplotlib.colors.TwoSlopeNorm(0.0, -span, span)
        for ax, r, vals in zip(axes[0], rtts, vals_all):
            im = ax.imshow(vals, origin="lower", cmap=cmap, norm=norm, aspect="auto")
            for i, g in enumerate(gfs):
                for j, b in enumerate(bws):
                    label = f"{vals[i, j]:.2f}"
                    if key != "oracle_ratio":
                        label += "\n" + short.get(verdict[b, g, r]["fastest_baseline"], "?")
                    ax.text(j, i, label, ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(bws)), [f"{b:g}" for b in bws])
            ax.set_yticks(range(len(gfs)), [f"{g:g}" for g in gfs])
            ax.set_xlabel("uplink bandwidth, Mbit/s")
            ax.set_ylabel("device GFLOP/s")
            ax.set_title(f"RTT {r:g} ms", fontsize=10)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        fig.suptitle(title, fontsize=10)
        path = folder / fname
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def cmd_sweep(args) -> None:
    started = time.time()
    world, meta = _world(args)
    rows = sweep(world, args, progress=not args.no_progress)
    summary = summarize(rows)
    paths = write_outputs(rows, summary, world, meta, args, time.time() - started)
    print(markdown(rows, summary, world).split("\n| RTT ms")[0])
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_live(args) -> None:
    import torch

    torch.set_num_threads(1)
    from .live import run_live

    result = run_live(args, trace_settings(args))
    if result["median_abs_rel_error"] is None:
        sys.exit("rapnet-sim live: no point produced a measurement; see the errors above")


def _per_dataset(sizes: dict[str, int]) -> str:
    return ", ".join(f"{n} for {name}" for name, n in sizes.items())


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.replace(",", " ").split()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rapnet-sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{traces,run,sweep,live}")
    common = argparse.ArgumentParser(add_help=False, formatter_class=DefaultsHelpFormatter)
    g = common.add_argument_group("models and traces")
    g.add_argument("--dataset", choices=DATASETS, default=DEFAULT_DATASET,
                   help="the models and data to simulate: the camera-resolution set (Imagenette, 128 px) or the CIFAR-10 "
                        "set (32 px)")
    g.add_argument("--models", default=None,
                   help="folder with rapnet-/sdn-/static-<dataset>.pt (default: the shipped models, rapnet.shipped.models_dir(): "
                        "$RAPNET_MODELS, else the installed package's, else the checkout's models/)")
    g.add_argument("--data", help="the dataset's path (default: rapnet.data's search for --dataset: $RAPNET_DATA, "
                                  "../shared/datasets)")
    g.add_argument("--cache", metavar="FILE",
                   help="trace cache file (default: sim-traces/traces-<key>.npz in $RAPNET_CACHE, else ~/.cache/rapnet; "
                        "the key is the checkpoints' identities, the dataset's content and the sample sizes)")
    g.add_argument("--rebuild", action="store_true", help="rebuild the traces even if the cache matches")
    g.add_argument("--test-images", type=int, default=None, metavar="N",
                   help="test images the traces hold: a seeded sample spread evenly over the classes (0: all of them; "
                        f"default: {_per_dataset(DEFAULT_TEST_IMAGES)})")
    g.add_argument("--heldout-images", type=int, default=None, metavar="N",
                   help="images of each model's held-out validation split the traces hold (they decide whether JPEG "
                        "goes on the menu and tune its exit stops), sampled like --test-images (0: all of them; "
                        f"default: {_per_dataset(DEFAULT_HELDOUT_IMAGES)})")
    g.add_argument("--full", action="store_true",
                   help="traces on the whole test set and held-out split (about twice as long to build; overrides "
                        "--test-images and --heldout-images)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown while traces build "
                   "and a sweep runs)")
    g = common.add_argument_group("world")
    g.add_argument("--device-runtime", choices=("onnx", "torch"), default="onnx",
                   help="what the edge devices run the model on, which sets the per-call term of their compute time: "
                        "ONNX Runtime, one call per graph (the agent's default where onnxruntime is installed), or "
                        "eager PyTorch, one per leaf layer; the cloud runs eager PyTorch either way")
    g.add_argument("--cloud-gflops", type=float, default=100.0, help="cloud worker speed")
    g.add_argument("--devices", type=int, default=16, help="edge devices sharing the cloud workers")
    g.add_argument("--workers", type=int, default=1, help="cloud workers (FIFO queue servers)")
    g.add_argument("--fps", type=float, default=15.0, help="frames per second each device starts")
    g.add_argument("--jitter-ms", type=float, default=2.0, help="std of the per-request delay noise (half-normal)")
    g.add_argument("--loss", type=float, default=0.001, help="packet loss probability (each loss costs one RTO)")
    g.add_argument("--accuracy-target", type=_accuracy_target, default=None,
                   help="calibration accuracy both early-exit rules are tuned to, 0..1, or 'static': the static "
                        "network's (default: RAPNet's best with the threshold rule minus 1 point)")
    g.add_argument("--rapnet-rule", choices=("price", "threshold"), default="price",
                   help="RAPNet's exit rule: priced (argmax score - price x cost) or the first exit above a threshold")
    g.add_argument("--no-calibration-priors", dest="calibration_priors", action="store_false",
                   help="plan RAPNet without what the calibration part says about its rule: let the cloud pick the exit "
                        "only where that is faster for every exit (default: on average over the rule's exits), and plan "
                        "a capped frame as if it ran to its cap (default: at the cost of where such frames stop)")
    g.add_argument("--no-cloud-exit", dest="cloud_exit", action="store_false",
                   help="RAPNet split always runs the predictor on the edge (default: when every exit would send the "
                        "image anyway, the edge skips it and the cloud picks the exit)")
    g.add_argument("--encodings", nargs="+", default=list(DEFAULT_ENCODINGS), choices=ENCODING_NAMES, metavar="NAME",
                   help="planner's encoding menu (png, raw+zstd or jpeg at split 0; fp32+zstd, fp16+zstd, int8+zstd later); "
                        "a lossy one is used only where it passes the accuracy test (orchestration.model_traces.ModelTraces.menu)")
    g.add_argument("--seed", type=int, default=0, help="seed of the simulated arrivals, jitter and loss")

    t = sub.add_parser("traces", parents=[common], help="build or refresh the trace cache and print what it holds",
                       formatter_class=DefaultsHelpFormatter)
    t.set_defaults(func=cmd_traces)
    r = sub.add_parser("run", parents=[common], help="all policies under one condition",
                       formatter_class=DefaultsHelpFormatter)
    r.add_argument("--bandwidth-mbps", type=float, default=10.0, help="uplink bandwidth, Mbit/s")
    r.add_argument("--rtt-ms", type=float, default=20.0, help="network round-trip time, ms")
    r.add_argument("--device-gflops", type=float, default=2.0, help="edge device compute, GFLOP/s")
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("sweep", parents=[common], help="grid over bandwidth x device compute x RTT",
                       formatter_class=DefaultsHelpFormatter)
    s.add_argument("--bandwidth-mbps", type=_floats, default=list(DEFAULT_BANDWIDTHS),
                   help="uplink bandwidths, Mbit/s, as one list, e.g. '0.5 1 10'")
    s.add_argument("--device-gflops", type=_floats, default=list(DEFAULT_GFLOPS), help="edge device computes, GFLOP/s (list)")
    s.add_argument("--rtt-ms", type=_floats, default=list(DEFAULT_RTTS), help="round-trip times, ms (list)")
    s.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR",
                   help="folder for sweep.csv, sweep.md, sweep.json and the heatmap PNGs (relative to the current folder)")
    s.add_argument("--figures-dir", default=None, metavar="DIR", help="folder for the heatmap PNGs (default: --out)")
    s.set_defaults(func=cmd_sweep)
    live = sub.add_parser("live", parents=[common], help="real edge agent + cloud on loopback, shaped network, vs simulation",
                          formatter_class=DefaultsHelpFormatter)
    live.add_argument("--frames", type=int, default=100, help="test frames per point")
    live.add_argument("--points", type=int, default=6, help="how many of the built-in sweep points")
    live.add_argument("--capped", action="store_true",
                      help="run the agent with the capped rule at the simulator's rapnet_capped setting "
                           "(--price Q --stop-confidence T) and compare with that policy")
    live.add_argument("--timeout", type=float, default=300, help="seconds per point")
    live.add_argument("--overhead-frames", type=int, default=60,
                      help="training images offloaded first to measure the cloud's fixed per-request overhead")
    live.add_argument("--no-cloud-overhead", dest="cloud_overhead", action="store_false",
                      help="measure the overhead but plan and simulate without it (the model before calibration)")
    live.add_argument("--out", default=str(DEFAULT_LIVE_OUT), metavar="FILE",
                      help="JSON result (relative to the current folder)")
    live.set_defaults(func=cmd_live)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FileNotFoundError as err:
        raise SystemExit(f"rapnet-sim: {err}") from None
    except Exception as err:  # data or checkpoints that cannot be used, e.g. data whose classes are not the models'
        from rapnet.checkpoint import CheckpointError  # imported here: it loads torch, which --help does without
        from rapnet.data import DatasetError

        if isinstance(err, (DatasetError, CheckpointError)):
            raise SystemExit(f"rapnet-sim: {err}") from None
        raise
    except KeyboardInterrupt:
        raise SystemExit("rapnet-sim: interrupted") from None


if __name__ == "__main__":
    main()
