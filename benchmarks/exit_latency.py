"""Batch-1 CPU latency of running RAPNet to each exit, next to the exit's FLOPs from the cost table.

The planner and the simulator price an exit by its FLOPs (rapnet.costs). This script checks that the price
holds on a real CPU: for every exit k it measures latency(k) / latency(full) and compares it with
FLOPs(k) / FLOPs(full). Their quotient should be near 1; exits that cost at least 25% of the network and
whose quotient lies outside [1/1.3, 1.3] are flagged, because there a FLOP-based plan misjudges time.

Method (DESIGN.md section 5): one process, batch 1, torch.inference_mode, warmup rounds first; then in every
round each measured call (every exit, the full network, the predictor alone, and the static and SDN full
networks of the same arch/width for reference) runs once, in a freshly shuffled order, so slow drifts of a
shared machine hit all of them alike (A/B interleaving). Medians over rounds are reported. Weights are random
unless --checkpoint is given; latency does not depend on weight values.

    python benchmarks/exit_latency.py                      # mobilenetv2 width 1.0, 1 thread, ~30 s
    python benchmarks/exit_latency.py --arch resnet --width 0.5 --threads 2
    python benchmarks/exit_latency.py --checkpoint models/rapnet.pt

Writes benchmarks/results/exit_latency.json (or --output) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rapnet.build import build_model  # noqa: E402
from rapnet.checkpoint import load_model, model_identity  # noqa: E402
from rapnet.config import ModelConfig  # noqa: E402
from rapnet.costs import measure_costs  # noqa: E402
from rapnet.help_format import DefaultsHelpFormatter  # noqa: E402
from rapnet.machine import machine_info  # noqa: E402

FLAG_MIN_COST_FRACTION = 0.25
FLAG_QUOTIENT = 1.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Batch-1 CPU latency of RAPNet to each exit vs its FLOPs (A/B interleaved, medians).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--arch", default="mobilenetv2", choices=["mobilenetv2", "resnet"], help="base network")
    parser.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    parser.add_argument(
        "--checkpoint", type=Path, default=None,
        help="RAPNet checkpoint to time (its config overrides --arch/--width); default: random weights",
    )
    parser.add_argument("--repeats", type=int, default=300, help="timed rounds (each round times every call once)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed rounds before timing")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (0: torch's default, one per core). Default 1: batch-1 32x32 layers gain "
             "little from a second thread, and on a shared machine spinning OpenMP threads make timings erratic",
    )
    parser.add_argument("--channels-last", action="store_true", help="run models and input in channels_last memory format")
    parser.add_argument("--no-mkldnn", action="store_true", help="disable oneDNN (torch.backends.mkldnn.enabled=False)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the static and SDN reference networks")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, input and the shuffle")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "exit_latency.json", help="JSON result path",
    )
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 for a meaningful median")
    if args.threads < 0 or args.warmup < 0:
        parser.error("--threads and --warmup must be >= 0")
    return args


def count_layer_calls(call: Callable[[], object], model: torch.nn.Module) -> dict:
    """How many leaf layers one call executes (each one a fixed per-call cost at batch 1), and how many of
    them are depthwise convolutions (which oneDNN runs far below its pointwise throughput)."""
    counts = {"layers": 0, "depthwise": 0}

    def hook(module, args, output):
        counts["layers"] += 1
        if isinstance(module, torch.nn.Conv2d) and module.groups > 1:
            counts["depthwise"] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            call()
    finally:
        for h in handles:
            h.remove()
    return counts


def fit_latency_model(rows: list[dict]) -> dict:
    """Least squares median_ms ~ ms_per_mflop * MFLOPs + ms_per_layer * layer calls, over all timed calls."""
    import numpy as np

    a = np.array([[r["flops"] / 1e6, r["layers"]] for r in rows], dtype=float)
    y = np.array([r["median_ms"] for r in rows], dtype=float)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    pred = a @ coef
    return {
        "formula": "median_ms ~ ms_per_mflop * MFLOPs + ms_per_layer * leaf_layer_calls",
        "ms_per_mflop": float(coef[0]), "ms_per_layer": float(coef[1]),
        "effective_gflops": float(1 / coef[0]) if coef[0] > 0 else None,
        "max_abs_relative_error": float(np.max(np.abs(pred - y) / y)),
        "flops_only_max_abs_relative_error": float(
            np.max(np.abs(a[:, 0] * (y @ a[:, 0]) / (a[:, 0] @ a[:, 0]) - y) / y)
        ),
    }


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int, seed: int) -> dict:
    """Each round runs every call once in a new random order; returns per-call timing lists (seconds)."""
    rng = random.Random(seed)
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            rng.shuffle(names)
            for name in names:
                start = time.perf_counter()
                calls[name]()
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    samples[name].append(elapsed)
    return samples


def summarize(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4)
    return {"median_ms": 1e3 * statistics.median(times), "p25_ms": 1e3 * q[0], "p75_ms": 1e3 * q[2], "n": len(times)}


def prepare(model, channels_last: bool):
    model = model.eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    torch.manual_seed(args.seed)

    if args.checkpoint is not None:
        model, metadata = load_model(args.checkpoint)
        if model.config.kind != "rapnet":
            sys.exit(f"{args.checkpoint} holds a {model.config.kind} model; this benchmark times RAPNet checkpoints")
        config = model.config
        source = {"checkpoint": str(args.checkpoint), "identity": metadata["identity"]}
    else:
        config = ModelConfig(arch=args.arch, kind="rapnet", width=args.width)
        model = build_model(config)
        source = {"checkpoint": None, "identity": model_identity(model), "weights": "random init"}
    model = prepare(model, args.channels_last)
    table = measure_costs(model)

    image = torch.randn(1, 3, config.image_size, config.image_size)
    if args.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    last = model.num_exits - 1

    calls: dict[str, Callable[[], object]] = {}
    owners: dict[str, torch.nn.Module] = {}
    for k in range(model.num_exits):
        calls[f"exit{k}"] = lambda k=k: model.run_to_exit(image, k)
    # The reference "full network": the same call as the deepest exit, timed as its own interleaved entry so
    # that exit{last}/full measures the noise floor of the method (should be ~1.0).
    calls["full"] = lambda: model.run_to_exit(image, last)
    calls["all_exits_forward"] = lambda: model(image)  # SDN-style: every IC evaluated on the way
    calls["predictor"] = lambda: model.exit_scores(image)

    reference: dict[str, dict] = {}
    if not args.no_baselines:
        for kind in ("static", "sdn"):
            other = prepare(build_model(config.replace(kind=kind)), args.channels_last)
            other_table = measure_costs(other)
            calls[f"{kind}_full"] = lambda m=other: m.run_to_exit(image, m.num_exits - 1)
            owners[f"{kind}_full"] = other
            reference[kind] = {"flops": other_table.full_cost, "num_exits": other.num_exits}

    layer_calls = {name: count_layer_calls(call, owners.get(name, model)) for name, call in calls.items()}
    info = machine_info(dirty_paths=("rapnet", "benchmarks/exit_latency.py"))
    print(
        f"# exit latency: {config.arch} width {config.width}, {args.repeats} rounds (+{args.warmup} warmup), "
        f"{info['torch_threads']} torch threads, {info['cpu']} x{info['cores']}, commit {info.get('git_commit', 'n/a')}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    samples = time_interleaved(calls, args.repeats, args.warmup, args.seed)
    wall = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        info["load_average_1m_at_end"] = os.getloadavg()[0]
    stats = {name: summarize(t) for name, t in samples.items()}

    full_flops = table.full_cost
    # Per-round ratio medians are more robust to drift than a ratio of medians: both calls ran in the same round.
    full_t = samples["full"]
    exits = []
    for k in range(model.num_exits):
        flops = table.exit_cost(k)
        lat_frac = statistics.median(a / b for a, b in zip(samples[f"exit{k}"], full_t))
        flop_frac = flops / full_flops
        quotient = lat_frac / flop_frac
        flagged = flop_frac >= FLAG_MIN_COST_FRACTION and not (1 / FLAG_QUOTIENT <= quotient <= FLAG_QUOTIENT)
        exits.append({
            "exit": k, "stage": model.exit_stages[k], "flops": flops, "flops_fraction": flop_frac,
            **stats[f"exit{k}"], "latency_fraction": lat_frac, "quotient": quotient, "flagged": flagged,
            **layer_calls[f"exit{k}"],
        })

    def extra(name: str, flops: int) -> dict:
        lat_frac = statistics.median(a / b for a, b in zip(samples[name], full_t))
        return {"name": name, "flops": flops, "flops_fraction": flops / full_flops, **stats[name],
                "latency_fraction": lat_frac, "quotient": lat_frac / (flops / full_flops) if flops else None,
                **layer_calls[name]}

    others = [extra("full", full_flops),
              extra("all_exits_forward", table.sequential_exit_cost(last)),
              extra("predictor", table.predictor_flops)]
    for kind, ref in reference.items():
        others.append(extra(f"{kind}_full", ref["flops"]))

    result = {
        "benchmark": "exit_latency",
        "config": config.to_dict(),
        "model": source,
        "settings": {
            "batch": 1, "repeats": args.repeats, "warmup": args.warmup, "channels_last": args.channels_last,
            "mkldnn_enabled": not args.no_mkldnn, "seed": args.seed, "interleaved": "shuffled per round",
            "flag_rule": f"flops_fraction >= {FLAG_MIN_COST_FRACTION} and quotient outside "
                         f"[1/{FLAG_QUOTIENT}, {FLAG_QUOTIENT}]",
            "latency_fraction": "median over rounds of t(call)/t(full) from the same round",
        },
        "machine": info,
        "wall_s": wall,
        "exits": exits,
        "reference": others,
        "latency_model": fit_latency_model(exits + [r for r in others if r["name"] != "full"]),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwrote {args.output} ({wall:.0f} s of timing)", file=sys.stderr)
    return result


def markdown(result: dict) -> str:
    m, c = result["machine"], result["config"]
    lines = [
        f"RAPNet {c['arch']} width {c['width']}, batch 1, {m['cpu']} ({m['cores']} cores), "
        f"{m['torch_threads']} torch threads, torch {m['torch']}, commit {m.get('git_commit', 'n/a')}"
        f"{' (+uncommitted rapnet/ changes)' if m.get('git_dirty') else ''}; "
        f"medians of {result['settings']['repeats']} interleaved rounds.",
        "",
        "| call | stage | MFLOPs | layers (dw) | FLOPs / full | latency ms (p25-p75) | latency / full | quotient | flag |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in result["exits"]:
        lines.append(
            f"| exit {e['exit']} | {e['stage']} | {e['flops'] / 1e6:.1f} | {e['layers']} ({e['depthwise']}) | "
            f"{e['flops_fraction']:.3f} | "
            f"{e['median_ms']:.3f} ({e['p25_ms']:.3f}-{e['p75_ms']:.3f}) | {e['latency_fraction']:.3f} | "
            f"{e['quotient']:.2f} | {'**off**' if e['flagged'] else ''} |"
        )
    for r in result["reference"]:
        q = f"{r['quotient']:.2f}" if r["quotient"] is not None else "-"
        lines.append(
            f"| {r['name']} | - | {r['flops'] / 1e6:.1f} | {r['layers']} ({r['depthwise']}) | {r['flops_fraction']:.3f} | "
            f"{r['median_ms']:.3f} ({r['p25_ms']:.3f}-{r['p75_ms']:.3f}) | {r['latency_fraction']:.3f} | {q} | |"
        )
    fit = result["latency_model"]
    lines += [
        "",
        f"Latency model fitted to these medians: {fit['ms_per_mflop'] * 1e3:.1f} us per MFLOP "
        f"+ {fit['ms_per_layer'] * 1e3:.1f} us per leaf layer call; max relative error "
        f"{fit['max_abs_relative_error']:.0%} (FLOPs alone: {fit['flops_only_max_abs_relative_error']:.0%}).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
