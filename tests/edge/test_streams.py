"""Live sources (edge.streams) against a real MJPEG-over-HTTP stream served here on 127.0.0.1 (http.server, a
multipart/x-mixed-replace response of JPEG frames, as IP cameras serve it), read by OpenCV's FFmpeg backend.
The server stops and comes back, or stops sending with the connection open; the watchdog reconnects, and the
agent answers the frames after the recovery. Every wait is bounded: a test that would hang fails instead.

RTSP: a real RTSP server from Debian's packages (GStreamer's gst-rtsp-server through the system Python's
python3-gi: videotestsrc, JPEG over RTP), started here on 127.0.0.1 as a separate process that is killed and
started again. Those tests are skipped where the packages are missing (see RTSP_PACKAGES).
"""
from __future__ import annotations

import json
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from edge import agent as edge_agent
from edge.config import SourceSettings
from edge.frames import SourceError
from edge.streams import Backoff, LiveSource
from tests.edge.test_edge_metrics import endpoint_port, scrape

FPS = 25


class MjpegServer:
    """An MJPEG camera on 127.0.0.1: GET returns multipart/x-mixed-replace JPEG frames at FPS frames/s until the
    server is stopped (`stop`: connections closed, port closed; `start` again: same port) or paused (`hang`:
    connections stay open, nothing is sent)."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.port, self.tls = 0, tls
        self.sent = 0
        self.hang = threading.Event()
        self._closing = threading.Event()
        self._server = None

    def start(self) -> "MjpegServer":
        outer = self
        self._closing.clear()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                while not outer._closing.is_set():
                    if outer.hang.is_set():
                        time.sleep(0.02)
                        continue
                    image = np.full((48, 64, 3), (outer.sent * 7) % 256, np.uint8)
                    data = cv2.imencode(".jpg", image)[1].tobytes()
                    try:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(data) + data + b"\r\n")
                        self.wfile.flush()
                    except OSError:
                        return
                    outer.sent += 1
                    time.sleep(1 / FPS)

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/video.mjpg"


@pytest.fixture
def camera():
    server = MjpegServer().start()
    yield server
    server.stop()


def live(url: str, **settings) -> tuple[LiveSource, list[str]]:
    lines: list[str] = []
    defaults = dict(stall_timeout_s=1.0, reconnect_max_s=1.0, open_timeout_s=2.0)
    source = LiveSource(SourceSettings(stream=url, **{**defaults, **settings}), 32, log=lines.append,
                        rng=random.Random(0))
    return source, lines


def take(source: LiveSource, n: int, timeout_s: float = 20.0, during=None) -> list:
    """n frames from `source`, calling during(i) before frame i; fails (never hangs) past timeout_s."""
    frames, t_end = [], time.monotonic() + timeout_s
    timer = threading.Timer(timeout_s, source.close)  # ends the iteration if the watchdog ever failed to
    timer.start()
    try:
        for frame in source:
            frames.append(frame)
            if len(frames) == n or time.monotonic() > t_end:
                break
            if during is not None:
                during(len(frames))
    finally:
        timer.cancel()
    assert len(frames) == n, f"{len(frames)} of {n} frames before the {timeout_s} s bound"
    return frames


def test_opencv_ffmpeg_reads_an_mjpeg_stream(camera):
    source, lines = live(camera.url)
    try:
        frames = take(source, 5)
    finally:
        source.close()
    assert [f.index for f in frames] == list(range(5))
    assert all(f.pixels.shape == (32, 32, 3) and f.pixels.dtype == np.uint8 for f in frames)
    assert source.reconnects == 0 and lines == []


def test_a_stream_that_stops_and_comes_back_is_reconnected_with_one_line_each_way(camera):
    source, lines = live(camera.url)

    def outage(i):
        if i == 5:  # the camera goes away for a second (its process restarts), then comes back on the same port
            camera.stop()
            threading.Timer(1.0, camera.start).start()

    try:
        t0 = time.monotonic()
        frames = take(source, 15, during=outage)
        elapsed = time.monotonic() - t0
    finally:
        source.close()
    assert [f.index for f in frames] == list(range(15))
    assert source.outages == 1 and source.reconnects == 1 and source.resumed_at[0] <= 6
    assert len(lines) == 2, lines  # one when it went, one when it came back; none per attempt
    assert "is down: the source stopped delivering frames" in lines[0] and "reconnecting with backoff" in lines[0]
    assert "is back after" in lines[1] and "reconnect 1" in lines[1]
    assert source.down_s >= 0.9 and elapsed < 15


def test_a_stream_that_stalls_with_the_connection_open_is_reconnected(camera):
    source, lines = live(camera.url, stall_timeout_s=0.5)

    def stall(i):
        if i == 3:
            camera.hang.set()  # the connection stays open and nothing comes: only the watchdog notices
            threading.Timer(1.0, camera.hang.clear).start()

    try:
        frames = take(source, 10, during=stall)
    finally:
        source.close()
    assert len(frames) == 10 and source.outages >= 1 and source.reconnects == source.outages
    assert any("no frame for 0.5 s" in line or "stopped delivering" in line for line in lines)


def test_stop_ends_a_live_source_that_is_down(camera):
    """Ctrl-C must not wait for a camera that may never come back: the reconnect loop ends on the stop event."""
    stop = threading.Event()
    source = LiveSource(SourceSettings(stream=camera.url, stall_timeout_s=0.5, reconnect_max_s=30.0), 32,
                        stop=stop, log=lambda msg: None)
    frames = []

    def consume():
        for frame in source:
            frames.append(frame)
            if len(frames) == 2:
                camera.stop()  # gone for good

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    t_end = time.monotonic() + 10
    while source.outages == 0 and time.monotonic() < t_end:
        time.sleep(0.05)
    time.sleep(0.3)  # in the reconnect loop by now
    assert reader.is_alive() and source.outages == 1
    t0 = time.monotonic()
    stop.set()
    reader.join(timeout=5)
    assert not reader.is_alive() and time.monotonic() - t0 < 2
    source.close()


def test_https_mjpeg(tmp_path):
    from cloud.security import make_dev_cert

    certs = make_dev_cert(tmp_path / "certs")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certs.cert), str(certs.key))
    server = MjpegServer(tls=context).start()
    source, _ = live(server.url)
    try:
        assert len(take(source, 3)) == 3
    finally:
        source.close()
        server.stop()


def test_a_source_that_does_not_open_at_start_up_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=r"stream http://admin:\*\*\*@127.0.0.1:\d+/x could not be opened within 2 s: "
                                          r"check the URL"):
        live(f"http://admin:hunter2@127.0.0.1:{port}/x")
    assert time.monotonic() - t0 < 10
    with pytest.raises(SourceError, match=r"camera /dev/video97 could not be opened .*v4l2-ctl"):
        LiveSource(SourceSettings(camera="/dev/video97"), 32)
    with pytest.raises(SourceError, match=r"camera 9 could not be opened \(no /dev/video9"):
        LiveSource(SourceSettings(camera=9), 32)


def test_backoff_doubles_up_to_its_cap_with_jitter():
    backoff = Backoff(0.5, 4.0, random.Random(1))
    delays = [backoff.next() for _ in range(7)]
    steps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert all(step / 2 <= d <= step for d, step in zip(delays, steps))
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5


@pytest.mark.slow
def test_the_agent_answers_every_frame_after_the_camera_comes_back(camera, tmp_path):
    """edge-agent --stream URL over the camera above; the camera goes away mid-run and comes back. The run ends
    by --limit (never because the camera went away), in bounded time, and every frame taken after the recovery is
    answered, in order."""
    out = tmp_path / "frames.jsonl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_cloud = f"127.0.0.1:{s.getsockname()[1]}"
    lines: list[str] = []
    app = edge_agent.build_app(["--stream", camera.url, "--limit", "60", "--cloud", dead_cloud, "--device-gflops", "30",
                                "--calibration-frames", "4", "--quiet", "--output", str(out), "--stall-timeout-s",
                                "1", "--reconnect-max-s", "1", "--no-cloud-check", "--metrics-port", "0"],
                               log=lines.append)

    def outage():
        while app.agent is None or app.agent.counters.answered < 15:
            if app.stop.wait(0.01):
                return
        camera.stop()
        time.sleep(1.5)
        camera.start()

    def bound():  # a run that hangs ends here, and fails below
        if not finished.wait(60):
            app.stop.set()

    finished = threading.Event()
    helpers = [threading.Thread(target=outage, daemon=True), threading.Thread(target=bound, daemon=True)]
    for helper in helpers:
        helper.start()
    try:
        summary = edge_agent.run_app(app)
        app.lines = lines
        metrics = scrape(endpoint_port(app))
    finally:
        finished.set()
        edge_agent.close_app(app)
    assert not summary["interrupted"], "the run did not end by its --limit within 60 s"
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in results] == list(range(len(results)))
    assert summary["frames"] == len(results) and summary["captured"] == summary["frames"] + summary["dropped"]
    assert summary["reconnects"] == 1 and summary["outages"] == 1 and summary["seconds_down"] >= 1.0
    resumed = app.source.source.resumed_at[0]
    after = [r for r in results if r["source_index"] >= resumed]
    indexes = [r["source_index"] for r in results]
    assert indexes == sorted(set(indexes)) and indexes[-1] == 59
    assert len(after) >= 60 - resumed - summary["dropped"] and after  # every frame after the recovery answered
    assert sum("is down" in line for line in lines) == 1 and sum("is back after" in line for line in lines) == 1
    assert metrics[("rapnet_edge_source_reconnects_total", ())] == 1
    assert metrics[("rapnet_edge_source_outages_total", ())] == 1
    assert metrics[("rapnet_edge_captured_frames_total", ())] == summary["captured"]


# ------------------------------------------------------------------------------------------------------
# RTSP: gst-rtsp-server (Debian) on 127.0.0.1, killed and started again
# ------------------------------------------------------------------------------------------------------
RTSP_PACKAGES = "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good"
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin")
RTSP_SERVER = """
import sys
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer
Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(sys.argv[1])
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch("( videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=25/1 ! videoconvert "
                   "! video/x-raw,format=I420 ! jpegenc ! rtpjpegpay name=pay0 pt=26 )")
factory.set_shared(True)
server.get_mount_points().add_factory("/camera", factory)
if server.attach(None) == 0:
    sys.exit("cannot bind port " + sys.argv[1])
print("ready", flush=True)
GLib.MainLoop().run()
"""


def _rtsp_available() -> bool:
    if SYSTEM_PYTHON is None:
        return False
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "assert all(Gst.ElementFactory.find(e) for e in ('videotestsrc', 'jpegenc', 'rtpjpegpay'))")
    return subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, timeout=60).returncode == 0


class RtspServer:
    """gst-rtsp-server in its own process (the system Python), serving rtsp://127.0.0.1:PORT/camera."""

    def __init__(self, tmp_path):
        self.script = tmp_path / "rtsp_server.py"
        self.script.write_text(RTSP_SERVER)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = None

    def start(self) -> "RtspServer":
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(self.script), str(self.port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout.readline().strip() == "ready", "the RTSP server did not start"
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/camera"


@pytest.fixture
def rtsp_camera(tmp_path):
    if not _rtsp_available():
        pytest.skip(f"no RTSP server here: apt-get install --no-install-recommends {RTSP_PACKAGES}")
    server = RtspServer(tmp_path).start()
    yield server
    server.kill()


@pytest.mark.slow
def test_an_rtsp_camera_that_is_killed_and_restarted_is_reconnected(rtsp_camera):
    source, lines = live(rtsp_camera.url, open_timeout_s=5.0)

    def restart(i):
        if i == 5:
            rtsp_camera.kill()
            threading.Timer(1.0, rtsp_camera.start).start()

    try:  # FFmpeg's RTP reorder buffer still holds some frames once the server is gone: read well past them
        frames = take(source, 60, timeout_s=40, during=restart)
    finally:
        source.close()
    assert [f.index for f in frames] == list(range(60)) and source.resumed_at[0] < 60
    assert all(f.pixels.shape == (32, 32, 3) for f in frames)
    assert source.outages == 1 and source.reconnects == 1, lines
    assert len(lines) == 2 and "stream rtsp://127.0.0.1" in lines[0] and "is back after" in lines[1]
