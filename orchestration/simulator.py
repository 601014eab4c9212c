"""Trace-driven simulation of edge-cloud inference policies over the real test set.

Per sample the traces hold every exit's correctness and confidence and the predictor's scores (real model
outputs), and real serialized request sizes per split x encoding. A policy decides, per sample, an exit and
where to compute it; the placement comes from orchestration.planner (the same code as the edge agent). The
simulator then draws what the planner only expects: per-sample payload bytes, jitter, packet loss (a lost
packet costs one retransmission timeout) and the cloud queue, a discrete-event FIFO queue with `workers`
servers shared by `devices` edge devices that each start a frame every 1/fps seconds (open loop).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from rapnet.codec.menu import DEFAULT_ENCODINGS, IMAGE_ENCODINGS
from rapnet.exit_rules import (CAPPED_GRID, PRICES, THRESHOLDS, capped_exits, confidence_exits, oracle_exits,
                               predictor_exits, priced_exits)
from rapnet.shipped import CAMERA_DATASET

from .calibration import calibrate_for_jpeg, calibrate_setting, capped_jpeg_stop
from .model_traces import ModelTraces
from .planner import (MAX_JPEG_ACCURACY_DROP, MIN_AGREEMENT, MIN_RTO_MS, MSS_BYTES, REF_GFLOPS, REQUEST_FRAMING_BYTES,
                      Conditions, Planner)

POLICIES = ("sdn_edge", "rapnet_edge", "rapnet_edge_capped", "cloud_png", "cloud_jpeg", "neurosurgeon", "spinn",
            "rapnet_split", "rapnet_capped", "oracle")
BASELINES = ("sdn_edge", "rapnet_edge", "cloud_png", "cloud_jpeg", "neurosurgeon", "spinn")
# The capped rule is judged against the same baselines, its edge-only ablation standing in for RAPNet's: the same
# network and exit rule without offloading (the priced rule on the edge is another operating point, not the ablation).
CAPPED_BASELINES = tuple("rapnet_edge_capped" if b == "rapnet_edge" else b for b in BASELINES)
DESCRIPTIONS = {
    "sdn_edge": "edge only, SDN network, confidence exits",
    "rapnet_edge": "edge only, RAPNet network, predictor exits",
    "rapnet_edge_capped": "edge only, RAPNet network, capped rule (rapnet_capped without offloading)",
    "cloud_png": "cloud only, static network, image sent as PNG",
    "cloud_jpeg": "cloud only, static network, image sent as JPEG q90",
    "neurosurgeon": "static network, best single split + encoding per condition (Neurosurgeon)",
    "spinn": "SDN network, confidence exits, progressive: best split per condition (SPINN-style)",
    "rapnet_split": "RAPNet, predictor exit, planner picks local or split + encoding per frame (ours)",
    "rapnet_capped": "RAPNet, predictor caps the exit, confidence stops earlier; planner places each cap (ours)",
    "oracle": "RAPNet, earliest correct exit known (no predictor to run), same planner placement",
}


@dataclass(frozen=True)
class SimConfig:
    """How the world is simulated (network and compute come per cell as planner Conditions)."""

    devices: int = 16  # edge devices sharing the cloud
    workers: int = 1  # cloud workers (servers of the FIFO queue)
    fps: float = 15.0  # frames started per second per device
    # calibration accuracy both early-exit rules aim for; None: auto; "static": the static network's (the accuracy
    # RAPNet is to match while beating the baselines on latency)
    accuracy_target: float | str | None = None
    rapnet_rule: str = "price"  # RAPNet's exit rule: "price" (priced_exits, ours) or "threshold" (predictor_exits)
    min_agreement: float = MIN_AGREEMENT  # lossy feature encodings: only when they change <= 0.5% of answers
    max_jpeg_drop: float = MAX_JPEG_ACCURACY_DROP  # JPEG images: only when the exits lose <= 0.5 point on average
    encodings: tuple[str, ...] = DEFAULT_ENCODINGS
    queue_iterations: int = 2  # planner's cloud-queue estimate: 0, then the simulated mean wait
    cloud_exit: bool = True  # RAPNet: skip the edge predictor where sending the image at once is faster
    # RAPNet's planners learn from the calibration part how often the rule picks each exit (the cloud-side exit must
    # win on average, not for every exit) and, for the capped rule, where frames stop before their cap (a local cap
    # is planned at the cost of where its frames stop). False: neither (the cloud-side exit must win for every exit,
    # a local cap is planned at the cap's own cost).
    calibration_priors: bool = True
    # what the edge devices run the model on (orchestration.model_traces.DEVICE_RUNTIMES): ONNX Runtime, the agent's
    # default where onnxruntime is installed (one call per graph), or eager PyTorch (one per leaf layer); the cloud
    # runs eager PyTorch either way
    device_runtime: str = "onnx"
    seed: int = 0


@dataclass
class PolicyResult:
    policy: str
    accuracy: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    offload_share: float
    mean_bytes: float
    mean_queue_ms: float
    exit_histogram: list
    detail: dict = field(default_factory=dict)


def calibrate_threshold(correct: np.ndarray, values: np.ndarray, rule, cost_per_exit: np.ndarray,
                        target: float) -> tuple[float, float]:
    """Threshold rule (predictor_exits / confidence_exits): the cheapest threshold reaching `target`."""
    return calibrate_setting(correct, THRESHOLDS, lambda t: rule(values, t), cost_per_exit, target)


def calibrate_price(correct: np.ndarray, scores: np.ndarray, relative_costs: np.ndarray, cost_per_exit: np.ndarray,
                    target: float) -> tuple[float, float]:
    """Priced rule (priced_exits): the cheapest price on rapnet.exit_rules.PRICES reaching `target`."""
    return calibrate_setting(correct, PRICES, lambda q: priced_exits(scores, q, relative_costs), cost_per_exit, target)


def calibrate_capped(correct: np.ndarray, scores: np.ndarray, confidence: np.ndarray, relative_costs: np.ndarray,
                     cost_per_exit: np.ndarray, target: float) -> tuple[tuple[float, float], float]:
    """Capped rule (capped_exits): the cheapest (price, threshold) on rapnet.exit_rules.CAPPED_GRID reaching `target`."""
    return calibrate_setting(correct, CAPPED_GRID, lambda qt: capped_exits(scores, confidence, *qt, relative_costs),
                             cost_per_exit, target)


def fifo_waits(arrival: np.ndarray, service: np.ndarray, workers: int) -> np.ndarray:
    """Waiting time of each job in a FIFO queue with `workers` identical servers (discrete events)."""
    order = np.argsort(arrival, kind="stable")
    waits = np.zeros(len(arrival))
    free = [0.0] * workers
    for i in order:
        t = arrival[i]
        start = max(t, free[0])
        waits[i] = start - t
        heapq.heapreplace(free, start + service[i])
    return waits


@dataclass
class Placement:
    """Per exit: where it is computed and what it costs (ms), under one set of conditions."""

    offload: np.ndarray  # (K,) bool
    split: np.ndarray  # (K,)
    encoding: list  # (K,) str | None
    edge_ms: np.ndarray
    encode_ms: np.ndarray
    service_ms: np.ndarray  # cloud decode + compute

    @classmethod
    def from_parts(cls, offload, split, encoding, parts: list[dict]) -> "Placement":
        get = lambda key: np.array([p.get(key, 0.0) for p in parts])  # noqa: E731
        return cls(np.asarray(offload, bool), np.asarray(split), list(encoding), get("edge_ms"), get("encode_ms"),
                   get("decode_ms") + get("cloud_ms"))


class World:
    """Traces + planners + calibrated operating points: everything a sweep cell needs, built once.

    RAPNet's operating point: the cheapest (local FLOPs) setting of its rule reaching the accuracy target on
    the calibration split; SDN's confidence threshold likewise. The default target, RAPNet's best calibration
    accuracy with the threshold rule minus 1 point, does not depend on RAPNet's rule, so SDN's operating
    point is the same under either rule. A target no setting reaches gives each rule its most accurate one."""

    def __init__(self, traces: dict[str, ModelTraces], config: SimConfig = SimConfig()):
        self.traces, self.config = traces, config
        self.rapnet, self.sdn, self.static = traces["rapnet"], traces["sdn"], traces["static"]
        n = {t.num_samples for t in traces.values()}
        if len(n) != 1:
            raise ValueError(f"traces disagree on the number of samples: {n}")
        self.n = n.pop()
        self.planners = {name: self._planner(t, sequential=(name == "sdn")) for name, t in traces.items()}
        r, s = self.rapnet, self.sdn
        rap_cost = self.planners["rapnet"].local_flops
        sdn_cost = self.planners["sdn"].local_flops
        rap_max = max(calibrate_threshold(r.cal_correct, r.cal_scores, predictor_exits, rap_cost, 2.0)[1], 0.0)
        if config.accuracy_target == "static":
            self.accuracy_target = float(self.static.cal_correct[:, -1].mean())
        elif config.accuracy_target is None:
            self.accuracy_target = rap_max - 0.01
        else:
            self.accuracy_target = float(config.accuracy_target)
        self.rapnet_threshold, self.rapnet_threshold_cal_acc = calibrate_threshold(
            r.cal_correct, r.cal_scores, predictor_exits, rap_cost, self.accuracy_target)
        relative = self.planners["rapnet"].relative_costs
        self.rapnet_price, self.rapnet_price_cal_acc = calibrate_price(
            r.cal_correct, r.cal_scores, relative, rap_cost, self.accuracy_target)
        self.sdn_threshold, self.sdn_cal_acc = calibrate_threshold(
            s.cal_correct, s.cal_confidence, confidence_exits, sdn_cost, self.accuracy_target)
        if config.rapnet_rule == "price":
            self.planners["rapnet"] = self.planners["rapnet"].with_price(self.rapnet_price)
            if config.calibration_priors:
                self.planners["rapnet"] = self.planners["rapnet"].with_calibration(
                    priced_exits(r.cal_scores, self.rapnet_price, relative))
            self.rapnet_exits = priced_exits(r.scores, self.rapnet_price, relative)
            self.rapnet_cal_acc = self.rapnet_price_cal_acc
        elif config.rapnet_rule == "threshold":
            self.planners["rapnet"] = self.planners["rapnet"].with_threshold(self.rapnet_threshold)
            self.rapnet_exits = predictor_exits(r.scores, self.rapnet_threshold)
            self.rapnet_cal_acc = self.rapnet_threshold_cal_acc
        else:
            raise ValueError(f"unknown RAPNet rule {config.rapnet_rule!r}: price or threshold")
        self.sdn_exits = confidence_exits(s.confidence, self.sdn_threshold)
        # Capped rule: heads on the way to the cap run (SDN-style costs), so it gets a sequential planner.
        setting, _ = calibrate_capped(r.cal_correct, r.cal_scores, r.cal_confidence, relative,
                                      self._planner(r, sequential=True).local_flops, self.accuracy_target)
        self.use_capped_setting(setting)
        # the oracle knows each image's exit, so it runs no predictor (RAPNet's cloud-side exit skips it too)
        self.oracle_planner = self._planner(r, sequential=False, predictor_on_edge=False)
        self.sdn_jpeg_threshold = calibrate_for_jpeg(s, self.sdn_threshold, THRESHOLDS[THRESHOLDS >= self.sdn_threshold],
                                                     lambda sc, cf, th: confidence_exits(cf, th), sdn_cost)
        cal_sdn = confidence_exits(s.cal_confidence, self.sdn_threshold)
        self.sdn_cal_distribution = np.bincount(cal_sdn, minlength=s.correct.shape[1]).astype(float)
        rng = np.random.default_rng(config.seed)
        self.jitter_z = np.abs(rng.standard_normal(self.n))  # common random numbers for every policy
        self.loss_u = rng.random(self.n)
        self.phase = rng.random(config.devices) / config.fps
        device = np.arange(self.n) % config.devices
        self.frame_start_ms = ((np.arange(self.n) // config.devices) / config.fps + self.phase[device]) * 1e3

    def use_capped_setting(self, setting: tuple[float, float]) -> None:
        """Run the capped rule at `setting` (price, stop confidence); World() calibrates it. Everything that follows
        from it is set here: its planner, the stop for JPEG images and its lossless exits."""
        r, relative = self.rapnet, self.planners["rapnet"].relative_costs
        price, _ = self.capped_setting = tuple(setting)
        self.capped_cal_acc = float(r.cal_correct[np.arange(len(r.cal_correct)),
                                                  capped_exits(r.cal_scores, r.cal_confidence, *setting, relative)].mean())
        # its cloud-side exit picks the cap: weighed by how often each cap comes up; a local cap costs where its
        # frames stop
        self.capped_planner = self._planner(r, sequential=True).with_price(price)
        if self.config.calibration_priors:
            self.capped_planner = self.capped_planner.with_calibration(
                priced_exits(r.cal_scores, price, relative), capped_exits(r.cal_scores, r.cal_confidence, *setting, relative))
        # frames that travel as JPEG stop at a stricter confidence: as accurate as lossless ones on the held-out split
        self.capped_jpeg_stop = capped_jpeg_stop(r, self.capped_setting, relative, self.capped_planner.local_flops)
        # the lossless view (what the edge agent computes locally); _capped redoes it where frames travel as JPEG
        self.capped_exits = capped_exits(r.scores, r.confidence, *setting, relative)

    def _planner(self, t: ModelTraces, sequential: bool, predictor_on_edge: bool | None = None) -> Planner:
        menu, agreement = t.menu(self.config.min_agreement, self.config.max_jpeg_drop)
        allowed = {key: v for key, v in menu.items() if key[1] in self.config.encodings}
        if t.cal_correct is not None:
            exit_acc = t.cal_correct.mean(0)
        else:
            exit_acc = t.correct.mean(0)
        # every measured encoding's codec time, not only the planner's menu: the cloud-only JPEG baseline sends
        # an encoding the planner may not pick, and must pay for encoding it too
        codec = {key: (t.encode_ms[key], t.decode_ms.get(key, 0.0)) for key in t.encode_ms}
        return Planner(t.costs, allowed, exit_acc, encodings=self.config.encodings,
                       layers=t.layer_counts(self.config.device_runtime), cloud_layers=t.layer_counts("torch"),
                       codec_ms=codec, agreement=agreement, sequential=sequential, predictor_on_edge=predictor_on_edge)

    # --- realisation -------------------------------------------------------------------------------------
    def _payload(self, t: ModelTraces, split: int, encoding: str, idx: np.ndarray) -> np.ndarray:
        sizes = t.payload[split, encoding]
        return sizes[idx % len(sizes)].astype(float)

    @staticmethod
    def jpeg_columns(placement: Placement) -> np.ndarray:
        """Per placement column: does the image travel as JPEG (the cloud then answers from the decoded JPEG)."""
        return np.array([bool(o) and s == 0 and e == "jpeg"
                         for o, s, e in zip(placement.offload, placement.split, placement.encoding)], dtype=bool)

    def answers(self, t: ModelTraces, exits: np.ndarray, as_jpeg: np.ndarray) -> np.ndarray:
        """Per sample: is the answer at `exits` right, from the JPEG image where `as_jpeg`, else losslessly."""
        rows = np.arange(self.n)
        if not as_jpeg.any():
            return t.correct[rows, exits]
        return np.where(as_jpeg, t.jpeg_correct[rows, exits], t.correct[rows, exits])

    def realize(self, t: ModelTraces, exits: np.ndarray, placement: Placement, c: Conditions) -> dict:
        """Per-sample latency (ms) of a decided policy, drawing bytes, jitter, loss and queueing."""
        n = self.n
        off = placement.offload[exits]
        latency = placement.edge_ms[exits].copy()
        nbytes = np.zeros(n)
        waits = np.zeros(n)
        if off.any():
            for k in np.unique(exits[off]):
                idx = np.flatnonzero(off & (exits == k))
                nbytes[idx] = self._payload(t, int(placement.split[k]), placement.encoding[k], idx)
            idx = np.flatnonzero(off)
            b = nbytes[idx] + REQUEST_FRAMING_BYTES  # on the wire
            tx = b * 8 / (c.bandwidth_mbps * 1e3) if c.bandwidth_mbps > 0 else np.full(len(idx), math.inf)
            jitter = self.jitter_z[idx] * c.jitter_ms
            packets = np.ceil(b / MSS_BYTES) + 1
            lost = self.loss_u[idx] < 1 - (1 - c.loss) ** packets
            rto = max(MIN_RTO_MS, c.rtt_ms + 4 * c.jitter_ms)
            before = latency[idx] + placement.encode_ms[exits[idx]] + tx + lost * rto
            arrival = self.frame_start_ms[idx] + before + (c.rtt_ms + jitter) / 2
            service = placement.service_ms[exits[idx]]
            waits[idx] = fifo_waits(arrival, service, self.config.workers)
            latency[idx] = before + c.rtt_ms + jitter + waits[idx] + service + c.cloud_overhead_ms
        return {"latency": latency, "offload": off, "bytes": nbytes, "wait": waits}

    def _summarize(self, name: str, t_correct: np.ndarray, exits: np.ndarray, real: dict, detail: dict,
                   num_exits: int = 1) -> PolicyResult:
        lat = real["latency"]
        off = real["offload"]
        return PolicyResult(
            policy=name, accuracy=float(t_correct.mean()), mean_ms=float(lat.mean()),
            p50_ms=float(np.median(lat)), p95_ms=float(np.percentile(lat, 95)), offload_share=float(off.mean()),
            mean_bytes=float(real["bytes"][off].mean()) if off.any() else 0.0,
            mean_queue_ms=float(real["wait"][off].mean()) if off.any() else 0.0,
            exit_histogram=np.bincount(exits, minlength=num_exits).tolist(), detail=detail)

    # --- policies ------------------------------------------------------------------------------------------
    def _planned(self, name: str, t: ModelTraces, planner: Planner, exits_fn, c: Conditions, cloud_exit: bool = False):
        """Planner-driven policy with the cloud-queue estimate iterated from the simulated wait. cloud_exit: where
        the planner would send the image for every exit, the cloud runs the predictor (Planner.cloud_exit_parts).
        exits_fn(conditions, placement, cloud_exit) -> exit per sample."""
        queue = 0.0
        for _ in range(max(1, self.config.queue_iterations)):
            cq = replace(c, cloud_queue_ms=queue)
            table = planner.option_table(cq)
            remote = planner.cloud_exit_parts(cq) if cloud_exit else None
            if remote is not None:
                placement = Placement.from_parts([True] * len(remote), [0] * len(remote),
                                                 [p["encoding"] for p in remote], remote)
            else:
                placement = Placement.from_parts(table.offload, table.split, table.encoding, table.parts)
            exits = exits_fn(cq, placement, remote is not None)
            real = self.realize(t, exits, placement, c)
            queue = float(real["wait"][real["offload"]].mean()) if real["offload"].any() else 0.0
        as_jpeg = self.jpeg_columns(placement)[exits]
        correct = self.answers(t, exits, as_jpeg)
        splits = placement.split[exits][real["offload"]]
        return self._summarize(name, correct, exits, real, {
            "split_histogram": np.bincount(splits, minlength=len(t.costs.stage_flops)).tolist() if len(splits) else [],
            "encodings": sorted({placement.encoding[k] for k in np.unique(exits) if placement.offload[k]}),
            "planner_queue_ms": cq.cloud_queue_ms, "cloud_exit": remote is not None,
            "jpeg_share": float(as_jpeg.mean())}, num_exits=t.correct.shape[1])

    def run_policy(self, name: str, c: Conditions) -> PolicyResult:
        rows = np.arange(self.n)
        if name in ("sdn_edge", "rapnet_edge"):
            t = self.sdn if name == "sdn_edge" else self.rapnet
            exits = self.sdn_exits if name == "sdn_edge" else self.rapnet_exits
            answer = self.planners[t.name].answer_ms(c)
            K = len(answer)
            placement = Placement(np.zeros(K, bool), np.asarray(t.costs.exit_stages) + 1, [None] * K, answer,
                                  np.zeros(K), np.zeros(K))
            return self._summarize(name, t.correct[rows, exits], exits, self.realize(t, exits, placement, c), {}, K)
        if name == "rapnet_edge_capped":
            t, exits = self.rapnet, self.capped_exits
            answer = self.capped_planner.answer_ms(c)  # sequential costs: every head up to the stop runs
            K = len(answer)
            placement = Placement(np.zeros(K, bool), np.asarray(t.costs.exit_stages) + 1, [None] * K, answer,
                                  np.zeros(K), np.zeros(K))
            return self._summarize(name, t.correct[rows, exits], exits, self.realize(t, exits, placement, c), {}, K)
        if name in ("cloud_png", "cloud_jpeg"):
            t, planner = self.static, self.planners["static"]
            enc = "png" if name == "cloud_png" else "jpeg"
            option = (0, enc, 0.0, 0.0, float(sum(t.costs.stage_flops) + t.costs.exit_flops[0]),
                      float(sum(t.stage_layers) + t.exit_layers[0]), float(t.payload[0, enc].mean()))
            parts = planner.offload_parts(option, c)
            placement = Placement.from_parts([True], [0], [enc], [parts])
            exits = np.zeros(self.n, dtype=int)
            correct = self.answers(t, exits, np.full(self.n, enc == "jpeg"))
            return self._summarize(name, correct, exits, self.realize(t, exits, placement, c), {"encoding": enc})
        if name == "neurosurgeon":
            t = self.static
            zeros = np.zeros(self.n, dtype=int)
            return self._planned(name, t, self.planners["static"], lambda cq, placement, remote: zeros, c)
        if name == "rapnet_split":
            planner, r = self.planners["rapnet"], self.rapnet

            def exits(cq, placement, remote):  # the cloud-side predictor sees what was sent
                jpeg = remote and self.jpeg_columns(placement).all()
                return planner.plan_exits(r.jpeg_scores if jpeg else r.scores, cq)
            return self._planned(name, r, planner, exits, c, cloud_exit=self.config.cloud_exit)
        if name == "oracle":
            return self._planned(name, self.rapnet, self.oracle_planner, self._oracle_exits, c)
        if name == "spinn":
            return self._spinn(c)
        if name == "rapnet_capped":
            return self._capped(c)
        raise ValueError(f"unknown policy {name!r}: choose from {', '.join(POLICIES)}")

    def _oracle_exits(self, cq: Conditions, placement: Placement, remote: bool) -> np.ndarray:
        """The earliest exit that is right as computed where the placement puts it (from the JPEG image there)."""
        jpeg = self.jpeg_columns(placement)
        r = self.rapnet
        return oracle_exits(np.where(jpeg[None, :], r.jpeg_correct, r.correct) if jpeg.any() else r.correct)

    def _capped(self, c: Conditions) -> PolicyResult:
        """RAPNet's capped rule as the edge agent runs it (--stop-confidence): the predictor's cap is known before
        the frame runs, where it stops is not. The planner places each frame for its cap (sequential head costs; a
        local cap at the expected cost of where calibration frames with that cap stopped); exits before that split
        answer on the edge when confident, the cloud checks the rest up to the cap. With the cloud-side exit, the
        cloud runs the predictor too."""
        t, planner = self.rapnet, self.capped_planner
        K = t.correct.shape[1]
        relative = self.planners["rapnet"].relative_costs
        queue = 0.0
        for _ in range(max(1, self.config.queue_iterations)):
            cq = replace(c, cloud_queue_ms=queue)
            table = planner.option_table(cq)
            remote = planner.cloud_exit_parts(cq) if self.config.cloud_exit else None
            columns, chosen = ([], [], [], []), []
            for cap in range(K):
                if remote is not None:
                    split, enc = 0, remote[0]["encoding"]
                    per_exit = (remote, [True] * K, [0] * K, [p["encoding"] for p in remote])
                else:
                    split, enc = (int(table.split[cap]), table.encoding[cap]) if table.offload[cap] else (planner.num_stages, None)
                    per_exit = self._progressive_columns(t, planner, split, enc, cq, last_exit=cap)
                chosen.append((split, enc))
                for column, values in zip(columns, per_exit):
                    column.extend(values)
            parts, off, splits, encs = columns
            placement = Placement.from_parts(off, splits, encs, parts)
            # where a cap's frames travel as JPEG, the exits' confidences (and, cloud-side, the cap) come from it
            jpeg_cap = np.array([choice == (0, "jpeg") for choice in chosen])
            scores = t.jpeg_scores if remote is not None and jpeg_cap.all() else t.scores
            caps = priced_exits(scores, self.capped_setting[0], relative)
            as_jpeg = jpeg_cap[caps]
            exits = capped_exits(scores, t.confidence, *self.capped_setting, relative)
            if as_jpeg.any():
                price = self.capped_setting[0]
                exits = np.where(as_jpeg, capped_exits(scores, t.jpeg_confidence, price, self.capped_jpeg_stop, relative),
                                 exits)
            real = self.realize(t, caps * K + exits, placement, c)  # placement index: (cap, exit)
            queue = float(real["wait"][real["offload"]].mean()) if real["offload"].any() else 0.0
        return self._summarize("rapnet_capped", self.answers(t, exits, as_jpeg), exits, real,
                               {"split_per_cap": [[int(s), e] for s, e in chosen], "cloud_exit": remote is not None,
                                "jpeg_share": float(as_jpeg.mean())}, K)

    @staticmethod
    def _progressive_columns(t: ModelTraces, planner: Planner, split: int, enc: str | None, c: Conditions,
                             last_exit: int | None = None) -> tuple[list, list, list, list]:
        """Per exit, a SPINN-style placement at a fixed split: (latency parts, offloaded, split, encoding).
        Exits before the split (and beyond `last_exit`, never reached) are answered on the edge."""
        K = t.correct.shape[1]
        last_exit = K - 1 if last_exit is None else last_exit
        parts, off, splits, encs = [], [], [], []
        for k in range(K):
            local = enc is None or k > last_exit or t.costs.exit_stages[k] < split
            if local:
                parts.append({"edge_ms": planner.device_ms(planner.local_flops[k], planner.local_layers[k], c)})
            else:
                option = next(o for o in planner.options[k] if o[0] == split and o[1] == enc)
                parts.append(planner.offload_parts(option, c))
            off.append(not local)
            splits.append(split if not local else t.costs.exit_stages[k] + 1)
            encs.append(None if local else enc)
        return parts, off, splits, encs

    def _spinn(self, c: Conditions) -> PolicyResult:
        t, planner = self.sdn, self.planners["sdn"]
        queue, K = 0.0, t.correct.shape[1]
        for _ in range(max(1, self.config.queue_iterations)):
            cq = replace(c, cloud_queue_ms=queue)
            split, enc, _ = planner.plan_progressive(self.sdn_cal_distribution, cq)
            parts, off, splits, encs = self._progressive_columns(t, planner, split, enc, cq)
            placement = Placement.from_parts(off, splits, encs, parts)
            # split 0 as JPEG: every exit runs in the cloud on the decoded JPEG, its confidences decide
            as_jpeg = np.full(self.n, split == 0 and enc == "jpeg")
            exits = confidence_exits(t.jpeg_confidence, self.sdn_jpeg_threshold) if as_jpeg.all() else self.sdn_exits
            real = self.realize(t, exits, placement, c)
            queue = float(real["wait"][real["offload"]].mean()) if real["offload"].any() else 0.0
        return self._summarize("spinn", self.answers(t, exits, as_jpeg), exits, real,
                               {"split": split, "encoding": enc}, K)

    def run_all(self, c: Conditions, policies=POLICIES) -> dict[str, PolicyResult]:
        return {p: self.run_policy(p, c) for p in policies}

    def rapnet_setting(self) -> str:
        """RAPNet's operating point in words, e.g. 'price 0.05' (the rule in use)."""
        if self.config.rapnet_rule == "price":
            return f"price {self.rapnet_price:g}"
        return f"threshold {self.rapnet_threshold:g}"

    def describe(self) -> dict:
        return {
            "samples": self.n, "accuracy_target": self.accuracy_target, "rapnet_rule": self.config.rapnet_rule,
            "rapnet_price": self.rapnet_price, "rapnet_price_cal_accuracy": self.rapnet_price_cal_acc,
            "rapnet_threshold": self.rapnet_threshold, "rapnet_threshold_cal_accuracy": self.rapnet_threshold_cal_acc,
            "rapnet_cal_accuracy": self.rapnet_cal_acc,
            "sdn_threshold": self.sdn_threshold, "sdn_cal_accuracy": self.sdn_cal_acc,
            "capped_price": self.capped_setting[0], "capped_threshold": self.capped_setting[1],
            "capped_cal_accuracy": self.capped_cal_acc,
            # the stricter settings for images that travel as JPEG (calibrate_for_jpeg)
            "capped_jpeg_threshold": self.capped_jpeg_stop, "sdn_jpeg_threshold": self.sdn_jpeg_threshold,
            "config": self.config.__dict__, "reference_gflops": REF_GFLOPS,
            "image_encodings": IMAGE_ENCODINGS,
            # per model: the mean accuracy the exits lose on JPEG images of the held-out split, and whether that let
            # JPEG onto its menu
            "jpeg_accuracy_drop": {name: t.jpeg_accuracy_drop() for name, t in self.traces.items()},
            "jpeg_on_menu": {name: (0, "jpeg") in p.menu for name, p in self.planners.items()},
        }


def load_world(config: SimConfig, models: str | Path | None = None, data: str | None = None,
               cache: str | Path | None = None, rebuild: bool = False, log=print, settings=None,
               progress: bool = True, dataset: str = CAMERA_DATASET) -> tuple[World, dict]:
    """The World of the three models trained on `dataset` (rapnet.shipped.default_checkpoints(dataset, models):
    the shipped ones, or those in the folder `models`) under `config`, from their trace cache (`cache`, default:
    orchestration.traces.default_cache_path; built when missing, stale or `rebuild`) made on that dataset (at `data`,
    else found by name) with `settings` (orchestration.traces.TraceSettings, default: TraceSettings.default(dataset)).
    Returns (world, the cache's metadata)."""
    from rapnet.shipped import default_checkpoints

    from .traces import ensure_traces

    traces, meta = ensure_traces(default_checkpoints(dataset, models), data, cache, settings, rebuild=rebuild, log=log,
                                 progress=progress, dataset=dataset)
    return World(traces, config), meta


# A second, looser count of the win criterion (compare): accuracies within 0.1 point (5 of the default 5,000 test
# images) count as equal.
ACCURACY_TIE = 0.001


def compare(results: dict[str, PolicyResult], ours: str = "rapnet_split", baselines=BASELINES, tol: float = 0.0) -> dict:
    """Per-cell verdicts: latency vs the fastest baseline, and whether ours wins at equal or better accuracy
    (strictly, and with accuracies within ACCURACY_TIE counted as equal)."""
    o = results[ours]
    base = [results[b] for b in baselines if b in results]
    fastest = min(base, key=lambda r: r.mean_ms)
    matched = [r for r in base if r.accuracy >= o.accuracy - tol]
    fastest_matched = min(matched, key=lambda r: r.mean_ms) if matched else None
    return {
        "fastest_baseline": fastest.policy,
        "latency_vs_fastest": o.mean_ms / fastest.mean_ms,
        "accuracy_vs_fastest": o.accuracy - fastest.accuracy,
        # strict: lowest mean latency AND accuracy >= every baseline's
        "wins_strict": all(o.mean_ms <= r.mean_ms and o.accuracy >= r.accuracy - tol for r in base),
        "wins_within_tie": all(o.mean_ms <= r.mean_ms and o.accuracy >= r.accuracy - max(tol, ACCURACY_TIE) for r in base),
        "fastest_overall": o.mean_ms <= fastest.mean_ms,
        # no baseline is at least as accurate and faster (ours is on the latency/accuracy Pareto front)
        "not_dominated": not any(r.accuracy >= o.accuracy - tol and r.mean_ms < o.mean_ms for r in base),
        "fastest_matched_baseline": fastest_matched.policy if fastest_matched else None,
        "latency_vs_matched": o.mean_ms / fastest_matched.mean_ms if fastest_matched else None,
        "oracle_ratio": o.mean_ms / results["oracle"].mean_ms if "oracle" in results else None,
    }
