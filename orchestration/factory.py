"""Building a Planner for a loaded model: what the edge agent calls at start-up.

    from orchestration.factory import planner_for_model
    planner = planner_for_model(model, sample_pixels)        # priced rule at DEFAULT_PRICE; price=... or threshold=...
    plan = planner.plan(model.exit_scores(x).numpy()[0], Conditions(bandwidth_mbps=..., rtt_ms=..., device_gflops=...))

Cost table and layer counts come from the model itself; payload sizes are the real serialized InferRequest
sizes on the sample frames (the same measurement the simulator's traces use), or, with `traces`, the cached
ones for the same model identity (runs/sim_traces.npz).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from rapnet.codec.menu import DEFAULT_ENCODINGS

from .planner import MAX_JPEG_ACCURACY_DROP, MIN_AGREEMENT, LayerCounts, Planner


def traces_for_model(model, traces: str | Path | None):
    """The ModelTraces of `model` (by identity) in a rapnet-sim trace cache; None without one."""
    from rapnet.checkpoint import model_identity

    from .traces import load_traces

    if traces is None or not Path(traces).exists():
        return None
    identity = model_identity(model)
    return next((t for t in load_traces(Path(traces))[0].values() if t.identity == identity), None)


def jpeg_stop_confidence(model, traces: str | Path | None, planner: Planner, stop_confidence: float) -> float:
    """The capped rule's stop confidence for frames sent as JPEG: the simulator's (simulator.capped_jpeg_stop), tuned
    on the trace cache's held-out split; `stop_confidence` itself without one."""
    from .simulator import capped_jpeg_stop

    t = traces_for_model(model, traces)
    if t is None:
        return stop_confidence
    return capped_jpeg_stop(t, (planner.price, stop_confidence), planner.relative_costs, planner.local_flops)


def planner_for_model(model, sample_pixels: np.ndarray | None = None, *, threshold: float | None = None,
                      price: float | None = None,
                      exit_accuracy: Sequence[float] | None = None, encodings: Sequence[str] = DEFAULT_ENCODINGS,
                      traces: str | Path | None = None, min_agreement: float = MIN_AGREEMENT,
                      max_jpeg_drop: float = MAX_JPEG_ACCURACY_DROP, sequential: bool | None = None,
                      stop_confidence: float | None = None) -> Planner:
    """A planner for `model`: sample_pixels (N, H, W, 3) uint8 frames to measure request sizes on (a few
    dozen are enough), or `traces` (a rapnet-sim trace cache holding this model's identity). Exit rule as in
    Planner: `price` (default DEFAULT_PRICE) for the priced rule, or `threshold` for the threshold rule.
    `sequential`: every head up to the exit runs (default: for SDN; the capped rule asks for it too).
    The menu follows ModelTraces.menu; measured on unlabelled sample frames, JPEG stays off it (whether it costs
    accuracy needs labels). With the priced rule the planner learns the rule's exits (Planner.with_calibration) on
    the traces' calibration images, or on the sample frames, and with a `stop_confidence` (the capped rule) where
    those frames stop."""
    from rapnet.costs import measure_costs

    from .traces import _payloads, leaf_layers

    costs = measure_costs(model)
    layers = LayerCounts(tuple(leaf_layers(s) for s in model.stages), tuple(leaf_layers(e) for e in model.exits),
                         leaf_layers(model.predictor) if model.predictor is not None else 0)
    payload = codec_ms = agreement = prior_scores = prior_confidence = None
    t = traces_for_model(model, traces)
    if t is not None:
        payload, agreement = t.menu(min_agreement, max_jpeg_drop)
        codec_ms = {k: (t.encode_ms.get(k, 0.0), t.decode_ms.get(k, 0.0)) for k in payload}
        exit_accuracy = exit_accuracy if exit_accuracy is not None else (
            t.cal_correct.mean(0) if t.cal_correct is not None else t.correct.mean(0))
        prior_scores, prior_confidence = t.cal_scores, t.cal_confidence
    if payload is None:
        if sample_pixels is None:
            raise ValueError("pass sample frames (uint8 N x H x W x 3) to measure request sizes, or a matching trace cache")
        sizes, enc, dec, agreement = _payloads(model, model.config.kind, np.asarray(sample_pixels), lambda m: None)
        payload = {k: int(round(float(v.mean()))) for k, v in sizes.items()
                   if k != (0, "jpeg") and agreement[k] >= min_agreement}
        codec_ms = {k: (enc[k], dec[k]) for k in sizes}
    if exit_accuracy is None:
        exit_accuracy = [1.0] * costs.num_exits  # unknown: the predictor's scores (or the last exit) decide
    planner = Planner(costs, payload, exit_accuracy, encodings=encodings, threshold=threshold, price=price, layers=layers,
                      codec_ms=codec_ms, agreement=agreement,
                      sequential=model.config.kind == "sdn" if sequential is None else sequential)
    if planner.price is None or model.predictor is None:
        return planner
    # the cloud-side exit is weighed by how often the rule picks each exit: on the traces' calibration images, or
    # on the sample frames
    if prior_scores is None and sample_pixels is not None:
        import torch

        from rapnet.preprocess import to_model_input

        with torch.no_grad():
            x = to_model_input(np.asarray(sample_pixels))
            prior_scores = model.exit_scores(x).numpy()
            if stop_confidence is not None:  # only the capped rule needs where frames stop
                prior_confidence = torch.stack([torch.softmax(z, 1).max(1).values for z in model(x)], 1).numpy()
    if prior_scores is None:
        return planner
    from rapnet.evaluate import capped_exits, priced_exits

    caps = priced_exits(prior_scores, planner.price, planner.relative_costs)
    stops = None if stop_confidence is None or prior_confidence is None else capped_exits(
        prior_scores, prior_confidence, planner.price, stop_confidence, planner.relative_costs)
    return planner.with_calibration(caps, stops)
