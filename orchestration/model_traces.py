"""One model's per-sample behaviour (ModelTraces) and the trace cache file it lives in.

orchestration.traces builds the cache by running the models (slow, once); the simulator replays it, and the
edge's planner calibrates from it (orchestration.calibration).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rapnet.costs import CostTable

from .planner import LayerCounts

# The runtimes an edge device runs the model on (edge-agent --runtime): ONNX Runtime, one call per graph (a stage, a
# head, the predictor; rapnet.execution.OnnxRuntime), or eager PyTorch, one call per leaf layer (as traced).
DEVICE_RUNTIMES = ("onnx", "torch")
PER_SAMPLE_FIELDS = ("correct", "confidence", "scores", "cal_correct", "cal_confidence", "cal_scores",
                     "jpeg_correct", "jpeg_confidence", "jpeg_scores", "heldout_correct", "heldout_confidence",
                     "heldout_scores", "heldout_jpeg_correct", "heldout_jpeg_confidence", "heldout_jpeg_scores")


@dataclass
class ModelTraces:
    """One model's per-sample behaviour on the test set (and on the calibration split, for thresholds)."""

    name: str
    identity: str
    costs: CostTable
    stage_layers: tuple[int, ...]
    exit_layers: tuple[int, ...]
    predictor_layers: int
    correct: np.ndarray  # (N, K) bool
    confidence: np.ndarray  # (N, K)
    scores: np.ndarray | None  # (N, K) predictor probabilities (RAPNet only)
    cal_correct: np.ndarray | None = None
    cal_confidence: np.ndarray | None = None
    cal_scores: np.ndarray | None = None
    # (split, encoding) -> per-sample len(InferRequest.SerializeToString()) over the payload subset
    payload: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    encode_ms: dict[tuple[int, str], float] = field(default_factory=dict)  # median, this machine, batch 1
    decode_ms: dict[tuple[int, str], float] = field(default_factory=dict)
    # (split, encoding) -> share of payload-subset samples whose answer at every exit >= split is unchanged
    agreement: dict[tuple[int, str], float] = field(default_factory=dict)
    # The same on the image after a JPEG q90 round trip (what the cloud sees when the image travels as JPEG):
    jpeg_correct: np.ndarray | None = None  # (N, K)
    jpeg_confidence: np.ndarray | None = None  # (N, K)
    jpeg_scores: np.ndarray | None = None  # (N, K), RAPNet only: the predictor run in the cloud on the JPEG image
    # (N_val, K) answers on the whole held-out validation split (never trained on; the predictor plays no part in
    # an exit's answer), losslessly and from JPEG: they decide whether JPEG may go on the planner's menu. With the
    # confidences and predictor scores on both views they tune the exit rules for JPEG images (calibrate_for_jpeg;
    # the predictor was fitted on 80% of these images, which flatters both views alike)
    heldout_correct: np.ndarray | None = None
    heldout_confidence: np.ndarray | None = None
    heldout_scores: np.ndarray | None = None
    heldout_jpeg_correct: np.ndarray | None = None
    heldout_jpeg_confidence: np.ndarray | None = None
    heldout_jpeg_scores: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return len(self.correct)

    def layer_counts(self, runtime: str = "torch") -> LayerCounts:
        """The calls per stage, exit head and predictor on `runtime` (DEVICE_RUNTIMES), the planner's per-call term."""
        if runtime == "torch":
            return LayerCounts(self.stage_layers, self.exit_layers, self.predictor_layers)
        if runtime == "onnx":
            return LayerCounts((1,) * len(self.stage_layers), (1,) * len(self.exit_layers), int(self.predictor_layers > 0))
        raise ValueError(f"unknown device runtime {runtime!r}: one of {', '.join(DEVICE_RUNTIMES)}")

    def mean_payload(self) -> dict[tuple[int, str], int]:
        return {key: int(round(float(v.mean()))) for key, v in self.payload.items()}

    def jpeg_accuracy_drop(self) -> float | None:
        """The accuracy lost when the image travels as JPEG, averaged over the exits, on the held-out validation
        split (None: not measured). Agreement is the wrong test for JPEG images: it asks every exit to keep every
        answer at once, which a 7-exit network fails on 9-15% of images while its exits lose ~0.2 point. The
        average, on 5,000 images: a per-exit maximum on them is mostly the largest of seven noises (~0.3 point
        each)."""
        if self.heldout_jpeg_correct is None or self.heldout_correct is None:
            return None
        return float((self.heldout_correct.mean(0) - self.heldout_jpeg_correct.mean(0)).mean())

    def menu(self, min_agreement: float, max_jpeg_drop: float) -> tuple[dict[tuple[int, str], int], dict]:
        """What the planner may send, as (mean request bytes, agreement) per (split, encoding). A lossy feature
        encoding goes on the menu when it leaves >= min_agreement of the answers unchanged. A JPEG image goes on
        when its exits lose at most max_jpeg_drop of accuracy on average (jpeg_accuracy_drop: labelled held-out
        data, never the test set); its agreement entry then holds the worst exit's accuracy ratio there, which is
        what the planner scales a plan's expected accuracy by."""
        agreement = dict(self.agreement)
        drop = self.jpeg_accuracy_drop()
        if (0, "jpeg") in agreement and drop is not None and drop <= max_jpeg_drop:
            lossless, jpeg = self.heldout_correct.mean(0), self.heldout_jpeg_correct.mean(0)
            ratio = np.divide(jpeg, lossless, out=np.ones_like(lossless), where=lossless > 0)  # never right: none lost
            agreement[0, "jpeg"] = float(min(1.0, ratio.min()))
        else:
            agreement.pop((0, "jpeg"), None)
        allowed = {key: v for key, v in self.mean_payload().items()
                   if key in agreement and (key == (0, "jpeg") or agreement[key] >= min_agreement)}
        return allowed, agreement


def save_traces(traces: dict[str, ModelTraces], path: Path, meta: dict) -> None:
    arrays: dict[str, np.ndarray] = {}
    info = {"meta": meta, "models": {}}
    for name, t in traces.items():
        m = {"identity": t.identity, "costs": t.costs.to_dict(), "stage_layers": list(t.stage_layers),
             "exit_layers": list(t.exit_layers), "predictor_layers": t.predictor_layers,
             "payload_keys": [[s, e] for s, e in t.payload],
             "encode_ms": [[s, e, v] for (s, e), v in t.encode_ms.items()],
             "decode_ms": [[s, e, v] for (s, e), v in t.decode_ms.items()],
             "agreement": [[s, e, v] for (s, e), v in t.agreement.items()]}
        info["models"][name] = m
        for field_name in PER_SAMPLE_FIELDS:
            value = getattr(t, field_name)
            if value is not None:
                arrays[f"{name}.{field_name}"] = value
        for (s, e), v in t.payload.items():
            arrays[f"{name}.payload.{s}.{e}"] = v
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, info=np.array(json.dumps(info)), **arrays)
    tmp.replace(path)


def load_traces(path: Path) -> tuple[dict[str, ModelTraces], dict]:
    with np.load(path, allow_pickle=False) as z:
        info = json.loads(str(z["info"]))
        arrays = {k: z[k] for k in z.files if k != "info"}
    traces = {}
    for name, m in info["models"].items():
        c = m["costs"]
        costs = CostTable(
            tuple(c["stage_flops"]), tuple(c["exit_flops"]), tuple(c["exit_stages"]), c["predictor_flops"],
            tuple(tuple(k) for k in c["split_keys"]), tuple(tuple(tuple(s) for s in ss) for ss in c["split_shapes"]),
            tuple(c["split_fp32_bytes"]))
        def get(field_name: str):  # correctness is stored as bool; absent arrays (caches written without them, SDN scores) are None
            value = arrays.get(f"{name}.{field_name}")
            return value.astype(bool) if value is not None and field_name.endswith("correct") else value

        traces[name] = ModelTraces(
            name=name, identity=m["identity"], costs=costs, stage_layers=tuple(m["stage_layers"]),
            exit_layers=tuple(m["exit_layers"]), predictor_layers=m["predictor_layers"],
            payload={(s, e): arrays[f"{name}.payload.{s}.{e}"] for s, e in m["payload_keys"]},
            encode_ms={(s, e): v for s, e, v in m["encode_ms"]}, decode_ms={(s, e): v for s, e, v in m["decode_ms"]},
            agreement={(s, e): v for s, e, v in m["agreement"]},
            **{f: get(f) for f in PER_SAMPLE_FIELDS},
        )
    return traces, info["meta"]
