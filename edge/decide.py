"""The edge agent's decision: which exit, and local or split, for one frame.

The decision itself belongs to the planner (orchestration/planner.py, built by
orchestration.calibration.planner_for_model): this module only turns the agent's flags and its live network
estimate into the planner's `Conditions`, and keeps those conditions on a coarse grid so the planner's
per-Conditions option cache stays small and a noisy estimate does not flip decisions on every frame.

    decider = build_decider(runtime, sample_pixels, DecisionSettings(device_gflops=5))   # edge.config
    plan = decider.plan(scores, decider.conditions(estimate))        # scores: runtime.exit_scores(x)[0]
    plan.exit_index, plan.split, plan.encoding, plan.offload

The exit rule is RAPNet's priced rule by default (rapnet.exit_rules.priced_exits: argmax score - price x cost) at
the settings' price, else the checkpoint metadata's "price", else DEFAULT_PRICE (orchestration.planner, calibrated
on the calibration split, see docs/edge.md); a threshold switches to the threshold rule, a stop confidence to the
capped rule.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import numpy as np

from orchestration.planner import DEFAULT_PRICE, Conditions, Plan, Planner
from rapnet.execution import as_runtime
from rapnet.exit_rules import check_price

from .config import DecisionSettings


def checkpoint_price(metadata: dict | None) -> float | None:
    """The price the checkpoint's metadata recommends for the priced rule, if it holds a valid one."""
    try:
        return check_price((metadata or {}).get("price"))
    except ValueError:
        return None


def _grid(value: float, steps_per_decade: int = 20) -> float:
    """Round onto a log grid (~12% steps): keeps Conditions few and decisions stable."""
    if value <= 0 or not math.isfinite(value):
        return max(0.0, value) if math.isfinite(value) else value
    return float(10 ** (round(math.log10(value) * steps_per_decade) / steps_per_decade))


class Decider:
    """Conditions from flags + live estimate, decisions from the planner."""

    def __init__(self, planner: Planner, settings: DecisionSettings, *, price: float | None = None,
                 threshold: float | None = None, jpeg_stop_confidence: float | None = None):
        if (price is None) == (threshold is None):
            raise ValueError("a Decider needs exactly one of price (priced rule) and threshold (threshold rule)")
        self.planner = planner.with_price(price) if price is not None else planner.with_threshold(threshold)
        self.settings = settings
        self.price, self.threshold = price, threshold
        self.jpeg_stop_confidence = jpeg_stop_confidence

    @property
    def rule(self) -> str:
        """'price', 'capped' (the priced rule's exit as a cap, see stop_confidence) or 'threshold'."""
        return "capped" if self.stop_confidence else self.planner.rule

    @property
    def stop_confidence(self) -> float:
        """The capped rule's stop confidence; 0.0: answer at the planned exit."""
        return self.settings.stop_confidence or 0.0

    def stop_confidence_for(self, encoding: str | None) -> float:
        """The stop confidence for a frame sent with `encoding`: a JPEG image stops at the stricter one tuned so
        its exits lose nothing to the compression (orchestration.calibration.calibrate_for_jpeg)."""
        if encoding == "jpeg" and self.stop_confidence and self.jpeg_stop_confidence is not None:
            return self.jpeg_stop_confidence
        return self.stop_confidence

    @property
    def knob(self) -> float:
        """The rule's one setting: the price, or the threshold."""
        return self.price if self.price is not None else self.threshold

    def conditions(self, bandwidth_mbps: float | None = None, rtt_ms: float | None = None,
                   cloud_queue_ms: float | None = None, cloud_available: bool = True) -> Conditions:
        s = self.settings
        bw = s.bandwidth_mbps if (s.fixed_network or bandwidth_mbps is None) else bandwidth_mbps
        rtt = s.rtt_ms if (s.fixed_network or rtt_ms is None) else rtt_ms
        queue = s.cloud_queue_ms if (s.fixed_network or cloud_queue_ms is None) else cloud_queue_ms
        if not cloud_available:
            bw = 0.0  # no network: the planner answers every exit locally
        return Conditions(bandwidth_mbps=_grid(bw), rtt_ms=round(max(rtt, 0.0), 1), device_gflops=s.device_gflops,
                          device_layer_us=s.device_layer_us, cloud_gflops=s.cloud_gflops,
                          cloud_queue_ms=round(max(queue, 0.0), 1), latency_budget_ms=s.latency_budget_ms,
                          cloud_overhead_ms=s.cloud_overhead_ms if s.fixed_network else 0.0)

    def plan(self, scores: np.ndarray | None, conditions: Conditions) -> Plan:
        return self.planner.plan(scores, conditions)

    def cloud_exit_plan(self, conditions: Conditions) -> Plan | None:
        """Before the predictor runs: a plan that sends the image with the exit left to the cloud, where that is
        faster on average over the rule's exits (Planner.cloud_exit_plan); None: run the predictor here."""
        return self.planner.cloud_exit_plan(conditions) if self.settings.cloud_exit else None

    def local_plan(self, scores: np.ndarray | None, conditions: Conditions) -> Plan:
        """The plan with the cloud out of reach (circuit open): same rule, every exit local."""
        return self.planner.plan(scores, replace(conditions, bandwidth_mbps=0.0))

    def device_ms(self, conditions: Conditions, *, exit_index: int | None = None, split: int | None = None,
                  predictor: bool = True) -> float:
        """The planner's modelled device time for the predictor plus either a local answer at `exit_index` or
        the edge part of a split at `split` (what --emulate-device pads the real compute to)."""
        costs, layers = self.planner.costs, self.planner.layers
        stages = costs.exit_stages[exit_index] + 1 if exit_index is not None else split
        flops = float(sum(costs.stage_flops[:stages]))
        calls = float(sum(layers.stage_layers[:stages]))
        if self.planner.sequential:  # every head on the way ran (capped rule, SDN)
            heads = [k for k, s in enumerate(costs.exit_stages) if s < stages]
        else:
            heads = [exit_index] if exit_index is not None else []
        flops += sum(costs.exit_flops[k] for k in heads)
        calls += sum(layers.exit_layers[k] for k in heads)
        if predictor:
            flops += costs.predictor_flops
            calls += layers.predictor_layers
        return self.planner.device_ms(flops, calls, conditions)

    def fallback_exit(self, conditions: Conditions, target_exit: int, first_exit: int = 0) -> int:
        """The deepest exit (>= first_exit, <= target) the device can compute within the budget, for a frame
        whose offload failed and whose split left no local exit."""
        local = self.planner.answer_ms(conditions)
        budget = conditions.latency_budget_ms
        fits = [k for k in range(first_exit, target_exit + 1) if budget is None or local[k] <= budget]
        return fits[-1] if fits else first_exit


def build_decider(model, sample_pixels: np.ndarray | None, settings: DecisionSettings,
                  metadata: dict | None = None, max_request_bytes: int | None = None) -> Decider:
    """The planner for `model` (a rapnet.execution runtime, or a MultiExitNetwork run by PyTorch) on the runtime the
    agent uses (orchestration.calibration: its cost table and calls, real request sizes on `sample_pixels`, or the
    trace cache `settings.traces` holding this model; the device's speed timed on it) behind the agent's settings
    (validated when they were built). `max_request_bytes`: the link's message limit, which no plan exceeds."""
    from orchestration.calibration import jpeg_stop_confidence, planner_for_model

    model = as_runtime(model, (metadata or {}).get("identity"))
    traces = settings.traces
    price = None
    if settings.threshold is None:
        price = settings.price if settings.price is not None else checkpoint_price(metadata)
        price = DEFAULT_PRICE if price is None else price
    accuracy = (metadata or {}).get("val_acc_per_exit")
    if not (isinstance(accuracy, Sequence) and len(accuracy) == model.num_exits):
        accuracy = None
    planner = planner_for_model(model, sample_pixels, threshold=settings.threshold, price=price,
                                exit_accuracy=accuracy, encodings=settings.menu, traces=traces,
                                sequential=True if settings.stop_confidence else None,
                                stop_confidence=settings.stop_confidence, max_request_bytes=max_request_bytes)
    if settings.device_gflops is None:
        if sample_pixels is None or not len(sample_pixels):
            raise ValueError("measuring the device's speed needs a sample frame")
        gflops, _ = measure_device_gflops(model, planner, sample_pixels[0], layer_us=settings.device_layer_us)
        settings = replace(settings, device_gflops=gflops)
    jpeg_stop = None
    if settings.stop_confidence is not None and (0, "jpeg") in planner.menu:  # JPEG on the menu: a trace cache
        jpeg_stop = jpeg_stop_confidence(model, traces, planner, settings.stop_confidence)
    return Decider(planner, settings, price=price, threshold=settings.threshold, jpeg_stop_confidence=jpeg_stop)


def measure_device_gflops(model, planner: Planner, pixels: np.ndarray, repeats: int = 9,
                          layer_us: float | None = None) -> tuple[float, float]:
    """This device's speed as the planner models devices (FLOPs / G plus calls x `layer_us`, by default a scaled
    copy of the reference CPU's 20.7 us x 33.3 / G per call; a call is a leaf layer in eager PyTorch, a graph in ONNX
    Runtime, as the planner's layer counts from the same runtime say): the G at which the model predicts the
    measured batch-1 time of the predictor plus the whole network on one frame, timed on the runtime the agent uses
    (`model`: a rapnet.execution runtime or a MultiExitNetwork; median of `repeats` runs after two warm-ups, the
    agent's threads). Returns (GFLOP/s, measured ms)."""
    import statistics
    import time

    from orchestration.planner import REF_GFLOPS, REF_LAYER_US
    from rapnet.preprocess import to_model_array

    model = as_runtime(model)
    costs, layers = planner.costs, planner.layers
    last = costs.num_exits - 1
    flops = costs.predictor_flops + sum(costs.stage_flops) + costs.exit_flops[last]
    calls = layers.predictor_layers + sum(layers.stage_layers) + layers.exit_layers[last]
    x = to_model_array(pixels)
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        if model.has_predictor:
            model.exit_scores(x)
        model.run_to_exit(x, last)
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    if layer_us is None:
        return (flops / 1e6 + calls * REF_LAYER_US * REF_GFLOPS / 1e3) / ms, ms
    compute_ms = ms - calls * layer_us / 1e3
    if compute_ms <= 0:
        raise ValueError(f"--device-layer-us {layer_us}: {calls} layer calls alone would take longer than the "
                         f"{ms:.2f} ms measured for the whole network; give a smaller per-layer cost or the speed")
    return flops / 1e6 / compute_ms, ms

