"""Soak: edge agents against the cloud tier for a long run, with a node of the Ray cluster killed near the end.

The cluster is real and local, as in benchmarks/node_failure.py: a head and a second node on 127.0.0.1, one CPU
each, one replica on each. The front is its own process (`rapnet-cloud serve --address` the head), so its memory is
its own. N real `edge-agent` processes (ONNX Runtime, a device modelled at --device-gflops so that most frames
go to the cloud) read the test split paced at --rate frames/s and write one JSON line per answered frame; this
harness reads those lines as they come and stamps them. At --kill-at of the run every process of the second node
is SIGKILLed and a replacement node joins at once.

Measured:
- memory: the resident set of the front and of each replica, sampled every --sample-s; growth per process between
  the end of the warm-up and the kill (the run's steady state), and per hour at that rate;
- latency drift: each agent-answered frame's capture-to-answer p50/p99 per --window-s window;
- frames lost: frames an agent read and never answered (each agent runs --limit frames; its summary counts them);
- the kill: the first cloud answer after it, when Serve noticed the lost replica, when it ran two replicas again,
  and the frames the edges answered themselves meanwhile.

    python benchmarks/soak.py                          # 8 agents, 20 minutes
    python benchmarks/soak.py --agents 2 --minutes 3   # a quick look
Writes benchmarks/results/soak.json and soak.png (memory and p99 over time).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.node_failure import LocalCluster, processes  # noqa: E402
from rapnet.help_format import DefaultsHelpFormatter  # noqa: E402

REPLICA_MARK = "ServeReplica:"  # Ray titles a Serve replica's worker process "ray::ServeReplica:<app>:<deployment>"


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def parent_pid(pid: int) -> int | None:
    try:  # the field after the command name, which may itself hold spaces and parentheses
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def replica_pids(cluster: LocalCluster) -> list[int]:
    """This cluster's replica processes: workers its raylets started (other Ray instances on the host have their own)."""
    raylets = set(cluster.raylet_pids())
    return sorted(pid for pid, cmdline in processes() if cmdline and cmdline[0].startswith("ray::") and
                  REPLICA_MARK in cmdline[0] and parent_pid(pid) in raylets)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tail:
    """The complete lines appended to a file since the last read."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        return [line.decode() for line in lines if line.strip()]


def read_frames(tails: list[Tail], now: float) -> list[dict]:
    """The agents' frames answered since the last read, stamped `now`."""
    return [{"t": now, "agent": i, "where": row["where"], "ms": row["latency_ms"]["total"], "degraded": row["degraded"]}
            for i, tail in enumerate(tails) for row in map(json.loads, tail.read())]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def agent_command(i: int, args, address: str, token_file: Path, folder: Path) -> list[str]:
    return [sys.executable, "-m", "edge.agent", "--dataset", args.dataset, "--split", "test", "--limit", str(args.frames),
            "--rate", f"{args.rate:g}", "--checkpoint", args.checkpoint, "--runtime", "onnx",
            "--device-gflops", f"{args.device_gflops:g}", "--cloud", address, "--token-file", str(token_file),
            "--output", str(folder / f"agent{i}.jsonl"), "--summary-json", str(folder / f"agent{i}.json"), "--quiet"]


def run(args, log=print) -> dict:
    import ray
    from ray import serve

    cluster = LocalCluster()
    front = None
    agents: list[subprocess.Popen] = []
    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    token_file = folder / "token"
    token_file.write_text(secrets.token_urlsafe(24))
    os.chmod(token_file, 0o600)
    samples: list[dict] = []  # the memory and load samples
    frames: list[dict] = []  # (stamp, agent, where, total ms)
    try:
        cluster.start_node("head", head=True)
        cluster.start_node("second")
        log(f"cluster up: {cluster.address}")
        port = free_port()
        address = f"127.0.0.1:{port}"
        front_log = open(folder / "front.log", "w")
        front = subprocess.Popen([sys.executable, "-m", "cloud.cli", "serve", "--checkpoint", args.checkpoint,
                                  "--address", cluster.address, "--port", str(port), "--replicas", "2",
                                  "--max-batch-size", "8", "--token-file", str(token_file)],
                                 cwd=ROOT, stdout=front_log, stderr=subprocess.STDOUT)
        subprocess.run([sys.executable, "-m", "cloud.cli", "health", "--target", address, "--wait", "240",
                        "--while-pid", str(front.pid)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)

        def running_replicas() -> int:
            app = serve.status().applications.get("rapnet")
            dep = next(iter(app.deployments.values()), None) if app else None
            return int(dep.replica_states.get("RUNNING", 0)) if dep else 0

        cluster.wait_for(lambda: running_replicas() == 2 and len(replica_pids(cluster)) == 2, 120, "two replicas")
        log(f"front {address} (pid {front.pid}) serving, replicas {replica_pids(cluster)}")
        # One short agent run first: exports the ONNX graphs into the cache once, and checks the path end to end.
        warm = agent_command(0, argparse.Namespace(**{**vars(args), "frames": 4}), address, token_file, folder / "warm")
        (folder / "warm").mkdir()
        subprocess.run(warm, cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
        for i in range(args.agents):
            agents.append(subprocess.Popen(agent_command(i, args, address, token_file, folder), cwd=ROOT,
                                           stdout=subprocess.DEVNULL, stderr=open(folder / f"agent{i}.log", "w")))
        tails = [Tail(folder / f"agent{i}.jsonl") for i in range(args.agents)]
        start = time.monotonic()
        planned_s = args.frames / args.rate
        kill_s = args.kill_at * planned_s
        killed_at = replicas_back_s = loss_noticed_s = first_cloud_after_kill_s = None
        next_sample = 0.0
        log(f"{args.agents} agents, {args.frames} frames each at {args.rate:g}/s: about {planned_s / 60:.1f} minutes; "
            f"the second node dies at {kill_s / 60:.1f} min")
        while any(a.poll() is None for a in agents):
            now = time.monotonic() - start
            new = read_frames(tails, now)
            frames += new
            if killed_at is not None and first_cloud_after_kill_s is None and any(f["where"] == "cloud" for f in new):
                first_cloud_after_kill_s = now - killed_at
            if now >= next_sample:
                replicas = {pid: rss_mib(pid) for pid in replica_pids(cluster)}
                samples.append({"t": now, "front_mib": rss_mib(front.pid), "replicas_mib": replicas,
                                "load1": os.getloadavg()[0], "frames": len(frames)})
                next_sample += args.sample_s
            if killed_at is not None and replicas_back_s is None:
                # full service: Serve reported the lost replica (fewer than two running), then two running again
                running = running_replicas()
                if running < 2 and loss_noticed_s is None:
                    loss_noticed_s = now - killed_at
                    log(f"Serve noticed the lost replica {loss_noticed_s:.1f} s after the kill")
                elif running == 2 and loss_noticed_s is not None:
                    replicas_back_s = now - killed_at
                    log(f"two replicas running again {replicas_back_s:.1f} s after the kill")
            if killed_at is None and now >= kill_s:
                before = set(replica_pids(cluster))
                cluster.kill_node("second")
                killed_at = time.monotonic() - start
                samples.append({"t": killed_at, "event": "kill", "replicas_before": sorted(before),
                                "replicas_after": replica_pids(cluster)})
                log(f"killed the second node at {killed_at / 60:.1f} min; a replacement joins")
                cluster.start_node("replacement")
            if front.poll() is not None:
                raise RuntimeError(f"the front exited with {front.returncode}; see {folder / 'front.log'}")
            time.sleep(0.5)
        wall_s = time.monotonic() - start
        frames += read_frames(tails, wall_s)  # the last lines
        summaries = []
        for i, a in enumerate(agents):
            path = folder / f"agent{i}.json"
            summaries.append({"returncode": a.returncode,
                              **(json.loads(path.read_text()) if path.exists() else {"missing": True})})
        return analyse(args, samples, frames, summaries, killed_at, first_cloud_after_kill_s, loss_noticed_s, replicas_back_s,
                       wall_s)
    finally:
        for a in agents:
            if a.poll() is None:
                a.send_signal(signal.SIGINT)
        for a in agents:
            with contextlib.suppress(subprocess.TimeoutExpired):
                a.wait(timeout=20)
            if a.poll() is None:
                a.kill()
        if front is not None and front.poll() is None:
            front.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                front.wait(timeout=30)
            if front.poll() is None:
                front.kill()
        if ray.is_initialized():
            ray.shutdown()
        cluster.close()
        log(f"agent and front logs in {folder}")


def analyse(args, samples, frames, summaries, killed_at, first_cloud_after_kill_s, loss_noticed_s, replicas_back_s,
            wall_s) -> dict:
    warm_s = args.warmup_s
    steady = [s for s in samples if "event" not in s and warm_s <= s["t"] < (killed_at or wall_s)]

    def growth(values: list[tuple[float, float]]) -> dict | None:
        values = [(t, v) for t, v in values if v is not None]
        if len(values) < 6:  # a process seen for under a minute: no trend to read
            return None
        # the median of the first and of the last three samples: one sample catches a batch's transient buffers
        (t0, v0), (t1, v1) = ((statistics.median(t for t, _ in part), statistics.median(v for _, v in part))
                              for part in (values[:3], values[-3:]))
        return {"start_mib": round(v0, 1), "end_mib": round(v1, 1), "growth_mib": round(v1 - v0, 1),
                "minutes": round((t1 - t0) / 60, 1), "mib_per_hour": round((v1 - v0) / max(t1 - t0, 1) * 3600, 1)}

    replica_ids = sorted({pid for s in steady for pid in s["replicas_mib"]})
    memory = {"front": growth([(s["t"], s["front_mib"]) for s in steady]),
              "replicas": {str(pid): growth([(s["t"], s["replicas_mib"].get(pid)) for s in steady]) for pid in replica_ids}}
    windows = []
    edges = [*range(0, int(wall_s), args.window_s), wall_s]  # the last window ends with the run
    for lo, hi in zip(edges, edges[1:]):
        rows = [f for f in frames if lo <= f["t"] < hi or (hi == wall_s and f["t"] == wall_s)]
        ms = [f["ms"] for f in rows]
        windows.append({"from_s": lo, "to_s": hi, "frames": len(rows), "p50_ms": percentile(ms, 50),
                        "p99_ms": percentile(ms, 99),
                        "cloud_share": round(sum(f["where"] == "cloud" for f in rows) / len(rows), 3) if rows else None,
                        "fallback": sum(f["where"] == "edge-fallback" for f in rows),
                        "kill_inside": killed_at is not None and lo <= killed_at < hi})
    clean = [w for w in windows if w["from_s"] >= warm_s and not w["kill_inside"] and w["frames"] and w["to_s"] <= wall_s
             and (killed_at is None or w["to_s"] <= killed_at)]
    read = sum(s.get("captured", 0) or 0 for s in summaries)
    answered = sum(s.get("frames", 0) or 0 for s in summaries)
    expected = args.agents * args.frames
    after_kill = [f for f in frames if killed_at is not None and f["t"] >= killed_at]
    return {
        "benchmark": "soak",
        "what": f"{args.agents} edge-agent processes (ONNX Runtime, device modelled at {args.device_gflops:g} GFLOP/s) "
                f"at {args.rate:g} frames/s each on the {args.dataset} test split, against `rapnet-cloud serve` on a "
                "two-node local Ray cluster (1 CPU and one replica per node); the second node SIGKILLed at "
                f"{args.kill_at:.0%} of the run, a replacement node started at once",
        "checkpoint": Path(args.checkpoint).name, "agents": args.agents, "frames_per_agent": args.frames,
        "rate_fps": args.rate, "wall_minutes": round(wall_s / 60, 1), "warmup_s": warm_s,
        "frames_expected": expected, "frames_answered_in_output": len(frames),
        "frames_answered_by_summaries": answered, "frames_captured_by_summaries": read,
        "frames_dropped_by_summaries": sum(s.get("dropped", 0) or 0 for s in summaries),
        "frames_lost": expected - len(frames),
        "agents_failed": sum(s["returncode"] != 0 for s in summaries),
        "cloud_share": round(sum(f["where"] == "cloud" for f in frames) / max(len(frames), 1), 3),
        "memory_steady_state": memory,
        "p99_first_clean_window_ms": clean[0]["p99_ms"] if clean else None,
        "p99_last_clean_window_ms": clean[-1]["p99_ms"] if clean else None,
        "p99_drift": round(clean[-1]["p99_ms"] / clean[0]["p99_ms"], 2) if len(clean) >= 2 and clean[0]["p99_ms"] else None,
        "kill": None if killed_at is None else {
            "at_s": round(killed_at, 1), "first_cloud_answer_after_s": None if first_cloud_after_kill_s is None
            else round(first_cloud_after_kill_s, 2),
            "loss_noticed_after_s": None if loss_noticed_s is None else round(loss_noticed_s, 1),
            "two_replicas_again_after_s": None if replicas_back_s is None else round(replicas_back_s, 1),
            "edge_fallback_frames_after": sum(f["where"] == "edge-fallback" for f in after_kill)},
        "windows": windows, "samples": samples,
        "summaries": [{k: s.get(k) for k in ("returncode", "frames", "captured", "dropped", "offloaded", "degraded", "accuracy")}
                      for s in summaries],
        "note": "2-core host shared with other work (load1 in the samples); agents, front and both Ray nodes share it",
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in result["samples"] if "event" not in s]
    fig, (mem, lat) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    mem.plot([s["t"] / 60 for s in samples], [s["front_mib"] for s in samples], label="front")
    for pid in sorted({p for s in samples for p in s["replicas_mib"]}):
        pts = [(s["t"] / 60, s["replicas_mib"][pid]) for s in samples if s["replicas_mib"].get(pid) is not None]
        mem.plot(*zip(*pts), label=f"replica pid {pid}")
    mem.set_ylabel("resident set, MiB")
    mem.legend(fontsize=8)
    w = [x for x in result["windows"] if x["p99_ms"] is not None]
    mid = [(x["from_s"] + x["to_s"]) / 120 for x in w]
    lat.plot(mid, [x["p99_ms"] for x in w], marker="o", label="p99")
    lat.plot(mid, [x["p50_ms"] for x in w], marker="o", label="p50")
    lat.set_ylabel("capture to answer, ms")
    lat.set_xlabel("minutes")
    lat.legend(fontsize=8)
    if result["kill"]:
        for ax in (mem, lat):
            ax.axvline(result["kill"]["at_s"] / 60, color="red", linestyle="--", linewidth=1)
        lat.annotate("second node killed", (result["kill"]["at_s"] / 60, lat.get_ylim()[1] * 0.9), color="red", fontsize=8)
    fig.suptitle(f"soak: {result['agents']} agents x {result['wall_minutes']} min, {result['frames_lost']} frames lost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from rapnet.machine import machine_info
    from rapnet.shipped import CAMERA_DATASET, model_for

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--dataset", default=CAMERA_DATASET, help="the agents' source (its test split)")
    parser.add_argument("--checkpoint", default=None, help="model (default: the shipped one for --dataset)")
    parser.add_argument("--agents", type=int, default=8, help="edge-agent processes")
    parser.add_argument("--minutes", type=float, default=20.0, help="planned length (sets each agent's frame count)")
    parser.add_argument("--rate", type=float, default=3.0, help="frames/s each agent reads")
    parser.add_argument("--device-gflops", type=float, default=2.0, help="the agents' modelled device speed")
    parser.add_argument("--kill-at", type=float, default=0.75, help="when the second node dies, as a share of the run")
    parser.add_argument("--warmup-s", type=int, default=120, help="start of the steady state the memory growth uses")
    parser.add_argument("--window-s", type=int, default=120, help="latency window")
    parser.add_argument("--sample-s", type=float, default=10.0, help="memory sample interval")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/soak.json"), help="result file (and .png)")
    args = parser.parse_args(argv)
    args.checkpoint = args.checkpoint or str(model_for(args.dataset))
    args.frames = int(round(args.minutes * 60 * args.rate))
    args.warmup_s = min(args.warmup_s, int(args.minutes * 60 * 0.25))
    result = run(args, log=lambda m: print(f"[soak {time.strftime('%H:%M:%S')}] {m}", flush=True))
    result["machine"] = machine_info()
    result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                      text=True).stdout.strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("frames_lost", "agents_failed", "cloud_share", "memory_steady_state",
                                             "p99_first_clean_window_ms", "p99_last_clean_window_ms", "p99_drift",
                                             "kill")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
