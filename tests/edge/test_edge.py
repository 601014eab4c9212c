"""edge-agent against the real cloud tier (Ray Serve + gRPC front) on 127.0.0.1, one Ray instance per module.

The model is a small untrained RAPNet built here; the labelled data is an ImageFolder tree of PNGs written
here, so nothing from ../shared is needed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ray = pytest.importorskip("ray")

from cloud.security import make_dev_cert  # noqa: E402
from cloud.security import TLSFiles  # noqa: E402
from cloud.server import start_local  # noqa: E402
from edge import agent as edge_agent  # noqa: E402
from edge.config import AgentSettings, DecisionSettings  # noqa: E402
from edge.decide import build_decider  # noqa: E402
from edge.frames import CaptureSource, DatasetSource, Frame, Source, fit_image  # noqa: E402
from edge.link import CircuitBreaker, CloudTarget, NetworkEstimate  # noqa: E402
from edge.pipeline import EdgeAgent  # noqa: E402
from edge.runtime import open_runtime  # noqa: E402
from rapnet.build import build_model  # noqa: E402
from rapnet.checkpoint import load_model, save_checkpoint  # noqa: E402
from rapnet.config import ModelConfig  # noqa: E402
from rapnet.costs import measure_costs  # noqa: E402
from orchestration.planner import DEFAULT_PRICE  # noqa: E402
from rapnet.exit_rules import predictor_exits, priced_exits, relative_exit_costs  # noqa: E402
from rapnet.preprocess import to_model_array, to_model_input  # noqa: E402

TOKEN = "edge-test-token-" + "y" * 24
N_FRAMES = 48
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="rapnet-edge-test-"))
    old = os.environ.get("RAPNET_CACHE")
    os.environ["RAPNET_CACHE"] = str(d / "cache")
    yield d
    if old is None:
        os.environ.pop("RAPNET_CACHE", None)
    else:
        os.environ["RAPNET_CACHE"] = old
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def checkpoint(workdir):
    torch.manual_seed(0)
    # A small layout with four early exits: this untrained model's predictor scores straddle the offload boundary
    # on the test frames, which the mixed-policy fixtures below need.
    model = build_model(ModelConfig(width=0.35, fusion_stride=4, rapnet_exit_fractions=(0.05, 0.1, 0.45, 0.7))).eval()
    path = workdir / "rapnet-small.pt"
    save_checkpoint(path, model, {"classes": [f"class{i}" for i in range(10)]})  # the `dataset` fixture's folders
    return str(path)


@pytest.fixture(scope="module")
def dataset(workdir, checkpoint):
    """ImageFolder tree root/test/class<k>/<n>.png, 48x40 (not square: the agent must fit it to 32x32).
    Labels: the untrained model's own last-exit answer for half the images, another class for the rest, so
    accuracy is neither 0 nor 1."""
    model, _ = load_model(checkpoint)
    rng = np.random.default_rng(0)
    root = workdir / "tiny"
    for c in range(10):
        (root / "test" / f"class{c}").mkdir(parents=True)
    for i in range(N_FRAMES):
        rgb = np.clip(rng.normal(120, 60, (40, 48, 3)) + rng.integers(-80, 80, 3), 0, 255).astype(np.uint8)
        with torch.no_grad():
            pred = int(model.run_to_exit(to_model_input(fit_image(rgb, 32)), model.num_exits - 1).argmax(1)[0])
        label = pred if i % 2 == 0 else (pred + 1 + i % 9) % 10
        cv2.imwrite(str(root / "test" / f"class{label}" / f"{i:03d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return str(root)


@pytest.fixture(scope="module")
def cloud(ray_instance, checkpoint):
    server = start_local(checkpoint, port=0, token=TOKEN)
    yield server
    server.stop()


@pytest.fixture
def token_env(monkeypatch):
    monkeypatch.setenv("RAPNET_TOKEN", TOKEN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# Fixed conditions under which the small model answers its shallow exits on the device and offloads the deepest
# ones as lossless features at a split >= 1, on either runtime (checked by `mixed_threshold` on the agent's
# runtime). The planner's per-call term counts the runtime's calls (a graph in ONNX Runtime, a leaf layer in eager
# PyTorch), so the same speed makes ONNX Runtime's device several times faster: at 10 GFLOP/s it answers even the
# last exit locally sooner than the round trip, at 1 GFLOP/s the two deepest exits go out on both runtimes.
# A generous deadline: on a loaded 2-core machine a healthy cloud call can take seconds, and only the tests
# about deadlines (which pass their own --deadline-ms later on the command line) may see one expire.
POLICY = ["--fixed-network", "--bandwidth-mbps", "100", "--rtt-ms", "1", "--device-gflops", "1",
          "--encoding", "fp32+zstd", "--calibration-frames", "8", "--deadline-ms", "30000", "--quiet"]


def _mixed_setting(checkpoint, dataset, exits_for, candidates):
    """The candidate setting of an exit rule at which the small untrained model's policy both answers
    locally and offloads on the test frames (chosen with the same planner the agent builds, on its runtime)."""
    loaded = open_runtime(checkpoint)  # the agent's default runtime
    model = loaded.runtime
    frames = list(DatasetSource(dataset, model.config.image_size))
    pixels = np.stack([f.pixels for f in frames])
    settings = DecisionSettings(device_gflops=1.0, bandwidth_mbps=100.0, rtt_ms=1.0, fixed_network=True,
                                encodings=("fp32+zstd",))
    decider = build_decider(model, pixels[:8], settings, loaded.metadata)
    scores = model.exit_scores(to_model_array(pixels))
    table = decider.planner.option_table(decider.conditions())
    assert table.offload.any() and not table.offload.all(), f"conditions give no mix: {table.offload}"
    best, best_mix = None, -1
    for t in candidates(scores):
        off = table.offload[exits_for(scores, t, decider.planner)]
        mix = min(off.sum(), (~off).sum())
        if mix > best_mix:
            best, best_mix = float(t), mix
    assert best_mix >= 3, "no setting gives both local and offloaded frames"
    return best


@pytest.fixture(scope="module")
def mixed_threshold(checkpoint, dataset):
    """Threshold rule (--threshold): a threshold giving both local answers and offloads."""
    return _mixed_setting(checkpoint, dataset, lambda s, t, planner: predictor_exits(s, t),
                          lambda s: np.unique(np.round(np.quantile(s, np.linspace(0.02, 0.98, 49)), 4)))


@pytest.fixture(scope="module")
def mixed_price(checkpoint, dataset):
    """Priced rule (--price, the default rule): a price giving both local answers and offloads."""
    return _mixed_setting(checkpoint, dataset, lambda s, q, planner: priced_exits(s, q, planner.relative_costs),
                          lambda s: np.round(np.linspace(0.0, 0.5, 51), 4))


def run_agent(argv, stopper=None):
    """build_app + run_app in-process (the CLI's own path); returns the app (summary, decider...)."""
    app = edge_agent.build_app(argv)
    watcher = None
    if stopper is not None:
        watcher = threading.Thread(target=stopper, args=(app,), daemon=True)
        watcher.start()
    try:
        edge_agent.run_app(app)
    finally:
        edge_agent.close_app(app)
    if watcher is not None:
        watcher.join(timeout=30)
    return app


# ------------------------------------------------------------------------------------------------------
# Units
# ------------------------------------------------------------------------------------------------------


def test_circuit_breaker_opens_probes_and_closes():
    now = [0.0]
    b = CircuitBreaker(failures=2, cooldown_s=1.0, clock=lambda: now[0])
    assert b.allow()
    b.failure()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open" and not b.allow() and b.trips == 1
    now[0] = 1.1
    assert b.allow() and b.state == "half-open"
    assert not b.allow()  # one probe at a time
    b.failure()  # probe failed: open again, cooldown doubled
    assert b.state == "open" and b.trips == 2
    now[0] = 2.2
    assert not b.allow()
    now[0] = 3.2
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()


def test_network_estimate_separates_server_time():
    est = NetworkEstimate(bandwidth_mbps=10, rtt_ms=50)
    est.update(nbytes=100, round_trip_ms=12.0, server_ms=10.0, queue_ms=4.0)  # tiny request: ~2 ms propagation
    est.update(nbytes=125_000, round_trip_ms=22.0, server_ms=10.0, queue_ms=4.0)  # 1 Mbit in 10 ms beyond RTT
    snap = est.snapshot()
    assert snap["rtt_ms"] == pytest.approx(2.0)
    assert 20 < snap["bandwidth_mbps"] < 100 and snap["cloud_queue_ms"] == pytest.approx(4.0)


def test_network_estimate_forgets_stale_measurements():
    now = [0.0]
    est = NetworkEstimate(bandwidth_mbps=50, rtt_ms=5, stale_s=2.0, half_life_s=1.0, clock=lambda: now[0])
    est.update(nbytes=1000, round_trip_ms=300.0, server_ms=100.0, queue_ms=80.0)  # a cloud under load
    assert est.snapshot()["rtt_ms"] == pytest.approx(200.0)
    now[0] = 3.0  # one half-life past stale
    snap = est.snapshot()
    assert snap["rtt_ms"] == pytest.approx(5 + 195 / 2) and snap["cloud_queue_ms"] == pytest.approx(40.0)
    now[0] = 30.0
    assert est.snapshot()["rtt_ms"] == pytest.approx(5.0, abs=1e-3)


def test_cloud_target_never_shows_token():
    target = CloudTarget("127.0.0.1:1", token=TOKEN)
    assert TOKEN not in repr(target) and TOKEN not in str(target)


class _FastLive(Source):
    live = True

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        rng = np.random.default_rng(0)
        for i in range(self.n):
            time.sleep(0.0001)  # a 10 000 fps camera: always faster than the agent (a 1 ms period may not be)
            yield Frame(i, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), time.perf_counter())


@pytest.mark.slow
def test_live_source_latest_frame_wins_and_counts_drops(checkpoint):
    model, metadata = load_model(checkpoint)
    decider = build_decider(model, np.zeros((2, 32, 32, 3), np.uint8),
                            DecisionSettings(device_gflops=1.0, fixed_network=True), metadata)
    agent = EdgeAgent(model, metadata["identity"], decider, None, AgentSettings())
    results = list(agent.run(_FastLive(200)))
    c = agent.counters
    assert c.captured == 200 and c.dropped > 0
    assert len(results) + c.dropped == c.captured  # every frame is either answered or counted as dropped
    assert [r.frame for r in results] == list(range(len(results)))
    assert all(r.where == "edge" and not r.degraded for r in results)

@pytest.mark.slow
def test_cloud_overhead_is_a_fixed_network_prior(checkpoint):
    model, metadata = load_model(checkpoint)
    pixels = np.zeros((2, 32, 32, 3), np.uint8)
    fixed = build_decider(model, pixels, DecisionSettings(cloud_overhead_ms=6.0, fixed_network=True), metadata)
    assert fixed.conditions(bandwidth_mbps=3.0, rtt_ms=40.0).cloud_overhead_ms == 6.0
    # a live estimate already holds the overhead (its RTT is the round trip minus the server's own time)
    live = build_decider(model, pixels, DecisionSettings(cloud_overhead_ms=6.0), metadata)
    assert live.conditions(bandwidth_mbps=3.0, rtt_ms=40.0).cloud_overhead_ms == 0.0
    with pytest.raises(edge_agent.SetupError, match="--cloud-overhead-ms"):
        edge_agent.build_app(["--images", ".", "--cloud-overhead-ms", "-1"])


@pytest.mark.slow
def test_decider_rule_price_by_default_threshold_on_request(checkpoint, dataset):
    model, metadata = load_model(checkpoint)
    pixels = np.stack([f.pixels for f in DatasetSource(dataset, model.config.image_size)])
    settings = DecisionSettings(device_gflops=10.0, fixed_network=True, encodings=("fp32+zstd",))
    decider = build_decider(model, pixels[:4], settings, metadata)
    assert decider.rule == "price" and decider.price == DEFAULT_PRICE and decider.threshold is None
    with torch.no_grad():
        scores = model.exit_scores(to_model_input(pixels)).numpy()
    c = decider.conditions()
    rel = relative_exit_costs(decider.planner.costs)
    assert [decider.plan(s, c).exit_index for s in scores] == priced_exits(scores, DEFAULT_PRICE, rel).tolist()
    assert build_decider(model, pixels[:4], settings, {**metadata, "price": 0.3}).price == 0.3  # the checkpoint's
    priced = build_decider(model, pixels[:4], DecisionSettings(price=0.0, fixed_network=True), {**metadata, "price": 0.3})
    assert priced.price == 0.0 and [priced.plan(s, c).exit_index for s in scores] == scores.argmax(1).tolist()
    thresholded = build_decider(model, pixels[:4], DecisionSettings(threshold=0.5, fixed_network=True), metadata)
    assert thresholded.rule == "threshold" and thresholded.price is None
    assert [thresholded.plan(s, c).exit_index for s in scores] == predictor_exits(scores, 0.5).tolist()
    with pytest.raises(ValueError):
        build_decider(model, pixels[:4], DecisionSettings(price=0.1, threshold=0.5), metadata)
    with pytest.raises(SystemExit):  # --price and --threshold are exclusive
        edge_agent.build_parser().parse_args(["--dataset", dataset, "--price", "0.1", "--threshold", "0.5"])


@pytest.mark.slow
def test_device_speed_is_measured_unless_given(checkpoint, dataset):
    """--device-gflops auto (the default): the speed at which the planner's device model predicts the measured time
    of the predictor plus the whole network; a given speed is used as it is."""
    from edge.decide import measure_device_gflops
    from orchestration.planner import Conditions

    model, metadata = load_model(checkpoint)
    pixels = np.stack([f.pixels for f in DatasetSource(dataset, model.config.image_size)])[:4]
    decider = build_decider(model, pixels, DecisionSettings(device_gflops=None), metadata)
    assert 0.05 < decider.settings.device_gflops < 5000  # loose: this machine's load varies
    gflops, ms = measure_device_gflops(model, decider.planner, pixels[0])
    costs, layers = decider.planner.costs, decider.planner.layers
    flops = costs.predictor_flops + sum(costs.stage_flops) + costs.exit_flops[-1]
    calls = layers.predictor_layers + sum(layers.stage_layers) + layers.exit_layers[-1]
    c = Conditions(bandwidth_mbps=0, rtt_ms=0, device_gflops=gflops)
    assert decider.planner.device_ms(flops, calls, c) == pytest.approx(ms)
    assert build_decider(model, pixels, DecisionSettings(device_gflops=2.5), metadata).settings.device_gflops == 2.5
    gflops, ms = measure_device_gflops(model, decider.planner, pixels[0], layer_us=1.0)  # a given per-layer cost
    c = Conditions(bandwidth_mbps=0, rtt_ms=0, device_gflops=gflops, device_layer_us=1.0)
    assert decider.planner.device_ms(flops, calls, c) == pytest.approx(ms)
    with pytest.raises(ValueError, match="layer calls alone"):
        measure_device_gflops(model, decider.planner, pixels[0], layer_us=1e6)
    parser = edge_agent.build_parser()
    assert parser.parse_args(["--dataset", dataset]).device_gflops is None
    assert parser.parse_args(["--dataset", dataset, "--device-gflops", "auto"]).device_gflops is None
    assert parser.parse_args(["--dataset", dataset, "--device-gflops", "2"]).device_gflops == 2.0
    for bad in ("0", "-1", "fast", "inf"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--dataset", dataset, "--device-gflops", bad])
    with pytest.raises(edge_agent.SetupError, match="--device-gflops G"):
        edge_agent.build_app(["--dataset", dataset, "--checkpoint", checkpoint, "--emulate-device"])


@pytest.mark.slow
def test_decider_learns_the_rules_exits_and_early_stops_from_its_calibration_frames(checkpoint, dataset):
    """The planner behind the agent weighs the cloud-side exit by the rule's exits on the calibration frames and,
    for the capped rule, plans each cap at where those frames stopped (rapnet.exit_rules.capped_exits)."""
    from rapnet.exit_rules import capped_exits

    model, metadata = load_model(checkpoint)
    pixels = np.stack([f.pixels for f in DatasetSource(dataset, model.config.image_size)])[:16]
    with torch.no_grad():
        x = to_model_input(pixels)
        scores = model.exit_scores(x).numpy()
        confidence = torch.stack([torch.softmax(z, 1).max(1).values for z in model(x)], 1).numpy()
    K = model.num_exits
    priced = build_decider(model, pixels, DecisionSettings(price=0.0), metadata)
    caps = priced_exits(scores, 0.0, priced.planner.relative_costs)
    np.testing.assert_allclose(priced.planner.exit_prior, np.bincount(caps, minlength=K) / len(caps), atol=1e-6)
    assert priced.planner.early_stops is None
    stop = float(np.median(confidence))
    capped = build_decider(model, pixels, DecisionSettings(price=0.0, stop_confidence=stop), metadata)
    stops = capped_exits(scores, confidence, 0.0, stop, capped.planner.relative_costs)
    for cap in set(caps.tolist()):
        expected = np.bincount(stops[caps == cap], minlength=K) / (caps == cap).sum()
        np.testing.assert_allclose(capped.planner.early_stops[cap], expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# End to end over the real cloud on loopback (the tests that start it, Ray included, are marked slow)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_equals_offline_policy(cloud, checkpoint, dataset, mixed_price, workdir, token_env, capsys):
    out = workdir / "e2e.jsonl"
    app = run_agent(["--dataset", dataset, "--checkpoint", checkpoint, "--cloud", cloud.address, *POLICY,
                     "--price", str(mixed_price), "--output", str(out)])
    assert app.decider.rule == "price" and app.summary["price"] == mixed_price
    lines = read_lines(out)
    n = N_FRAMES
    assert [r["frame"] for r in lines] == list(range(n))  # every frame answered, in order
    assert not any(r["degraded"] for r in lines)

    # Offline: the same decision function (the agent's planner, same conditions) + monolithic run_to_exit, on the
    # agent's runtime (app.model, rapnet.execution: numpy in and out).
    model = app.model
    frames = list(DatasetSource(dataset, model.config.image_size))
    offload, correct, exits, classes = [], [], [], []
    with torch.no_grad():
        for f in frames:
            x = to_model_array(f.pixels)
            plan = app.decider.plan(model.exit_scores(x)[0], app.decider.conditions())
            cls = int(model.run_to_exit(x, plan.exit_index).argmax(1)[0])
            offload.append(plan.offload)
            exits.append(plan.exit_index)
            classes.append(cls)
            correct.append(cls == f.label)
    assert 0 < sum(offload) < n  # the policy really mixes local answers and offloads here
    assert [r["where"] == "cloud" for r in lines] == offload
    assert [r["exit"] for r in lines] == exits
    assert [r["class"] for r in lines] == classes  # lossless fp32: split execution == monolithic
    summary = app.summary
    assert summary["offloaded"] == sum(offload) and summary["frames"] == n
    assert summary["accuracy"] == round(sum(correct) / n, 4)
    assert 0 < sum(correct) < n
    assert [r["correct"] for r in lines] == correct
    for r in lines:
        if r["where"] == "cloud":
            assert r["bytes_sent"] > 0 and r["split"] is not None and r["encoding"] in ("png", "fp32+zstd")
            assert {"network", "cloud_queue", "cloud_compute", "encode"} <= set(r["latency_ms"])
        else:
            assert r["bytes_sent"] == 0
        assert {"preprocess", "predictor", "local", "total"} <= set(r["latency_ms"])
    assert summary["device_gflops"] == 1.0 and summary["device_gflops_measured"] is False  # POLICY's speed
    captured = capsys.readouterr()
    assert "edge-agent summary" in captured.err and " 1.0 GFLOP/s" in captured.err
    assert TOKEN not in captured.err + captured.out + out.read_text()


@pytest.mark.slow
def test_slow_device_lets_the_cloud_pick_the_exit(cloud, checkpoint, dataset, workdir, token_env):
    """A device so slow that every exit goes to the cloud as the image: the agent skips its predictor, the
    cloud runs it with the same rule and price, and the answers equal the offline policy's."""
    out = workdir / "cloud-exit.jsonl"
    flags = ["--dataset", dataset, "--checkpoint", checkpoint, "--cloud", cloud.address, "--fixed-network",
             "--bandwidth-mbps", "1000", "--rtt-ms", "1", "--device-gflops", "0.01", "--calibration-frames", "8",
             "--deadline-ms", "30000", "--quiet", "--limit", "12", "--price", "0.05"]
    app = run_agent([*flags, "--output", str(out)])
    lines = read_lines(out)
    assert len(lines) == 12 and all(r["where"] == "cloud" and r["exit_picked_by"] == "cloud" for r in lines)
    assert all(r["split"] == 0 and r["predictor_score"] is None and r["latency_ms"]["predictor"] < 0.5 for r in lines)
    model = app.model
    costs = app.decider.planner.relative_costs
    with torch.no_grad():
        xs = [to_model_array(f.pixels) for f in list(DatasetSource(dataset, model.config.image_size, limit=12))]
        exits = [int(priced_exits(model.exit_scores(x), 0.05, costs)[0]) for x in xs]
        classes = [int(model.run_to_exit(x, k).argmax(1)[0]) for x, k in zip(xs, exits)]
    assert [r["exit"] for r in lines] == exits and [r["class"] for r in lines] == classes
    assert app.summary["exit_picked_by_cloud"] == 12
    app = run_agent([*flags, "--no-cloud-exit", "--output", str(workdir / "edge-predictor.jsonl")])
    lines = read_lines(workdir / "edge-predictor.jsonl")
    assert all(r["exit_picked_by"] == "edge" and r["predictor_score"] is not None for r in lines)
    assert [r["exit"] for r in lines] == exits


@pytest.mark.slow
def test_capped_rule_on_the_edge_and_in_the_cloud_equals_the_offline_rule(cloud, checkpoint, dataset, workdir,
                                                                         token_env):
    """--stop-confidence: on a fast device every frame runs here, on a very slow one the image goes to the cloud,
    which picks the cap; either way each frame answers where rapnet.exit_rules.capped_exits says."""
    from rapnet.checkpoint import load_model
    from rapnet.exit_rules import capped_exits

    model, _ = load_model(checkpoint)
    with torch.no_grad():
        xs = [to_model_input(f.pixels) for f in list(DatasetSource(dataset, model.config.image_size, limit=12))]
        scores = np.concatenate([model.exit_scores(x).numpy() for x in xs])
        confidence = np.stack([[float(torch.softmax(z, 1).max()) for z in model(x)] for x in xs])
    caps = priced_exits(scores, 0.0, relative_exit_costs(measure_costs(model)))  # price 0: the untrained
    # predictor's scores are flat, so any price above it caps every frame at exit 0
    best_on_the_way = [row[:cap].max() for row, cap in zip(confidence, caps) if cap > 0]
    assert best_on_the_way, "no frame has an exit before its cap"
    stop = float(np.median(best_on_the_way))  # about half the frames stop early
    base = ["--dataset", dataset, "--checkpoint", checkpoint, "--cloud", cloud.address, "--fixed-network", "--rtt-ms",
            "1", "--calibration-frames", "8", "--deadline-ms", "30000", "--quiet", "--limit", "12", "--price", "0",
            "--stop-confidence", str(stop)]
    for where, device in (("edge", ["--device-gflops", "10000", "--bandwidth-mbps", "0.01"]),
                          ("cloud", ["--device-gflops", "0.01", "--bandwidth-mbps", "1000"])):
        out = workdir / f"capped-{where}.jsonl"
        app = run_agent([*base, *device, "--output", str(out)])
        lines = read_lines(out)
        assert app.decider.rule == "capped" and all(r["where"] == where for r in lines)
        expected = capped_exits(scores, confidence, 0.0, stop, app.decider.planner.relative_costs)
        assert [r["exit"] for r in lines] == expected.tolist()
        with torch.no_grad():
            assert [r["class"] for r in lines] == [int(model.run_to_exit(x, int(k)).argmax(1)[0])
                                                   for x, k in zip(xs, expected)]
    assert (expected < caps).any() and (expected == caps).any()  # some stopped early, some ran to their cap


@pytest.mark.slow
@pytest.mark.parametrize("image_encoding", ["png", "raw+zstd"])
def test_emulated_device_pays_the_modelled_encoding_time(cloud, checkpoint, dataset, workdir, token_env, image_encoding):
    """--emulate-device pads encoding like compute: the planner scales codec time with the device speed, so a
    live run on this CPU must pay what the simulator charges (rapnet-sim live calibrates against it). Both
    lossless image encodings travel over the real gRPC path."""
    out = workdir / f"emulated-{image_encoding}.jsonl"
    app = run_agent(["--dataset", dataset, "--checkpoint", checkpoint, "--cloud", cloud.address, "--fixed-network",
                     "--bandwidth-mbps", "1000", "--rtt-ms", "1", "--device-gflops", "0.5", "--emulate-device",
                     "--calibration-frames", "8", "--deadline-ms", "30000", "--quiet", "--limit", "4",
                     "--threshold", "1.0", "--encoding", image_encoding, "--output", str(out)])
    lines = [r for r in read_lines(out) if r["where"] == "cloud"]
    # the last exit (threshold 1): the whole network costs a 0.5 GFLOP/s device more than the image's trip at
    # 1000 Mbit/s on either runtime; a shallow exit may not (ONNX Runtime's few calls make it cheaper than encoding)
    assert lines, "a 0.5 GFLOP/s device at 1000 Mbit/s should offload the last exit"
    conditions = app.decider.conditions()
    for r in lines:
        assert r["split"] == 0 and r["encoding"] == image_encoding and r["exit"] is not None
        modelled = app.decider.planner.codec_scaled(r["split"], r["encoding"], conditions)[0]
        assert modelled > 0.1 and r["latency_ms"]["encode"] >= modelled - 0.01


def _trace_cache_admitting_jpeg(model, pixels: np.ndarray, path: Path, **heldout) -> Path:
    """A rapnet-sim trace cache for `model` whose labelled held-out answers say JPEG costs no accuracy (request sizes
    measured on `pixels`); `heldout` replaces held-out arrays."""
    from orchestration.calibration import leaf_layers, measure_payloads
    from orchestration.model_traces import ModelTraces, save_traces
    from rapnet.checkpoint import model_identity

    payload, enc, dec, agreement = measure_payloads(model, pixels)
    # equal codec times, so the smallest image wins on a slow uplink: measured ones follow the machine's load, and
    # on a 0.01 GFLOP/s device JPEG's slower encoding can outweigh its smaller transfer
    enc, dec = {k: 0.1 for k in enc}, {k: 0.1 for k in dec}
    right = np.ones((len(pixels), model.num_exits), dtype=bool)
    t = ModelTraces("rapnet", model_identity(model), measure_costs(model), tuple(leaf_layers(s) for s in model.stages),
                    tuple(leaf_layers(e) for e in model.exits), leaf_layers(model.predictor), right,
                    right.astype(np.float32), None, cal_correct=right, payload=payload, encode_ms=enc, decode_ms=dec,
                    agreement=agreement, **{"heldout_correct": right, "heldout_jpeg_correct": right, **heldout})
    save_traces({"rapnet": t}, path, {})
    return path


@pytest.mark.slow
def test_jpeg_goes_out_only_with_labelled_accuracy_and_is_answered_from_the_decoded_jpeg(cloud, checkpoint, dataset,
                                                                                          workdir, token_env, capsys):
    """--encoding jpeg without a trace cache: the agent keeps JPEG off its menu (and says why). With a cache whose
    held-out accuracies admit it, the image travels as JPEG over real gRPC and the cloud answers, exit included,
    from the decoded JPEG, exactly as the offline rule on the JPEG round trip."""
    from orchestration.traces import jpeg_round_trip

    model, _ = load_model(checkpoint)
    frames = list(DatasetSource(dataset, model.config.image_size, limit=6))
    pixels = np.stack([f.pixels for f in frames])
    flags = ["--dataset", dataset, "--checkpoint", checkpoint, "--cloud", cloud.address, "--fixed-network",
             "--bandwidth-mbps", "1", "--rtt-ms", "1", "--device-gflops", "0.01", "--calibration-frames", "6",
             "--deadline-ms", "30000", "--quiet", "--limit", "6", "--price", "0.05", "--encoding", "jpeg"]
    run_agent([*flags, "--output", str(workdir / "no-jpeg.jsonl")])
    assert all(r["where"] == "edge" for r in read_lines(workdir / "no-jpeg.jsonl"))
    assert "JPEG stays off the menu" in capsys.readouterr().err
    cache = _trace_cache_admitting_jpeg(model, pixels, workdir / "traces-jpeg.npz")
    out = workdir / "jpeg.jsonl"
    app = run_agent([*flags, "--traces", str(cache), "--output", str(out)])
    assert (0, "jpeg") in app.decider.planner.menu
    lines = read_lines(out)
    assert all(r["where"] == "cloud" and r["split"] == 0 and r["encoding"] == "jpeg" for r in lines)
    assert all(r["exit_picked_by"] == "cloud" for r in lines)  # every exit sends the image: the cloud picks
    costs = app.decider.planner.relative_costs
    with torch.no_grad():
        x = to_model_input(jpeg_round_trip(pixels))
        exits = priced_exits(model.exit_scores(x).numpy(), 0.05, costs)
        classes = [int(model.run_to_exit(x[i : i + 1], int(k)).argmax(1)[0]) for i, k in enumerate(exits)]
    assert [r["exit"] for r in lines] == exits.tolist() and [r["class"] for r in lines] == classes


@pytest.mark.slow
def test_capped_frames_sent_as_jpeg_stop_at_the_stricter_confidence_tuned_for_jpeg(cloud, checkpoint, dataset,
                                                                                      workdir, token_env,
                                                                                      jpeg_heldout_views):
    """A trace cache whose held-out split shows JPEG making a wrong exit confident: the agent's JPEG frames carry the
    stricter stop confidence the simulator tunes for them, and the cloud answers where the capped rule with it says
    on the decoded JPEG (the frames' untrained confidences lie below it, so each runs to its cap)."""
    from orchestration.traces import jpeg_round_trip
    from rapnet.exit_rules import capped_exits

    model, _ = load_model(checkpoint)
    frames = list(DatasetSource(dataset, model.config.image_size, limit=6))
    pixels = np.stack([f.pixels for f in frames])
    views = vars(jpeg_heldout_views(k=model.num_exits))
    cache = _trace_cache_admitting_jpeg(model, pixels, workdir / "traces-jpeg-stop.npz", **views)
    with torch.no_grad():
        x = to_model_input(jpeg_round_trip(pixels))
        scores = model.exit_scores(x).numpy()
        confidence = np.stack([torch.softmax(z, 1).max(1).values.numpy() for z in model(x)], 1)
    stop = float(np.median(confidence[:, :-1]))  # the lossless setting would stop about half the frames early
    jpeg_stop = 0.505  # the threshold grid's first step above the 0.5 at which JPEG makes exit 0 confident
    assert stop < 0.5 and confidence.max() < jpeg_stop
    out = workdir / "jpeg-capped.jsonl"
    app = run_agent(["--dataset", dataset, "--checkpoint", checkpoint, "--cloud", cloud.address, "--fixed-network",
                     "--bandwidth-mbps", "1", "--rtt-ms", "1", "--device-gflops", "0.01", "--calibration-frames", "6",
                     "--deadline-ms", "30000", "--quiet", "--limit", "6", "--price", "0", "--stop-confidence",
                     str(stop), "--traces", str(cache), "--output", str(out)])
    assert app.decider.stop_confidence == stop and app.decider.stop_confidence_for("jpeg") == pytest.approx(jpeg_stop)
    lines = read_lines(out)
    assert {(r["where"], r["encoding"]) for r in lines} == {("cloud", "jpeg")}
    expected = capped_exits(scores, confidence, 0.0, jpeg_stop, app.decider.planner.relative_costs)
    assert [r["exit"] for r in lines] == expected.tolist()
    assert app.summary["jpeg_stop_confidence"] == pytest.approx(jpeg_stop)


@pytest.mark.slow
def test_cloud_down_from_start(checkpoint, dataset, mixed_threshold, workdir, token_env):
    out = workdir / "down.jsonl"
    deadline = 500
    t0 = time.perf_counter()
    app = run_agent(["--dataset", dataset, "--checkpoint", checkpoint, "--cloud", f"127.0.0.1:{free_port()}",
                     *POLICY, "--threshold", str(mixed_threshold), "--deadline-ms", str(deadline),
                     "--output", str(out), "--no-cloud-check"])  # the calls fail (with the check: never sent)
    elapsed = time.perf_counter() - t0
    lines = read_lines(out)
    assert [r["frame"] for r in lines] == list(range(N_FRAMES))
    assert not any(r["where"] == "cloud" for r in lines)
    degraded = [r for r in lines if r["degraded"]]
    assert degraded and all(r["where"] in ("edge", "edge-fallback") for r in degraded)
    reasons = {r["degraded_reason"].split(":")[0] for r in degraded}
    assert "UNAVAILABLE" in reasons and any(x.startswith("circuit") for x in reasons)
    assert app.summary["circuit_trips"] >= 1
    assert all(r["latency_ms"].get("network", 0) <= deadline + 300 for r in lines)
    assert elapsed < 60


def test_cloud_down_when_the_cloud_was_to_pick_the_exit(checkpoint, dataset, workdir, token_env):
    """Frames sent without the edge's predictor fall back to the exit the predictor picks locally, not to the
    whole network."""
    out = workdir / "down-cloud-exit.jsonl"
    app = run_agent(["--dataset", dataset, "--checkpoint", checkpoint, "--cloud", f"127.0.0.1:{free_port()}",
                     "--fixed-network", "--bandwidth-mbps", "1000", "--rtt-ms", "1", "--device-gflops", "0.01",
                     "--calibration-frames", "8", "--deadline-ms", "500", "--quiet", "--limit", "10",
                     "--price", "0.05", "--output", str(out), "--no-cloud-check",
                     "--runtime", "torch"])  # quick: the fallback is the same on any runtime; no ONNX export
    lines = read_lines(out)
    assert len(lines) == 10 and all(r["degraded"] and r["where"] in ("edge", "edge-fallback") for r in lines)
    assert any(r["where"] == "edge-fallback" for r in lines)  # sent without the predictor, then fell back
    model = app.model
    with torch.no_grad():
        xs = [to_model_array(f.pixels) for f in list(DatasetSource(dataset, model.config.image_size, limit=10))]
        exits = [int(priced_exits(model.exit_scores(x), 0.05, app.decider.planner.relative_costs)[0])
                 for x in xs]
    assert [r["exit"] for r in lines] == exits


def _slow_cloud():
    """A gRPC server on 127.0.0.1 that accepts rapnet.v1.Inference/Infer and never answers in time."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    def infer(request, context):
        t_end = time.monotonic() + 10
        while context.is_active() and time.monotonic() < t_end:
            time.sleep(0.02)
        context.abort(grpc.StatusCode.INTERNAL, "too late")

    server = grpc.server(ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "rapnet.v1.Inference", {"Infer": grpc.unary_unary_rpc_method_handler(infer)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.mark.slow
def test_cloud_that_never_answers_is_cut_at_the_deadline(checkpoint, dataset, mixed_threshold, workdir, token_env):
    """An overloaded cloud (answers nothing before the deadline): calls end at the deadline, frames degrade,
    and with split 0 (no local exit computed) the edge continues its own carry to an exit."""
    server, port = _slow_cloud()
    try:
        out = workdir / "slow.jsonl"
        deadline = 300
        t0 = time.perf_counter()
        app = run_agent(["--dataset", dataset, "--checkpoint", checkpoint, "--cloud", f"127.0.0.1:{port}",
                         *POLICY, "--encoding", "png", "--threshold", str(mixed_threshold), "--deadline-ms",
                         str(deadline), "--output", str(out)])
        elapsed = time.perf_counter() - t0
    finally:
        server.stop(0)
    lines = read_lines(out)
    assert [r["frame"] for r in lines] == list(range(N_FRAMES))
    timed_out = [r for r in lines if r.get("degraded_reason") == "DEADLINE_EXCEEDED"]
    assert timed_out and not any(r["where"] == "cloud" for r in lines)
    assert all(deadline * 0.8 <= r["latency_ms"]["network"] <= deadline + 300 for r in timed_out)
    assert all(r["split"] == 0 and r["where"] == "edge-fallback" and r["exit"] <= r["target_exit"] for r in timed_out)
    assert app.summary["circuit_trips"] >= 1
    # the breaker opened after 3 failures (4 in flight at most): the run did not wait a deadline per frame
    assert elapsed < 5 * deadline / 1e3 + 10


@pytest.mark.slow
def test_cloud_killed_in_the_middle(cloud, checkpoint, dataset, mixed_threshold, workdir, token_env):
    """A second front on the shared app; it is stopped once some frames went through it."""
    front = start_local(checkpoint, port=0, token=TOKEN, deploy=False)
    killed_at = {}

    def kill(app):
        while app.agent is None or app.agent.counters.answered < 8:
            time.sleep(0.005)
        front.stop()  # in-flight calls get the front's grace period: count what was answered once it is gone
        killed_at["answered"] = app.agent.counters.answered

    out = workdir / "killed.jsonl"
    deadline = 2000  # long enough that healthy calls on a loaded machine finish; a dead front fails fast
    try:
        run_agent(["--dataset", dataset, "--checkpoint", checkpoint, "--cloud", front.address, *POLICY,
                         "--threshold", str(mixed_threshold), "--deadline-ms", str(deadline), "--rate", "20",
                         "--output", str(out)], stopper=kill)
    finally:
        front.stop()
    lines = read_lines(out)
    assert [r["frame"] for r in lines] == list(range(N_FRAMES))
    early = lines[: killed_at["answered"]]
    late = lines[killed_at["answered"] + 4:]  # past what may have been in flight when it was stopped
    assert any(r["where"] == "cloud" for r in early)
    assert not any(r["where"] == "cloud" for r in late)
    planned = [r for r in late if r["degraded"]]
    assert planned, "frames the policy would offload after the kill must be answered locally, degraded"
    assert all(not r["degraded"] for r in lines if r["where"] == "cloud")
    assert all(r["latency_ms"].get("network", 0) <= deadline + 300 for r in lines)


@pytest.mark.slow
def test_video_file_through_opencv_over_tls(ray_instance, cloud, checkpoint, workdir, token_env):
    """The camera path (OpenCV VideoCapture) on an MJPG .avi written here, to a TLS front."""
    video = workdir / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    rng = np.random.default_rng(2)
    for i in range(12):
        frame = np.full((48, 64, 3), 20 * i, np.uint8)
        frame[10:30, 5 + 3 * i: 25 + 3 * i] = rng.integers(0, 255, 3)
        writer.write(frame)
    writer.release()
    frames = list(CaptureSource(str(video), 32, live=False))
    assert len(frames) == 12 and frames[0].pixels.shape == (32, 32, 3)

    certs = make_dev_cert(workdir / "certs")
    front = start_local(checkpoint, port=0, token=TOKEN, deploy=False, tls=TLSFiles(str(certs.cert), str(certs.key)))
    out = workdir / "video.jsonl"
    try:
        rc = edge_agent.main(["--video", str(video), "--checkpoint", checkpoint, "--cloud", f"localhost:{front.port}",
                              "--tls-ca", str(certs.ca), *POLICY, "--threshold", "1.0",
                              "--output", str(out)])
    finally:
        front.stop()
    assert rc == 0
    lines = read_lines(out)
    assert [r["frame"] for r in lines] == list(range(12))
    assert all("label" not in r and 0 <= r["class"] < 10 for r in lines)
    assert all(r["where"] == "cloud" and r["exit"] == 5 for r in lines)  # threshold 1: the last exit, offloaded


def test_missing_camera_is_a_clear_error(checkpoint, capsys):
    rc = edge_agent.main(["--camera", "7", "--checkpoint", checkpoint, "--quiet", "--runtime", "torch"])  # no export
    err = capsys.readouterr().err
    assert rc == 2
    assert "camera 7 could not be opened" in err and "Traceback" not in err


def test_unreadable_inputs_are_clear_errors(checkpoint, workdir, capsys):
    no_export = ["--runtime", "torch"]  # the sources are what is wrong here, on any runtime
    assert edge_agent.main(["--video", str(workdir / "nope.avi"), "--checkpoint", checkpoint, *no_export]) == 2
    assert edge_agent.main(["--images", str(workdir / "nope"), "--checkpoint", checkpoint, *no_export]) == 2
    assert edge_agent.main(["--images", str(workdir), "--checkpoint", str(workdir / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


@pytest.mark.slow
def test_embedded_cloud_and_ctrl_c(checkpoint, dataset, workdir):
    """The README's main job in a fresh process: no --cloud, so the agent starts the cloud tier itself on
    127.0.0.1; SIGINT mid-run stops it gracefully (frames in hand answered, summary, cloud stopped)."""
    env = dict(os.environ, RAPNET_CACHE=str(workdir / "cache"), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAPNET_TOKEN", None)
    cmd = [sys.executable, "-m", "edge.agent", "--dataset", dataset, "--checkpoint", checkpoint, "--rate", "10",
           "--calibration-frames", "4", "--output", "-", "--quiet", "--summary-json", str(workdir / "summary.json")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(json.loads(line))
            if len(lines) == 5:
                proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert rc == 130, err[-3000:]
    assert 5 <= len(lines) < N_FRAMES
    assert [r["frame"] for r in lines] == list(range(len(lines)))
    assert "local cloud serving on 127.0.0.1:" in err
    summary = json.loads((workdir / "summary.json").read_text())
    assert "edge-agent summary" in err and summary["frames"] == len(lines) and summary["interrupted"]
    assert "local cloud stopped" in err
    assert "Traceback" not in err
