"""edge-agent: predictor-driven early exit on the device, split offload to the cloud over gRPC, and a
graceful local fallback.

    edge-agent --dataset cifar10 --limit 500                   # the whole system on this machine
    edge-agent --camera 0 --cloud HEAD:50051 --tls-ca ca.pem --token-file token.txt --output frames.jsonl
    edge-agent --video clip.avi --device-gflops 2 --latency-budget-ms 40 --output -

Without --cloud the agent starts the cloud tier itself on 127.0.0.1 (cloud.server.start_local: local Ray,
the Serve app and the gRPC front) and stops it on exit. See docs/edge.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "rapnet-cifar10.pt"


class SetupError(Exception):
    """Something the user must fix before the agent can run (message says what); exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("source (exactly one)")
    g = src.add_mutually_exclusive_group(required=True)
    g.add_argument("--camera", type=int, metavar="N", help="OpenCV camera index (live: the latest frame wins)")
    g.add_argument("--video", metavar="PATH", help="video file (every frame, in order)")
    g.add_argument("--images", metavar="DIR|ARCHIVE", help="folder of images (recursive) or a tar archive of them")
    g.add_argument("--dataset", metavar="NAME|PATH", help="labelled dataset via rapnet.data (the agent reports accuracy)")
    src.add_argument("--split", default="test", help="dataset split")
    src.add_argument("--limit", type=int, default=0, help="stop after N frames (0: all)")
    src.add_argument("--rate", type=float, default=0.0, metavar="FPS",
                     help="pace a file/dataset source at FPS frames/s, as a camera would deliver it (0: as fast as read)")

    m = p.add_argument_group("model and policy")
    m.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="RAPNet checkpoint (edge and embedded cloud)")
    rule = m.add_mutually_exclusive_group()
    rule.add_argument("--price", type=float, default=None,
                      help="exit rule (default): the exit maximising predictor score - PRICE x relative cost; default: "
                           "the checkpoint metadata's \"price\", else 0.03 (calibrated, see docs/edge.md)")
    rule.add_argument("--threshold", type=float, default=None,
                      help="use the threshold rule instead: the shallowest exit whose predictor score reaches THRESHOLD")
    m.add_argument("--stop-confidence", type=float, default=None, metavar="P",
                   help="capped rule (with the priced rule): the priced rule's exit becomes the deepest the frame may "
                        "run, and the first exit on the way whose top softmax probability reaches P answers; edge "
                        "and cloud both check (docs/results.md, ninth session)")
    m.add_argument("--device-gflops", type=_gflops, default=None, metavar="G|auto",
                   help="the device's compute for the planner, GFLOP/s; auto (default): measured at start-up by timing "
                        "the predictor and the whole network on a calibration frame (what the planner's device model "
                        "needs to predict that time)")
    m.add_argument("--emulate-device", action="store_true",
                   help="pad local compute and encoding (sleep) to the planner's modelled time on --device-gflops G, to "
                        "emulate a device slower than this CPU")
    m.add_argument("--device-layer-us", type=float, default=None, help="per-layer-call cost on the device (default: scaled reference CPU)")
    m.add_argument("--cloud-gflops", type=float, default=100.0)
    m.add_argument("--latency-budget-ms", type=float, default=None, help="per-frame latency budget the planner keeps")
    m.add_argument("--encoding", default="auto",
                   help="what the planner may send: auto (png,raw+zstd,jpeg,int8+zstd,fp16+zstd,fp32+zstd) or a "
                        "comma-separated menu of those; png, raw+zstd and jpeg send the image only (split 0), the others "
                        "encode features (splits >= 1). Lossy ones are used only where they keep the answers: int8 and "
                        "fp16 by agreement on the calibration frames, jpeg by the accuracy in a --traces cache")
    m.add_argument("--bandwidth-mbps", type=float, default=50.0, help="uplink prior, until transfers are measured")
    m.add_argument("--rtt-ms", type=float, default=5.0, help="round-trip prior, until transfers are measured")
    m.add_argument("--fixed-network", action="store_true",
                   help="plan with --bandwidth-mbps/--rtt-ms only (the live estimate is still reported)")
    m.add_argument("--no-cloud-exit", dest="cloud_exit", action="store_false",
                   help="always run the exit predictor here; by default, where sending the image at once is faster "
                        "on average over the rule's exits (on the calibration frames, or the --traces calibration "
                        "images), the edge skips it and the cloud picks the exit (same rule and price)")
    m.add_argument("--cloud-overhead-ms", type=float, default=0.0,
                   help="with --fixed-network: fixed cost per cloud request the planner adds (gRPC, front, Ray hop, "
                        "batching); rapnet-sim live measures it. Without --fixed-network the live estimate holds it")
    m.add_argument("--calibration-frames", type=int, default=16,
                   help="first frames on which real request sizes are measured for the planner")
    m.add_argument("--traces", default=None, help="rapnet-sim trace cache to take request sizes from instead")

    c = p.add_argument_group("cloud")
    c.add_argument("--cloud", metavar="HOST:PORT", default=None,
                   help="the cloud front; default: start the cloud tier locally on 127.0.0.1")
    c.add_argument("--deadline-ms", type=float, default=1000.0, help="per-request deadline; past it the edge answers")
    c.add_argument("--tls-ca", default=None, help="CA certificate that signed the cloud's certificate (TLS)")
    c.add_argument("--tls-cert", default=None, help="client certificate (mutual TLS)")
    c.add_argument("--tls-key", default=None, help="client key (mutual TLS)")
    c.add_argument("--token-file", default=None, help="bearer token file (else $RAPNET_TOKEN); never printed")
    c.add_argument("--in-flight", type=int, default=4, help="requests queued or on the wire at once")
    c.add_argument("--breaker-failures", type=int, default=3, help="consecutive failures that open the circuit")
    c.add_argument("--breaker-cooldown-s", type=float, default=2.0, help="open time before a half-open probe")
    c.add_argument("--max-message-bytes", type=int, default=1 << 20)

    o = p.add_argument_group("output")
    o.add_argument("--output", default=None, metavar="FILE|-", help="JSON lines, one per frame")
    o.add_argument("--summary-json", default=None, metavar="FILE", help="also write the summary as JSON")
    o.add_argument("--display", action="store_true", help="draw the label in an OpenCV window (needs a screen)")
    o.add_argument("--quiet", action="store_true", help="no live status line")
    o.add_argument("--torch-threads", type=int, default=1)
    return p


def _gflops(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        gflops = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number of GFLOP/s nor 'auto'") from None
    if not 0 < gflops < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} GFLOP/s: the device's speed must be a finite number > 0")
    return gflops


def _encodings(value: str) -> tuple[str, ...]:
    from rapnet.codec.menu import parse_encodings

    try:
        return parse_encodings(value)
    except ValueError as err:
        raise SetupError(f"--encoding: {err}") from None


class Display:
    def __init__(self, wanted: bool, classes: list[str] | None, log):
        self.active, self.classes = False, classes
        if not wanted:
            return
        if not os.environ.get("DISPLAY"):
            log("--display ignored: no screen (DISPLAY is not set)")
            return
        import cv2

        try:
            cv2.namedWindow("edge-agent", cv2.WINDOW_NORMAL)
            self.active = True
        except cv2.error:
            log("--display ignored: this OpenCV build has no GUI support (opencv-python-headless)")

    def show(self, pixels, result) -> None:
        if not self.active:
            return
        import cv2

        img = cv2.resize(cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), (320, 320), interpolation=cv2.INTER_NEAREST)
        name = self.classes[result.class_index] if self.classes and result.class_index < len(self.classes) else str(result.class_index)
        text = f"{name} {result.confidence:.2f} exit {result.exit} {result.where}"
        cv2.putText(img, text, (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 255) if result.degraded else (0, 255, 0), 1)
        cv2.imshow("edge-agent", img)
        cv2.waitKey(1)

    def close(self) -> None:
        if self.active:
            import cv2

            cv2.destroyAllWindows()


class _Peeked:
    """A source whose first n frames were read ahead (for the planner's request-size calibration)."""

    def __init__(self, source, n: int, rate: float = 0.0):
        self.source, self.live, self.classes, self.rate = source, source.live, source.classes, rate
        self._it = iter(source)
        self.head = []
        for frame in self._it:
            self.head.append(frame)
            if len(self.head) >= n:
                break

    def __iter__(self):
        import itertools

        head, self.head = self.head, []
        period, t_next = (1.0 / self.rate if self.rate > 0 else 0.0), time.perf_counter()
        for i, frame in enumerate(itertools.chain(head, self._it)):
            if period:
                time.sleep(max(0.0, t_next - time.perf_counter()))
                t_next += period
            if period or i < len(head):  # paced or read ahead at start-up: time it from its delivery
                frame.captured = time.perf_counter()
            yield frame

    def close(self):
        self.source.close()


@dataclass
class EdgeApp:
    """Everything one agent run holds (built by `build_app`, run by `run`). Tests use it in-process."""

    args: argparse.Namespace
    model: object
    metadata: dict
    source: object
    decider: object = None
    link: object = None
    cloud: object = None  # the embedded CloudServer when this process started one
    stop: threading.Event = field(default_factory=threading.Event)
    log: object = None
    json_stream: object = None  # where --output - writes (main() keeps the real stdout for it)
    summary: dict | None = None
    agent: object = None


def _log(msg: str) -> None:
    sys.stderr.write(f"[edge] {msg}\n")
    sys.stderr.flush()


def build_app(argv: list[str] | None = None, log=_log) -> EdgeApp:
    """Parse flags, load the model, open the source, connect to (or start) the cloud, build the planner.
    Raises SetupError for anything the user must fix."""
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.torch_threads))
    from rapnet.checkpoint import CheckpointError, load_model
    from rapnet.exit_rules import check_rule

    from orchestration.planner import MAX_JPEG_ACCURACY_DROP

    from .decide import DecisionSettings, build_decider
    from .frames import SourceError, SourceSpec, open_source
    from .link import CircuitBreaker, CloudLink, NetworkEstimate

    encodings = _encodings(args.encoding)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SetupError("--tls-cert and --tls-key go together (mutual TLS); pass both or neither")
    if args.tls_cert and not args.tls_ca:
        raise SetupError("mutual TLS needs --tls-ca as well (the CA that signed the cloud's certificate)")
    if args.deadline_ms <= 0:
        raise SetupError("--deadline-ms must be > 0")
    try:
        check_rule(args.price, args.threshold, args.stop_confidence, names=("--price", "--threshold", "--stop-confidence"))
    except ValueError as err:
        raise SetupError(str(err)) from None
    if args.emulate_device and args.device_gflops is None:
        raise SetupError("--emulate-device pads this CPU's compute to a slower device's: give that device's speed "
                         "with --device-gflops G")
    if not 0.0 <= args.cloud_overhead_ms < float("inf"):
        raise SetupError("--cloud-overhead-ms must be a finite number >= 0")
    try:
        model, metadata = load_model(args.checkpoint)
    except CheckpointError as err:
        raise SetupError(str(err)) from None
    spec = SourceSpec(args.camera, args.video, args.images, args.dataset, args.split, args.limit)
    try:
        source = _Peeked(open_source(spec, model.config.image_size), max(1, args.calibration_frames), args.rate)
    except SourceError as err:
        raise SetupError(str(err)) from None
    if not source.head:
        source.close()
        raise SetupError(f"{spec.describe()} yielded no frame")
    app = EdgeApp(args, model, metadata, source, log=log)
    try:
        target = _cloud_target(app)
        import numpy as np

        settings = DecisionSettings(price=args.price, threshold=args.threshold, stop_confidence=args.stop_confidence,
                                    device_gflops=args.device_gflops,
                                    device_layer_us=args.device_layer_us, cloud_gflops=args.cloud_gflops,
                                    latency_budget_ms=args.latency_budget_ms, encodings=encodings,
                                    bandwidth_mbps=args.bandwidth_mbps, rtt_ms=args.rtt_ms,
                                    cloud_overhead_ms=args.cloud_overhead_ms, cloud_exit=args.cloud_exit,
                                    fixed_network=args.fixed_network)
        t0 = time.perf_counter()
        try:
            app.decider = build_decider(model, np.stack([f.pixels for f in source.head]), settings, metadata,
                                        args.traces)
        except ValueError as err:  # settings that cannot work together, e.g. a per-layer cost above the measured time
            raise SetupError(str(err)) from None
        measured = " (measured)" if args.device_gflops is None else ""
        log(f"planner ready in {time.perf_counter() - t0:.1f} s ({app.decider.rule} {app.decider.knob}, "
            f"{len(source.head)} calibration frames, device {app.decider.settings.device_gflops:.1f} GFLOP/s{measured})")
        if app.decider.stop_confidence_for("jpeg") != app.decider.stop_confidence:
            log(f"frames sent as JPEG stop at confidence {app.decider.stop_confidence_for('jpeg'):g}, tuned on the trace "
                f"cache's held-out split so that JPEG costs the exits no accuracy")
        if args.encoding != "auto" and "jpeg" in encodings and (0, "jpeg") not in app.decider.planner.menu:
            log(f"--encoding {args.encoding}: JPEG stays off the menu, since whether it costs this model accuracy "
                f"needs labelled held-out frames: pass --traces with a rapnet-sim trace cache of this checkpoint "
                f"(JPEG is used when its exits lose at most {MAX_JPEG_ACCURACY_DROP:.1%} accuracy there on average)")
        app.link = CloudLink(target, args.deadline_ms, CircuitBreaker(args.breaker_failures, args.breaker_cooldown_s),
                             NetworkEstimate(args.bandwidth_mbps, args.rtt_ms))
    except BaseException:
        close_app(app)
        raise
    from rapnet.runtime import freeze_startup_heap

    freeze_startup_heap()  # no 0.2 s collector pauses in the frame loop
    return app


def _cloud_target(app: EdgeApp):
    from rapnet.transport import load_token

    from .link import CloudTarget

    args = app.args
    if args.cloud is not None:
        try:
            token = load_token(args.token_file)
        except ValueError as err:
            raise SetupError(str(err)) from None
        if token is None:
            app.log("no token (--token-file or $RAPNET_TOKEN): the cloud will refuse requests (UNAUTHENTICATED); "
                    "frames that would be offloaded are answered locally, flagged degraded")
        return CloudTarget(args.cloud, token.value if token else None, args.tls_ca, args.tls_cert, args.tls_key,
                           args.max_message_bytes)
    from cloud.server import StartError, start_local

    app.log("starting the cloud tier on 127.0.0.1 (local Ray + Serve + gRPC front; use --cloud HOST:PORT for a remote one)")
    t0 = time.perf_counter()
    try:
        app.cloud = start_local(args.checkpoint, port=0)
    except StartError as err:
        raise SetupError(f"the local cloud tier did not start: {err}") from None
    app.log(f"local cloud serving on {app.cloud.address} after {time.perf_counter() - t0:.1f} s")
    return CloudTarget(app.cloud.address, app.cloud.token, max_message_bytes=args.max_message_bytes)


def close_app(app: EdgeApp) -> None:
    for closer in (lambda: app.link and app.link.close(), lambda: app.source.close(),
                   lambda: app.cloud and app.cloud.stop()):
        try:
            closer()
        except Exception as err:  # noqa: BLE001 - best effort on the way out
            app.log(f"while closing: {err.__class__.__name__}: {err}")
    if app.cloud is not None:
        app.log("local cloud stopped")
        app.cloud = None


def run_app(app: EdgeApp, status_stream=None) -> dict:
    """Run the source to its end (or until app.stop is set); returns the summary dict."""
    from .pipeline import AgentSettings, EdgeAgent
    from .report import JsonLines, Stats, StatusLine, summary_table

    args = app.args
    agent = app.agent = EdgeAgent(app.model, app.metadata["identity"], app.decider, app.link,
                                  AgentSettings(deadline_ms=args.deadline_ms, in_flight=args.in_flight,
                                                network_threads=max(1, args.in_flight),
                                                emulate_device=args.emulate_device), app.stop)
    classes = app.source.classes or app.metadata.get("classes")
    out = JsonLines(args.output, classes, app.json_stream)
    stats = Stats(app.model.num_exits)
    status = StatusLine(status_stream, enabled=not args.quiet)
    display = Display(args.display, classes, app.log)

    def refresh(force=False):
        status.show(stats.status_line(app.link.estimate.snapshot() if app.link else None,
                                      app.link.breaker.state if app.link else None, agent.counters.dropped), force)

    try:
        for result in agent.run(app.source, on_idle=refresh):
            out.write(result)
            stats.add(result)
            if display.active:
                display.show(result.pixels, result)
            refresh()
    finally:
        refresh(force=True)
        status.end()
        out.close()
        display.close()
        extra = {"captured": agent.counters.captured, "dropped": agent.counters.dropped,
                 "interrupted": app.stop.is_set(), "rule": app.decider.rule, "price": app.decider.price,
                 "threshold": app.decider.threshold, "stop_confidence": app.decider.stop_confidence or None,
                 "jpeg_stop_confidence": app.decider.stop_confidence_for("jpeg") or None,
                 "device_gflops": round(app.decider.settings.device_gflops, 2),
                 "device_gflops_measured": args.device_gflops is None,
                 "source": app.source.source.__class__.__name__}
        if app.link is not None:
            extra.update(network_estimate=app.link.estimate.snapshot(), circuit_trips=app.link.breaker.trips,
                         circuit_state=app.link.breaker.state)
        app.summary = stats.summary(extra)
        (status_stream or sys.stderr).write(summary_table(app.summary) + "\n")
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps(app.summary, indent=2) + "\n")
    return app.summary


def _install_signals(app: EdgeApp):
    """First Ctrl-C / SIGTERM: stop reading frames, answer those in hand, print the summary, stop the cloud.
    A second Ctrl-C aborts at once. Installed after start_local (ray.init replaces SIGTERM handling)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, _frame):
        if app.stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        app.log(f"{signal.Signals(signum).name}: stopping after the frames in hand (Ctrl-C again to abort)")
        app.stop.set()

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _reserve_stdout():
    """For --output -: keep the real stdout for the JSON lines only and send everything else that writes to
    fd 1 (Ray's raylet messages, library prints) to stderr. Returns the JSON stream."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(fd, "w", buffering=1, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    json_stream = None
    if "-" in argv and any(a == "--output" and i + 1 < len(argv) and argv[i + 1] == "-" for i, a in enumerate(argv)) \
            or "--output=-" in argv:
        json_stream = _reserve_stdout()
    try:
        app = build_app(argv)
        app.json_stream = json_stream
    except SetupError as err:
        _log(f"error: {err}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _log("interrupted during start-up")
        return EXIT_INTERRUPTED
    previous = _install_signals(app)
    try:
        run_app(app)
    except KeyboardInterrupt:
        _log("aborted")
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - e.g. a source that broke mid-way: say so, not a traceback
        _log(f"error: {err.__class__.__name__}: {err}")
        return 1
    finally:
        close_app(app)
        for sig, h in previous.items():
            signal.signal(sig, h)
    return EXIT_INTERRUPTED if app.stop.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
