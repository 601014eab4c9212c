"""The start-up check of the cloud (edge.startup) against the real cloud tier on 127.0.0.1 (Ray Serve + the gRPC
front, plaintext and TLS): each misconfiguration gives its one line at start-up naming the fix, the agent answers
every frame here meanwhile, and a cloud that comes right later is found by the background re-check and used.
A few cases that need no replicas (mutual TLS, a server that is no front) run against bare gRPC servers."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edge import agent as edge_agent
from edge.config import CloudSettings
from edge.link import CloudLink, CloudTarget
from edge.startup import CloudCheck
from rapnet.build import build_model
from rapnet.checkpoint import save_checkpoint
from rapnet.codec import ModelContract
from rapnet.config import ModelConfig

TOKEN = "startup-check-token-" + "z" * 20
N_IMAGES = 6
# The last exit (threshold 1: no score reaches it) on a device so slow that the planner offloads every frame: each
# frame shows whether the cloud could be used.
SLOW_DEVICE = ["--threshold", "1.0", "--device-gflops", "0.01", "--fixed-network", "--bandwidth-mbps", "1000",
               "--rtt-ms", "1", "--calibration-frames", "2", "--deadline-ms", "20000", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("startup-check")


def _checkpoint(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(width=0.35, fusion_stride=4, rapnet_exit_fractions=(0.05, 0.1, 0.45, 0.7))).eval()
    save_checkpoint(path, model, {"classes": [f"class{i}" for i in range(10)]})
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(workdir):
    return _checkpoint(workdir / "model.pt", 0)


@pytest.fixture(scope="module")
def other_checkpoint(workdir):
    """The same architecture with other weights: another model identity."""
    return _checkpoint(workdir / "other.pt", 1)


def _images(folder: Path, n: int) -> str:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    return str(folder)


@pytest.fixture(scope="module")
def images(workdir):
    return _images(workdir / "images", N_IMAGES)


@pytest.fixture(scope="module")
def certs(workdir):
    from cloud.security import make_dev_cert

    return make_dev_cert(workdir / "certs"), make_dev_cert(workdir / "other-ca")


@pytest.fixture(scope="module")
def cloud(ray_instance, checkpoint):
    from cloud.server import start_local

    server = start_local(checkpoint, port=0, token=TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_front(cloud, checkpoint, certs):
    """A second front on the same Serve app, over TLS."""
    from cloud.security import TLSFiles
    from cloud.server import start_local

    dev, _ = certs
    front = start_local(checkpoint, port=0, token=TOKEN, deploy=False, tls=TLSFiles(str(dev.cert), str(dev.key)))
    yield front
    front.stop()


def run(argv: list[str], token: str | None, monkeypatch, out: Path, during=None, after=None):
    """build_app + run_app in-process; returns (log lines, JSON lines, summary). after(app, lines): called once the
    run ended, before the app is closed."""
    if token is None:
        monkeypatch.delenv("RAPNET_TOKEN", raising=False)
    else:
        monkeypatch.setenv("RAPNET_TOKEN", token)
    lines: list[str] = []
    app = edge_agent.build_app([*argv, "--output", str(out)], log=lines.append)
    helper = threading.Thread(target=during, args=(app,), daemon=True) if during else None
    if helper:
        helper.start()
    try:
        summary = edge_agent.run_app(app)
        if after is not None:
            after(app, lines)
    finally:
        edge_agent.close_app(app)
    if helper:
        helper.join(timeout=60)
    return lines, [json.loads(line) for line in out.read_text().splitlines()], summary


def check_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("cloud check")]


@pytest.mark.slow
def test_a_cloud_that_is_right_passes_and_gets_the_frames(cloud, checkpoint, images, workdir, monkeypatch):
    """The check passes; every frame goes to the cloud, which the metrics endpoint counts too."""
    from tests.edge.test_edge_metrics import endpoint_port, scrape

    scraped = {}

    def read_metrics(app, lines):
        app.lines = lines
        scraped.update(scrape(endpoint_port(app)))

    lines, results, summary = run(["--images", images, "--checkpoint", checkpoint, "--cloud", cloud.address,
                                   *SLOW_DEVICE, "--metrics-port", "0"], TOKEN, monkeypatch, workdir / "ok.jsonl",
                                  after=read_metrics)
    assert len(check_lines(lines)) == 1 and check_lines(lines)[0].startswith("cloud check passed")
    assert "accepts this edge's token and serves its model" in check_lines(lines)[0]
    assert len(results) == N_IMAGES and all(r["where"] == "cloud" for r in results)
    assert summary["cloud_check"] == "ok"
    assert scraped[("rapnet_edge_offloaded_frames_total", ())] == N_IMAGES
    assert scraped[("rapnet_edge_local_frames_total", ())] == 0
    assert scraped[("rapnet_edge_frames_total", (("where", "cloud"),))] == N_IMAGES
    assert scraped[("rapnet_edge_network_seconds_count", ())] == N_IMAGES
    assert scraped[("rapnet_edge_sent_bytes_total", ())] == sum(r["bytes_sent"] for r in results) > 0
    assert scraped[("rapnet_edge_cloud_usable", ())] == 1 and scraped[("rapnet_edge_circuit_open", ())] == 0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong token", "no token", "plaintext against TLS", "TLS against plaintext",
                                  "wrong CA", "unreachable", "other model"])
def test_each_misconfiguration_gives_one_line_naming_the_fix(case, cloud, tls_front, checkpoint, other_checkpoint,
                                                             images, certs, workdir, monkeypatch):
    dev, other_ca = certs
    tls_address = f"localhost:{tls_front.port}"
    argv, token = ["--images", images, "--checkpoint", checkpoint, *SLOW_DEVICE], TOKEN
    kind, fix = {
        "wrong token": ("token", r"refused the token .*\$RAPNET_TOKEN does not hold the cloud's token"),
        "no token": ("token", r"wants a bearer token and the agent has none: give the cloud's token with "
                              r"--token-file FILE or \$RAPNET_TOKEN"),
        "plaintext against TLS": ("tls", r"speaks TLS but the agent connects in plaintext: give --tls-ca"),
        "TLS against plaintext": ("tls", r"does not speak TLS, but --tls-ca .* is given: drop --tls-ca"),
        "wrong CA": ("tls", r"is not signed by --tls-ca .*other-ca/ca.pem .*: give the CA certificate that signed it"),
        "unreachable": ("unreachable", r"nothing listens at 127.0.0.1:\d+ \(connection refused\): check --cloud"),
        "other model": ("model", r"serves another model \(request was made for model \w+, this worker holds \w+.*\): "
                                 r"give this edge the checkpoint the cloud serves with --checkpoint"),
    }[case]
    if case == "wrong token":
        argv += ["--cloud", cloud.address]
        token = "not-the-token-" + "q" * 20
    elif case == "no token":
        argv += ["--cloud", cloud.address]
        token = None
    elif case == "plaintext against TLS":
        argv += ["--cloud", tls_address]
    elif case == "TLS against plaintext":
        argv += ["--cloud", cloud.address, "--tls-ca", str(dev.ca)]
    elif case == "wrong CA":
        argv += ["--cloud", tls_address, "--tls-ca", str(other_ca.ca)]
    elif case == "unreachable":
        argv += ["--cloud", f"127.0.0.1:{free_port()}"]
    else:
        argv = ["--images", images, "--checkpoint", other_checkpoint, *SLOW_DEVICE, "--cloud", cloud.address]
    lines, results, summary = run(argv, token, monkeypatch, workdir / "case.jsonl")
    checks = check_lines(lines)
    assert len(checks) == 1, lines  # one line, at start-up, before the first frame
    assert checks[0].startswith(f"cloud check failed ({kind}): ") and checks[0].endswith(
        "answering every frame here and checking again in the background")
    import re

    assert re.search(fix, checks[0]), checks[0]
    assert TOKEN not in "\n".join(lines)
    # the agent carried on locally: every frame answered here, flagged with the reason
    assert len(results) == N_IMAGES and not any(r["where"] == "cloud" for r in results)
    assert all(r.get("degraded_reason") == f"cloud check failed: {kind}" for r in results), [(r["where"], r.get("degraded_reason"), r["exit"], r["target_exit"]) for r in results]
    assert summary["cloud_check"] == kind and summary["degraded_reasons"] == {"cloud check failed": N_IMAGES}


@pytest.mark.slow
def test_a_cloud_that_comes_right_later_gets_the_frames_from_then_on(cloud, checkpoint, monkeypatch, tmp_path):
    """Nothing listens at the address at start-up; a front starts there a moment later. The background re-check
    (1 s backoff cap, from the configuration file) finds it, and offloading starts."""
    from cloud.server import start_local

    port = free_port()
    config = tmp_path / "edge.yaml"
    config.write_text(f"cloud: {{address: '127.0.0.1:{port}', check_retry_max_s: 1}}\n")
    started = {}

    def bring_up(app):
        while app.agent is None or app.agent.counters.answered < 3:
            if app.stop.wait(0.01):
                return
        started["front"] = start_local(checkpoint, port=port, token=TOKEN, deploy=False)

    try:
        # 60 frames at 5 frames/s: 12 s, time for the front to start and the re-check (every 0.5-1 s) to find it
        lines, results, summary = run(["--config", str(config), "--images", _images(tmp_path / "many", 60),
                                       "--checkpoint", checkpoint, *SLOW_DEVICE, "--rate", "5"], TOKEN, monkeypatch,
                                      tmp_path / "later.jsonl", during=bring_up)
    finally:
        if "front" in started:
            started["front"].stop()
    checks = check_lines(lines)
    assert checks[0].startswith("cloud check failed (unreachable)")
    assert checks[-1].startswith("cloud check passed after") and "offloading on" in checks[-1]
    first_cloud = next((i for i, r in enumerate(results) if r["where"] == "cloud"), None)
    assert first_cloud is not None and not any("CLIENT_ERROR" in (r.get("degraded_reason") or "") for r in results), \
        {r.get("degraded_reason") for r in results}
    assert first_cloud >= 3 and all(r["where"] == "cloud" for r in results[first_cloud:])
    assert all(r["degraded_reason"] == "cloud check failed: unreachable" for r in results[:first_cloud])
    assert summary["cloud_check"] == "ok" and summary["cloud_check_attempts"] >= 2


# ------------------------------------------------------------------------------------------------------
# Bare gRPC servers on 127.0.0.1 (no Ray): mutual TLS, and a server that is no cloud front
# ------------------------------------------------------------------------------------------------------


def _bare_server(tls=None):
    server = grpc.server(ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    target = "127.0.0.1:0"
    port = server.add_secure_port(target, tls.server_credentials()) if tls else server.add_insecure_port(target)
    server.start()
    return server, port


def _check(address: str, ca=None, cert=None, key=None):
    link = CloudLink(CloudTarget(address, TOKEN, ca, cert, key), deadline_ms=2000)
    try:
        contract = ModelContract("0" * 64, 1, (0,), ({"image": (3, 8, 8)},))
        return CloudCheck(link, contract, CloudSettings(address=address)).check()
    finally:
        link.close()


def test_mutual_tls_without_a_client_certificate_is_named(certs):
    from cloud.security import TLSFiles

    dev, other = certs
    server, port = _bare_server(TLSFiles(str(dev.cert), str(dev.key), client_ca=str(dev.ca)))
    try:
        result = _check(f"localhost:{port}", ca=str(dev.ca))
        assert result.kind == "tls" and "asks for a client certificate (mutual TLS): give --tls-cert and --tls-key" \
            in result.line
        result = _check(f"localhost:{port}", ca=str(dev.ca), cert=str(other.client_cert), key=str(other.client_key))
        assert result.kind == "tls" and "does not accept the client certificate --tls-cert" in result.line
        assert _check(f"localhost:{port}", ca=str(dev.ca), cert=str(dev.client_cert),
                      key=str(dev.client_key)).kind == "service"  # past TLS: this server has no Inference service
    finally:
        server.stop(0)


def test_a_server_that_is_no_front_and_a_host_that_does_not_resolve_are_named(certs):
    server, port = _bare_server()
    try:
        result = _check(f"127.0.0.1:{port}")
        assert result.kind == "service" and "serves no rapnet.v1.Inference" in result.line and result.blocking
    finally:
        server.stop(0)
    result = _check("no-such-host.invalid:50051", ca=str(certs[0].ca))  # plaintext only reaches loopback
    assert result.kind == "unreachable" and "cannot resolve the host of --cloud no-such-host.invalid:50051" \
        in result.line
