"""edge-agent: predictor-driven early exit on the device, split offload to the cloud over gRPC, and a
graceful local fallback.

    edge-agent --dataset cifar10 --limit 500                   # the whole system on this machine
    edge-agent --camera 0 --cloud HEAD:50051 --tls-ca ca.pem --token-file token.txt --output frames.jsonl
    edge-agent --stream rtsp://cam.local/stream1 --cloud HEAD:50051 --metrics-port 9102
    edge-agent --config edge.yaml --limit 100                  # a configuration file; flags override it
    edge-agent --video clip.avi --device-gflops 2 --latency-budget-ms 40 --output -

Without --cloud the agent starts the cloud tier itself on 127.0.0.1 (edge.embedded_cloud: local Ray, the Serve
app and the gRPC front) and stops it on exit. Before the first frame it checks the cloud (edge.startup). The flags
(and --config FILE) build an edge.config.EdgeConfig, which holds every setting and its default in one place. See
docs/edge.md.
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
META_FLAGS = ("config", "print_config")  # flags about the configuration itself, not settings in it
SOURCE_FLAGS = ("--camera", "--stream", "--video", "--images", "--dataset")
MODEL_NAMES = {"rapnet": "RAPNet", "sdn": "SDN", "static": "static network"}  # for the start-up line


class SetupError(Exception):
    """Something the user must fix before the agent can run (message says what); exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """The edge-agent flags. Each flag's dest is the name of its field in edge.config (EdgeConfig.from_args maps
    them), and each default is that field's default, so the help shows the defaults the agent runs with."""
    from rapnet.help_format import DefaultsHelpFormatter

    from .config import AgentSettings, CloudSettings, DecisionSettings, EdgeConfig, OutputSettings, SourceSettings
    from .config import default_checkpoint

    p = argparse.ArgumentParser(prog="edge-agent", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="YAML configuration file (edge/edge.example.yaml documents every key); the flags given "
                        "override its values (default: none, the flags and their defaults)")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective configuration (file, flags and defaults merged) as YAML, and exit")
    src = p.add_argument_group("source (exactly one, from the flags or the --config file)")
    g = src.add_mutually_exclusive_group()
    g.add_argument("--camera", type=_camera, metavar="N|DEVICE",
                   help="camera: OpenCV index or device path such as /dev/video0 (live: the latest frame wins; "
                        "reconnected if it vanishes)")
    g.add_argument("--stream", metavar="URL",
                   help="network camera: rtsp://, rtsps://, http:// or https:// (MJPEG) URL, read by FFmpeg (live; "
                        "reconnected when it stops)")
    g.add_argument("--video", metavar="PATH", help="video file (every frame, in order)")
    g.add_argument("--images", metavar="DIR|ARCHIVE", help="folder of images (recursive) or a tar archive of them")
    g.add_argument("--dataset", metavar="NAME|PATH", help="labelled dataset via rapnet.data (the agent reports accuracy)")
    src.add_argument("--split", default=SourceSettings.split, help="dataset split")
    src.add_argument("--limit", type=int, default=SourceSettings.limit, metavar="N",
                     help="stop after N frames (a dataset: a seeded sample spread over the classes; 0: all; a live "
                          "source runs until Ctrl-C)")
    src.add_argument("--stall-timeout-s", type=float, default=SourceSettings.stall_timeout_s, metavar="S",
                     help="live source: no frame for S seconds counts as an outage, and the watchdog reconnects")
    src.add_argument("--reconnect-max-s", type=float, default=SourceSettings.reconnect_max_s, metavar="S",
                     help="live source: the reconnect backoff starts at 0.5 s and doubles up to S (with jitter)")

    m = p.add_argument_group("model and exit rule")
    m.add_argument("--checkpoint", default=None,
                   help="RAPNet checkpoint, run on the edge and in the embedded cloud (default: the shipped model for "
                        f"--dataset where one ships, else the camera-resolution model, {default_checkpoint()})")
    rule = m.add_mutually_exclusive_group()
    rule.add_argument("--price", type=float, default=DecisionSettings.price, metavar="Q",
                      help="the priced rule: the exit maximising predictor score - Q x relative cost (default: the "
                           "checkpoint metadata's \"price\", else 0.03; see docs/edge.md)")
    rule.add_argument("--threshold", type=float, default=DecisionSettings.threshold, metavar="T",
                      help="use the threshold rule instead: the shallowest exit whose predictor score reaches T "
                           "(default: the priced rule)")
    m.add_argument("--stop-confidence", type=float, default=DecisionSettings.stop_confidence, metavar="P",
                   help="the capped rule (with the priced rule): the priced rule's exit becomes the deepest the frame "
                        "may run, and the first exit on the way whose top softmax probability reaches P answers; edge "
                        "and cloud both check (default: none, the priced rule's exit answers)")
    m.add_argument("--runtime", type=_runtime, default="auto", metavar="auto|onnx|torch",
                   help="what runs the model here: onnx (ONNX Runtime on the graphs rapnet-export writes; when a "
                        "checkpoint has none and torch is installed, they are exported once into the rapnet cache) or "
                        "torch (eager PyTorch); auto: onnx where onnxruntime is installed, else torch")
    m.add_argument("--torch-threads", type=int, default=EdgeConfig.torch_threads, metavar="N",
                   help="intra-op threads of the agent's runtime (ONNX Runtime or PyTorch)")

    plan = p.add_argument_group("planner: the device, the cloud and the network")
    plan.add_argument("--device-gflops", type=_gflops, default="auto", metavar="G|auto",
                      help="the device's compute, GFLOP/s; auto: measured at start-up by timing the predictor and the "
                           "whole network on a calibration frame")
    plan.add_argument("--cloud-gflops", type=float, default=DecisionSettings.cloud_gflops, metavar="G",
                      help="the cloud's compute per request, GFLOP/s")
    plan.add_argument("--latency-budget-ms", type=float, default=DecisionSettings.latency_budget_ms, metavar="MS",
                      help="per-frame latency budget the planner keeps (default: none)")
    plan.add_argument("--encoding", dest="encodings", type=_encodings, default="auto", metavar="auto|LIST",
                      help="what the planner may send: auto (png,raw+zstd,jpeg,int8+zstd,fp16+zstd,fp32+zstd) or a "
                           "comma-separated menu of those; png, raw+zstd and jpeg send the image only (split 0), the "
                           "others encode features (splits >= 1). Lossy ones are used only where they keep the "
                           "answers: int8 and fp16 by agreement on the calibration frames, jpeg by the accuracy in a "
                           "--traces cache")
    plan.add_argument("--bandwidth-mbps", type=float, default=DecisionSettings.bandwidth_mbps, metavar="MBPS",
                      help="uplink prior, until transfers are measured")
    plan.add_argument("--rtt-ms", type=float, default=DecisionSettings.rtt_ms, metavar="MS",
                      help="round-trip prior, until transfers are measured")
    plan.add_argument("--no-cloud-exit", dest="cloud_exit", action="store_false",
                      help="always run the exit predictor here (default: where sending the image at once is faster "
                           "on average over the rule's exits, on the calibration frames or the --traces calibration "
                           "images, the edge skips it and the cloud picks the exit with the same rule)")
    plan.add_argument("--calibration-frames", type=int, default=DecisionSettings.calibration_frames, metavar="N",
                      help="first frames on which real request sizes are measured for the planner")
    plan.add_argument("--traces", default=DecisionSettings.traces, metavar="CACHE",
                      help="rapnet-sim trace cache of this checkpoint to take request sizes and JPEG's accuracy from "
                           "(default: none, sizes measured on the calibration frames and JPEG off the menu)")

    c = p.add_argument_group("cloud")
    c.add_argument("--cloud", dest="address", metavar="HOST:PORT", default=CloudSettings.address,
                   help="the cloud front (default: start the cloud tier on 127.0.0.1 for this run)")
    c.add_argument("--deadline-ms", type=float, default=AgentSettings.deadline_ms, metavar="MS",
                   help="per-request deadline; past it the edge answers the frame itself")
    c.add_argument("--tls-ca", default=CloudSettings.tls_ca, metavar="PEM",
                   help="CA certificate that signed the cloud's certificate (default: none, plaintext)")
    c.add_argument("--tls-cert", default=CloudSettings.tls_cert, metavar="PEM",
                   help="client certificate, for mutual TLS with --tls-key (default: none)")
    c.add_argument("--tls-key", default=CloudSettings.tls_key, metavar="PEM",
                   help="client key, for mutual TLS (default: none)")
    c.add_argument("--token-file", default=CloudSettings.token_file, metavar="FILE",
                   help="bearer token file, never printed (default: $RAPNET_TOKEN)")
    c.add_argument("--in-flight", type=int, default=AgentSettings.in_flight, metavar="N",
                   help="requests queued or on the wire at once")
    c.add_argument("--breaker-failures", type=int, default=CloudSettings.breaker_failures, metavar="N",
                   help="consecutive failures that open the circuit (frames are then answered here)")
    c.add_argument("--breaker-cooldown-s", type=float, default=CloudSettings.breaker_cooldown_s, metavar="S",
                   help="open time before a half-open probe")
    c.add_argument("--max-message-bytes", type=_message_bytes, default=CloudSettings.max_message_bytes,
                   metavar="auto|N",
                   help="gRPC send and receive limit, bytes (default: auto, from the model contract: the largest "
                        "request the checkpoint's carry and the --encoding menu can make, which is the cloud front's "
                        "receive limit for the model; the planner sends no request over the limit)")
    c.add_argument("--no-cloud-check", dest="startup_check", action="store_false",
                   help="skip the start-up check of the cloud (default: before the first frame, check its health and "
                        "make one authenticated call; a failure that every offload would meet is logged with its fix, "
                        "and frames are answered here until a background re-check passes)")

    o = p.add_argument_group("output")
    o.add_argument("--output", default=OutputSettings.output, metavar="FILE|-",
                   help="JSON lines, one per frame; -: stdout (default: none)")
    o.add_argument("--summary-json", default=OutputSettings.summary_json, metavar="FILE",
                   help="also write the summary as JSON (default: none; the summary is always printed to stderr)")
    o.add_argument("--display", action="store_true", help="draw the label in an OpenCV window (needs a screen)")
    o.add_argument("--quiet", action="store_true", help="no live status line")
    o.add_argument("--metrics-port", type=int, default=OutputSettings.metrics_port, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0: a free port, logged; default: "
                        "none, no endpoint)")
    o.add_argument("--metrics-host", default=OutputSettings.metrics_host, metavar="HOST",
                   help="address the metrics endpoint binds")

    v = p.add_argument_group("emulation, for live validation (rapnet-sim live) and reproducible runs")
    v.add_argument("--rate", type=float, default=SourceSettings.rate, metavar="FPS",
                   help="pace a file or dataset source at FPS frames/s, as a camera would deliver it (0: as fast as "
                        "read)")
    v.add_argument("--emulate-device", action="store_true",
                   help="pad local compute and encoding (sleep) to the planner's modelled time on --device-gflops G, "
                        "to emulate a device slower than this CPU")
    v.add_argument("--device-layer-us", type=float, default=DecisionSettings.device_layer_us, metavar="US",
                   help="per-layer-call cost on the device, microseconds (default: the reference CPU's, scaled to "
                        "the device's speed)")
    v.add_argument("--fixed-network", action="store_true",
                   help="plan with --bandwidth-mbps and --rtt-ms only (the live estimate is still reported)")
    v.add_argument("--cloud-overhead-ms", type=float, default=DecisionSettings.cloud_overhead_ms, metavar="MS",
                   help="with --fixed-network: fixed cost per cloud request the planner adds (gRPC, front, Ray hop, "
                        "batching), which rapnet-sim live measures; without it the live estimate holds this cost")
    return p


def _camera(value: str) -> int | str:
    """--camera: an index (digits) or a device path."""
    return int(value) if value.strip().isdigit() else value


def _runtime(value: str) -> str | None:
    """--runtime: None for auto (edge.runtime.default_runtime)."""
    if value not in ("auto", "onnx", "torch"):
        raise argparse.ArgumentTypeError(f"{value!r}: choose auto, onnx or torch")
    return None if value == "auto" else value


def _message_bytes(value: str) -> int | None:
    """--max-message-bytes: None for auto (from the model contract)."""
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number of bytes nor 'auto'") from None


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


def _encodings(value: str) -> tuple[str, ...] | None:
    """--encoding: None for auto (the default menu), else the menu asked for."""
    from rapnet.codec.menu import parse_encodings

    if value.strip() == "auto":
        return None
    try:
        return parse_encodings(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_config(argv: list[str] | None = None):
    """The edge.config.EdgeConfig the flags (and a --config file) ask for. argparse exits on malformed flags;
    SetupError for values that cannot work together."""
    return parse_command(argv)[0]


def parse_command(argv: list[str] | None = None):
    """(EdgeConfig, parsed flags). With --config FILE the file gives the settings and only the flags the user
    typed override them; without it, the flags and their defaults do."""
    from .config import ConfigError, EdgeConfig

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.config is None:
            if all(getattr(args, flag[2:]) is None for flag in SOURCE_FLAGS):
                parser.error(f"give a source: one of {', '.join(SOURCE_FLAGS)}, or --config FILE with a source section")
            return EdgeConfig.from_args(args), args
        return EdgeConfig.from_file(args.config, given_flags(parser, argv, args)), args
    except ConfigError as err:
        raise SetupError(str(err)) from None


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> dict:
    """The settings the user gave on the command line (flag dest -> value), without the defaults of the others:
    the same command line parsed again into a namespace that already holds a marker for every setting (argparse
    writes no default over a value that is there, so whatever is not the marker afterwards was typed)."""
    unset = object()
    given = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset))))
    return {dest: value for dest, value in given.items() if value is not unset and dest not in META_FLAGS}


def config_yaml(config) -> str:
    """The configuration as YAML that --config reads back (--print-config)."""
    import yaml

    return yaml.safe_dump(config.to_mapping(), sort_keys=False, default_flow_style=False)


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
        from rapnet.class_names import readable

        name = readable(self.classes[result.class_index]) if self.classes and result.class_index < len(self.classes) \
            else str(result.class_index)
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
    """Everything one agent run holds (built by `build_app`, run by `run_app`). Tests use it in-process."""

    config: object  # edge.config.EdgeConfig
    model: object
    metadata: dict
    source: object
    decider: object = None
    link: object = None
    cloud: object = None  # the embedded local cloud when this process started one (edge.embedded_cloud)
    stop: threading.Event = field(default_factory=threading.Event)
    log: object = None
    json_stream: object = None  # where --output - writes (main() keeps the real stdout for it)
    summary: dict | None = None
    agent: object = None
    contract: object = None  # rapnet.checkpoint.InputContract: the model's input size, layout and class names
    check: object = None  # edge.startup.CloudCheck: the start-up check of the cloud, and its background re-checks
    metrics: object = None  # edge.metrics.EdgeMetrics when --metrics-port asks for the endpoint
    # The link's gRPC send and receive limit, bytes: --max-message-bytes, else the model contract's (the largest
    # request the encoding menu can make for this model); the planner sends no request over it.
    message_limit: int | None = None


def _log(msg: str) -> None:
    sys.stderr.write(f"[edge] {msg}\n")
    sys.stderr.flush()


def build_app(argv_or_config=None, log=_log) -> EdgeApp:
    """Load the model, open the source, connect to (or start) the cloud, build the planner, from flags (a list,
    None: sys.argv) or an edge.config.EdgeConfig. Raises SetupError for anything the user must fix."""
    from .config import EdgeConfig

    config = argv_or_config if isinstance(argv_or_config, EdgeConfig) else parse_config(argv_or_config)
    from rapnet.data import DatasetError

    from orchestration.planner import MAX_JPEG_ACCURACY_DROP

    from .decide import build_decider
    from .frames import SourceError, open_source
    from .link import CircuitBreaker, CloudLink, NetworkEstimate
    from .runtime import RuntimeSetupError, open_runtime

    decision = config.decision
    try:  # the model on its runtime (edge.runtime: ONNX Runtime or PyTorch)
        loaded = open_runtime(config.checkpoint, config.runtime, config.torch_threads, log)
    except RuntimeSetupError as err:
        raise SetupError(str(err)) from None
    model, metadata, contract = loaded.runtime, loaded.metadata, loaded.contract
    log(f"model: {MODEL_NAMES.get(model.kind, model.kind)}, {contract.describe()}")
    log(f"runtime: {loaded.where}")
    stop = threading.Event()  # Ctrl-C: also ends a live source's reconnect loop
    try:  # every frame is fitted to the model's input size (rapnet.data.fit_image), whatever size it comes in
        source = _Peeked(open_source(config.source, contract.image_size, stop=stop, log=log),
                         decision.calibration_frames, config.source.rate)
    except SourceError as err:
        raise SetupError(str(err)) from None
    if source.classes is not None:  # labelled frames: their labels must mean what the model's outputs mean
        try:
            contract.check_classes(source.classes, data=config.source.describe(), model=str(config.checkpoint))
        except DatasetError as err:  # rapnet.checkpoint.ClassMismatchError
            source.close()
            raise SetupError(str(err)) from None
    if not source.head:
        source.close()
        raise SetupError(f"{config.source.describe()} yielded no frame")
    app = EdgeApp(config, model, metadata, source, stop=stop, log=log, contract=contract,
                  message_limit=config.cloud.message_limit(model.contract, decision.menu))
    given = " (--max-message-bytes)" if config.cloud.max_message_bytes is not None else " (from the model contract)"
    log(f"gRPC message limit: {app.message_limit} bytes{given}")
    try:
        target = _cloud_target(app)
        import numpy as np

        t0 = time.perf_counter()
        try:
            app.decider = build_decider(model, np.stack([f.pixels for f in source.head]), decision, metadata,
                                        max_request_bytes=app.message_limit)
        except ValueError as err:  # settings that cannot work together, e.g. a per-layer cost above the measured time
            raise SetupError(str(err)) from None
        measured = " (measured)" if decision.device_gflops is None else ""
        log(f"planner ready in {time.perf_counter() - t0:.1f} s ({app.decider.rule} {app.decider.knob}, "
            f"{len(source.head)} calibration frames, device {app.decider.settings.device_gflops:.1f} GFLOP/s{measured})")
        if app.decider.stop_confidence_for("jpeg") != app.decider.stop_confidence:
            log(f"frames sent as JPEG stop at confidence {app.decider.stop_confidence_for('jpeg'):g}, tuned on the trace "
                f"cache's held-out split so that JPEG costs the exits no accuracy")
        if decision.encodings is not None and "jpeg" in decision.encodings and (0, "jpeg") not in app.decider.planner.menu:
            log(f"--encoding {','.join(decision.encodings)}: JPEG stays off the menu, since whether it costs this "
                f"model accuracy needs labelled held-out frames: pass --traces with a rapnet-sim trace cache of this "
                f"checkpoint (JPEG is used when its exits lose at most {MAX_JPEG_ACCURACY_DROP:.1%} accuracy there "
                f"on average)")
        cloud = config.cloud
        app.link = CloudLink(target, config.agent.deadline_ms,
                             CircuitBreaker(cloud.breaker_failures, cloud.breaker_cooldown_s),
                             NetworkEstimate(decision.bandwidth_mbps, decision.rtt_ms))
    except BaseException:
        close_app(app)
        raise
    from rapnet.runtime import freeze_startup_heap

    freeze_startup_heap()  # no 0.2 s collector pauses in the frame loop
    return app


def _cloud_target(app: EdgeApp):
    """Where the agent sends frames: the remote cloud of --cloud (with its token), or the embedded local cloud this
    process starts."""
    from rapnet.transport import load_token

    from .link import CloudTarget

    settings = app.config.cloud
    if not settings.embedded:
        try:
            token = load_token(settings.token_file)
        except ValueError as err:
            raise SetupError(str(err)) from None
        if token is None:
            app.log("no token (--token-file or $RAPNET_TOKEN): the cloud will refuse requests (UNAUTHENTICATED); "
                    "frames that would be offloaded are answered locally, flagged degraded")
        return CloudTarget.from_settings(settings, token.value if token else None, max_message_bytes=app.message_limit)
    from .embedded_cloud import EmbeddedCloudError, start_embedded_cloud

    app.log("starting the cloud tier on 127.0.0.1 (local Ray + Serve + gRPC front; use --cloud HOST:PORT for a remote one)")
    t0 = time.perf_counter()
    try:
        app.cloud = start_embedded_cloud(app.config.checkpoint)
    except EmbeddedCloudError as err:
        raise SetupError(str(err)) from None
    app.log(f"local cloud serving on {app.cloud.address} after {time.perf_counter() - t0:.1f} s")
    return CloudTarget.from_settings(settings, app.cloud.token, address=app.cloud.address,
                                     max_message_bytes=app.message_limit)


def close_app(app: EdgeApp) -> None:
    for closer in (lambda: app.check and app.check.stop(), lambda: app.metrics and app.metrics.stop(),
                   lambda: app.link and app.link.close(), lambda: app.source.close(),
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
    from .pipeline import EdgeAgent
    from .report import JsonLines, Stats, StatusLine, summary_table

    output = app.config.output
    agent = app.agent = EdgeAgent(app.model, app.metadata["identity"], app.decider, app.link, app.config.agent,
                                  app.stop)
    start_checks_and_metrics(app)
    classes = list(app.contract.class_names)  # the model's names for its outputs, never the dataset's
    out = JsonLines(output.output, classes, app.json_stream)
    stats = Stats(app.model.num_exits)
    status = StatusLine(status_stream, enabled=not output.quiet)
    display = Display(output.display, classes, app.log)

    def refresh(force=False):
        status.show(stats.status_line(app.link.estimate.snapshot() if app.link else None,
                                      app.link.breaker.state if app.link else None, agent.counters.dropped), force)

    try:
        for result in agent.run(app.source, on_idle=refresh):
            out.write(result)
            stats.add(result)
            if app.metrics is not None:
                app.metrics.observe(result)
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
                 "device_gflops_measured": app.config.decision.device_gflops is None,
                 "source": app.source.source.__class__.__name__}
        if app.link is not None:
            extra.update(network_estimate=app.link.estimate.snapshot(), circuit_trips=app.link.breaker.trips,
                         circuit_state=app.link.breaker.state)
        if app.check is not None and app.check.result is not None:
            extra.update(cloud_check=app.check.result.kind, cloud_check_attempts=app.check.attempts)
        live = app.source.source
        if getattr(live, "live", False) and hasattr(live, "reconnects"):
            extra.update(reconnects=live.reconnects, outages=live.outages, seconds_down=round(live.down_s, 3))
        app.summary = stats.summary(extra)
        (status_stream or sys.stderr).write(summary_table(app.summary) + "\n")
        if output.summary_json:
            Path(output.summary_json).write_text(json.dumps(app.summary, indent=2) + "\n")
    return app.summary


def start_checks_and_metrics(app: EdgeApp) -> None:
    """Before the first frame: the metrics endpoint (when asked for) and the start-up check of the cloud, whose
    failure blocks offloading until a background re-check passes (edge.startup)."""
    output = app.config.output
    if output.metrics_port is not None:
        from .metrics import EdgeMetrics

        app.metrics = EdgeMetrics()
        app.metrics.watch(source=app.source.source, agent=app.agent, link=app.link)
        try:
            port = app.metrics.serve(output.metrics_host, output.metrics_port)
        except OSError as err:
            app.metrics = None
            raise SetupError(f"--metrics-port {output.metrics_port} on {output.metrics_host}: cannot bind it "
                             f"({err.strerror or err}); pick a free port, or 0 for any") from None
        app.log(f"metrics on http://{output.metrics_host}:{port}/metrics")
    if app.link is not None and app.config.cloud.startup_check:
        from .startup import CloudCheck

        app.check = CloudCheck(app.link, app.agent.contract, app.config.cloud, log=app.log,
                               checkpoint=str(app.config.checkpoint))
        if app.metrics is not None:
            app.metrics.watch(source=app.source.source, agent=app.agent, link=app.link, check=app.check)
        app.check.start()


def _install_signals(app: EdgeApp):
    """First Ctrl-C / SIGTERM: stop reading frames, answer those in hand, print the summary, stop the cloud.
    A second Ctrl-C aborts at once. Installed after the embedded cloud started (ray.init replaces SIGTERM
    handling)."""
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
    try:
        config, args = parse_command(argv)
        if args.print_config:
            sys.stdout.write(config_yaml(config))
            return 0
        json_stream = _reserve_stdout() if config.output.output == "-" else None
        app = build_app(config)
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
    except SetupError as err:  # found before the first frame (e.g. a metrics port in use)
        _log(f"error: {err}")
        return EXIT_USAGE
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
