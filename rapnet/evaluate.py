"""rapnet-eval: accuracy against average FLOPs per image (predictor included) on the test set, for RAPNet
(sweeping the predictor's threshold), SDN (sweeping its confidence threshold), the static network and an
oracle; budget mode; predictor quality; measured batch-1 CPU latency with real early exit.

Thresholds are calibrated on the calibration part of the validation split (never the test set).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, InputContract, check_classes, load_model
from .costs import CostTable, measure_costs
from .data import DatasetError, MixedSizesError, load_dataset, locate_dataset, stratified_sample
from .exit_rules import (CAPPED_GRID, PRICES, THRESHOLDS, capped_exits, confidence_exits, oracle_exits,
                         predictor_exits, priced_exits, relative_exit_costs)
from .exit_traces import Traces, calibration_indices, collect_traces
from .machine import machine_info
from .network import MultiExitNetwork
from .preprocess import to_model_input
from .runtime import keep_freed_memory
from .help_format import DefaultsHelpFormatter
from .shipped import default_checkpoint


# --- curves: accuracy and FLOPs of a rule over its grid ------------------------------------------------------
def point(traces: Traces, exits: np.ndarray, flops_per_exit: np.ndarray, overhead: int = 0) -> dict:
    rows = np.arange(len(exits))
    return {
        "accuracy": float(traces.correct[rows, exits].mean()),
        "mean_flops": float(flops_per_exit[exits].mean() + overhead),
        "exit_histogram": np.bincount(exits, minlength=traces.correct.shape[1]).tolist(),
    }


def rapnet_curve(traces: Traces, costs: CostTable) -> list[dict]:
    flops = np.array([costs.exit_cost(k) for k in range(costs.num_exits)])
    return [{"threshold": float(t), **point(traces, predictor_exits(traces.scores, t), flops, costs.predictor_flops)}
            for t in THRESHOLDS]


def priced_curve(traces: Traces, costs: CostTable) -> list[dict]:
    flops = np.array([costs.exit_cost(k) for k in range(costs.num_exits)])
    relative = relative_exit_costs(costs)
    return [{"price": float(q), **point(traces, priced_exits(traces.scores, q, relative), flops, costs.predictor_flops)}
            for q in PRICES]


def capped_curve(traces: Traces, costs: CostTable) -> list[dict]:
    flops = np.array([costs.sequential_exit_cost(k) for k in range(costs.num_exits)])
    relative = relative_exit_costs(costs)
    return [{"price": q, "threshold": t,
             **point(traces, capped_exits(traces.scores, traces.confidence, q, t, relative), flops, costs.predictor_flops)}
            for q, t in CAPPED_GRID]


def sdn_curve(traces: Traces, costs: CostTable) -> list[dict]:
    flops = np.array([costs.sequential_exit_cost(k) for k in range(costs.num_exits)])
    return [{"threshold": float(t), **point(traces, confidence_exits(traces.confidence, t), flops)} for t in THRESHOLDS]


def sdn_claim(curve: list[dict], traces: Traces, full_cost: float, tolerance: float = 0.005) -> dict:
    """SDN's published claim, checked on its own curve: more than half of its compute saved at no more than
    `tolerance` below its own last exit's accuracy. FLOPs here are shares of SDN's own full cost."""
    last = float(traces.correct[:, -1].mean())
    ok = [p for p in curve if p["accuracy"] >= last - tolerance]
    best = min(ok, key=lambda p: p["mean_flops"])
    saved = 1.0 - best["mean_flops"] / full_cost
    return {"last_exit_accuracy": last, "tolerance": tolerance, "threshold": best["threshold"],
            "accuracy": best["accuracy"], "compute_saved": saved, "holds": saved > 0.5}


def pareto(curve: list[dict]) -> list[dict]:
    """Points no other point beats on both accuracy and FLOPs, cheapest first."""
    best, frontier = -1.0, []
    for p in sorted(curve, key=lambda p: (p["mean_flops"], -p["accuracy"])):
        if p["accuracy"] > best:
            frontier.append(p)
            best = p["accuracy"]
    return frontier


def calibrate(cal_curve: list[dict], budget_flops: float) -> int | None:
    """Index of the policy setting with the best calibration accuracy whose mean FLOPs stay within the
    budget (curves from the same grid share indices, so it picks the same setting on test)."""
    ok = [i for i, p in enumerate(cal_curve) if p["mean_flops"] <= budget_flops]
    return max(ok, key=lambda i: (cal_curve[i]["accuracy"], -cal_curve[i]["mean_flops"])) if ok else None


def predictor_quality(traces: Traces, chosen: np.ndarray, setting: dict) -> dict:
    earliest = oracle_exits(traces.correct)
    k = traces.correct.shape[1]
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (chosen, earliest), 1)
    rows = np.arange(len(chosen))
    solvable = traces.correct.any(1)
    too_early = solvable & (chosen < earliest)
    return {
        "setting": setting,
        "confusion_predicted_vs_earliest_correct": confusion.tolist(),
        "exact": float((chosen == earliest).mean()),
        "too_early": float(too_early.mean()),
        "too_early_and_wrong": float((too_early & ~traces.correct[rows, chosen]).mean()),
        "too_late": float((solvable & (chosen > earliest)).mean()),
        "unsolvable": float((~solvable).mean()),
    }


# --- measured latency with real early exit -----------------------------------------------------------------
@torch.inference_mode()
def measure_latency(models: dict[str, tuple[MultiExitNetwork, dict]], images: np.ndarray, rounds: int) -> dict:
    """Batch-1 CPU latency per image, each policy doing only the work it really needs. Policies are timed
    interleaved image by image (A B C A B C ...) so machine noise hits all of them alike.
    models: name -> (model, its operating setting: RAPNet's {"price"} or {"price", "threshold"} for the capped
    rule, SDN's {"threshold"}, {} for the static network)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    relative = {name: relative_exit_costs(measure_costs(m)) for name, (m, _) in models.items() if m.predictor is not None}
    for _ in range(rounds):
        for pixels in images:
            x = to_model_input(pixels)
            for name, (model, setting) in models.items():
                started = time.perf_counter()
                if model.config.kind == "rapnet":
                    cap = int(priced_exits(model.exit_scores(x).numpy(), setting["price"], relative[name])[0])
                    if "threshold" in setting:
                        model.run_until_confident(x, setting["threshold"], last_exit=cap)
                    else:
                        model.run_to_exit(x, cap)
                elif model.config.kind == "sdn":
                    model.run_until_confident(x, setting["threshold"])
                else:
                    model.run_to_exit(x, model.num_exits - 1)
                times[name].append((time.perf_counter() - started) * 1e3)
    return {name: {"median_ms": statistics.median(t), "mean_ms": statistics.fmean(t), "samples": len(t)}
            for name, t in times.items()}


@torch.inference_mode()
def exit_latencies(model: MultiExitNetwork, pixels: np.ndarray, repeats: int) -> tuple[list[float], float]:
    """Median batch-1 ms of running straight to each exit, and of the predictor (for --budget-ms)."""
    x = to_model_input(pixels)
    samples: list[list[float]] = [[] for _ in range(model.num_exits)]
    predictor: list[float] = []
    for _ in range(repeats):
        for k in range(model.num_exits):
            started = time.perf_counter()
            model.run_to_exit(x, k)
            samples[k].append((time.perf_counter() - started) * 1e3)
        if model.predictor is not None:
            started = time.perf_counter()
            model.exit_scores(x)
            predictor.append((time.perf_counter() - started) * 1e3)
    return [statistics.median(s) for s in samples], statistics.median(predictor) if predictor else 0.0


def _load(path: Path | None, kind: str) -> tuple[MultiExitNetwork, dict] | None:
    if path is None or not Path(path).exists():
        return None
    model, meta = load_model(path)
    if model.config.kind != kind:
        raise CheckpointError(f"{path} holds a {model.config.kind} model, but a {kind} model was expected there")
    return model, meta


def dataset_note(data_path) -> str:
    """What a reader must know to compare figures measured on this data ("" when nothing)."""
    if Path(data_path).name.startswith("cifar10-jpeg"):
        return "CIFAR-10 JPEG export (quality 75): comparable with our other numbers, not digit-for-digit with published tables"
    return ""


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # the batched passes over the test set reuse freed memory instead of faulting in new pages
    loaded = _load(Path(args.checkpoint), "rapnet")
    if loaded is None:
        raise CheckpointError(f"RAPNet checkpoint {args.checkpoint} not found: train one with rapnet-train")
    rapnet, meta = loaded
    sdn_path = Path(args.sdn) if args.sdn else _sibling(args.checkpoint, "sdn")
    static_path = Path(args.static) if args.static else _sibling(args.checkpoint, "static")
    sdn, static = _load(sdn_path, "sdn"), _load(static_path, "static")
    contract = InputContract.of(rapnet.config, meta, str(args.checkpoint))
    for baseline, path in ((sdn, sdn_path), (static, static_path)):
        if baseline is not None:  # the baselines answer on the same images with the same classes
            other = InputContract.of(baseline[0].config, baseline[1], str(path))
            check_classes(contract.class_names, other.class_names, model=str(args.checkpoint), data=f"baseline {path}")
            if other.image_size != contract.image_size:
                raise CheckpointError(f"baseline {path} takes {other.image_size} px images, {args.checkpoint} "
                                      f"{contract.image_size} px ones: compare models of one input size")

    # The images are fitted to the model's input size by its own preprocessing (rapnet.data.fit_image), whatever
    # size the dataset holds, and their classes must be the model's, in its order.
    data_path = locate_dataset(args.data, args.dataset)
    image_size = args.image_size or contract.image_size
    if image_size != contract.image_size:
        print(f"rapnet-eval: evaluating at {image_size} px, {args.checkpoint} was built for {contract.image_size} px: "
              f"its FLOPs figures are for {contract.image_size} px", flush=True)
    test = load_dataset(data_path, args.split, image_size=image_size, cache_dir=args.cache_dir, progress=True)
    train = load_dataset(data_path, "train", image_size=image_size, cache_dir=args.cache_dir, progress=True)
    for split in (test, train):
        contract.check_classes(split.classes, data=str(data_path), model=str(args.checkpoint))
    cal_idx = calibration_indices(len(train), meta, has_predictor=rapnet.predictor is not None)
    if args.limit:
        test = test.subset(stratified_sample(test.labels, args.limit, seed=args.seed))
    cal = train.subset(cal_idx)

    costs = measure_costs(rapnet)
    reference = measure_costs(static[0]).full_cost if static else costs.full_cost
    report: dict = {
        "dataset": {"path": str(data_path), "test_images": len(test), "calibration_images": len(cal),
                    "image_size": image_size, "split": args.split, "classes": list(contract.class_names),
                    "note": dataset_note(data_path)},
        "machine": machine_info(),
        "reference_flops": reference,
        "reference": "static network" if static else "RAPNet full network",
        "models": {"rapnet": {"identity": meta["identity"], "costs": costs.to_dict()}},
    }
    traces = {"rapnet": collect_traces(rapnet, test.images, test.labels)}
    cal_traces = {"rapnet": collect_traces(rapnet, cal.images, cal.labels)}
    curves = {"rapnet": priced_curve(traces["rapnet"], costs)}
    cal_curves = {"rapnet": priced_curve(cal_traces["rapnet"], costs)}
    curves["rapnet_capped"] = capped_curve(traces["rapnet"], costs)
    cal_curves["rapnet_capped"] = capped_curve(cal_traces["rapnet"], costs)
    curves["rapnet_threshold"] = rapnet_curve(traces["rapnet"], costs)  # the first-exit-above-threshold rule
    exit_flops = np.array([costs.exit_cost(k) for k in range(costs.num_exits)])
    curves["oracle"] = [point(traces["rapnet"], oracle_exits(traces["rapnet"].correct), exit_flops)]
    curves["rapnet_exits_confidence"] = sdn_curve(traces["rapnet"], costs)  # diagnostic: SDN's rule on our exits
    report["per_exit_test_accuracy"] = {"rapnet": traces["rapnet"].correct.mean(0).round(4).tolist()}
    if sdn:
        sdn_costs = measure_costs(sdn[0])
        traces["sdn"] = collect_traces(sdn[0], test.images, test.labels)
        cal_traces["sdn"] = collect_traces(sdn[0], cal.images, cal.labels)
        curves["sdn"] = sdn_curve(traces["sdn"], sdn_costs)
        cal_curves["sdn"] = sdn_curve(cal_traces["sdn"], sdn_costs)
        report["models"]["sdn"] = {"identity": sdn[1]["identity"], "costs": sdn_costs.to_dict()}
        report["per_exit_test_accuracy"]["sdn"] = traces["sdn"].correct.mean(0).round(4).tolist()
    if static:
        static_costs = measure_costs(static[0])
        traces["static"] = collect_traces(static[0], test.images, test.labels)
        curves["static"] = [point(traces["static"], np.zeros(len(test), dtype=int), np.array([static_costs.full_cost]))]
        report["models"]["static"] = {"identity": static[1]["identity"], "costs": static_costs.to_dict()}
    for curve in curves.values():
        for p in curve:
            p["flops_fraction"] = p["mean_flops"] / reference
    report["curves"] = curves
    report["pareto"] = {name: pareto(curve) for name, curve in curves.items()}

    # Budget mode: the policy setting is chosen on the calibration split, accuracy read on the test split.
    knobs = {"rapnet": ("price",), "rapnet_capped": ("price", "threshold"), "sdn": ("threshold",)}

    def budget_row(name: str, index: int | None) -> dict | None:
        if index is None:
            return None
        test_point = curves[name][index]
        return {**setting_of(name, index), "accuracy": test_point["accuracy"], "flops_fraction": test_point["flops_fraction"]}

    def setting_of(name: str, index: int) -> dict:
        return {knob: curves[name][index][knob] for knob in knobs[name]}

    ms_per_exit, predictor_ms = exit_latencies(rapnet, test.images[0], repeats=args.latency_repeats)
    budgets = []
    for fraction in args.budget:
        budgets.append({"budget_fraction": fraction, **{name: budget_row(name, calibrate(cal_curves[name], fraction * reference))
                                                        for name in knobs if name in cal_curves}})
    if args.budget_ms:
        rapnet_ms = [predictor_ms + float(np.dot(p["exit_histogram"], ms_per_exit)) / len(cal) for p in cal_curves["rapnet"]]
        ok = [i for i, ms in enumerate(rapnet_ms) if ms <= args.budget_ms]
        best = max(ok, key=lambda i: cal_curves["rapnet"][i]["accuracy"]) if ok else None
        budgets.append({"budget_ms": args.budget_ms, "rapnet": budget_row("rapnet", best)})
    report["budgets"] = budgets
    report["latency_model"] = {"rapnet_exit_ms": ms_per_exit, "predictor_ms": predictor_ms}

    # Predictor quality at the setting calibrated for 50% of the reference FLOPs.
    index = calibrate(cal_curves["rapnet"], 0.5 * reference)
    operating = float(PRICES[index]) if index is not None else 0.0
    chosen = priced_exits(traces["rapnet"].scores, operating, relative_exit_costs(costs))
    report["predictor_quality"] = predictor_quality(traces["rapnet"], chosen, {"price": operating})

    # Real batch-1 latency with real early exit, interleaved, each policy at its setting for 50% of the FLOPs.
    timed = {"rapnet": (rapnet, {"price": operating})}
    capped_index = calibrate(cal_curves["rapnet_capped"], 0.5 * reference)
    if capped_index is not None:
        timed["rapnet_capped"] = (rapnet, setting_of("rapnet_capped", capped_index))
    if sdn:
        sdn_index = calibrate(cal_curves["sdn"], 0.5 * reference)
        timed["sdn"] = (sdn[0], {"threshold": float(THRESHOLDS[sdn_index]) if sdn_index is not None else 0.9})
    if static:
        timed["static"] = (static[0], {})
    latency_sample = test.images[stratified_sample(test.labels, args.latency_images, seed=args.seed)]
    report["latency_batch1"] = measure_latency(timed, latency_sample, rounds=1)
    report["latency_batch1"]["operating_settings"] = {k: v[1] for k, v in timed.items()}

    if sdn:
        report["sdn_claim"] = sdn_claim(curves["sdn"], traces["sdn"], sdn_costs.full_cost)
    report["exit_flops_fraction"] = {"rapnet": [costs.exit_cost(k) / reference for k in range(costs.num_exits)]}
    if sdn:
        report["exit_flops_fraction"]["sdn"] = [sdn_costs.exit_cost(k) / reference for k in range(sdn_costs.num_exits)]
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    # The capped rule's grid would more than double the file: keep its Pareto front only.
    report["curves"] = {**curves, "rapnet_capped": report["pareto"]["rapnet_capped"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    (out / "eval.md").write_text(markdown_report(report))
    plot(report, out / "eval.png")
    print(markdown_report(report))
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}")
    return report


def _sibling(checkpoint: str, kind: str) -> Path:
    path = Path(checkpoint)
    return path.with_name(path.name.replace("rapnet", kind)) if "rapnet" in path.name else path.with_name(f"{kind}.pt")


def _accuracy_at(curve: list[dict], fraction: float) -> float | None:
    """Best test accuracy among a curve's points within `fraction` of the reference FLOPs (for the table)."""
    ok = [p["accuracy"] for p in curve if p["flops_fraction"] <= fraction]
    return max(ok) if ok else None


def markdown_report(report: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = [
        f"Test images: {report['dataset']['test_images']}{' (' + report['dataset']['note'] + ')' if report['dataset']['note'] else ''}. "
        f"FLOPs relative to the {report['reference']} ({report['reference_flops'] / 1e6:.1f} MFLOPs); predictor included.",
        "",
        "| policy | best acc. at <=25% | <=35% | <=50% | <=75% | max acc. (FLOPs %) |",
        "|---|---|---|---|---|---|",
    ]
    for name, curve in report["curves"].items():
        top = max(curve, key=lambda p: (p["accuracy"], -p["mean_flops"]))
        cells = [fmt(_accuracy_at(curve, f)) for f in (0.25, 0.35, 0.5, 0.75)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(top['accuracy'])} ({100 * top['flops_fraction']:.1f}%) |")
    lines += ["", "Budget mode (policy setting calibrated on the validation split, accuracy on test):", "",
              "| budget | RAPNet priced acc. (FLOPs %) | RAPNet capped acc. (FLOPs %) | SDN acc. (FLOPs %) |",
              "|---|---|---|---|"]
    for row in report["budgets"]:
        label = f"{100 * row['budget_fraction']:.0f}% FLOPs" if "budget_fraction" in row else f"{row['budget_ms']} ms"
        cells = []
        for name in ("rapnet", "rapnet_capped", "sdn"):
            v = row.get(name)
            cells.append("-" if not v else f"{fmt(v['accuracy'])} ({100 * v['flops_fraction']:.1f}%)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    per_exit = report["per_exit_test_accuracy"]
    lines += ["", "Per exit (FLOPs to reach it, % of the reference; test accuracy):", ""]
    for name, accuracies in per_exit.items():
        fractions = report.get("exit_flops_fraction", {}).get(name)
        if fractions:
            lines.append(f"- {name}: " + ", ".join(f"{100 * f:.0f}%: {fmt(a)}" for f, a in zip(fractions, accuracies)))
    claim = report.get("sdn_claim")
    if claim:
        lines += ["", f"SDN's claim (over half its compute saved within {100 * claim['tolerance']:.1f} point of its last "
                  f"exit's {fmt(claim['last_exit_accuracy'])}%): {'holds' if claim['holds'] else 'does not hold'} here: "
                  f"{100 * claim['compute_saved']:.1f}% saved at threshold {claim['threshold']} "
                  f"({fmt(claim['accuracy'])}%)."]
    q = report["predictor_quality"]
    lines += ["", f"Predictor at {q['setting']}: exact {fmt(q['exact'])}%, too early {fmt(q['too_early'])}% "
              f"(of which wrong {fmt(q['too_early_and_wrong'])}%), too late {fmt(q['too_late'])}%, no exit right {fmt(q['unsolvable'])}%.",
              "", "Batch-1 CPU latency with real early exit (median ms): " + ", ".join(
                  f"{k} {v['median_ms']:.2f}" for k, v in report["latency_batch1"].items() if isinstance(v, dict) and "median_ms" in v)]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"rapnet": ("RAPNet (predictor, priced rule)", "-"), "sdn": ("SDN (confidence)", "--"),
              "rapnet_capped": ("RAPNet (priced cap + confidence stop)", "-"),
              "rapnet_threshold": ("RAPNet (predictor, threshold rule)", "-."),
              "rapnet_exits_confidence": ("RAPNet exits + confidence rule", ":")}
    for name, (label, style) in styles.items():
        if name in report["pareto"]:
            pts = report["pareto"][name]
            ax.plot([100 * p["flops_fraction"] for p in pts], [100 * p["accuracy"] for p in pts], style, label=label)
    for name, marker in (("static", "s"), ("oracle", "*")):
        if name in report["curves"]:
            p = report["curves"][name][0]
            ax.plot(100 * p["flops_fraction"], 100 * p["accuracy"], marker, markersize=10, label=name)
    ax.set_xlabel(f"mean FLOPs per image, % of the {report['reference']}")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(f"Accuracy vs compute ({Path(report['dataset']['path']).name}, {report['dataset']['split']})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rapnet-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="RAPNet checkpoint (default: the shipped one for --dataset, "
                                        f"{default_checkpoint('rapnet', 'DATASET')})")
    p.add_argument("--sdn", help="SDN checkpoint (default: next to --checkpoint, 'rapnet' in its name replaced by 'sdn'; "
                                 "left out when absent)")
    p.add_argument("--static", help="static-network checkpoint (default: next to --checkpoint, 'rapnet' in its name "
                                    "replaced by 'static'; left out when absent)")
    p.add_argument("--data", help="dataset archive or folder (default: $RAPNET_DATA, else rapnet.data's search: "
                                  "../shared/datasets, ~/.cache/rapnet/datasets, ./data)")
    p.add_argument("--dataset", default="cifar10", help="dataset name the default search looks for")
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default: $RAPNET_CACHE, else ~/.cache/rapnet)")
    p.add_argument("--out", default="runs/eval", help="folder for eval.json, eval.md and eval.png (relative to the "
                                                      "current folder)")
    p.add_argument("--budget", type=float, nargs="*", default=[0.25, 0.3, 0.35, 0.5],
                   help="target mean FLOPs as fractions of the reference network")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="also a target mean batch-1 CPU milliseconds for RAPNet (default: none)")
    p.add_argument("--split", default="test", choices=("test", "val"),
                   help="split the accuracy is measured on (a dataset with only train and val serves test from val); "
                        "thresholds are always calibrated on the validation split carved from train")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="fit the images to N x N px (shorter side resized, then centre-cropped, as rapnet.data.fit_image) "
                        "(default: the checkpoint's input size)")
    p.add_argument("--limit", type=int, default=0,
                   help="evaluate on N test images only, a seeded sample spread evenly over the classes (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit and --latency-images samples")
    p.add_argument("--latency-images", type=int, default=100,
                   help="test images timed for batch-1 latency (a sample spread over the classes)")
    p.add_argument("--latency-repeats", type=int, default=20, help="timing repeats per exit for the latency model")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.checkpoint = args.checkpoint or str(default_checkpoint("rapnet", args.dataset))
    if args.image_size is not None and args.image_size <= 0:
        raise SystemExit(f"rapnet-eval: --image-size {args.image_size} is not a positive number of pixels")
    try:
        run(args)
    except MixedSizesError as err:
        raise SystemExit(f"rapnet-eval: {err.hint('--image-size N')}") from None
    except (DatasetError, CheckpointError) as err:
        raise SystemExit(f"rapnet-eval: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit("rapnet-eval: interrupted") from None


if __name__ == "__main__":
    main()
