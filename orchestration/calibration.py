"""What the edge needs to build and calibrate its planner for a loaded model.

    from orchestration.calibration import planner_for_model
    planner = planner_for_model(model, sample_pixels)        # priced rule at DEFAULT_PRICE; price=... or threshold=...
    plan = planner.plan(model.exit_scores(x).numpy()[0], Conditions(bandwidth_mbps=..., rtt_ms=..., device_gflops=...))

`model` is a MultiExitNetwork or a rapnet.execution runtime (the edge's PyTorch or ONNX Runtime): the model runs
through the runtime's numpy execution API, so a planner is calibrated on the runtime the agent uses. Cost table
and layer calls come from the runtime; payload sizes are the real serialized InferRequest sizes on the sample
frames (measure_payloads, the same measurement the simulator's traces hold), or, with
`traces`, the cached ones for the same model identity (a rapnet-sim trace cache, orchestration.model_traces).
Here too: how an exit rule's setting is tuned on calibration data (calibrate_setting) and, for frames that
travel as JPEG, on the held-out split's JPEG view (calibrate_for_jpeg, capped_jpeg_stop); the simulator
tunes its policies with the same functions.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rapnet.codec.menu import DEFAULT_ENCODINGS, LOSSLESS, encode_options, encodings_for_split
from rapnet.execution import as_runtime, leaf_layers, top_probability  # noqa: F401 - leaf_layers for the traces
from rapnet.exit_rules import THRESHOLDS, capped_exits, priced_exits

from .model_traces import ModelTraces, load_traces
from .planner import MAX_JPEG_ACCURACY_DROP, MIN_AGREEMENT, LayerCounts, Planner


# --- measuring a model -------------------------------------------------------------------------------------
def layer_counts(model) -> LayerCounts:
    """The planner's per-stage, per-exit and predictor call counts of `model` on its runtime (leaf layers for
    eager PyTorch, one per graph for ONNX Runtime)."""
    return LayerCounts(*as_runtime(model).layer_calls)


def measure_payloads(model, pixels: np.ndarray, log: Callable[[str], None] | None = None,
                     name: str = "model") -> tuple[dict, dict, dict, dict]:
    """Per (split, encoding) on the frames `pixels` (N, H, W, 3 uint8): the real serialized InferRequest size of
    each frame, the median encode and decode ms, and the share of frames a lossy encoding leaves every later
    exit's answer unchanged on. `log` (with `name`) gets one line per split."""
    from rapnet import codec
    from rapnet.preprocess import to_model_array

    run = as_runtime(model)
    contract = run.contract
    payload, enc_ms, dec_ms, agreement = {}, {}, {}, {}
    x = to_model_array(pixels)
    reference = [z.argmax(1) for z in run.all_exits(x)]
    for split in range(run.num_stages):
        carry = run.edge_part(x, split)
        last = run.num_exits - 1
        first = next(k for k, st in enumerate(run.exit_stages) if st >= split)
        for encoding in encodings_for_split(split):
            options = encode_options(encoding)
            sizes, t_enc, t_dec, decoded = [], [], [], []
            for i in range(len(pixels)):
                one = {k: v[i : i + 1] for k, v in carry.items()}
                t0 = time.perf_counter()
                req = codec.build_request(contract, one, split, last, options, image=pixels[i])
                data = req.SerializeToString()
                t1 = time.perf_counter()
                parsed = codec.parse_request_bytes(data, contract, numpy=True)
                t2 = time.perf_counter()
                sizes.append(len(data))
                t_enc.append((t1 - t0) * 1e3)
                t_dec.append((t2 - t1) * 1e3)
                if encoding not in LOSSLESS:
                    decoded.append(parsed.carry)
            key = (split, encoding)
            payload[key] = np.asarray(sizes, dtype=np.int32)
            enc_ms[key], dec_ms[key] = statistics.median(t_enc), statistics.median(t_dec)
            if decoded:
                batch = {k: np.concatenate([d[k] for d in decoded]) for k in decoded[0]}
                same = np.ones(len(pixels), dtype=bool)
                for k in range(first, run.num_exits):
                    same &= run.cloud_part(batch, split, k).argmax(1) == reference[k]
                agreement[key] = float(same.mean())
            else:
                agreement[key] = 1.0
        if log is not None:
            log(f"  {name} split {split}: " + ", ".join(
                f"{e} {payload[split, e].mean():.0f} B (agree {agreement[split, e]:.3f})"
                for e in encodings_for_split(split)))
    return payload, enc_ms, dec_ms, agreement


def traces_for_model(model, traces: str | Path | None) -> ModelTraces | None:
    """The ModelTraces of `model` (by identity) in a rapnet-sim trace cache; None without one."""
    if traces is None or not Path(traces).exists():
        return None
    identity = as_runtime(model).identity
    return next((t for t in load_traces(Path(traces))[0].values() if t.identity == identity), None)


# --- tuning a rule's setting -------------------------------------------------------------------------------
def calibrate_setting(correct: np.ndarray, grid, exits_for, cost_per_exit: np.ndarray,
                      target: float) -> tuple[float, float]:
    """The setting in `grid` (exits_for(setting) -> exit per sample) with the lowest mean cost whose accuracy
    reaches `target` on calibration data (the most accurate one when none does). Returns (setting,
    calibration accuracy)."""
    rows = np.arange(len(correct))
    best = None
    for t in grid:
        exits = exits_for(t)
        acc, cost = float(correct[rows, exits].mean()), float(cost_per_exit[exits].mean())
        key = (acc < target, cost if acc >= target else -acc, cost)
        if best is None or key < best[0]:
            best = (key, t, acc)
    return best[1], best[2]


def calibrate_for_jpeg(t: ModelTraces, setting, stricter, exits_for, cost_per_exit: np.ndarray):
    """The setting an exit rule uses on images that travel as JPEG: the cheapest of `stricter` (the rule's settings
    no looser than `setting`) whose exits on the JPEG view of the held-out split are as accurate as `setting`'s on
    its lossless view (the most accurate one when none is). JPEG costs the exits a little accuracy; the cloud, where
    those frames run, buys it back with a few more heads at its cheap compute. The whole held-out split (5,000
    images), not the calibration part (1,000), on which a loss of half a point is 5 images: the comparison of two
    views is paired, so the predictor having been fitted on most of the split flatters both alike.
    exits_for(scores, confidence, setting) -> exit per sample. `setting` itself when the traces lack the views."""
    if t.heldout_jpeg_confidence is None:
        return setting
    rows = np.arange(len(t.heldout_correct))
    target = float(t.heldout_correct[rows, exits_for(t.heldout_scores, t.heldout_confidence, setting)].mean())
    return calibrate_setting(t.heldout_jpeg_correct, stricter,
                             lambda s: exits_for(t.heldout_jpeg_scores, t.heldout_jpeg_confidence, s), cost_per_exit,
                             target)[0]


def capped_jpeg_stop(t: ModelTraces, setting: tuple[float, float], relative_costs: np.ndarray,
                     cost_per_exit: np.ndarray) -> float:
    """The capped rule's stop confidence for JPEG images (calibrate_for_jpeg; the price, hence the cap, stays), on
    the single-knob rules' finer threshold grid: one knob to search, not CAPPED_GRID's two."""
    price, stop = setting
    stricter = [(price, float(th)) for th in sorted({*THRESHOLDS.tolist(), stop}) if th >= stop]
    return calibrate_for_jpeg(t, setting, stricter, lambda sc, cf, qt: capped_exits(sc, cf, *qt, relative_costs),
                              cost_per_exit)[1]


def jpeg_stop_confidence(model, traces: str | Path | None, planner: Planner, stop_confidence: float) -> float:
    """The capped rule's stop confidence for frames sent as JPEG (capped_jpeg_stop, as the simulator tunes it), on
    the trace cache's held-out split; `stop_confidence` itself without one."""
    t = traces_for_model(model, traces)
    if t is None:
        return stop_confidence
    return capped_jpeg_stop(t, (planner.price, stop_confidence), planner.relative_costs, planner.local_flops)


# --- the planner -------------------------------------------------------------------------------------------
def planner_for_model(model, sample_pixels: np.ndarray | None = None, *, threshold: float | None = None,
                      price: float | None = None,
                      exit_accuracy: Sequence[float] | None = None, encodings: Sequence[str] = DEFAULT_ENCODINGS,
                      traces: str | Path | None = None, min_agreement: float = MIN_AGREEMENT,
                      max_jpeg_drop: float = MAX_JPEG_ACCURACY_DROP, sequential: bool | None = None,
                      stop_confidence: float | None = None, max_request_bytes: int | None = None) -> Planner:
    """A planner for `model`: sample_pixels (N, H, W, 3) uint8 frames to measure request sizes on (a few
    dozen are enough), or `traces` (a rapnet-sim trace cache holding this model's identity). Exit rule as in
    Planner: `price` (default DEFAULT_PRICE) for the priced rule, or `threshold` for the threshold rule.
    `sequential`: every head up to the exit runs (default: for SDN; the capped rule asks for it too).
    The menu follows ModelTraces.menu; measured on unlabelled sample frames, JPEG stays off it (whether it costs
    accuracy needs labels). With the priced rule the planner learns the rule's exits (Planner.with_calibration) on
    the traces' calibration images, or on the sample frames, and with a `stop_confidence` (the capped rule) where
    those frames stop. With `traces`, the cloud part is planned with the model's leaf layers (the cloud runs eager
    PyTorch) whatever the edge's runtime, as the simulator plans it. `max_request_bytes` (the link's message limit):
    a (split, encoding) whose largest measured request exceeds it is left off the menu, so no plan sends a request
    the link would refuse."""
    run = as_runtime(model)
    costs = run.costs
    payload = codec_ms = agreement = prior_scores = prior_confidence = cloud_layers = None
    t = traces_for_model(run, traces)
    if t is not None:
        cloud_layers = t.layer_counts("torch")  # the cloud runs eager PyTorch: its leaf layers, as the simulator's
        payload, agreement = t.menu(min_agreement, max_jpeg_drop)
        largest = {k: int(v.max()) for k, v in t.payload.items() if len(v)}
        codec_ms = {k: (t.encode_ms.get(k, 0.0), t.decode_ms.get(k, 0.0)) for k in payload}
        exit_accuracy = exit_accuracy if exit_accuracy is not None else (
            t.cal_correct.mean(0) if t.cal_correct is not None else t.correct.mean(0))
        prior_scores, prior_confidence = t.cal_scores, t.cal_confidence
    if payload is None:
        if sample_pixels is None:
            raise ValueError("pass sample frames (uint8 N x H x W x 3) to measure request sizes, or a matching trace cache")
        sizes, enc, dec, agreement = measure_payloads(run, np.asarray(sample_pixels))
        payload = {k: int(round(float(v.mean()))) for k, v in sizes.items()
                   if k != (0, "jpeg") and agreement[k] >= min_agreement}
        codec_ms = {k: (enc[k], dec[k]) for k in sizes}
        largest = {k: int(v.max()) for k, v in sizes.items()}
    if max_request_bytes is not None:
        payload = {k: v for k, v in payload.items() if largest.get(k, v) <= max_request_bytes}
    if exit_accuracy is None:
        exit_accuracy = [1.0] * costs.num_exits  # unknown: the predictor's scores (or the last exit) decide
    planner = Planner(costs, payload, exit_accuracy, encodings=encodings, threshold=threshold, price=price,
                      layers=layer_counts(run), codec_ms=codec_ms, agreement=agreement,
                      sequential=run.kind == "sdn" if sequential is None else sequential, cloud_layers=cloud_layers)
    if planner.price is None or not run.has_predictor:
        return planner
    # the cloud-side exit is weighed by how often the rule picks each exit: on the traces' calibration images, or
    # on the sample frames
    if prior_scores is None and sample_pixels is not None:
        from rapnet.preprocess import to_model_array

        x = to_model_array(np.asarray(sample_pixels))
        prior_scores = run.exit_scores(x)
        if stop_confidence is not None:  # only the capped rule needs where frames stop
            prior_confidence = np.stack([top_probability(z) for z in run.all_exits(x)], 1)
    if prior_scores is None:
        return planner
    caps = priced_exits(prior_scores, planner.price, planner.relative_costs)
    stops = None if stop_confidence is None or prior_confidence is None else capped_exits(
        prior_scores, prior_confidence, planner.price, stop_confidence, planner.relative_costs)
    return planner.with_calibration(caps, stops)
