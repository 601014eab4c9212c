"""The edge agent's Prometheus endpoint (edge.metrics): off unless --metrics-port asks for it, on 127.0.0.1 by
default, and after a short run a real HTTP scrape reads the frames, exits, offload share, degraded frames by reason,
latency histograms and the live counters. The cloud here is an address where nothing listens (no Ray), so every
frame the planner would offload is answered on the edge; tests/edge/test_startup_check.py scrapes a run whose
frames the real cloud answers."""
from __future__ import annotations

import socket
import urllib.request

import cv2
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from edge import agent as edge_agent
from rapnet.build import build_model
from rapnet.checkpoint import save_checkpoint
from rapnet.config import ModelConfig

N = 8


def scrape(port: int, host: str = "127.0.0.1") -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a real GET of /metrics."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def endpoint_port(app) -> int:
    line = next(line for line in app.lines if line.startswith("metrics on http://"))
    return int(line.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=0.35, fusion_stride=4, rapnet_exit_fractions=(0.05, 0.1, 0.45, 0.7))).eval()
    checkpoint = root / "model.pt"
    save_checkpoint(checkpoint, model, {"classes": [f"class{i}" for i in range(10)]})
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    # the last exit (threshold 1) on a device so slow that every frame is planned for the cloud
    return ["--images", str(images), "--checkpoint", str(checkpoint), "--cloud", dead, "--threshold", "1.0",
            "--device-gflops", "0.01", "--fixed-network", "--calibration-frames", "2", "--quiet",
            "--runtime", "torch"]  # the metrics do not depend on the runtime: no ONNX export of this checkpoint


def build(argv):
    lines: list[str] = []
    app = edge_agent.build_app(argv, log=lines.append)
    app.lines = lines
    return app


def test_metrics_are_served_only_when_asked_for_and_count_the_run(setup):
    app = build(setup)
    try:
        edge_agent.run_app(app)
        assert app.metrics is None and not any("metrics on" in line for line in app.lines)  # off by default
    finally:
        edge_agent.close_app(app)

    app = build([*setup, "--metrics-port", "0"])
    try:
        summary = edge_agent.run_app(app)
        port = endpoint_port(app)
        assert app.lines[[i for i, line in enumerate(app.lines) if "metrics on" in line][0]] == \
            f"metrics on http://127.0.0.1:{port}/metrics"  # loopback by default
        m = scrape(port)
    finally:
        edge_agent.close_app(app)
    last = str(app.model.num_exits - 1)
    assert m[("rapnet_edge_frames_total", (("where", "edge"),))] == N
    assert m[("rapnet_edge_local_frames_total", ())] == N and m[("rapnet_edge_offloaded_frames_total", ())] == 0
    assert m[("rapnet_edge_exits_total", (("exit", last),))] == N
    assert m[("rapnet_edge_degraded_frames_total", (("reason", "cloud check failed"),))] == N == summary["degraded"]
    assert m[("rapnet_edge_latency_seconds_count", ())] == N and m[("rapnet_edge_latency_seconds_sum", ())] > 0
    assert m[("rapnet_edge_network_seconds_count", ())] == 0  # nothing went over the network
    assert m[("rapnet_edge_captured_frames_total", ())] == N and m[("rapnet_edge_dropped_frames_total", ())] == 0
    assert m[("rapnet_edge_cloud_usable", ())] == 0 and m[("rapnet_edge_cloud_checks_total", ())] >= 1
    assert m[("rapnet_edge_source_reconnects_total", ())] == 0  # an image folder never reconnects
    with pytest.raises(OSError):  # closed with the agent
        scrape(port)


def test_a_metrics_port_in_use_is_a_setup_error(setup, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rc = edge_agent.main([*setup, "--metrics-port", str(busy.getsockname()[1])])
    err = capsys.readouterr().err
    assert rc == 2 and "--metrics-port" in err and "pick a free port, or 0 for any" in err and "Traceback" not in err
