"""Per-sample traces the simulator replays: what each model answers at each exit, the predictor's scores,
the cost table, layer counts (for the device profile) and the real serialized request sizes.

Everything expensive (running the models over the test set) happens once here and is cached in
runs/sim_traces.npz, keyed by the checkpoints' identities and the dataset, so replacing a checkpoint and
running `rapnet-sim sweep` again rebuilds exactly what changed hands (one command).
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rapnet.codec.menu import LOSSLESS, encode_options, encodings_for_split
from rapnet.costs import CostTable

# 3: raw+zstd images at split 0; 4: every model's answers on JPEG images (test, held-out split); 5: confidences
# and predictor scores on the held-out split too, where the exit rules for JPEG images are tuned
TRACE_VERSION = 5
MODEL_NAMES = ("rapnet", "sdn", "static")
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / "runs" / "sim_traces.npz"

PER_SAMPLE_FIELDS = ("correct", "confidence", "scores", "cal_correct", "cal_confidence", "cal_scores",
                     "jpeg_correct", "jpeg_confidence", "jpeg_scores", "heldout_correct", "heldout_confidence",
                     "heldout_scores", "heldout_jpeg_correct", "heldout_jpeg_confidence", "heldout_jpeg_scores")


def leaf_layers(module: torch.nn.Module) -> int:
    """Leaf modules a call executes (conv, BN, activation, ...): the per-layer-call term of the device model."""
    return sum(1 for m in module.modules() if not list(m.children()))


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


# --------------------------------------------------------------------------------------------------------
# Building (runs the real models; slow, cached)
# --------------------------------------------------------------------------------------------------------


def _cache_key(identities: dict[str, str], data_path: str, payload_n: int) -> str:
    blob = json.dumps({"v": TRACE_VERSION, "ids": identities, "data": data_path, "payload_n": payload_n}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_identities(checkpoints: dict[str, Path]) -> dict[str, str]:
    from rapnet.checkpoint import read_checkpoint

    return {name: read_checkpoint(path)["identity"] for name, path in checkpoints.items()}


@torch.no_grad()
def _payloads(model, name: str, pixels: np.ndarray, log) -> tuple[dict, dict, dict, dict]:
    """Real request sizes per sample, encode/decode time, and lossy-encoding agreement, per split x encoding."""
    from rapnet import codec
    from rapnet.preprocess import to_model_input

    contract = codec.ModelContract.from_model(model)
    x = to_model_input(pixels)
    payload, enc_ms, dec_ms, agreement = {}, {}, {}, {}
    reference = [z.argmax(1) for z in model(x)]
    for split in range(model.num_stages):
        carry = model.edge_part(x, split)
        last = model.num_exits - 1
        first = next(k for k, st in enumerate(model.exit_stages) if st >= split)
        for encoding in encodings_for_split(split):
            options = encode_options(encoding)
            sizes, t_enc, t_dec, decoded = [], [], [], []
            for i in range(len(pixels)):
                one = {k: v[i : i + 1] for k, v in carry.items()}
                t0 = time.perf_counter()
                req = codec.build_request(contract, one, split, last, options, image=pixels[i])
                data = req.SerializeToString()
                t1 = time.perf_counter()
                parsed = codec.parse_request_bytes(data, contract)
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
                batch = {k: torch.cat([d[k] for d in decoded]) for k in decoded[0]}
                same = np.ones(len(pixels), dtype=bool)
                for k in range(first, model.num_exits):
                    same &= (model.cloud_part(batch, split, k).argmax(1) == reference[k]).numpy()
                agreement[key] = float(same.mean())
            else:
                agreement[key] = 1.0
        log(f"  {name} split {split}: " + ", ".join(
            f"{e} {payload[split, e].mean():.0f} B (agree {agreement[split, e]:.3f})" for e in encodings_for_split(split)))
    return payload, enc_ms, dec_ms, agreement


def jpeg_round_trip(images: np.ndarray, quality: int = 90) -> np.ndarray:
    """The pixels the cloud decodes when each image travels as JPEG (the wire codec, batch of uint8 NHWC)."""
    from rapnet import codec

    return np.stack([codec.decode_image(codec.encode_image(p, "jpeg", quality)) for p in images])


def heldout_jpeg_test(model, meta: dict, train):
    """Every exit's answers (rapnet.evaluate.Traces) on the model's whole held-out validation split, losslessly and
    from JPEG q90."""
    from rapnet.data import train_val_split
    from rapnet.evaluate import collect_traces

    split = meta.get("split", {})
    _, held = train_val_split(len(train), split.get("val", 5000), seed=meta.get("seed", 0))
    images, labels = train.images[held], train.labels[held]
    return collect_traces(model, images, labels), collect_traces(model, jpeg_round_trip(images), labels)


def build_traces(checkpoints: dict[str, Path], data: str | None = None, payload_n: int = 500,
                 out: Path = DEFAULT_CACHE, log=print) -> dict[str, ModelTraces]:
    """Run every model over the test set (and the calibration split) and write the cache."""
    from rapnet.checkpoint import load_model
    from rapnet.costs import measure_costs
    from rapnet.data import load_dataset, locate_dataset
    from rapnet.evaluate import calibration_indices, collect_traces

    torch.set_num_threads(1)
    data_path = locate_dataset(data, "cifar10")
    test = load_dataset(data_path, "test")
    train = load_dataset(data_path, "train")
    traces: dict[str, ModelTraces] = {}
    identities = {}
    for name, path in checkpoints.items():
        started = time.time()
        model, meta = load_model(path)
        model.eval()
        identities[name] = meta["identity"]
        cal_idx = calibration_indices(len(train), meta, has_predictor=model.predictor is not None)  # as rapnet-eval
        log(f"{name}: test traces ({len(test)} images)")
        t = collect_traces(model, test.images, test.labels)
        c = collect_traces(model, train.images[cal_idx], train.labels[cal_idx])
        payload, enc_ms, dec_ms, agreement = _payloads(model, name, test.images[:payload_n], log)
        jt = collect_traces(model, jpeg_round_trip(test.images), test.labels)
        held, held_jpeg = heldout_jpeg_test(model, meta, train)
        traces[name] = ModelTraces(
            name=name, identity=meta["identity"], costs=measure_costs(model),
            stage_layers=tuple(leaf_layers(s) for s in model.stages),
            exit_layers=tuple(leaf_layers(e) for e in model.exits),
            predictor_layers=leaf_layers(model.predictor) if model.predictor is not None else 0,
            correct=t.correct, confidence=t.confidence.astype(np.float32), scores=None if t.scores is None else t.scores.astype(np.float32),
            cal_correct=c.correct, cal_confidence=c.confidence.astype(np.float32),
            cal_scores=None if c.scores is None else c.scores.astype(np.float32),
            payload=payload, encode_ms=enc_ms, decode_ms=dec_ms, agreement=agreement,
            jpeg_correct=jt.correct, jpeg_confidence=jt.confidence.astype(np.float32),
            jpeg_scores=None if jt.scores is None else jt.scores.astype(np.float32),
            heldout_correct=held.correct, heldout_confidence=held.confidence.astype(np.float32),
            heldout_scores=None if held.scores is None else held.scores.astype(np.float32),
            heldout_jpeg_correct=held_jpeg.correct, heldout_jpeg_confidence=held_jpeg.confidence.astype(np.float32),
            heldout_jpeg_scores=None if held_jpeg.scores is None else held_jpeg.scores.astype(np.float32),
        )
        log(f"{name}: done in {time.time() - started:.0f} s")
    key = _cache_key(identities, str(data_path), payload_n)
    save_traces(traces, out, {"key": key, "data": str(data_path), "payload_n": payload_n,
                              "checkpoints": {k: str(v) for k, v in checkpoints.items()}, "identities": identities})
    return traces


# --------------------------------------------------------------------------------------------------------
# Cache file
# --------------------------------------------------------------------------------------------------------


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
        def get(field_name: str):  # correctness is stored as bool; absent arrays (older caches, SDN scores) are None
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


def default_checkpoints(models_dir: str | Path | None = None) -> dict[str, Path]:
    """The three models' checkpoints in `models_dir`, or the shipped ones (rapnet.shipped) when None."""
    from rapnet.shipped import default_checkpoints as shipped

    return {name: path for name, path in shipped("cifar10", models_dir).items() if name in MODEL_NAMES}


def ensure_traces(checkpoints: dict[str, Path], data: str | None = None, cache: Path = DEFAULT_CACHE,
                  payload_n: int = 500, rebuild: bool = False, log=print) -> tuple[dict[str, ModelTraces], dict]:
    """Load the cached traces if they were made from these checkpoints (identity) and data; rebuild otherwise."""
    from rapnet.data import locate_dataset

    missing = [str(p) for p in checkpoints.values() if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoints not found: {', '.join(missing)} (train them with rapnet-train, or pass --models DIR)")
    identities = checkpoint_identities(checkpoints)
    key = _cache_key(identities, str(locate_dataset(data, "cifar10")), payload_n)
    if not rebuild and Path(cache).exists():
        traces, meta = load_traces(cache)
        if meta.get("key") == key:
            return traces, meta
        log(f"{cache} was made from other checkpoints or data: rebuilding")
    log(f"building simulator traces into {cache} (runs every model over the test set once; minutes on CPU)")
    build_traces(checkpoints, data, payload_n, cache, log)
    return load_traces(cache)
