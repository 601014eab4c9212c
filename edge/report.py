"""What the agent tells its user: JSON lines per frame, a live status line, and the summary table."""
from __future__ import annotations

import json
import sys
import time
from collections import Counter

import numpy as np

from .pipeline import FrameResult

BREAKDOWN = ("preprocess", "predictor", "decide", "local", "encode", "network", "cloud_queue", "cloud_decode",
             "cloud_compute", "fallback", "service", "total")


class Stats:
    """Running totals over answered frames (the status line and the summary read them)."""

    def __init__(self, num_exits: int):
        self.num_exits = num_exits
        self.t0 = time.perf_counter()
        self.n = self.offloaded = self.degraded = self.labelled = self.correct = self.cloud_picked = 0
        self.bytes_sent = 0
        self.total_ms: list[float] = []
        self.parts: dict[str, list[float]] = {k: [] for k in BREAKDOWN}
        self.exits = Counter()
        self.where = Counter()
        self.reasons = Counter()
        self.last_at = self.t0

    def add(self, r: FrameResult) -> None:
        self.n += 1
        self.offloaded += r.where == "cloud"
        self.cloud_picked += r.exit_picked_by == "cloud"
        self.degraded += r.degraded
        self.bytes_sent += r.bytes_sent
        self.where[r.where] += 1
        self.exits[r.exit] += 1
        if r.degraded_reason:
            self.reasons[r.degraded_reason.split(":")[0]] += 1
        if r.label is not None:
            self.labelled += 1
            self.correct += bool(r.correct)
        self.total_ms.append(r.latency_ms.get("total", 0.0))
        for k in BREAKDOWN:
            if k in r.latency_ms:
                self.parts[k].append(r.latency_ms[k])
        self.last_at = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return max(self.last_at - self.t0, 1e-9)

    @property
    def fps(self) -> float:
        return self.n / self.elapsed if self.n else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def offload_share(self) -> float:
        return self.offloaded / self.n if self.n else 0.0

    def percentile(self, q: float, values=None) -> float:
        values = self.total_ms if values is None else values
        return float(np.percentile(values, q)) if values else float("nan")

    def status_line(self, estimate: dict | None, breaker: str | None, dropped: int) -> str:
        acc = f" acc {self.accuracy:.3f}" if self.accuracy is not None else ""
        net = (f" bw~{estimate['bandwidth_mbps']:.0f}Mb/s rtt~{estimate['rtt_ms']:.1f}ms" if estimate and estimate["samples"]
               else " bw: no sample yet" if estimate else " cloud: none")
        return (f"[edge] {self.n} frames  {self.fps:5.1f} fps  offload {100 * self.offload_share:4.1f}%  "
                f"p50 {self.percentile(50):6.1f} ms  degraded {self.degraded}  dropped {dropped}{acc}{net}"
                + (f"  circuit {breaker}" if breaker and breaker != "closed" else ""))

    def summary(self, extra: dict | None = None) -> dict:
        out = {
            "frames": self.n, "seconds": round(self.elapsed, 3), "fps": round(self.fps, 2),
            "offloaded": self.offloaded, "offload_share": round(self.offload_share, 4),
            "exit_picked_by_cloud": self.cloud_picked,
            "degraded": self.degraded, "degraded_reasons": dict(self.reasons), "where": dict(self.where),
            "accuracy": None if self.accuracy is None else round(self.accuracy, 4), "labelled": self.labelled,
            "exit_histogram": [self.exits.get(k, 0) for k in range(self.num_exits)],
            "bytes_sent_total": self.bytes_sent,
            "bytes_per_offloaded_frame": round(self.bytes_sent / self.offloaded, 1) if self.offloaded else 0,
            "latency_ms": {"p50": round(self.percentile(50), 3), "p90": round(self.percentile(90), 3),
                           "p99": round(self.percentile(99), 3)},
            "breakdown_mean_ms": {k: round(float(np.mean(v)), 3) for k, v in self.parts.items() if v},
        }
        out.update(extra or {})
        return out


def summary_table(summary: dict) -> str:
    """The end-of-run table (plain text, for stderr)."""
    s = summary
    rows = [
        ("frames answered", f"{s['frames']}" + (f"  (captured {s['captured']}, dropped {s['dropped']})" if "captured" in s else "")),
        ("throughput", f"{s['fps']:.1f} frames/s over {s['seconds']:.1f} s"),
        ("answered on the edge", f"{s['where'].get('edge', 0)}"),
        ("offloaded (cloud answered)", f"{s['offloaded']}  ({100 * s['offload_share']:.1f}%)"
                                       + (f", {s['exit_picked_by_cloud']} with the exit picked there"
                                          if s.get("exit_picked_by_cloud") else "")),
        ("degraded", f"{s['degraded']}" + (f"  {s['degraded_reasons']}" if s['degraded_reasons'] else "")),
        ("accuracy", "n/a (unlabelled source)" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%  ({s['labelled']} labelled)"),
        ("exit histogram", " ".join(str(v) for v in s["exit_histogram"])),
        ("bytes sent", f"{s['bytes_sent_total']}  ({s['bytes_per_offloaded_frame']:.0f} per offloaded frame)"),
        ("latency p50 / p90 / p99", f"{s['latency_ms']['p50']:.1f} / {s['latency_ms']['p90']:.1f} / {s['latency_ms']['p99']:.1f} ms"),
    ]
    if s.get("device_gflops"):
        rows.append(("device (planner's model)", f"{s['device_gflops']:.1f} GFLOP/s"
                                                 + (" measured at start-up" if s.get("device_gflops_measured") else "")))
    if "network_estimate" in s and s["network_estimate"]:
        e = s["network_estimate"]
        rows.append(("network estimate", f"{e['bandwidth_mbps']:.1f} Mbit/s, rtt {e['rtt_ms']:.2f} ms, cloud queue "
                                         f"{e['cloud_queue_ms']:.2f} ms ({e['samples']} calls)"))
    if "circuit_trips" in s:
        rows.append(("circuit breaker", f"opened {s['circuit_trips']} times, now {s['circuit_state']}"))
    if "cloud_check" in s:
        rows.append(("start-up check of the cloud", f"{s['cloud_check']} after {s['cloud_check_attempts']} attempt"
                                                    + ("s" if s["cloud_check_attempts"] != 1 else "")))
    if "reconnects" in s:
        rows.append(("live source", f"{s['outages']} outages, {s['reconnects']} reconnects, "
                                    f"{s['seconds_down']:.1f} s without frames"))
    parts = s.get("breakdown_mean_ms", {})
    if parts:
        rows.append(("mean ms per stage", "  ".join(f"{k} {v:.2f}" for k, v in parts.items())))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 60)
    return "\n".join([line, "edge-agent summary", line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])


class JsonLines:
    """One JSON object per answered frame, flushed per line, to a file or stdout ('-')."""

    def __init__(self, target: str | None, classes: list[str] | None = None, stdout=None):
        self.classes = classes
        self._own = target not in (None, "-")
        stdout = stdout or sys.stdout
        self._fh = None if target is None else (stdout if target == "-" else open(target, "w", encoding="utf-8"))

    def write(self, result: FrameResult) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(result.to_json(self.classes)) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._own and self._fh is not None:
            self._fh.close()


class StatusLine:
    """A live line on stderr: redrawn in place on a terminal, one line every `every_s` otherwise."""

    def __init__(self, stream=None, every_s: float | None = None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s if every_s is not None else (0.25 if self.tty else 2.0)
        self.enabled = enabled
        self._last = 0.0
        self._width = 0

    def show(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < self.every_s):
            return
        self._last = now
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
