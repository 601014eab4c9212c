"""rapnet-sim live: the real edge agent and the real cloud on loopback at several sweep points, with the
network shaped in the transport (a TCP proxy: uplink rate + RTT/2 delay each way; `tc netem` is not
available on these machines: "Specified qdisc kind is unknown") and the device emulated by the agent's
--emulate-device; simulated vs measured mean latency per point.

The cloud runs on this CPU, so the simulator is given the reference CPU as the cloud (33.3 GFLOP/s,
20.7 us per layer call), one device, no jitter or loss, and the agent's exit rule and operating point (price or
threshold); the agent runs the model on the simulated devices' runtime (--device-runtime).
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# asyncio's timers wake through epoll, whose timeout is whole milliseconds rounded up: a timed wait overshoots by up
# to 1 ms (0.5 on average), in each direction of every request. The shaper sleeps until this much before a chunk is
# due and yields to the loop for the rest, so the emulated RTT is the RTT asked for.
TIMER_SLACK_S = 0.0015


class Shaper:
    """TCP proxy 127.0.0.1:port -> target: uplink bytes serialised at `bandwidth_mbps`, each direction delayed
    by rtt/2 (downlink not rate-limited: answers are ~100 bytes)."""

    def __init__(self, target: tuple[str, int], bandwidth_mbps: float, rtt_ms: float):
        self.target, self.rate, self.delay = target, bandwidth_mbps * 1e6 / 8, rtt_ms / 2e3
        self.uplink_bytes = 0  # everything the client sent: requests with their gRPC and HTTP/2 framing
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        self.loop.close()

    async def _pipe(self, reader, writer, uplink: bool):
        rate = self.rate if uplink else None
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while True:
                at, data = await queue.get()
                if data is None:
                    writer.close()
                    return
                wait = at - self.loop.time()
                if wait > TIMER_SLACK_S:
                    await asyncio.sleep(wait - TIMER_SLACK_S)
                while self.loop.time() < at:  # the last stretch without a timer: see TIMER_SLACK_S
                    await asyncio.sleep(0)
                writer.write(data)
                await writer.drain()

        task = self.loop.create_task(deliver())
        busy = 0.0
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                now = self.loop.time()
                if uplink:
                    self.uplink_bytes += len(data)
                if rate:
                    busy = max(now, busy) + len(data) / rate
                    at = busy + self.delay
                else:
                    at = now + self.delay
                queue.put_nowait((at, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((0.0, None))
        await task

    async def _handle(self, r_client, w_client):
        try:
            r_server, w_server = await asyncio.open_connection(*self.target)
        except OSError:
            w_client.close()
            return
        try:
            await asyncio.gather(self._pipe(r_client, w_server, True), self._pipe(r_server, w_client, False),
                                 return_exceptions=True)
        finally:
            w_server.close()
            w_client.close()

    def close(self):
        """Stop accepting, drop every proxied connection (both ends see it closed), stop the thread."""
        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(5)


@dataclass
class LivePoint:
    bandwidth_mbps: float
    device_gflops: float
    rtt_ms: float


DEFAULT_POINTS = [LivePoint(1, 0.5, 20), LivePoint(10, 0.5, 20), LivePoint(1, 2, 20), LivePoint(10, 2, 5),
                  LivePoint(50, 5, 5), LivePoint(2, 20, 40)]
CALIBRATION_POINT = LivePoint(1000, 0.5, 0)  # every frame offloaded, no shaping delay


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.5)
    return False


def agent_command(port: int, token: Path, rule: list[str], fps: float, frames: int, point: LivePoint,
                  overhead_ms: float, output: Path, summary: Path, checkpoint: Path, traces: Path, data: str | Path,
                  split: str = "test", extra: tuple = (), runtime: str = "onnx") -> list[str]:
    """The edge agent at one point, running the cloud's checkpoint on the frames of `data` (the dataset the traces
    were built from: its path, or a name rapnet.data finds). It plans from the simulator's traces: the same request
    sizes, codec times and encoding menu (JPEG goes on it only with the traces' labelled held-out accuracies). It runs
    the model on `runtime` (edge-agent --runtime), the simulated devices' (SimConfig.device_runtime)."""
    from .planner import REF_GFLOPS

    return [sys.executable, "-m", "edge.agent", "--dataset", str(data), "--split", split, "--limit", str(frames),
            "--checkpoint", str(checkpoint), "--runtime", runtime, "--traces", str(traces),
            "--rate", str(fps), "--cloud", f"127.0.0.1:{port}", "--token-file", str(token), *rule,
            "--device-gflops", str(point.device_gflops), "--emulate-device", "--cloud-gflops", str(REF_GFLOPS),
            "--fixed-network", "--bandwidth-mbps", str(point.bandwidth_mbps), "--rtt-ms", str(point.rtt_ms),
            "--cloud-overhead-ms", str(overhead_ms), "--summary-json", str(summary), "--quiet", "--output", str(output),
            *extra]


def measure_cloud_overhead(port: int, token: Path, rule: list[str], fps: float, frames: int, tmp: Path,
                           timeout: float, checkpoint: Path, traces: Path, data: str | Path, runtime: str = "onnx") -> dict:
    """The fixed cost per cloud request that the latency model leaves out (gRPC and HTTP/2, the shaping proxy,
    the front, the Ray hop and the batcher's wait), measured once on calibration frames: training
    images, never the test frames the points report. A slow emulated device sends every frame through an
    unshaped proxy; overhead = median(measured service time - the planner's expected latency) over them."""
    point = CALIBRATION_POINT
    shaper = Shaper(("127.0.0.1", port), point.bandwidth_mbps, point.rtt_ms)
    output, summary = tmp / "frames-calibration.jsonl", tmp / "summary-calibration.json"
    try:
        # --no-cloud-exit: the predictor on the edge, as at most points (the serving path is the same either way)
        command = agent_command(shaper.port, token, rule, fps, frames, point, 0.0, output, summary, checkpoint, traces,
                                data, "train", ("--no-cloud-exit",), runtime)
        done = subprocess.run(command,
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    finally:
        shaper.close()
    if done.returncode != 0 or not output.exists():
        raise RuntimeError(f"the calibration run failed: {(done.stderr or done.stdout)[-400:]}")
    frames_out = [json.loads(line) for line in open(output)]
    gaps = sorted(f["latency_ms"]["service"] - f["expected_latency_ms"] for f in frames_out if f.get("where") == "cloud")
    if not gaps:
        raise RuntimeError("the calibration run offloaded no frame; cannot measure the cloud overhead")
    return {"cloud_overhead_ms": round(gaps[len(gaps) // 2], 2), "frames": len(frames_out), "offloaded": len(gaps),
            "point": point.__dict__, "split": "train"}


def run_live(args, settings=None) -> dict:
    from .planner import REF_GFLOPS, REF_LAYER_US, Conditions
    from .simulator import SimConfig, World
    from rapnet.shipped import default_checkpoints

    from .traces import ensure_traces, sample_rows

    checkpoints = default_checkpoints(args.dataset, args.models)
    traces, meta = ensure_traces(checkpoints, args.data, args.cache, settings, dataset=args.dataset)
    cache = Path(meta["path"])
    data = meta["data"]  # the dataset the traces were built from, which the agent reads its frames from
    n = args.frames
    rows = sample_rows(meta, n)  # the test frames the agent's --limit n reads
    sub = {name: _subset(t, rows) for name, t in traces.items()}
    world = World(sub, SimConfig(devices=1, workers=1, fps=args.fps, accuracy_target=args.accuracy_target,
                                 rapnet_rule=args.rapnet_rule, device_runtime=args.device_runtime))
    # the agent runs the simulator's operating point
    policy = "rapnet_capped" if args.capped else "rapnet_split"
    if args.capped:
        rule = ["--price", str(world.capped_setting[0]), "--stop-confidence", str(world.capped_setting[1])]
    elif world.config.rapnet_rule == "price":
        rule = ["--price", str(world.rapnet_price)]
    else:
        rule = ["--threshold", str(world.rapnet_threshold)]
    tmp = Path(tempfile.mkdtemp(prefix="rapnet-live-"))
    token = tmp / "token"
    subprocess.run([sys.executable, "-m", "cloud.cli", "make-token", "--out", str(token)], check=True, cwd=ROOT, capture_output=True)
    port = _free_port()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    cloud = subprocess.Popen([sys.executable, "-m", "cloud.cli", "serve", "--checkpoint", str(checkpoints["rapnet"]),
                              "--port", str(port), "--token-file", str(token), "--ray-temp-dir", str(tmp / "ray")],
                             cwd=ROOT, env=env, stdout=open(tmp / "cloud.log", "w"), stderr=subprocess.STDOUT)
    rows = []
    try:
        if not _wait_port(port, 120):
            raise RuntimeError(f"the cloud did not start on 127.0.0.1:{port}; see {tmp / 'cloud.log'}")
        # The overhead is the serving path's, whatever the rule; measured without the stop confidence, since a
        # frame that stops before its cap beats the plan's expectation (made for the cap) by the compute it saved.
        calibration_rule = ["--price", str(world.capped_setting[0])] if args.capped else rule
        calibration = measure_cloud_overhead(port, token, calibration_rule, args.fps, args.overhead_frames, tmp,
                                             args.timeout, checkpoints["rapnet"], cache, data, args.device_runtime)
        overhead = calibration["cloud_overhead_ms"] if args.cloud_overhead else 0.0
        print(json.dumps({"calibration": calibration, "used_overhead_ms": overhead}), flush=True)
        for p in DEFAULT_POINTS[: args.points]:
            shaper = Shaper(("127.0.0.1", port), p.bandwidth_mbps, p.rtt_ms)
            summary = tmp / f"summary-{len(rows)}.json"
            cmd = agent_command(shaper.port, token, rule, args.fps, n, p, overhead, tmp / f"frames-{len(rows)}.jsonl", summary,
                                checkpoints["rapnet"], cache, data, runtime=args.device_runtime)
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
            shaper.close()
            uplink_bytes = shaper.uplink_bytes
            if done.returncode != 0 or not summary.exists():
                rows.append({**p.__dict__, "error": (done.stderr or done.stdout)[-400:]})
                continue
            measured = json.loads(summary.read_text())
            c = Conditions(p.bandwidth_mbps, p.rtt_ms, p.device_gflops, cloud_gflops=REF_GFLOPS, cloud_layer_us=REF_LAYER_US,
                           cloud_overhead_ms=overhead)
            sim = world.run_policy(policy, c)
            frames = [json.loads(line) for line in open(tmp / f"frames-{len(rows)}.jsonl")]
            service = [f["latency_ms"].get("service", f["latency_ms"].get("total")) for f in frames]
            m = sum(service) / len(service)
            rows.append({**p.__dict__, "simulated_mean_ms": sim.mean_ms, "measured_mean_ms": m,
                         "measured_p50_ms": measured.get("latency_ms", {}).get("p50"),
                         "abs_rel_error": abs(sim.mean_ms - m) / m, "simulated_offload": sim.offload_share,
                         "measured_offload": sum(f.get("where") == "cloud" for f in frames) / len(frames),
                         # the cloud picks the exit (no predictor on the edge): a decision that can flip near its
                         # boundary and move the latency by the predictor's time, so compare it too
                         "simulated_cloud_exit": bool(sim.detail.get("cloud_exit")),
                         "measured_cloud_exit_share":
                             sum(f.get("exit_picked_by") == "cloud" for f in frames) / len(frames),
                         "simulated_accuracy": sim.accuracy, "measured_summary": measured,
                         # what the requests took on the wire, connection set-up included, against what the model
                         # charges (the serialized InferRequest): the difference is gRPC and HTTP/2 framing
                         "uplink_bytes_per_offloaded_frame": uplink_bytes / max(1, measured.get("offloaded", 0)),
                         "modelled_bytes_per_offloaded_frame": measured.get("bytes_per_offloaded_frame")})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "measured_summary"}), flush=True)
    finally:
        cloud.terminate()
        try:
            cloud.wait(30)
        except subprocess.TimeoutExpired:
            cloud.kill()
    errors = [r["abs_rel_error"] for r in rows if "abs_rel_error" in r]
    errors.sort()
    result = {"dataset": args.dataset, "data": data, "checkpoint": str(checkpoints["rapnet"]),
              "device_runtime": args.device_runtime,
              "shaping": "in-transport TCP proxy (tc netem unavailable)", "policy": policy, "agent_rule": rule,
              # the capped rule's stop for JPEG images, which the agent derives from the same traces (its summary's
              # jpeg_stop_confidence)
              "simulated_jpeg_stop": world.capped_jpeg_stop if args.capped else None,
              "points": rows, "frames_per_point": n,
              "calibration": calibration, "cloud_overhead_ms": overhead,
              "median_abs_rel_error": errors[len(errors) // 2] if errors else None, "workdir": str(tmp)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"median |simulated - measured| / measured = {result['median_abs_rel_error']}; wrote {out}")
    return result


def _subset(t, rows):
    """The test samples at `rows` (an index array) of a model's traces (the calibration part stays whole)."""
    from dataclasses import replace

    per_sample = ("correct", "confidence", "scores", "jpeg_correct", "jpeg_confidence", "jpeg_scores")
    return replace(t, **{f: None if getattr(t, f) is None else getattr(t, f)[rows] for f in per_sample})
