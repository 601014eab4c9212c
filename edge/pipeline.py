"""The edge agent's per-frame work and the threads that overlap it.

    capture thread ──frames (bounded)──▶ compute thread ──jobs (bounded)──▶ network threads (N)
    (source; live: latest frame wins)     preprocess, predictor,            send with a deadline; on any
                                          plan, local stages or             failure answer from the deepest
                                          edge part + encode                local exit (degraded)
                          └────────────────────────── results ──────────────────────┘
                                                       ▼
                                     caller's thread: results in frame order (EdgeAgent.run yields them)

Every frame the compute thread takes gets a result; a live source's frames that were replaced by a newer one
before the compute thread took them are counted in `dropped`. Nothing else is ever skipped.

The network runs through a rapnet.execution runtime (ONNX Runtime or PyTorch, edge.runtime picks), on numpy
arrays: with ONNX Runtime nothing on this path imports torch.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from rapnet.class_names import readable
from rapnet.codec import build_request, encode_options
from rapnet.execution import as_runtime, top_probability
from rapnet.preprocess import to_model_array

from .config import AgentSettings
from .decide import Decider
from .frames import Frame, Source
from .link import CloudCallError, CloudLink

_END = object()


@dataclass
class FrameResult:
    """One answered frame: what the JSON line says."""

    frame: int
    source_index: int
    class_index: int
    confidence: float
    exit: int
    target_exit: int
    where: str  # "edge", "cloud", or "edge-fallback"
    split: int | None  # edge ran stages [0, split) before sending; None when answered locally
    encoding: str | None
    bytes_sent: int
    bytes_received: int
    latency_ms: dict
    degraded: bool = False
    degraded_reason: str | None = None
    label: int | None = None
    name: str | None = None
    score: float | None = None  # the predictor's score for the target exit
    planned_offload: bool = False
    expected_latency_ms: float | None = None
    exit_picked_by: str = "edge"  # "cloud": the edge skipped its predictor and let the cloud pick (CloudExit)
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)  # for --display; not written

    @property
    def correct(self) -> bool | None:
        return None if self.label is None else self.class_index == self.label

    def to_json(self, classes: list[str] | None = None) -> dict:
        out = {"frame": self.frame, "source_index": self.source_index, "class": self.class_index}
        if classes is not None and 0 <= self.class_index < len(classes):
            class_id = classes[self.class_index]
            out["class_name"] = readable(class_id)
            if out["class_name"] != class_id:
                out["class_id"] = class_id  # the model's own name for it (a WordNet id)
        out.update({
            "confidence": round(self.confidence, 5), "exit": self.exit, "target_exit": self.target_exit,
            "where": self.where, "split": self.split, "encoding": self.encoding, "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
            "expected_latency_ms": None if self.expected_latency_ms is None else round(self.expected_latency_ms, 3),
            "predictor_score": None if self.score is None else round(self.score, 5),
            "exit_picked_by": self.exit_picked_by,
            "degraded": self.degraded,
        })
        if self.degraded_reason:
            out["degraded_reason"] = self.degraded_reason
        if self.name is not None:
            out["name"] = self.name
        if self.label is not None:
            out["label"] = self.label
            out["correct"] = self.correct
        return out


@dataclass
class _Job:
    frame: Frame
    frame_id: int
    x: np.ndarray
    scores: np.ndarray
    plan: object
    conditions: object
    carry: dict
    data: bytes
    lat: dict
    t_start: float
    request_id: str = ""  # the answer must name it (CloudLink.infer's expect)


@dataclass
class Counters:
    captured: int = 0
    dropped: int = 0  # live source only: replaced by a newer frame before processing
    answered: int = 0
    errors: list = field(default_factory=list)


def _sleep_to(lat: dict, step: str, pad_ms: float) -> None:
    """--emulate-device: sleep `pad_ms` (if positive) and book it to `step` and to `emulation_pad`."""
    if pad_ms > 0:
        time.sleep(pad_ms / 1e3)
        lat[step] += pad_ms
        lat["emulation_pad"] = lat.get("emulation_pad", 0.0) + pad_ms


class EdgeAgent:
    """Runs a source through the model and the cloud. `run()` yields FrameResults in frame order.

    `model`: a rapnet.execution runtime, or a MultiExitNetwork (run by PyTorch)."""

    def __init__(self, model, identity: str, decider: Decider, link: CloudLink | None, settings: AgentSettings,
                 stop: threading.Event | None = None):
        self.model = as_runtime(model, identity)
        self.decider, self.link, self.settings = decider, link, settings
        self.contract = self.model.contract
        self.stop = stop or threading.Event()
        self.counters = Counters()
        self._encode_options = {}

    # ---- per-frame work ---------------------------------------------------------------------------------
    def _options(self, encoding: str):
        opts = self._encode_options.get(encoding)
        if opts is None:
            opts = self._encode_options[encoding] = encode_options(encoding)
        return opts

    def _conditions(self, available: bool = True):
        est = self.link.estimate.snapshot() if self.link is not None else None
        if est is None:
            return self.decider.conditions(cloud_available=False)
        return self.decider.conditions(est["bandwidth_mbps"], est["rtt_ms"], est["cloud_queue_ms"], available)

    def _local_result(self, frame: Frame, frame_id: int, logits: np.ndarray, exit_index: int, target: int,
                      lat: dict, t_start: float, plan, score: float | None, degraded: str | None = None,
                      split=None, encoding=None, sent=0, received=0, where="edge") -> FrameResult:
        cls, conf = int(np.argmax(logits[0])), float(top_probability(logits)[0])
        return self._finish(FrameResult(
            frame_id, frame.index, cls, conf, exit_index, target, where, split, encoding, sent, received,
            lat, degraded is not None, degraded, frame.label, frame.name, score, bool(plan.offload),
            float(plan.expected_latency_ms)), frame, t_start)

    @staticmethod
    def _finish(result: FrameResult, frame: Frame, t_start: float) -> FrameResult:
        result.pixels = frame.pixels
        now = time.perf_counter()
        result.latency_ms["service"] = (now - t_start) * 1e3 + frame.fit_ms
        result.latency_ms["total"] = (now - frame.captured) * 1e3
        return result

    def process(self, frame: Frame, frame_id: int) -> FrameResult | _Job:
        """Preprocess, predict, decide; answer locally or return a job for the network threads."""
        t_start = time.perf_counter()
        lat = {"preprocess": frame.fit_ms}
        t = time.perf_counter()
        x = to_model_array(frame.pixels)
        lat["preprocess"] += (time.perf_counter() - t) * 1e3
        use = self.settings.use_predictor and self.model.has_predictor
        t = time.perf_counter()
        conditions = self._conditions()
        # The image goes to the cloud whatever the predictor says: skip it here, the cloud picks the exit.
        plan = self.decider.cloud_exit_plan(conditions) if use else None
        if plan is not None and self.link.admit() is not None:
            plan = None
        lat["decide"] = (time.perf_counter() - t) * 1e3
        cloud_exit = plan is not None
        scores, degraded = None, None
        t = time.perf_counter()
        if use and not cloud_exit:
            scores = self.model.exit_scores(x)[0]
        lat["predictor"] = (time.perf_counter() - t) * 1e3
        if not cloud_exit:
            t = time.perf_counter()
            plan = self.decider.plan(scores, conditions)
            refused = self.link.admit() if plan.offload else None
            if refused is not None:  # the circuit is open, or the start-up check found the cloud unusable
                degraded = refused
                plan = self.decider.local_plan(scores, conditions)
            lat["decide"] += (time.perf_counter() - t) * 1e3
        score = None if scores is None else float(scores[plan.exit_index])
        stop = self.decider.stop_confidence  # capped rule: exits on the way answer when this confident
        if not plan.offload:
            t = time.perf_counter()
            if stop:
                logits, used = self.model.run_until_confident(x, stop, last_exit=plan.exit_index)
            else:
                logits, used = self.model.run_to_exit(x, plan.exit_index), plan.exit_index
            lat["local"] = (time.perf_counter() - t) * 1e3
            self._emulate(lat, conditions, use, exit_index=used)
            return self._local_result(frame, frame_id, logits, used, plan.exit_index, lat, t_start, plan,
                                      score, degraded)
        t = time.perf_counter()
        if stop and plan.split > 0:
            carry, answer = self.model.edge_part_capped(x, plan.split, stop)
        else:
            carry, answer = self.model.edge_part(x, plan.split), None
        lat["local"] = (time.perf_counter() - t) * 1e3
        if answer is not None:  # an exit before the split was confident: nothing to send
            logits, used = answer
            self._emulate(lat, conditions, use, exit_index=used)
            return self._local_result(frame, frame_id, logits, used, plan.exit_index, lat, t_start, plan,
                                      score, degraded)
        self._emulate(lat, conditions, use and not cloud_exit, split=plan.split)
        t = time.perf_counter()
        try:
            request = build_request(self.contract, carry, plan.split, plan.exit_index, self._options(plan.encoding),
                                    image=frame.pixels if "image" in carry else None,
                                    deadline_ms=int(self.settings.deadline_ms),
                                    cloud_exit_price=self.decider.price if cloud_exit else None,
                                    stop_confidence=self.decider.stop_confidence_for(plan.encoding))
            data = request.SerializeToString()
        except Exception as err:  # noqa: BLE001 - a frame the codec refuses is answered locally, flagged
            self.link.breaker.failure()
            data, failure = b"", f"CLIENT_ERROR: {err}"
        else:
            failure = None
        lat["encode"] = (time.perf_counter() - t) * 1e3
        if failure is None:
            self._emulate_encode(lat, conditions, plan)
        job = _Job(frame, frame_id, x, scores, plan, conditions, carry, data, lat, t_start,
                   request.request_id if failure is None else "")
        if failure is not None:
            return self._fallback(job, failure)
        return job

    def _emulate(self, lat: dict, conditions, predictor: bool, **where) -> None:
        """--emulate-device: sleep until predictor + local compute took what the modelled device needs (a slower
        device than this CPU; the CPU is left to the rest of the system meanwhile)."""
        if not self.settings.emulate_device:
            return
        modelled = self.decider.device_ms(conditions, predictor=predictor, **where)
        _sleep_to(lat, "local", modelled - lat["predictor"] - lat["local"])

    def _emulate_encode(self, lat: dict, conditions, plan) -> None:
        """--emulate-device: encoding is device work too, and the planner scales its time with the device speed;
        pad it the same way (a PNG of a CIFAR image: 0.14 ms here, 9 ms modelled at 0.5 GFLOP/s)."""
        if not self.settings.emulate_device:
            return
        modelled = self.decider.planner.codec_scaled(plan.split, plan.encoding, conditions)[0]
        _sleep_to(lat, "encode", modelled - lat["encode"])

    def send(self, job: _Job) -> FrameResult:
        """Network thread: one request with the deadline; any failure -> fallback."""
        t = time.perf_counter()
        try:
            reply = self.link.infer(job.data, expect=(job.request_id, self.contract.identity, job.plan.split))
        except CloudCallError as err:
            job.lat["network"] = (time.perf_counter() - t) * 1e3  # time lost waiting for the failed call
            return self._fallback(job, err.code)
        r, t = reply.response, reply.response.timings
        job.lat.update(network=reply.network_ms, cloud_queue=float(t.queue_ms), cloud_decode=float(t.decode_ms),
                       cloud_compute=float(t.compute_ms))
        conf = float(r.top_k[0].score) if len(r.top_k) else float("nan")
        result = FrameResult(job.frame_id, job.frame.index, int(r.class_index), conf, int(r.exit_used),
                             job.plan.exit_index, "cloud", job.plan.split, job.plan.encoding, reply.bytes_sent,
                             reply.bytes_received, job.lat, False, None, job.frame.label, job.frame.name,
                             None if job.scores is None else float(job.scores[job.plan.exit_index]), True,
                             float(job.plan.expected_latency_ms))
        if job.plan.breakdown.get("cloud_exit"):
            result.exit_picked_by = "cloud"
        return self._finish(result, job.frame, job.t_start)

    def _fallback(self, job: _Job, reason: str) -> FrameResult:
        """Answer from the deepest exit the edge computed; if the split left none, continue the carry locally
        to the deepest exit the device affords within the budget."""
        t = time.perf_counter()
        split, model = job.plan.split, self.model
        k = model.deepest_local_exit(split)
        if k is not None:
            try:
                logits = model.local_exit_logits(job.carry, split)
            except ValueError:  # the exit's features did not cross the split: recompute them
                logits = model.run_to_exit(job.x, k)
        else:
            first = next(i for i, s in enumerate(model.exit_stages) if s >= split)
            target = job.plan.exit_index
            if job.scores is None and job.plan.breakdown.get("cloud_exit"):
                # the cloud was to pick the exit: run the predictor now rather than the whole network
                job.scores = model.exit_scores(job.x)[0]
                target = self.decider.local_plan(job.scores, job.conditions).exit_index
            k = self.decider.fallback_exit(job.conditions, target, first)
            logits = model.cloud_part(job.carry, split, k)  # runs stages [split, exit k] here, on the edge
        job.lat["fallback"] = (time.perf_counter() - t) * 1e3
        return self._local_result(job.frame, job.frame_id, logits, k, job.plan.exit_index, job.lat, job.t_start,
                                  job.plan, None if job.scores is None else float(job.scores[job.plan.exit_index]),
                                  degraded=reason, split=split, encoding=job.plan.encoding, sent=len(job.data),
                                  where="edge-fallback")

    # ---- threads ----------------------------------------------------------------------------------------
    def _capture(self, source: Source, frames: queue.Queue) -> None:
        try:
            for frame in source:
                if self.stop.is_set():
                    break
                self.counters.captured += 1
                if source.live:
                    while True:  # latest frame wins: replace what the compute thread has not taken yet
                        try:
                            frames.put_nowait(frame)
                            break
                        except queue.Full:
                            try:
                                frames.get_nowait()
                                self.counters.dropped += 1
                            except queue.Empty:
                                pass
                else:
                    while not self.stop.is_set():
                        try:
                            frames.put(frame, timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except Exception as err:  # noqa: BLE001 - reported by run(); the frames read so far are still answered
            self.counters.errors.append(err)
        finally:
            frames.put(_END)

    def _compute(self, frames: queue.Queue, jobs: queue.Queue, results: queue.Queue) -> None:
        frame_id = 0
        try:
            while True:
                frame = frames.get()
                if frame is _END:
                    break
                out = self.process(frame, frame_id)
                frame_id += 1
                (jobs if isinstance(out, _Job) else results).put(out)
        except Exception as err:  # noqa: BLE001
            self.counters.errors.append(err)
            self.stop.set()
            while frames.get() is not _END:  # let the capture thread finish
                pass
        finally:
            for _ in range(self._net_threads):
                jobs.put(_END)
            results.put(_END)

    def _network(self, jobs: queue.Queue, results: queue.Queue) -> None:
        try:
            while True:
                job = jobs.get()
                if job is _END:
                    break
                try:
                    results.put(self.send(job))
                except Exception as err:  # noqa: BLE001 - never lose the frame
                    results.put(self._fallback(job, f"CLIENT_ERROR: {err}"))
        finally:
            results.put(_END)

    def run(self, source: Source, on_idle: Callable[[], None] | None = None) -> Iterator[FrameResult]:
        """Yield every processed frame's result, in frame order. Stops early when `stop` is set (the frames
        already taken are still answered)."""
        live = source.live
        frames: queue.Queue = queue.Queue(maxsize=1 if live else self.settings.frame_queue)
        self._net_threads = self.settings.in_flight if self.link is not None else 0  # one per request in flight
        jobs: queue.Queue = queue.Queue(maxsize=max(1, self.settings.in_flight))
        results: queue.Queue = queue.Queue()
        threads = [threading.Thread(target=self._capture, args=(source, frames), name="edge-capture", daemon=True),
                   threading.Thread(target=self._compute, args=(frames, jobs, results), name="edge-compute", daemon=True)]
        threads += [threading.Thread(target=self._network, args=(jobs, results), name=f"edge-net-{i}", daemon=True)
                    for i in range(self._net_threads)]
        for th in threads:
            th.start()
        pending: dict[int, FrameResult] = {}
        next_id, ends = 0, 0
        while ends < 1 + self._net_threads:
            try:
                item = results.get(timeout=0.25)
            except queue.Empty:
                if on_idle is not None:
                    on_idle()
                continue
            if item is _END:
                ends += 1
                continue
            pending[item.frame] = item
            while next_id in pending:
                self.counters.answered += 1
                yield pending.pop(next_id)
                next_id += 1
        for th in threads:
            th.join(timeout=5)
        for fid in sorted(pending):  # unreachable unless a frame id was skipped; never hide a frame
            self.counters.answered += 1
            yield pending.pop(fid)
        if self.counters.errors:
            raise self.counters.errors[0]
