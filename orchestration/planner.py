"""The offload planner: THE one place that decides exit, split point and encoding for a frame.

The edge agent calls `Planner.plan(scores, conditions)` per frame; the simulator calls the same planner
(`plan_exits` + `option_table`, which `plan` itself uses), so the simulator predicts what the agent does.

Latency model (expected values; all times in ms):

    local  = device(predictor + stages up to exit k + head k)
    offload(s, enc) = device(predictor + stages [0, s)) + encode(s, enc) + bytes(s, enc) * 8 / bandwidth
                      + rtt + E[jitter] + E[retransmission] + cloud_queue + cloud_overhead + decode(s, enc)
                      + cloud(stages [s, stage of k] + head k)

    device(flops, layers) = flops / device_gflops + layers * device_layer_us      (and the same for the cloud)

The per-layer-call term is there because at batch 1 on a CPU, early exits cost ~2x what their FLOPs say
(benchmarks/results/exit_latency.json, the shipped model: FLOPs + per-layer cost fit every exit within 14%,
FLOPs alone within 75%).
Codec times are measured on the reference machine and scaled by its speed over the target's.
Retransmission (ours, TCP-like): each packet of the request is lost with probability `loss`; any loss costs
one retransmission timeout, RTO = max(200 ms, rtt + 4 * jitter) (Linux's floor and RFC 6298's shape).

Pure numpy/python. Per-exit option tables are cached per Conditions, so a plan is a table lookup after the
first call with given conditions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from rapnet.codec.menu import DEFAULT_ENCODINGS
from rapnet.costs import CostTable
from rapnet.exit_rules import check_price, check_threshold, predictor_exits, priced_exits, relative_exit_costs

# The reference machine (AMD EPYC, 1 torch thread, batch 1): median_ms ~ MFLOPs / 33.3 GFLOP/s + leaf layer
# calls * 20.7 us, a fit over a width-1.0 RAPNet's exits; it predicts the shipped width-0.5 model's exits within
# 10% (benchmarks/results/exit_latency.json). A device of G GFLOP/s is modelled as a scaled copy of it:
# per-layer cost 20.7 us * 33.3 / G unless given.
REF_GFLOPS = 33.3
REF_LAYER_US = 20.7
# RAPNet's default exit rule: rapnet.exit_rules.priced_exits at this price (argmax_k score_k - price * cost_k /
# full cost). 0.03 is the price rapnet-eval's budget mode picks on the calibration part (the 1000 validation
# images the predictor never saw) for the shipped checkpoint at a budget of half the static network's FLOPs:
# 84.7% on test at 38.7% of its FLOPs, predictor included (benchmarks/results/eval.json).
DEFAULT_PRICE = 0.03
MSS_BYTES = 1448
# What a request takes on the wire beyond its serialized InferRequest: gRPC's 5-byte message prefix and the HTTP/2
# HEADERS (path, deadline, bearer token) and DATA frames. Measured through rapnet-sim live's proxy: 1,311 bytes per
# JPEG request of 1,178 (133), connection set-up spread over 100 requests.
REQUEST_FRAMING_BYTES = 133
MIN_RTO_MS = 200.0
# A lossy encoding joins the menu when it leaves this share of answers unchanged (features), or, for a JPEG
# image, when its exits lose at most this much held-out accuracy on average (ModelTraces.menu).
MIN_AGREEMENT = 0.995
MAX_JPEG_ACCURACY_DROP = 0.005
HALF_NORMAL_MEAN = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class Conditions:
    """What the planner knows about the moment: network, device, cloud, and the objective."""

    bandwidth_mbps: float  # uplink, Mbit/s (0: no network)
    rtt_ms: float
    device_gflops: float
    device_layer_us: float | None = None  # per leaf-layer call on the device; None: scaled reference CPU
    cloud_gflops: float = 100.0
    cloud_queue_ms: float = 0.0  # expected wait for a cloud worker
    cloud_overhead_ms: float = 0.0  # fixed cost per request of the serving path (gRPC, front, Ray hop, batch wait)
    latency_budget_ms: float | None = None  # objective: max accuracy s.t. this budget
    accuracy_target: float | None = None  # objective: min latency s.t. the exit's predicted accuracy >= this
    jitter_ms: float = 0.0  # std of the one-way-delay noise (half-normal added per request)
    loss: float = 0.0  # packet loss probability
    cloud_layer_us: float | None = None  # per layer call in the cloud; None: scaled reference CPU

    def __post_init__(self):
        for name in ("bandwidth_mbps", "rtt_ms", "cloud_queue_ms", "cloud_overhead_ms", "jitter_ms"):
            if getattr(self, name) < 0 or math.isnan(getattr(self, name)):
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.device_gflops > 0 or not self.cloud_gflops > 0:
            raise ValueError("device_gflops and cloud_gflops must be > 0")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must lie in [0, 1), got {self.loss}")

    @property
    def device_layer(self) -> float:
        return self.device_layer_us if self.device_layer_us is not None else REF_LAYER_US * REF_GFLOPS / self.device_gflops

    @property
    def cloud_layer(self) -> float:
        return self.cloud_layer_us if self.cloud_layer_us is not None else REF_LAYER_US * REF_GFLOPS / self.cloud_gflops


@dataclass
class Plan:
    exit_index: int
    split: int  # edge runs stages [0, split); for a local answer, split = stage of the exit + 1
    encoding: str | None  # None when nothing is sent
    offload: bool
    expected_latency_ms: float
    expected_accuracy: float
    breakdown: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LayerCounts:
    """Calls per stage, exit head and predictor on one runtime: leaf layers in eager PyTorch, one per graph on ONNX
    Runtime (orchestration.calibration.layer_counts; ModelTraces.layer_counts)."""

    stage_layers: tuple[int, ...]
    exit_layers: tuple[int, ...]
    predictor_layers: int = 0

    @classmethod
    def zeros(cls, costs: CostTable) -> "LayerCounts":
        return cls((0,) * len(costs.stage_flops), (0,) * costs.num_exits, 0)


@dataclass
class OptionTable:
    """For every exit: the best place to compute it under one set of conditions."""

    latency: np.ndarray  # (K,) expected ms of the best option
    split: np.ndarray  # (K,) int
    encoding: list  # (K,) str | None
    offload: np.ndarray  # (K,) bool
    local_latency: np.ndarray  # (K,)
    parts: list  # (K,) dict breakdown of the chosen option


class Planner:
    """Decides exit, split point and encoding.

    costs: the model's cost table. payload_bytes: (split, encoding) -> real serialized request bytes (mean).
    exit_accuracy: per-exit accuracy (used without predictor scores, and for reports). encodings: the menu
    (an encoding is available at a split when payload_bytes has that key). Exit rule: `price` uses
    rapnet.exit_rules.priced_exits (argmax score - price * relative cost, the default: DEFAULT_PRICE);
    `threshold` alone uses the threshold rule rapnet.exit_rules.predictor_exits (shallowest exit whose score
    reaches it); pass one or neither. layers: the device runtime's calls (leaf layers in eager PyTorch, one per graph
    on ONNX Runtime) for the per-call term. cloud_layers: the cloud's (default: layers); the cloud runs eager
    PyTorch, so an edge on ONNX Runtime plans the cloud part with the model's leaf layers where it knows them.
    codec_ms: (split, encoding) -> (encode ms, decode ms) on the reference machine. agreement: (split,
    encoding) -> share of answers a lossy encoding leaves unchanged (expected accuracy is scaled by it).
    sequential: SDN-style costs (every head up to the exit runs). predictor_on_edge: add the predictor's
    cost on the edge (default: when the cost table has one).
    """

    def __init__(self, costs: CostTable, payload_bytes: Mapping[tuple[int, str], int], exit_accuracy: Sequence[float],
                 encodings: Sequence[str] = DEFAULT_ENCODINGS, threshold: float | None = None, *, price: float | None = None,
                 layers: LayerCounts | None = None, codec_ms: Mapping[tuple[int, str], tuple[float, float]] | None = None,
                 agreement: Mapping[tuple[int, str], float] | None = None, sequential: bool = False,
                 predictor_on_edge: bool | None = None, max_cached: int = 4096,
                 cloud_layers: LayerCounts | None = None):
        if len(exit_accuracy) != costs.num_exits:
            raise ValueError(f"exit_accuracy has {len(exit_accuracy)} entries, the model has {costs.num_exits} exits")
        self.costs = costs
        self.exit_accuracy = np.asarray(exit_accuracy, dtype=float)
        if threshold is not None and price is not None:
            raise ValueError("pass a price (priced rule) or a threshold (threshold rule), not both")
        self.threshold = None if threshold is None else check_threshold(threshold)
        self.price = None if threshold is not None else check_price(DEFAULT_PRICE if price is None else price)
        self.relative_costs = relative_exit_costs(costs)  # cost_k / full cost, the priced rule's prices
        self.encodings = tuple(encodings)
        self.layers = layers or LayerCounts.zeros(costs)
        self.cloud_layers = cloud_layers or self.layers
        self.sequential = sequential
        self.codec_ms = dict(codec_ms or {})
        self.agreement = dict(agreement or {})
        use_pred = costs.predictor_flops > 0 if predictor_on_edge is None else predictor_on_edge
        self.num_stages = len(costs.stage_flops)
        K = costs.num_exits
        ex_st = np.asarray(costs.exit_stages)
        sf = np.asarray(costs.stage_flops, dtype=float)
        sl = np.asarray(self.layers.stage_layers, dtype=float)
        hf = np.asarray(costs.exit_flops, dtype=float)
        hl = np.asarray(self.layers.exit_layers, dtype=float)
        cum_f = np.concatenate([[0.0], np.cumsum(sf)])  # cum_f[s] = FLOPs of stages [0, s)
        cum_l = np.concatenate([[0.0], np.cumsum(sl)])
        hl_c = np.asarray(self.cloud_layers.exit_layers, dtype=float)  # the same in the cloud's calls
        cum_l_c = np.concatenate([[0.0], np.cumsum(np.asarray(self.cloud_layers.stage_layers, dtype=float))])
        pred_f = float(costs.predictor_flops) if use_pred else 0.0
        pred_l = float(self.layers.predictor_layers) if use_pred else 0.0
        # what moves to the cloud when the cloud picks the exit: FLOPs, the edge's calls, the cloud's calls
        self._predictor_cost = (pred_f, pred_l, float(self.cloud_layers.predictor_layers) if use_pred else 0.0)

        def heads(lo_stage, hi_stage, upto_k, vec):  # heads of exits 0..upto_k whose stage lies in [lo, hi)
            mask = (ex_st >= lo_stage) & (ex_st < hi_stage) & (np.arange(K) <= upto_k)
            return float(vec[mask].sum())

        # local_flops[k], local_layers[k]: what answering exit k on the edge costs
        self.local_flops = np.zeros(K)
        self.local_layers = np.zeros(K)
        # options[k]: every way to offload exit k, as (split, encoding, edge_f, edge_l, cloud_f, cloud_l, bytes)
        self.options: list[list[tuple]] = [[] for _ in range(K)]
        for k in range(K):
            end = ex_st[k] + 1
            if sequential:
                self.local_flops[k] = pred_f + cum_f[end] + heads(0, end, k, hf)
                self.local_layers[k] = pred_l + cum_l[end] + heads(0, end, k, hl)
            else:
                self.local_flops[k] = pred_f + cum_f[end] + hf[k]
                self.local_layers[k] = pred_l + cum_l[end] + hl[k]
            for s in range(0, end):
                for enc in self.encodings:
                    if (s, enc) not in payload_bytes:
                        continue
                    edge_f, edge_l = pred_f + cum_f[s], pred_l + cum_l[s]
                    cloud_f, cloud_l = cum_f[end] - cum_f[s] + hf[k], cum_l_c[end] - cum_l_c[s] + hl_c[k]
                    if sequential:  # heads before the split ran on the edge, the rest in the cloud
                        edge_f += heads(0, s, k, hf)
                        edge_l += heads(0, s, k, hl)
                        cloud_f += heads(s, end, k - 1, hf)
                        cloud_l += heads(s, end, k - 1, hl_c)
                    self.options[k].append((s, enc, edge_f, edge_l, cloud_f, cloud_l, float(payload_bytes[s, enc])))
        self._cache: dict[Conditions, OptionTable] = {}
        self._cloud_exit_cache: dict[Conditions, list[dict] | None] = {}  # per Conditions, like the option tables
        self.exit_prior: np.ndarray | None = None  # with_exit_prior
        self.early_stops: np.ndarray | None = None  # with_early_stops
        self._max_cached = max_cached

    # --- timing model -----------------------------------------------------------------------------------
    @staticmethod
    def device_ms(flops: float, layers: float, c: Conditions) -> float:
        return flops / (c.device_gflops * 1e6) + layers * c.device_layer / 1e3

    @staticmethod
    def cloud_ms(flops: float, layers: float, c: Conditions) -> float:
        return flops / (c.cloud_gflops * 1e6) + layers * c.cloud_layer / 1e3

    @staticmethod
    def network_ms(nbytes: float, c: Conditions) -> dict:
        """Expected transfer, propagation, jitter and retransmission delay of one request of `nbytes` (its
        serialized InferRequest; the framing around it is added here)."""
        if c.bandwidth_mbps <= 0:
            return {"transfer_ms": math.inf, "rtt_ms": c.rtt_ms, "jitter_ms": 0.0, "retransmit_ms": 0.0}
        wire = nbytes + REQUEST_FRAMING_BYTES
        packets = math.ceil(wire / MSS_BYTES) + 1  # request packets + the answer
        rto = max(MIN_RTO_MS, c.rtt_ms + 4 * c.jitter_ms)
        return {"transfer_ms": wire * 8 / (c.bandwidth_mbps * 1e3), "rtt_ms": c.rtt_ms,
                "jitter_ms": c.jitter_ms * HALF_NORMAL_MEAN, "retransmit_ms": (1 - (1 - c.loss) ** packets) * rto}

    def codec_scaled(self, split: int, enc: str, c: Conditions) -> tuple[float, float]:
        e, d = self.codec_ms.get((split, enc), (0.0, 0.0))
        return e * REF_GFLOPS / c.device_gflops, d * REF_GFLOPS / c.cloud_gflops

    def offload_parts(self, option: tuple, c: Conditions) -> dict:
        s, enc, edge_f, edge_l, cloud_f, cloud_l, nbytes = option
        enc_ms, dec_ms = self.codec_scaled(s, enc, c)
        parts = {"edge_ms": self.device_ms(edge_f, edge_l, c), "encode_ms": enc_ms, **self.network_ms(nbytes, c),
                 "queue_ms": c.cloud_queue_ms, "overhead_ms": c.cloud_overhead_ms, "decode_ms": dec_ms, "cloud_ms": self.cloud_ms(cloud_f, cloud_l, c),
                 "bytes": nbytes}
        parts["total_ms"] = sum(v for key, v in parts.items() if key.endswith("_ms"))
        return parts

    def option_table(self, c: Conditions) -> OptionTable:
        """Best placement for every exit under conditions `c` (cached)."""
        table = self._cache.get(c)
        if table is not None:
            return table
        K = self.costs.num_exits
        lat, split, enc, off, parts = np.zeros(K), np.zeros(K, dtype=int), [None] * K, np.zeros(K, dtype=bool), [None] * K
        local = self.answer_ms(c) if self.early_stops is None else self.early_stops @ self.answer_ms(c)
        for k in range(K):
            best = {"edge_ms": local[k], "total_ms": local[k]}
            lat[k], split[k] = local[k], self.costs.exit_stages[k] + 1
            for option in self.options[k]:
                p = self.offload_parts(option, c)
                if p["total_ms"] < lat[k]:
                    lat[k], split[k], enc[k], off[k], best = p["total_ms"], option[0], option[1], True, p
            parts[k] = best
        table = OptionTable(lat, split, enc, off, local, parts)
        if len(self._cache) >= self._max_cached:
            self._cache.clear()
        self._cache[c] = table
        return table

    def answer_ms(self, c: Conditions) -> np.ndarray:
        """(K,) device ms to answer each exit here (predictor included where it runs on the edge)."""
        return np.array([self.device_ms(f, l, c) for f, l in zip(self.local_flops, self.local_layers)])

    def cloud_exit_parts(self, c: Conditions) -> list[dict] | None:
        """Per exit, the latency parts of sending the image at once and letting the cloud run the predictor and
        the priced rule (InferRequest.cloud_exit); None when running the predictor on the edge first is faster.
        Without an exit prior that needs cloud-side picking to be at least as fast for *every* exit; with one
        (`with_exit_prior`: how often the rule picks each exit, e.g. on calibration images) it needs to be at least
        as fast in expectation: a slow device then stops paying for the predictor on every frame because a rare
        shallow exit would have been answered locally. Of the image encodings on the menu, the one fastest in
        expectation (uniform without a prior). Priced rule only, and not with an accuracy target or a latency
        budget (they need the scores here)."""
        pred_f, pred_l, pred_l_cloud = self._predictor_cost
        if self.price is None or pred_f == 0 or c.accuracy_target is not None or c.latency_budget_ms is not None:
            return None
        if c in self._cloud_exit_cache:
            return self._cloud_exit_cache[c]
        table = self.option_table(c)
        K = self.costs.num_exits
        weights = self.exit_prior if self.exit_prior is not None else np.full(K, 1.0 / K)
        best, best_ms = None, math.inf
        for enc in sorted({e for s, e in self.menu if s == 0}):
            parts = []
            for k in range(K):
                s, enc, edge_f, edge_l, cloud_f, cloud_l, nbytes = next(o for o in self.options[k] if o[:2] == (0, enc))
                p = self.offload_parts((s, enc, edge_f - pred_f, edge_l - pred_l, cloud_f + pred_f,
                                        cloud_l + pred_l_cloud, nbytes), c)
                parts.append({**p, "encoding": enc, "cloud_exit": True})
            total = np.array([p["total_ms"] for p in parts])
            used = weights > 0  # an exit the rule never picks must not make it 0 x inf
            expected = float(weights[used] @ total[used])
            faster = (total <= table.latency).all() if self.exit_prior is None else expected <= weights[used] @ table.latency[used]
            if faster and expected < best_ms:
                best, best_ms = parts, expected
        if len(self._cloud_exit_cache) >= self._max_cached:
            self._cloud_exit_cache.clear()
        self._cloud_exit_cache[c] = best
        return best

    def _copy(self, keep_setting: bool) -> "Planner":
        """A copy with fresh caches; the exit prior and early stops belong to one setting of one rule, so they are
        dropped unless keep_setting."""
        other = object.__new__(Planner)
        other.__dict__.update(self.__dict__)
        other._cache, other._cloud_exit_cache = {}, {}
        if not keep_setting:
            other.exit_prior = other.early_stops = None
        return other

    def with_exit_prior(self, prior: Sequence[float] | None) -> "Planner":
        """The same planner, weighing the cloud-side exit decision by how often the rule picks each exit (None:
        the decision must hold for every exit)."""
        other = self._copy(keep_setting=True)
        if prior is None:
            other.exit_prior = None
        else:
            w = np.asarray(prior, dtype=float)
            if w.shape != (self.costs.num_exits,) or (w < 0).any() or not w.sum() > 0:
                raise ValueError(f"an exit prior needs {self.costs.num_exits} non-negative weights, not all 0")
            other.exit_prior = w / w.sum()
        return other

    def with_calibration(self, planned: np.ndarray, stopped: np.ndarray | None = None) -> "Planner":
        """The same planner, told how its rule behaved on calibration images: `planned`, the exit the rule picked
        for each (the exit prior), and for the capped rule `stopped`, where each one actually answered (the early
        stops)."""
        K = self.costs.num_exits
        planned = np.asarray(planned, dtype=int)
        other = self.with_exit_prior(np.bincount(planned, minlength=K))
        if stopped is None:
            return other
        pairs = planned * K + np.asarray(stopped, dtype=int)
        return other.with_early_stops(np.bincount(pairs, minlength=K * K).reshape(K, K))

    def with_early_stops(self, counts: np.ndarray | None) -> "Planner":
        """The same planner for a rule whose frames may stop before the exit they were planned for (the capped
        rule: a confident exit on the way answers). counts[k, j]: how many frames planned for exit k stopped at
        exit j <= k (e.g. on calibration images). A local answer for exit k is then planned at the expected cost
        of where such frames stop, not at exit k's; a row without frames keeps exit k's own cost. None: none
        stop early."""
        other = self._copy(keep_setting=True)
        if counts is None:
            other.early_stops = None
            return other
        K = self.costs.num_exits
        m = np.asarray(counts, dtype=float)
        if m.shape != (K, K) or (m < 0).any() or np.triu(m, 1).any():
            raise ValueError(f"early stops need a ({K}, {K}) lower-triangular matrix of non-negative counts")
        empty = m.sum(1) == 0
        m[empty] = np.eye(K)[empty]
        other.early_stops = m / m.sum(1, keepdims=True)
        return other

    def cloud_exit_plan(self, c: Conditions) -> Plan | None:
        """The plan for a frame whose exit the cloud picks (see cloud_exit_parts), or None. Its exit_index is the
        deepest exit the cloud may pick; expected latency and accuracy are those of the exit the priced rule
        picks on the per-exit calibration accuracies (the scores are not known here)."""
        parts = self.cloud_exit_parts(c)
        if parts is None:
            return None
        typical = int(priced_exits(self.exit_accuracy[None, :], self.price, self.relative_costs)[0])
        breakdown = dict(parts[typical])
        return Plan(self.costs.num_exits - 1, 0, breakdown.pop("encoding"), True, float(breakdown["total_ms"]),
                    float(self.exit_accuracy[typical]), breakdown)

    # --- exit choice -------------------------------------------------------------------------------------
    def _probabilities(self, scores: np.ndarray | None, n: int) -> np.ndarray:
        if scores is None:
            return np.broadcast_to(self.exit_accuracy, (n, self.costs.num_exits))
        scores = np.asarray(scores, dtype=float)
        if scores.ndim != 2 or scores.shape[1] != self.costs.num_exits:
            raise ValueError(f"scores must have shape (N, {self.costs.num_exits}), got {scores.shape}")
        return scores

    def plan_exits(self, scores: np.ndarray | None, c: Conditions, n: int | None = None) -> np.ndarray:
        """Target exit per sample (vectorised; `plan` uses this on one row).

        Default: the planner's rule on the predictor's scores, priced (rapnet.exit_rules.priced_exits at
        self.price) or threshold (predictor_exits at self.threshold); no scores: the last exit. With an
        accuracy target: the shallowest exit predicted to reach it (= predictor_exits at the target). With a
        latency budget: that exit if its best placement fits the budget, else the best exit among those that
        fit by the same rule's measure (priced: score - price * cost; threshold: the predicted accuracy),
        the fastest exit when none fits.
        """
        n = n if scores is None else len(scores)
        K = self.costs.num_exits
        probs = self._probabilities(scores, n)
        if c.accuracy_target is not None:
            exits = predictor_exits(probs, c.accuracy_target)
        elif scores is not None and self.price is not None:
            exits = priced_exits(probs, self.price, self.relative_costs)
        elif scores is not None:
            exits = predictor_exits(probs, self.threshold)
        else:
            exits = np.full(n, K - 1)
        if c.latency_budget_ms is not None:
            table = self.option_table(c)
            fits = table.latency <= c.latency_budget_ms
            if not fits.all():
                if fits.any():
                    value = probs if self.price is None else probs - self.price * self.relative_costs[None, :]
                    masked = np.where(fits[None, :], value, -np.inf)
                    # the rule's best exit within the budget; ties -> the shallowest (cheapest) exit
                    fallback = masked.argmax(1)
                else:
                    fallback = np.full(n, int(table.latency.argmin()))
                exits = np.where(fits[exits], exits, fallback)
        return exits.astype(int)

    def plan(self, scores: np.ndarray | None, conditions: Conditions) -> Plan:
        """One frame: scores are the predictor's per-exit probabilities (None: no predictor)."""
        row = None if scores is None else np.asarray(scores, dtype=float).reshape(1, -1)
        k = int(self.plan_exits(row, conditions, n=1)[0])
        table = self.option_table(conditions)
        prob = float(self._probabilities(row, 1)[0, k])
        enc = table.encoding[k]
        split = int(table.split[k])
        accuracy = prob * self.agreement.get((split, enc), 1.0) if enc else prob
        breakdown = dict(table.parts[k])
        if conditions.latency_budget_ms is not None:
            breakdown["within_budget"] = bool(table.latency[k] <= conditions.latency_budget_ms)
        return Plan(k, split, enc, bool(table.offload[k]), float(table.latency[k]), accuracy, breakdown)

    # --- helpers for the baselines --------------------------------------------------------------------
    def plan_static(self, conditions: Conditions, exit_index: int | None = None) -> Plan:
        """A fixed exit (default: the last, i.e. a network without early exit), best split (Neurosurgeon)."""
        k = self.costs.num_exits - 1 if exit_index is None else exit_index
        table = self.option_table(conditions)
        return Plan(k, int(table.split[k]), table.encoding[k], bool(table.offload[k]), float(table.latency[k]),
                    float(self.exit_accuracy[k]), dict(table.parts[k]))

    def progressive_latency(self, exits: np.ndarray, split: int, encoding: str | None, c: Conditions) -> np.ndarray:
        """SPINN-style progressive inference with a fixed split: exits before the split are answered on the
        edge (it stops at the first confident one); later ones are computed in the cloud after sending the
        carry at `split`. Requires sequential=True (every head on the way runs). Expected ms per exit."""
        K = self.costs.num_exits
        out = np.zeros(K)
        for k in range(K):
            if self.costs.exit_stages[k] < split or encoding is None:
                out[k] = self.device_ms(self.local_flops[k], self.local_layers[k], c)
            else:
                option = next((o for o in self.options[k] if o[0] == split and o[1] == encoding), None)
                out[k] = math.inf if option is None else self.offload_parts(option, c)["total_ms"]
        return out[np.asarray(exits)]

    def plan_progressive(self, exit_distribution: np.ndarray, c: Conditions) -> tuple[int, str | None, float]:
        """The split and encoding minimising SPINN-style expected latency for a distribution over exits
        (e.g. the confidence rule's exits on calibration data). Returns (split, encoding, expected ms);
        split = num_stages and encoding None mean: all local."""
        p = np.asarray(exit_distribution, dtype=float)
        exits = np.arange(self.costs.num_exits)
        exits, p = exits[p > 0], p[p > 0] / p.sum()  # an exit never reached must not make it 0 x inf
        best = (self.num_stages, None, float(p @ self.progressive_latency(exits, self.num_stages, None, c)))
        for s in range(self.num_stages):
            for enc in self.encodings:
                if not any(o[0] == s and o[1] == enc for opts in self.options for o in opts):
                    continue
                ms = float(p @ self.progressive_latency(exits, s, enc, c))
                if ms < best[2]:
                    best = (s, enc, ms)
        return best

    def with_threshold(self, threshold: float) -> "Planner":
        """The same planner with the threshold rule at `threshold`."""
        other = self._copy(keep_setting=False)
        other.threshold, other.price = check_threshold(threshold), None
        return other

    def with_price(self, price: float) -> "Planner":
        """The same planner with the priced rule at `price`."""
        price = check_price(price)
        other = self._copy(keep_setting=self.price is not None and price == self.price)
        other.threshold, other.price = None, price
        return other

    @property
    def menu(self) -> set[tuple[int, str]]:
        """The (split, encoding) pairs this planner may send."""
        return {(o[0], o[1]) for options in self.options for o in options}

    @property
    def rule(self) -> str:
        return "threshold" if self.price is None else "price"
