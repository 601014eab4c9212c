"""Edge agent benchmark: per-frame CPU breakdown at batch 1, and end to end on loopback for three policies.

Part 1 (edge CPU, no network): for the shipped model, medians over interleaved rounds (every measured call
once per round, shuffled order) of: preprocess (a CIFAR frame, and a 640x480 BGR camera frame: colour
conversion + resize/crop + normalise), the exit predictor, the local stages for every split point
(edge_part) and every local answer (run_to_exit), and encoding (build_request + serialisation, the planner's
encodings at every split). Check: predictor + encode < 10% of the edge time of the shallowest offloaded
frame, where "edge time" = preprocess + predictor + local stages + encode + send (the client-side gRPC
round trip minus the server's own time, measured in part 2), at the shallowest split the RAPNet policy
actually offloaded at in part 2.

Part 2 (end to end, loopback), for each --devices speed: the planner plans for that device, and the agent
emulates it (--emulate-device: predictor + local compute padded with sleep to the planner's modelled time;
33.3 GFLOP/s is the planner's reference CPU, about this machine, so it adds little there): the local cloud tier (cloud.server.start_local: Ray Serve + gRPC front on
127.0.0.1), the real EdgeAgent pipeline, and three policies on the same CIFAR-10 test frames, interleaved
A B C A B C ...:
  * rapnet      predictor -> planner (exit, local or split, encoding), live network estimate;
  * edge-only   the whole network on the device (last exit, no predictor, nothing sent);
  * cloud-only  send the image (split 0, PNG), the cloud answers at the last exit (no predictor).
Each round runs every policy twice: unpaced (frames as fast as the pipeline takes them: fps) and paced at
--rate frames/s like a camera (latency from capture to answer: p50/p99).

    python benchmarks/edge_bench.py                         # ~2-3 minutes on 2 cores
    python benchmarks/edge_bench.py --frames 200 --rounds 3 --rate 20

Writes benchmarks/results/edge.json (or --output) and prints markdown tables.
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edge.config import AgentSettings, DecisionSettings  # noqa: E402
from edge.decide import Decider, build_decider  # noqa: E402
from edge.frames import Frame, Source, bgr_to_rgb, fit_image  # noqa: E402
from edge.link import CircuitBreaker, CloudLink, CloudTarget, NetworkEstimate  # noqa: E402
from edge.pipeline import EdgeAgent  # noqa: E402
from orchestration.planner import Plan  # noqa: E402
from rapnet.checkpoint import load_model  # noqa: E402
from rapnet.codec import ModelContract, build_request, encode_options  # noqa: E402
from rapnet.data import load_dataset, stratified_sample  # noqa: E402
from rapnet.preprocess import to_model_input  # noqa: E402
from rapnet.machine import machine_info  # noqa: E402

DEFAULT_CHECKPOINT = ROOT / "models" / "rapnet-cifar10.pt"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# --------------------------------------------------------------------------------------------------------
# Part 1: edge CPU breakdown
# --------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def edge_breakdown(model, identity, decider, pixels: np.ndarray, rounds: int, seed: int = 0) -> dict:
    contract = ModelContract.from_model(model, identity)
    rng = np.random.default_rng(seed)
    camera = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)  # a VGA BGR frame
    size = model.config.image_size
    x = to_model_input(pixels[0])
    K, S = model.num_exits, model.num_stages
    calls = {
        "preprocess (32x32 RGB frame)": lambda i: to_model_input(fit_image(pixels[i], size)),
        "preprocess (640x480 BGR camera frame)": lambda i: to_model_input(fit_image(bgr_to_rgb(camera), size)),
        "predictor": lambda i: model.exit_scores(to_model_input(pixels[i])),
    }
    xs = [to_model_input(p) for p in pixels]
    for s in range(S):
        calls[f"edge_part split {s}"] = (lambda s: lambda i: model.edge_part(xs[i], s))(s)
    for k in range(K):
        calls[f"run_to_exit {k} (local answer)"] = (lambda k: lambda i: model.run_to_exit(xs[i], k))(k)
    carries = {s: [model.edge_part(xi, s) for xi in xs] for s in range(S)}
    encodings = {}
    for s in range(S):
        for enc in decider.planner.encodings:
            if any(o[0] == s and o[1] == enc for opts in decider.planner.options for o in opts):
                encodings.setdefault(s, []).append(enc)
                opts = encode_options(enc)
                calls[f"encode split {s} {enc}"] = (lambda s, opts: lambda i: build_request(
                    contract, carries[s][i], s, K - 1, opts, image=pixels[i] if "image" in carries[s][i] else None
                ).SerializeToString())(s, opts)
    sizes = {}
    for s, encs in encodings.items():
        for enc in encs:
            c = carries[s][0]
            sizes[f"{s} {enc}"] = len(build_request(contract, c, s, K - 1, encode_options(enc),
                                                    image=pixels[0] if "image" in c else None).SerializeToString())
    names = list(calls)
    for _ in range(3):  # warm-up
        for name in names:
            calls[name](0)
    samples = {name: [] for name in names}
    order = random.Random(seed)
    for r in range(rounds):
        i = r % len(pixels)
        order.shuffle(names)
        for name in names:
            samples[name].append(timed(lambda: calls[name](i)))
    del x
    return {"median_ms": {n: statistics.median(v) for n, v in samples.items()},
            "p90_ms": {n: float(np.percentile(v, 90)) for n, v in samples.items()},
            "request_bytes": sizes, "rounds": rounds}


# --------------------------------------------------------------------------------------------------------
# Part 2: end to end
# --------------------------------------------------------------------------------------------------------


class FixedPolicy(Decider):
    """A baseline behind the agent's Decider interface: one exit, one placement, for every frame."""

    def __init__(self, base: Decider, plan: Plan):
        self.__dict__.update(base.__dict__)
        self._fixed = plan

    def plan(self, scores, conditions):
        return self._fixed

    def local_plan(self, scores, conditions):
        k = self._fixed.exit_index
        return Plan(k, self.planner.costs.exit_stages[k] + 1, None, False, 0.0, 0.0)


class ListSource(Source):
    def __init__(self, pixels, labels, rate: float = 0.0):
        self.pixels, self.labels, self.rate = pixels, labels, rate

    def __iter__(self):
        period, t_next = (1.0 / self.rate if self.rate else 0.0), time.perf_counter()
        for i in range(len(self.labels)):
            if period:
                time.sleep(max(0.0, t_next - time.perf_counter()))
                t_next += period
            yield Frame(i, self.pixels[i], time.perf_counter(), int(self.labels[i]))


def run_policy(model, identity, decider, link, pixels, labels, rate: float, use_predictor: bool) -> dict:
    agent = EdgeAgent(model, identity, decider, link, AgentSettings(deadline_ms=2000, use_predictor=use_predictor,
                                                                    emulate_device=True))
    t0 = time.perf_counter()
    results = list(agent.run(ListSource(pixels, labels, rate)))
    elapsed = time.perf_counter() - t0
    total = [r.latency_ms["total"] for r in results]
    offloaded = [r for r in results if r.where == "cloud"]
    return {"frames": len(results), "seconds": elapsed, "fps": len(results) / elapsed,
            "p50_ms": float(np.percentile(total, 50)), "p99_ms": float(np.percentile(total, 99)),
            "accuracy": float(np.mean([r.correct for r in results])),
            "offload_share": len(offloaded) / len(results), "degraded": sum(r.degraded for r in results),
            "bytes_per_frame": float(np.mean([r.bytes_sent for r in results])),
            "splits": sorted({r.split for r in offloaded}),
            "send_ms_by_split": {str(s): float(np.median([r.latency_ms["network"] for r in offloaded if r.split == s]))
                                 for s in sorted({r.split for r in offloaded})},
            "exit_histogram": np.bincount([r.exit for r in results], minlength=model.num_exits).tolist()}


def end_to_end(model, identity, metadata, link, pixels, labels, device_gflops: float, args) -> tuple[dict, dict, Decider]:
    decider = build_decider(model, pixels[:16], DecisionSettings(device_gflops=device_gflops), metadata)
    K = model.num_exits
    policies = {
        "rapnet": (decider, True),
        "edge-only": (FixedPolicy(decider, Plan(K - 1, model.num_stages, None, False, 0.0, 0.0)), False),
        "cloud-only": (FixedPolicy(decider, Plan(K - 1, 0, "png", True, 0.0, 0.0)), False),
    }
    links = {name: link(name) for name in policies}  # each policy measures its own transfers
    for name, (d, use) in policies.items():  # warm-up: replica, channel, planner caches, estimate
        run_policy(model, identity, d, links[name], pixels[:20], labels[:20], 0.0, use)
    runs = {name: {"unpaced": [], "paced": []} for name in policies}
    for r in range(args.rounds):
        for mode, rate in (("unpaced", 0.0), ("paced", args.rate)):
            for name, (d, use) in policies.items():
                out = run_policy(model, identity, d, links[name], pixels, labels, rate, use)
                runs[name][mode].append(out)
                print(f"device {device_gflops:g} round {r} {mode:8s} {name:10s} {out['fps']:6.1f} fps  "
                      f"p50 {out['p50_ms']:7.1f}  p99 {out['p99_ms']:7.1f} ms  acc {out['accuracy']:.3f}  "
                      f"offload {out['offload_share']:.2f}", file=sys.stderr)

    def agg(mode, name, key):
        return statistics.median([run[key] for run in runs[name][mode]])

    table = {name: {"fps": agg("unpaced", name, "fps"), "p50_ms": agg("paced", name, "p50_ms"),
                    "p99_ms": agg("paced", name, "p99_ms"), "unpaced_p50_ms": agg("unpaced", name, "p50_ms"),
                    "accuracy": agg("unpaced", name, "accuracy"), "offload_share": agg("unpaced", name, "offload_share"),
                    "bytes_per_frame": agg("unpaced", name, "bytes_per_frame"),
                    "degraded": sum(run["degraded"] for m in runs[name].values() for run in m)}
             for name in runs}
    for name, lk in links.items():
        table[name]["network_estimate_end"] = lk.estimate.snapshot()
        lk.close()
    return table, runs, decider


def predictor_encode_check(cpu: dict, runs: dict, decider: Decider) -> dict | None:
    med = cpu["median_ms"]
    rapnet = runs["rapnet"]["unpaced"] + runs["rapnet"]["paced"]
    splits = sorted({s for run in rapnet for s in run["splits"]})
    if not splits:
        return None
    s = splits[0]
    sends = [run["send_ms_by_split"][str(s)] for run in rapnet if str(s) in run["send_ms_by_split"]]
    table = decider.planner.option_table(decider.conditions())
    used = [table.encoding[k] for k in range(len(table.encoding)) if table.offload[k] and table.split[k] == s]
    enc = f"encode split {s} {used[0]}" if used and f"encode split {s} {used[0]}" in med else \
        min((n for n in med if n.startswith(f"encode split {s} ")), key=lambda n: med[n])
    parts = {"preprocess": med["preprocess (32x32 RGB frame)"], "predictor": med["predictor"],
             "local stages": med[f"edge_part split {s}"], "encode": med[enc],
             "send": statistics.median(sends) if sends else 0.0}
    edge_ms = sum(parts.values())
    compute_ms = edge_ms - parts["send"]
    share = (parts["predictor"] + parts["encode"]) / edge_ms
    return {"split": s, "encoding": enc, "parts_ms": parts, "edge_ms": edge_ms, "predictor_plus_encode_share": share,
            "share_of_edge_compute_only": (parts["predictor"] + parts["encode"]) / compute_ms, "passes": share < 0.10}


def main(argv=None) -> int:
    from rapnet.help_format import DefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="RAPNet checkpoint")
    p.add_argument("--frames", type=int, default=200, help="CIFAR-10 test frames per policy run (a seeded sample spread over the classes)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three policies")
    p.add_argument("--rate", type=float, default=20.0, help="paced runs: frames/s delivered, like a camera")
    p.add_argument("--cpu-rounds", type=int, default=200, help="rounds for the CPU breakdown")
    p.add_argument("--devices", default="33.3,5",
                   help="device GFLOP/s to plan for and emulate (compute and encoding padded to the modelled time); "
                        "33.3 is the planner's reference CPU, i.e. about this machine")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the agent")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "edge.json"), help="JSON output")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, metadata = load_model(args.checkpoint)
    identity = metadata["identity"]
    data = load_dataset(None, "test")
    sample = stratified_sample(data.labels, args.frames)  # the test split is stored class by class
    pixels, labels = data.images[sample], data.labels[sample]

    from cloud.server import start_local

    configs = {}
    cloud = start_local(args.checkpoint, port=0)
    try:
        for g in (float(v) for v in args.devices.split(",")):
            def link(_name):
                return CloudLink(CloudTarget(cloud.address, cloud.token), 2000, CircuitBreaker(), NetworkEstimate(50.0, 5.0))

            table, runs, decider = end_to_end(model, identity, metadata, link, pixels, labels, g, args)
            configs[f"{g:g}"] = {"device_gflops": g, "threshold": decider.threshold, "table": table, "runs": runs,
                                 "decider": decider}
    finally:
        cloud.stop()

    # Part 1 after the cloud is gone (no Ray processes competing for the cores)
    first = next(iter(configs.values()))["decider"]
    cpu = edge_breakdown(model, identity, first, pixels[:32], args.cpu_rounds)
    for cfg in configs.values():
        cfg["check_predictor_plus_encode"] = predictor_encode_check(cpu, cfg["runs"], cfg.pop("decider"))

    result = {"machine": machine_info(args.threads), "checkpoint": Path(args.checkpoint).name,
              "identity": identity[:16], "frames": args.frames, "rounds": args.rounds, "rate": args.rate,
              "cpu_breakdown": cpu, "end_to_end": configs}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")

    print("\n| edge CPU, batch 1 | median ms | p90 ms |\n|---|---:|---:|")
    for n in cpu["median_ms"]:
        print(f"| {n} | {cpu['median_ms'][n]:.3f} | {cpu['p90_ms'][n]:.3f} |")
    for key, cfg in configs.items():
        check = cfg["check_predictor_plus_encode"]
        print(f"\n### device {key} GFLOP/s (emulated), threshold {cfg['threshold']}")
        if check:
            print(f"\nShallowest offloaded split {check['split']} ({check['encoding']}): edge time {check['edge_ms']:.2f} ms = "
                  + " + ".join(f"{k} {v:.2f}" for k, v in check["parts_ms"].items())
                  + f"; predictor + encode = {100 * check['predictor_plus_encode_share']:.1f}% "
                  + ("(< 10%: pass)" if check["passes"] else "(>= 10%: FAILS the 10% target)")
                  + f"; {100 * check['share_of_edge_compute_only']:.1f}% of the edge compute without send")
        else:
            print("\nRAPNet offloaded nothing at this device speed: no predictor + encode check")
        print(f"\n| policy | fps (unpaced) | p50 ms @ {args.rate:g} fps | p99 ms @ {args.rate:g} fps | accuracy | offloaded | bytes/frame |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, row in cfg["table"].items():
            print(f"| {name} | {row['fps']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {100 * row['accuracy']:.1f}% | "
                  f"{100 * row['offload_share']:.0f}% | {row['bytes_per_frame']:.0f} |")
    m = result["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, commit {m.get('git_commit', 'n/a')[:10]}, "
          f"load average {m['load_average']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
